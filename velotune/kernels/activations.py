"""Gated MLP activations: SwiGLU (silu(gate) * up) and GeGLU with tanh-approximated GELU.

Input is the fused gate/up projection output [..., 2 * I] with gate in the first half and up in
the second (the layout of a fused gate_up weight, Phi-3's checkpoint layout too); output [..., I].

How the kernels are launched is a `GatedConfig` (one `GatedLaunch` for the forward, one for the
backward) so that `benchmarks/kernel_sweep.py` can time alternatives without code edits; the
public function uses `DEFAULT_GATED_CONFIG`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from velotune.errors import KernelError
from velotune.kernels._dispatch import use_triton

ACTIVATIONS = ("silu", "gelu_tanh")
GRIDS = ("2d", "flat", "row")

# Globals read inside @triton.jit must be constexpr.
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_KAPPA = tl.constexpr(0.044715)


@dataclasses.dataclass(frozen=True)
class GatedLaunch:
    """Launch of one gated-activation kernel over a [rows, I] problem.

    grid: "2d"   one program per (row, column block), grid (rows, column blocks): the programs that
                 run together read the same columns of different rows;
          "flat" the same tiles on a 1D grid, column blocks of a row adjacent: programs that run
                 together read one contiguous stretch of memory;
          "row"  one program per row, looping over the row in `block`-wide steps (one step when
                 `block` >= I, Liger-Kernel's layout).
    block: columns per tile, capped at next_power_of_2(I).
    evict_first: loads tell L2 the data is not read again soon (it is not, within this kernel).
    """

    grid: str = "2d"
    block: int = 1024
    num_warps: int = 4
    evict_first: bool = False

    def __post_init__(self) -> None:
        if self.grid not in GRIDS:
            raise KernelError(f"GatedLaunch.grid={self.grid!r}: expected one of {GRIDS}.")
        if self.block < 16 or self.block & (self.block - 1):
            raise KernelError(f"GatedLaunch.block={self.block}: expected a power of two >= 16.")
        if self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise KernelError(f"GatedLaunch.num_warps={self.num_warps}: expected a power of two <= 32.")

    def label(self) -> str:
        return f"{self.grid}/b{self.block}/w{self.num_warps}" + ("/ef" if self.evict_first else "")


@dataclasses.dataclass(frozen=True)
class GatedConfig:
    forward: GatedLaunch = GatedLaunch()
    backward: GatedLaunch = GatedLaunch()


# Picked by benchmarks/kernel_sweep.py on an H100 at 8,192 x 14,336 bf16 (results/h100-2026-11-24-s4/
# kernel_sweep-*.md): SwiGLU forward + backward 0.623 ms against 0.652 ms for the 2d grid and Liger's
# 0.628 ms; GeGLU 0.624 ms against Liger's 0.674 ms. Same numbers as every other launch (bitwise in bf16).
DEFAULT_GATED_CONFIG = GatedConfig(
    forward=GatedLaunch(grid="flat", block=2048, num_warps=8),
    backward=GatedLaunch(grid="row", block=16384, num_warps=16),
)


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


@triton.jit
def _load(ptrs, mask, MASKED: tl.constexpr, EVICT_FIRST: tl.constexpr):
    # Full tiles skip the mask; literal eviction strings keep this valid on Triton 3.6 and 3.9.
    if MASKED:
        if EVICT_FIRST:
            x = tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first")
        else:
            x = tl.load(ptrs, mask=mask, other=0.0)
    else:
        if EVICT_FIRST:
            x = tl.load(ptrs, eviction_policy="evict_first")
        else:
            x = tl.load(ptrs)
    return x.to(tl.float32)


@triton.jit
def _store(ptrs, x, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptrs, x, mask=mask)
    else:
        tl.store(ptrs, x)


@triton.jit
def _fwd_tile(gu_row, y_row, inter, start, GELU: tl.constexpr, MASKED: tl.constexpr,
              EVICT_FIRST: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    cols = start + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = _load(gu_row + cols, mask, MASKED, EVICT_FIRST)
    up = _load(gu_row + inter + cols, mask, MASKED, EVICT_FIRST)
    act, _ = _act_and_grad(gate, GELU, False)
    act = act.to(gu_row.dtype.element_ty).to(tl.float32)
    _store(y_row + cols, (act * up).to(y_row.dtype.element_ty), mask, MASKED)


@triton.jit
def _bwd_tile(dy_row, gu_row, dgu_row, inter, start, GELU: tl.constexpr, MASKED: tl.constexpr,
              EVICT_FIRST: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    cols = start + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = _load(gu_row + cols, mask, MASKED, EVICT_FIRST)
    up = _load(gu_row + inter + cols, mask, MASKED, EVICT_FIRST)
    dy = _load(dy_row + cols, mask, MASKED, EVICT_FIRST)
    act, act_grad = _act_and_grad(gate, GELU, True)
    act = act.to(gu_row.dtype.element_ty).to(tl.float32)
    d_act = (dy * up).to(gu_row.dtype.element_ty).to(tl.float32)
    _store(dgu_row + cols, (d_act * act_grad).to(dgu_row.dtype.element_ty), mask, MASKED)
    _store(dgu_row + inter + cols, (dy * act).to(dgu_row.dtype.element_ty), mask, MASKED)


@triton.jit
def _tile_of_program(n_col_blocks, GRID: tl.constexpr):
    """(row, first column) of this program's tile for the "2d" (GRID 0) and "flat" (GRID 1) grids."""
    if GRID == 0:
        row = tl.program_id(0).to(tl.int64)
        block_idx = tl.program_id(1)
    else:
        pid = tl.program_id(0).to(tl.int64)
        row = pid // n_col_blocks
        block_idx = pid % n_col_blocks
    return row, block_idx


# y = act(gate) * up for gate_up = [gate | up] along the last dim, tiled as GatedLaunch says.
# Rounding follows the reference: act(gate) is rounded to the input dtype before the multiply by up.
# Floor: read gate_up (M*2I), write y (M*I).
# Saves for backward: gate_up only (act and act' are recomputed).
@triton.jit
def _gated_fwd_kernel(
    gu_ptr,
    y_ptr,
    inter,
    n_col_blocks,
    gu_row_stride,
    y_row_stride,
    GELU: tl.constexpr,
    GRID: tl.constexpr,
    EVEN: tl.constexpr,
    EVICT_FIRST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if GRID == 2:
        row = tl.program_id(0).to(tl.int64)
        gu_row = gu_ptr + row * gu_row_stride
        y_row = y_ptr + row * y_row_stride
        for start in range(0, inter, BLOCK):
            _fwd_tile(gu_row, y_row, inter, start, GELU, not EVEN, EVICT_FIRST, BLOCK)
    else:
        row, block_idx = _tile_of_program(n_col_blocks, GRID)
        _fwd_tile(gu_ptr + row * gu_row_stride, y_ptr + row * y_row_stride, inter, block_idx * BLOCK,
                  GELU, not EVEN, EVICT_FIRST, BLOCK)  # fmt: skip


# d_up = dy * act(gate);  d_gate = round(dy * up) * act'(gate)   (written into one [M, 2I] gradient)
# Each tile reads all of its inputs before it writes, so dgu may be gu itself (in place).
# Floor: read gate_up (M*2I) and dy (M*I), write d_gate_up (M*2I), over gate_up's storage in training.
@triton.jit
def _gated_bwd_kernel(
    dy_ptr,
    gu_ptr,
    dgu_ptr,
    inter,
    n_col_blocks,
    dy_row_stride,
    gu_row_stride,
    dgu_row_stride,
    GELU: tl.constexpr,
    GRID: tl.constexpr,
    EVEN: tl.constexpr,
    EVICT_FIRST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if GRID == 2:
        row = tl.program_id(0).to(tl.int64)
        dy_row = dy_ptr + row * dy_row_stride
        gu_row = gu_ptr + row * gu_row_stride
        dgu_row = dgu_ptr + row * dgu_row_stride
        for start in range(0, inter, BLOCK):
            _bwd_tile(dy_row, gu_row, dgu_row, inter, start, GELU, not EVEN, EVICT_FIRST, BLOCK)
    else:
        row, block_idx = _tile_of_program(n_col_blocks, GRID)
        _bwd_tile(dy_ptr + row * dy_row_stride, gu_ptr + row * gu_row_stride, dgu_ptr + row * dgu_row_stride,
                  inter, block_idx * BLOCK, GELU, not EVEN, EVICT_FIRST, BLOCK)  # fmt: skip


def _launch_args(rows: int, inter: int, launch: GatedLaunch) -> tuple[tuple[int, ...], int, dict]:
    """(grid, number of column blocks, constexpr keywords) of one launch."""
    block = min(launch.block, triton.next_power_of_2(max(inter, 1)))
    n_col_blocks = triton.cdiv(inter, block)
    if launch.grid == "2d":
        grid: tuple[int, ...] = (rows, n_col_blocks)
    elif launch.grid == "flat":
        grid = (rows * n_col_blocks,)
    else:
        grid = (rows,)
    if grid[0] >= 2**31 or (len(grid) > 1 and grid[1] > 65535):
        raise KernelError(
            f"gated activation grid {grid} exceeds CUDA's launch limits ({rows} rows x {inter} columns); "
            "use a larger GatedLaunch.block or split the batch."
        )
    meta = dict(
        GRID=GRIDS.index(launch.grid),
        EVEN=inter % block == 0,
        EVICT_FIRST=launch.evict_first,
        BLOCK=block,
        num_warps=launch.num_warps,
    )
    return grid, n_col_blocks, meta


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


def gated_activation_forward(
    gate_up: torch.Tensor,
    activation: str,
    config: GatedConfig = DEFAULT_GATED_CONFIG,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton forward: act(gate) * up, shape [..., I], in gate_up's dtype. out: where it goes, [rows, I]
    with dense rows that may be spaced wider (the first columns of a buffer the caller fills the rest of)."""
    _check(gate_up, activation)
    inter = gate_up.shape[-1] // 2
    gu = _as_rows(gate_up, 2 * inter)
    if out is None:
        y = torch.empty((gu.shape[0], inter), dtype=gate_up.dtype, device=gate_up.device)
    elif out.shape != (gu.shape[0], inter) or out.stride(1) != 1 or out.dtype != gate_up.dtype:
        raise KernelError(
            f"gated_activation_forward: out must be [{gu.shape[0]}, {inter}] {gate_up.dtype} with dense rows, "
            f"got {list(out.shape)} {out.dtype} with strides {list(out.stride())}."
        )
    else:
        y = out
    if y.numel() > 0:
        grid, n_col_blocks, meta = _launch_args(gu.shape[0], inter, config.forward)
        _gated_fwd_kernel[grid](
            gu, y, inter, n_col_blocks, gu.stride(0), y.stride(0), GELU=activation == "gelu_tanh", **meta
        )
    return y.view(*gate_up.shape[:-1], inter)


def gated_activation_backward(
    dy: torch.Tensor,
    gate_up: torch.Tensor,
    activation: str,
    in_place: bool = False,
    config: GatedConfig = DEFAULT_GATED_CONFIG,
) -> torch.Tensor:
    """Triton backward: d(gate_up) [..., 2I] from dy [..., I] and the saved gate_up.

    in_place=True writes the gradient over gate_up's storage (each tile reads its elements before
    it overwrites them): no second [tokens, 2I] buffer, the largest one of an MLP backward.
    """
    inter = gate_up.shape[-1] // 2
    gu = _as_rows(gate_up, 2 * inter)
    dy2 = _as_rows(dy, inter)
    dgu = gu if in_place else torch.empty(gu.shape, dtype=gate_up.dtype, device=gate_up.device)
    if dgu.numel() > 0:
        grid, n_col_blocks, meta = _launch_args(gu.shape[0], inter, config.backward)
        _gated_bwd_kernel[grid](
            dy2,
            gu,
            dgu,
            inter,
            n_col_blocks,
            dy2.stride(0),
            gu.stride(0),
            dgu.stride(0),
            GELU=activation == "gelu_tanh",
            **meta,
        )
    return dgu.view(gate_up.shape)


class GatedActivationFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, gate_up: torch.Tensor, activation: str, config: GatedConfig = DEFAULT_GATED_CONFIG
    ) -> torch.Tensor:
        y = gated_activation_forward(gate_up, activation, config)
        ctx.save_for_backward(gate_up)
        ctx.activation = activation
        ctx.config = config
        # A leaf is the caller's own tensor: never overwrite it.
        ctx.in_place = gate_up.grad_fn is not None
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        # gate_up is the projection's output, saved for this op alone: its gradient takes its place. The
        # version bump makes a second backward through a retained graph fail loudly instead of reading
        # the overwritten values.
        dgu = gated_activation_backward(dy, gate_up, ctx.activation, in_place=ctx.in_place, config=ctx.config)
        if ctx.in_place:
            torch.autograd.graph.increment_version(gate_up)
        return dgu, None, None


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
