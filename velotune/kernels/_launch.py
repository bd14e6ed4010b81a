"""Triton launches that skip `JITFunction.run`'s per-call work once a kernel is compiled.

`kernel[grid](*args, **kwargs)` binds the arguments to the signature, specializes every one of them,
hashes a cache key from that and looks the compiled kernel up, all in Python, on every launch. On the
H100 machine that is ~40-60 us of host time per launch (`benchmarks/qlora_step_profile.py --host`:
Triton's `run` took 101 ms of a profiled 8B QLoRA step's host time for 962 launches), and an 8B QLoRA
step leaves the GPU waiting on the host (benchmarks/NOTES.md, session 7). `launch_kernel(kernel, grid, ...)`
computes a cheaper key that is at least as fine as Triton's own specialization (each tensor's dtype
and 16-byte alignment, each integer's width, divisibility by 16 and equality to 1, every constexpr
and launch option by value), compiles through `kernel[grid]` the first time a key is seen, and later
launches the kernel Triton returned, with the same arguments in signature order, through its public
`CompiledKernel[grid](*args, stream=...)` runner.

Under Triton's interpreter (CPU tests) and for arguments off CUDA, it is `kernel[grid](...)` itself.
"""

from __future__ import annotations

import torch

from velotune.kernels._dispatch import interpreting

_compiled: dict[tuple, object] = {}
_signatures: dict[int, tuple[tuple[str, ...], frozenset[str]]] = {}

_INT32 = (-(2**31), 2**31)


def _spec(value) -> tuple:
    """What Triton's specialization can depend on for a non-constexpr argument (or finer)."""
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.data_ptr() % 16 == 0)
    if isinstance(value, bool):
        return (bool,)
    if isinstance(value, int):
        return (int, _INT32[0] <= value < _INT32[1], value % 16 == 0, value == 1)
    if isinstance(value, float):
        return (float,)
    if value is None:
        return (None,)
    return (type(value), value)  # anything else by value: never a wrong reuse, at worst a recompile


def _signature(kernel) -> tuple[tuple[str, ...], frozenset[str]]:
    """(parameter names in order, names of the constexpr parameters) of a @triton.jit function."""
    sig = _signatures.get(id(kernel))
    if sig is None:
        params = kernel.params
        sig = (tuple(p.name for p in params), frozenset(p.name for p in params if p.is_constexpr))
        _signatures[id(kernel)] = sig
    return sig


def _compiled_launches(first) -> bool:
    """Whether launches may go through compiled kernels: a CUDA tensor first, not interpreting."""
    return isinstance(first, torch.Tensor) and first.is_cuda and not interpreting()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def launch_kernel(kernel, grid: tuple, *args, **kwargs) -> None:
    """`kernel[grid](*args, **kwargs)`, through the compiled kernel once there is one for this key."""
    first = args[0] if args else None
    if not _compiled_launches(first):
        kernel[grid](*args, **kwargs)
        return
    names, constexprs = _signature(kernel)
    values = list(args)
    for name in names[len(args) :]:
        if name not in kwargs:  # a parameter left to its default: let Triton bind it
            kernel[grid](*args, **kwargs)
            return
        values.append(kwargs[name])
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in constexprs and k not in names))
    key = (
        id(kernel),
        first.device.index,
        options,
        tuple(v if name in constexprs else _spec(v) for name, v in zip(names, values)),
    )
    compiled = _compiled.get(key)
    if compiled is None:
        _compiled[key] = kernel[grid](*args, **kwargs)
        return
    grid3 = tuple(grid) + (1,) * (3 - len(grid))  # the runner reads grid[0], grid[1] and grid[2]
    compiled[grid3](*values, stream=_stream(first.device))
