"""Will it fit? The peak GPU memory of a training step, estimated before anything is loaded.

`estimate_memory` adds up what a step holds at its two high points and keeps the larger:
  * the loss: every layer's saved tensors, the last hidden states, the LM head's logits chunk and
    the gradient of the hidden states (computed in the forward by the fused loss);
  * the first layer backward: every layer's saved tensors, the incoming gradient, and one layer's
    recomputed graph with its gradients (the larger of the MLP tile's and the attention half's).
on top of what lives all step: weights, trainable parameters, their gradients and optimizer state.

The per-token sizes follow what velotune's kernels save (rms_norm: input; LoRA projection: input
and x A^T; attention: q, k, v, output and log-sum-exp; gated activation: the gate/up output), so
the estimate is of `torch.cuda.max_memory_allocated`. A GPU also needs room for the CUDA context
and for the caching allocator's slack: `fits` keeps `RESERVE_BYTES` and `SLACK` aside. Gradients
and optimizer state are counted whole (after the first step; an upper bound when zero_grad sets
gradients to None).

`velotune plan MODEL ...` prints the breakdown and the longest sequence that fits a given GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, fields

from velotune.errors import ConfigError
from velotune.memory.checkpoint import DEFAULT_TILE_TOKENS, POLICIES, checkpoint_mode
from velotune.memory.offload import BLOCK_BYTES
from velotune.models.spec import ArchSpec

METHODS = ("lora", "qlora", "full")
# NF4 as bitsandbytes stores it: 4 bits per weight, an 8-bit absmax per 64 weights, and a float32
# constant per 256 absmax values (double quantization).
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
# Largest logits chunk of the fused loss (velotune.kernels.cross_entropy.CHUNK_BYTES).
LOSS_CHUNK_BYTES = 256 * 1024**2
RESERVE_BYTES = 1024**3  # CUDA context, cuBLAS/Triton workspaces outside PyTorch's allocator
SLACK = 0.05  # caching allocator fragmentation, as a fraction of the peak
_DTYPE_BYTES = {"bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "float32": 4, "fp32": 4}
_GIB = 1024**3


@dataclass
class MemoryEstimate:
    """Bytes, by what holds them. `total` is the predicted peak of torch.cuda.max_memory_allocated."""

    weights: int  # the base model (16-bit, or NF4 + constants for the quantized projections)
    trainable: int  # LoRA weights, or for full fine-tuning nothing beyond `weights`
    gradients: int
    optimizer: int
    saved_activations: int  # what every layer keeps on the GPU from its forward to its backward
    peak_working_set: int  # on top of that at the high point: the loss, or one layer's backward
    workspace: int  # rope tables, token ids and labels, a dequantized weight (QLoRA)
    host_pinned: int  # pinned CPU memory for offloaded checkpoints (not GPU memory)
    peak_phase: str  # "loss" or "layer backward"

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.trainable
            + self.gradients
            + self.optimizer
            + self.saved_activations
            + self.peak_working_set
            + self.workspace
        )

    def fits(self, gpu_bytes: int, host_bytes: int | None = None) -> bool:
        """Whether the step fits a GPU of gpu_bytes (and, when given, pinned host memory of host_bytes)."""
        if host_bytes is not None and self.host_pinned > host_bytes:
            return False
        return self.total * (1 + SLACK) + RESERVE_BYTES <= gpu_bytes

    def table(self) -> str:
        rows = [
            (f.name, getattr(self, f.name))
            for f in fields(self)
            if f.name not in ("host_pinned", "peak_phase")
        ]
        rows.append((f"total (peak at {self.peak_phase})", self.total))
        rows.append(("host pinned memory", self.host_pinned))
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value / _GIB:9.2f} GiB" for name, value in rows)


def _spec_of(model) -> ArchSpec:
    if isinstance(model, ArchSpec):
        return model
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        path = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(path):
            raise ConfigError(
                f"{model}: no config.json there; pass a model folder, a config.json or an ArchSpec."
            )
        with open(path, encoding="utf-8") as f:
            model = json.load(f)
    if isinstance(model, dict):
        from velotune.models.families import family_of

        return family_of(model.get("model_type")).build_spec(model)
    raise ConfigError(
        f"cannot plan for {type(model).__name__}: pass a model folder, a config dict or an ArchSpec."
    )


def _dtype_bytes(dtype) -> int:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPE_BYTES:
        raise ConfigError(f"dtype {dtype!r}: use bfloat16, float16 or float32.")
    return _DTYPE_BYTES[name]


def _projections(spec: ArchSpec) -> dict[str, tuple[int, int, int]]:
    """PEFT name -> (in, out, copies per layer) of every linear map in a layer (fused maps by their
    fused name, as the family's checkpoints and PEFT call them)."""
    h, i = spec.hidden_size, spec.intermediate_size
    experts = spec.moe.num_experts if spec.moe is not None else 1
    shapes = {}
    if len(spec.qkv_names) == 1:
        shapes[spec.qkv_names[0]] = (h, spec.q_size + 2 * spec.kv_size, 1)
    else:
        shapes.update(zip(spec.qkv_names, [(h, spec.q_size, 1), (h, spec.kv_size, 1), (h, spec.kv_size, 1)]))
    shapes["o_proj"] = (spec.q_size, h, 1)
    if len(spec.gate_up_names) == 1:
        shapes[spec.gate_up_names[0]] = (h, 2 * i, experts)
    else:
        shapes.update(zip(spec.gate_up_names, [(h, i, experts), (h, i, experts)]))
    shapes["down_proj"] = (i, h, experts)
    return shapes


def parameter_counts(spec: ArchSpec) -> tuple[int, int]:
    """(parameters in the layers' linear maps, every other parameter) of the model."""
    h = spec.hidden_size
    linear = sum(n_in * n_out * copies for n_in, n_out, copies in _projections(spec).values())
    bias = (spec.q_size + 2 * spec.kv_size) * spec.qkv_bias + h * spec.o_bias
    if spec.mlp_bias:
        bias += 2 * spec.intermediate_size + h  # gate/up and down
    norms = (4 if spec.sandwich_norms else 2) * h + (2 * spec.head_dim if spec.qk_norm else 0)
    router = spec.moe.num_experts * h if spec.moe is not None else 0
    embeddings = spec.vocab_size * h * (1 if spec.tie_word_embeddings else 2)
    return spec.num_layers * linear, spec.num_layers * (bias + norms + router) + embeddings + h


def lora_parameter_count(spec: ArchSpec, r: int, target_modules=None) -> int:
    """LoRA parameters of rank r on target_modules (PEFT names; None: every linear map of the layers)."""
    shapes = _projections(spec)
    targets = list(shapes) if target_modules is None else list(target_modules)
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ConfigError(f"target_modules {unknown} are not planned for; use names among {list(shapes)}.")
    per_layer = sum(r * (shapes[t][0] + shapes[t][1]) * shapes[t][2] for t in targets)
    moe_gate_up = [t for t in targets if t in spec.gate_up_names]
    if spec.moe is not None and moe_gate_up:
        # Experts store gate/up fused: one pair of rank 2r per expert (PEFT's layout for them).
        h, i, n = spec.hidden_size, spec.intermediate_size, spec.moe.num_experts
        per_layer += n * 2 * r * (h + 2 * i) - sum(r * (h + i) * n for _ in moe_gate_up)
    return spec.num_layers * per_layer


def layer_bytes_per_token(spec: ArchSpec, act_bytes: int, lora_rank: int = 0) -> dict[str, float]:
    """Bytes per token of one layer's activations, as velotune's kernels keep them.

    lora_rank: total LoRA rank of the attention half's projections (their saved x A^T)."""
    h, q, kv, i = spec.hidden_size, spec.q_size, spec.kv_size, spec.intermediate_size
    top_k = spec.moe.top_k if spec.moe is not None else 1
    lse = spec.num_heads * 4  # float32 log-sum-exp per head
    sandwich = h if spec.sandwich_norms else 0
    return dict(
        # What the attention half's graph keeps, beyond the layer input: normed input (saved by the
        # q/k/v projection), the q/k/v output (alive through v's view), rotated q and k, the attention
        # output (saved by attention and o_proj), the LoRA x A^T, the post-attention norm's input.
        attention_saved=(h + (q + 2 * kv) + (q + kv) + q + lora_rank + sandwich) * act_bytes + lse,
        # The half's backward at the attention kernel: d(output), dq, dk, dv and the per-row delta.
        attention_grads=(q + (q + 2 * kv)) * act_bytes + lse,
        # What the MLP half's graph keeps beyond its input: normed input, gate/up, activation output.
        mlp_saved=(h + top_k * 3 * i + sandwich) * act_bytes,
        # One MLP tile at its high point (the gated activation's backward): normed input, the tile's
        # output, gate/up, d(activation); the Triton backward writes d(gate/up) over gate/up.
        mlp_tile=(2 * h + top_k * 3 * i + sandwich) * act_bytes,
        hidden=h * act_bytes,
    )


def estimate_memory(
    model,
    method: str = "lora",
    *,
    batch: int = 1,
    seq: int = 2048,
    lora_r: int = 16,
    target_modules=None,
    gradient_checkpointing: bool | str = "offload",
    checkpoint_policy: str = "full",
    mlp_tile_tokens: int | None = None,
    dtype="bfloat16",
    lora_dtype="float32",
    optimizer: str = "adamw",
    embedding_on_host: bool | None = None,
) -> MemoryEstimate:
    """Peak GPU memory of one training step (after the first: optimizer state exists).

    Args:
        model: a model folder, a config.json path, a config dict or an `ArchSpec`.
        method: "lora", "qlora" (NF4 base, LoRA) or "full".
        batch, seq: tokens per step are batch * seq.
        lora_r, target_modules: LoRA rank and the projections that carry it (PEFT names; None: all).
        gradient_checkpointing, checkpoint_policy, mlp_tile_tokens: as on the model
            (`velotune.memory.checkpoint`).
        dtype: activations and 16-bit weights; lora_dtype: LoRA weights (float32 as PEFT keeps them).
        optimizer: "adamw" (two states per trainable parameter in its dtype), "adamw8bit" or "sgd".
        embedding_on_host: whether the input embedding table waits in host memory (None: as
            get_peft_model's "auto" does on a GPU: for LoRA/QLoRA with an untied embedding).
    """
    spec = _spec_of(model)
    if method not in METHODS:
        raise ConfigError(f"method={method!r}: use one of {METHODS}.")
    if checkpoint_policy not in POLICIES:
        raise ConfigError(f"checkpoint_policy={checkpoint_policy!r}: use one of {POLICIES}.")
    if optimizer not in ("adamw", "adamw8bit", "sgd"):
        raise ConfigError(f"optimizer={optimizer!r}: use adamw, adamw8bit or sgd.")
    mode = checkpoint_mode(gradient_checkpointing)
    act = _dtype_bytes(dtype)
    tokens = batch * seq
    n_layers = spec.num_layers

    linear, other = parameter_counts(spec)
    if embedding_on_host is None:
        embedding_on_host = method != "full" and not spec.tie_word_embeddings
    table = spec.vocab_size * spec.hidden_size
    if embedding_on_host and method != "full" and not spec.tie_word_embeddings:
        other -= table
        host_table = table * act
    else:
        host_table = 0
    if method == "qlora":
        weights = math.ceil(linear * NF4_BYTES_PER_WEIGHT) + other * act
    else:
        weights = (linear + other) * act
    if method == "full":
        n_trainable, param_bytes, trainable = linear + other, act, 0
    else:
        param_bytes = _dtype_bytes(lora_dtype)
        n_trainable = lora_parameter_count(spec, lora_r, target_modules)
        trainable = n_trainable * param_bytes
    state_bytes = {"adamw": 2 * param_bytes, "adamw8bit": 2, "sgd": 0}[optimizer]

    targets = _projections(spec) if target_modules is None else target_modules
    attention_rank = sum(lora_r for t in (*spec.qkv_names, "o_proj") if t in targets)
    per = layer_bytes_per_token(spec, act, attention_rank if method != "full" else 0)
    hidden = per["hidden"] * tokens
    tile = mlp_tile_tokens if mlp_tile_tokens is not None else (DEFAULT_TILE_TOKENS if mode else 0)
    tile_len = min(tokens, tile) if tile else tokens

    # Saved from forward to backward, on the GPU.
    inputs_on_gpu = 1 if mode == "offload" else n_layers  # offload keeps the last layer's input only
    if not mode:
        # Each layer input, the attention half's graph and its output, and (untiled) the MLP's graph.
        per_layer = per["attention_saved"] + 2 * per["hidden"] + (0 if tile else per["mlp_saved"])
        saved = n_layers * per_layer * tokens
    elif checkpoint_policy == "full":
        saved = inputs_on_gpu * hidden
    else:  # save_attn: each layer input and attention graph stay; the MLP half's inputs may be offloaded
        saved = n_layers * (per["attention_saved"] + per["hidden"]) * tokens + inputs_on_gpu * hidden
    # Offload: one input being copied to the host in the forward, one fetched ahead in the backward.
    in_flight = hidden if mode == "offload" else 0
    host = 0
    if mode == "offload":
        size = min(BLOCK_BYTES, 1 << max(hidden - 1, 0).bit_length())
        host = (n_layers - 1) * math.ceil(hidden / size) * size

    # High point 1, the loss: last hidden states and their norm, d(hidden), one logits chunk, and
    # float32 per-token losses and masks.
    chunk_rows = min(tokens, max(1, LOSS_CHUNK_BYTES // (spec.vocab_size * act)))
    loss_phase = 3 * hidden + chunk_rows * spec.vocab_size * act + in_flight + 16 * tokens
    # High point 2, the first layer backward: the incoming gradient dy and d(h), plus one layer's
    # recomputed graph and gradients, at the MLP tile's or at the attention kernel's high point.
    held = per["attention_saved"] * tokens + hidden if mode and checkpoint_policy == "full" else 0
    if mode or tile:
        tile_peak = held + 2 * hidden + per["mlp_tile"] * tile_len
    else:  # the MLP's graph is saved already: its gradients come on top
        tile_peak = 2 * hidden + (per["mlp_tile"] - per["mlp_saved"] - per["hidden"]) * tokens
    attention_peak = held + 2 * hidden + per["attention_grads"] * tokens
    backward_phase = max(tile_peak, attention_peak) + in_flight

    rope = 2 * tokens * spec.head_dim * act  # cos and sin, shared by the layers
    ids = 4 * tokens * 8  # input ids, positions, labels and their shifted copy (int64)
    dequant = 0
    if method == "qlora":  # one projection's weight dequantized for its GEMM
        dequant = max(a * b for a, b, _ in _projections(spec).values()) * act
    return MemoryEstimate(
        weights=int(weights),
        trainable=int(trainable),
        gradients=int(n_trainable * param_bytes),
        optimizer=int(n_trainable * state_bytes),
        saved_activations=int(saved),
        peak_working_set=int(max(loss_phase, backward_phase)),
        workspace=int(rope + ids + dequant),
        host_pinned=int(host + host_table),
        peak_phase="loss" if loss_phase >= backward_phase else "layer backward",
    )


def longest_sequence(
    model, gpu_bytes: int, *, host_bytes: int | None = None, multiple_of: int = 256, **kwargs
) -> int:
    """The longest seq (a multiple of multiple_of) whose estimate fits; 0 if none does."""
    spec = _spec_of(model)

    def fits(seq: int) -> bool:
        return estimate_memory(spec, seq=seq, **kwargs).fits(gpu_bytes, host_bytes)

    lo, hi = 0, multiple_of
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 1 << 26:
            return lo
    while hi - lo > multiple_of:
        mid = (lo + hi) // 2 // multiple_of * multiple_of
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _parse_checkpointing(value: str) -> bool | str:
    lowered = value.lower()
    if lowered in ("true", "gpu", "1", "yes"):
        return True
    if lowered in ("false", "off", "0", "no", "none"):
        return False
    return checkpoint_mode(value)


def host_memory_bytes() -> int | None:
    """Physical memory of this machine (pinned memory cannot exceed it), None where unknown."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _plan(args: argparse.Namespace) -> int:
    kwargs = dict(
        method=args.method,
        batch=args.batch,
        lora_r=args.lora_r,
        gradient_checkpointing=_parse_checkpointing(args.gradient_checkpointing),
        checkpoint_policy=args.policy,
        mlp_tile_tokens=args.mlp_tile_tokens,
        dtype=args.dtype,
        optimizer=args.optimizer,
        embedding_on_host=False if args.embedding_on_gpu else None,
    )
    estimate = estimate_memory(args.model, seq=args.seq, **kwargs)
    gpu = int(args.gpu_memory * _GIB)
    host = int(args.host_memory * _GIB) if args.host_memory else host_memory_bytes()
    out = sys.stdout
    out.write(f"{args.model}: {args.method}, batch {args.batch} x {args.seq} tokens\n")
    out.write(estimate.table() + "\n")
    verdict = "fits" if estimate.fits(gpu, host) else "does NOT fit"
    host_note = f" and {host / _GIB:.0f} GiB of host memory" if host else ""
    out.write(
        f"{verdict} in {args.gpu_memory:g} GiB{host_note} "
        f"(keeping {RESERVE_BYTES / _GIB:g} GiB + {SLACK:.0%} of the GPU aside)\n"
    )
    longest = longest_sequence(args.model, gpu, host_bytes=host, **kwargs)
    out.write(f"longest sequence that fits at batch {args.batch}: {longest}\n")
    return 0


def add_plan_command(subparsers) -> None:
    """Registers `velotune plan` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "plan", help="estimate the peak GPU memory of training a model, before loading it"
    )
    p.add_argument("model", help="model folder or config.json")
    p.add_argument("--method", choices=METHODS, default="lora")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--gradient-checkpointing", default="offload", help="offload (default), true or false")
    p.add_argument("--policy", choices=POLICIES, default="full", help="checkpoint policy")
    p.add_argument("--mlp-tile-tokens", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--optimizer", choices=("adamw", "adamw8bit", "sgd"), default="adamw")
    p.add_argument(
        "--embedding-on-gpu", action="store_true",
        help="keep the input embedding on the GPU (get_peft_model(embedding_on_host=False))",
    )
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB of the target GPU")
    p.add_argument(
        "--host-memory", type=float, default=None, help="GiB of host memory (default: this machine's)"
    )
    p.set_defaults(func=_plan)
