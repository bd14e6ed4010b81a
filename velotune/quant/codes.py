"""The value tables of the quantized formats, as bitsandbytes defines them.

A 4-bit NF4 code indexes `NF4_CODE` (16 quantiles of N(0, 1) scaled to [-1, 1], QLoRA paper); the
8-bit codes of double quantization index the signed "dynamic" map (a dynamic-exponent format
spanning 1e-7..1). Checkpoints store both tables next to the weights (`quant_map`,
`nested_quant_map`); these functions make them for quantizing new weights.
"""

from __future__ import annotations

import functools

import torch

NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 values, float32, sorted ascending (code i dequantizes to value i)."""
    return _nf4_code_cpu().to(device, copy=True)


@functools.lru_cache(maxsize=1)
def _nf4_code_cpu() -> torch.Tensor:
    return torch.tensor(NF4_VALUES, dtype=torch.float32)


def dynamic_code_8bit(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 float32 values, sorted ascending)."""
    return _dynamic_code_cpu().to(device, copy=True)


@functools.lru_cache(maxsize=1)
def _dynamic_code_cpu() -> torch.Tensor:
    # Seven decades 1e-6..1e0; the decade 10^(i-6) gets 2^i linearly spaced fractions in (0.1, 1),
    # each the midpoint of two linspace edges, mirrored for negatives; then 0 and 1.0 (256 values).
    # Every step is rounded to float32 exactly where bitsandbytes rounds it, so the table is equal
    # bit for bit to `bitsandbytes.functional.create_dynamic_map()`.
    values: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        decade = 10 ** (i - 6)
        values += (decade * mids).tolist()
        values += (-decade * mids).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


def midpoints(code: torch.Tensor) -> torch.Tensor:
    """Decision thresholds of nearest-value quantization onto a sorted table: (c[i] + c[i+1]) / 2 in
    float32. A value x gets code #{i : threshold[i] < x}, so a tie goes to the lower code."""
    code = code.float()
    if bool((code[1:] < code[:-1]).any()):
        raise ValueError("a quantization table must be sorted ascending")
    return (code[:-1] + code[1:]) / 2
