"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * (offset + w).

offset 0 is Llama's form, offset 1 Gemma's `(1 + w)` form.
"""

from __future__ import annotations

import torch

from velotune.kernels._dispatch import use_triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """Plain PyTorch, in the same operation order as Transformers (so float32 results agree bitwise-close)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0:
        return weight * normed.to(x.dtype)
    return (normed * (offset + weight.float())).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dimension of `x` (any leading shape)."""
    # TRITON-PATH: `if use_triton(x, weight): return RMSNormFunction.apply(...)` (issue 3)
    return rms_norm_reference(x, weight, eps, offset)
