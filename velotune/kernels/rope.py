"""Rotary position embedding applied to q and k (the "rotate half" convention of Llama/Transformers).

Shapes: q [B, T, Hq, D], k [B, T, Hk, D], cos/sin [B, T, R] with R <= D even (R < D is partial
rotary: dims R..D pass through). cos/sin hold cat(freqs, freqs) per position, so arbitrary
position_ids (packed sequences restarting at 0) are already folded in by the caller.
"""

from __future__ import annotations

import torch

from velotune.kernels._dispatch import use_triton  # noqa: F401


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    rot = cos.shape[-1]
    cos = cos.unsqueeze(2)
    sin = sin.unsqueeze(2)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        if rot == x.shape[-1]:
            return x * cos + _rotate_half(x) * sin
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)

    return rotate(q), rotate(k)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by the per-position angles in cos/sin (already in q's dtype)."""
    # TRITON-PATH (issue 3)
    return apply_rotary_reference(q, k, cos, sin)
