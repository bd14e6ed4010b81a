"""velotune.train.callbacks: the peak memory the trainer logs."""

import torch

from velotune.memory import layer_graphs
from velotune.train import callbacks


def test_the_logged_gpu_peak_counts_the_cuda_graphs_pool(monkeypatch):
    # A graph's pool is reserved for its replays yet not counted by the allocator's peak while they run:
    # the logged figure is the allocator's peak plus the pool of the model's graphs.
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(layer_graphs, "pool_bytes", lambda m: 2**29 if m is model else 0)
    cuda = torch.device("cuda", 0)
    assert callbacks.memory_gb(cuda, model) == 3.5
    assert callbacks.memory_gb(cuda) == 3.0  # no model: the allocator's peak alone


def test_off_the_gpu_the_logged_peak_is_the_process_peak_resident_size():
    assert callbacks.memory_gb(torch.device("cpu"), torch.nn.Linear(2, 2)) > 0.01
