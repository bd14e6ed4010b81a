"""Rotary position embedding applied to q and k (the "rotate half" convention of Llama/Transformers).

Shapes: q [B, T, Hq, D], k [B, T, Hk, D], cos/sin [B, T, R] with R <= D even (R < D is partial
rotary: dims R..D pass through). cos/sin hold cat(freqs, freqs) per position, so arbitrary
position_ids (packed sequences restarting at 0) are already folded in by the caller.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from velotune.errors import KernelError
from velotune.kernels._dispatch import use_triton


@triton.jit
def _rotate_heads(
    x_ptr,
    out_ptr,
    n_heads,
    x_head_stride,
    out_head_stride,
    c1,
    c2,
    a,
    b,
    half,
    rot,
    head_dim,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    # o1 = c1*x1 - a*x2 and o2 = c2*x2 + b*x1 over the rotated dims; dims rot..head_dim are copied.
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    dim_mask = dims < half
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)[:, None]
        head_mask = heads < n_heads
        mask = head_mask & dim_mask
        x_row = x_ptr + heads * x_head_stride
        out_row = out_ptr + heads * out_head_stride
        x1 = tl.load(x_row + dims, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + half + dims, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_row + dims, (c1 * x1 - a * x2).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_row + half + dims, (c2 * x2 + b * x1).to(out_ptr.dtype.element_ty), mask=mask)
        if BLOCK_PASS > 0:
            pass_dims = rot + tl.arange(0, BLOCK_PASS)[None, :]
            pmask = head_mask & (pass_dims < head_dim)
            xp = tl.load(x_row + pass_dims, mask=pmask, other=0.0)
            tl.store(out_row + pass_dims, xp.to(out_ptr.dtype.element_ty), mask=pmask)


# One program per token rotates all Hq heads of q and all Hk heads of k (one launch for both, cos/sin
# read once per token). With x = [x1, x2] split at half = R/2 and cos = [c1, c2], sin = [s1, s2]:
#   forward:  o1 = c1*x1 - s1*x2,  o2 = c2*x2 + s2*x1           (x*cos + rotate_half(x)*sin)
#   backward: d1 = c1*g1 + s2*g2,  d2 = c2*g2 - s1*g1           (the transpose: rotation by -sin)
# Dims R..D are copied unchanged (their gradient passes through too).
# Floor: read q, k (B*T*(Hq+Hk)*D) and cos, sin (2*B*T*R); write the same q/k volume.
# Saves for backward: cos and sin only (the rotation is linear in q and k).
@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    cos_ptr,
    sin_ptr,
    seq_len,
    n_q_heads,
    n_k_heads,
    head_dim,
    half,
    q_batch_stride,
    q_seq_stride,
    q_head_stride,
    k_batch_stride,
    k_seq_stride,
    k_head_stride,
    qo_batch_stride,
    qo_seq_stride,
    qo_head_stride,
    ko_batch_stride,
    ko_seq_stride,
    ko_head_stride,
    cs_batch_stride,
    cs_seq_stride,
    BACKWARD: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    bi = pid // seq_len
    ti = pid % seq_len
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    dim_mask = dims < half
    cs_off = bi * cs_batch_stride + ti * cs_seq_stride
    c1 = tl.load(cos_ptr + cs_off + dims, mask=dim_mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + cs_off + half + dims, mask=dim_mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + cs_off + dims, mask=dim_mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + cs_off + half + dims, mask=dim_mask, other=0.0).to(tl.float32)
    if BACKWARD:
        a = -s2
        b = -s1
    else:
        a = s1
        b = s2
    rot = 2 * half
    _rotate_heads(
        q_ptr + bi * q_batch_stride + ti * q_seq_stride,
        q_out_ptr + bi * qo_batch_stride + ti * qo_seq_stride,
        n_q_heads,
        q_head_stride,
        qo_head_stride,
        c1,
        c2,
        a,
        b,
        half,
        rot,
        head_dim,
        BLOCK_HQ,
        BLOCK_HALF,
        BLOCK_PASS,
    )
    _rotate_heads(
        k_ptr + bi * k_batch_stride + ti * k_seq_stride,
        k_out_ptr + bi * ko_batch_stride + ti * ko_seq_stride,
        n_k_heads,
        k_head_stride,
        ko_head_stride,
        c1,
        c2,
        a,
        b,
        half,
        rot,
        head_dim,
        BLOCK_HK,
        BLOCK_HALF,
        BLOCK_PASS,
    )


def _head_block(n_heads: int, block_half: int) -> int:
    # Keep a head-chunk tile near 2K elements per half so that large head counts loop instead of spilling.
    return max(1, min(triton.next_power_of_2(max(n_heads, 1)), max(1, 2048 // block_half)))


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # Any batch/seq/head strides are handled in the kernel (q and k are often views of a fused qkv
    # output); only the last dimension must be dense.
    return t if t.stride(-1) == 1 else t.contiguous()


def rope_launch(
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_dtype: torch.dtype | None = None,
    k_dtype: torch.dtype | None = None,
    backward: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Rotates q and k (either may be None) in one launch into new contiguous tensors.

    `q_dtype`/`k_dtype` choose the output dtypes (default: the input's). `backward=True` applies the
    transposed rotation (the gradient of the forward rotation).
    """
    ref = q if q is not None else k
    bsz, seq_len, _, head_dim = ref.shape
    rot = cos.shape[-1]
    cos = _last_dim_contiguous(cos.expand(bsz, seq_len, rot))
    sin = _last_dim_contiguous(sin.expand(bsz, seq_len, rot))
    if sin.stride() != cos.stride():
        sin = sin.contiguous()
        cos = cos.contiguous()
    outs = []
    for x, dtype in ((q, q_dtype), (k, k_dtype)):
        if x is None:
            outs.append((None, None))
            continue
        x = _last_dim_contiguous(x)
        outs.append((x, torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device)))
    (q, q_out), (k, k_out) = outs
    # An absent tensor is given zero heads, so its loop never runs; its pointers are then never read.
    q_args = (q, q_out, q.shape[2]) if q is not None else (k, k_out, 0)
    k_args = (k, k_out, k.shape[2]) if k is not None else (q, q_out, 0)
    half = rot // 2
    block_half = triton.next_power_of_2(max(half, 1))
    pass_dim = head_dim - rot
    block_pass = triton.next_power_of_2(pass_dim) if pass_dim > 0 else 0
    if bsz * seq_len > 0:
        _rope_kernel[(bsz * seq_len,)](
            q_args[0],
            k_args[0],
            q_args[1],
            k_args[1],
            cos,
            sin,
            seq_len,
            q_args[2],
            k_args[2],
            head_dim,
            half,
            *q_args[0].stride()[:3],
            *k_args[0].stride()[:3],
            *q_args[1].stride()[:3],
            *k_args[1].stride()[:3],
            cos.stride(0),
            cos.stride(1),
            BACKWARD=backward,
            BLOCK_HQ=_head_block(q_args[2], block_half),
            BLOCK_HK=_head_block(k_args[2], block_half),
            BLOCK_HALF=block_half,
            BLOCK_PASS=block_pass,
            num_warps=4,
        )
    return q_out, k_out


def _check_shapes(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise KernelError(
            f"apply_rotary expects q [B, T, Hq, D] and k [B, T, Hk, D] with the same B, T, D; got "
            f"{tuple(q.shape)} and {tuple(k.shape)}."
        )
    rot = cos.shape[-1]
    if cos.shape != sin.shape or rot % 2 or rot > q.shape[-1] or cos.dim() != 3:
        raise KernelError(
            f"apply_rotary expects cos and sin of one shape [B, T, R] with R even and <= head_dim "
            f"{q.shape[-1]}; got {tuple(cos.shape)} and {tuple(sin.shape)}."
        )


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        _check_shapes(q, k, cos, sin)
        # Same result dtypes as the reference's `q * cos` and `k * cos`.
        q_out, k_out = rope_launch(
            q, k, cos, sin, torch.promote_types(q.dtype, cos.dtype), torch.promote_types(k.dtype, cos.dtype)
        )
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = (q.dtype, k.dtype)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out: torch.Tensor | None, dk_out: torch.Tensor | None):
        cos, sin = ctx.saved_tensors
        # An output that got no gradient, or an input that needs none, is left out of the launch.
        dq_out = dq_out if ctx.needs_input_grad[0] else None
        dk_out = dk_out if ctx.needs_input_grad[1] else None
        if dq_out is None and dk_out is None:
            return None, None, None, None
        dq, dk = rope_launch(dq_out, dk_out, cos, sin, *ctx.dtypes, backward=True)
        return dq, dk, None, None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    rot = cos.shape[-1]
    cos = cos.unsqueeze(2)
    sin = sin.unsqueeze(2)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        if rot == x.shape[-1]:
            return x * cos + _rotate_half(x) * sin
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)

    return rotate(q), rotate(k)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by the per-position angles in cos/sin (already in q's dtype).

    The Triton path returns new contiguous tensors (q and k may be strided views of a fused qkv
    output) and treats cos/sin as constants; if they require grad, the reference path runs so that
    their gradient is not silently dropped.
    """
    if use_triton(q, k, cos, sin) and not (cos.requires_grad or sin.requires_grad):
        return RotaryFunction.apply(q, k, cos, sin)
    return apply_rotary_reference(q, k, cos, sin)
