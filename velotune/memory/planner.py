"""Will it fit? The peak GPU memory and the pinned host memory of a training step, before loading.

`estimate_memory` adds what lives all step (weights, trainable parameters, their gradients and
optimizer state, rope tables, token ids, a dequantized weight) to the largest of three high points,
each an inventory of every [tokens, ...] tensor alive at that moment (`MemoryEstimate.breakdown`
lists the peak's):
  * the loss: the fused loss has computed d(hidden states) in its forward; the last layer's input,
    output and normed output are alive, and one logits chunk;
  * the first layer backward, at the down projection of one MLP tile: the layer's recomputed
    attention graph and output, d(layer output), and the tile's gate/up output, activation output and
    d(activation output) (through `velotune.memory.fused_mlp`, what a LoRA/QLoRA layer on CUDA runs,
    d(activation output) takes the activation output's place and the tile's output is never
    recomputed; its default tile is `fused_tile_tokens`);
  * the same layer backward, inside the attention kernel's backward: the recomputed attention graph,
    d(attention output), dq/dk/dv and the kernel's own buffers. With PyTorch's SDPA (cuDNN or
    FlashAttention-2, what plain causal attention runs on CUDA) those are a float32 dq accumulator
    [tokens, q heads, head_dim] and, for grouped-query attention, dk and dv at the query heads' count,
    summed to the kv heads afterwards: 4 q-sized vectors per token beyond dq/dk/dv, which at
    Llama-3.1-8B is most of what the long-context slope had been missing (0.128 GiB per 1K tokens
    measured, 16.36 hidden-size bf16 vectors per token; this count gives 16.36). velotune's Triton
    kernel (packed or padded batches, windows, soft-capping) keeps only a float32 row statistic.
With offloaded checkpoints the layer inputs on the GPU are the one being differentiated and the one
below it, prefetched; the other layers' inputs wait in pinned host memory.

The per-token sizes follow what velotune's kernels save (rms_norm: input and a float32 statistic;
LoRA projection: input and x A^T; rope: nothing per token; attention: q, k, v (v as a view of the
fused q/k/v output, which therefore stays whole), output and log-sum-exp; gated activation: the
gate/up output, which its backward overwrites with d(gate/up)), so the estimate is of
`torch.cuda.max_memory_allocated`; it carries no calibration factor. A GPU also needs the CUDA
context and the caching allocator's slack: `fits` keeps `RESERVE_BYTES` and `SLACK` aside.
Gradients and optimizer state are counted whole (after the first step; an upper bound when
zero_grad sets gradients to None).

Host memory: every offloaded layer input sits in pinned blocks, the host-side embedding table and
its gathered rows are pinned too (PyTorch's pinned allocator rounds each request up to a power of
two), and pinned memory cannot be paged out: `fits` keeps `HOST_RESERVE` of the host's memory for
the process's pageable memory, the OS and its page cache.

`velotune plan MODEL ...` prints the breakdown, whether the step fits a GPU and a host, which of the
two binds first and the longest sequence that fits both.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field

from velotune.errors import ConfigError
from velotune.memory.checkpoint import (
    DEFAULT_TILE_TOKENS,
    POLICIES,
    checkpoint_mode,
    default_gate_up_kept_layers,
)
from velotune.memory.offload import BLOCK_BYTES
from velotune.memory.tiled import fused_tile_tokens, token_tiles
from velotune.models.spec import ArchSpec

METHODS = ("lora", "qlora", "full")
ATTENTION_BACKENDS = ("auto", "sdpa", "triton")
# NF4 as bitsandbytes stores it: 4 bits per weight, an 8-bit absmax per 64 weights, and a float32
# constant per 256 absmax values (double quantization).
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
# Largest logits chunk of the fused loss (velotune.kernels.cross_entropy.CHUNK_BYTES).
LOSS_CHUNK_BYTES = 256 * 1024**2
RESERVE_BYTES = 1024**3  # CUDA context, cuBLAS/Triton workspaces outside PyTorch's allocator
# The caching allocator's fragmentation: the memory a step reserves beyond its peak allocation, as a
# fraction of the peak. Measured on an H100 (benchmarks/results, max_memory_reserved against
# max_memory_allocated): 1% (8B LoRA 2x2048), 6% (4x2048), 3% (8B QLoRA 2x2048), 2% (70B QLoRA).
SLACK = 0.05
# Pinned memory cannot be paged out: this fraction of the host's memory is left to the training
# process's pageable memory (resident memory minus the pinned buffers, flat from 16K to 128K tokens:
# 1.5 GiB at Llama-3.1-8B QLoRA, 1.7 GiB at Llama-3.2-1B LoRA; benchmarks/results/h100-2026-11-24-s2/
# and -s3/long_context-*.jsonl), the OS and its page cache.
HOST_RESERVE = 0.10
MAX_PLANNED_TOKENS = 1 << 26  # the length search stops here: "unbounded" in practice
_DTYPE_BYTES = {"bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "float32": 4, "fp32": 4}
_GIB = 1024**3


@dataclass
class MemoryEstimate:
    """Bytes, by what holds them. `total` is the predicted peak of torch.cuda.max_memory_allocated."""

    weights: int  # the base model (16-bit, or NF4 + constants for the quantized projections)
    trainable: int  # LoRA weights, or for full fine-tuning nothing beyond `weights`
    gradients: int
    optimizer: int
    saved_activations: int  # what the layers keep on the GPU from their forward to their backward
    peak_working_set: int  # on top of that at the high point (see `breakdown`)
    workspace: int  # rope tables, token ids and labels, a dequantized weight (QLoRA)
    host_pinned: int  # pinned host memory: offloaded checkpoints, host embedding table and rows
    peak_phase: str  # "loss", "layer backward (MLP)" or "layer backward (attention)"
    # Every activation tensor (by what it is) alive at the peak, saved_activations included.
    breakdown: dict[str, int] = field(default_factory=dict)
    # The activation bytes of each high point, peak_phase's the largest.
    phases: dict[str, int] = field(default_factory=dict)

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

    def fits_gpu(self, gpu_bytes: int) -> bool:
        """Whether the peak, the allocator's slack and the CUDA context fit a GPU of gpu_bytes."""
        return self.total * (1 + SLACK) + RESERVE_BYTES <= gpu_bytes

    def fits_host(self, host_bytes: int) -> bool:
        """Whether the pinned host memory fits a host of host_bytes, leaving HOST_RESERVE of it free."""
        return self.host_pinned <= host_bytes * (1 - HOST_RESERVE)

    def fits(self, gpu_bytes: int, host_bytes: int | None = None) -> bool:
        """Whether the step fits a GPU of gpu_bytes (and, when given, a host of host_bytes)."""
        return self.fits_gpu(gpu_bytes) and (host_bytes is None or self.fits_host(host_bytes))

    def table(self, detail: bool = False) -> str:
        """The breakdown in GiB; detail adds every activation tensor alive at the peak."""
        rows = [
            ("weights", self.weights),
            ("trainable", self.trainable),
            ("gradients", self.gradients),
            ("optimizer", self.optimizer),
            ("saved_activations", self.saved_activations),
            ("peak_working_set", self.peak_working_set),
            ("workspace", self.workspace),
            (f"total (peak at {self.peak_phase})", self.total),
            ("host pinned memory", self.host_pinned),
        ]
        if detail:
            rows += [(f"  {name}", value) for name, value in self.breakdown.items() if value]
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


def _lora_ranks(spec: ArchSpec, lora_r: int, target_modules) -> dict[str, int]:
    """Stacked LoRA rank (the width of x A^T) of each fused projection: qkv, o, gate_up, down."""
    targets = list(_projections(spec)) if target_modules is None else list(target_modules)

    def rank(names) -> int:
        return sum(lora_r for name in names if name in targets)

    return dict(
        qkv=rank(spec.qkv_names),
        o=rank(("o_proj",)),
        gate_up=rank(spec.gate_up_names),
        down=rank(("down_proj",)),
    )


def token_sizes(
    spec: ArchSpec, act_bytes: int, ranks: dict[str, int] | None = None, attention_backend: str = "triton"
) -> dict[str, int]:
    """Bytes per token of each activation tensor of one decoder layer, as velotune's kernels make them.

    ranks: stacked LoRA rank per fused projection (`qkv`, `o`, `gate_up`, `down`; absent: 0).
    attention_backend: "sdpa" (PyTorch's cuDNN / FlashAttention-2 backward) or "triton" (velotune's).
    MoE layers count top_k routed copies of every MLP tensor (an approximation of the grouped experts).
    """
    if attention_backend not in ("sdpa", "triton"):
        raise ConfigError(f"attention_backend={attention_backend!r}: use sdpa or triton.")
    ranks = ranks or {}
    a = act_bytes
    h, q, kv, i = spec.hidden_size, spec.q_size, spec.kv_size, spec.intermediate_size
    heads, kv_heads = spec.num_heads, spec.num_kv_heads
    top_k = spec.moe.top_k if spec.moe is not None else 1
    stat = 4  # float32 per-row statistic of an RMSNorm (or per-row loss)
    sizes = dict(
        hidden=h * a,
        norm_stat=stat,
        # Attention half, kept by its graph until its backward.
        qkv=(q + 2 * kv) * a,  # fused projection output, alive whole through v (a view of it)
        qk_norm_stats=(heads + kv_heads) * stat if spec.qk_norm else 0,
        q_rotated=q * a,
        k_rotated=kv * a,
        attention_out=q * a,  # saved by the attention kernel and by o_proj
        lse=heads * 4,  # float32 log-sum-exp per query head
        lora_qkv=ranks.get("qkv", 0) * a,
        lora_o=ranks.get("o", 0) * a,
        attention_out_norm=h * a + stat if spec.sandwich_norms else 0,  # o, kept by the sandwich norm
        # Attention backward.
        d_attention_out=q * a,
        dqkv=(q + 2 * kv) * a,
        # MLP half, per routed token copy.
        gate_up=top_k * 2 * i * a,  # kept by the gated activation; its backward writes d(gate/up) over it
        activation_out=top_k * i * a,  # kept by the down projection
        d_activation_out=top_k * i * a,
        lora_gate_up=top_k * ranks.get("gate_up", 0) * a,
        lora_down=top_k * ranks.get("down", 0) * a,
        moe_routing=(top_k * h * a + spec.moe.num_experts * 4) if spec.moe is not None else 0,
        mlp_out_norm=h * a + stat if spec.sandwich_norms else 0,
    )
    if attention_backend == "sdpa":
        # FlashAttention-2's and cuDNN's backward: dq accumulates in float32 over key blocks, a float32
        # rowsum(dO * O) per query head, and with grouped-query attention dk and dv are computed per
        # query head in the input dtype and summed over each group afterwards (FA2's dk_expanded /
        # dv_expanded, cuDNN's dK_fullhead / dV_fullhead).
        gqa = 2 * q * a if heads != kv_heads else 0
        sizes["attention_workspace"] = 4 * q + 4 * heads + gqa
    else:
        # velotune's Triton backward: dq per query block and the GQA group's dk/dv in registers;
        # only delta = rowsum(dO * O) goes through memory.
        sizes["attention_workspace"] = 4 * heads
    sizes["attention_graph"] = (
        sizes["hidden"]  # normed input, kept by the q/k/v projection
        + stat
        + sizes["lora_qkv"]
        + sizes["qkv"]
        + sizes["qk_norm_stats"]
        + sizes["q_rotated"]
        + sizes["k_rotated"]
        + sizes["attention_out"]
        + sizes["lse"]
        + sizes["lora_o"]
        + sizes["attention_out_norm"]
    )
    sizes["mlp_graph"] = (
        sizes["hidden"]  # normed input, kept by the gate/up projection
        + stat
        + sizes["moe_routing"]
        + sizes["lora_gate_up"]
        + sizes["gate_up"]
        + sizes["activation_out"]
        + sizes["lora_down"]
        + sizes["mlp_out_norm"]
    )
    return sizes


def layer_bytes_per_token(
    spec: ArchSpec, act_bytes: int, lora_rank: int = 0, attention_backend: str = "triton"
) -> dict[str, float]:
    """Bytes per token of one layer's activations, summarised (`token_sizes` has every tensor).

    attention_saved and mlp_saved leave out the float32 per-row statistics (a few bytes per token)
    and the layer input; lora_rank is the total LoRA rank of the attention half's projections."""
    s = token_sizes(spec, act_bytes, {"qkv": lora_rank}, attention_backend)
    stats = s["norm_stat"] + s["qk_norm_stats"] + (s["norm_stat"] if spec.sandwich_norms else 0)
    mlp_stats = s["norm_stat"] + (s["norm_stat"] if spec.sandwich_norms else 0)
    return dict(
        attention_saved=s["attention_graph"] - stats,
        attention_grads=s["d_attention_out"] + s["dqkv"] + s["attention_workspace"],
        mlp_saved=s["mlp_graph"] - mlp_stats - s["moe_routing"],
        # One MLP tile at its high point (the down projection's backward): the tile's graph, its
        # output and d(activation output).
        mlp_tile=s["mlp_graph"] + s["hidden"] + s["d_activation_out"],
        hidden=s["hidden"],
    )


def _mlp_tiles(
    spec: ArchSpec, tokens: int, mode, fused_mlp: bool, mlp_dense: bool, mlp_tile_tokens: int | None
) -> list[tuple[int, int]]:
    """The MLP half's token tiles as `velotune.memory.checkpoint` picks them."""
    tile = mlp_tile_tokens
    if tile is None:
        auto = (
            fused_tile_tokens(spec.hidden_size, spec.intermediate_size)
            if fused_mlp and mlp_dense
            else DEFAULT_TILE_TOKENS
        )
        tile = auto if mode else 0
    return token_tiles(tokens, tile or None)


def _gate_up_kept_count(n_layers: int, mode, policy: str, fused_mlp: bool, requested: int | None) -> int:
    """How many layers keep their gate/up output (only under "save_mlp", only on the fused MLP)."""
    if not (mode and policy == "save_mlp" and fused_mlp):
        return 0
    return default_gate_up_kept_layers(n_layers) if requested is None else requested


def activation_inventory(
    spec: ArchSpec,
    tokens: int,
    *,
    act_bytes: int = 2,
    ranks: dict[str, int] | None = None,
    gradient_checkpointing: bool | str = "offload",
    checkpoint_policy: str = "full",
    mlp_tile_tokens: int | None = None,
    attention_backend: str = "triton",
    fused_mlp: bool = False,
    mlp_dense: bool = True,
    gate_up_kept_layers: int | None = None,
    fused_attention: bool = False,
) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """(what the layers keep on the GPU from forward to backward, {high point: {tensor: bytes}}).

    mlp_dense: the MLP weights are 16-bit (not 4-bit), which gives the fused MLP its smaller tile.
    gate_up_kept_layers: under "save_mlp", how many layers keep their gate/up output (None: the
    default share); only the fused MLP keeps it.
    fused_attention: the attention half is recomputed and differentiated by hand
    (`velotune.memory.fused_attention`): no o-projection x A^T in its recomputed graph, and no
    attention-half output held through its backward.

    Every [tokens, ...] tensor alive at each of the step's three high points, each inventory
    including the kept tensors (see the module docstring). Arguments as `estimate_memory`'s."""
    mode = checkpoint_mode(gradient_checkpointing)
    s = token_sizes(spec, act_bytes, ranks, attention_backend)
    n, t_all = spec.num_layers, tokens
    hid = s["hidden"] * t_all
    fused_mlp = fused_mlp and (bool(mode) or bool(mlp_tile_tokens))  # the recompute path only
    tiles = _mlp_tiles(spec, t_all, mode, fused_mlp, mlp_dense, mlp_tile_tokens)
    tile_rows = tiles[0][1] - tiles[0][0]
    tiled = len(tiles) > 1
    kept_gate_up = _gate_up_kept_count(n, mode, checkpoint_policy, fused_mlp, gate_up_kept_layers)
    # Offload keeps the last layer's checkpoint on the GPU (it is needed first), the others on the host.
    on_gpu = 1 if mode == "offload" else n
    prefetched = hid if mode == "offload" and n > 1 else 0  # the next input down, copied back early

    if not mode:
        kept = {"layer inputs (kept by the attention norm)": n * hid,
                "attention graphs": n * s["attention_graph"] * t_all}  # fmt: skip
        if tiled:
            kept["MLP-half inputs (kept for the tiled MLP's recompute)"] = n * hid
        else:
            kept["MLP-half inputs (kept by the MLP norm)"] = n * hid
            kept["MLP graphs"] = n * s["mlp_graph"] * t_all
    elif checkpoint_policy == "full":
        kept = {"checkpointed layer inputs on the GPU": on_gpu * hid}
    elif checkpoint_policy == "save_mlp":
        kept = {"checkpointed layer inputs on the GPU": on_gpu * hid,
                "checkpointed MLP-half inputs on the GPU": on_gpu * hid}  # fmt: skip
        # The top layer keeps first (velotune.memory.checkpoint.gate_up_keeping_layers); under offload
        # it is the one whose tensors stay on the GPU.
        gu_on_gpu = kept_gate_up if mode is True else min(kept_gate_up, 1)
        if gu_on_gpu > 1:
            # The top layer's is counted in its own backward as its MLP tile's (loaded) tensors, and in
            # the loss below; the others wait on the GPU through every layer backward above theirs.
            kept["kept gate/up outputs on the GPU, below the layer in its backward"] = (
                (gu_on_gpu - 1) * s["gate_up"] * t_all
            )
        if mode == "offload" and n > 1:
            # Worst case: the layer below keeps its gate/up output too, and comes back whole.
            prefetched = 2 * hid + (s["gate_up"] * t_all if kept_gate_up > 1 else 0)
    else:  # save_attn: the attention half keeps its graph; the MLP half's input is checkpointed
        kept = {"layer inputs (kept by the attention norm)": n * hid,
                "attention graphs": n * s["attention_graph"] * t_all,
                "checkpointed MLP-half inputs on the GPU": on_gpu * hid}  # fmt: skip

    chunk_rows = min(t_all, max(1, LOSS_CHUNK_BYTES // (spec.vocab_size * act_bytes)))
    loss = dict(kept)
    if mode and checkpoint_policy == "save_mlp" and kept_gate_up:
        loss["the top layer's kept gate/up output"] = s["gate_up"] * t_all
    loss.update({
        "last layer output (kept by the final norm)": hid + s["norm_stat"] * t_all,
        "final norm output": hid,
        "d(hidden states), computed by the fused loss in its forward": hid,
        "one logits chunk": chunk_rows * spec.vocab_size * act_bytes,
        "one loss chunk's hidden rows and their gradient": 2 * chunk_rows * s["hidden"],
        # float32 per-token losses, the label mask, the shifted labels and the index of counted rows
        "per-token loss buffers": (4 + 1 + 8 + 8) * t_all,
    })  # fmt: skip

    mlp = dict(kept)
    if not mode and not tiled:
        mlp["d(layer output)"] = hid
        mlp["d(activation output), at the down projection's backward"] = s["d_activation_out"] * t_all
    else:
        if mode and checkpoint_policy == "full":
            mlp["input of the layer below, prefetched"] = prefetched
            mlp["recomputed attention graph"] = (s["attention_graph"] - fused_attention * s["lora_o"]) * t_all
            mlp["attention-half output"] = hid
        elif mode and checkpoint_policy == "save_mlp":
            # The MLP half runs first from its kept input: no attention graph yet.
            mlp["tensors of the layer below, prefetched"] = prefetched
            mlp["MLP-half input, loaded"] = hid
            if kept_gate_up and fused_mlp and tiled:
                mlp["the layer's other kept gate/up tiles, loaded"] = s["gate_up"] * (t_all - tile_rows)
        elif mode:
            mlp["MLP-half input of the layer below, prefetched"] = prefetched
        mlp["d(layer output)"] = hid
        if tiled:
            mlp["d(MLP-half input), filled tile by tile"] = hid
        if fused_mlp:
            # d(activation output) is allocated after the activation output is freed; x A^T of down
            # gives way to s dy B of down, of the same size.
            mlp["one MLP tile's recomputed tensors and d(activation output) (fused MLP)"] = (
                s["mlp_graph"] * tile_rows
            )
        else:
            mlp["one MLP tile's graph"] = s["mlp_graph"] * tile_rows
            mlp["one MLP tile's output and d(activation output), at its down projection's backward"] = (
                s["hidden"] + s["d_activation_out"]
            ) * tile_rows

    # The attention kernel's backward in the first layer backward (the MLP half is done; o_proj's
    # backward has run, freeing its x A^T).
    attn = dict(kept)
    if mode and checkpoint_policy in ("full", "save_mlp"):
        label = "input of the layer below" if checkpoint_policy == "full" else "tensors of the layer below"
        attn[f"{label}, prefetched"] = prefetched
        attn["d(layer output)"] = hid  # held by the checkpoint's backward until the layer is done
        attn["recomputed attention graph"] = (s["attention_graph"] - s["lora_o"]) * t_all
        if not fused_attention:  # the hand-written backward has let go of it (or never computed it)
            attn["attention-half output"] = hid  # held by the checkpoint's backward too
    else:
        attn["attention graphs"] -= s["lora_o"] * t_all
        if mode:  # save_attn: this layer's checkpointed MLP-half input is freed
            attn["checkpointed MLP-half inputs on the GPU"] -= hid
            attn["MLP-half input of the layer below, prefetched"] = prefetched
        elif tiled:
            attn["MLP-half inputs (kept for the tiled MLP's recompute)"] -= hid
        else:
            attn["MLP-half inputs (kept by the MLP norm)"] -= hid
            attn["MLP graphs"] -= s["mlp_graph"] * t_all
    attn["d(attention-half output)"] = hid
    attn["d(attention output)"] = s["d_attention_out"] * t_all
    attn["dq, dk, dv"] = s["dqkv"] * t_all
    attn[f"attention backward's own buffers ({attention_backend})"] = s["attention_workspace"] * t_all
    return kept, {"loss": loss, "layer backward (MLP)": mlp, "layer backward (attention)": attn}


def _attention_backend(spec: ArchSpec, seq: int, requested: str) -> str:
    if requested not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention_backend={requested!r}: use one of {ATTENTION_BACKENDS}.")
    if requested != "auto":
        return requested
    from velotune.kernels.attention import PLAIN_CAUSAL_BACKEND

    # `velotune.kernels.attention.attention` hands plain causal attention (no soft-capping, no window
    # shorter than the sequence, no packing or padding mask) to SDPA on CUDA.
    windows = spec.sliding_windows or (None,)
    plain_layer = any(w is None or w >= seq for w in windows)
    plain = spec.attn_logit_softcap is None and plain_layer
    return "sdpa" if plain and PLAIN_CAUSAL_BACKEND == "sdpa" else "triton"


def _pinned_bytes(nbytes: int) -> int:
    """What PyTorch's pinned-memory allocator takes for one request: the next power of two."""
    return 1 << max(nbytes - 1, 0).bit_length() if nbytes > 0 else 0


def _offload_block_bytes(nbytes: int) -> int:
    """Pinned bytes of one offloaded tensor, stored in power-of-two blocks (velotune.memory.offload)."""
    if nbytes <= 0:
        return 0
    size = min(BLOCK_BYTES, _pinned_bytes(nbytes))
    return math.ceil(nbytes / size) * size


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
    attention_backend: str = "auto",
    fused_mlp: bool | None = None,
    gate_up_kept_layers: int | None = None,
    fused_attention: bool | None = None,
) -> MemoryEstimate:
    """Peak GPU memory and pinned host memory of one training step (after the first: optimizer state exists).

    Args:
        model: a model folder, a config.json path, a config dict or an `ArchSpec`.
        method: "lora", "qlora" (NF4 base, LoRA) or "full".
        batch, seq: tokens per step are batch * seq.
        lora_r, target_modules: LoRA rank and the projections that carry it (PEFT names; None: all).
        gradient_checkpointing, checkpoint_policy, mlp_tile_tokens, gate_up_kept_layers: as on the model
            (`velotune.memory.checkpoint`).
        dtype: activations and 16-bit weights; lora_dtype: LoRA weights (float32 as PEFT keeps them).
        optimizer: "adamw" (two states per trainable parameter in its dtype), "adamw8bit" or "sgd".
        embedding_on_host: whether the input embedding table waits in host memory (None: as
            get_peft_model's "auto" does on a GPU: for LoRA/QLoRA with an untied embedding).
        attention_backend: "sdpa" (PyTorch's SDPA: plain causal batches on CUDA), "triton" (velotune's
            kernel: packed or padded batches, sliding windows, soft-capping) or "auto" (sdpa where
            velotune.kernels.attention would pick it for unpacked, unpadded batches).
        fused_mlp: whether the MLP half runs through `velotune.memory.fused_mlp` (None: as on CUDA,
            for LoRA/QLoRA on a dense gated MLP without sandwich norms, assuming no LoRA dropout).
        fused_attention: whether the attention half is recomputed through
            `velotune.memory.fused_attention` (None: as on CUDA, for LoRA/QLoRA without q/k norms or
            sandwich norms, assuming no LoRA dropout).
    """
    spec = _spec_of(model)
    if method not in METHODS:
        raise ConfigError(f"method={method!r}: use one of {METHODS}.")
    if checkpoint_policy not in POLICIES:
        raise ConfigError(f"checkpoint_policy={checkpoint_policy!r}: use one of {POLICIES}.")
    if optimizer not in ("adamw", "adamw8bit", "sgd"):
        raise ConfigError(f"optimizer={optimizer!r}: use adamw, adamw8bit or sgd.")
    if batch < 1 or seq < 1:
        raise ConfigError(f"batch={batch}, seq={seq}: both must be at least 1.")
    mode = checkpoint_mode(gradient_checkpointing)
    act = _dtype_bytes(dtype)
    tokens = batch * seq
    n_layers = spec.num_layers

    linear, other = parameter_counts(spec)
    if embedding_on_host is None:
        embedding_on_host = method != "full" and not spec.tie_word_embeddings
    table = spec.vocab_size * spec.hidden_size
    table_on_host = embedding_on_host and method != "full" and not spec.tie_word_embeddings
    if table_on_host:
        other -= table
    if method == "qlora":
        weights = math.ceil(linear * NF4_BYTES_PER_WEIGHT) + other * act
    else:
        weights = (linear + other) * act
    if method == "full":
        n_trainable, param_bytes, trainable = linear + other, act, 0
        ranks = None
    else:
        param_bytes = _dtype_bytes(lora_dtype)
        n_trainable = lora_parameter_count(spec, lora_r, target_modules)
        trainable = n_trainable * param_bytes
        ranks = _lora_ranks(spec, lora_r, target_modules)
    state_bytes = {"adamw": 2 * param_bytes, "adamw8bit": 2, "sgd": 0}[optimizer]

    backend = _attention_backend(spec, seq, attention_backend)
    if fused_mlp is None:
        fused_mlp = method != "full" and spec.moe is None and not spec.sandwich_norms
    if fused_attention is None:
        fused_attention = method != "full" and not spec.qk_norm and not spec.sandwich_norms
    kept, phases = activation_inventory(
        spec,
        tokens,
        act_bytes=act,
        ranks=ranks,
        gradient_checkpointing=mode,
        checkpoint_policy=checkpoint_policy,
        mlp_tile_tokens=mlp_tile_tokens,
        attention_backend=backend,
        fused_mlp=fused_mlp,
        mlp_dense=method != "qlora",
        gate_up_kept_layers=gate_up_kept_layers,
        fused_attention=bool(mode) and fused_attention,
    )
    totals = {phase: sum(items.values()) for phase, items in phases.items()}
    peak_phase = max(totals, key=totals.get)
    saved = sum(kept.values())

    rotary = spec.rope.rotary_dim or spec.head_dim
    rope = 2 * tokens * rotary * act  # cos and sin, shared by the layers
    ids = 2 * tokens * 8  # the caller's int64 input ids and labels
    dequant = 0
    if method == "qlora":  # one projection's weight dequantized for its GEMM
        dequant = max(a * b for a, b, _ in _projections(spec).values()) * act

    host = 0
    if mode == "offload":  # the checkpoint of every layer but the last
        host += (n_layers - 1) * _offload_block_bytes(tokens * spec.hidden_size * act)
        if checkpoint_policy == "save_mlp":  # the MLP-half inputs, and the kept gate/up tiles
            host += (n_layers - 1) * _offload_block_bytes(tokens * spec.hidden_size * act)
            kept = _gate_up_kept_count(n_layers, mode, checkpoint_policy, fused_mlp, gate_up_kept_layers)
            tiles = _mlp_tiles(spec, tokens, mode, fused_mlp, method != "qlora", mlp_tile_tokens)
            gate_up_row = 2 * spec.intermediate_size * act
            tile_bytes = sum(_offload_block_bytes((b - a) * gate_up_row) for a, b in tiles)
            host += max(kept - 1, 0) * tile_bytes  # the top layer's stay on the GPU
    if table_on_host:
        # The pinned table, and the pinned rows gathered from it for each batch (DecoderModel.embed).
        host += _pinned_bytes(table * act) + _pinned_bytes(tokens * spec.hidden_size * act)
    return MemoryEstimate(
        weights=int(weights),
        trainable=int(trainable),
        gradients=int(n_trainable * param_bytes),
        optimizer=int(n_trainable * state_bytes),
        saved_activations=int(saved),
        peak_working_set=int(totals[peak_phase] - saved),
        workspace=int(rope + ids + dequant),
        host_pinned=int(host),
        peak_phase=peak_phase,
        breakdown={name: int(v) for name, v in phases[peak_phase].items()},
        phases={phase: int(v) for phase, v in totals.items()},
    )


@dataclass
class SequenceLimit:
    """The longest sequence (at a batch size) that fits a GPU and a host, and which binds first."""

    longest: int  # fits both (0: none does)
    gpu_longest: int  # fits the GPU, host memory aside (MAX_PLANNED_TOKENS: no limit found)
    host_longest: int  # fits the host's pinned memory, the GPU aside (MAX_PLANNED_TOKENS: no limit)
    binding: str  # "gpu" or "host": the resource that runs out first

    def describe(self) -> str:
        def length(n: int) -> str:
            return "no limit" if n >= MAX_PLANNED_TOKENS else f"{n:,} tokens"

        return (
            f"{length(self.longest)}, {self.binding}-bound "
            f"(GPU alone: {length(self.gpu_longest)}; host memory alone: {length(self.host_longest)})"
        )


def _longest(fits, multiple_of: int) -> int:
    """The longest multiple of multiple_of for which the monotone predicate fits holds (0: none)."""
    lo, hi = 0, multiple_of
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > MAX_PLANNED_TOKENS:
            return MAX_PLANNED_TOKENS
    while hi - lo > multiple_of:
        mid = (lo + hi) // 2 // multiple_of * multiple_of
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def sequence_limit(
    model, gpu_bytes: int, *, host_bytes: int | None = None, multiple_of: int = 256, **kwargs
) -> SequenceLimit:
    """The longest seq (a multiple of multiple_of) that fits gpu_bytes and host_bytes, and which binds.

    kwargs: as `estimate_memory`'s (batch, method, ...). host_bytes None: host memory is not limited."""
    spec = _spec_of(model)
    if multiple_of < 1:
        raise ConfigError(f"multiple_of={multiple_of}: must be at least 1.")

    def estimate(seq: int) -> MemoryEstimate:
        return estimate_memory(spec, seq=seq, **kwargs)

    gpu = _longest(lambda seq: estimate(seq).fits_gpu(gpu_bytes), multiple_of)
    host = MAX_PLANNED_TOKENS
    if host_bytes is not None:
        host = _longest(lambda seq: estimate(seq).fits_host(host_bytes), multiple_of)
    return SequenceLimit(
        longest=min(gpu, host), gpu_longest=gpu, host_longest=host, binding="host" if host < gpu else "gpu"
    )


def longest_sequence(
    model, gpu_bytes: int, *, host_bytes: int | None = None, multiple_of: int = 256, **kwargs
) -> int:
    """The longest seq (a multiple of multiple_of) whose estimate fits; 0 if none does."""
    return sequence_limit(model, gpu_bytes, host_bytes=host_bytes, multiple_of=multiple_of, **kwargs).longest


def _parse_checkpointing(value: str) -> bool | str:
    lowered = value.lower()
    if lowered in ("true", "gpu", "1", "yes"):
        return True
    if lowered in ("false", "off", "0", "no", "none"):
        return False
    return checkpoint_mode(value)


def host_memory_bytes() -> int | None:
    """This machine's memory (MemTotal; pinned memory cannot exceed it), None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
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
        attention_backend=args.attention,
    )
    estimate = estimate_memory(args.model, seq=args.seq, **kwargs)
    gpu = int(args.gpu_memory * _GIB)
    host = int(args.host_memory * _GIB) if args.host_memory else host_memory_bytes()
    out = sys.stdout
    out.write(f"{args.model}: {args.method}, batch {args.batch} x {args.seq} tokens\n")
    out.write(estimate.table(detail=args.detail) + "\n")
    gpu_verdict = "fits" if estimate.fits_gpu(gpu) else "does NOT fit"
    out.write(
        f"GPU: {gpu_verdict} in {args.gpu_memory:g} GiB "
        f"(keeping {RESERVE_BYTES / _GIB:g} GiB + {SLACK:.0%} of the peak aside)\n"
    )
    if host:
        host_verdict = "fits" if estimate.fits_host(host) else "does NOT fit"
        out.write(
            f"host: {estimate.host_pinned / _GIB:.2f} GiB pinned {host_verdict} in {host / _GIB:.0f} GiB "
            f"(keeping {HOST_RESERVE:.0%} of it for pageable memory)\n"
        )
    verdict = "fits" if estimate.fits(gpu, host) else "does NOT fit"
    host_note = f" + {host / _GIB:.0f} GiB host" if host else ""
    out.write(f"{verdict} in {args.gpu_memory:g} GiB GPU{host_note}\n")
    limit = sequence_limit(args.model, gpu, host_bytes=host, **kwargs)
    out.write(f"longest sequence that fits at batch {args.batch}: {limit.describe()}\n")
    return 0


def add_plan_command(subparsers) -> None:
    """Registers `velotune plan` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "plan",
        help="estimate the peak GPU and pinned host memory of training a model, and the longest sequence "
        "that fits, before loading it",
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
        "--attention", choices=ATTENTION_BACKENDS, default="auto",
        help="attention backward counted: sdpa (plain causal batches on CUDA), triton (packed or padded "
        "batches, windows, soft-capping), auto (as velotune picks for unpacked batches)",
    )  # fmt: skip
    p.add_argument(
        "--embedding-on-gpu", action="store_true",
        help="keep the input embedding on the GPU (get_peft_model(embedding_on_host=False))",
    )  # fmt: skip
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB of the target GPU")
    p.add_argument(
        "--host-memory", type=float, default=None,
        help="GiB of the target host's memory (default: this machine's MemTotal)",
    )  # fmt: skip
    p.add_argument("--detail", action="store_true", help="list every activation tensor alive at the peak")
    p.set_defaults(func=_plan)
