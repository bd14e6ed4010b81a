"""The small-batch NF4 product (a decoding step's projections): the Triton kernel, interpreted, against
x @ dequantize(W)^T, and NF4Weight taking it for a few rows only."""

import pytest
import torch

from velotune.errors import KernelError
from velotune.quant import nf4_matmul
from velotune.quant.nf4 import dequantize_nf4_reference, quantize_nf4_reference
from velotune.quant.nf4_matmul import NF4MatmulLaunch, nf4_matmul_reference, nf4_matmul_triton
from velotune.quant.nf4_weight import NF4Weight

# Small tiles so that the interpreted tests cross several programs, steps and splits.
SMALL = NF4MatmulLaunch(block_n=8, block_k=128)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _weight(n, k, seed, double_quant=True, blocksize=64):
    gen = torch.Generator().manual_seed(seed)
    return quantize_nf4_reference(
        torch.randn(n, k, generator=gen), blocksize=blocksize, double_quant=double_quant
    )


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("double_quant", [True, False])
def test_kernel_equals_the_product_with_the_dequantized_weight(rows, double_quant):
    gen = torch.Generator().manual_seed(rows)
    # 37 weight rows: not a multiple of the rows a program owns; 192 inputs: three 64-element blocks,
    # so the last two-block step of SMALL is half empty.
    q = _weight(37, 192, rows, double_quant)
    x = torch.randn(rows, 192, generator=gen)
    want = nf4_matmul_reference(x, q)
    assert _rel(nf4_matmul_triton(x, q), want) < 1e-5
    assert _rel(nf4_matmul_triton(x, q, launch=SMALL), want) < 1e-5


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("split_k", [1, 3, 5])
def test_splitting_k_over_programs_gives_the_same_product(rows, split_k):
    # 19 blocks of 64 in a row: 10 steps of SMALL, split 3 ways unevenly (4 + 4 + 2) or 5 ways.
    q = _weight(45, 19 * 64, 10 + rows)
    x = torch.randn(rows, 19 * 64, generator=torch.Generator().manual_seed(rows))
    launch = NF4MatmulLaunch(block_n=8, block_k=128, split_k=split_k)
    assert _rel(nf4_matmul_triton(x, q, launch=launch), nf4_matmul_reference(x, q)) < 1e-5


def test_a_long_row_of_4096_inputs_matches_with_the_default_launch_and_an_automatic_split():
    q = _weight(20, 4096, 7)
    x = torch.randn(2, 4096, generator=torch.Generator().manual_seed(7))
    want = nf4_matmul_reference(x, q)
    assert _rel(nf4_matmul_triton(x, q), want) < 1e-5
    # 20 rows in blocks of 8 are 3 programs; 16 per "SM" (1 on the CPU) splits K into 6 programs each.
    launch = NF4MatmulLaunch(block_n=8, block_k=256, programs_per_sm=16)
    assert nf4_matmul.split_count(launch, 3, 4096 // 256, x.device) == 6
    assert _rel(nf4_matmul_triton(x, q, launch=launch), want) < 1e-5


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_other_blocksizes_are_read_block_by_block(blocksize):
    q = _weight(13, 4 * 256, blocksize, blocksize=blocksize)
    x = torch.randn(3, 4 * 256, generator=torch.Generator().manual_seed(blocksize))
    want = nf4_matmul_reference(x, q)
    assert _rel(nf4_matmul_triton(x, q), want) < 1e-5
    assert (
        _rel(nf4_matmul_triton(x, q, launch=NF4MatmulLaunch(block_n=4, block_k=64, split_k=2)), want) < 1e-5
    )


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_16_bit_inputs_give_the_product_with_the_weight_dequantized_to_16_bits(rows):
    gen = torch.Generator().manual_seed(5 + rows)
    q = quantize_nf4_reference(torch.randn(24, 256, generator=gen), blocksize=128)
    x = torch.randn(rows, 256, generator=gen).half()
    # Every product of two float16 values is exact in float32: only the order of the sums and the final
    # rounding to float16 differ from this float32 product of the float16 weight.
    want = (x.float() @ dequantize_nf4_reference(q, torch.float16).float().t()).half()
    for launch in (None, NF4MatmulLaunch(block_n=4, block_k=128, split_k=2)):
        got = nf4_matmul_triton(x, q, launch=launch)
        assert got.dtype == torch.float16 and _rel(got.float(), want.float()) < 2e-3
    assert _rel(got.float(), nf4_matmul_reference(x, q).float()) < 2e-2


def test_the_weight_is_rounded_to_the_input_dtype_before_the_product():
    # With x in {-1, 0, 1} every float32 sum of float16 weight values (multiples of 2^-15 below 8 here)
    # is exact, whatever its order: the result is the float16 rounding of the exact sum of the float16
    # weights, and differs from it in most elements if the weight is not rounded first.
    q = _weight(9, 128, 11)
    dense16 = dequantize_nf4_reference(q, torch.float16)
    x = torch.randint(-1, 2, (3, 128), generator=torch.Generator().manual_seed(11)).half()
    want = (x.float() @ dense16.float().t()).half()
    assert torch.equal(nf4_matmul_triton(x, q), want)
    assert torch.equal(
        nf4_matmul_triton(x, q, launch=NF4MatmulLaunch(block_n=4, block_k=64, split_k=2)), want
    )


@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_output_slice_is_the_only_memory_written(split_k, dtype):
    gen = torch.Generator().manual_seed(2)
    q = quantize_nf4_reference(torch.randn(21, 256, generator=gen))
    x = torch.randn(3, 256, generator=gen).to(dtype)
    wide = torch.full((3, 50), float("nan"), dtype=dtype)
    nf4_matmul_triton(
        x, q, out=wide[:, 10:31], launch=NF4MatmulLaunch(block_n=8, block_k=64, split_k=split_k)
    )
    assert torch.isnan(wide[:, :10]).all() and torch.isnan(wide[:, 31:]).all()
    want = x.float() @ dequantize_nf4_reference(q, dtype).float().t()
    assert _rel(wide[:, 10:31].float(), want) < (1e-5 if dtype == torch.float32 else 2e-3)


def test_shapes_the_kernel_does_not_take_are_refused():
    q = quantize_nf4_reference(torch.randn(8, 96))  # rows of 96: one and a half 64-element blocks
    with pytest.raises(KernelError, match="multiple of its blocksize"):
        nf4_matmul_triton(torch.randn(1, 96), q)
    with pytest.raises(KernelError, match="M <= 16"):
        nf4_matmul_triton(torch.randn(17, 64), quantize_nf4_reference(torch.randn(8, 64)))
    with pytest.raises(KernelError, match="out must be"):
        nf4_matmul_triton(
            torch.randn(2, 64), quantize_nf4_reference(torch.randn(8, 64)), out=torch.empty(2, 9)
        )


def test_launch_settings_that_cannot_tile_are_refused():
    with pytest.raises(KernelError, match="block_n=3"):
        NF4MatmulLaunch(block_n=3)
    with pytest.raises(KernelError, match="split_k"):
        NF4MatmulLaunch(split_k=0)


def test_nf4_weight_takes_the_kernel_for_a_few_rows_and_the_dense_path_for_more(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    weight = NF4Weight(56, 128, torch.float32, device="cpu")
    parts = [quantize_nf4_reference(torch.randn(rows, 128, generator=gen)) for rows in (32, 8, 16)]
    for row0, q in zip((0, 32, 40), parts):
        weight.set_part(row0, q)
    dense = weight.dequantize()
    monkeypatch.setenv("VELOTUNE_KERNELS", "triton")  # the Triton paths, interpreted
    calls = []

    def counted(x, q, out):
        calls.append(q)
        return nf4_matmul_triton(x, q, out=out)

    monkeypatch.setattr(nf4_matmul, "nf4_matmul_triton", counted)
    few, many = torch.randn(4, 128, generator=gen), torch.randn(17, 128, generator=gen)
    assert _rel(weight.linear(few), few @ dense.t()) < 1e-5 and len(calls) == 3
    assert _rel(weight.linear(many), many @ dense.t()) < 1e-5 and len(calls) == 3
    monkeypatch.setattr(nf4_matmul, "MAX_ROWS", 2)  # rows the kernel is faster for, per the GPU check
    assert _rel(weight.linear(few), few @ dense.t()) < 1e-5 and len(calls) == 3
    assert _rel(weight.linear(few[:2]), few[:2] @ dense.t()) < 1e-5 and len(calls) == 6
