"""The whole model through the Triton kernels (interpreted on CPU) gives the reference path's loss
and the same gradient for every parameter."""

import pytest
import torch

import velotune
from tests.model_zoo import random_batch, rel_err, save_hf_model


def loss_and_grads(model, monkeypatch, mode, **batch):
    monkeypatch.setenv("VELOTUNE_KERNELS", mode)
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3", "phi3_partial", "mixtral"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_kernels_match_reference_loss_and_every_gradient(family, layout, tmp_path, monkeypatch):
    save_hf_model(family, str(tmp_path))
    model, _ = velotune.FastLanguageModel.from_pretrained(
        str(tmp_path), dtype=torch.float32, device_map="cpu", full_finetuning=True, progress=False
    )
    model.train()
    if layout == "padded":
        ids, mask, labels = random_batch(2, 11, seed=5, padding="right")
        batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    else:
        ids, _, labels = random_batch(1, 12, seed=6)
        positions = torch.cat([torch.arange(5), torch.arange(1), torch.arange(6)])[None]
        batch = dict(input_ids=ids, position_ids=positions, labels=labels)
    ref_loss, ref_grads = loss_and_grads(model, monkeypatch, "reference", **batch)
    loss, grads = loss_and_grads(model, monkeypatch, "triton", **batch)
    assert rel_err(loss, ref_loss) < 1e-5
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-5, name


def test_the_loss_counts_its_labels_before_the_layers_run(tmp_path, monkeypatch):
    # The count is the loss's one host sync: made at the start of the step, not after the layers
    # (velotune.kernels.cross_entropy.plan_labels), so a bad label also stops the step before any layer.
    from velotune.errors import KernelError
    from velotune.kernels import cross_entropy
    from velotune.models import decoder

    save_hf_model("llama", str(tmp_path))
    model, _ = velotune.FastLanguageModel.from_pretrained(str(tmp_path), dtype=torch.float32, device_map="cpu",
                                                          full_finetuning=True, progress=False)  # fmt: skip
    model.train()
    monkeypatch.setenv("VELOTUNE_KERNELS", "triton")
    events = []
    real_plan, real_layers = cross_entropy.plan_labels, decoder.run_layers
    monkeypatch.setattr(decoder, "plan_labels", lambda *a, **k: events.append("plan") or real_plan(*a, **k))
    monkeypatch.setattr(decoder, "run_layers", lambda *a, **k: events.append("layers") or real_layers(*a, **k))
    monkeypatch.setattr(cross_entropy, "plan_labels", lambda *a, **k: events.append("plan in the loss"))
    ids, mask, labels = random_batch(2, 9, seed=7, padding="right")
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert events == ["plan", "layers"]
    events.clear()
    bad = labels.clone()
    bad[0, 3] = 10_000
    with pytest.raises(KernelError, match="outside"):
        model(input_ids=ids, attention_mask=mask, labels=bad)
    assert events == ["plan"]
