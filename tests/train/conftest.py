"""Fixtures shared by the trainer tests."""

import pytest
import torch

from tests.train.helpers import tiny_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random Llama saved with its tokenizer (one per test module)."""
    path = tmp_path_factory.mktemp("llama")
    tiny_model(path, "llama")
    return path


@pytest.fixture
def one_thread():
    """One intra-op thread, as in the worker processes: the same arithmetic, and no contention between
    threads over the few cores CI has (the tiny models are several times faster that way)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
