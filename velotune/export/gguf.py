"""GGUF export for llama.cpp (and everything built on it: Ollama, LM Studio, llama-cpp-python).

f32 / f16 / bf16 / q8_0 are written here with the `gguf` package; the k-quants (q4_k_m, q5_k_m,
q6_k, q4_0) are made from such a file by llama.cpp's own quantizer (through llama-cpp-python),
so they are bit-for-bit what llama.cpp's `llama-quantize` would make.

What llama.cpp computes differs from Transformers in ways the file must absorb:
- llama-architecture rope rotates adjacent pairs, Transformers rotates halves: q/k rows are
  permuted per head so the same pairs meet;
- Gemma's (1 + w) norms are stored as 1 + w;
- Gemma 2's query scale is fixed by llama.cpp, so any other query_pre_attn_scalar is folded into
  the q weights (a scalar commutes with rope);
- static rope scalings (llama3, linear, yarn) become a per-frequency divisor tensor (rope_freqs)
  plus an attention factor, computed from velotune's own rope code, so they cannot drift apart.

The file is written in two passes: tensor shapes and types first (header), then each tensor is
computed (LoRA merged), converted and written, one at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGUFWriter
from gguf.constants import (
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    LlamaFileType,
    RopeScalingType,
)
from gguf.constants import MODEL_TENSOR as T
from gguf.quants import quant_shape_to_byte_shape, quantize

from velotune.errors import ConfigError, UnsupportedModelError
from velotune.export.atomic import atomic_file
from velotune.export.gguf_names import ARCHS, LLAMA_CPP_FTYPES, LlamaCppArch, tensor_name
from velotune.export.gguf_vocab import vocab_from_tokenizer, write_vocab
from velotune.export.weights import EffectiveWeights
from velotune.models.rope_scaling import rope_frequencies
from velotune.models.spec import ArchSpec

logger = logging.getLogger(__name__)

Q = GGMLQuantizationType
PYTHON_TYPES = {
    "f32": (LlamaFileType.ALL_F32, Q.F32),
    "f16": (LlamaFileType.MOSTLY_F16, Q.F16),
    "bf16": (LlamaFileType.MOSTLY_BF16, Q.BF16),
    "q8_0": (LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
}
QUANTIZATION_METHODS = (*PYTHON_TYPES, *LLAMA_CPP_FTYPES)
_NO_CAP = 1e9


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]  # PyTorch layout ([out, in] for weights)
    produce: Callable[[], torch.Tensor]
    keep_f32: bool = False


def arch_for(spec: ArchSpec) -> LlamaCppArch:
    """llama.cpp's architecture for this model, after checking llama.cpp computes what velotune does."""
    if spec.model_type not in ARCHS:
        raise UnsupportedModelError(f"no llama.cpp architecture is known for model_type {spec.model_type!r}.")
    arch = ARCHS[spec.model_type]
    problems = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    need(
        spec.activation == arch.activation,
        f"activation {spec.activation} (llama.cpp's {arch.name}: {arch.activation})",
    )
    need(arch.qkv_bias or not spec.qkv_bias, "q/k/v biases")
    need(arch.o_bias or not spec.o_bias, "an output-projection bias")
    need(arch.mlp_bias or not spec.mlp_bias, "MLP biases")
    need(spec.qk_norm == arch.qk_norm, "q/k norms" if spec.qk_norm else "no q/k norms")
    need(spec.sandwich_norms == arch.sandwich_norms, "norms after attention and MLP")
    need((spec.moe is not None) == arch.moe, "a mixture of experts" if spec.moe else "a dense MLP")
    need(arch.untied_head or spec.tie_word_embeddings, "an untied LM head")
    need(
        arch.softcaps or (spec.attn_logit_softcap is None and spec.final_logit_softcap is None),
        "logit soft-capping",
    )
    need(arch.fixed_query_scale or spec.attention_scale is None, "a custom attention scale")
    scaled = spec.embedding_scale is not None
    need(
        scaled == arch.embedding_scaled,
        "embeddings scaled by sqrt(hidden)" if scaled else "unscaled embeddings",
    )
    if scaled:
        need(
            math.isclose(spec.embedding_scale, spec.hidden_size**0.5),
            "an embedding scale other than sqrt(hidden)",
        )
    need(not arch.attention_is_hidden or spec.q_size == spec.hidden_size, "heads x head_dim != hidden_size")
    need(
        not arch.interleaved_rope or spec.rope.rotary_dim == spec.head_dim,
        "partial rotary with pair-wise rope",
    )
    if problems:
        raise UnsupportedModelError(
            f"llama.cpp's {arch.name} architecture cannot run this {spec.model_type} model: it has "
            f"{', '.join(problems)}. Export the merged Hugging Face folder instead (save_method='merged_16bit')."
        )
    windows = {w for w in spec.sliding_windows if w is not None}
    if windows and not arch.sliding_window:
        logger.warning(
            "llama.cpp's %s attends over the whole context, but this model uses a sliding window of %s tokens: "
            "outputs agree only for contexts up to that length.", arch.name, min(windows),
        )  # fmt: skip
    if len(windows) > 1:
        raise UnsupportedModelError(
            f"layers use different sliding windows {sorted(windows)}; GGUF holds one."
        )
    return arch


def _interleave_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    # Per head, rows [x0..x(d/2-1), y0..y(d/2-1)] (rotate-half) become [x0, y0, x1, y1, ...].
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _query_scale_fold(spec: ArchSpec, arch: LlamaCppArch) -> float:
    if not arch.fixed_query_scale:
        return 1.0
    llama_cpp_dim = spec.hidden_size / spec.num_heads if spec.num_layers == 46 else spec.head_dim
    return spec.scale / llama_cpp_dim**-0.5


def _rope_tensors_and_keys(
    spec: ArchSpec, arch: LlamaCppArch
) -> tuple[list[_Tensor], Callable[[GGUFWriter], None]]:
    rope = spec.rope
    tensors: list[_Tensor] = []
    keys: list[Callable[[GGUFWriter], None]] = []
    half = rope.rotary_dim // 2
    if rope.kind == "default":
        pass
    elif rope.kind == "longrope" and arch.longrope:
        original = int(rope.original_max_position_embeddings)
        _, attention_factor = rope_frequencies(rope, original)
        short, long = (torch.tensor(f, dtype=torch.float32) for f in (rope.short_factor, rope.long_factor))
        tensors += [
            _Tensor(tensor_name(T.ROPE_FACTORS_LONG, arch), (half,), lambda: long, True),
            _Tensor(tensor_name(T.ROPE_FACTORS_SHORT, arch), (half,), lambda: short, True),
        ]
        keys += [
            lambda w: w.add_rope_scaling_type(RopeScalingType.LONGROPE),
            lambda w: w.add_rope_scaling_orig_ctx_len(original),
            lambda w: w.add_rope_scaling_attn_factors(float(attention_factor)),
        ]
    elif rope.kind in ("linear", "llama3", "yarn") and arch.rope_freqs:
        # llama.cpp divides each base frequency by rope_freqs[i]: the divisors are base / scaled.
        scaled, attention_factor = rope_frequencies(rope, None)
        base, _ = rope_frequencies(dataclasses.replace(rope, kind="default"), None)
        divisors = (base / scaled).float()
        tensors.append(_Tensor(tensor_name(T.ROPE_FREQS, arch), (half,), lambda: divisors, True))
        if attention_factor != 1.0:
            keys.append(lambda w: w.add_rope_scaling_attn_factors(float(attention_factor)))
    elif rope.kind == "linear":
        keys += [
            lambda w: w.add_rope_scaling_type(RopeScalingType.LINEAR),
            lambda w: w.add_rope_scaling_factor(float(rope.factor)),
        ]
    else:
        raise UnsupportedModelError(
            f"rope scaling {rope.kind!r} cannot be expressed for llama.cpp's {arch.name}; export the merged "
            "Hugging Face folder instead."
        )
    return tensors, lambda w: [k(w) for k in keys]


def tensor_plan(model, arch: LlamaCppArch) -> list[_Tensor]:
    """Every tensor of the file, in order, with its GGUF name, shape and how to compute it."""
    spec: ArchSpec = model.spec
    weights = EffectiveWeights(model)
    offset = spec.norm_offset
    plan: list[_Tensor] = []

    def add(kind: T, internal: str, index: tuple = (), layer: int | None = None, *, suffix: str = "weight",
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None, keep_f32: bool = False) -> None:  # fmt: skip
        shape = weights.shape(internal, index)

        def produce() -> torch.Tensor:
            value = weights.slice(internal, index).detach().to("cpu", torch.float32)
            return transform(value) if transform is not None else value

        plan.append(_Tensor(tensor_name(kind, arch, layer, suffix), shape, produce, keep_f32))

    def norm(kind: T, internal: str, layer: int | None = None) -> None:
        add(kind, internal, (), layer, transform=(lambda w: w + offset) if offset else None, keep_f32=True)

    add(T.TOKEN_EMBD, "embed_tokens.weight")
    norm(T.OUTPUT_NORM, "norm.weight")
    if not spec.tie_word_embeddings:
        add(T.OUTPUT, "lm_head.weight")
    rope_tensors, _ = _rope_tensors_and_keys(spec, arch)
    plan += rope_tensors

    q, kv, inter = spec.q_size, spec.kv_size, spec.intermediate_size
    q_fold = _query_scale_fold(spec, arch)
    for i in range(spec.num_layers):
        p = f"layers.{i}."
        norm(T.ATTN_NORM, p + "attn_norm.weight", i)
        for suffix in ("weight", "bias") if spec.qkv_bias else ("weight",):
            internal = f"{p}attn.qkv.{suffix}"
            if arch.fused_qkv:
                add(T.ATTN_QKV, internal, (), i, suffix=suffix)
                continue
            q_transform = (lambda w: w * q_fold) if q_fold != 1.0 else None
            k_transform = None
            if arch.interleaved_rope:
                q_transform = lambda w, f=q_fold: _interleave_pairs(w * f, spec.num_heads)  # noqa: E731
                k_transform = lambda w: _interleave_pairs(w, spec.num_kv_heads)  # noqa: E731
            add(T.ATTN_Q, internal, (slice(0, q),), i, suffix=suffix, transform=q_transform)
            add(T.ATTN_K, internal, (slice(q, q + kv),), i, suffix=suffix, transform=k_transform)
            add(T.ATTN_V, internal, (slice(q + kv, q + 2 * kv),), i, suffix=suffix)
        add(T.ATTN_OUT, p + "attn.o_proj.weight", (), i)
        if spec.o_bias:
            add(T.ATTN_OUT, p + "attn.o_proj.bias", (), i, suffix="bias")
        if spec.qk_norm:
            norm(T.ATTN_Q_NORM, p + "attn.q_norm.weight", i)
            norm(T.ATTN_K_NORM, p + "attn.k_norm.weight", i)
        if spec.sandwich_norms:
            norm(T.ATTN_POST_NORM, p + "attn_out_norm.weight", i)
            norm(T.FFN_POST_NORM, p + "mlp_out_norm.weight", i)
        # Gemma 2's pre-MLP norm has its own kind (same "ffn_norm" name) beside the post norms.
        norm(T.FFN_PRE_NORM if spec.sandwich_norms else T.FFN_NORM, p + "mlp_norm.weight", i)
        if spec.moe is not None:
            add(T.FFN_GATE_INP, p + "mlp.router", (), i, keep_f32=True)
            add(T.FFN_GATE_EXP, p + "mlp.gate_up", (slice(None), slice(0, inter)), i)
            add(T.FFN_UP_EXP, p + "mlp.gate_up", (slice(None), slice(inter, 2 * inter)), i)
            add(T.FFN_DOWN_EXP, p + "mlp.down", (), i)
            continue
        for suffix in ("weight", "bias") if spec.mlp_bias else ("weight",):
            internal = f"{p}mlp.gate_up.{suffix}"
            if arch.fused_gate_up:
                add(T.FFN_UP, internal, (), i, suffix=suffix)
            else:
                add(T.FFN_GATE, internal, (slice(0, inter),), i, suffix=suffix)
                add(T.FFN_UP, internal, (slice(inter, 2 * inter),), i, suffix=suffix)
            add(T.FFN_DOWN, f"{p}mlp.down_proj.{suffix}", (), i, suffix=suffix)
    return plan


def _write_metadata(
    writer: GGUFWriter, model, arch: LlamaCppArch, file_type: LlamaFileType, name: str
) -> None:
    spec: ArchSpec = model.spec
    writer.add_name(name)
    writer.add_file_type(int(file_type))
    if file_type not in (LlamaFileType.ALL_F32, LlamaFileType.MOSTLY_F16, LlamaFileType.MOSTLY_BF16):
        writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_vocab_size(spec.vocab_size)
    writer.add_context_length(int(spec.rope.max_position_embeddings))
    writer.add_embedding_length(spec.hidden_size)
    writer.add_block_count(spec.num_layers)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
    writer.add_rope_freq_base(spec.rope.theta)
    writer.add_rope_dimension_count(spec.rope.rotary_dim)
    _, rope_keys = _rope_tensors_and_keys(spec, arch)
    rope_keys(writer)
    if spec.moe is not None:
        writer.add_expert_count(spec.moe.num_experts)
        writer.add_expert_used_count(spec.moe.top_k)
    if arch.softcaps:
        # llama.cpp caps whether or not the file says so (Gemma 2's 50 / 30 by default): "no cap" is written
        # as a cap so large that c * tanh(x / c) rounds to x in float32.
        writer.add_attn_logit_softcapping(float(spec.attn_logit_softcap or _NO_CAP))
        writer.add_final_logit_softcapping(float(spec.final_logit_softcap or _NO_CAP))
    windows = [w for w in spec.sliding_windows if w is not None]
    if arch.sliding_window:
        writer.add_sliding_window(int(windows[0]) if windows else 0)
        writer.add_sliding_window_pattern(
            [w is not None for w in spec.sliding_windows] or [False] * spec.num_layers
        )


def _tensor_type(entry: _Tensor, file_type: Q) -> Q:
    if entry.keep_f32 or len(entry.shape) == 1:
        return Q.F32  # llama.cpp reads norms, biases, rope factors and routers in float32
    try:
        quant_shape_to_byte_shape(entry.shape, file_type)
    except ValueError:
        logger.info(
            "%s %s: rows not a multiple of the %s block; written as F16",
            entry.name,
            entry.shape,
            file_type.name,
        )
        return Q.F16
    return file_type


def _encode(value: torch.Tensor, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return value.contiguous().numpy()
    if qtype == Q.F16:
        return value.to(torch.float16).contiguous().numpy()
    if qtype == Q.BF16:
        return value.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
    return quantize(value.contiguous().numpy(), qtype)


def write_gguf(model, path: str, tokenizer, quantization_method: str = "f16", name: str | None = None) -> str:
    """Writes one GGUF file with the Python encoders (f32, f16, bf16, q8_0). Returns its path."""
    method = quantization_method.lower()
    if method not in PYTHON_TYPES:
        raise ConfigError(f"write_gguf writes {sorted(PYTHON_TYPES)}; got {quantization_method!r}.")
    if tokenizer is None:
        raise ConfigError("GGUF files carry their tokenizer: pass the model's tokenizer.")
    file_type, qtype = PYTHON_TYPES[method]
    arch = arch_for(model.spec)
    vocab = vocab_from_tokenizer(tokenizer, model.spec.vocab_size, getattr(model, "config_dict", None))
    plan = tensor_plan(model, arch)
    types = [_tensor_type(t, qtype) for t in plan]
    name = name or os.path.basename(os.path.normpath(str(getattr(model, "name_or_path", "") or "model")))

    with atomic_file(path) as tmp:
        writer = GGUFWriter(None, arch.name)
        _write_metadata(writer, model, arch, file_type, name)
        write_vocab(writer, vocab)
        for entry, t in zip(plan, types):
            nbytes = math.prod(quant_shape_to_byte_shape(entry.shape, t))
            writer.add_tensor_info(entry.name, entry.shape, np.dtype(np.float32), nbytes, raw_dtype=t)
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with torch.no_grad():
            for entry, t in zip(plan, types):
                writer.write_tensor_data(_encode(entry.produce(), t))
        writer.close()
    logger.info("wrote %s (%s, %d tensors)", path, method, len(plan))
    return path


def quantize_with_llama_cpp(source: str, path: str, quantization_method: str) -> str:
    """Makes a k-quant (or q4_0) file from an f32/f16/bf16 GGUF with llama.cpp's quantizer."""
    method = quantization_method.lower()
    try:
        import llama_cpp
    except ImportError as exc:
        raise UnsupportedModelError(
            f"{method} files are made by llama.cpp's quantizer; install llama-cpp-python (pinned in "
            "requirements-ci.txt) or use f16 / bf16 / q8_0, which velotune writes itself."
        ) from exc
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_FTYPES[method])
    params.nthread = max(1, (os.cpu_count() or 1))
    with atomic_file(path) as tmp:
        status = llama_cpp.llama_model_quantize(source.encode(), tmp.encode(), params)
        if status != 0:
            raise UnsupportedModelError(
                f"llama.cpp's quantizer failed ({status}) making {method} from {source}."
            )
    return path


def gguf_file_name(quantization_method: str) -> str:
    return f"model.{quantization_method.upper()}.gguf"


def save_gguf(model, save_directory: str, tokenizer, quantization_method: str = "f16") -> str:
    """Writes `<save_directory>/model.<METHOD>.gguf` and returns its path.

    Args:
        quantization_method: "f32", "f16", "bf16", "q8_0" (written by velotune), or "q4_k_m", "q5_k_m",
            "q6_k", "q4_0" (made by llama.cpp's quantizer from a 16-bit file, then that file is removed).
    """
    method = quantization_method.lower()
    if method not in QUANTIZATION_METHODS:
        raise ConfigError(
            f"quantization_method {quantization_method!r} is not one of {list(QUANTIZATION_METHODS)}."
        )
    os.makedirs(save_directory, exist_ok=True)
    path = os.path.join(save_directory, gguf_file_name(method))
    if method in PYTHON_TYPES:
        return write_gguf(model, path, tokenizer, method)
    base = {torch.bfloat16: "bf16", torch.float16: "f16"}.get(model.dtype, "f32")
    source = os.path.join(save_directory, gguf_file_name(base))
    existed = os.path.exists(source)
    write_gguf(model, source, tokenizer, base)
    try:
        return quantize_with_llama_cpp(source, path, method)
    finally:
        if not existed:
            os.remove(source)
