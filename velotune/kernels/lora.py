"""Fused LoRA projection: a base projection whose output stacks k named blocks, each with its own
low-rank update.

    y = x W^T (+ b) + concat_i( s_i * (x_lora A_i^T) B_i^T )        i over the k output blocks

W [out, in] stacks the blocks along its rows (q/k/v, or gate/up, or a single block); A stacks the
A_i of the blocks that carry LoRA along its rows ([sum r_i, in]) so that one GEMM computes every
block's down-projection; B_i [out_i, r_i]. x_lora is x, or dropout(x) when LoRA dropout is on (as
in PEFT, dropout only touches the LoRA branch).

This op is GEMMs only, so it has no Triton kernel: the `torch.autograd.Function` below calls
cuBLAS directly, in place, with a backward written by hand. On CUDA (and under
VELOTUNE_KERNELS=triton everywhere) the Function runs; elsewhere the plain-autograd reference does.

Floor (FLOPs, T tokens, R = sum r_i): forward 2*T*in*out (base) + 2*T*in*R (A) + 2*T*R*out_lora (B).
Backward: 2*T*out*in (dx) + 2*T*out_lora*R (dy B) + 2*T*R*in (dx += dyB A, and dA) + 2*T*out_lora*R (dB),
plus 2*T*out*in for dW only when W is trained.
Saves for backward: x (the caller's tensor, no copy), x_lora when dropout made one, and x A^T
[T, R], which is tiny next to the output that is never saved.

Launches per call (at Llama-3.2-1B the training step waits on the host, benchmarks/NOTES.md):
forward = base GEMM, A GEMM, one in-place addmm per LoRA block into the base output; backward =
per LoRA block one addmm for s dy B and one for dB, one GEMM for dA, and dx = the base GEMM with
the LoRA term added into the same buffer by addmm; plus one cast of A and of each B (and of their
gradients) when the LoRA weights are kept in another dtype than the activations. The block layout
(`LoraLayout`) is worked out once per module, not per call, and no-op casts, views and slices are
skipped. Without grad mode (the first forward of a checkpointed layer, inference) the same forward
runs without the autograd Function: there is no graph to record, and its recomputation under grad
mode gives bitwise the same output. `benchmarks/lora_host_cost.py` counts the ops and times them.

The base weight may also be a quantized weight object (`velotune.quant.nf4_weight.NF4Weight`, any
object with `linear(x2)`, `grad_input(dy2)` and `dequantize()`): the Function then has it compute
x W^T and dy W itself, dequantizing into a reused scratch buffer inside each call, and keeps only
the object (never a dense copy) for backward; the reference path dequantizes it to a dense tensor.
Where that object also has `linear_folded` (and the block layout allows, `fold_width`), the forward
is one GEMM over [x | x A^T] and [W | blockdiag(s_i B_i)] instead of the base GEMM plus one
accumulating addmm per block (`_folded_forward`); the backward is the same either way.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from velotune.errors import KernelError
from velotune.kernels._dispatch import use_triton


class LoraLayout:
    """Where the LoRA blocks of one fused projection sit, worked out (and checked) once.

    out_sizes, scales, ranks: per output block (rank 0: no LoRA on that block).
    blocks: per block that has LoRA, in order: (index of the block in out_sizes, scale).
    lora_ranks: the ranks of those blocks, i.e. how A's rows (and the columns of x A^T) split.
    Instances are immutable and shared (`lora_layout`).
    """

    __slots__ = ("in_features", "out_features", "out_sizes", "scales", "ranks", "blocks", "lora_ranks")

    def __init__(
        self, in_features: int, out_sizes: tuple[int, ...], scales: tuple[float, ...], ranks: tuple[int, ...]
    ):
        if not (len(out_sizes) == len(scales) == len(ranks)) or any(r < 0 for r in ranks):
            raise KernelError(
                f"a LoRA layout needs one output size, one scale and one rank (>= 0) per block: got sizes "
                f"{list(out_sizes)}, scales {list(scales)}, ranks {list(ranks)}."
            )
        self.in_features = in_features
        self.out_features = sum(out_sizes)
        self.out_sizes = out_sizes
        self.scales = scales
        self.ranks = ranks
        self.blocks = tuple((i, scales[i]) for i, r in enumerate(ranks) if r)
        self.lora_ranks = tuple(r for r in ranks if r)

    def __repr__(self) -> str:
        return f"LoraLayout(in={self.in_features}, out_sizes={self.out_sizes}, ranks={self.ranks}, scales={self.scales})"


@functools.lru_cache(maxsize=1024)
def _cached_layout(in_features: int, out_sizes: tuple, scales: tuple, ranks: tuple) -> LoraLayout:
    return LoraLayout(in_features, out_sizes, scales, ranks)


def lora_layout(
    in_features: int, out_sizes: Sequence[int], scales: Sequence[float], ranks: Sequence[int]
) -> LoraLayout:
    """The layout of a projection with these output blocks; rank 0 marks a block without LoRA."""
    return _cached_layout(
        int(in_features),
        tuple(int(s) for s in out_sizes),
        tuple(float(s) for s in scales),
        tuple(int(r) for r in ranks),
    )


def _check(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor | None,
    lora_bs: Sequence[torch.Tensor | None],
    out_sizes: Sequence[int],
    scales: Sequence[float],
) -> None:
    if len(lora_bs) != len(out_sizes) or len(scales) != len(out_sizes):
        raise KernelError(
            f"lora_projection needs one B (or None) and one scale per output block: got {len(lora_bs)} B, "
            f"{len(scales)} scales for {len(out_sizes)} blocks."
        )
    if sum(out_sizes) != weight.shape[0] or x.shape[-1] != weight.shape[1]:
        raise KernelError(
            f"lora_projection: weight {list(weight.shape)} does not fit input width {x.shape[-1]} and "
            f"output blocks {list(out_sizes)}."
        )
    rank = sum(b.shape[1] for b in lora_bs if b is not None)
    if rank and (lora_a is None or lora_a.shape != (rank, weight.shape[1])):
        got = None if lora_a is None else list(lora_a.shape)
        raise KernelError(f"lora_projection: stacked A must be [{rank}, {weight.shape[1]}], got {got}.")
    for b, size in zip(lora_bs, out_sizes):
        if b is not None and b.shape[0] != size:
            raise KernelError(f"lora_projection: a B of shape {list(b.shape)} for an output block of {size}.")


def _is_dense(weight) -> bool:
    return isinstance(weight, torch.Tensor)


def _base_linear(x2: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    if _is_dense(weight):
        return F.linear(x2, weight, bias)
    y = weight.linear(x2)
    return y if bias is None else y.add_(bias)


def _base_grad_input(dy2: torch.Tensor, weight) -> torch.Tensor:
    return torch.mm(dy2, weight) if _is_dense(weight) else weight.grad_input(dy2)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., n] as [T, n]: the tensor itself when it is 2-D already (a view op costs host time too)."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _split(t: torch.Tensor, sizes: tuple[int, ...]) -> Sequence[torch.Tensor]:
    """Column blocks of a [T, sum(sizes)] tensor: one call for all of them, not one slice each."""
    return (t,) if len(sizes) == 1 else t.split_with_sizes(sizes, 1)


def cast_factors(tensors: Sequence[torch.Tensor | None], dtypes: Sequence[torch.dtype]) -> list:
    """Each tensor in its dtype (None stays None; one already in it is returned as is). The casts run
    as one multi-tensor copy: one kernel on CUDA for a whole layer's LoRA factors, where casting each
    one cost a launch (and ~15-25 us of host time) per factor per pass, ~1,000 per 8B QLoRA step
    (benchmarks/NOTES.md, session 6). Rounding is that of `Tensor.to`: the same values."""
    out = list(tensors)
    todo = [i for i, (t, d) in enumerate(zip(out, dtypes)) if t is not None and t.dtype != d]
    if todo:
        dst = [torch.empty(out[i].shape, dtype=dtypes[i], device=out[i].device) for i in todo]
        with torch.no_grad():
            torch._foreach_copy_(dst, [out[i] for i in todo])
        for i, t in zip(todo, dst):
            out[i] = t
    return out


def with_cast_factors(parts: Sequence[tuple], dtypes: Sequence[torch.dtype]) -> list[tuple]:
    """`lora_parts()` tuples of several projections with each one's A and Bs in its dtype (the dtype
    of the activations that projection computes in), all cast by one `cast_factors`. The tuples keep
    their weight, bias, layout and dropout; gradients still go to (and take the dtype of) the
    original factors, which callers keep."""
    flat, flat_dtypes = [], []
    for (_, _, a, bs, _, _), dtype in zip(parts, dtypes):
        flat += [a, *bs]
        flat_dtypes += [dtype] * (1 + len(bs))
    cast = iter(cast_factors(flat, flat_dtypes))
    return [(w, b, next(cast), tuple(next(cast) for _ in bs), layout, dropout)
            for w, b, _, bs, layout, dropout in parts]  # fmt: skip


def lora_branch_inputs(x_lora2: torch.Tensor, lora_a, layout: LoraLayout, lora_bs):
    """(A, x A^T, [B_i]) in x's dtype for the LoRA branch of [T, in] rows (None, None, () without LoRA)."""
    if not layout.blocks:
        return None, None, ()
    # LoRA weights may be kept in float32 (as PEFT keeps them) while the activations are 16-bit:
    # the small factors are cast per call so every GEMM runs in the activation dtype.
    dtype = x_lora2.dtype
    a = _cast(lora_a, dtype)
    return a, torch.mm(x_lora2, a.t()), [_cast(b, dtype) for b in lora_bs]


def fold_width(weight, layout: LoraLayout, rows: int) -> int:
    """R, the summed LoRA ranks, where the projection's forward folds its LoRA up-projection into the
    base GEMM (`_folded_forward`), else 0. It folds where the weight is dequantized into scratch rows
    per call anyway (a 4-bit weight with `linear_folded`, outside the few-row decoding kernel) and R
    keeps the GEMM's rows 16-byte aligned in 16-bit (a multiple of 8: r = 8, 16, 32, ... do)."""
    if _is_dense(weight) or not layout.blocks or not hasattr(weight, "linear_folded"):
        return 0
    r = sum(layout.lora_ranks)
    return r if r % 8 == 0 and weight.folds(rows) else 0


def folded_input(parts: tuple, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """A [rows, in + R] buffer for the producer of a folded projection's input (`fold_width`; parts are
    its `lora_parts()`) to write x into the first `in` columns of, then pass as `_fused_forward`'s wide:
    x A^T then lands in the rest without a copy of x. None where the projection does not fold."""
    weight, layout = parts[0], parts[4]
    width = fold_width(weight, layout, rows)
    return torch.empty(rows, layout.in_features + width, dtype=dtype, device=device) if width else None


def lora_columns(layout: LoraLayout, bs: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """[out, R]: each LoRA block's s_i B_i in its rows and its rank's columns, zeros elsewhere (the
    block-diagonal right half of the folded weight [W | cols])."""
    if len(layout.out_sizes) == 1:
        (_, scale), b = layout.blocks[0], _cast(bs[0], dtype)
        return b if scale == 1.0 else b * scale
    cols = torch.zeros(layout.out_features, sum(layout.lora_ranks), dtype=dtype, device=bs[0].device)
    row_blocks = cols.split_with_sizes(layout.out_sizes, 0)
    col = 0
    for (i, scale), b, r in zip(layout.blocks, bs, layout.lora_ranks):
        torch.mul(b, scale, out=row_blocks[i][:, col : col + r])
        col += r
    return cols


def _folded_forward(x2, x_lora2, weight, bias, lora_a, layout: LoraLayout, lora_bs, wide, out=None):
    """`_fused_forward` as one GEMM: y = [x | x_lora A^T] @ [W | blockdiag(s_i B_i)]^T (+ b).

    Where the LoRA term is added to the base GEMM's output by an addmm of K = r per block, that pass
    reads and writes the whole output once more at a fraction of the memory bandwidth: ~200 us per
    gate or up projection at Llama-3.1-8B and 4,096 tokens on an H100, the GEMM itself ~600 us
    (benchmarks/results/h100-2026-11-24-s7/lora_fold_micro.md). Folded, the LoRA term costs R more
    columns of K. wide: the caller's [T, in + R] buffer whose first `in` columns are x2 (the producer
    of x wrote it there); x A^T goes into its last R columns. Without it x2 and x A^T are
    concatenated here, which costs a copy of x (cheaper than the pass over the output when out > in)
    and gives the same GEMM, hence the same result, as the caller's buffer would."""
    dtype = x2.dtype
    a = _cast(lora_a, dtype)
    bs = [_cast(b, dtype) for b in lora_bs]
    fan_in = x2.shape[1]
    if wide is not None and (
        wide.data_ptr() != x2.data_ptr() or wide.stride(0) != x2.stride(0) or wide.shape[1] != fan_in + a.shape[0]
    ):
        raise KernelError(
            f"a folded LoRA projection's input buffer must be [T, {fan_in} + {a.shape[0]}] with x in its first "
            f"columns; got {list(wide.shape)} for x {list(x2.shape)} (row strides {wide.stride(0)}, {x2.stride(0)})."
        )
    xa = torch.mm(x_lora2, a.t(), out=None if wide is None else wide[:, fan_in:])
    if wide is None:
        wide = torch.cat((x2, xa), 1)
    y = weight.linear_folded(wide, lora_columns(layout, bs, dtype), out=out)
    if bias is not None:
        y.add_(bias)
    return y, a, xa, bs


def _fused_forward(x, x_lora, weight, bias, lora_a, layout: LoraLayout, lora_bs, wide=None, out=None):
    """y (as [T, out]), the cast A, x A^T and the cast Bs: the forward of `LoraProjectionFunction`.
    wide: see `_folded_forward` (only read where the projection folds, `fold_width`). out: a [T, out]
    tensor y is written into (a CUDA graph's static buffer): by the GEMM itself where it folds, else
    copied at the end."""
    x2 = _rows(x)
    # A wide buffer comes from `folded_input`, which decided on folding already (it is checked below).
    if wide is not None or fold_width(weight, layout, x2.shape[0]):
        return _folded_forward(
            x2, x2 if x_lora is None else _rows(x_lora), weight, bias, lora_a, layout, lora_bs, wide, out
        )
    if out is not None:
        y, a, xa, bs = _fused_forward(x, x_lora, weight, bias, lora_a, layout, lora_bs)
        return out.copy_(y), a, xa, bs
    y = _base_linear(x2, weight, bias)
    blocks = layout.blocks
    if not blocks:
        return y, None, None, ()
    a, xa, bs = lora_branch_inputs(x2 if x_lora is None else _rows(x_lora), lora_a, layout, lora_bs)
    ys = _split(y, layout.out_sizes)
    xas = (xa,) if len(blocks) == 1 else xa.split_with_sizes(layout.lora_ranks, 1)
    for (i, scale), xa_j, b in zip(blocks, xas, bs):
        ys[i].addmm_(xa_j, b.t(), alpha=scale)
    return y, a, xa, bs


def _out_shape(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[1])


class LoraProjectionFunction(torch.autograd.Function):
    """Forward and hand-written backward of the fused LoRA projection (see the module docstring).

    Inputs: x, x_lora (None: x itself), weight, bias, stacked A, the `LoraLayout`, then one B per
    block that has LoRA, in block order. Gradients are computed only for inputs that require them:
    a frozen base weight never gets a buffer.
    """

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_a, layout, *lora_bs):
        y, a, xa, bs = _fused_forward(x, x_lora, weight, bias, lora_a, layout, lora_bs)
        dense = _is_dense(weight)
        ctx.quantized_weight = None if dense else weight
        ctx.save_for_backward(x, x_lora, weight if dense else None, a, xa, *bs)
        ctx.layout = layout
        ctx.has_bias = bias is not None
        ctx.lora_a_dtype = None if lora_a is None else lora_a.dtype
        ctx.lora_b_dtypes = [b.dtype for b in lora_bs]
        return _out_shape(y, x)

    @staticmethod
    def backward(ctx, dy):
        x, x_lora, weight, a, xa, *bs = ctx.saved_tensors
        if ctx.quantized_weight is not None:
            weight = ctx.quantized_weight
        need = ctx.needs_input_grad
        layout = ctx.layout
        dy2 = _rows(dy)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()

        dx = dx_lora = dw = db = None
        dyb, da, dbs = lora_factor_grads(
            dy2, x if x_lora is None else x_lora, xa, a, bs, layout,
            ctx.lora_a_dtype if need[4] else None,
            [t if need[6 + j] else None for j, t in enumerate(ctx.lora_b_dtypes)],
        )  # fmt: skip
        if need[0]:
            dx = lora_input_grad(dy2, weight, dyb if x_lora is None else None, a)
            if x.dim() != 2:
                dx = dx.view(x.shape)
        if need[1] and dyb is not None:
            dx_lora = torch.mm(dyb, a).view(x.shape)
        if need[2]:
            dw = torch.mm(dy2.t(), _rows(x))
        if ctx.has_bias and need[3]:
            db = dy2.sum(0)
        return (dx, dx_lora, dw, db, da, None, *dbs)


def lora_factor_grads(
    dy2: torch.Tensor,
    x_lora: torch.Tensor,
    xa: torch.Tensor | None,
    a: torch.Tensor | None,
    bs: Sequence[torch.Tensor],
    layout: LoraLayout,
    a_dtype: torch.dtype | None,
    b_dtypes: Sequence[torch.dtype | None],
) -> tuple[torch.Tensor | None, torch.Tensor | None, list[torch.Tensor | None]]:
    """The LoRA half of the projection's backward: (dyb = [s_i dy_i B_i]_i, dA, [dB_i]).

    dy2 [T, out] contiguous; x_lora the LoRA branch's input; xa = x_lora A^T and a, bs the factors in
    the activation dtype (as the forward made them). a_dtype / b_dtypes: the dtype each gradient is
    returned in, None where that gradient is not wanted. Runs before `lora_input_grad`, so a caller
    that owns x_lora can free it before the input gradient's buffer is allocated."""
    dbs: list[torch.Tensor | None] = [None] * len(bs)
    if not layout.blocks:
        return None, None, dbs
    dyb = torch.empty(dy2.shape[0], a.shape[0], dtype=dy2.dtype, device=dy2.device)
    dys = _split(dy2, layout.out_sizes)
    several = len(bs) > 1
    dybs = dyb.split_with_sizes(layout.lora_ranks, 1) if several else (dyb,)
    xas = xa.split_with_sizes(layout.lora_ranks, 1) if several else (xa,)
    for j, ((i, scale), b, dyb_j, xa_j) in enumerate(zip(layout.blocks, bs, dybs, xas)):
        dy_i = dys[i]
        dyb_j.addmm_(dy_i, b, beta=0, alpha=scale)
        if b_dtypes[j] is not None:
            db_j = torch.empty(b.shape, dtype=dy2.dtype, device=dy2.device)
            db_j.addmm_(dy_i.t(), xa_j, beta=0, alpha=scale)
            dbs[j] = _cast(db_j, b_dtypes[j])
    da = None
    if a_dtype is not None:
        da = _cast(torch.mm(dyb.t(), _rows(x_lora)), a_dtype)
    return dyb, da, dbs


def lora_input_grad(
    dy2: torch.Tensor, weight, dyb: torch.Tensor | None, a: torch.Tensor | None
) -> torch.Tensor:
    """dy W (+ dyb A when the LoRA branch reads the same input), as [T, in]."""
    dx = _base_grad_input(dy2, weight)
    if dyb is not None:
        dx.addmm_(dyb, a)  # the LoRA path accumulates into the base path's buffer
    return dx


def _reference(x, weight, bias, lora_a, lora_bs, layout: LoraLayout, x_lora):
    x2 = _rows(x)
    y = F.linear(x2, weight, bias)
    blocks = layout.blocks
    if blocks:
        dtype = x.dtype
        xa = F.linear(x2 if x_lora is None else _rows(x_lora), _cast(lora_a, dtype))
        xas = (xa,) if len(blocks) == 1 else xa.split_with_sizes(layout.lora_ranks, 1)
        parts = list(_split(y, layout.out_sizes))
        for (i, scale), xa_j, b in zip(blocks, xas, lora_bs):
            # y_i + s_i * xa_i B_i^T in one op (not matmul, mul, add: three launches).
            parts[i] = torch.addmm(parts[i], xa_j, _cast(b, dtype).t(), alpha=scale)
        y = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[1])


def lora_projection_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor | None,
    lora_bs: Sequence[torch.Tensor | None],
    out_sizes: Sequence[int],
    scales: Sequence[float],
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-autograd reference: y = x W^T + b, each block plus s_i * (x_lora A_i^T) B_i^T."""
    ranks = [0 if b is None else b.shape[1] for b in lora_bs]
    layout = lora_layout(x.shape[-1], out_sizes, scales, ranks)
    return _reference(x, weight, bias, lora_a, [b for b in lora_bs if b is not None], layout, x_lora)


def lora_projection(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor | None,
    lora_bs: Sequence[torch.Tensor | None],
    out_sizes: Sequence[int],
    scales: Sequence[float],
    *,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """The fused LoRA projection of a (possibly multi-block) weight.

    Args:
        x: [..., in] input.
        weight: [sum(out_sizes), in] base weight; frozen or trained (full fine-tuning).
        bias: [sum(out_sizes)] or None.
        lora_a: [sum of the ranks of the blocks with LoRA, in], the A_i stacked in block order.
        lora_bs: per output block, B_i [out_i, r_i], or None for a block without LoRA.
        out_sizes: the output width of each block.
        scales: per block, the LoRA scale (alpha / r, or alpha / sqrt(r) with rsLoRA).
        dropout: LoRA dropout probability, applied (in training only) to the LoRA branch's input.
    """
    _check(x, weight, lora_a, lora_bs, out_sizes, scales)
    layout = lora_layout(
        weight.shape[1], out_sizes, scales, [0 if b is None else b.shape[1] for b in lora_bs]
    )
    present = [b for b in lora_bs if b is not None]
    return lora_project(x, weight, bias, lora_a, present, layout, dropout=dropout, training=training)


def lora_project(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor | None,
    lora_bs: Sequence[torch.Tensor],
    layout: LoraLayout,
    *,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """`lora_projection` with the block layout prepared once (`lora_layout`): the per-call path of
    modules that own their LoRA weights. `lora_bs` holds the B of each block that has LoRA, in block
    order; the caller guarantees the shapes fit the layout (`LoraProjection.set_lora` checks them)."""
    if x.shape[-1] != layout.in_features:
        raise KernelError(
            f"lora_projection: input width {x.shape[-1]} for a weight of width {layout.in_features}."
        )
    if len(lora_bs) != len(layout.blocks):
        raise KernelError(
            f"lora_project: {len(lora_bs)} B for a layout with {len(layout.blocks)} blocks with LoRA ({layout})."
        )
    x_lora = F.dropout(x, dropout, training=True) if dropout > 0 and training else None
    if use_triton(x, weight):
        if not torch.is_grad_enabled():
            # No graph to record (the first forward of a checkpointed layer, inference): the same
            # math without the autograd Function's bookkeeping.
            return _out_shape(_fused_forward(x, x_lora, weight, bias, lora_a, layout, lora_bs)[0], x)
        return LoraProjectionFunction.apply(x, x_lora, weight, bias, lora_a, layout, *lora_bs)
    if not _is_dense(weight):
        weight = weight.dequantize()  # the reference path works on the dense weight (autograd keeps it)
    return _reference(x, weight, bias, lora_a, lora_bs, layout, x_lora)
