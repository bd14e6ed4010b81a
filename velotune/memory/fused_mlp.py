"""The MLP half of a dense decoder layer, x + down(act(gate_up(norm(x)))), run over token tiles with
a hand-written backward: what a checkpointed layer recomputes and differentiates, tile by tile.

Why not autograd per tile (`velotune.memory.tiled`'s generic path): each tile then rebuilt a graph
of four autograd Functions through the modules, ran `torch.autograd.grad` over it, recomputed the
down projection's output that no gradient needs, and copied and summed gradients: about 150
dispatched ops per tile, ~4 ms of host time on the H100 machine (~25 us per op, see
benchmarks/results/h100-2026-11-24-s4/train-1b/lora_host_cost-cuda.md), so 1,024-token tiles
made the 8B step wait on the host (benchmarks/NOTES.md). Here a tile is the kernels alone:

  recompute  rmsnorm, gate/up (base GEMM + LoRA), activation            (no down GEMM: not needed)
  backward   down's LoRA grads, d(activation) = dy W_down (+ LoRA), activation backward in place,
             gate/up's LoRA grads and d(normed) = dg W_gate_up (+ LoRA), rmsnorm backward + dy

about 50 ops, and the forward about 20. Memory of one tile at its high point: the normed input,
gate/up [t, 2I] and the activation [t, I], which is freed before d(activation) takes its place;
the tile's output is never recomputed.

The ops are the ones the modules run (the same `lora_project` pieces, the same Triton kernels, in
the same order), so one tile gives bitwise the untiled autograd result; with several tiles the
LoRA gradients are summed tile by tile. It applies where those ops are what the modules would run:
the Triton path (CUDA), no autocast, no LoRA dropout in training, a dense gated MLP without
sandwich norms, frozen base and norm weights (LoRA); elsewhere `fused_mlp_block` returns None and
the generic path runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from velotune.errors import KernelError
from velotune.kernels._dispatch import use_triton
from velotune.kernels.activations import ACTIVATIONS, gated_activation_backward, gated_activation_forward
from velotune.kernels.lora import (
    _fused_forward,
    _is_dense,
    _rows,
    cast_factors,
    folded_input,
    lora_branch_inputs,
    lora_factor_grads,
    lora_input_grad,
    with_cast_factors,
)
from velotune.kernels.rmsnorm import rms_norm_backward, rms_norm_forward, rms_norm_output_dtype
from velotune.memory.tiled import token_tiles
from velotune.models.layers import MLP, DecoderLayer, RMSNorm


def _frozen(t) -> bool:
    return t is None or not getattr(t, "requires_grad", False)


class FusedMLPBlock:
    """One layer's MLP half, callable as `layer.mlp_block` and with tiled forward / backward."""

    def __init__(self, layer, gate_up_parts: tuple, down_parts: tuple):
        # The parts are the projections' `lora_parts()`, read once by `fused_mlp_block`.
        self.layer = layer
        self.norm, self.activation = layer.mlp_norm, layer.mlp.activation
        self.gate_up, self.down = gate_up_parts, down_parts
        # A quantized weight is dequantized inside each GEMM call, so each tile pays its dequantization
        # again: the automatic tile stays large for those (velotune.memory.checkpoint).
        self.dense = _is_dense(gate_up_parts[0]) and _is_dense(down_parts[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.mlp_block(x)

    def _cast_parts(self, x: torch.Tensor) -> tuple[tuple, tuple]:
        """The gate/up and down parts with their LoRA factors in the dtype each computes in (the MLP
        norm's output dtype, which the activation keeps), cast once for all the tiles of a pass."""
        dtype = rms_norm_output_dtype(x, self.norm.weight, self.norm.offset)
        gate_up, down = with_cast_factors((self.gate_up, self.down), (dtype, dtype))
        return gate_up, down

    def _gate_up_act(self, xt: torch.Tensor, gate_up: tuple, gu: torch.Tensor | None = None, down=None,
                     gu_out: torch.Tensor | None = None):  # fmt: skip
        """(normed, rstd, gate/up output, its LoRA pieces, activation, the activation's wide buffer or
        None) of one tile; with `gu` (the tile's gate/up output kept from the forward) the gate/up
        GEMMs are skipped. down: the down projection's parts when its GEMM follows (the forward): where
        it folds its LoRA, the activation is written into the first columns of its wider input.
        gu_out: where the gate/up output goes (a CUDA graph's static buffer), else a new tensor."""
        rows = xt.shape[0]
        w, b, a, bs, layout, _ = gate_up
        n, rstd, wide = norm_into_folded_input(xt, self.norm, gate_up if gu is None else None)
        if gu is None:
            gu, a_c, xa, bs_c = _fused_forward(n, None, w, b, a, layout, bs, wide=wide, out=gu_out)
        else:
            a_c, xa, bs_c = lora_branch_inputs(n, a, layout, bs)
        act_wide = folded_input(down, rows, gu.dtype, gu.device) if down is not None else None
        inter = gu.shape[-1] // 2
        act = gated_activation_forward(
            gu, self.activation, out=None if act_wide is None else act_wide[:, :inter]
        )
        return n, rstd, gu, (a_c, xa, bs_c), act, act_wide

    def tiled_forward(self, x: torch.Tensor, tile_tokens: int | None) -> torch.Tensor:
        """x + mlp(norm(x)) without a graph, one tile's intermediates at a time."""
        return self.forward_keeping(x, tile_tokens, None)[0]

    def forward_keeping(
        self, x: torch.Tensor, tile_tokens: int | None, keep, gate_up_into: list | None = None,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list]:  # fmt: skip
        """`tiled_forward`, also handing each tile's gate/up output to keep(tensor) (None: not kept);
        returns (output, what keep returned per tile) for `tiled_backward`'s kept_gate_up.
        gate_up_into: a tensor per tile to compute its gate/up output into; out: the output's tensor
        (x's shape, not x itself): a CUDA graph's static buffers (`velotune.memory.layer_graphs`)."""
        rows = _rows(x)
        out = torch.empty_like(rows) if out is None else _rows(out)
        kept = []
        gate_up, down = self._cast_parts(x)
        w, b, a, bs, layout, _ = down
        for k, (start, end) in enumerate(token_tiles(rows.shape[0], tile_tokens)):
            xt = rows[start:end]
            gu_out = gate_up_into[k] if gate_up_into else None
            _, _, gu, _, act, act_wide = self._gate_up_act(xt, gate_up, down=down, gu_out=gu_out)
            if keep is not None:
                kept.append(keep(gu))
            del gu
            y = _fused_forward(act, None, w, b, a, layout, bs, wide=act_wide)[0]
            torch.add(xt, y, out=out[start:end])
        return out.view(x.shape), kept

    def tiled_backward(
        self,
        x: torch.Tensor,
        dy: torch.Tensor,
        params: Sequence[torch.Tensor],
        tile_tokens: int | None,
        need_dx: bool,
        kept_gate_up: list[torch.Tensor | None] | None = None,
        gate_up_into: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        """Gradients of <block(x), dy> for x and params (one gradient or None each), tile by tile.

        kept_gate_up: each tile's gate/up output as the forward computed it (`forward_keeping`), in
        place of recomputing it; a list whose entries are released (set to None) as they are used.
        gate_up_into: a tensor per tile to recompute its gate/up output into (a CUDA graph's static
        buffers), where none is kept."""
        with torch.no_grad():  # the gradients are written by hand: no graph to record
            return self._backward(x, dy, params, tile_tokens, need_dx, kept_gate_up, gate_up_into)

    def _backward(self, x, dy, params, tile_tokens, need_dx, kept_gate_up, gate_up_into=None):
        rows, d_rows = _rows(x), _rows(dy).contiguous()
        factor_grads = FactorGradients(params)
        grads: list[torch.Tensor | None] = [None] * len(params)
        w_gu, w_down = self.gate_up[0], self.down[0]
        gate_up, down = self._cast_parts(x)  # the compute copies; gradients go to self.gate_up/down's
        a_down, bs_down, layout_down = down[2], down[3], down[4]
        tiles = token_tiles(rows.shape[0], tile_tokens)
        if kept_gate_up is not None and len(kept_gate_up) != len(tiles):
            raise KernelError(
                f"the fused MLP kept {len(kept_gate_up)} gate/up tiles but its backward runs {len(tiles)}: "
                "the tile size changed between the forward and the backward."
            )
        # The caller's list itself: each entry is released as its tile is used, so a used tile's memory
        # goes back to the allocator before the next tile runs.
        kept = kept_gate_up if kept_gate_up is not None else [None] * len(tiles)
        dx = torch.empty_like(rows) if need_dx and len(tiles) > 1 else None
        for k, (start, end) in enumerate(tiles):
            xt, dyt = rows[start:end], d_rows[start:end]
            gu_kept, kept[k] = kept[k], None  # dropped from the list as each tile is used
            gu_out = gate_up_into[k] if gate_up_into and gu_kept is None else None
            n, rstd, gu, (a_gu, xa_gu, bs_gu), act, _ = self._gate_up_act(xt, gate_up, gu_kept, gu_out=gu_out)
            del gu_kept
            # The down projection: only its LoRA branch's input (x A^T) is recomputed, not its output.
            a_c, xa, bs_c = lora_branch_inputs(act, a_down, layout_down, bs_down)
            dyb = factor_grads.of(self.down, dyt, act, xa, a_c, bs_c)
            del act, xa  # d(activation) below takes the activation's memory
            d_act = lora_input_grad(dyt, w_down, dyb, a_c)
            dgu = gated_activation_backward(d_act, gu, self.activation, in_place=True)
            del d_act, gu
            dyb = factor_grads.of(self.gate_up, dgu, n, xa_gu, a_gu, bs_gu)
            factor_grads.add_to(grads)  # per tile, so the tiles' gradients add in the parameters' dtype
            if not need_dx:
                continue
            dn = lora_input_grad(dgu, w_gu, dyb, a_gu)
            del dgu, n
            d_norm = rms_norm_backward(dn, xt, self.norm.weight, rstd, self.norm.offset, False)[0]
            if dx is None:
                dx = d_norm.add_(dyt)  # the residual's gradient; one tile: d_norm is ours alone
            else:
                torch.add(d_norm, dyt, out=dx[start:end])
        return (dx.view(x.shape) if dx is not None else None), grads


def norm_into_folded_input(x: torch.Tensor, norm, parts: tuple | None):
    """(rmsnorm(x) as rows, rstd, the buffer it was written into or None). Where the projection it
    feeds (`parts`, its `lora_parts()`; None: no projection follows) folds its LoRA into the base GEMM,
    the norm writes into the first columns of that GEMM's wider input (`folded_input`), which goes to
    `_fused_forward` as `wide`."""
    hidden = x.shape[-1]
    dtype = rms_norm_output_dtype(x, norm.weight, norm.offset)
    wide = folded_input(parts, x.numel() // hidden, dtype, x.device) if parts is not None else None
    normed, rstd = rms_norm_forward(x, norm.weight, norm.eps, norm.offset,
                                    out=None if wide is None else wide[:, :hidden])  # fmt: skip
    return _rows(normed), rstd, wide


class FactorGradients:
    """The LoRA factor gradients of a hand-written half's projections, for `params` (a layer's
    trainable tensors, in order). Each is computed in its GEMMs' dtype and kept until `add_to` casts
    all that were collected to their parameters' dtypes in one multi-tensor copy (`cast_factors`)."""

    def __init__(self, params: Sequence[torch.Tensor]):
        self.params = params
        self.index = {id(p): i for i, p in enumerate(params)}
        self.found: list[tuple[int, torch.Tensor]] = []

    def of(self, parts: tuple, dy2, x_lora, xa, a_c, bs_c) -> torch.Tensor | None:
        """`lora_factor_grads` of one projection (`lora_parts()`, computed with the cast factors a_c
        and bs_c): returns dyb, and keeps the gradients of the factors that are in params."""
        _, _, a, bs, layout, _ = parts
        wanted = [dy2.dtype if t is not None and id(t) in self.index else None for t in (a, *bs)]
        dyb, da, dbs = lora_factor_grads(dy2, x_lora, xa, a_c, bs_c, layout, wanted[0], wanted[1:])
        self.found += [(self.index[id(p)], g) for p, g in zip((a, *bs), (da, *dbs)) if g is not None]
        return dyb

    def add_to(self, grads: list) -> list:
        """grads (one entry per parameter, None: none yet) plus the collected gradients, cast; the
        collection starts empty again."""
        found, self.found = self.found, []
        for (i, _), g in zip(
            found, cast_factors([g for _, g in found], [self.params[i].dtype for i, _ in found])
        ):
            grads[i] = g if grads[i] is None else grads[i].add_(g)
        return grads


def modules_run_plainly(*modules) -> bool:
    """Whether calling these modules runs their forward and nothing else: no forward hooks or pre-hooks
    on them, none registered for every module, and no subclass overriding the forward of the class
    named in each (module, class) pair. The hand-written halves call the kernels directly, so they
    would skip what a hook or an override does to the forward, and their recomputation would no
    longer be the forward's."""
    hooks = nn.modules.module
    if getattr(hooks, "_global_forward_hooks", None) or getattr(hooks, "_global_forward_pre_hooks", None):
        return False
    for module, cls in modules:
        if getattr(module, "_forward_hooks", None) or getattr(module, "_forward_pre_hooks", None):
            return False
        if cls is not None and type(module).forward is not cls.forward:
            return False
    return True


def hand_written_parts(x: torch.Tensor, norm, half: tuple, *projections) -> tuple | None:
    """The projections' `lora_parts()` where a hand-written half (norm, then `half` = (module, its
    class), then these projections) computes what the modules would, else None: the Triton path,
    no autocast, frozen norm, base weights and biases, no LoRA dropout in training, and modules that
    run plainly (`modules_run_plainly`)."""
    plain = (norm, RMSNorm), half, *((p, None) for p in projections)
    if not modules_run_plainly(*plain):
        return None
    if not use_triton(x, norm.weight) or torch.is_autocast_enabled(x.device.type) or not _frozen(norm.weight):
        return None
    parts = tuple(p.lora_parts() for p in projections)
    for w, b, _, _, _, dropout in parts:
        if dropout > 0 or not _frozen(w) or not _frozen(b):
            return None
    return parts


def fused_mlp_block(layer, x: torch.Tensor) -> FusedMLPBlock | None:
    """The fused MLP half of `layer` where it computes what `layer.mlp_block` would, else None."""
    mlp = getattr(layer, "mlp", None)
    spec = getattr(layer, "spec", None)
    if spec is None or spec.sandwich_norms or getattr(mlp, "activation", None) not in ACTIVATIONS:
        return None
    gate_up, down = getattr(mlp, "gate_up", None), getattr(mlp, "down_proj", None)
    if not hasattr(gate_up, "lora_parts") or not hasattr(down, "lora_parts"):
        return None  # a routed MoE, or another MLP
    if type(layer).mlp_block is not DecoderLayer.mlp_block:
        return None
    parts = hand_written_parts(x, layer.mlp_norm, (mlp, MLP), gate_up, down)
    return FusedMLPBlock(layer, *parts) if parts is not None else None
