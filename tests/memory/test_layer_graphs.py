"""velotune.memory.layer_graphs (CUDA graphs of checkpointed layers): when a step gets graphs, runs
eagerly, or drops them; the static buffers' copy-in / clone-out rules; and the eager code around the
replays, checked on CPU with a stand-in for the capture that runs the captured function at each
replay: the graphed step must give the eager step's loss and gradients bit for bit. Capturing itself
needs CUDA: the 8B run's policy check (benchmarks/qlora_step_profile.py, "graphs" configurations)
compares the real graphs' loss and gradients with the eager step's."""

from types import SimpleNamespace

import pytest
import torch

from tests.model_zoo import loss_and_grads, random_batch, save_hf_model, velotune_lora_model
from velotune.errors import KernelError
from velotune.memory import layer_graphs
from velotune.quant import nf4_weight


class StubGraphs:
    def __init__(self, x, cos, sin, fingerprint):
        self.fingerprint = fingerprint
        self.steps = 0

    def begin_step(self, cos, sin):
        self.steps += 1


@pytest.fixture
def stub(monkeypatch):
    monkeypatch.setattr(layer_graphs, "StepGraphs", StubGraphs)
    model = torch.nn.Linear(4, 4)
    model.cuda_graphs = True
    x = SimpleNamespace(is_cuda=True, shape=(2, 8, 4), dtype=torch.bfloat16, device=torch.device("cuda:0"))
    cos = torch.zeros(8, 2)
    return model, x, cos


def step(model, x, cos, mask=None, cu=None, policy="full"):
    return layer_graphs.step_graphs(model, x, cos, cos, mask, cu, policy)


def test_a_shape_runs_eagerly_once_then_gets_its_graphs(stub):
    model, x, cos = stub
    assert step(model, x, cos) is None  # registered, eager
    graphs = step(model, x, cos)
    assert graphs is not None and graphs is step(model, x, cos, policy="save_mlp")
    assert graphs.steps == 2
    other = SimpleNamespace(**{**vars(x), "shape": (1, 8, 4)})
    assert step(model, other, cos) is None  # a new shape: eager


def test_changed_addresses_drop_the_graphs_for_an_eager_step(stub):
    model, x, cos = stub
    step(model, x, cos)
    first = step(model, x, cos)
    with torch.no_grad():
        model.weight = torch.nn.Parameter(model.weight.clone())  # a new tensor at a new address
    assert step(model, x, cos) is None
    again = step(model, x, cos)
    assert again is not None and again is not first
    nf4_weight.release_scratch()  # the 4-bit scratch buffer the graphs captured is gone
    assert step(model, x, cos) is None


def test_masks_packed_batches_cpu_tensors_other_policies_and_the_default_take_no_graphs(stub):
    model, x, cos = stub
    for mask, cu in ((torch.ones(2, 8), None), (None, torch.tensor([0, 8]))):
        assert step(model, x, cos, mask, cu) is None
        assert step(model, x, cos, mask, cu) is None
    assert step(model, torch.zeros(2, 8, 4), cos) is None
    step(model, x, cos)
    assert step(model, x, cos, policy="save_attn") is None
    model.cuda_graphs = False
    assert step(model, x, cos) is None
    assert "_cuda_graph_sets" not in model.__dict__  # turned off: the graphs are released


def test_static_buffers_copy_in_unless_they_hold_that_tensor_and_clone_out():
    graphs = layer_graphs.StepGraphs(torch.zeros(3), torch.zeros(2), torch.zeros(2), ())
    a = torch.arange(3.0)
    buf = graphs.fill("x", a)
    assert torch.equal(buf, a) and buf.data_ptr() != a.data_ptr()
    buf.fill_(7)
    out = graphs.output("x")
    assert torch.equal(out, torch.full((3,), 7.0)) and out.data_ptr() != buf.data_ptr()
    buf.fill_(8)  # as if a replay had written it: `fill` trusts that the buffer still holds `out`...
    graphs.fill("x", out)
    assert torch.equal(buf, torch.full((3,), 8.0))
    out.add_(1)  # ...unless `out` changed since
    graphs.fill("x", out)
    assert torch.equal(buf, torch.full((3,), 8.0))
    graphs.fill("x", a)  # another tensor: copied
    assert torch.equal(buf, a)
    with pytest.raises(KernelError, match="changed shape or dtype"):
        graphs.fill("x", torch.zeros(4))


def test_a_replay_invalidates_what_the_buffers_held(monkeypatch):
    monkeypatch.setattr(layer_graphs, "capture", lambda fn, pool: fn)
    graphs = layer_graphs.StepGraphs(torch.zeros(3), torch.zeros(2), torch.zeros(2), ())
    buf = graphs.fill("x", torch.ones(3))
    out = graphs.output("x")
    graphs.run(("double",), lambda: lambda: buf.mul_(2))
    assert torch.equal(buf, torch.full((3,), 2.0))
    graphs.fill("x", out)  # the replay wrote the buffer: `out` is copied back in
    assert torch.equal(buf, torch.ones(3))


def test_on_cpu_the_flag_changes_nothing(tmp_path):
    save_hf_model("llama", str(tmp_path))
    model = velotune_lora_model(str(tmp_path))
    batch = dict(zip(("input_ids", "attention_mask", "labels"), random_batch(2, 7, seed=2)))
    batch["attention_mask"] = None
    model.gradient_checkpointing = "offload"
    ref_loss, ref_grads = loss_and_grads(model, batch)
    model.cuda_graphs = True
    for _ in range(3):
        loss, grads = loss_and_grads(model, batch)
        assert torch.equal(loss, ref_loss) and all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads)
    assert not model.__dict__.get("_cuda_graph_sets")


@pytest.fixture
def eager_graphs(monkeypatch):
    """CPU "graphs": capturing returns the function itself, each replay runs it (the hand-written
    halves run on CPU under Triton's interpreter)."""
    monkeypatch.setenv("VELOTUNE_KERNELS", "triton")
    monkeypatch.setattr(layer_graphs, "supported", lambda x: True)
    captured = []

    def capture(fn, pool):
        captured.append(fn)
        return fn

    monkeypatch.setattr(layer_graphs, "capture", capture)
    return captured


@pytest.mark.parametrize(
    "policy,kept,tile,load_in_4bit,zoo",
    [("full", None, None, False, "llama"), ("save_mlp", None, None, False, "llama"),
     ("save_mlp", 2, 4, False, "llama"), ("save_mlp", 1, None, True, "llama"), ("save_mlp", 0, 4, False, "llama"),
     # Whole quantization blocks and r=8: the 4-bit GEMMs fold their LoRA and write the graphs' buffers.
     ("save_mlp", None, None, True, "llama_aligned"), ("full", None, None, True, "llama_aligned")],  # fmt: skip
)
def test_graphed_layers_give_the_eager_loss_and_gradients_bit_for_bit(
    tmp_path, eager_graphs, policy, kept, tile, load_in_4bit, zoo
):
    save_hf_model(zoo, str(tmp_path))
    r = 8 if zoo == "llama_aligned" else 4
    model = velotune_lora_model(str(tmp_path), load_in_4bit=load_in_4bit, r=r, lora_alpha=2 * r)
    n = len(model.layers)
    batch = dict(zip(("input_ids", "attention_mask", "labels"), random_batch(2, 7, seed=3)))
    batch["attention_mask"] = None
    model.gradient_checkpointing, model.checkpoint_policy = "offload", policy
    model.gate_up_kept_layers, model.mlp_tile_tokens = kept, tile
    ref = [loss_and_grads(model, batch) for _ in range(2)]
    model.cuda_graphs = True
    for i in range(4):
        loss, grads = loss_and_grads(model, batch)
        ref_loss, ref_grads = ref[i % 2]
        assert torch.equal(loss, ref_loss)
        assert grads.keys() == ref_grads.keys() and all(torch.equal(grads[k], ref_grads[k]) for k in ref_grads)
    # Steps 1 and 2 at this shape ran eagerly; the third captured every layer's graphs, the fourth replayed.
    per_layer = 1 if policy == "full" else 2
    assert len(eager_graphs) == n * per_layer
    (graphs,) = model.__dict__["_cuda_graph_sets"].values()
    kept_layers = {k[1] for k in graphs.replays if k[0] == "save_mlp forward" and k[2]}
    # Consecutive keeping layers alternate between the two sets of gate/up buffers.
    slots = [k[3] for k in sorted(graphs.replays, key=lambda k: k[1]) if k[0] == "save_mlp forward" and k[2]]
    assert slots == [j % 2 for j in range(len(kept_layers))]
    assert len(kept_layers) == (0 if policy == "full" else kept if kept is not None else round(n / 2))
    if policy == "save_mlp" and kept is None:
        # Graphed, the keeping layers are spread from the bottom layer up (eagerly, from the top down).
        assert kept_layers == {(j * n) // round(n / 2) for j in range(round(n / 2))}
    # Layer 0's input (the embedding's output) needs no gradient: its backward graph skips dx.
    assert all(k[4] == (k[1] > 0) for k in graphs.replays if k[0] == "save_mlp backward")
    if policy == "save_mlp":
        # Every layer computes its gate/up output in a set of static buffers, the layers that keep none in
        # the set of the next keeping layer above: the slot is the count of keeping layers below, mod 2.
        slots = {k[1]: k[3] for k in graphs.replays if k[0] == "save_mlp forward"}
        assert slots == {i: sum(j < i for j in kept_layers) % 2 for i in range(n)}
        sets = {role.split(".")[0] for role in graphs.buffers if role.startswith("gate_up")}
        assert sets == {f"gate_up{slot}" for slot in slots.values()}


def test_new_adapter_weights_drop_the_graphs_and_the_next_steps_follow_them(tmp_path, eager_graphs):
    save_hf_model("llama", str(tmp_path))
    model = velotune_lora_model(str(tmp_path))
    batch = dict(zip(("input_ids", "attention_mask", "labels"), random_batch(1, 6, seed=4)))
    batch["attention_mask"] = None
    model.gradient_checkpointing, model.checkpoint_policy, model.cuda_graphs = True, "save_mlp", True
    for _ in range(3):
        loss_and_grads(model, batch)
    lora_b = next(p for name, p in model.named_parameters() if "lora_B" in name)
    owner = next(m for m in model.modules() if any(p is lora_b for p in m._parameters.values()))
    name = next(k for k, p in owner._parameters.items() if p is lora_b)
    with torch.no_grad():
        owner._parameters[name] = torch.nn.Parameter(lora_b * 3)  # a new tensor the graphs never saw
    model.cuda_graphs = False
    ref_loss, ref_grads = loss_and_grads(model, batch)
    model.cuda_graphs = True
    for _ in range(3):  # eager (new fingerprint), captured, replayed
        loss, grads = loss_and_grads(model, batch)
        assert torch.equal(loss, ref_loss) and all(torch.equal(grads[k], ref_grads[k]) for k in ref_grads)


def test_a_model_without_graphs_holds_no_graph_pool_memory(tmp_path):
    model = torch.nn.Linear(4, 4)
    assert layer_graphs.pool_bytes(model) == 0
    cpu_graphs = layer_graphs.StepGraphs(torch.zeros(2), torch.zeros(2), torch.zeros(2), ())
    model.__dict__["_cuda_graph_sets"] = {"cpu": cpu_graphs}
    assert layer_graphs.pool_bytes(model) == 0  # CPU graphs (the tests' stand-in) have no pool


def test_a_failed_capture_says_which_graph_and_how_to_train_without_graphs(monkeypatch):
    def capture(fn, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(layer_graphs, "capture", capture)
    graphs = layer_graphs.StepGraphs(torch.zeros(3), torch.zeros(2), torch.zeros(2), ())
    with pytest.raises(KernelError, match=r"save_mlp backward \(layer 7\).*model.cuda_graphs = False"):
        graphs.run(("save_mlp backward", 7, True, 0, True), lambda: lambda: None)
    assert not graphs.replays  # nothing half-captured is kept
