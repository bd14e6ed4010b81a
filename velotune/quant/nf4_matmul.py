"""x W^T for a few rows of x (a decoding step) with W in NF4, dequantized in registers.

The dequantize-then-GEMM path (`NF4Weight.linear`) writes the weight densely into a scratch buffer and
reads it back: 0.5 + 2 + 2 bytes per element in bf16, where a step that multiplies one token per row is
bound by exactly those bytes. Here each weight element is read once, packed (half a byte, plus one scale
byte per 64-element block), and never leaves registers dense.

    y[m, n] = sum_k x[m, k] * round_dtype(code[nibble(n, k)] * absmax[block(n, k)])

The weight value is rounded to x's dtype before the product, as the dequantized weight is, and products
accumulate in float32, so the result is the dequantized GEMM's up to the order of the float32 sums.

Floor: N*K/2 bytes of codes + N*K/64 scale bytes read, M*K read and M*N written: at batch 1 about a
quarter of a bf16 GEMV's bytes, a ninth of dequantize-then-GEMM. Nothing is saved for backward (this is
a forward for inference; gradients go through `NF4Weight.grad_input`).

Each program owns BLOCK_N weight rows and walks K a few whole quantization blocks at a time (STEP_ELEMENTS
per row, so that enough bytes are in flight with only a few programs per SM), each block with its scale;
the at most MAX_ROWS rows of x are padded to 16 for tl.dot. Rows of the weight are whole blocks
(in_features % blocksize == 0, true of every checkpoint; `applies` checks it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from velotune.errors import KernelError
from velotune.kernels._dispatch import interpreting
from velotune.quant.nf4 import NF4Tensor, dequantize_nf4_reference

MAX_ROWS = 16  # rows of x the kernel takes in one program (tl.dot's smallest tile)
BLOCK_N = 16  # weight rows per program: Llama-8B's 4,096-row projections give 256 programs
STEP_ELEMENTS = 256  # weight elements of each row read per loop step (whole quantization blocks)
NUM_WARPS = 4
NUM_STAGES = 4


@triton.jit
def _nf4_matmul_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr,
    M, N, K, stride_xm, stride_om,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    BLOCKS_PER_STEP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    STEP: tl.constexpr = BLOCKS_PER_STEP * BLOCKSIZE
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    ms = tl.arange(0, BLOCK_M)
    m_ok = ms < M
    half = tl.arange(0, BLOCKSIZE // 2)
    blocks_per_row = K // BLOCKSIZE
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb0 in range(0, blocks_per_row, BLOCKS_PER_STEP):
        kb = kb0 + tl.arange(0, BLOCKS_PER_STEP)
        ok = row_ok[:, None] & (kb < blocks_per_row)[None, :]
        block = rows[:, None] * blocks_per_row + kb[None, :]  # [BLOCK_N, BLOCKS_PER_STEP] quantization blocks
        if DOUBLE_QUANT:
            q = tl.load(absmax_ptr + block, mask=ok, other=0).to(tl.int32)
            scale2 = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=ok, other=0.0)
            absmax = tl.load(nested_code_ptr + q) * scale2 + tl.load(offset_ptr)
        else:
            absmax = tl.load(absmax_ptr + block, mask=ok, other=0.0)
        byte_idx = block[:, :, None] * (BLOCKSIZE // 2) + half[None, None, :]
        byte = tl.load(packed_ptr + byte_idx, mask=ok[:, :, None], other=0).to(tl.int32)
        hi = tl.load(code_ptr + (byte >> 4)) * absmax[:, :, None]
        lo = tl.load(code_ptr + (byte & 15)) * absmax[:, :, None]
        # [BLOCK_N, STEP] in k order, rounded to the input dtype as the dequantized weight is.
        w = tl.reshape(tl.interleave(hi, lo), (BLOCK_N, STEP)).to(x_ptr.dtype.element_ty)
        k = kb0 * BLOCKSIZE + tl.arange(0, STEP)
        x = tl.load(
            x_ptr + ms[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0.0
        )
        if UPCAST:  # the interpreter computes a 16-bit tl.dot wrongly
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc)
        elif IEEE:  # float32 inputs: full float32 products, not TF32
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    out = out_ptr + ms[:, None] * stride_om + rows[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & row_ok[None, :])


def applies(x2: torch.Tensor, q: NF4Tensor) -> bool:
    """Whether `nf4_matmul` takes this product: few rows of x, weight rows made of whole blocks."""
    return (
        0 < x2.shape[0] <= MAX_ROWS
        and len(q.shape) == 2
        and q.blocksize <= 256  # one block of every row of the tile is held in registers
        and q.shape[1] % q.blocksize == 0
        and x2.dtype in (torch.float32, torch.float16, torch.bfloat16)
    )


def nf4_matmul_triton(x2: torch.Tensor, q: NF4Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x2 [M, K] @ dequantize(q)^T -> [M, N] in x2's dtype (written into `out`, e.g. a column slice of a
    wider output, when given). M <= MAX_ROWS; q is [N, K] with K a multiple of its blocksize."""
    if not applies(x2, q) or x2.shape[1] != q.shape[1]:
        raise KernelError(
            f"nf4_matmul takes x [M <= {MAX_ROWS}, K] and an NF4 weight [N, K] with K a multiple of its "
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
            f"nf4_matmul: out must be [{m}, {n}] {x2.dtype} with dense rows, got {list(out.shape)}."
        )
    nested = q.double_quant
    interp = interpreting()
    _nf4_matmul_kernel[(triton.cdiv(n, BLOCK_N),)](
        x2, q.data, q.absmax, q.code,
        q.nested_absmax if nested else q.absmax, q.nested_code if nested else q.code,
        q.nested_offset if nested else q.absmax, out,
        m, n, k, x2.stride(0), out.stride(0),
        BLOCKSIZE=q.blocksize, NESTED_BLOCKSIZE=q.nested_blocksize, DOUBLE_QUANT=nested,
        BLOCKS_PER_STEP=max(1, STEP_ELEMENTS // q.blocksize), BLOCK_M=MAX_ROWS, BLOCK_N=BLOCK_N,
        UPCAST=interp and x2.dtype != torch.float32, IEEE=x2.dtype == torch.float32,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        enable_fp_fusion=False,  # the scale is rebuilt with two roundings, as dequantization rounds it
    )  # fmt: skip
    return out


def nf4_matmul_reference(x2: torch.Tensor, q: NF4Tensor) -> torch.Tensor:
    """x2 @ dequantize(q, x2.dtype)^T in plain PyTorch (the definition the kernel is tested against)."""
    return x2 @ dequantize_nf4_reference(q, x2.dtype).t()
