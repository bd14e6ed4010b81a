"""Inputs that sit on the decision thresholds of blockwise quantization (shared by the CPU tests and
tests/quant/gpu_sweep_nf4.py).

Random weights almost never land within an ulp of a midpoint between two table values, so they
cannot tell a correctly rounded reciprocal from one that is an ulp off, or x * (1 / absmax) from
x / absmax. These blocks are built so that most elements scale to within two ulps of a threshold:
x = round(t * absmax) +- k ulps (k in -2..2) for thresholds t of the table, with the block's
absmax (either sign) at a random position, so every such rounding difference flips codes. One block
in four has a power-of-two absmax, whose reciprocal is exact: there k = 0 puts elements exactly on a
threshold (a tie, which goes to the lower code).

Only float32 inputs can be made this sensitive: a 16-bit x over a 16-bit absmax is a ratio of short
mantissas, which (almost) never falls within a float32 ulp of a threshold, so for bf16/fp16 weights
an ulp of error in 1 / absmax cannot move a code; the float32 scales quantized by the double
quantization can, whatever the weights' dtype.
"""

from __future__ import annotations

import torch

_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _step_ulps(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """x moved by k ulps (away from zero for k > 0); zeros stay zero."""
    bits = _BITS[x.dtype]
    moved = (x.view(bits) + k.to(bits)).view(x.dtype)
    return torch.where(x == 0, x, moved)


def straddling_blocks(
    n: int, blocksize: int, dtype: torch.dtype, thresholds: torch.Tensor, seed: int, *, max_scale: float = 4.0
) -> torch.Tensor:
    """Flat `dtype` tensor of n elements (the last block partial when n % blocksize != 0) whose
    blocks scale onto `thresholds` (float32, the midpoints of a code table) give or take two ulps."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, blocksize):
        size = min(blocksize, n - start)
        # absmax log-uniform over [1e-3, max_scale], rounded to the dtype first: it is the block's max.
        absmax = torch.exp(torch.empty(()).uniform_(-6.9, float(torch.log(torch.tensor(max_scale))), generator=gen))
        if bool(torch.rand((), generator=gen) < 0.25):
            absmax = torch.exp2(torch.round(torch.log2(absmax)))
        absmax = absmax.to(dtype)
        t = thresholds[torch.randint(len(thresholds), (size - 1,), generator=gen)].double()
        x = (t * absmax.double()).to(dtype)
        x = _step_ulps(x, torch.randint(-2, 3, (size - 1,), generator=gen))
        x = torch.maximum(torch.minimum(x, absmax), -absmax)
        sign = 1.0 if bool(torch.rand((), generator=gen) < 0.5) else -1.0
        block = torch.cat([x, (absmax * sign).reshape(1)])
        out.append(block[torch.randperm(size, generator=gen)])
    return torch.cat(out)
