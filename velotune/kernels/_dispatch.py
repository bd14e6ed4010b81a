"""Chooses between an op's Triton path and its PyTorch reference path.

`VELOTUNE_KERNELS` selects the policy:
  * unset / ``auto``: CUDA tensors take the Triton path (when Triton imports), CPU tensors the reference.
  * ``reference``: the reference path everywhere (debugging, bisecting a numeric difference).
  * ``triton``: the Triton path everywhere; CPU tensors then run under Triton's interpreter, which
    needs ``TRITON_INTERPRET=1`` set before Triton compiles anything (``velotune`` sets it on import
    when this mode is selected and no CUDA device is present).
"""

from __future__ import annotations

import functools
import os

import torch

from velotune.errors import KernelError

_MODES = ("auto", "reference", "triton")


def kernel_mode() -> str:
    mode = os.environ.get("VELOTUNE_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise KernelError(f"VELOTUNE_KERNELS={mode!r} is not one of {_MODES}; unset it or pick one of those.")
    return mode


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # an absent or broken Triton install means the reference path
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """True when the op should run its Triton kernel on these tensors."""
    mode = kernel_mode()
    if mode == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if mode == "auto":
        return on_cuda and triton_available()
    if not triton_available():
        raise KernelError("VELOTUNE_KERNELS=triton but Triton does not import; `pip install triton`.")
    if not on_cuda and not interpreting():
        raise KernelError(
            "VELOTUNE_KERNELS=triton with CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "in the environment before Python starts (or import velotune before triton)."
        )
    return True
