"""Gradient checkpointing of decoder layers: what each layer keeps for its backward, and where.

`model.gradient_checkpointing` (set by `get_peft_model(use_gradient_checkpointing=...)`):
  False      every intermediate is kept: fastest, most memory.
  True       each layer keeps its input on the GPU and recomputes the rest during the backward.
  "offload"  as True, but the inputs wait in pinned host memory (`velotune.memory.offload`), copied
             on side streams behind the compute; the default. On CPU it is the same as True.

`model.checkpoint_policy` (under True or "offload"):
  "full"       the layer's input only; the whole layer is recomputed (least memory).
  "save_attn"  the attention half runs with a graph, keeping what its backward needs (normed input,
               q/k/v, the attention output and its log-sum-exp) on the GPU; only the MLP half is
               recomputed, from its input. Skips recomputing the attention (quadratic in length) for
               about 7x the per-layer GPU memory of "full" at Llama-8B shapes.
  "save_mlp"   as "full", and each layer also keeps its MLP half's input, so its backward runs the
               MLP half first and recomputes the attention half after (its graph is never alive
               together with the MLP's tensors). `model.gate_up_kept_layers` of the layers (None:
               `GATE_UP_KEPT_SHARE` of them) also keep the fused MLP's gate/up output, so their
               backward skips the gate/up GEMMs, the largest part of the recomputation. Under
               "offload" all of it waits in pinned host memory, copied behind the compute: the GPU
               holds at most about one extra layer's worth (the layer below, prefetched).

`model.mlp_tile_tokens`: the MLP half runs over tiles of this many tokens (`velotune.memory.tiled`).
None (default): whenever tiling costs no extra compute (under checkpointing, or without a graph),
`fused_tile_tokens` of the layer's shape (2,048 at Llama-8B) where the MLP takes the fused path
(`velotune.memory.fused_mlp`: CUDA, LoRA or frozen weights, no LoRA dropout) under checkpointing
and its weights are dense (a 4-bit weight is dequantized again per tile), else 8192; off otherwise; 0: never; n: always (without checkpointing this recomputes the MLP once
more). Tiles through autograd (the generic path) cost ~4 ms of host time each on the H100 machine:
1,024-token tiles made the 8B step 1.9x slower (benchmarks/NOTES.md); the fused path's tiles are
its kernels alone (~70 ops), hence its smaller default.

Where `velotune.memory.fused_attention` applies (CUDA, LoRA/QLoRA without LoRA dropout), the
attention half is recomputed and differentiated by hand instead of through autograd: the same ops,
minus the o projection's output when the MLP half has already run from its kept input ("save_mlp").

`model.cuda_graphs = True` (CUDA, "full" or "save_mlp", both halves hand-written): each layer's first
forward, and under "save_mlp" its backward too, replays from a CUDA graph (`velotune.memory.layer_graphs`):
the same kernels without the host's per-op cost, for the memory of the graphs' buffers and pool.

Every mode gives the same loss and gradients: bitwise on CPU in float32 when no tiling happens.
The recomputation replays the forward's RNG (LoRA dropout) and autocast state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack

import torch
from torch import nn

from velotune.errors import ConfigError, KernelError
from velotune.memory.offload import ActivationStore, SavedTensor
from velotune.memory.fused_attention import fused_attention_block
from velotune.memory.layer_graphs import GraphedLayer, step_graphs
from velotune.memory.fused_mlp import fused_mlp_block
from velotune.memory.tiled import fused_tile_tokens, token_tiles, tokenwise_backward, tokenwise_forward

MODES = (False, True, "offload")
POLICIES = ("full", "save_attn", "save_mlp")
# Share of the layers that keep their gate/up output under "save_mlp". Each such layer copies
# 2 x intermediate values per token to host memory in its forward, on top of its input and MLP
# input (2 x hidden): 288 MiB per layer at Llama-8B and 4,096 tokens, ~5.3 ms on the H100's ~54 GB/s
# host link against a ~4 ms layer forward, so only part of the layers can keep it before the copies
# fall behind the compute. Measured at 8B QLoRA 2 x 2048 (benchmarks/results/h100-2026-11-24-s5/
# qlora_step_profile.md, interleaved rounds): 11 of 32 layers 360 ms per step, 16: 339, 21: 341,
# 32: 427 (forward bound by the copies), "full" 372.
GATE_UP_KEPT_SHARE = 1 / 2
DEFAULT_TILE_TOKENS = 8192


def checkpoint_mode(value) -> bool | str:
    """Normalises `gradient_checkpointing`: False, True or "offload" ("unsloth" is Unsloth's name for it)."""
    if value is None or value is False:
        return False
    if value is True:
        return True
    if isinstance(value, str) and value.lower() in ("offload", "unsloth"):
        return "offload"
    raise ConfigError(
        f"gradient_checkpointing={value!r}: use True (GPU), 'offload' (pinned CPU memory) or False."
    )


class _Segment:
    """tail(head(x)): what one checkpoint recomputes. `tail` must be per-token when tiled.

    keep_tail_input: also keep head(x) (the MLP half's input), so that the backward differentiates
    the tail first from it and recomputes the head only afterwards: the head's graph is not alive
    while the tail's tensors are. keep_gate_up: the tail (a `FusedMLPBlock`) also keeps each tile's
    gate/up output, and its backward skips the gate/up GEMMs. Both go through the store (to host
    memory under offload), in this layer's group."""

    def __init__(
        self,
        head: Callable[[torch.Tensor], torch.Tensor] | None,
        tail: Callable[[torch.Tensor], torch.Tensor],
        params: Sequence[torch.Tensor],
        tile_tokens: int | None,
        store: ActivationStore,
        offload: bool,
        keep_tail_input: bool = False,
        keep_gate_up: bool = False,
        graphed: GraphedLayer | None = None,
    ):
        if (keep_tail_input or keep_gate_up) and head is None:
            raise KernelError("a checkpoint without a head has no tail input to keep: its input is it.")
        if keep_gate_up and not (keep_tail_input and hasattr(tail, "forward_keeping")):
            raise KernelError("keeping the gate/up output needs the fused MLP as the tail and its input kept.")
        self.head, self.tail, self.params = head, tail, list(params)
        self.tile_tokens, self.store, self.offload = tile_tokens, store, offload
        self.keep_tail_input, self.keep_gate_up = keep_tail_input, keep_gate_up
        # The layer's forward (and, under "save_mlp", backward) replayed from CUDA graphs (layer_graphs).
        self.graphed = graphed
        self.saved: SavedTensor | None = None
        self.saved_tail_input: SavedTensor | None = None
        self.saved_gate_up: list[SavedTensor] = []
        self.rng: tuple | None = None
        self.tail_rng: tuple | None = None
        self.autocast: tuple[str, bool, torch.dtype] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Saved before the layer runs, so the copy to host overlaps this layer's compute.
        self.saved = self.store.save(x, self.offload)
        if self.graphed is not None and self.keep_tail_input:
            # Its backward replays a graph too: no recomputation to replay RNG or autocast state for
            # (graphed layers have neither dropout nor autocast).
            out, kept = self.graphed.forward(
                x, lambda t, static: self.store.save(t, self.offload, join=True, static=static)
            )
            self.saved_tail_input, *self.saved_gate_up = kept
            return out
        self.rng = _rng_state(x.device)
        kind = x.device.type
        self.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        if self.graphed is not None:
            return self.graphed.forward(x)[0]
        h = self.head(x) if self.head is not None else x
        if self.keep_tail_input:
            self.tail_rng = _rng_state(x.device)  # the tail's backward runs first: it replays from here
            self.saved_tail_input = self.store.save(h, self.offload, join=True)
        if self.keep_gate_up:
            out, self.saved_gate_up = self.tail.forward_keeping(
                h, self.tile_tokens, lambda t: self.store.save(t, self.offload, join=True)
            )
            return out
        return tokenwise_forward(self.tail, h, self.tile_tokens)

    def _replay(self, stack: ExitStack, device: torch.device, rng) -> None:
        """Enters the forward's RNG state `rng`, autocast state and grad mode on `stack`."""
        stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
        cpu_rng, device_rng = rng
        torch.set_rng_state(cpu_rng)
        if device_rng is not None:
            torch.cuda.set_rng_state(device_rng, device)
        kind, enabled, dtype = self.autocast
        stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled))
        stack.enter_context(torch.enable_grad())

    def _tail_backward_first(self, dy: torch.Tensor) -> tuple[torch.Tensor, list]:
        """(d head(x), parameter gradients) of the tail, from its kept input (and gate/up output)."""
        h = self.store.load(self.saved_tail_input)
        self.saved_tail_input = None
        if self.keep_gate_up:
            kept = [self.store.load(s) for s in self.saved_gate_up]
            self.saved_gate_up = []
            return self.tail.tiled_backward(h, dy, self.params, self.tile_tokens, True, kept_gate_up=kept)
        with ExitStack() as replay:
            self._replay(replay, h.device, self.tail_rng)
            return tokenwise_backward(self.tail, h, dy, self.params, self.tile_tokens, True)

    def backward(self, dy: torch.Tensor, need_dx: bool) -> tuple[torch.Tensor | None, list]:
        if self.graphed is not None and self.keep_tail_input:
            return self._graphed_backward(dy, need_dx)
        dh = grads = None  # the tail's, once it has run (first, when it kept its input)
        if self.saved_tail_input is not None:
            dh, grads = self._tail_backward_first(dy)
        x = self.store.load(self.saved)
        self.saved = None
        with ExitStack() as replay:
            self._replay(replay, x.device, self.rng)
            if self.head is None:
                return tokenwise_backward(self.tail, x, dy, self.params, self.tile_tokens, need_dx)
            if hasattr(self.head, "recompute"):
                return self._hand_written_head_backward(x, dy, need_dx, dh, grads)
            x_leaf = x.detach().requires_grad_(need_dx)
            h = self.head(x_leaf)
            if dh is None:
                dh, grads = tokenwise_backward(
                    self.tail, h.detach(), dy, self.params, self.tile_tokens, h.requires_grad
                )
            if not h.requires_grad:
                return None, grads
            wrt = ([x_leaf] if need_dx else []) + self.params
            got = list(torch.autograd.grad(h, wrt, dh, allow_unused=True))
        dx = got.pop(0) if need_dx else None
        return dx, _summed(grads, got)

    def _graphed_backward(self, dy: torch.Tensor, need_dx: bool) -> tuple[torch.Tensor | None, list]:
        """`backward` of a "save_mlp" layer from its CUDA graph: its kept tensors loaded, then one replay."""
        h = self.store.load(self.saved_tail_input)
        gate_up = [self.store.load(s) for s in self.saved_gate_up]
        x = self.store.load(self.saved)
        self.saved_tail_input, self.saved_gate_up, self.saved = None, [], None
        return self.graphed.backward(x, h, gate_up, dy, need_dx)

    def _hand_written_head_backward(self, x, dy, need_dx, dh, grads):
        """`backward` for a head with its own recomputation and backward (`FusedAttentionBlock`); dh and
        grads: the tail's, when it ran first from its kept input."""
        head = self.head
        needs_dh = need_dx or head.trains(self.params)
        if dh is not None and not needs_dh:
            return None, grads  # the tail ran first and nothing in or below the head wants a gradient
        # The head's output is the tail's input: recomputed only when the tail was not differentiated yet.
        state, h = head.recompute(x, need_output=dh is None)
        if dh is None:
            dh, grads = tokenwise_backward(self.tail, h, dy, self.params, self.tile_tokens, needs_dh)
            del h
        if not needs_dh:
            return None, grads
        dx, head_grads = head.backward(state, dh, self.params, need_dx)
        return dx, _summed(grads, head_grads)


def _summed(grads: list, more: Sequence) -> list:
    """grads with more added entry by entry (None: no gradient)."""
    for i, g in enumerate(more):
        if g is not None:
            grads[i] = g if grads[i] is None else grads[i].add_(g)
    return grads


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(CPU RNG state, the device's RNG state or None): what a recomputation replays."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


class _Recompute(torch.autograd.Function):
    """Runs a segment without a graph; its backward recomputes it with one and differentiates it.

    The parameters are inputs so that their gradients flow back through autograd (accumulated into
    .grad as usual, visible to torch.autograd.grad and gradient hooks)."""

    @staticmethod
    def forward(ctx, segment: _Segment, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.segment = segment
        return segment.forward(x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        segment, ctx.segment = ctx.segment, None
        if segment is None:
            raise KernelError(
                "a checkpointed layer's backward ran twice (retain_graph=True); what it saved is freed by the "
                "first backward. Recompute the forward, or turn gradient checkpointing off."
            )
        dx, grads = segment.backward(dy, ctx.needs_input_grad[1])
        return (None, dx, *grads)


def recompute(
    head: Callable[[torch.Tensor], torch.Tensor] | None,
    tail: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    params: Sequence[torch.Tensor],
    *,
    tile_tokens: int | None = None,
    store: ActivationStore | None = None,
    offload: bool = False,
    keep_tail_input: bool = False,
    keep_gate_up: bool = False,
    graphed: GraphedLayer | None = None,
) -> torch.Tensor:
    """tail(head(x)), keeping only x for the backward (on the device, or offloaded through `store`).

    Args:
        head: any function of x (None: identity); recomputed whole in the backward.
        tail: a per-token function of head(x) when tile_tokens is set; run and recomputed tile by tile.
        params: every trainable tensor head and tail use (others get no gradient).
        tile_tokens: tile size for the tail (None: untiled).
        store: where x waits (None: a throwaway store keeping it on its device).
        offload: copy x to pinned host memory (CUDA tensors only).
        keep_tail_input, keep_gate_up: also keep head(x), and the fused MLP tail's gate/up output
            (see `_Segment`).
        graphed: the layer's CUDA graphs (`velotune.memory.layer_graphs`): its forward replays one
            (head and tail must be the layer's hand-written halves), and with keep_tail_input its
            backward too; otherwise the backward recomputes through head and tail.
    """
    store = store if store is not None else ActivationStore()
    segment = _Segment(head, tail, params, tile_tokens, store, offload, keep_tail_input, keep_gate_up,
                       graphed)  # fmt: skip
    return _Recompute.apply(segment, x, *params)


def sequence_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    params: Sequence[torch.Tensor],
    tile_tokens: int,
) -> torch.Tensor:
    """fn(x) for a per-token fn (an MLP, with its LoRA), never holding more than one tile's intermediates."""
    if len(token_tiles(x.numel() // x.shape[-1], tile_tokens)) == 1 or not torch.is_grad_enabled():
        return tokenwise_forward(fn, x, tile_tokens)
    return recompute(None, fn, x, params, tile_tokens=tile_tokens)


def gate_up_keeping_layers(model: nn.Module) -> frozenset[int]:
    """The layers that keep their MLP's gate/up output under "save_mlp": `model.gate_up_kept_layers`
    of them (None: `default_gate_up_kept_layers`), spread evenly from the top layer down; with CUDA
    graphs (`model.cuda_graphs`) from the bottom layer up. Graphed, the step runs at the GPU's pace and
    the host link's copies matter: from the bottom up, the kept outputs go to the host early in the
    forward and come back late in the backward, away from the turn between them, and the top layer
    (whose tensors stay on the GPU) keeps none: at 8B QLoRA 2 x 2048, 326.0 against 331.7 ms per step
    and 6.53 against 6.75 GiB (benchmarks/results/h100-2026-11-24-s8/, NOTES.md session 8). Eagerly,
    the host sets the pace and top-down measured no worse (344.6 against 360.4 ms, noisy)."""
    n = len(model.layers)
    count = getattr(model, "gate_up_kept_layers", None)
    if count is None:
        count = default_gate_up_kept_layers(n)
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= n:
        raise ConfigError(f"gate_up_kept_layers={count!r}: use None (automatic) or a count from 0 to {n}.")
    top_down = frozenset(n - 1 - (j * n) // count for j in range(count))
    return frozenset(n - 1 - i for i in top_down) if getattr(model, "cuda_graphs", False) else top_down


def default_gate_up_kept_layers(num_layers: int) -> int:
    """How many layers keep their gate/up output by default: GATE_UP_KEPT_SHARE of them."""
    return round(GATE_UP_KEPT_SHARE * num_layers)


def _tile_tokens(model: nn.Module, free: bool) -> int | None:
    tile = getattr(model, "mlp_tile_tokens", None)
    if tile is None:
        return DEFAULT_TILE_TOKENS if free else None
    return tile or None


# A layer sharded by FSDP2 holds its whole parameters only inside its forward methods, and the steps
# below call its halves (and hand its parameters to `recompute`) outside `layer.forward`. Sharding
# gives such a layer a method of this name, run(fn, *args) = fn(layer, *args), registered as an
# FSDP2 forward method (`velotune.train.distributed`): the step runs inside it, on whole parameters,
# and FSDP2's backward hooks gather them again for the recompute and reduce their gradients after.
SHARDED_CALL = "run_as_forward"


def activation_store(model: nn.Module) -> ActivationStore:
    """The model's store (its pinned buffers live as long as the model)."""
    store = model.__dict__.get("_activation_store")
    if store is None:
        store = model.__dict__["_activation_store"] = ActivationStore()
    return store


def run_layers(
    model: nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> torch.Tensor:
    """The decoder's layer loop (no KV cache) under the model's checkpointing mode, policy and tiling."""
    training = model.training and torch.is_grad_enabled()
    mode = checkpoint_mode(model.gradient_checkpointing) if training else False
    policy = getattr(model, "checkpoint_policy", "full")
    if policy not in POLICIES:
        raise ConfigError(f"checkpoint_policy={policy!r}: use one of {POLICIES}.")
    tile = _tile_tokens(model, free=bool(mode) or not torch.is_grad_enabled())
    # Under checkpointing, the automatic tile is smaller where the fused MLP makes tiles cheap.
    auto_tile = bool(mode) and getattr(model, "mlp_tile_tokens", None) is None
    store = activation_store(model) if mode else None
    if store is not None:
        store.begin_forward()
    last = len(model.layers) - 1
    keeping = gate_up_keeping_layers(model) if mode and policy == "save_mlp" else frozenset()
    graphs = None
    if mode and not any(hasattr(layer, SHARDED_CALL) for layer in model.layers):
        graphs = step_graphs(model, x, cos, sin, key_padding_mask, cu_seqlens, policy)
    for i, layer in enumerate(model.layers):
        if not mode and not tile:
            x = layer(x, cos, sin, key_padding_mask, cu_seqlens)
            continue
        # The last layer's input is needed first in the backward: it stays on the GPU.
        offload = mode == "offload" and i < last
        # Keeping layers alternate between two sets of graph buffers; the layers between them use the set
        # of the next keeping layer above (`GraphedLayer`'s slot).
        slot = sum(j < i for j in keeping) % 2
        step = (x, cos, sin, key_padding_mask, cu_seqlens, mode, policy, tile, auto_tile, store, offload,
                i in keeping, graphs, i, slot)  # fmt: skip
        sharded_call = getattr(layer, SHARDED_CALL, None)
        x = sharded_call(_layer_step, *step) if sharded_call is not None else _layer_step(layer, *step)
    return x


def _layer_step(
    layer, x, cos, sin, key_padding_mask, cu_seqlens, mode, policy, tile, auto_tile, store, offload, keep_gate_up,
    graphs=None, index=0, slot=0,
):  # fmt: skip
    """One layer under checkpointing or tiling: everything here that reads the layer's parameters."""

    def attention_half(t):
        return layer.attention_block(t, cos, sin, key_padding_mask, cu_seqlens)

    # The hand-written attention half (its recomputation skips what no gradient needs) where it applies.
    hand_written_half = fused_attention_block(layer, x, cos, sin, key_padding_mask, cu_seqlens)
    attention_half = hand_written_half or attention_half
    fused = fused_mlp_block(layer, x)
    mlp_block = fused if fused is not None else layer.mlp_block
    if fused is not None and fused.dense and auto_tile:
        tile = fused_tile_tokens(layer.spec.hidden_size, layer.spec.intermediate_size)
    params = [p for p in layer.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
    if not params and not x.requires_grad:
        # Nothing to differentiate here: no graph, so nothing to save either.
        return tokenwise_forward(mlp_block, attention_half(x), tile)
    keep_gate_up = keep_gate_up and fused is not None
    graphed = None
    if graphs is not None and fused is not None and hand_written_half is not None:
        graphed = GraphedLayer(graphs, index, layer, fused, tile, policy, keep_gate_up, params, slot)
    if mode and policy == "full":
        return recompute(attention_half, mlp_block, x, params, tile_tokens=tile, store=store, offload=offload,
                         graphed=graphed)  # fmt: skip
    if mode and policy == "save_mlp":
        return recompute(attention_half, mlp_block, x, params, tile_tokens=tile, store=store, offload=offload,
                         keep_tail_input=True, keep_gate_up=keep_gate_up, graphed=graphed)  # fmt: skip
    if mode:
        h = attention_half(x)
        return recompute(None, mlp_block, h, params, tile_tokens=tile, store=store, offload=offload)
    return sequence_tiled(mlp_block, attention_half(x), params, tile)
