"""Gradient checkpointing (GPU-resident and offloaded), selective recomputation and sequence tiling
give the loss and gradients of the plain forward: bitwise in float32 on CPU without tiling, to 1e-6
with it."""

import pytest
import torch

import velotune
from tests.model_zoo import loss_and_grads, random_batch, rel_err, save_hf_model
from velotune.errors import ConfigError, KernelError
from velotune.memory.checkpoint import (
    checkpoint_mode,
    default_gate_up_kept_layers,
    gate_up_keeping_layers,
    recompute,
    sequence_tiled,
)
from velotune.memory.tiled import token_tiles


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for family in ("llama", "gemma2", "mixtral"):
        folder = tmp_path_factory.mktemp(family)
        save_hf_model(family, str(folder))
        out[family] = str(folder)
    return out


def load(folder):
    model, _ = velotune.FastLanguageModel.from_pretrained(
        folder, dtype=torch.float32, device_map="cpu", full_finetuning=True, progress=False
    )
    return model.train()


def padded_batch():
    ids, mask, labels = random_batch(2, 11, seed=3, padding="right")
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("family", ["llama", "gemma2", "mixtral"])
@pytest.mark.parametrize(
    "mode,policy",
    [(True, "full"), ("offload", "full"), (True, "save_attn"), ("offload", "save_attn"), (True, "save_mlp"),
     ("offload", "save_mlp")],
)  # fmt: skip
def test_checkpointed_training_gives_bitwise_the_loss_and_every_gradient_of_the_plain_one(
    folders, family, mode, policy
):
    model = load(folders[family])
    batch = padded_batch()
    ref_loss, ref_grads = loss_and_grads(model, batch)
    model.gradient_checkpointing, model.checkpoint_policy = mode, policy
    loss, grads = loss_and_grads(model, batch)
    assert len(ref_grads) == len(list(model.parameters()))
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert torch.equal(grads[name], ref_grads[name]), name


@pytest.mark.parametrize("mode", [True, "offload"])
def test_checkpointing_with_a_frozen_embedding_and_attention_matches_the_plain_gradients(folders, mode):
    # As with LoRA: the first layer's input needs no gradient, and some layers' halves train nothing.
    model = load(folders["llama"])
    for name, p in model.named_parameters():
        p.requires_grad_("mlp" in name)
    batch = padded_batch()
    ref_loss, ref_grads = loss_and_grads(model, batch)
    model.gradient_checkpointing = mode
    loss, grads = loss_and_grads(model, batch)
    assert torch.equal(loss, ref_loss) and grads.keys() == ref_grads.keys() and ref_grads
    for name in ref_grads:
        assert torch.equal(grads[name], ref_grads[name]), name


@pytest.mark.parametrize("family", ["llama", "mixtral"])
@pytest.mark.parametrize("mode", [False, True, "offload"])
def test_a_model_whose_mlp_runs_in_sequence_tiles_matches_the_untiled_gradients(folders, family, mode):
    model = load(folders[family])
    ids, _, labels = random_batch(1, 23, seed=4)
    positions = torch.cat([torch.arange(9), torch.arange(14)])[None]  # packed: two documents
    batch = dict(input_ids=ids, position_ids=positions, labels=labels)
    ref_loss, ref_grads = loss_and_grads(model, batch)
    model.gradient_checkpointing, model.mlp_tile_tokens = mode, 5  # 23 tokens: 5 tiles, the last short
    loss, grads = loss_and_grads(model, batch)
    assert rel_err(loss, ref_loss) < 1e-6 and grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-6, name


def test_tiled_mlp_block_gives_the_untiled_output_and_gradients_to_1e6(folders):
    layer = load(folders["gemma2"]).layers[1]  # sandwich norms: the tail has a norm after the MLP
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 13, layer.spec.hidden_size, generator=gen, requires_grad=True)
    dy = torch.randn(3, 13, layer.spec.hidden_size, generator=gen)
    params = [p for p in layer.parameters() if p.requires_grad]

    def grads_of(fn):
        out = fn(h)
        got = torch.autograd.grad(out, [h, *params], dy, allow_unused=True)
        return out.detach(), got

    ref_out, ref = grads_of(layer.mlp_block)
    out, got = grads_of(lambda t: sequence_tiled(layer.mlp_block, t, params, tile_tokens=4))
    assert len(token_tiles(39, 4)) == 10
    assert rel_err(out, ref_out) < 1e-6
    for g, r in zip(got, ref):
        assert (g is None) == (r is None)
        if r is not None:
            assert rel_err(g, r) < 1e-6


def test_recomputation_replays_the_dropout_masks_of_the_forward():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 16, generator=gen, requires_grad=True)
    x = torch.randn(2, 7, 16, generator=gen, requires_grad=True)

    def head(t):
        return torch.nn.functional.dropout(t, p=0.5, training=True) @ w

    def tail(t):
        return torch.nn.functional.dropout(torch.tanh(t), p=0.3, training=True)

    def run(fn):
        torch.manual_seed(7)
        out = fn(x)
        grads = torch.autograd.grad(out.square().sum(), [x, w])
        return out, grads, torch.rand(3)

    ref_out, ref_grads, ref_after = run(lambda t: tail(head(t)))
    # keep_tail_input: the tail is differentiated first, from its kept input, then the head is
    # recomputed: each replays its own part of the forward's random stream.
    for keep in (False, True):
        out, grads, after = run(lambda t: recompute(head, tail, t, [w], tile_tokens=3, keep_tail_input=keep))
        assert torch.equal(out, ref_out) and torch.equal(after, ref_after)
        for g, r in zip(grads, ref_grads):
            assert rel_err(g, r) < 1e-6


def test_keeping_needs_a_head_and_the_gate_up_output_needs_the_fused_mlp():
    w = torch.randn(4, 4, requires_grad=True)
    with pytest.raises(KernelError, match="no tail input"):
        recompute(None, lambda t: t @ w, torch.randn(3, 4), [w], keep_tail_input=True)
    with pytest.raises(KernelError, match="fused MLP"):
        recompute(lambda t: t * 2, lambda t: t @ w, torch.randn(3, 4), [w], keep_tail_input=True, keep_gate_up=True)


class _Layers(torch.nn.Module):
    def __init__(self, n, kept=None):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Identity() for _ in range(n))
        self.gate_up_kept_layers = kept


def test_the_layers_keeping_their_gate_up_output_are_spread_from_the_top_down():
    assert gate_up_keeping_layers(_Layers(32)) == frozenset(range(31, -1, -2))  # the default half
    assert gate_up_keeping_layers(_Layers(32, 0)) == frozenset()
    assert gate_up_keeping_layers(_Layers(32, 32)) == frozenset(range(32))
    assert gate_up_keeping_layers(_Layers(5, 1)) == frozenset({4})
    assert len(gate_up_keeping_layers(_Layers(32, 21))) == 21
    assert default_gate_up_kept_layers(32) == 16
    for bad in (33, -1, 1.5, True):
        with pytest.raises(ConfigError, match="gate_up_kept_layers"):
            gate_up_keeping_layers(_Layers(32, bad))


def test_a_second_backward_through_a_checkpoint_is_refused_with_a_clear_error():
    w = torch.randn(4, 4, requires_grad=True)
    out = recompute(None, lambda t: t @ w, torch.randn(3, 4), [w])
    out.sum().backward(retain_graph=True)
    with pytest.raises(KernelError, match="retain_graph"):
        out.sum().backward()


def test_gradient_checkpointing_values_are_normalised_or_refused():
    assert checkpoint_mode(False) is False and checkpoint_mode(True) is True
    assert checkpoint_mode("offload") == "offload" and checkpoint_mode("unsloth") == "offload"
    with pytest.raises(ConfigError, match="offload"):
        checkpoint_mode("sometimes")


def test_an_unknown_checkpoint_policy_is_refused(folders):
    model = load(folders["llama"])
    model.gradient_checkpointing, model.checkpoint_policy = True, "save_everything"
    with pytest.raises(ConfigError, match="save_attn"):
        model(**padded_batch())


def test_evaluation_and_no_grad_forwards_ignore_checkpointing(folders):
    model = load(folders["llama"])
    batch = padded_batch()
    ref = model(**batch).loss.detach()
    model.gradient_checkpointing = "offload"
    with torch.no_grad():
        assert torch.equal(model(**batch).loss, ref)
    model.eval()
    assert torch.equal(model(**batch).loss.detach(), ref)
