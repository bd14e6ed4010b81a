import pytest
import torch

from tests.kernels.checks import norm_rel_err as _rel_err
from velotune.errors import KernelError
from velotune.kernels import activations
from velotune.kernels.activations import (
    GatedActivationFunction,
    gated_activation,
    gated_activation_reference,
)


def _run(fn, gate_up, activation):
    gate_up = gate_up.detach().clone().requires_grad_(True)
    y = fn(gate_up, activation)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.dtype)
    y.backward(dy)
    return y.detach(), gate_up.grad


def _compare(gate_up, activation, tol=1e-5):
    y, dgu = _run(GatedActivationFunction.apply, gate_up, activation)
    y_ref, dgu_ref = _run(gated_activation_reference, gate_up, activation)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype and dgu.shape == gate_up.shape
    assert _rel_err(y, y_ref) < tol
    assert _rel_err(dgu, dgu_ref) < tol
    # The gate and up halves are compared apart so an error in the smaller one is not hidden.
    gate_grad, up_grad = dgu.chunk(2, -1)
    gate_grad_ref, up_grad_ref = dgu_ref.chunk(2, -1)
    assert _rel_err(gate_grad, gate_grad_ref) < tol and _rel_err(up_grad, up_grad_ref) < tol


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(2, 7, 2 * 45), (1, 1, 2 * 3), (1, 3, 2 * 1500), (33, 2 * 64)])
def test_triton_gated_activation_matches_reference_values_and_gradients(shape, activation):
    gen = torch.Generator().manual_seed(sum(shape))
    _compare(torch.randn(shape, generator=gen) * 2, activation)


# The interpreter runs exp in numpy, which warns where exp(-x) overflows to inf (sigmoid is then 0).
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_triton_gated_activation_is_accurate_in_the_saturated_tails(activation):
    # Large |gate| saturates sigmoid / tanh. The kernel forms 1 + tanh(u) as 2*sigmoid(2u), which keeps
    # its relative accuracy there; torch's float32 1 + tanh(u) cancels (its GELU gradient at -5 is 30%
    # off), so the judge here is the reference evaluated in float64.
    gate = torch.linspace(-30, 30, 301)
    up = torch.randn(301, generator=torch.Generator().manual_seed(1))
    gate_up = torch.cat((gate, up))[None]
    y, dgu = _run(GatedActivationFunction.apply, gate_up, activation)
    y_ref, dgu_ref = _run(gated_activation_reference, gate_up.double(), activation)
    assert torch.isfinite(y).all() and torch.isfinite(dgu).all()
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(dgu.double(), dgu_ref, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_triton_gated_activation_matches_reference_in_float16(activation):
    gate_up = torch.randn(3, 5, 2 * 130, generator=torch.Generator().manual_seed(2)).half()
    _compare(gate_up, activation, tol=2e-3)


def test_triton_gated_activation_reads_a_strided_gate_up():
    base = torch.randn(4, 3, 2 * 50, generator=torch.Generator().manual_seed(4))
    gate_up = base[:, 1]  # row stride 300
    for activation in ("silu", "gelu_tanh"):
        _compare(gate_up, activation)


def test_triton_gated_activation_writes_every_output_and_gradient_element(poisoned_buffers):
    for activation in ("silu", "gelu_tanh"):
        y, dgu = _run(GatedActivationFunction.apply, torch.randn(2, 5, 2 * 1030), activation)
        assert torch.isfinite(y).all() and torch.isfinite(dgu).all()


def test_gated_activation_takes_the_triton_path_when_kernels_are_forced(monkeypatch):
    monkeypatch.setenv("VELOTUNE_KERNELS", "triton")
    calls = []
    real = activations.gated_activation_forward
    monkeypatch.setattr(activations, "gated_activation_forward", lambda *a: calls.append(1) or real(*a))
    gate_up = torch.randn(3, 2 * 20)
    assert _rel_err(gated_activation(gate_up, "silu"), gated_activation_reference(gate_up, "silu")) < 1e-6
    assert calls == [1]


def test_gated_activation_rejects_unknown_activations_and_odd_widths():
    with pytest.raises(KernelError, match="relu"):
        GatedActivationFunction.apply(torch.randn(2, 8), "relu")
    with pytest.raises(KernelError, match="odd"):
        GatedActivationFunction.apply(torch.randn(2, 7), "silu")


def _through_a_projection(fn, x, w, activation, retain_graph=False):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    gate_up = x @ w  # an intermediate, as in the MLP: the Triton backward writes its gradient over it
    y = fn(gate_up, activation)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    y.backward(dy, retain_graph=retain_graph)
    return y.detach(), x.grad, w.grad, (y, dy)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gradient_written_over_the_projection_output_matches_the_reference(activation):
    gen = torch.Generator().manual_seed(6)
    x, w = torch.randn(3, 7, 24, generator=gen), torch.randn(24, 2 * 37, generator=gen)
    y, dx, dw, _ = _through_a_projection(GatedActivationFunction.apply, x, w, activation)
    y_ref, dx_ref, dw_ref, _ = _through_a_projection(gated_activation_reference, x, w, activation)
    assert _rel_err(y, y_ref) < 1e-5
    assert _rel_err(dx, dx_ref) < 1e-5 and _rel_err(dw, dw_ref) < 1e-5


def test_a_second_backward_through_a_retained_graph_fails_instead_of_reading_overwritten_values():
    gen = torch.Generator().manual_seed(7)
    x, w = torch.randn(5, 16, generator=gen), torch.randn(16, 2 * 9, generator=gen)
    _, _, _, (y, dy) = _through_a_projection(GatedActivationFunction.apply, x, w, "silu", retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(dy)


def test_a_leaf_gate_up_is_left_unchanged_by_the_backward():
    gate_up = torch.randn(4, 2 * 11, generator=torch.Generator().manual_seed(8)).requires_grad_(True)
    before = gate_up.detach().clone()
    GatedActivationFunction.apply(gate_up, "silu").sum().backward()
    assert torch.equal(gate_up.detach(), before)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_forward_into_the_first_columns_of_wider_rows_gives_bitwise_its_own_output(activation):
    # Where a 4-bit down projection folds its LoRA, the activation writes into the GEMM's wider input.
    gu = torch.randn(9, 2 * 40, generator=torch.Generator().manual_seed(12))
    y = activations.gated_activation_forward(gu, activation)
    buf = torch.full((9, 48), float("nan"))
    y_wide = activations.gated_activation_forward(gu, activation, out=buf[:, :40])
    assert torch.equal(y_wide, y) and buf[:, 40:].isnan().all()
    with pytest.raises(KernelError, match="out must be"):
        activations.gated_activation_forward(gu, activation, out=buf[:, :39])
