"""Gated MLP activations: SwiGLU (silu(gate) * up) and GeGLU with tanh-approximated GELU.

Input is the fused gate/up projection output [..., 2 * I] with gate in the first half and up in
the second (the layout of a fused gate_up weight, Phi-3's checkpoint layout too); output [..., I].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from velotune.errors import KernelError
from velotune.kernels._dispatch import use_triton  # noqa: F401

ACTIVATIONS = ("silu", "gelu_tanh")


def gated_activation_reference(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    raise KernelError(f"unknown gated activation {activation!r}; expected one of {ACTIVATIONS}")


def gated_activation(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up for the fused [..., 2I] projection output."""
    # TRITON-PATH (issue 3)
    return gated_activation_reference(gate_up, activation)
