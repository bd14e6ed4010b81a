"""The small-batch NF4 product (a decoding step's projections): the Triton kernel, interpreted, against
x @ dequantize(W)^T, and NF4Weight taking it for a few rows only."""

import pytest
import torch

from velotune.errors import KernelError
from velotune.quant import nf4_matmul
from velotune.quant.nf4 import dequantize_nf4_reference, quantize_nf4_reference
from velotune.quant.nf4_matmul import nf4_matmul_reference, nf4_matmul_triton
from velotune.quant.nf4_weight import NF4Weight


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("double_quant", [True, False])
def test_kernel_equals_the_product_with_the_dequantized_weight(rows, double_quant):
    gen = torch.Generator().manual_seed(rows)
    # 37 weight rows: not a multiple of the 16 rows a program owns; 192 inputs: three 64-element blocks.
    q = quantize_nf4_reference(torch.randn(37, 192, generator=gen), double_quant=double_quant)
    x = torch.randn(rows, 192, generator=gen)
    assert _rel(nf4_matmul_triton(x, q), nf4_matmul_reference(x, q)) < 1e-6


def test_16_bit_inputs_give_the_product_with_the_weight_dequantized_to_16_bits():
    gen = torch.Generator().manual_seed(5)
    q = quantize_nf4_reference(torch.randn(24, 256, generator=gen), blocksize=128)
    x = torch.randn(2, 256, generator=gen).half()
    want = (x.float() @ dequantize_nf4_reference(q, torch.float16).float().t()).half()
    got = nf4_matmul_triton(x, q)
    assert got.dtype == torch.float16 and _rel(got.float(), want.float()) < 1e-3


def test_the_output_slice_is_the_only_memory_written():
    gen = torch.Generator().manual_seed(2)
    q = quantize_nf4_reference(torch.randn(20, 64, generator=gen))
    x = torch.randn(2, 64, generator=gen)
    wide = torch.full((2, 50), float("nan"))
    nf4_matmul_triton(x, q, out=wide[:, 10:30])
    assert torch.isnan(wide[:, :10]).all() and torch.isnan(wide[:, 30:]).all()
    assert _rel(wide[:, 10:30], nf4_matmul_reference(x, q)) < 1e-6


def test_shapes_the_kernel_does_not_take_are_refused():
    q = quantize_nf4_reference(torch.randn(8, 96))  # rows of 96: one and a half 64-element blocks
    with pytest.raises(KernelError, match="multiple of its blocksize"):
        nf4_matmul_triton(torch.randn(1, 96), q)
    with pytest.raises(KernelError, match="M <= 16"):
        nf4_matmul_triton(torch.randn(17, 64), quantize_nf4_reference(torch.randn(8, 64)))


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
    assert _rel(weight.linear(few), few @ dense.t()) < 1e-6 and len(calls) == 3
    assert _rel(weight.linear(many), many @ dense.t()) < 1e-6 and len(calls) == 3
