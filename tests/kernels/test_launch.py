"""velotune.kernels._launch: a kernel compiles through `kernel[grid]` once per specialization key and
later launches go to the compiled kernel with every argument in signature order; anything Triton
specializes on (dtype, alignment, integer width, divisibility by 16, equality to 1, constexprs,
launch options) makes a new key. Off CUDA (and under the interpreter) it is `kernel[grid]` itself."""

from types import SimpleNamespace

import pytest
import torch

from velotune.kernels import _launch


class StubKernel:
    """Stands for a @triton.jit function: records compiles (kernel[grid](...)) and compiled launches."""

    def __init__(self, names, constexprs):
        self.params = [SimpleNamespace(name=n, is_constexpr=n in constexprs) for n in names]
        self.compiles, self.launches = [], []

    def __getitem__(self, grid):
        def compile_and_launch(*args, **kwargs):
            self.compiles.append((grid, args, kwargs))
            compiled = SimpleNamespace(tag=len(self.compiles))
            launches = self.launches

            class Runner:
                def __getitem__(self, grid3):
                    return lambda *values, stream: launches.append((compiled.tag, grid3, values, stream))

            return Runner()

        return compile_and_launch


@pytest.fixture
def on_gpu(monkeypatch):
    monkeypatch.setattr(_launch, "_compiled_launches", lambda first: isinstance(first, torch.Tensor))
    monkeypatch.setattr(_launch, "_stream", lambda device: 1234)
    _launch._compiled.clear()


def test_a_compiled_kernel_is_launched_with_every_argument_in_signature_order(on_gpu):
    kernel = StubKernel(("x", "out", "n", "BLOCK"), {"BLOCK"})
    x, out = torch.zeros(64), torch.zeros(64)
    _launch.launch_kernel(kernel, (4,), x, out, 64, BLOCK=16, num_warps=2)
    assert kernel.compiles == [((4,), (x, out, 64), {"BLOCK": 16, "num_warps": 2})] and not kernel.launches
    _launch.launch_kernel(kernel, (8, 2), x, out, 64, BLOCK=16, num_warps=2)
    assert len(kernel.compiles) == 1
    assert kernel.launches == [(1, (8, 2, 1), (x, out, 64, 16), 1234)]


@pytest.mark.parametrize(
    "change",
    [
        lambda x, n, kw: (x.to(torch.float16), n, kw),  # dtype
        lambda x, n, kw: (x[1:], n, kw),  # 4-byte offset: not 16-byte aligned
        lambda x, n, kw: (x, 65, kw),  # not divisible by 16
        lambda x, n, kw: (x, 1, kw),  # equal to 1
        lambda x, n, kw: (x, 2**31 + 16, kw),  # 64-bit
        lambda x, n, kw: (x, n, {**kw, "BLOCK": 32}),  # constexpr
        lambda x, n, kw: (x, n, {**kw, "num_warps": 4}),  # launch option
    ],
)
def test_whatever_triton_specializes_on_compiles_again(on_gpu, change):
    kernel = StubKernel(("x", "n", "BLOCK"), {"BLOCK"})
    x, n, kw = torch.zeros(64), 64, {"BLOCK": 16, "num_warps": 2}
    _launch.launch_kernel(kernel, (1,), x, n, **kw)
    x2, n2, kw2 = change(x, n, kw)
    _launch.launch_kernel(kernel, (1,), x2, n2, **kw2)
    assert len(kernel.compiles) == 2 and not kernel.launches
    _launch.launch_kernel(kernel, (1,), x2, n2, **kw2)  # the new key is cached in turn
    assert len(kernel.compiles) == 2 and len(kernel.launches) == 1


def test_an_argument_left_to_its_default_or_off_cuda_goes_through_triton_each_time(monkeypatch, on_gpu):
    kernel = StubKernel(("x", "n", "BLOCK"), {"BLOCK"})
    x = torch.zeros(64)
    for _ in range(2):
        _launch.launch_kernel(kernel, (1,), x, 64)  # BLOCK not given: Triton binds its default
    assert len(kernel.compiles) == 2 and not kernel.launches
    monkeypatch.setattr(_launch, "_compiled_launches", lambda first: False)
    for _ in range(2):
        _launch.launch_kernel(kernel, (1,), x, 64, BLOCK=16)
    assert len(kernel.compiles) == 4 and not kernel.launches


def test_cpu_tensors_and_the_interpreter_never_take_compiled_launches():
    assert not _launch._compiled_launches(torch.zeros(1))
    assert not _launch._compiled_launches(None)
