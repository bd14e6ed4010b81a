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

The base weight may also be a quantized weight object (`velotune.quant.nf4_weight.NF4Weight`, any
object with `linear(x2)`, `grad_input(dy2)` and `dequantize()`): the Function then has it compute
x W^T and dy W itself, dequantizing into a reused scratch buffer inside each call, and keeps only
the object (never a dense copy) for backward; the reference path dequantizes it to a dense tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from velotune.errors import KernelError
from velotune.kernels._dispatch import use_triton


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


class LoraProjectionFunction(torch.autograd.Function):
    """Forward and hand-written backward of the fused LoRA projection (see the module docstring).

    Inputs: x, x_lora (None: x itself), weight, bias, stacked A, the block layout (output sizes,
    scales, which blocks have LoRA), then one B per block that has LoRA. Gradients are computed only for inputs that require them: a frozen base
    weight never gets a buffer.
    """

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_a, out_sizes, scales, has_lora, *present_bs):
        dtype = x.dtype
        present = iter(present_bs)
        lora_bs = [next(present) if flag else None for flag in has_lora]
        x2 = x.reshape(-1, x.shape[-1])
        xl2 = x2 if x_lora is None else x_lora.reshape(-1, x.shape[-1])
        y = _base_linear(x2, weight, bias)
        blocks = _lora_blocks(out_sizes, scales, lora_bs)
        a = b_list = xa = None
        if blocks:
            # LoRA weights may be kept in float32 (as PEFT keeps them) while the activations are 16-bit:
            # the small factors are cast per call so every GEMM runs in the activation dtype.
            a = lora_a.to(dtype)
            b_list = [blk[3].to(dtype) for blk in blocks]
            xa = torch.mm(xl2, a.t())
            for (out0, size, r0, _b, scale), b in zip(blocks, b_list):
                r = b.shape[1]
                y[:, out0 : out0 + size].addmm_(xa[:, r0 : r0 + r], b.t(), alpha=scale)
        ctx.quantized_weight = None if _is_dense(weight) else weight
        ctx.save_for_backward(x, x_lora, weight if _is_dense(weight) else None, a, xa, *(b_list or ()))
        ctx.layout = [(out0, size, r0, scale) for out0, size, r0, _b, scale in blocks]
        ctx.has_bias = bias is not None
        ctx.lora_a_dtype = None if lora_a is None else lora_a.dtype
        ctx.lora_b_dtypes = [blk[3].dtype for blk in blocks]
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, x_lora, weight, a, xa, *b_list = ctx.saved_tensors
        if ctx.quantized_weight is not None:
            weight = ctx.quantized_weight
        need = ctx.needs_input_grad
        width = x.shape[-1]
        x2 = x.reshape(-1, width)
        xl2 = x2 if x_lora is None else x_lora.reshape(-1, width)
        dy2 = dy.reshape(-1, weight.shape[0])
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()

        dx = dx_lora = dw = db = da = None
        dbs = [None] * len(b_list)
        dyb = None
        if ctx.layout:
            # dyb = [s_i * dy_i B_i]_i: the LoRA branch's gradient at x A^T, one slice per block.
            dyb = torch.empty(dy2.shape[0], a.shape[0], dtype=dy2.dtype, device=dy2.device)
            for j, ((out0, size, r0, scale), b) in enumerate(zip(ctx.layout, b_list)):
                r = b.shape[1]
                dy_i = dy2[:, out0 : out0 + size]
                dyb[:, r0 : r0 + r].addmm_(dy_i, b, beta=0, alpha=scale)
                if need[8 + j]:
                    db_i = torch.empty(size, r, dtype=dy2.dtype, device=dy2.device)
                    db_i.addmm_(dy_i.t(), xa[:, r0 : r0 + r], beta=0, alpha=scale)
                    dbs[j] = db_i.to(ctx.lora_b_dtypes[j])
            if need[4]:
                da = torch.mm(dyb.t(), xl2).to(ctx.lora_a_dtype)
        if need[0]:
            dx = _base_grad_input(dy2, weight)
            if dyb is not None and x_lora is None:
                dx.addmm_(dyb, a)  # the LoRA path accumulates into the base path's buffer
            dx = dx.view(x.shape)
        if need[1] and dyb is not None:
            dx_lora = torch.mm(dyb, a).view(x.shape)
        if need[2]:
            dw = torch.mm(dy2.t(), x2)
        if ctx.has_bias and need[3]:
            db = dy2.sum(0)
        return (dx, dx_lora, dw, db, da, None, None, None, *dbs)


def _lora_blocks(out_sizes, scales, lora_bs):
    """(output offset, output size, offset in A's rows, B, scale) of every block that has LoRA."""
    blocks, out0, r0 = [], 0, 0
    for size, scale, b in zip(out_sizes, scales, lora_bs):
        if b is not None:
            blocks.append((out0, size, r0, b, float(scale)))
            r0 += b.shape[1]
        out0 += size
    return blocks


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
    y = F.linear(x, weight, bias)
    blocks = _lora_blocks(out_sizes, scales, lora_bs)
    if not blocks:
        return y
    xa = F.linear(x if x_lora is None else x_lora, lora_a.to(x.dtype))
    parts = list(y.split(list(out_sizes), dim=-1))
    index = {out0: i for i, out0 in enumerate(_offsets(out_sizes))}
    for out0, _size, r0, b, scale in blocks:
        i = index[out0]
        parts[i] = parts[i] + F.linear(xa[..., r0 : r0 + b.shape[1]], b.to(x.dtype)) * scale
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


def _offsets(sizes: Sequence[int]) -> list[int]:
    out, total = [], 0
    for size in sizes:
        out.append(total)
        total += size
    return out


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
    x_lora = F.dropout(x, dropout, training=True) if dropout > 0 and training else None
    if use_triton(x, weight):
        has_lora = tuple(b is not None for b in lora_bs)
        present = [b for b in lora_bs if b is not None]
        return LoraProjectionFunction.apply(
            x, x_lora, weight, bias, lora_a, tuple(out_sizes), tuple(scales), has_lora, *present
        )
    if not _is_dense(weight):
        weight = weight.dequantize()  # the reference path works on the dense weight (autograd keeps it)
    return lora_projection_reference(x, weight, bias, lora_a, lora_bs, out_sizes, scales, x_lora)
