import pytest
import torch

from tests.kernels.checks import nan_filled


@pytest.fixture
def poisoned_buffers(monkeypatch):
    """Every buffer the op allocates starts as NaN, so an element the kernel forgets to write shows up."""
    monkeypatch.setattr(torch, "empty", nan_filled(torch.empty))
    monkeypatch.setattr(torch, "empty_like", nan_filled(torch.empty_like))
