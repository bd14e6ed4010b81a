"""Gated MLP activations: SwiGLU (silu(gate) * up) and GeGLU with tanh-approximated GELU.

Input is the fused gate/up projection output [..., 2 * I] with gate in the first half and up in
the second (the layout of a fused gate_up weight, Phi-3's checkpoint layout too); output [..., I].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from velotune.errors import KernelError
from velotune.kernels._dispatch import use_triton

ACTIVATIONS = ("silu", "gelu_tanh")

# Globals read inside @triton.jit must be constexpr.
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_KAPPA = tl.constexpr(0.044715)


@triton.jit
def _sigmoid(x):
    # exp overflowing to inf for very negative x gives exactly 0, which is the right limit.
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _act_and_grad(gate, GELU: tl.constexpr, NEED_GRAD: tl.constexpr):
    """act(gate) and, when NEED_GRAD, act'(gate); float32 in and out."""
    if GELU:
        # tanh-approximated GELU: 0.5*g*(1 + tanh(u)), u = sqrt(2/pi)*(g + kappa*g^3). With
        # s = sigmoid(2u): 1 + tanh(u) = 2s and 1 - tanh(u) = 2(1 - s), which stay accurate in the
        # tails where 1 + tanh(u) would cancel.
        g2 = gate * gate
        u = _SQRT_2_OVER_PI * (gate + _GELU_KAPPA * g2 * gate)
        s = _sigmoid(2.0 * u)
        act = gate * s
        if NEED_GRAD:
            one_plus_t = 2.0 * s
            one_minus_t = 2.0 - one_plus_t
            grad = 0.5 * one_plus_t + 0.5 * gate * one_minus_t * one_plus_t * _SQRT_2_OVER_PI * (
                1.0 + 3.0 * _GELU_KAPPA * g2
            )
        else:
            grad = act
    else:
        s = _sigmoid(gate)
        act = gate * s
        if NEED_GRAD:
            grad = s * (1.0 + gate * (1.0 - s))
        else:
            grad = act
    return act, grad


# y = act(gate) * up for gate_up = [gate | up] along the last dim; one program per (row, column block).
# Rounding follows the reference: act(gate) is rounded to the input dtype before the multiply by up.
# Floor: read gate_up (M*2I), write y (M*I).
# Saves for backward: gate_up only (act and act' are recomputed).
@triton.jit
def _gated_fwd_kernel(
    gu_ptr,
    y_ptr,
    inter,
    gu_row_stride,
    y_row_stride,
    GELU: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gu_row = gu_ptr + row * gu_row_stride
    gate = tl.load(gu_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_row + inter + cols, mask=mask, other=0.0).to(tl.float32)
    act, _ = _act_and_grad(gate, GELU, False)
    act = act.to(gu_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * y_row_stride + cols, (act * up).to(y_ptr.dtype.element_ty), mask=mask)


# d_up = dy * act(gate);  d_gate = round(dy * up) * act'(gate)   (written into one [M, 2I] gradient)
# Floor: read gate_up (M*2I) and dy (M*I), write d_gate_up (M*2I), over gate_up's storage in training.
@triton.jit
def _gated_bwd_kernel(
    dy_ptr,
    gu_ptr,
    dgu_ptr,
    inter,
    dy_row_stride,
    gu_row_stride,
    dgu_row_stride,
    GELU: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gu_row = gu_ptr + row * gu_row_stride
    gate = tl.load(gu_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_row + inter + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    act, act_grad = _act_and_grad(gate, GELU, True)
    act = act.to(gu_ptr.dtype.element_ty).to(tl.float32)
    d_act = (dy * up).to(gu_ptr.dtype.element_ty).to(tl.float32)
    dgu_row = dgu_ptr + row * dgu_row_stride
    tl.store(dgu_row + cols, (d_act * act_grad).to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(dgu_row + inter + cols, (dy * act).to(dgu_ptr.dtype.element_ty), mask=mask)


def _block(inter: int) -> int:
    return min(1024, triton.next_power_of_2(max(inter, 1)))


def _as_rows(t: torch.Tensor, width: int) -> torch.Tensor:
    rows = t.reshape(-1, width)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _check(gate_up: torch.Tensor, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise KernelError(f"unknown gated activation {activation!r}; expected one of {ACTIVATIONS}")
    if gate_up.shape[-1] % 2:
        raise KernelError(
            f"gated_activation expects the fused [..., 2 * I] gate/up output; last dim {gate_up.shape[-1]} is odd."
        )


def gated_activation_forward(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """Triton forward: act(gate) * up, shape [..., I], in gate_up's dtype."""
    _check(gate_up, activation)
    inter = gate_up.shape[-1] // 2
    gu = _as_rows(gate_up, 2 * inter)
    y = torch.empty((gu.shape[0], inter), dtype=gate_up.dtype, device=gate_up.device)
    if y.numel() > 0:
        block = _block(inter)
        _gated_fwd_kernel[(gu.shape[0], triton.cdiv(inter, block))](
            gu, y, inter, gu.stride(0), y.stride(0), GELU=activation == "gelu_tanh", BLOCK=block, num_warps=4
        )
    return y.view(*gate_up.shape[:-1], inter)


def gated_activation_backward(
    dy: torch.Tensor, gate_up: torch.Tensor, activation: str, in_place: bool = False
) -> torch.Tensor:
    """Triton backward: d(gate_up) [..., 2I] from dy [..., I] and the saved gate_up.

    in_place=True writes the gradient over gate_up's storage (each program reads its elements
    before it overwrites them): no second [tokens, 2I] buffer, the largest one of an MLP backward.
    """
    inter = gate_up.shape[-1] // 2
    gu = _as_rows(gate_up, 2 * inter)
    dy2 = _as_rows(dy, inter)
    dgu = gu if in_place else torch.empty(gu.shape, dtype=gate_up.dtype, device=gate_up.device)
    if dgu.numel() > 0:
        block = _block(inter)
        _gated_bwd_kernel[(gu.shape[0], triton.cdiv(inter, block))](
            dy2,
            gu,
            dgu,
            inter,
            dy2.stride(0),
            gu.stride(0),
            dgu.stride(0),
            GELU=activation == "gelu_tanh",
            BLOCK=block,
            num_warps=4,
        )
    return dgu.view(gate_up.shape)


class GatedActivationFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, activation: str) -> torch.Tensor:
        y = gated_activation_forward(gate_up, activation)
        ctx.save_for_backward(gate_up)
        ctx.activation = activation
        # A leaf is the caller's own tensor: never overwrite it.
        ctx.in_place = gate_up.grad_fn is not None
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        # gate_up is the projection's output, saved for this op alone: its gradient takes its place. The
        # version bump makes a second backward through a retained graph fail loudly instead of reading
        # the overwritten values.
        dgu = gated_activation_backward(dy, gate_up, ctx.activation, in_place=ctx.in_place)
        if ctx.in_place:
            torch.autograd.graph.increment_version(gate_up)
        return dgu, None


def gated_activation_reference(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    raise KernelError(f"unknown gated activation {activation!r}; expected one of {ACTIVATIONS}")


def gated_activation(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up for the fused [..., 2I] projection output."""
    if use_triton(gate_up):
        return GatedActivationFunction.apply(gate_up, activation)
    return gated_activation_reference(gate_up, activation)
