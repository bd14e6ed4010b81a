import pytest
import torch

from tests.kernels.checks import norm_rel_err as _rel_err
from velotune.errors import KernelError
from velotune.kernels import rmsnorm
from velotune.kernels.rmsnorm import RMSNormFunction, rms_norm, rms_norm_reference


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


@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("n_rows,n_programs", [(1, 4), (2, 4), (9, 4), (13, 4), (13, 5), (7, 7), (16, 3)])
def test_rms_norm_backward_splits_rows_over_any_program_count(monkeypatch, n_rows, n_programs, offset):
    # Row counts that do not divide evenly, fewer rows than programs, and one row per program, all on
    # the chunked dW kernel.
    monkeypatch.setattr(rmsnorm, "_dw_programs", lambda x, n: max(1, min(n_programs, n)))
    gen = torch.Generator().manual_seed(n_rows * 31 + n_programs)
    x = torch.randn(n_rows, 45, generator=gen) * 2
    w = torch.randn(45, generator=gen) * 0.3 + (0.0 if offset else 1.0)
    y, dx, dw = _run(RMSNormFunction.apply, x, w, 1e-6, offset, True)
    y_ref, dx_ref, dw_ref = _run(rms_norm_reference, x, w, 1e-6, offset, True)
    assert _rel_err(y, y_ref) < 1e-5 and _rel_err(dx, dx_ref) < 1e-5 and _rel_err(dw, dw_ref) < 1e-5


def test_rms_norm_backward_launches_no_program_without_rows(monkeypatch):
    # 9 rows over 4 requested programs is 3 rows each: a fourth program would only write zeros.
    monkeypatch.setattr(rmsnorm, "_dw_programs", lambda x, n: 4)
    shapes = []
    real_empty = torch.empty

    def recording_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        shapes.append(tuple(t.shape))
        return t

    monkeypatch.setattr(torch, "empty", recording_empty)
    _run(RMSNormFunction.apply, torch.randn(9, 20), torch.rand(20), 1e-6, 0.0, True)
    assert (3, 20) in shapes and (4, 20) not in shapes


@pytest.mark.parametrize("train_weight", [True, False])
def test_rms_norm_backward_ignores_rows_past_the_last_one(train_weight):
    # x and dy are views of larger buffers whose following rows are NaN: a kernel that used a row past
    # the last one (an off-by-one in the chunk bounds) would turn the gradients into NaN.
    n, h = 11, 50
    xb = torch.full((n + 2, h), float("nan"))
    xb[:n] = torch.randn(n, h, generator=torch.Generator().manual_seed(3))
    x = xb[:n].requires_grad_(True)
    w = torch.rand(h).requires_grad_(train_weight)
    y = RMSNormFunction.apply(x, w, 1e-6, 0.0)
    dyb = torch.full((n + 2, h), float("nan"))
    dyb[:n] = torch.randn(n, h, generator=torch.Generator().manual_seed(4))
    y.backward(dyb[:n])
    xr = xb[:n].clone().requires_grad_(True)
    wr = w.detach().clone().requires_grad_(train_weight)
    rms_norm_reference(xr, wr, 1e-6, 0.0).backward(dyb[:n])
    assert _rel_err(x.grad, xr.grad) < 1e-5
    if train_weight:
        assert _rel_err(w.grad, wr.grad) < 1e-5


def test_rms_norm_frozen_weight_backward_writes_every_gradient_element(poisoned_buffers):
    for offset in (0.0, 1.0):
        x, w = torch.randn(1, 13, 75), torch.rand(75)
        _, dx, dw = _run(RMSNormFunction.apply, x, w, 1e-5, offset, False)
        _, dx_ref, _ = _run(rms_norm_reference, x, w, 1e-5, offset, False)
        assert dw is None and torch.isfinite(dx).all() and _rel_err(dx, dx_ref) < 1e-5


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_forward_into_the_first_columns_of_wider_rows_gives_bitwise_its_own_output(offset):
    # Where a 4-bit projection folds its LoRA, the norm writes into the GEMM's wider input buffer.
    gen = torch.Generator().manual_seed(11)
    x, weight = torch.randn(2, 7, 48, generator=gen), torch.randn(48, generator=gen)
    y, rstd = rmsnorm.rms_norm_forward(x, weight, 1e-5, offset)
    buf = torch.full((14, 56), float("nan"))
    y_wide, rstd_wide = rmsnorm.rms_norm_forward(x, weight, 1e-5, offset, out=buf[:, :48])
    assert torch.equal(y_wide, y) and torch.equal(rstd_wide, rstd) and y_wide.data_ptr() == buf.data_ptr()
    assert buf[:, 48:].isnan().all()
    with pytest.raises(KernelError, match="out must be"):
        rmsnorm.rms_norm_forward(x, weight, 1e-5, offset, out=buf[:, :40])
