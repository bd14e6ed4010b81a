import pytest
import torch

from velotune.kernels import rmsnorm
from velotune.kernels.rmsnorm import RMSNormFunction, rms_norm, rms_norm_reference


def _nan_filled(make):
    def empty(*args, **kwargs):
        t = make(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    return empty


@pytest.fixture
def poisoned_buffers(monkeypatch):
    """Every buffer the op allocates starts as NaN, so an element the kernel forgets to write shows up."""
    monkeypatch.setattr(torch, "empty", _nan_filled(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _nan_filled(torch.empty_like))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _run(fn, x, w, eps, offset, train_weight):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(train_weight)
    y = fn(x, w, eps, offset)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def _compare(shape, offset, train_weight, dtype=torch.float32, tol=1e-5):
    gen = torch.Generator().manual_seed(hash((shape, offset)) % 2**31)
    x = torch.randn(shape, generator=gen).to(dtype) * 3
    w = (torch.randn(shape[-1], generator=gen) * 0.2 + (0.0 if offset else 1.0)).to(dtype)
    y, dx, dw = _run(RMSNormFunction.apply, x, w, 1e-6, offset, train_weight)
    y_ref, dx_ref, dw_ref = _run(rms_norm_reference, x, w, 1e-6, offset, train_weight)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    assert _rel_err(y, y_ref) < tol
    assert _rel_err(dx, dx_ref) < tol
    if train_weight:
        assert _rel_err(dw, dw_ref) < tol
    else:
        assert dw is None


@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("train_weight", [True, False])
@pytest.mark.parametrize("shape", [(3, 37, 97), (1, 1, 200), (1, 5, 64), (130, 33)])
def test_triton_rms_norm_matches_reference_values_and_gradients(shape, offset, train_weight):
    _compare(shape, offset, train_weight)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_triton_rms_norm_matches_reference_in_float16(offset):
    _compare((2, 9, 160), offset, True, dtype=torch.float16, tol=2e-3)


def test_triton_rms_norm_writes_every_output_and_gradient_element(poisoned_buffers):
    for offset in (0.0, 1.0):
        y, dx, dw = _run(RMSNormFunction.apply, torch.randn(2, 11, 75), torch.rand(75), 1e-5, offset, True)
        assert torch.isfinite(y).all() and torch.isfinite(dx).all() and torch.isfinite(dw).all()


def test_rms_norm_with_frozen_weight_allocates_no_weight_gradient_buffer(monkeypatch):
    shapes = []
    real_empty = torch.empty

    def recording_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        shapes.append(tuple(t.shape))
        return t

    monkeypatch.setattr(torch, "empty", recording_empty)
    _run(RMSNormFunction.apply, torch.randn(40, 48), torch.rand(48), 1e-6, 0.0, False)
    # y, rstd, dx only; a partial-dW buffer would be a fourth allocation of shape [n_programs, 48].
    assert shapes == [(40, 48), (40,), (40, 48)]


def test_rms_norm_accepts_strided_rows_without_copying_them():
    base = torch.randn(6, 2, 70)
    x = base[:, 0, :]  # row stride 140, not hidden
    w = torch.rand(70)
    y, dx, dw = _run(RMSNormFunction.apply, x, w, 1e-6, 0.0, True)
    y_ref, dx_ref, dw_ref = _run(rms_norm_reference, x, w, 1e-6, 0.0, True)
    assert _rel_err(y, y_ref) < 1e-5 and _rel_err(dx, dx_ref) < 1e-5 and _rel_err(dw, dw_ref) < 1e-5


def test_rms_norm_takes_the_triton_path_when_kernels_are_forced(monkeypatch):
    monkeypatch.setenv("VELOTUNE_KERNELS", "triton")
    calls = []
    real = rmsnorm.rms_norm_forward
    monkeypatch.setattr(rmsnorm, "rms_norm_forward", lambda *a: calls.append(1) or real(*a))
    x, w = torch.randn(4, 33), torch.rand(33)
    assert _rel_err(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6)) < 1e-6
    assert calls == [1]


def test_rms_norm_rejects_hidden_sizes_beyond_the_kernel_limit():
    from velotune.errors import KernelError

    with pytest.raises(KernelError, match="hidden"):
        RMSNormFunction.apply(torch.randn(1, 16385), torch.ones(16385), 1e-6, 0.0)
