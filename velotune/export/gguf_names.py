"""What llama.cpp expects of each velotune family: its GGUF architecture, which optional tensors
that architecture reads, how it lays out rotary pairs, and the pre-tokenizer names it knows.

Tensor names and metadata keys themselves come from the `gguf` package (`gguf.constants`), the
format's owner; this module holds only the facts about llama.cpp's model code that a GGUF file
must agree with. Each entry was read from llama.cpp's `src/models/<arch>.cpp` (tensors it
creates, graph it builds) at the version pinned in requirements-ci.txt (llama-cpp-python).
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf.constants import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, MODEL_TENSORS, TENSOR_NAMES


@dataclass(frozen=True)
class LlamaCppArch:
    arch: MODEL_ARCH
    activation: str  # the gated activation llama.cpp applies (velotune's names)
    interleaved_rope: bool  # rotates adjacent pairs (llama.cpp "NORM" rope): q/k rows are permuted to match
    fused_qkv: bool = False  # one attn_qkv tensor instead of attn_q/k/v
    fused_gate_up: bool = False  # ffn_up holds [gate; up] (Phi-3)
    qkv_bias: bool = True  # every family here loads optional q/k/v biases (create_tensor_qkv)
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sandwich_norms: bool = False
    embedding_scaled: bool = False  # multiplies embeddings by sqrt(hidden) itself
    softcaps: bool = False
    sliding_window: bool = False  # honours per-layer sliding windows
    moe: bool = False
    untied_head: bool = True  # reads an `output` tensor (else always uses token_embd)
    rope_freqs: bool = False  # reads a per-frequency divisor tensor (static rope scaling)
    longrope: bool = False  # reads rope_factors_long / rope_factors_short
    attention_is_hidden: bool = False  # q and o projections must be [hidden, hidden]
    # Gemma 2: llama.cpp scales queries by 1/sqrt(head_dim), or by 1/sqrt(hidden/heads) for its
    # 46-layer (27B) model, instead of reading query_pre_attn_scalar.
    fixed_query_scale: bool = False

    @property
    def name(self) -> str:
        return MODEL_ARCH_NAMES[self.arch]


_LLAMA = dict(arch=MODEL_ARCH.LLAMA, activation="silu", interleaved_rope=True, o_bias=True, mlp_bias=True,
              rope_freqs=True)  # fmt: skip

ARCHS: dict[str, LlamaCppArch] = {
    "llama": LlamaCppArch(**_LLAMA),
    "mistral": LlamaCppArch(**_LLAMA),
    "mixtral": LlamaCppArch(**_LLAMA, moe=True),
    "qwen2": LlamaCppArch(MODEL_ARCH.QWEN2, "silu", False, attention_is_hidden=True),
    "qwen3": LlamaCppArch(MODEL_ARCH.QWEN3, "silu", False, qk_norm=True),
    "gemma": LlamaCppArch(MODEL_ARCH.GEMMA, "gelu_tanh", False, embedding_scaled=True, untied_head=False),
    "gemma2": LlamaCppArch(
        MODEL_ARCH.GEMMA2,
        "gelu_tanh",
        False,
        embedding_scaled=True,
        untied_head=False,
        sandwich_norms=True,
        softcaps=True,
        sliding_window=True,
        fixed_query_scale=True,
    ),  # fmt: skip
    "phi3": LlamaCppArch(
        MODEL_ARCH.PHI3,
        "silu",
        False,
        fused_qkv=True,
        fused_gate_up=True,
        longrope=True,
        attention_is_hidden=True,
    ),
}


def tensor_name(
    kind: MODEL_TENSOR, arch: LlamaCppArch, layer: int | None = None, suffix: str = "weight"
) -> str:
    """The GGUF name of one tensor, refusing kinds the architecture does not have."""
    if kind not in MODEL_TENSORS[arch.arch]:
        raise ValueError(f"llama.cpp's {arch.name} has no {kind.name} tensor")
    base = TENSOR_NAMES[kind].format(bid=layer) if layer is not None else TENSOR_NAMES[kind]
    return f"{base}.{suffix}"


# Hugging Face `tokenizers` split patterns (tokenizer.json, pre_tokenizer Split) and the
# llama.cpp pre-tokenizer that applies the same pattern (llama-vocab.cpp, llm_tokenizer_bpe).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
PRE_TOKENIZER_BY_PATTERN = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",  # noqa: E501
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",  # noqa: E501
    GPT2_PATTERN: "gpt-2",
}
# The tokenizer models llama.cpp implements (tokenizer.ggml.model).
BYTE_LEVEL_BPE = "gpt2"
SENTENCEPIECE = "llama"

# The file types llama.cpp's own quantizer makes, by their llama_cpp constant (llama.h's llama_ftype).
LLAMA_CPP_FTYPES = {
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
