"""Full fine-tuning: every weight trains, and every gradient equals Transformers' for the same weights."""

import pytest

import velotune
from tests.lora.helpers import load_ours, randomize_lora_b
from tests.model_zoo import FAMILY_CONFIGS, random_batch, rel_err, save_hf_model
from velotune.models.families import family_of


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_every_parameter_gradient_matches_transformers(family, tmp_path):
    hf = save_hf_model(family, str(tmp_path))
    ours = load_ours(tmp_path, full_finetuning=True)
    assert all(p.requires_grad for p in ours.parameters())
    ids, mask, labels = random_batch(2, 9, seed=11, padding="right")
    hf.train()
    ours.train()
    ref = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss = ours(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref.backward()
    loss.backward()
    assert rel_err(loss.detach(), ref.detach()) < 1e-5
    slots = family_of(ours.spec.model_type).tensor_slots(ours.spec)
    params = dict(ours.named_parameters())
    checked = set()
    for name, p in hf.named_parameters():
        slot = slots[name]
        grad = params[slot.internal].grad
        grad = grad[slot.index] if slot.index else grad
        assert p.grad is not None and p.grad.abs().max() > 0, name
        assert rel_err(grad, p.grad) < 1e-5, name
        checked.add(slot.internal)
    assert checked == set(params), "every velotune parameter is compared"


def test_trainable_base_under_lora_gets_its_gradient_from_the_hand_written_backward(tmp_path, monkeypatch):
    """LoRA on every projection with the base left trainable: the fused Function must compute dW and db
    itself, and they must equal the reference path's (as must every other gradient)."""
    save_hf_model("llama_tied_bias", str(tmp_path))
    model = velotune.FastLanguageModel.get_peft_model(load_ours(tmp_path), r=3, target_modules="all-linear")
    randomize_lora_b(model)
    for p in model.parameters():
        p.requires_grad_(True)
    ids, mask, labels = random_batch(1, 5, seed=12, padding="right")
    model.train()

    def grads(mode):
        monkeypatch.setenv("VELOTUNE_KERNELS", mode)
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ref, fused = grads("reference"), grads("triton")
    assert ref.keys() == fused.keys() and any(n.endswith("qkv.weight") for n in ref)
    for name in ref:
        assert rel_err(fused[name], ref[name]) < 1e-5, name
