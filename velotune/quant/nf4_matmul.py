"""x W^T for a few rows of x (a decoding step) with W in NF4, dequantized in registers.

The dequantize-then-GEMM path (`NF4Weight.linear`) writes the weight densely into a scratch buffer and
reads it back: 0.5 + 2 + 2 bytes per element in bf16, where a step that multiplies one token per row is
bound by exactly those bytes. Here each weight element is read once, packed (half a byte, plus one scale
byte per 64-element block), and never leaves registers dense.

    y[m, n] = sum_k x[m, k] * round_dtype(code[nibble(n, k)] * absmax[block(n, k)])

The weight value is rounded to x's dtype before the product, as the dequantized weight is, and products
accumulate in float32 (a 16-bit value times a 16-bit x is exact in float32, so 16-bit results differ from
the dequantized GEMM's only by the order of the float32 sums; float32 inputs get full float32 products).

This is a forward-only op for inference: there is no autograd function and nothing is saved for backward
(a training step has thousands of rows and takes the dequantize-then-cuBLAS path; gradients go through
`NF4Weight.grad_input`).

Floor: N*K/2 bytes of codes + N*K/64 scale bytes read, M*K read and M*N written: at batch 1 about a
quarter of a bf16 GEMV's bytes, a ninth of dequantize-then-GEMM.

Why the kernel is shaped this way (a GEMV is bound by how many bytes are in flight, then by the
instructions spent per weight element):
  * no tl.dot: at M <= 16 a tensor-core tile would be mostly padding, and feeding it needs the dense
    tile in k order in the dot-operand layout (a shuffle through shared memory every step). Each program
    instead keeps an elementwise float32 accumulator [BLOCK_M, BLOCK_N, NB, HALF] (explicit FMAs; the
    kernel is built without fp contraction so that the double-quantized scale rounds twice) and reduces
    it once, at the end. BLOCK_M = next_power_of_2(M) is a compile-time size.
  * the packed bytes stay a [BLOCK_N, NB, HALF] tile (NB quantization blocks of a row per step, HALF =
    blocksize / 2 bytes each), so the per-block scale broadcasts along the last axis, and the high and
    low nibbles (elements 2j and 2j+1 of a block) multiply the even and odd elements of x, which is loaded
    contiguously and split in registers: no interleave of the weight.
  * enough programs: few rows per program, and K split over SPLIT_K programs when the rows alone give
    fewer than `programs_per_sm` programs per SM. Split programs write float32 partials [SPLIT_K, M, N]
    that a second small kernel sums in a fixed order (no atomics: results are reproducible and the
    launches can be captured in a CUDA graph).
Rows of the weight are whole quantization blocks (in_features % blocksize == 0, true of every checkpoint;
`applies` checks it).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from velotune.errors import KernelError
from velotune.quant.nf4 import NF4Tensor, dequantize_nf4_reference

ROWS_LIMIT = 16  # rows of x the kernel takes (BLOCK_M up to 16)
# Rows of x up to which NF4Weight.linear uses this kernel rather than dequantize + cuBLAS. Measured on
# an H100 as a CUDA-graph replay of Llama-3.1-8B's 224 projections of a decoding step
# (benchmarks/results/h100-2026-11-24-s4/nf4_matmul_gpu_check.json): 1 row 5.61 ms against 12.87 ms for
# dequantize + cuBLAS (and 5.74 ms for cuBLAS on the bf16 weight); 8 rows 11.70 ms against 12.87 ms;
# at 16 rows the kernel was ~3x slower than dequantize + cuBLAS per call, so 16 rows go to cuBLAS.
MAX_ROWS = 8


@dataclasses.dataclass(frozen=True)
class NF4MatmulLaunch:
    """How the product is tiled and launched (tests/quant/gpu_check_nf4_matmul.py sweeps these).

    block_n: weight rows per program (a power of two).
    block_k: weight elements of each row read per loop step, rounded down to whole quantization blocks
             (at least one): NB = max(1, block_k // blocksize). A program holds BLOCK_M * block_n *
             block_k / 2 float32 accumulators, so fewer rows of the weight per program suit more rows of x.
    programs_per_sm: K is split until the grid has at least this many programs per SM (0: never split).
    split_k: a fixed number of K splits instead (tests, sweeps); None: from programs_per_sm.
    """

    block_n: int = 8
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 2
    programs_per_sm: int = 8
    split_k: int | None = None

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise KernelError(f"NF4MatmulLaunch.{name}={value}: expected a power of two >= 1.")
        if self.num_stages < 1 or self.programs_per_sm < 0 or (self.split_k is not None and self.split_k < 1):
            raise KernelError(
                f"NF4MatmulLaunch: num_stages >= 1, programs_per_sm >= 0 and split_k >= 1 (or None) expected, "
                f"got {self.num_stages}, {self.programs_per_sm}, {self.split_k}."
            )

    def label(self) -> str:
        split = f"s{self.split_k}" if self.split_k is not None else f"p{self.programs_per_sm}"
        return f"n{self.block_n}/k{self.block_k}/w{self.num_warps}/st{self.num_stages}/{split}"


# Per BLOCK_M (next power of two of the rows of x): 2,048 accumulators per program (16 registers a
# thread at 4 warps); at one row, 8 weight rows x 512 elements = 2 KiB of codes per step.
LAUNCHES: dict[int, NF4MatmulLaunch] = {
    1: NF4MatmulLaunch(block_n=8, block_k=512),
    2: NF4MatmulLaunch(block_n=8, block_k=256),
    4: NF4MatmulLaunch(block_n=4, block_k=256),
    8: NF4MatmulLaunch(block_n=8, block_k=256),  # the H100 sweep's best at 8 rows (n4/k128: 17.2 ms)
    16: NF4MatmulLaunch(block_n=4, block_k=64),
}


@triton.jit
def _spread(t, like):
    # tl.fma broadcasts its operands on Triton 3.9 but not necessarily on older releases: be explicit.
    return tl.broadcast_to(t.to(tl.float32), like.shape)


# y[m, n] (or a float32 partial of it over the K range of program_id(1)) for BLOCK_M rows of x and
# BLOCK_N rows of the weight; see the module docstring. Launched without fp contraction: the
# double-quantized scale is nested_code * nested_absmax + offset with two roundings, as dequantization
# computes it; the accumulation uses explicit FMAs. Sizes that only bound loops and masks are not
# specialized on (one compiled kernel serves every projection of a model).
@triton.jit(do_not_specialize=["M", "N", "blocks_per_split"])
def _nf4_matmul_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr,
    M, N, blocks_per_row, blocks_per_split, stride_xm, stride_os, stride_om,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    NB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    HALF: tl.constexpr = BLOCKSIZE // 2
    pid_k = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    ms = tl.arange(0, BLOCK_M)
    m_ok = ms < M
    nb = tl.arange(0, NB)
    half = tl.arange(0, HALF)
    within = tl.arange(0, BLOCKSIZE)
    kb_start = pid_k * blocks_per_split
    kb_end = tl.minimum(kb_start + blocks_per_split, blocks_per_row)
    acc = tl.zeros((BLOCK_M, BLOCK_N, NB, HALF), dtype=tl.float32)
    for kb0 in range(kb_start, kb_end, NB):
        kb = kb0 + nb
        kb_ok = kb < kb_end
        ok = row_ok[:, None] & kb_ok[None, :]
        block = rows[:, None] * blocks_per_row + kb[None, :]  # [BLOCK_N, NB] quantization blocks
        if DOUBLE_QUANT:
            q = tl.load(absmax_ptr + block, mask=ok, other=0).to(tl.int32)
            scale2 = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=ok, other=0.0)
            absmax = tl.load(nested_code_ptr + q) * scale2 + tl.load(offset_ptr)
        else:
            absmax = tl.load(absmax_ptr + block, mask=ok, other=0.0)
        byte = tl.load(
            packed_ptr + block[:, :, None] * HALF + half[None, None, :], mask=ok[:, :, None], other=0
        )
        byte = byte.to(tl.int32)
        # Element 2j of a block is byte j's high nibble, element 2j + 1 its low nibble; each value is
        # rounded to x's dtype as the dequantized weight is (a no-op for float32).
        w_even = (tl.load(code_ptr + (byte >> 4)) * absmax[:, :, None]).to(x_ptr.dtype.element_ty)
        w_odd = (tl.load(code_ptr + (byte & 15)) * absmax[:, :, None]).to(x_ptr.dtype.element_ty)
        x = tl.load(
            x_ptr + ms[:, None, None] * stride_xm + kb[None, :, None] * BLOCKSIZE + within[None, None, :],
            mask=m_ok[:, None, None] & kb_ok[None, :, None],
            other=0.0,
        ).to(tl.float32)
        x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, NB, HALF, 2)))
        # [BLOCK_M, BLOCK_N, NB, HALF]: each dequantized value serves every row of x.
        acc = tl.fma(_spread(w_even[None, :, :, :], acc), _spread(x_even[:, None, :, :], acc), acc)
        acc = tl.fma(_spread(w_odd[None, :, :, :], acc), _spread(x_odd[:, None, :, :], acc), acc)
    y = tl.sum(tl.sum(acc, axis=3), axis=2)
    out = out_ptr + pid_k * stride_os + ms[:, None] * stride_om + rows[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & row_ok[None, :])


# out[m, n] = sum over s of partial[s, m, n], s in order (reproducible), in out's dtype.
# Floor: SPLIT_K * M * N * 4 bytes read, M * N written (a few KB at decoding shapes).
@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, M, N, split_k, stride_om, BLOCK: tl.constexpr):
    m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, split_k):
        total += tl.load(part_ptr + (s * M + m) * N + cols, mask=ok, other=0.0)
    tl.store(out_ptr + m * stride_om + cols, total.to(out_ptr.dtype.element_ty), mask=ok)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: one "SM", so programs_per_sm still means something
    return torch.cuda.get_device_properties(device).multi_processor_count


def _supported(x2: torch.Tensor, q: NF4Tensor) -> bool:
    return (
        0 < x2.shape[0] <= ROWS_LIMIT
        and x2.dim() == 2
        and len(q.shape) == 2
        and q.blocksize <= 256  # blocks of a row are held whole in registers
        and q.shape[1] % q.blocksize == 0
        and x2.dtype in (torch.float32, torch.float16, torch.bfloat16)
    )


def applies(x2: torch.Tensor, q: NF4Tensor) -> bool:
    """Whether `NF4Weight.linear` should take this product: at most MAX_ROWS rows of x (where the kernel
    beats dequantize + cuBLAS), weight rows made of whole blocks."""
    return x2.shape[0] <= MAX_ROWS and _supported(x2, q)


def split_count(launch: NF4MatmulLaunch, programs_n: int, steps: int, device: torch.device) -> int:
    """Programs along K: `launch.split_k`, or enough that the grid has programs_per_sm per SM; never more
    than the loop steps of a row, and no split left empty."""
    if launch.split_k is not None:
        wanted = launch.split_k
    else:
        wanted = triton.cdiv(launch.programs_per_sm * _sm_count(device), programs_n)
    wanted = max(1, min(wanted, steps))
    return triton.cdiv(steps, triton.cdiv(steps, wanted))


def nf4_matmul_triton(
    x2: torch.Tensor, q: NF4Tensor, out: torch.Tensor | None = None, *, launch: NF4MatmulLaunch | None = None
) -> torch.Tensor:
    """x2 [M, K] @ dequantize(q)^T -> [M, N] in x2's dtype (written into `out`, e.g. a column slice of a
    wider output, when given). M <= ROWS_LIMIT; q is [N, K] with K a multiple of its blocksize. `launch`
    overrides LAUNCHES[next_power_of_2(M)]. Forward only (inference): no gradient flows through it."""
    if not _supported(x2, q) or x2.shape[1] != q.shape[1]:
        raise KernelError(
            f"nf4_matmul takes x [M <= {ROWS_LIMIT}, K] and an NF4 weight [N, K] with K a multiple of its "
            f"blocksize; got x {list(x2.shape)} {x2.dtype}, weight {list(q.shape)} blocksize {q.blocksize}."
        )
    m, k = x2.shape
    n = q.shape[0]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if out is None:
        out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    elif out.shape != (m, n) or out.stride(-1) != 1 or out.dtype != x2.dtype:
        raise KernelError(
            f"nf4_matmul: out must be [{m}, {n}] {x2.dtype} with dense rows, got {list(out.shape)} {out.dtype}."
        )
    block_m = triton.next_power_of_2(m)
    launch = launch or LAUNCHES[block_m]
    nb = max(1, launch.block_k // q.blocksize)
    blocks_per_row = k // q.blocksize
    programs_n = triton.cdiv(n, launch.block_n)
    steps = triton.cdiv(blocks_per_row, nb)
    split = split_count(launch, programs_n, steps, x2.device)
    blocks_per_split = triton.cdiv(steps, split) * nb
    if split == 1:
        target, stride_os, stride_om = out, 0, out.stride(0)
    else:
        target = torch.empty(split, m, n, dtype=torch.float32, device=x2.device)
        stride_os, stride_om = m * n, n
    nested = q.double_quant
    _nf4_matmul_kernel[(programs_n, split)](
        x2, q.data, q.absmax, q.code,
        q.nested_absmax if nested else q.absmax, q.nested_code if nested else q.code,
        q.nested_offset if nested else q.absmax, target,
        m, n, blocks_per_row, blocks_per_split, x2.stride(0), stride_os, stride_om,
        BLOCKSIZE=q.blocksize, NESTED_BLOCKSIZE=q.nested_blocksize, DOUBLE_QUANT=nested,
        NB=nb, BLOCK_M=block_m, BLOCK_N=launch.block_n,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
        enable_fp_fusion=False,  # the scale is rebuilt with two roundings, as dequantization rounds it
    )  # fmt: skip
    if split > 1:
        block = min(1024, triton.next_power_of_2(n))
        _sum_splits_kernel[(m, triton.cdiv(n, block))](target, out, m, n, split, out.stride(0), BLOCK=block)
    return out


def nf4_matmul_reference(x2: torch.Tensor, q: NF4Tensor) -> torch.Tensor:
    """x2 @ dequantize(q, x2.dtype)^T in plain PyTorch (the definition the kernel is tested against)."""
    return x2 @ dequantize_nf4_reference(q, x2.dtype).t()
