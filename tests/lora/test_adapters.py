"""Adapters move between velotune and PEFT unchanged, merge exactly, and the LoRA API refuses what it
cannot do with errors that say what to do."""

import json
import logging
import os

import peft
import pytest
import torch
from safetensors.torch import load_file

import velotune
from tests.lora.helpers import load_ours, randomize_lora_b, velotune_and_peft
from tests.model_zoo import build_hf_model, random_batch, rel_err, save_hf_model
from velotune.errors import AdapterError
from velotune.lora import LoraProjection, LoraSparseMoE, adapter_tensors, lora_parameters
from velotune.lora.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from velotune.models.layers import Projection, SparseMoE

FLM = velotune.FastLanguageModel


def logits(model, ids, mask=None):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def peft_adapter(family: str, folder, targets="all-linear", r=4, lora_alpha=8, use_rslora=False, seed=0):
    """An adapter trained "elsewhere": PEFT on Transformers, B random, saved by PEFT."""
    hf = save_hf_model(family, str(folder))
    config = peft.LoraConfig(
        r=r, lora_alpha=lora_alpha, target_modules=targets, use_rslora=use_rslora, task_type="CAUSAL_LM"
    )
    model = peft.get_peft_model(hf, config)
    # What PEFT records for a base loaded with from_pretrained(folder).
    model.peft_config["default"].base_model_name_or_path = str(folder)
    randomize_lora_b(model, seed)
    adapter = os.path.join(str(folder), f"peft_adapter_{seed}")
    model.save_pretrained(adapter)
    return model, adapter


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "mixtral"])
def test_velotune_adapter_loads_in_peft_with_the_same_logits(family, tmp_path):
    ours, _, adapter = velotune_and_peft(family, tmp_path / "a", targets="all-linear")
    base = build_hf_model(family)
    theirs = peft.PeftModel.from_pretrained(base, adapter)
    ids, mask, _ = random_batch(2, 9, seed=4, padding="left")
    keep = mask.bool()
    assert rel_err(logits(ours, ids, mask)[keep], logits(theirs, ids, mask)[keep]) < 1e-5
    with theirs.disable_adapter():
        assert rel_err(logits(ours, ids, mask)[keep], logits(theirs, ids, mask)[keep]) > 1e-3


@pytest.mark.parametrize(
    "family, targets, use_rslora",
    [
        ("llama", "all-linear", False),
        ("gemma", ["q_proj", "v_proj", "down_proj"], True),
        ("phi3", "all-linear", False),
        ("mixtral", "all-linear", True),
        ("mixtral", ["o_proj", "w2"], False),
    ],
)
def test_peft_adapter_loads_in_velotune_with_the_same_logits(family, targets, use_rslora, tmp_path):
    theirs, adapter = peft_adapter(family, tmp_path, targets=targets, use_rslora=use_rslora)
    ids, _, _ = random_batch(2, 8, seed=5)
    expected = logits(theirs, ids)
    ours = load_ours(tmp_path).load_adapter(adapter)
    assert rel_err(logits(ours, ids), expected) < 1e-5
    assert all(not p.requires_grad for p in ours.parameters()), "is_trainable=False loads a frozen adapter"
    # The adapter folder alone: its config names the base, which loads first; the adapter is trainable.
    from_folder, _ = FLM.from_pretrained(adapter, dtype=torch.float32, device_map="cpu", progress=False)
    assert rel_err(logits(from_folder, ids), expected) < 1e-5
    trainable = {id(p) for p in from_folder.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lora_parameters(from_folder)} and trainable


@pytest.mark.parametrize("family", ["llama", "phi3", "mixtral"])
def test_velotune_writes_the_keys_and_shapes_peft_writes(family, tmp_path):
    ours, _, adapter = velotune_and_peft(family, tmp_path / "ours", targets="all-linear")
    _, peft_dir = peft_adapter(family, tmp_path / "peft", targets="all-linear")
    mine, theirs = (
        load_file(os.path.join(adapter, ADAPTER_WEIGHTS)),
        load_file(os.path.join(peft_dir, ADAPTER_WEIGHTS)),
    )
    assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    with open(os.path.join(adapter, ADAPTER_CONFIG)) as f:
        config = json.load(f)
    with open(os.path.join(peft_dir, ADAPTER_CONFIG)) as f:
        peft_config = json.load(f)
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == str(tmp_path / "ours")
    assert (config["r"], config["lora_alpha"], config["use_rslora"], config["bias"]) == (4, 8, False, "none")
    assert config["lora_dropout"] == 0.0
    # PEFT writes what "all-linear" resolved to, as module paths; the leaf names are what must agree.
    assert sorted(config["target_modules"]) == sorted(
        {t.rsplit(".", 1)[-1] for t in peft_config["target_modules"]}
    )
    assert sorted(config["target_parameters"] or []) == sorted(peft_config["target_parameters"] or [])
    assert config["rank_pattern"] == peft_config["rank_pattern"]
    assert config["alpha_pattern"] == peft_config["alpha_pattern"]


@pytest.mark.parametrize("family", ["llama_tied_bias", "phi3", "mixtral", "gemma2"])
def test_merge_and_unload_gives_the_unmerged_logits_and_plain_modules(family, tmp_path):
    save_hf_model(family, str(tmp_path))
    model = FLM.get_peft_model(load_ours(tmp_path), r=4, lora_alpha=8, target_modules="all-linear")
    randomize_lora_b(model)
    ids, _, _ = random_batch(2, 7, seed=6)
    unmerged = logits(model, ids)
    merged_model = model.merge_and_unload()
    assert rel_err(logits(merged_model, ids), unmerged) < 1e-5
    modules = list(merged_model.modules())
    assert not any(isinstance(m, (LoraProjection, LoraSparseMoE)) for m in modules)
    assert any(type(m) is Projection for m in modules)
    assert any(type(m) is SparseMoE for m in modules) == (family == "mixtral")
    assert all(".lora_" not in n for n, _ in merged_model.named_parameters())
    with pytest.raises(AdapterError, match="save_pretrained_merged"):
        merged_model.save_pretrained(str(tmp_path / "nothing"))


def test_merge_then_unmerge_restores_the_base_weights(tmp_path):
    save_hf_model("mixtral", str(tmp_path))
    model = FLM.get_peft_model(load_ours(tmp_path), r=3, lora_alpha=5, target_modules="all-linear")
    randomize_lora_b(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora_modules = [m for m in model.modules() if isinstance(m, (LoraProjection, LoraSparseMoE))]
    for m in lora_modules:
        m.merge()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any("qkv.weight" in n for n in changed) and any("mlp.gate_up" in n for n in changed)
    assert any(n.endswith("mlp.router") for n in changed)
    for m in lora_modules:
        m.unmerge()
    for n, p in model.named_parameters():
        assert rel_err(p, before[n]) < 1e-6, n


def test_load_adapter_replaces_lora_on_the_same_modules_and_keeps_the_others(tmp_path):
    theirs, adapter = peft_adapter("llama", tmp_path, targets=["q_proj", "v_proj"], r=2, lora_alpha=3, seed=7)
    model = FLM.get_peft_model(load_ours(tmp_path), r=4, lora_alpha=8)  # the seven projections
    randomize_lora_b(model, seed=8)
    kept = {
        k: v.clone() for k, v in adapter_tensors(model).items() if "q_proj" not in k and "v_proj" not in k
    }
    model.load_adapter(adapter, is_trainable=True)
    now = adapter_tensors(model)
    loaded = load_file(os.path.join(adapter, ADAPTER_WEIGHTS))
    for key, tensor in loaded.items():
        assert torch.equal(now[key], tensor), key
    for key, tensor in kept.items():
        assert torch.equal(now[key], tensor), key
    assert all(p.requires_grad for p in lora_parameters(model))
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)
    # Saved again, the mix of ranks and alphas reads back in PEFT as the same model.
    model.save_pretrained(str(tmp_path / "mixed"))
    again = peft.PeftModel.from_pretrained(build_hf_model("llama"), str(tmp_path / "mixed"))
    ids, _, _ = random_batch(1, 6, seed=9)
    assert rel_err(logits(model, ids), logits(again, ids)) < 1e-5


def test_adapter_for_another_model_is_refused(tmp_path):
    _, adapter = peft_adapter("mistral", tmp_path / "mistral")
    save_hf_model("phi3", str(tmp_path / "phi3"))
    with pytest.raises(AdapterError, match="does not have|shapes"):
        load_ours(tmp_path / "phi3").load_adapter(adapter)


def test_unknown_target_names_raise_and_list_the_valid_names(tmp_path):
    save_hf_model("llama", str(tmp_path))
    model = load_ours(tmp_path)
    with pytest.raises(AdapterError, match=r"\['lm_head'\].*'gate_proj'.*'q_proj'.*all-linear"):
        FLM.get_peft_model(model, target_modules=["q_proj", "lm_head"])
    with pytest.raises(AdapterError, match="'w1'"):
        FLM.get_peft_model(model, target_modules=["w1"])
    assert not any(isinstance(m, LoraProjection) for m in model.modules()), "a refused call changes nothing"
    with pytest.raises(AdapterError, match="regex"):
        FLM.get_peft_model(model, target_modules=r".*\.layers\.7\..*")
    regex = FLM.get_peft_model(model, target_modules=r".*layers\.1\.self_attn\.(q|v)_proj")
    assert (
        regex.layers[1].attn.qkv.lora_blocks() == ["q_proj", "v_proj"]
        and type(regex.layers[0].attn.qkv) is Projection
    )
    one = FLM.get_peft_model(load_ours(tmp_path), target_modules="o_proj")
    assert (
        one.layers[0].attn.o_proj.lora_blocks() == ["o_proj"] and type(one.layers[0].attn.qkv) is Projection
    )


@pytest.mark.parametrize(
    "family, targets, message",
    [
        ("phi3", ["q_proj", "o_proj"], "fused tensor"),
        ("mixtral", ["w1", "w2"], "fused tensor"),
        ("mixtral", ["gate_proj"], "fused tensor"),
    ],
)
def test_part_of_a_fused_tensor_cannot_be_targeted(family, targets, message, tmp_path):
    save_hf_model(family, str(tmp_path))
    with pytest.raises(AdapterError, match=message):
        FLM.get_peft_model(load_ours(tmp_path), target_modules=targets)


def test_fused_checkpoints_accept_the_names_of_what_they_fuse(tmp_path):
    """The usual seven names adapt Phi-3's qkv_proj and gate_up_proj, and Mixtral's experts."""
    save_hf_model("phi3", str(tmp_path / "phi3"))
    phi3 = FLM.get_peft_model(load_ours(tmp_path / "phi3"))
    assert phi3.layers[0].attn.qkv.lora_blocks() == ["qkv_proj"]
    assert phi3.layers[0].mlp.gate_up.lora_blocks() == ["gate_up_proj"]
    save_hf_model("mixtral", str(tmp_path / "mixtral"))
    mixtral = FLM.get_peft_model(load_ours(tmp_path / "mixtral"), r=4)
    moe = mixtral.layers[0].mlp
    assert (
        set(moe.rank) == {"gate_up", "down"} and moe.rank["gate_up"] == 8 and moe.scale["gate_up"] == 16 / 4
    )


def test_mixtral_experts_refuse_lora_dropout(tmp_path):
    save_hf_model("mixtral", str(tmp_path))
    with pytest.raises(AdapterError, match="lora_dropout"):
        FLM.get_peft_model(load_ours(tmp_path), lora_dropout=0.1)
    model = FLM.get_peft_model(load_ours(tmp_path), lora_dropout=0.1, target_modules=["q_proj", "o_proj"])
    assert model.layers[0].attn.qkv.lora_dropout == 0.1


def test_unsupported_requests_are_refused(tmp_path):
    save_hf_model("llama", str(tmp_path))
    model = load_ours(tmp_path)
    with pytest.raises(AdapterError, match="bias"):
        FLM.get_peft_model(model, bias="some")
    with pytest.raises(AdapterError, match="save_pretrained_merged"):
        model.save_pretrained(str(tmp_path / "x"))
    FLM.get_peft_model(model)
    with pytest.raises(AdapterError, match="already has LoRA"):
        FLM.get_peft_model(model)


def test_get_peft_model_freezes_the_base_and_counts_what_peft_counts(tmp_path, caplog):
    save_hf_model("qwen3", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="velotune"):
        model = FLM.get_peft_model(
            load_ours(tmp_path), r=8, lora_alpha=16, use_gradient_checkpointing="offload"
        )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert model.gradient_checkpointing and model.training
    hf = peft.get_peft_model(build_hf_model("qwen3"), peft.LoraConfig(r=8, target_modules="all-linear"))
    expected, _ = hf.get_nb_trainable_parameters()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert f"trainable params: {expected:,}" in caplog.text
    plain = FLM.get_peft_model(load_ours(tmp_path), use_gradient_checkpointing=False)
    assert not plain.gradient_checkpointing


def test_initialisation_is_peft_s_and_reproducible_from_random_state(tmp_path):
    save_hf_model("llama", str(tmp_path))
    a = FLM.get_peft_model(load_ours(tmp_path), r=8, random_state=1)
    b = FLM.get_peft_model(load_ours(tmp_path), r=8, random_state=1)
    c = FLM.get_peft_model(load_ours(tmp_path), r=8, random_state=2)
    ta, tb, tc = adapter_tensors(a), adapter_tensors(b), adapter_tensors(c)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    a_keys = [k for k in ta if "lora_A" in k]
    assert not any(torch.equal(ta[k], tc[k]) for k in a_keys)
    assert all(not ta[k].any() for k in ta if "lora_B" in k), "B starts at zero"
    q = ta["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    bound = 48**-0.5  # kaiming-uniform(a=sqrt(5)) over fan-in 48
    assert q.abs().max() <= bound and q.abs().max() > 0.9 * bound
    ids, _, _ = random_batch(1, 5, seed=2)
    assert rel_err(logits(a, ids), logits(load_ours(tmp_path), ids)) < 1e-6, (
        "a zero B leaves the model as it was"
    )
    g = FLM.get_peft_model(load_ours(tmp_path), r=8, init_lora_weights="gaussian")
    q = adapter_tensors(g)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert 0.08 < q.std().item() < 0.17  # PEFT's "gaussian": std 1 / r


def test_rslora_scales_by_alpha_over_sqrt_r(tmp_path):
    save_hf_model("llama", str(tmp_path))
    model = FLM.get_peft_model(load_ours(tmp_path), r=16, lora_alpha=8, use_rslora=True)
    assert model.layers[0].attn.qkv.scale["q_proj"] == pytest.approx(8 / 4)
    plain = FLM.get_peft_model(load_ours(tmp_path), r=16, lora_alpha=8)
    assert plain.layers[0].attn.qkv.scale["q_proj"] == pytest.approx(0.5)


def test_lora_dropout_is_reproducible_under_a_seed_and_off_for_inference(tmp_path):
    # The hand-written Function takes the same dropped input (tests/kernels/test_lora.py); the mask is
    # drawn before it, so this model-level test runs the reference path only.
    save_hf_model("llama", str(tmp_path))
    model = FLM.get_peft_model(load_ours(tmp_path), r=4, lora_dropout=0.3, use_gradient_checkpointing=False)
    randomize_lora_b(model, std=0.2)
    ids, _, labels = random_batch(1, 4, seed=3)

    def loss_and_grads(checkpointing: bool):
        model.gradient_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    FLM.for_training(model)
    first, grads = loss_and_grads(False)
    second, grads_again = loss_and_grads(False)
    assert torch.equal(first, second) and all(torch.equal(grads[n], grads_again[n]) for n in grads)
    # Recomputation under checkpointing draws the same dropout masks.
    recomputed, grads_ckpt = loss_and_grads(True)
    assert rel_err(recomputed, first) < 1e-6
    assert all(rel_err(grads_ckpt[n], grads[n]) < 1e-5 for n in grads)
    FLM.for_inference(model)
    with torch.no_grad():
        eval_loss = model(input_ids=ids, labels=labels).loss
    for m in model.modules():
        if isinstance(m, LoraProjection):
            m.lora_dropout = 0.0
    with torch.no_grad():
        no_dropout = model(input_ids=ids, labels=labels).loss
    assert torch.equal(eval_loss, no_dropout)
    assert rel_err(first, no_dropout) > 1e-4, "dropout must change the training loss"


def transformers4_mixtral_adapter(folder, base: str, r=4, lora_alpha=8, seed=0) -> str:
    """A Mixtral adapter as PEFT wrote them with Transformers 4: one LoRA pair per expert and
    projection (block_sparse_moe.experts.E.w1, ...) and the router as block_sparse_moe.gate."""
    from safetensors.torch import save_file

    spec = load_ours(base).spec
    hidden, inter, q = spec.hidden_size, spec.intermediate_size, spec.q_size
    gen = torch.Generator().manual_seed(seed)

    def pair(prefix, fan_in, fan_out):
        return {
            f"{prefix}.lora_A.weight": torch.randn(r, fan_in, generator=gen) * 0.1,
            f"{prefix}.lora_B.weight": torch.randn(fan_out, r, generator=gen) * 0.1,
        }

    tensors = {}
    for layer in range(spec.num_layers):
        p = f"base_model.model.model.layers.{layer}."
        tensors.update(pair(p + "self_attn.q_proj", hidden, q))
        tensors.update(pair(p + "block_sparse_moe.gate", hidden, spec.moe.num_experts))
        for e in range(spec.moe.num_experts):
            for name, (fan_in, fan_out) in {
                "w1": (hidden, inter),
                "w3": (hidden, inter),
                "w2": (inter, hidden),
            }.items():
                tensors.update(pair(f"{p}block_sparse_moe.experts.{e}.{name}", fan_in, fan_out))
    os.makedirs(folder)
    save_file(tensors, os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = peft.LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=["q_proj", "gate", "w1", "w2", "w3"],
                             task_type="CAUSAL_LM", base_model_name_or_path=base).to_dict()  # fmt: skip
    config["target_modules"] = sorted(config["target_modules"])
    with open(os.path.join(folder, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f)
    return folder


def test_per_expert_mixtral_adapters_of_transformers_4_load_as_peft_converts_them(tmp_path):
    save_hf_model("mixtral", str(tmp_path))
    adapter = transformers4_mixtral_adapter(str(tmp_path / "v4"), str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(build_hf_model("mixtral"), adapter)
    ids, _, _ = random_batch(2, 7, seed=13)
    expected = logits(theirs, ids)
    ours = load_ours(tmp_path).load_adapter(adapter)
    assert rel_err(logits(ours, ids), expected) < 1e-5
    moe = ours.layers[0].mlp
    assert moe.rank == {"router": 4, "gate_up": 8, "down": 4}
    # Saved again (Transformers 5 layout), PEFT reads the same model back.
    ours.save_pretrained(str(tmp_path / "v5"))
    again = peft.PeftModel.from_pretrained(build_hf_model("mixtral"), str(tmp_path / "v5"))
    assert rel_err(logits(again, ids), expected) < 1e-5


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_adapters_with_trained_biases_round_trip_with_peft(bias, tmp_path):
    """PEFT saves the base biases it trained; loading such an adapter sets them, and velotune writes
    the same keys back."""
    targets = ["q_proj", "k_proj", "v_proj", "down_proj"]
    hf = save_hf_model("llama_tied_bias", str(tmp_path))
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=targets, bias=bias))
    randomize_lora_b(theirs)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad and name.endswith(".bias"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    theirs.save_pretrained(str(tmp_path / "peft"))
    ids, _, _ = random_batch(2, 6, seed=14)
    ours = load_ours(tmp_path).load_adapter(str(tmp_path / "peft"), is_trainable=True)
    assert rel_err(logits(ours, ids), logits(theirs, ids)) < 1e-5
    assert (
        sum(p.numel() for p in ours.parameters() if p.requires_grad)
        == theirs.get_nb_trainable_parameters()[0]
    )
    ours.save_pretrained(str(tmp_path / "ours"))
    mine = load_file(str(tmp_path / "ours" / ADAPTER_WEIGHTS))
    reference = load_file(str(tmp_path / "peft" / ADAPTER_WEIGHTS))
    assert mine.keys() == reference.keys()
    assert all(torch.equal(mine[k], reference[k]) for k in mine)


def test_bias_lora_only_refuses_half_of_a_shared_bias(tmp_path):
    save_hf_model("llama_tied_bias", str(tmp_path))
    with pytest.raises(AdapterError, match="share one bias"):
        FLM.get_peft_model(load_ours(tmp_path), target_modules=["q_proj"], bias="lora_only")
