"""velotune.memory.forward_graphs (CUDA graphs of checkpointed layers' first forward): when a step
gets graphs, runs eagerly, or drops them. The graphs themselves need CUDA: the 8B run's policy check
(benchmarks/qlora_step_profile.py, "forward graphs" configurations) compares their loss and gradients
with the eager step's."""

from types import SimpleNamespace

import pytest
import torch

from tests.model_zoo import loss_and_grads, random_batch, save_hf_model, velotune_lora_model
from velotune.memory import forward_graphs
from velotune.quant import nf4_weight


class StubGraphs:
    def __init__(self, x, cos, sin, fingerprint):
        self.fingerprint = fingerprint
        self.steps = 0

    def begin_step(self, cos, sin):
        self.steps += 1


@pytest.fixture
def stub(monkeypatch):
    monkeypatch.setattr(forward_graphs, "LayerGraphs", StubGraphs)
    model = torch.nn.Linear(4, 4)
    model.forward_graphs = True
    x = SimpleNamespace(is_cuda=True, shape=(2, 8, 4), dtype=torch.bfloat16, device="cuda:0")
    cos = torch.zeros(8, 2)
    return model, x, cos


def test_a_shape_runs_eagerly_once_then_gets_its_graphs(stub):
    model, x, cos = stub
    assert forward_graphs.step_graphs(model, x, cos, cos, None, None) is None  # registered, eager
    graphs = forward_graphs.step_graphs(model, x, cos, cos, None, None)
    assert graphs is not None and graphs is forward_graphs.step_graphs(model, x, cos, cos, None, None)
    assert graphs.steps == 2
    other = SimpleNamespace(**{**vars(x), "shape": (1, 8, 4)})
    assert forward_graphs.step_graphs(model, other, cos, cos, None, None) is None  # a new shape: eager


def test_changed_addresses_drop_the_graphs_for_an_eager_step(stub):
    model, x, cos = stub
    forward_graphs.step_graphs(model, x, cos, cos, None, None)
    first = forward_graphs.step_graphs(model, x, cos, cos, None, None)
    with torch.no_grad():
        model.weight = torch.nn.Parameter(model.weight.clone())  # a new tensor at a new address
    assert forward_graphs.step_graphs(model, x, cos, cos, None, None) is None
    again = forward_graphs.step_graphs(model, x, cos, cos, None, None)
    assert again is not None and again is not first
    nf4_weight.release_scratch()  # the 4-bit scratch buffer the graphs captured is gone
    assert forward_graphs.step_graphs(model, x, cos, cos, None, None) is None


def test_masks_packed_batches_cpu_tensors_and_the_default_take_no_graphs(stub):
    model, x, cos = stub
    for mask, cu in ((torch.ones(2, 8), None), (None, torch.tensor([0, 8]))):
        assert forward_graphs.step_graphs(model, x, cos, cos, mask, cu) is None
        assert forward_graphs.step_graphs(model, x, cos, cos, mask, cu) is None
    assert forward_graphs.step_graphs(model, torch.zeros(2, 8, 4), cos, cos, None, None) is None
    model.forward_graphs = False
    forward_graphs.step_graphs(model, x, cos, cos, None, None)
    assert forward_graphs.step_graphs(model, x, cos, cos, None, None) is None


def test_on_cpu_the_flag_changes_nothing(tmp_path):
    save_hf_model("llama", str(tmp_path))
    model = velotune_lora_model(str(tmp_path))
    batch = dict(zip(("input_ids", "attention_mask", "labels"), random_batch(2, 7, seed=2)))
    batch["attention_mask"] = None
    model.gradient_checkpointing = "offload"
    ref_loss, ref_grads = loss_and_grads(model, batch)
    model.forward_graphs = True
    for _ in range(3):
        loss, grads = loss_and_grads(model, batch)
        assert torch.equal(loss, ref_loss) and all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads)
    assert not model.__dict__.get("_forward_graph_sets")
