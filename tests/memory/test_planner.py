"""The memory planner: parameter bytes equal the real model's, per-token activation sizes equal what
the kernels save, and the estimates order and scale as the modes say they should."""

import argparse

import pytest
import torch

import velotune
from tests.model_zoo import save_hf_model
from velotune.errors import ConfigError
from velotune.memory.planner import (
    HOST_RESERVE,
    _offload_block_bytes,
    add_plan_command,
    estimate_memory,
    layer_bytes_per_token,
    lora_parameter_count,
    longest_sequence,
)
from velotune.models.rope_scaling import rope_cos_sin

GIB = 1024**3
FAMILIES = ["llama", "llama_tied_bias", "gemma2", "qwen3", "phi3", "mixtral"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(family)
        save_hf_model(family, str(folder))
        out[family] = str(folder)
    return out


def load(folder):
    model, _ = velotune.FastLanguageModel.from_pretrained(
        folder, dtype=torch.float32, device_map="cpu", full_finetuning=True, progress=False
    )
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_bytes_are_those_of_the_loaded_model(folders, family):
    model = load(folders[family])
    actual = sum(p.numel() * p.element_size() for p in model.parameters())
    estimate = estimate_memory(folders[family], "full", dtype="float32", seq=16)
    assert estimate.weights == actual
    assert estimate.gradients == actual and estimate.optimizer == 2 * actual  # AdamW in the params' dtype


@pytest.mark.parametrize(
    "family,targets",
    [
        ("llama", "all-linear"),
        ("phi3", "all-linear"),  # fused qkv_proj and gate_up_proj
        ("mixtral", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
        ("llama", ("q_proj", "down_proj")),
    ],
)
def test_lora_parameter_count_is_what_get_peft_model_adds(folders, family, targets):
    model = velotune.FastLanguageModel.get_peft_model(load(folders[family]), r=8, target_modules=targets)
    added = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_parameter_count(model.spec, 8, None if targets == "all-linear" else targets) == added


def _saved_bytes_per_token(fn, x, ignore, params, tokens):
    """Bytes of the distinct storages fn's graph saves, leaving out parameters and `ignore`d tensors."""
    skip = {t.untyped_storage().data_ptr() for t in ignore} | params
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        # Per-row norm statistics ([..., 1] or 1-D) are a few bytes per token; the planner rounds them away.
        if ptr not in skip and t.shape[-1] != 1 and t.dim() > 1:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    return sum(storages.values()) / tokens, out


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_per_token_activation_sizes_match_what_the_triton_kernels_save(folders, family, monkeypatch):
    monkeypatch.setenv("VELOTUNE_KERNELS", "triton")
    model = load(folders[family])
    layer, spec, tokens = model.layers[0], model.spec, 17
    x = torch.randn(1, tokens, spec.hidden_size, requires_grad=True)
    cos, sin = rope_cos_sin(spec.rope, torch.arange(tokens)[None], x.dtype)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    expected = layer_bytes_per_token(spec, act_bytes=4)

    attention, h = _saved_bytes_per_token(
        lambda t: layer.attention_block(t, cos, sin, None, None), x, [x, cos, sin], params, tokens
    )
    h = h.detach().requires_grad_()
    mlp, _ = _saved_bytes_per_token(layer.mlp_block, h, [h], params, tokens)
    assert attention == expected["attention_saved"]
    assert mlp == expected["mlp_saved"]


def test_estimates_order_as_the_checkpointing_modes_promise(folders):
    spec, seq = load(folders["llama"]).spec.replace(num_layers=8), 4096
    total = {
        (mode, policy): estimate_memory(
            spec, seq=seq, gradient_checkpointing=mode, checkpoint_policy=policy
        ).total
        for mode in (False, True, "offload")
        for policy in ("full", "save_attn")
    }
    assert (
        total[(False, "full")]
        > total[(True, "save_attn")]
        > total[(True, "full")]
        > total[("offload", "full")]
    )
    assert total[(True, "save_attn")] > total[("offload", "save_attn")]
    offload = estimate_memory(spec, seq=seq, embedding_on_host=False)
    assert (
        offload.host_pinned > 0
        and estimate_memory(spec, seq=seq, gradient_checkpointing=True, embedding_on_host=False).host_pinned
        == 0
    )
    assert estimate_memory(spec, "qlora", seq=seq).weights < offload.weights
    assert estimate_memory(spec, seq=2 * seq).total > offload.total
    assert estimate_memory(spec, seq=seq, batch=2).total == estimate_memory(spec, seq=2 * seq).total


def test_save_mlp_trades_pinned_host_memory_for_recomputation_at_a_bounded_gpu_cost(folders):
    spec, seq = load(folders["llama"]).spec.replace(num_layers=8), 4096

    def plan(mode="offload", policy="save_mlp", kept=None):
        return estimate_memory(spec, seq=seq, gradient_checkpointing=mode, checkpoint_policy=policy,
                               gate_up_kept_layers=kept, embedding_on_host=False)  # fmt: skip

    full, none_kept, half, every = plan(policy="full"), plan(kept=0), plan(), plan(kept=8)
    hid = seq * spec.hidden_size * 2
    gate_up = seq * 2 * spec.intermediate_size * 2  # one tile at this width
    # Each layer also sends its MLP-half input to the host; each keeping layer but the top one (which
    # stays on the GPU) its gate/up output; the default is half the layers. Pinned in whole blocks.
    assert none_kept.host_pinned - full.host_pinned == (spec.num_layers - 1) * _offload_block_bytes(hid)
    assert half.host_pinned - none_kept.host_pinned == 3 * _offload_block_bytes(gate_up)
    assert every.host_pinned - none_kept.host_pinned == 7 * _offload_block_bytes(gate_up)
    # On the GPU: no more than the layer below's kept tensors, prefetched, over "full"; the MLP half
    # runs without the attention graph, so keeping nothing costs less than "full".
    mlp_phase = "layer backward (MLP)"
    assert none_kept.phases[mlp_phase] < full.phases[mlp_phase]
    assert none_kept.total <= full.total + 2 * hid
    assert full.total < half.total == every.total <= full.total + 2 * hid + gate_up
    # Kept on the GPU (mode True) every keeping layer's gate/up output stays there.
    assert plan(True, kept=8).total - plan(True, kept=0).total >= 7 * gate_up
    # Without the fused MLP (full fine-tuning) nothing is kept.
    assert estimate_memory(spec, "full", seq=seq, checkpoint_policy="save_mlp").host_pinned == estimate_memory(
        spec, "full", seq=seq, checkpoint_policy="save_mlp", gate_up_kept_layers=8
    ).host_pinned


def test_an_embedding_kept_on_the_host_moves_its_bytes_from_the_gpu_to_pinned_host_memory(folders):
    spec = load(folders["llama"]).spec.replace(tie_word_embeddings=False)
    on_gpu = estimate_memory(spec, seq=1024, gradient_checkpointing=True, embedding_on_host=False)
    on_host = estimate_memory(spec, seq=1024, gradient_checkpointing=True, embedding_on_host=True)
    table = spec.vocab_size * spec.hidden_size * 2
    assert on_gpu.weights - on_host.weights == table
    # Pinned: the table and the rows gathered from it per batch, each rounded up to a power of two as
    # PyTorch's pinned-memory allocator does.
    rows = 1024 * spec.hidden_size * 2
    assert on_host.host_pinned - on_gpu.host_pinned == pow2(table) + pow2(rows)
    # Full fine-tuning trains the table, so it never leaves the GPU.
    assert (
        estimate_memory(spec, "full", seq=1024, embedding_on_host=True).weights
        == estimate_memory(spec, "full", seq=1024, embedding_on_host=False).weights
    )


def pow2(n):
    return 1 << (n - 1).bit_length()


def test_longest_sequence_is_the_last_length_that_fits(folders):
    folder, step = folders["llama"], 512
    gpu = int(1.5 * GIB)
    longest = longest_sequence(folder, gpu, multiple_of=step)
    assert longest > 0 and longest % step == 0
    assert estimate_memory(folder, seq=longest).fits(gpu)
    assert not estimate_memory(folder, seq=longest + step).fits(gpu)
    assert longest_sequence(folder, 2 * gpu, multiple_of=step) > longest
    # Offloaded checkpoints need pinned host memory too: a small host caps the length, and a
    # HOST_RESERVE share of it is left unpinned.
    host = int(estimate_memory(folder, seq=longest // 4).host_pinned / (1 - HOST_RESERVE))
    capped = longest_sequence(folder, gpu, host_bytes=host, multiple_of=step)
    assert 0 < capped < longest
    assert (
        estimate_memory(folder, seq=capped).host_pinned
        <= host * (1 - HOST_RESERVE)
        < estimate_memory(folder, seq=capped + step).host_pinned
    )


def test_plan_command_prints_the_breakdown_and_the_longest_sequence(folders, capsys):
    parser = argparse.ArgumentParser()
    add_plan_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["plan", folders["llama"], "--seq", "1024", "--gpu-memory", "2", "--host-memory", "4"]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "total (peak at" in out and "fits in 2 GiB" in out and "longest sequence that fits" in out
    assert "host:" in out and "-bound" in out


def test_bad_requests_are_refused_with_what_to_do(tmp_path, folders):
    with pytest.raises(ConfigError, match="config.json"):
        estimate_memory(str(tmp_path))
    with pytest.raises(ConfigError, match="lora"):
        estimate_memory(folders["llama"], "dora")
    with pytest.raises(ConfigError, match="target_modules"):
        estimate_memory(folders["llama"], target_modules=("qkv",))
