"""NF4: blockwise 4-bit NormalFloat quantization with double-quantized scales, in bitsandbytes' format.

A tensor of n elements is read flat (row-major) in blocks of `blocksize` (64) elements. Each block
keeps absmax = max |x| and each element the index of the NF4 value nearest to its scaled value:

    code[i] = #{k : threshold[k] < s[i]}      thresholds = midpoints of the NF4 table, in float32
    s[i]    = x[i] * r,  r = 1 / max(absmax, 1e-38)   (r rounded once; r = 0 for an all-zero block)
    s[i]    = x[i] / max(absmax, 1e-38)   in the last block when it is partial (n % blocksize != 0),
              whose stored absmax is then max(absmax, 1e-38)

Two codes share a byte, the earlier element in the high nibble (byte j = code[2j] << 4 | code[2j+1];
an odd n pads one zero, code 7). With double quantization the float32 absmax vector is itself
quantized: offset = mean(absmax) (torch's mean on the tensor's device), then (absmax - offset) in
blocks of 256 to 8-bit codes of the "dynamic" table with one float32 scale per block, by the same
rules. Dequantization:

    absmax[b] = nested_code[qabsmax[b]] * nested_absmax[b // 256] + offset     (two float32 roundings)
    w[i]      = code[nibble i] * absmax[i // 64], rounded once to the output dtype

The specification is bitsandbytes' device-independent PyTorch implementation of its ops
(`bitsandbytes/backends/default/ops.py`: quantize_4bit, quantize_blockwise, dequantize_*), which
these rules restate: every division and multiplication is correctly rounded float32 and nothing is
fused. The reference functions below follow it in torch and the Triton kernels follow it
instruction by instruction (`tl.math.div_rn` for every division, no FMA contraction), so on CPU
and GPU alike packed bytes, scales and dequantized values equal bitsandbytes' CPU results bit for
bit. bitsandbytes' CUDA kernels differ on rare elements: they are built with --use_fast_math, so
their 1 / absmax is the approximate MUFU.RCP (off by an ulp for some float32 absmax values, which
moves the elements that sit within an ulp of a threshold), their 8-bit search breaks some exact
ties upward, and they scale a partial last block by the reciprocal. Either side's tensors load
into the other unchanged (`velotune.quant.bnb_format`); only a requantization can tell them apart.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from velotune.errors import KernelError
from velotune.kernels._dispatch import use_triton
from velotune.quant.codes import dynamic_code_8bit, midpoints, nf4_code

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Elements handled by one program of the 4-bit quantization kernel (a whole number of blocks).
ELEMENTS_PER_PROGRAM = 4096


@dataclass(frozen=True)
class DequantLaunch:
    """How the dequantization kernel is launched (tests/quant/gpu_sweep_nf4_dequant.py times these).

    elements_per_program: elements per chunk (rounded to whole blocks, at least one block).
    num_warps: warps per program.
    programs_per_sm: 0 launches one program per chunk; k > 0 a persistent grid of k programs per SM
        that loop over the chunks.
    evict_first: load the packed bytes and scale codes with evict_first (they are read once).
    load_bytes: bytes per vector load of the packed data; 0 picks 8 // output element size, the width
        whose outputs fill one 16-byte store (any other width costs a layout shuffle through shared memory).
    """

    elements_per_program: int = 4096
    num_warps: int = 4
    programs_per_sm: int = 0
    evict_first: bool = True
    load_bytes: int = 0

    def __post_init__(self) -> None:
        for name in ("elements_per_program", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise KernelError(f"DequantLaunch.{name} must be a power of two, got {value}.")
        if self.load_bytes < 0 or self.load_bytes & (self.load_bytes - 1) or self.programs_per_sm < 0:
            raise KernelError(
                f"DequantLaunch: load_bytes must be 0 or a power of two and programs_per_sm >= 0, got "
                f"{self.load_bytes} and {self.programs_per_sm}."
            )


# The H100 sweep's best by total one-call time over the 8B and 70B projection shapes
# (tests/quant/gpu_sweep_nf4_dequant.py; benchmarks/results/h100-2026-11-24-s4/nf4_dequant_sweep.md):
# 1.58x (70B gate/up) to 2.91x (8B k/v) bitsandbytes per call, 2.6-2.8 TB/s back to back on the large shapes.
DEQUANT_LAUNCH = DequantLaunch(elements_per_program=8192, num_warps=2)


@triton.jit
def _scale(x, absmax, blocks, n_blocks, HAS_TAIL: tl.constexpr):
    # x [ROWS, BLOCKSIZE] float32 scaled by its row's absmax as bitsandbytes' PyTorch ops do: times
    # the rounded reciprocal of max(absmax, 1e-38), divided by it in a partial last block. Returns
    # (scaled, absmax to store). tl.math.div_rn is IEEE division on every Triton we support; `/` and
    # tl.fdiv (whose ieee_rounding flag Triton 3.6 ignores) compile to the approximate div.full.f32,
    # which made float32 inputs quantize differently on the GPU. An all-zero block scales by 0
    # instead of 1e38 (its elements scale to 0 either way, and 0 survives a flush-to-zero of the
    # subnormal floor where 1 / 0 = inf would make NaN). The floor is cast back to float32 because
    # Triton types a literal below float32's smallest normal as float64.
    floor = tl.maximum(absmax, 1e-38).to(tl.float32)
    one = tl.zeros_like(floor) + 1.0
    inverse = tl.where(absmax > 0, tl.math.div_rn(one, floor), 0.0)
    scaled = x * inverse[:, None]
    if HAS_TAIL:
        tail = blocks == n_blocks - 1
        scaled = tl.where(tail[:, None], tl.math.div_rn(x, tl.zeros_like(x) + floor[:, None]), scaled)
        absmax = tl.where(tail, floor, absmax)
    return scaled, absmax


# 4-bit quantization, ROWS blocks of BLOCKSIZE elements per program.
#   absmax[b] = max |x| over block b;  code = #{thresholds < scaled x};  byte = hi << 4 | lo
# Floor: read n elements, write n / 2 bytes + 4 bytes per block.
@triton.jit
def _quantize_nf4_kernel(
    x_ptr,
    packed_ptr,
    absmax_ptr,
    thresholds_ptr,
    n,
    n_blocks,
    BLOCKSIZE: tl.constexpr,
    ROWS: tl.constexpr,
    N_THRESHOLDS: tl.constexpr,
    HAS_TAIL: tl.constexpr,
):
    blocks = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    elems = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    x = tl.load(x_ptr + elems, mask=elems < n, other=0.0).to(tl.float32)
    scaled, absmax = _scale(x, tl.max(tl.abs(x), axis=1), blocks, n_blocks, HAS_TAIL)
    codes = tl.zeros([ROWS, BLOCKSIZE], dtype=tl.int32)
    for k in tl.static_range(N_THRESHOLDS):
        codes += (scaled > tl.load(thresholds_ptr + k)).to(tl.int32)
    hi, lo = tl.split(tl.reshape(codes, [ROWS, BLOCKSIZE // 2, 2]))
    packed = ((hi << 4) | lo).to(tl.uint8)
    # Padding elements scaled to 0 and got the code of 0.0, as bitsandbytes pads an odd tail.
    byte_idx = blocks[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    tl.store(packed_ptr + byte_idx, packed, mask=byte_idx * 2 < n)
    tl.store(absmax_ptr + blocks, absmax, mask=blocks < n_blocks)


# 8-bit blockwise quantization of (absmax - offset), ROWS blocks of BLOCKSIZE per program: the
# nearest of 2^LOG2_CODES sorted table values (ties to the lower), found by a binary search over
# the midpoints. Floor: read and write n_blocks values (tiny: 1/64 of the weight's elements).
@triton.jit
def _quantize_blockwise_8bit_kernel(
    x_ptr,
    offset_ptr,
    q_ptr,
    absmax_ptr,
    thresholds_ptr,
    n,
    n_blocks,
    BLOCKSIZE: tl.constexpr,
    ROWS: tl.constexpr,
    LOG2_CODES: tl.constexpr,
    HAS_TAIL: tl.constexpr,
):
    blocks = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    elems = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    mask = elems < n
    x = tl.where(mask, tl.load(x_ptr + elems, mask=mask, other=0.0) - tl.load(offset_ptr), 0.0)
    scaled, absmax = _scale(x, tl.max(tl.abs(x), axis=1), blocks, n_blocks, HAS_TAIL)
    codes = tl.zeros([ROWS, BLOCKSIZE], dtype=tl.int32)
    for k in tl.static_range(LOG2_CODES):
        candidate = codes + (1 << (LOG2_CODES - 1 - k))
        codes = tl.where(scaled > tl.load(thresholds_ptr + candidate - 1), candidate, codes)
    tl.store(q_ptr + elems, codes.to(tl.uint8), mask=mask)
    tl.store(absmax_ptr + blocks, absmax, mask=blocks < n_blocks)


# Dequantization of one chunk of ROWS blocks: w = code[nibble] * absmax, absmax rebuilt from its 8-bit
# code when DOUBLE_QUANT. Launched without fp fusion so that code2 * absmax2 + offset rounds twice as
# bitsandbytes does, not once in an FMA.
# Layout: the packed bytes are read VEC at a time (tl.max_contiguous caps the vector) so that each
# thread's VEC bytes expand to exactly the 2 * VEC outputs of one 16-byte store: the loaded tile and
# the stored tile then share one register layout, and the compiler needs no shared-memory shuffle
# (with 16-byte loads it inserted one, 7 barriers per program) between tl.interleave and the store.
# Offsets inside the chunk are int32; the chunk's start is int64.
@triton.jit
def _dequantize_nf4_chunk(
    chunk, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset, out_ptr,
    n, n_bytes, n_blocks, blocks_per_row, out_row_stride,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    VEC: tl.constexpr, EVEN: tl.constexpr, EVICT: tl.constexpr, STRIDED: tl.constexpr,
):  # fmt: skip
    HALF: tl.constexpr = BLOCKSIZE // 2
    first = chunk * ROWS  # chunk is int64
    rows = tl.arange(0, ROWS)
    byte_off = rows[:, None] * HALF + tl.max_contiguous(tl.arange(0, HALF), VEC)[None, :]
    elem_off = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    blocks = first + rows
    if EVEN:
        byte = tl.load(packed_ptr + first * HALF + byte_off, eviction_policy=EVICT)
        stat = tl.load(absmax_ptr + blocks, eviction_policy=EVICT)
    else:
        byte_mask = byte_off < n_bytes - first * HALF
        byte = tl.load(packed_ptr + first * HALF + byte_off, mask=byte_mask, other=0, eviction_policy=EVICT)
        stat = tl.load(absmax_ptr + blocks, mask=blocks < n_blocks, other=0, eviction_policy=EVICT)
    if DOUBLE_QUANT:
        if EVEN:
            scale2 = tl.load(nested_absmax_ptr + blocks // NESTED_BLOCKSIZE)
        else:
            scale2 = tl.load(
                nested_absmax_ptr + blocks // NESTED_BLOCKSIZE, mask=blocks < n_blocks, other=0.0
            )
        absmax = tl.load(nested_code_ptr + stat.to(tl.int32)) * scale2 + offset
    else:
        absmax = stat
    byte = byte.to(tl.int32)
    hi = tl.load(code_ptr + (byte >> 4)) * absmax[:, None]
    lo = tl.load(code_ptr + (byte & 15)) * absmax[:, None]
    values = tl.interleave(hi, lo).to(out_ptr.dtype.element_ty)
    if STRIDED:
        # Rows of the weight are whole blocks: block b starts at column (b % blocks_per_row) * BLOCKSIZE of
        # row b // blocks_per_row, which sits out_row_stride elements after the row above it.
        row = blocks // blocks_per_row
        start = row * out_row_stride + (blocks - row * blocks_per_row) * BLOCKSIZE
        ptrs = out_ptr + start[:, None] + tl.arange(0, BLOCKSIZE)[None, :]
        if EVEN:
            tl.store(ptrs, values)
        else:
            tl.store(ptrs, values, mask=(blocks < n_blocks)[:, None])
    elif EVEN:
        tl.store(out_ptr + first * BLOCKSIZE + elem_off, values)
    else:
        tl.store(out_ptr + first * BLOCKSIZE + elem_off, values, mask=elem_off < n - first * BLOCKSIZE)


# Dequantization: one chunk of ROWS blocks per program, or (PERSISTENT) a grid of a few programs per
# SM, each looping over every num_programs-th chunk.
# Floor: read n / 2 bytes + 1 byte per block (+ 4 per 256 blocks), write n elements.
@triton.jit
def _dequantize_nf4_kernel(
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr,
    n, n_bytes, n_blocks, n_chunks, blocks_per_row, out_row_stride,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    VEC: tl.constexpr, EVEN: tl.constexpr, EVICT: tl.constexpr, PERSISTENT: tl.constexpr,
    STRIDED: tl.constexpr,
):  # fmt: skip
    offset = 0.0
    if DOUBLE_QUANT:
        offset = tl.load(offset_ptr)
    chunk = tl.program_id(0).to(tl.int64)
    if PERSISTENT:
        step = tl.num_programs(0)
        for i in tl.range(0, tl.cdiv(n_chunks - tl.program_id(0), step)):
            _dequantize_nf4_chunk(
                chunk + i * step, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                out_ptr, n, n_bytes, n_blocks, blocks_per_row, out_row_stride,
                BLOCKSIZE, NESTED_BLOCKSIZE, ROWS, DOUBLE_QUANT, VEC, EVEN, EVICT, STRIDED,
            )  # fmt: skip
    else:
        _dequantize_nf4_chunk(
            chunk, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset, out_ptr,
            n, n_bytes, n_blocks, blocks_per_row, out_row_stride,
            BLOCKSIZE, NESTED_BLOCKSIZE, ROWS, DOUBLE_QUANT, VEC, EVEN, EVICT, STRIDED,
        )  # fmt: skip


@dataclass
class NF4Tensor:
    """A tensor quantized to NF4, holding exactly what a bitsandbytes checkpoint holds for it.

    Attributes:
        data: uint8 [ceil(numel / 2)], two 4-bit codes per byte, the earlier element in the high nibble.
        absmax: per block of `blocksize` elements, uint8 codes (double quantization) or float32 scales.
        code: float32 [16], the NF4 value of each 4-bit code.
        shape, dtype: of the original tensor; dequantization returns this shape, by default this dtype.
        nested_absmax: float32, one scale per `nested_blocksize` absmax codes (double quantization only).
        nested_code: float32 [256], the value of each 8-bit absmax code (double quantization only).
        nested_offset: float32 0-d, the mean absmax subtracted before 8-bit quantization.
    """

    data: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_offset: torch.Tensor | None = None
    nested_blocksize: int = 256

    def __post_init__(self) -> None:
        self.shape = torch.Size(self.shape)
        n = self.numel()
        problems = []
        if self.blocksize not in BLOCKSIZES:
            problems.append(f"blocksize {self.blocksize} is not one of {BLOCKSIZES}")
        if self.data.dtype != torch.uint8 or self.data.numel() != (n + 1) // 2:
            problems.append(
                f"data must be uint8 with {(n + 1) // 2} bytes, got {self.data.dtype} {list(self.data.shape)}"
            )
        if self.code.numel() != 16:
            problems.append(f"code must have 16 values, got {self.code.numel()}")
        n_blocks = math.ceil(n / self.blocksize)
        if self.absmax.numel() != n_blocks:
            problems.append(f"absmax must have {n_blocks} values (one per block), got {self.absmax.numel()}")
        if self.double_quant:
            n_nested = math.ceil(n_blocks / self.nested_blocksize)
            if self.absmax.dtype != torch.uint8:
                problems.append(f"double-quantized absmax must be uint8, got {self.absmax.dtype}")
            if self.nested_absmax.numel() != n_nested:
                problems.append(
                    f"nested_absmax must have {n_nested} values, got {self.nested_absmax.numel()}"
                )
            if self.nested_code is None or self.nested_code.numel() != 256:
                problems.append("double quantization needs a nested_code table of 256 values")
            if self.nested_offset is None or self.nested_offset.numel() != 1:
                problems.append("double quantization needs a nested_offset")
            if self.nested_blocksize & (self.nested_blocksize - 1):
                problems.append(f"nested_blocksize {self.nested_blocksize} is not a power of two")
        elif self.absmax.dtype != torch.float32:
            problems.append(f"absmax without double quantization must be float32, got {self.absmax.dtype}")
        if problems:
            raise KernelError("inconsistent NF4 tensor: " + "; ".join(problems) + ".")

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def n_blocks(self) -> int:
        return self.absmax.numel()

    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self) -> int:
        """Bytes held on the device (tables included)."""
        parts = (self.data, self.absmax, self.code, self.nested_absmax, self.nested_code, self.nested_offset)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def to(self, device: torch.device | str) -> NF4Tensor:
        def move(t):
            return None if t is None else t.to(device)

        return replace(
            self,
            data=move(self.data),
            absmax=move(self.absmax),
            code=move(self.code),
            nested_absmax=move(self.nested_absmax),
            nested_code=move(self.nested_code),
            nested_offset=move(self.nested_offset),
        )

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        return dequantize_nf4(self, dtype, out)


def _check_input(weight: torch.Tensor, blocksize: int, nested_blocksize: int) -> None:
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise KernelError(f"NF4 quantizes float32, float16 or bfloat16 tensors, got {weight.dtype}.")
    if blocksize not in BLOCKSIZES:
        raise KernelError(f"NF4 blocksize must be one of {BLOCKSIZES}, got {blocksize}.")
    if nested_blocksize < 2 or nested_blocksize & (nested_blocksize - 1):
        raise KernelError(f"nested_blocksize must be a power of two, got {nested_blocksize}.")
    if weight.numel() == 0:
        raise KernelError("cannot quantize an empty tensor.")


def _reference_blockwise(
    x: torch.Tensor, blocksize: int, table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (int64, one per element of x) and float32 absmax (one per block) of nearest-value
    quantization of flat float32 x onto a sorted table, as bitsandbytes' PyTorch ops compute them:
    whole blocks times the rounded reciprocal of their absmax, a partial last block divided by its
    absmax floored at 1e-38 (the floored value is the one stored)."""
    n = x.numel()
    n_blocks = math.ceil(n / blocksize)
    blocks = torch.nn.functional.pad(x, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    floor = absmax.clamp(min=1e-38)
    inverse = torch.where(absmax > 0, 1.0 / floor, torch.zeros_like(absmax))
    scaled = blocks * inverse[:, None]
    if n % blocksize:
        scaled[-1] = blocks[-1] / floor[-1]
        absmax[-1] = floor[-1]
    return torch.bucketize(scaled, midpoints(table)).view(-1), absmax


def quantize_nf4_reference(
    weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True, nested_blocksize: int = 256
) -> NF4Tensor:
    """Plain-PyTorch NF4 quantization (the definition the Triton kernels are tested against)."""
    _check_input(weight, blocksize, nested_blocksize)
    device = weight.device
    code = nf4_code(device)
    n = weight.numel()
    codes, absmax = _reference_blockwise(weight.reshape(-1).float(), blocksize, code)
    codes = codes[: 2 * ((n + 1) // 2)].to(torch.uint8)  # the pad of an odd tail is kept: code of 0.0
    data = (codes[0::2] << 4) | codes[1::2]
    q = NF4Tensor(
        data=data, absmax=absmax, code=code, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize
    )
    if not double_quant:
        return q
    offset = absmax.mean()
    nested_code = dynamic_code_8bit(device)
    qabsmax, nested_absmax = _reference_blockwise(absmax - offset, nested_blocksize, nested_code)
    return replace(
        q,
        absmax=qabsmax[: absmax.numel()].to(torch.uint8),
        nested_absmax=nested_absmax,
        nested_code=nested_code,
        nested_offset=offset,
        nested_blocksize=nested_blocksize,
    )


def absmax_float32(q: NF4Tensor) -> torch.Tensor:
    """The per-block float32 scales (rebuilt from their 8-bit codes under double quantization)."""
    if not q.double_quant:
        return q.absmax
    n_nested = q.nested_absmax.numel()
    values = q.nested_code[q.absmax.long()]
    values = torch.nn.functional.pad(values, (0, n_nested * q.nested_blocksize - values.numel()))
    scaled = (values.view(n_nested, q.nested_blocksize) * q.nested_absmax[:, None]).view(-1)[: q.n_blocks]
    return scaled + q.nested_offset


def dequantize_nf4_reference(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-PyTorch NF4 dequantization: `q.shape` in `dtype` (default: the original dtype)."""
    n = q.numel()
    codes = torch.stack((q.data >> 4, q.data & 15), dim=1).view(-1).long()
    values = q.code[codes]
    values = torch.nn.functional.pad(values, (0, q.n_blocks * q.blocksize - values.numel()))
    out = (values.view(q.n_blocks, q.blocksize) * absmax_float32(q)[:, None]).view(-1)[:n]
    return out.to(dtype or q.dtype).view(q.shape)


def _rows_per_program(blocksize: int) -> int:
    return max(1, ELEMENTS_PER_PROGRAM // blocksize)


def _quantize_8bit_triton(
    x: torch.Tensor, offset: torch.Tensor, table: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes (uint8) and float32 scales of flat float32 `x - offset` onto the sorted 256-value
    `table`, by the Triton kernel: the double quantization of the NF4 scales."""
    n = x.numel()
    n_blocks = math.ceil(n / blocksize)
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    rows = max(1, 1024 // blocksize)
    _quantize_blockwise_8bit_kernel[(triton.cdiv(n_blocks, rows),)](
        x, offset, codes, absmax, midpoints(table), n, n_blocks,
        BLOCKSIZE=blocksize, ROWS=rows, LOG2_CODES=8, HAS_TAIL=n % blocksize != 0,
    )  # fmt: skip
    return codes, absmax


def quantize_nf4_triton(
    weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True, nested_blocksize: int = 256
) -> NF4Tensor:
    """NF4 quantization by the Triton kernels (on `weight`'s device; CPU only under the interpreter)."""
    _check_input(weight, blocksize, nested_blocksize)
    device = weight.device
    x = weight.reshape(-1)
    if not x.is_contiguous():
        x = x.contiguous()
    n = x.numel()
    n_blocks = math.ceil(n / blocksize)
    code = nf4_code(device)
    data = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=device)
    rows = _rows_per_program(blocksize)
    _quantize_nf4_kernel[(triton.cdiv(n_blocks, rows),)](
        x, data, absmax, midpoints(code), n, n_blocks,
        BLOCKSIZE=blocksize, ROWS=rows, N_THRESHOLDS=15, HAS_TAIL=n % blocksize != 0,
    )  # fmt: skip
    q = NF4Tensor(
        data=data, absmax=absmax, code=code, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize
    )
    if not double_quant:
        return q
    # torch's mean, as bitsandbytes takes it: the same reduction on the same values gives the same float.
    offset = absmax.mean()
    nested_code = dynamic_code_8bit(device)
    qabsmax, nested_absmax = _quantize_8bit_triton(absmax, offset, nested_code, nested_blocksize)
    return replace(
        q,
        absmax=qabsmax,
        nested_absmax=nested_absmax,
        nested_code=nested_code,
        nested_offset=offset,
        nested_blocksize=nested_blocksize,
    )


def _row_strided(q: NF4Tensor, out: torch.Tensor) -> bool:
    """Whether `out` is q's [rows, cols] shape with dense rows spaced further apart than cols (the first
    columns of a wider buffer), rows made of whole blocks: what the kernel's STRIDED form writes."""
    return (
        out.dim() == 2
        and len(q.shape) == 2
        and tuple(out.shape) == tuple(q.shape)
        and out.stride(1) == 1
        and out.stride(0) > out.shape[1]
        and q.shape[1] % q.blocksize == 0
    )


def _output(q: NF4Tensor, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(q.shape, dtype=dtype, device=q.device)
    if out.device != q.device or not (
        (out.numel() == q.numel() and out.is_contiguous()) or _row_strided(q, out)
    ):
        raise KernelError(
            f"dequantize_nf4: out must be a contiguous tensor of {q.numel()} elements on {q.device}, or the "
            f"first {list(q.shape)[-1:]} columns of wider rows (a [rows, cols] view, cols a multiple of the "
            f"block size {q.blocksize}); got {list(out.shape)} with strides {list(out.stride())} on {out.device}."
        )
    return out


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # the interpreter: a small persistent grid still loops over several chunks
    return torch.cuda.get_device_properties(device).multi_processor_count


def dequantize_nf4_triton(
    q: NF4Tensor,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    *,
    launch: DequantLaunch | None = None,
) -> torch.Tensor:
    """NF4 dequantization by the Triton kernel, into `out` (any float dtype, q.numel() elements) if given."""
    out = _output(q, dtype or q.dtype, out)
    launch = launch or DEQUANT_LAUNCH
    blocksize = q.blocksize
    n = q.numel()
    n_blocks = q.n_blocks
    rows = max(1, launch.elements_per_program // blocksize)
    n_chunks = triton.cdiv(n_blocks, rows)
    grid = n_chunks
    if launch.programs_per_sm:
        grid = min(n_chunks, launch.programs_per_sm * _sm_count(out.device))
    vec = min(launch.load_bytes or max(1, 8 // out.element_size()), blocksize // 2)
    nested = q.double_quant
    strided = not out.is_contiguous()  # _output allows only the row-strided form besides contiguous
    _dequantize_nf4_kernel[(grid,)](
        q.data,
        q.absmax,
        q.code,
        q.nested_absmax if nested else q.absmax,
        q.nested_code if nested else q.code,
        q.nested_offset if nested else q.absmax,
        out,
        n,
        q.data.numel(),
        n_blocks,
        n_chunks,
        q.shape[-1] // blocksize if strided else 1,
        out.stride(0) if strided else 0,
        BLOCKSIZE=blocksize,
        NESTED_BLOCKSIZE=q.nested_blocksize,
        ROWS=rows,
        DOUBLE_QUANT=nested,
        VEC=vec,
        EVEN=n % (rows * blocksize) == 0,
        EVICT="evict_first" if launch.evict_first else "",
        PERSISTENT=launch.programs_per_sm > 0,
        STRIDED=strided,
        num_warps=launch.num_warps,
        enable_fp_fusion=False,
    )
    return out


def quantize_nf4(
    weight: torch.Tensor, *, blocksize: int = 64, double_quant: bool = True, nested_blocksize: int = 256
) -> NF4Tensor:
    """Quantizes `weight` (any shape, fp32/fp16/bf16) to NF4 on its device, as bitsandbytes'
    `quantize_4bit(weight, blocksize, compress_statistics=double_quant, quant_type="nf4")` does."""
    if use_triton(weight):
        return quantize_nf4_triton(weight, blocksize, double_quant, nested_blocksize)
    return quantize_nf4_reference(weight, blocksize, double_quant, nested_blocksize)


def dequantize_nf4(
    q: NF4Tensor, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The dequantized tensor in `dtype` (default: the original dtype), written into `out` when given:
    a contiguous buffer of q.numel() elements (e.g. a slice of a reused scratch buffer), or, for a 2-D
    q whose rows are whole blocks, the first columns of wider rows (`NF4Weight.linear_folded`)."""
    if use_triton(q.data):
        return dequantize_nf4_triton(q, dtype, out)
    result = dequantize_nf4_reference(q, dtype if out is None else out.dtype)
    if out is None:
        return result
    return _output(q, out.dtype, out).view(q.shape).copy_(result)
