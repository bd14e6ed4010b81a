"""NF4 dequantization under every launch setting the GPU sweep tries (tests/quant/gpu_sweep_nf4_dequant.py):
the Triton kernel (interpreter) against dequantize_nf4_reference bit for bit, into NaN-poisoned outputs."""

import pytest
import torch

from velotune.errors import KernelError
from velotune.quant.nf4 import (
    DequantLaunch,
    dequantize_nf4_reference,
    dequantize_nf4_triton,
    quantize_nf4_reference,
)

LAUNCHES = {
    "default": DequantLaunch(),
    "small chunks, 1 warp": DequantLaunch(elements_per_program=256, num_warps=1),
    "one block per chunk": DequantLaunch(elements_per_program=64, num_warps=2),
    "persistent": DequantLaunch(elements_per_program=256, num_warps=2, programs_per_sm=1),
    "persistent, big chunks": DequantLaunch(elements_per_program=2048, num_warps=4, programs_per_sm=2),
    "16-byte loads": DequantLaunch(elements_per_program=512, load_bytes=16),
    "1-byte loads, no eviction hint": DequantLaunch(
        elements_per_program=512, load_bytes=1, evict_first=False
    ),
}
# Odd element counts, a partial last block, fewer elements than one block, a single whole block, whole
# chunks only (3 x 2048), and enough chunks for a persistent program to loop several times.
SHAPES = [(7, 65), (3,), (1, 64), (3, 2048), (41, 201)]


def _weight(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * (
        0.5 + torch.rand(shape[:1] + (1,) * (len(shape) - 1), generator=gen)
    )


# bfloat16 output is checked on the GPU: the interpreter rounds float32 to bfloat16 by truncation.
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("launch", LAUNCHES.values(), ids=LAUNCHES.keys())
def test_every_launch_setting_dequantizes_bit_for_bit_like_the_reference(
    launch, shape, double_quant, out_dtype
):
    q = quantize_nf4_reference(_weight(shape, seed=len(shape) + shape[0]), double_quant=double_quant)
    out = torch.full(q.shape, float("nan"), dtype=out_dtype)
    result = dequantize_nf4_triton(q, out=out, launch=launch)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(out, dequantize_nf4_reference(q, out_dtype))


@pytest.mark.parametrize("blocksize", [32, 256, 4096])
@pytest.mark.parametrize(
    "launch", [DequantLaunch(elements_per_program=128, num_warps=1), DequantLaunch(programs_per_sm=1)]
)
def test_blocksizes_larger_and_smaller_than_a_chunk_dequantize_exactly(blocksize, launch):
    q = quantize_nf4_reference(_weight((5, 1733), seed=blocksize), blocksize=blocksize)
    out = torch.full(q.shape, float("nan"), dtype=torch.float32)
    dequantize_nf4_triton(q, out=out, launch=launch)
    assert torch.equal(out, dequantize_nf4_reference(q, torch.float32))


def test_a_persistent_grid_leaves_no_element_of_a_slice_unwritten_and_none_outside_it():
    q = quantize_nf4_reference(_weight((37, 96), seed=3))
    scratch = torch.full((4000,), float("nan"))
    dequantize_nf4_triton(
        q, out=scratch[17 : 17 + q.numel()], launch=DequantLaunch(elements_per_program=128, programs_per_sm=1)
    )
    assert torch.equal(scratch[17 : 17 + q.numel()], dequantize_nf4_reference(q).view(-1))
    assert scratch[:17].isnan().all() and scratch[17 + q.numel() :].isnan().all()


@pytest.mark.parametrize(
    "kwargs",
    [dict(elements_per_program=3000), dict(num_warps=3), dict(load_bytes=3), dict(programs_per_sm=-1)],
)
def test_launch_settings_that_cannot_run_are_rejected(kwargs):
    with pytest.raises(KernelError, match="DequantLaunch"):
        DequantLaunch(**kwargs)
