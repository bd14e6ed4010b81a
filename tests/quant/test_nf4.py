"""NF4 quantization: the Triton kernels against the PyTorch reference, and both against bitsandbytes 0.50
(on CPU) bit for bit."""

import math

import bitsandbytes.functional as bnbf
import pytest
import torch

from tests.quant.nf4_inputs import straddling_blocks
from velotune.errors import KernelError
from velotune.quant.codes import dynamic_code_8bit, midpoints, nf4_code
from velotune.quant.nf4 import (
    DequantLaunch,
    NF4Tensor,
    _quantize_8bit_triton,
    _reference_blockwise,
    absmax_float32,
    dequantize_nf4,
    dequantize_nf4_reference,
    dequantize_nf4_triton,
    quantize_nf4,
    quantize_nf4_reference,
    quantize_nf4_triton,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Odd element counts, a tail block shorter than 64, fewer elements than one block, and sizes that
# span several programs of every kernel (4096 elements, and 4 x 256 blocks, per program).
SHAPES = [(10, 130), (7, 65), (3,), (1, 1), (33, 320), (300, 251)]
NF4_THRESHOLDS = midpoints(nf4_code())
DYNAMIC_THRESHOLDS = midpoints(dynamic_code_8bit())


def _weight(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    # Rows of different scales, as real weights have, so the absmax codes spread over the 8-bit table.
    w = torch.randn(shape, generator=gen) * (
        0.5 + torch.rand(shape[:1] + (1,) * (len(shape) - 1), generator=gen)
    )
    return w.to(dtype)


def _bnb_state(q: NF4Tensor):
    """A bitsandbytes QuantState holding our tensor's parts."""
    state2 = None
    if q.double_quant:
        state2 = bnbf.QuantState(absmax=q.nested_absmax, code=q.nested_code, blocksize=q.nested_blocksize,
                                 dtype=torch.float32)  # fmt: skip
    return bnbf.QuantState(absmax=q.absmax, shape=q.shape, code=q.code, blocksize=q.blocksize, quant_type="nf4",
                           dtype=q.dtype, offset=q.nested_offset, state2=state2)  # fmt: skip


def _from_bnb(packed, state) -> NF4Tensor:
    nested = state.state2
    return NF4Tensor(
        data=packed.view(-1), absmax=state.absmax, code=state.code, shape=state.shape, dtype=state.dtype,
        blocksize=state.blocksize, nested_absmax=None if nested is None else nested.absmax,
        nested_code=None if nested is None else nested.code, nested_offset=state.offset,
        nested_blocksize=256 if nested is None else nested.blocksize,
    )  # fmt: skip


def _bnb_torch_quantize_blockwise(x: torch.Tensor, blocksize: int = 256):
    """bitsandbytes' PyTorch quantize_blockwise op (its "default" backend, the rule its CUDA kernel
    approximates), called directly: on CPU the public op runs a C kernel that approximates it."""
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    return op._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, x, bnbf.create_dynamic_map(), blocksize)


def _bnb_cpu_dequantizes(shape, blocksize) -> bool:
    """bitsandbytes 0.50.2's CPU (AVX-512) dequantizer misplaces scales in some blocks that straddle two
    rows (rows of 96 at blocksize 64, of 320 at 128; its own PyTorch kernel agrees with ours there).
    Rows that are whole blocks, as in every real model, and odd rows (its PyTorch fallback) are exact."""
    return shape[-1] % blocksize == 0 or shape[-1] % 2 == 1


def test_tables_equal_bitsandbytes_tables_and_cuda_thresholds():
    assert torch.equal(nf4_code(), bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code_8bit(), bnbf.create_dynamic_map())
    # The decision tree of bitsandbytes' CUDA quantizer (dQuantizeNF4) compares against these literals.
    cuda_tree = [-0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
                 -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
                 0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
                 0.5016634166240692, 0.6427869200706482, 0.8614784181118011]  # fmt: skip
    assert torch.equal(midpoints(nf4_code()), torch.tensor(cuda_tree, dtype=torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [64, 128])
def test_reference_packs_the_same_bytes_and_scales_as_bitsandbytes(shape, dtype, blocksize):
    w = _weight(shape, dtype, seed=1)
    ours = quantize_nf4_reference(w, blocksize=blocksize, double_quant=False)
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=False, quant_type="nf4")
    assert torch.equal(ours.data, packed.view(-1))
    assert torch.equal(ours.absmax, state.absmax)
    if _bnb_cpu_dequantizes(shape, blocksize):
        assert torch.equal(dequantize_nf4_reference(ours), bnbf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(10, 130), (33, 320), (300, 251), (1024, 80)])
def test_double_quantization_matches_bitsandbytes(shape, dtype):
    w = _weight(shape, dtype, seed=2)
    ours = quantize_nf4_reference(w)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(ours.data, packed.view(-1))
    assert torch.equal(ours.nested_offset, state.offset)
    assert torch.equal(ours.nested_absmax, state.state2.absmax)
    assert torch.equal(ours.nested_code, state.state2.code)
    # bitsandbytes' PyTorch kernel (its CUDA kernel's rule: nearest value, reciprocal scaling) gives
    # exactly our 8-bit codes. Its CPU C kernel approximates that search and differs by one code on
    # about 0.1% of the values; where it does, our code is at least as close to the true value.
    centered = absmax_float32(quantize_nf4_reference(w, double_quant=False)) - ours.nested_offset
    torch_codes, _ = _bnb_torch_quantize_blockwise(centered)
    assert torch.equal(ours.absmax, torch_codes)
    differ = ours.absmax != state.absmax
    assert differ.sum() <= max(2, 0.005 * differ.numel())
    if differ.any():
        table = ours.nested_code
        scale = ours.nested_absmax.repeat_interleave(256)[: centered.numel()]
        target = (centered / scale)[differ]
        ours_err = (table[ours.absmax[differ].long()] - target).abs()
        bnb_err = (table[state.absmax[differ].long()] - target).abs()
        assert bool((ours_err <= bnb_err).all())


def test_straddling_inputs_change_codes_when_the_scaling_is_off_by_one_rounding():
    # The inputs below are only a test of the scaling arithmetic if they are this sensitive.
    x = straddling_blocks(64 * 200, 64, torch.float32, NF4_THRESHOLDS, seed=0).view(-1, 64)
    absmax = x.abs().amax(dim=1, keepdim=True)
    r = 1.0 / absmax
    exact = torch.bucketize(x * r, NF4_THRESHOLDS)
    ties = (x * r)[..., None] == NF4_THRESHOLDS
    assert ties.sum() > 100
    for off in (
        x * torch.nextafter(r, torch.tensor(2.0)),
        x * torch.nextafter(r, torch.tensor(0.0)),
        x / absmax,
    ):
        assert (torch.bucketize(off, NF4_THRESHOLDS) != exact).sum() > 300


@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("tail", [0, 37])
def test_reference_equals_bitsandbytes_on_float32_inputs_straddling_the_thresholds(blocksize, tail):
    w = straddling_blocks(
        blocksize * 150 + tail, blocksize, torch.float32, NF4_THRESHOLDS, seed=blocksize + tail
    )
    ours = quantize_nf4_reference(w, blocksize=blocksize, double_quant=False)
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=False, quant_type="nf4")
    assert torch.equal(ours.data, packed.view(-1))
    assert torch.equal(ours.absmax, state.absmax)
    ours = quantize_nf4_reference(w, blocksize=blocksize)
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    assert torch.equal(ours.data, packed.view(-1))
    assert torch.equal(ours.nested_offset, state.offset)
    assert torch.equal(ours.nested_absmax, state.state2.absmax)
    centered = quantize_nf4_reference(w, blocksize=blocksize, double_quant=False).absmax - state.offset
    assert torch.equal(ours.absmax, _bnb_torch_quantize_blockwise(centered)[0])


@pytest.mark.parametrize("tail", [0, 37])
def test_triton_quantization_equals_reference_on_float32_inputs_straddling_the_thresholds(tail):
    # 300 blocks: the 8-bit scale quantization has a partial last block of 44 as well.
    w = straddling_blocks(64 * 300 + tail, 64, torch.float32, NF4_THRESHOLDS, seed=tail)
    for double_quant in (False, True):
        ref = quantize_nf4_reference(w, double_quant=double_quant)
        tri = quantize_nf4_triton(w, double_quant=double_quant)
        assert torch.equal(tri.data, ref.data) and torch.equal(tri.absmax, ref.absmax)
        if double_quant:
            assert torch.equal(tri.nested_absmax, ref.nested_absmax)
            assert torch.equal(tri.nested_offset, ref.nested_offset)


@pytest.mark.parametrize("n", [256 * 12, 256 * 12 + 45])
def test_8bit_scale_quantization_equals_bitsandbytes_pytorch_op_on_straddling_inputs(n):
    x = straddling_blocks(n, 256, torch.float32, DYNAMIC_THRESHOLDS, seed=n, max_scale=1.0)
    want_codes, want_absmax = _bnb_torch_quantize_blockwise(x)
    ref_codes, ref_absmax = _reference_blockwise(x, 256, dynamic_code_8bit())
    tri_codes, tri_absmax = _quantize_8bit_triton(x, torch.zeros(()), dynamic_code_8bit(), 256)
    assert torch.equal(ref_codes[:n].to(torch.uint8), want_codes) and torch.equal(ref_absmax, want_absmax)
    assert torch.equal(tri_codes, want_codes) and torch.equal(tri_absmax, want_absmax)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_partial_last_block_is_divided_by_its_floored_absmax_as_bitsandbytes_does(dtype):
    w = _weight((3 * 64 + 10,), dtype, seed=12)
    w[-10:] = 0.0  # an all-zero partial block stores absmax 1e-38, not 0
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    for q in (quantize_nf4_reference(w, double_quant=False), quantize_nf4_triton(w, double_quant=False)):
        assert torch.equal(q.data, packed.view(-1))
        assert torch.equal(q.absmax, state.absmax)
        assert q.absmax[-1] > 0
        assert torch.equal(dequantize_nf4_reference(q, torch.float32)[-10:], torch.zeros(10))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(257, 128), (100, 131)])
def test_dequantizing_a_bitsandbytes_state_gives_bitsandbytes_values(shape, dtype):
    w = _weight(shape, dtype, seed=3)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    q = _from_bnb(packed, state)
    assert torch.equal(dequantize_nf4_reference(q), bnbf.dequantize_4bit(packed, state))
    state.dtype = torch.float32  # the interpreter's bfloat16 rounding is checked on the GPU
    assert torch.equal(dequantize_nf4_triton(q, torch.float32), bnbf.dequantize_4bit(packed, state))


def test_bitsandbytes_dequantizes_our_tensor_to_our_values():
    w = _weight((40, 192), torch.bfloat16, seed=4)
    q = quantize_nf4_triton(w)
    assert torch.equal(bnbf.dequantize_4bit(q.data.view(-1, 1), _bnb_state(q)), dequantize_nf4_reference(q))


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_quantization_equals_reference_bit_for_bit(shape, dtype, double_quant):
    w = _weight(shape, dtype, seed=5)
    ref = quantize_nf4_reference(w, double_quant=double_quant)
    tri = quantize_nf4_triton(w, double_quant=double_quant)
    assert torch.equal(tri.data, ref.data)
    assert torch.equal(tri.absmax, ref.absmax)
    if double_quant:
        assert torch.equal(tri.nested_absmax, ref.nested_absmax)
        assert torch.equal(tri.nested_offset, ref.nested_offset)


# The interpreter rounds float32 to bfloat16 by truncation, so bfloat16 output is checked on the GPU.
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_dequantization_equals_reference_bit_for_bit(shape, double_quant, out_dtype):
    q = quantize_nf4_reference(_weight(shape, torch.bfloat16, seed=6), double_quant=double_quant)
    out = torch.full(q.shape, float("nan"), dtype=out_dtype)
    result = dequantize_nf4_triton(q, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(out, dequantize_nf4_reference(q, out_dtype))


def test_dequantization_into_a_slice_of_a_scratch_buffer_writes_only_that_slice():
    q = quantize_nf4_reference(_weight((24, 100), torch.float32, seed=7))
    scratch = torch.full((50, 100), float("nan"))
    dequantize_nf4_triton(q, out=scratch[10:34])
    assert torch.equal(scratch[10:34], dequantize_nf4_reference(q))
    assert scratch[:10].isnan().all() and scratch[34:].isnan().all()


@pytest.mark.parametrize("launch", [None, DequantLaunch(elements_per_program=256, programs_per_sm=1),
                                    DequantLaunch(elements_per_program=64)])  # fmt: skip
@pytest.mark.parametrize("rows,cols,blocksize,extra", [(37, 192, 64, 24), (1, 64, 64, 8), (5, 256, 128, 16)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantization_into_the_first_columns_of_wider_rows_writes_only_those(
    rows, cols, blocksize, extra, double_quant, launch
):
    # The folded LoRA projection's scratch rows [W | s B]: the weight goes into the first columns, block by
    # block (a chunk of blocks may span rows), and the last columns are the caller's.
    q = quantize_nf4_reference(
        _weight((rows, cols), torch.float32, seed=rows), blocksize=blocksize, double_quant=double_quant
    )
    want = dequantize_nf4_reference(q)
    for dequantize in (lambda out: dequantize_nf4_triton(q, out=out, launch=launch),
                       lambda out: dequantize_nf4(q, out=out)):  # fmt: skip
        buf = torch.full((rows, cols + extra), float("nan"))
        dequantize(buf[:, :cols])
        assert torch.equal(buf[:, :cols], want)
        assert buf[:, cols:].isnan().all()


def test_wider_rows_are_refused_where_a_row_is_not_whole_blocks():
    q = quantize_nf4_reference(_weight((3, 96), torch.float32, seed=9))  # 96 = 1.5 blocks of 64
    buf = torch.zeros(3, 104)
    with pytest.raises(KernelError, match="first .* columns of wider rows"):
        dequantize_nf4_triton(q, out=buf[:, :96])


def test_all_zero_blocks_dequantize_to_exact_zeros():
    w = _weight((4, 256), torch.float32, seed=8)
    w[1] = 0.0
    for q in (quantize_nf4_reference(w), quantize_nf4_triton(w)):
        assert torch.equal(dequantize_nf4_reference(q)[1], torch.zeros(256))
        assert torch.equal(q.data[128:256], torch.full((128,), 0x77, dtype=torch.uint8))  # code 7 is 0.0


def test_dequantized_values_are_the_nearest_nf4_value_times_the_block_scale():
    w = _weight((16, 192), torch.float32, seed=9)
    q = quantize_nf4_reference(w, double_quant=False)
    blocks = w.view(-1, 64)
    scale = blocks.abs().amax(1, keepdim=True)
    candidates = (nf4_code()[None, None, :] * scale[:, :, None]).expand(-1, 64, -1)
    nearest = (candidates - blocks[:, :, None]).abs().argmin(-1)
    assert torch.equal(
        dequantize_nf4_reference(q).view(-1, 64), candidates.gather(2, nearest[..., None])[..., 0]
    )


def test_public_functions_dispatch_to_triton_when_asked(monkeypatch):
    w = _weight((9, 70), torch.float32, seed=10)
    monkeypatch.setenv("VELOTUNE_KERNELS", "triton")
    q = quantize_nf4(w)
    out = torch.full((9, 70), float("nan"))
    dequantize_nf4(q, out=out)
    monkeypatch.setenv("VELOTUNE_KERNELS", "reference")
    assert torch.equal(quantize_nf4(w).data, q.data)
    assert torch.equal(dequantize_nf4(q), out)


def test_nf4_tensor_rejects_inconsistent_parts_and_bad_inputs():
    q = quantize_nf4_reference(_weight((8, 64), torch.float32, seed=11))
    with pytest.raises(KernelError, match="data must be uint8"):
        NF4Tensor(data=q.data[:-1], absmax=q.absmax, code=q.code, shape=q.shape, dtype=q.dtype,
                  nested_absmax=q.nested_absmax, nested_code=q.nested_code, nested_offset=q.nested_offset)  # fmt: skip
    with pytest.raises(KernelError, match="absmax must have"):
        NF4Tensor(data=q.data, absmax=q.absmax[:3], code=q.code, shape=q.shape, dtype=q.dtype,
                  nested_absmax=q.nested_absmax, nested_code=q.nested_code, nested_offset=q.nested_offset)  # fmt: skip
    with pytest.raises(KernelError, match="must be float32"):
        NF4Tensor(data=q.data, absmax=q.absmax, code=q.code, shape=q.shape, dtype=q.dtype)
    with pytest.raises(KernelError, match="int64"):
        quantize_nf4_reference(torch.ones(64, dtype=torch.int64))
    with pytest.raises(KernelError, match="blocksize"):
        quantize_nf4_reference(torch.ones(64), blocksize=48)
    assert q.nbytes() == 256 + 8 + 16 * 4 + 4 + 256 * 4 + 4
    assert math.prod(q.shape) == q.numel() == 512
