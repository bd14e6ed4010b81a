"""Running a per-token function (the MLP half of a decoder layer) over tiles of the sequence.

At long context the MLP's intermediates dominate: for Llama-3.1-8B the fused gate/up output alone is
2 x 14,336 values per token (56 KiB in bf16, 22 GiB at 400K tokens), and its activation and the
gradients of both are as large again. A token's MLP output depends on that token only, so the
forward runs tile by tile into one output tensor, and the backward recomputes each tile with a
graph, differentiates it and drops it before the next: at most one tile's [tile, intermediate]
tensors exist at a time. LoRA projections inside the MLP are tiled with it (tiling is at the
module level; whatever the module computes per token is covered).

The math is the untiled math; only rounding differs: a GEMM over fewer rows may block its sums
differently, and parameter gradients are summed tile by tile.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch


def token_tiles(n_tokens: int, tile_tokens: int | None) -> list[tuple[int, int]]:
    """[start, end) ranges of equal tiles of at most tile_tokens (one range when tiling is off)."""
    if not tile_tokens or n_tokens <= tile_tokens:
        return [(0, n_tokens)]
    n_tiles = math.ceil(n_tokens / tile_tokens)
    step = math.ceil(n_tokens / n_tiles)  # equal tiles: the last GEMM is as efficient as the others
    return [(s, min(s + step, n_tokens)) for s in range(0, n_tokens, step)]


# GEMM work (tokens x hidden x intermediate) of one 2,048-token tile of Llama-3.1-8B's MLP: about
# 4.5 ms of H100 time for its forward, recompute and backward, against ~1.5 ms of host time for the
# fused path's ~70 ops (velotune.memory.fused_mlp), so the GPU never waits on the host.
FUSED_TILE_WORK = 2048 * 4096 * 14336


def fused_tile_tokens(hidden: int, intermediate: int) -> int:
    """Default tile of the fused MLP path: at least 2,048 tokens and FUSED_TILE_WORK of GEMM work
    (a multiple of 256), at most 8,192 tokens."""
    tokens = math.ceil(FUSED_TILE_WORK / (hidden * intermediate) / 256) * 256
    return min(8192, max(2048, tokens))


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    # [..., H] -> [1, N, H]: one sequence of all tokens, which every per-token module accepts.
    return x.reshape(1, -1, x.shape[-1])


def tokenwise_forward(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile_tokens: int | None):
    """fn(x) for a per-token fn, computed tile by tile (no graph is built by the caller's no_grad).

    fn may bring its own tile loop (`tiled_forward`, `velotune.memory.fused_mlp`), which records no graph."""
    if hasattr(fn, "tiled_forward") and not torch.is_grad_enabled():
        return fn.tiled_forward(x, tile_tokens)
    rows = _as_rows(x)
    tiles = token_tiles(rows.shape[1], tile_tokens)
    if len(tiles) == 1:
        return fn(x)
    out = None
    for start, end in tiles:
        y = fn(rows[:, start:end])
        if out is None:
            out = y.new_empty(1, rows.shape[1], y.shape[-1])
        out[:, start:end] = y
    return out.reshape(*x.shape[:-1], out.shape[-1])


def tokenwise_backward(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    dy: torch.Tensor,
    params: Sequence[torch.Tensor],
    tile_tokens: int | None,
    need_dx: bool,
) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """Gradients of <fn(x), dy> with respect to x and params, recomputing fn one tile at a time.

    Runs with grad enabled; returns (dx or None, one gradient or None per parameter). fn may bring its
    own hand-written backward (`tiled_backward`, `velotune.memory.fused_mlp`)."""
    if hasattr(fn, "tiled_backward"):
        return fn.tiled_backward(x, dy, params, tile_tokens, need_dx)
    rows, d_rows = _as_rows(x), _as_rows(dy)
    tiles = token_tiles(rows.shape[1], tile_tokens)
    whole = len(tiles) == 1
    dx = None if whole or not need_dx else torch.empty_like(rows)
    grads: list[torch.Tensor | None] = [None] * len(params)
    for start, end in tiles:
        x_tile = rows[:, start:end].detach().requires_grad_(need_dx)
        y_tile = fn(x_tile)
        if not y_tile.requires_grad:  # nothing trainable on this path
            continue
        d_tile = d_rows[:, start:end]
        wrt = ([x_tile] if need_dx else []) + list(params)
        got = list(torch.autograd.grad(y_tile, wrt, d_tile, allow_unused=True))
        if need_dx:
            g = got.pop(0)
            if whole:
                dx = g
            else:
                dx[:, start:end] = 0 if g is None else g
        for i, g in enumerate(got):
            if g is None:
                continue
            if grads[i] is None:
                # Later tiles are added in place: own the first gradient unless it is already ours alone.
                shared = g.untyped_storage().data_ptr() == d_tile.untyped_storage().data_ptr()
                grads[i] = g.clone() if shared and not whole else g
            else:
                grads[i].add_(g)
    if need_dx and dx is None:
        dx = torch.zeros_like(rows)
    if dx is not None:
        dx = dx.reshape(x.shape)
    return dx, grads
