"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * (offset + w).

offset 0 is Llama's form, offset 1 Gemma's `(1 + w)` form.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from velotune.errors import KernelError
from velotune.kernels._dispatch import use_triton

MAX_HIDDEN = 16384


# Forward, one row per program, the whole row in registers (BLOCK >= hidden).
#   y = round(x * rstd) * w          (offset == 0: Transformers rounds the normalised row to x's dtype
#                                     before the weight multiply, and so do we)
#   y = x * rstd * (offset + w)      (offset != 0: all float32, one rounding at the end)
# Floor: read x (N*H) and w (H), write y (N*H) and rstd (N float32).
# Saves for backward: x (the caller's tensor, no copy) and rstd [N] float32.
@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    rstd_ptr,
    x_row_stride,
    y_row_stride,
    hidden,
    eps,
    offset,
    GEMMA_FORM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / hidden + eps)
    tl.store(rstd_ptr + row, rstd)
    normed = x * rstd
    if GEMMA_FORM:
        y = normed * (offset + w)
    else:
        y = normed.to(x_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(y_ptr + row * y_row_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


# Backward with a frozen weight: one row per program, like the forward (no reduction across rows).
#   n = x * rstd,  g = dy * (offset + w),  dx = rstd * (g - n * mean(g * n))
# Kept apart from the dW kernel below: without the row loop and the dW accumulator it compiles to
# about as many registers as the forward (hidden 4096, 8 warps, sm_90, Triton 3.6: 64, where the
# shared loop kernel took 93), so 4 programs (rows in flight) fit on an SM instead of 2.
# Floor: read x and dy (2*N*H), w (H), rstd (N); write dx (N*H).
@triton.jit
def _rms_norm_bwd_dx_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dy_row_stride,
    x_row_stride,
    dx_row_stride,
    hidden,
    offset,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
    rstd = tl.load(rstd_ptr + row)
    normed = x * rstd
    g = dy * w
    dx = rstd * (g - normed * (tl.sum(g * normed, axis=0) / hidden))
    tl.store(dx_ptr + row * dx_row_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# Backward with dW: a contiguous chunk of rows per program, so that dW is accumulated in registers
# over the chunk and written once per program (no second pass over x, no atomics):
#   dx = rstd*g - x * rstd^3 * mean(g * x)  (the same dx; only x and dy stay live across the
#                                             reduction: 112 registers instead of 146, Triton 3.6,
#                                             hidden 4096, 8 warps, so 2 programs fit per SM, not 1)
#   dW_partial[pid] = sum_rows dy * n       (n rounded to x's dtype in the Llama form: the forward
#                                             multiplied the weight by the rounded row)
# The launcher gives it several programs per SM (see DW_PROGRAMS_PER_SM); one program per SM
# walking ~60 rows one after another left HBM idle during every row's reduction.
# Floor: read x and dy (2*N*H), w (H), rstd (N); write dx (N*H) and n_programs*H float32.
@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dw_partial_ptr,
    dy_row_stride,
    x_row_stride,
    dx_row_stride,
    n_rows,
    hidden,
    rows_per_program,
    offset,
    GEMMA_FORM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
    dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
    # int64 loop bounds keep row * stride from overflowing on very large inputs.
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row64 in range(row_start, row_end):
        x = tl.load(x_ptr + row64 * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row64 * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row64)
        c = tl.sum(x * dy * w, axis=0) * (rstd * rstd * rstd / hidden)
        dx = dy * w * rstd - x * c
        tl.store(dx_ptr + row64 * dx_row_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if GEMMA_FORM:
            dw_acc += dy * (x * rstd)
        else:
            dw_acc += dy * (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(dw_partial_ptr + pid.to(tl.int64) * hidden + cols, dw_acc, mask=mask)


def _num_warps(block: int) -> int:
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Programs per SM for the backward with dW, at hidden >= 2048. At hidden 4096 two programs of the dW
# kernel are resident per SM; one per SM (the old launch, with a kernel that also fit only one) kept
# a single row in flight per SM (H100, 8K tokens: 0.22 ms against a 0.07 ms floor). A multiple of
# the residency keeps the waves even; the partial-dW buffer it costs (2 * 132 * 4096 * 4
# bytes = 4.3 MB at Llama-8B sizes, summed once) is small next to the 200 MB the kernel moves.
# Measured on an H100 at hidden 4096 (benchmarks/results/h100-2026-11-24/norm_rope_backward.json,
# profiler GPU time): 1/2/4/8 per SM took 0.107/0.086/0.100/0.089 ms.
DW_PROGRAMS_PER_SM = 2


def _dw_programs(x: torch.Tensor, n_rows: int) -> int:
    if not x.is_cuda:
        return max(1, min(4, n_rows))  # the interpreter: a few programs still exercise the chunk loop
    # Short rows (q/k norms over head_dim) give each program little to load per row and few warps,
    # so more programs per SM are needed to fill it; their partial rows are short too.
    block = triton.next_power_of_2(x.shape[-1])
    per_sm = min(32, DW_PROGRAMS_PER_SM * max(1, 2048 // block))
    sms = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return max(1, min(per_sm * sms, n_rows))


def _as_rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    rows = t.reshape(-1, hidden)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rms_norm_output_dtype(x: torch.Tensor, weight: torch.Tensor, offset: float) -> torch.dtype:
    # Same as the reference: the Llama form multiplies by the weight in the promoted dtype.
    return torch.promote_types(x.dtype, weight.dtype) if offset == 0.0 else x.dtype


def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: returns (y with x's shape, rstd [rows] float32). out: where y goes, [rows, hidden]
    in the output dtype with dense rows that may be spaced wider (the first columns of a buffer whose
    other columns the caller fills, as `velotune.kernels.lora`'s folded LoRA input)."""
    hidden = x.shape[-1]
    if hidden > MAX_HIDDEN:
        raise KernelError(
            f"rms_norm's Triton kernel handles hidden <= {MAX_HIDDEN}, got {hidden}; "
            "set VELOTUNE_KERNELS=reference for this model."
        )
    if weight.shape != (hidden,):
        raise KernelError(f"rms_norm weight has shape {tuple(weight.shape)}, expected ({hidden},).")
    x2 = _as_rows(x, hidden)
    n_rows = x2.shape[0]
    dtype = rms_norm_output_dtype(x, weight, offset)
    if out is None:
        y = torch.empty((n_rows, hidden), dtype=dtype, device=x.device)
    elif out.shape != (n_rows, hidden) or out.stride(1) != 1 or out.dtype != dtype or out.device != x.device:
        raise KernelError(
            f"rms_norm_forward: out must be [{n_rows}, {hidden}] {dtype} on {x.device} with dense rows, got "
            f"{list(out.shape)} {out.dtype} with strides {list(out.stride())}."
        )
    else:
        y = out
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
    if n_rows > 0:
        block = triton.next_power_of_2(hidden)
        _rms_norm_fwd_kernel[(n_rows,)](
            x2,
            weight.contiguous(),
            y,
            rstd,
            x2.stride(0),
            y.stride(0),
            hidden,
            eps,
            offset,
            GEMMA_FORM=offset != 0.0,
            BLOCK=block,
            num_warps=_num_warps(block),
        )
    return y.view(*x.shape[:-1], hidden), rstd


def rms_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    compute_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton backward: returns (dx in x's dtype, dweight in weight's dtype or None)."""
    hidden = x.shape[-1]
    x2 = _as_rows(x, hidden)
    dy2 = _as_rows(dy, hidden)
    n_rows = x2.shape[0]
    dx = torch.empty((n_rows, hidden), dtype=x.dtype, device=x.device)
    w = weight.contiguous()
    block = triton.next_power_of_2(hidden)
    if not compute_dw:
        if n_rows > 0:
            _rms_norm_bwd_dx_kernel[(n_rows,)](
                dy2,
                x2,
                w,
                rstd,
                dx,
                dy2.stride(0),
                x2.stride(0),
                dx.stride(0),
                hidden,
                offset,
                BLOCK=block,
                num_warps=_num_warps(block),
            )
        return dx.view(x.shape), None
    rows_per_program = triton.cdiv(n_rows, _dw_programs(x, n_rows)) if n_rows > 0 else 1
    # Rounding rows up per program can leave trailing programs without a row; they are not launched.
    n_programs = triton.cdiv(n_rows, rows_per_program)
    dw_partial = torch.empty((n_programs, hidden), dtype=torch.float32, device=x.device)
    if n_rows > 0:
        _rms_norm_bwd_kernel[(n_programs,)](
            dy2,
            x2,
            w,
            rstd,
            dx,
            dw_partial,
            dy2.stride(0),
            x2.stride(0),
            dx.stride(0),
            n_rows,
            hidden,
            rows_per_program,
            offset,
            GEMMA_FORM=offset != 0.0,
            BLOCK=block,
            num_warps=_num_warps(block),
        )
    dweight = dw_partial.sum(0).to(weight.dtype) if n_rows > 0 else torch.zeros_like(weight)
    return dx.view(x.shape), dweight


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
        y, rstd = rms_norm_forward(x, weight, eps, offset)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset = offset
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = rms_norm_backward(dy, x, weight, rstd, ctx.offset, compute_dw=ctx.needs_input_grad[1])
        return (dx if ctx.needs_input_grad[0] else None), dweight, None, None


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0
) -> torch.Tensor:
    """Plain PyTorch, in the same operation order as Transformers (so float32 results agree bitwise-close)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0:
        return weight * normed.to(x.dtype)
    return (normed * (offset + weight.float())).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dimension of `x` (any leading shape)."""
    if use_triton(x, weight):
        return RMSNormFunction.apply(x, weight, float(eps), float(offset))
    return rms_norm_reference(x, weight, eps, offset)
