"""Every launch configuration of the gated-activation kernels computes the same values and gradients
as the reference (the sweep in benchmarks/kernel_sweep.py times only configurations tested here)."""

import pytest
import torch

from benchmarks.kernel_sweep import GATED_CANDIDATES
from tests.kernels.checks import norm_rel_err as _rel_err
from velotune.errors import KernelError
from velotune.kernels.activations import (
    DEFAULT_GATED_CONFIG,
    GatedActivationFunction,
    GatedConfig,
    GatedLaunch,
    _launch_args,
    gated_activation_reference,
)

# Small launches reach every code path at interpreter-friendly widths: full tiles without masks
# (width a multiple of the block), a masked tail, and several loop steps per row.
SMALL_LAUNCHES = (
    GatedLaunch("2d", 64, 2),
    GatedLaunch("flat", 64, 2),
    GatedLaunch("flat", 32, 1, evict_first=True),
    GatedLaunch("row", 64, 2),
    GatedLaunch("row", 1024, 4),
)


def _run(gate_up, activation, config, through_view=True):
    leaf = gate_up.detach().clone().requires_grad_(True)
    # A view makes gate_up an intermediate, so the backward writes its gradient in place (as in the MLP).
    x = leaf.view_as(leaf) if through_view else leaf
    if config is None:
        y = gated_activation_reference(x, activation)
    else:
        y = GatedActivationFunction.apply(x, activation, config)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(11)).to(y.dtype)
    y.backward(dy)
    return y.detach(), leaf.grad


def _assert_matches_reference(gate_up, activation, config):
    y, dgu = _run(gate_up, activation, config)
    y_ref, dgu_ref = _run(gate_up, activation, None)
    assert _rel_err(y, y_ref) < 1e-5
    for got, want in zip(dgu.chunk(2, -1), dgu_ref.chunk(2, -1)):
        assert _rel_err(got, want) < 1e-5


@pytest.mark.parametrize("launch", GATED_CANDIDATES, ids=lambda c: c.label())
@pytest.mark.parametrize("inter", [2051, 2048])
def test_every_swept_launch_matches_the_reference_at_ragged_and_block_multiple_widths(launch, inter):
    gate_up = torch.randn(3, 2 * inter, generator=torch.Generator().manual_seed(inter)) * 2
    _assert_matches_reference(gate_up, "silu", GatedConfig(launch, launch))


@pytest.mark.parametrize("launch", SMALL_LAUNCHES, ids=lambda c: c.label())
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(1, 2 * 1), (5, 2 * 64), (2, 3, 2 * 173)])
def test_small_launches_match_the_reference_for_both_activations(launch, activation, shape):
    gate_up = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 2
    _assert_matches_reference(gate_up, activation, GatedConfig(launch, launch))


def test_forward_and_backward_launches_are_chosen_independently():
    gate_up = torch.randn(4, 2 * 130, generator=torch.Generator().manual_seed(5))
    config = GatedConfig(forward=GatedLaunch("row", 32, 1), backward=GatedLaunch("flat", 128, 4))
    _assert_matches_reference(gate_up, "gelu_tanh", config)


@pytest.mark.parametrize("grid", ["2d", "flat", "row"])
def test_every_grid_writes_every_output_and_gradient_element(poisoned_buffers, grid):
    launch = GatedLaunch(grid, 64, 2)
    # A leaf gate_up: the gradient goes to a fresh (NaN-poisoned) buffer, not over gate_up.
    y, dgu = _run(torch.randn(3, 2 * 150), "silu", GatedConfig(launch, launch), through_view=False)
    assert torch.isfinite(y).all() and torch.isfinite(dgu).all()


def test_full_width_tiles_are_launched_without_masks_and_ragged_ones_with():
    _, _, meta = _launch_args(8, 14336, GatedLaunch("flat", 1024, 4))
    assert meta["EVEN"] and meta["BLOCK"] == 1024
    _, _, meta = _launch_args(8, 14336, GatedLaunch("row", 65536, 16))
    assert not meta["EVEN"] and meta["BLOCK"] == 16384  # capped at next_power_of_2(I)


def test_grids_have_the_documented_shapes():
    assert _launch_args(8, 14336, GatedLaunch("2d", 1024, 4))[0] == (8, 14)
    assert _launch_args(8, 14336, GatedLaunch("flat", 1024, 4))[0] == (8 * 14,)
    assert _launch_args(8, 14336, GatedLaunch("row", 4096, 8))[0] == (8,)
    assert _launch_args(3, 10, DEFAULT_GATED_CONFIG.forward)[2]["BLOCK"] == 16


def test_launches_beyond_cuda_grid_limits_raise_a_kernel_error():
    with pytest.raises(KernelError, match="launch limits"):
        _launch_args(2**31, 4096, GatedLaunch("flat", 1024, 4))
    with pytest.raises(KernelError, match="launch limits"):
        _launch_args(4, 2**27, GatedLaunch("2d", 1024, 4))


def test_invalid_launches_are_rejected_with_what_is_expected():
    with pytest.raises(KernelError, match="grid"):
        GatedLaunch("diagonal")
    with pytest.raises(KernelError, match="power of two"):
        GatedLaunch("flat", 1000)
    with pytest.raises(KernelError, match="num_warps"):
        GatedLaunch("flat", 1024, 3)
