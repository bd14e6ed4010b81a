"""Pairs of the same random model with the same non-zero LoRA weights in velotune and in
Transformers + PEFT. The weights cross through velotune's PEFT-format save, which PEFT reads back,
so every comparison also tests the format."""

from __future__ import annotations

import os

import peft
import torch
from safetensors.torch import load_file

import velotune
from tests.model_zoo import random_batch, rel_err, save_hf_model
from velotune.lora import adapter_tensors
from velotune.lora.peft_format import ADAPTER_WEIGHTS


def load_ours(folder: str, **kwargs):
    model, _ = velotune.FastLanguageModel.from_pretrained(
        str(folder), dtype=torch.float32, device_map="cpu", progress=False, **kwargs
    )
    return model


def velotune_and_peft(
    family: str, folder, *, r=4, lora_alpha=8, targets="all-linear", use_rslora=False, seed=0, bias="none"
):
    """(velotune model, PEFT model, adapter folder): LoRA on the same sites with the same weights, B random."""
    folder = str(folder)
    hf = save_hf_model(family, folder)
    ours = velotune.FastLanguageModel.get_peft_model(
        load_ours(folder),
        r=r,
        lora_alpha=lora_alpha,
        target_modules=targets,
        use_rslora=use_rslora,
        bias=bias,
        use_gradient_checkpointing=False,
        random_state=seed,
    )
    randomize_lora_b(ours, seed)
    adapter = os.path.join(folder, "adapter")
    ours.save_pretrained(adapter)
    config = peft.LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=targets,
        use_rslora=use_rslora,
        bias=bias,
        task_type="CAUSAL_LM",
    )
    theirs = peft.get_peft_model(hf, config)
    result = peft.set_peft_model_state_dict(theirs, load_file(os.path.join(adapter, ADAPTER_WEIGHTS)))
    assert not result.unexpected_keys, result.unexpected_keys[:5]
    assert not [k for k in result.missing_keys if "lora_" in k], "PEFT made LoRA sites velotune did not save"
    return ours, theirs, adapter


def randomize_lora_b(model, seed: int = 0, std: float = 0.05) -> None:
    """B starts at zero, which would hide most of the LoRA math: make it random (and small, so that the
    adapted model stays as well conditioned as the base and float32 noise stays small)."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def peft_lora(model, grad: bool = False) -> dict[str, torch.Tensor]:
    """PEFT's LoRA tensors and trained biases (or their gradients) under the keys PEFT saves them with."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name or (p.requires_grad and name.endswith(".bias")):
            out[name.replace(".default", "")] = p.grad if grad else p.detach()
    return out


def assert_loss_and_lora_gradients_match(ours, theirs, batch=2, seq=9):
    """Same loss and the same (non-zero) gradient of every LoRA weight, velotune vs PEFT, < 1e-5."""
    ids, mask, labels = random_batch(batch, seq, seed=3, padding="right")
    ours.train()
    theirs.train()
    loss = ours(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref = theirs(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    ref.backward()
    assert rel_err(loss.detach(), ref.detach()) < 1e-5
    grads, ref_grads = adapter_tensors(ours, grad=True), peft_lora(theirs, grad=True)
    assert grads.keys() == ref_grads.keys() and grads
    for key, ref_grad in ref_grads.items():
        assert ref_grad.abs().max() > 0, key
        assert rel_err(grads[key], ref_grad) < 1e-5, key
