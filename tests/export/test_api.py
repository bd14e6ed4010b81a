"""`model.save_pretrained_merged` / `model.save_pretrained_gguf` on LoRA models: the written files compute
what the adapted model computes, and the model is left as it was."""

import os

import pytest
import torch
import transformers

import velotune
from tests.model_zoo import VOCAB, rel_err, save_hf_model
from velotune.errors import ConfigError, UnsupportedModelError
from velotune.quickstart import build_tokenizer


def lora_model(family: str, folder):
    save_hf_model(family, str(folder))
    model, _ = velotune.FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32, device_map="cpu",
                                                          progress=False)  # fmt: skip
    # B random too (init_lora_weights=False), so that the adapter changes every output.
    return velotune.FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False,
                                                     use_gradient_checkpointing=False, random_state=1)  # fmt: skip


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["llama", "phi3", "mixtral"])
def test_merged_export_of_a_lora_model_loads_in_transformers_with_equal_logits(family, tmp_path):
    model = lora_model(family, tmp_path / "src")
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    before = logits(model, ids)
    base = logits(
        transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "src"), dtype=torch.float32), ids
    )
    assert rel_err(base, before) > 1e-3  # the adapter matters

    model.save_pretrained_merged(str(tmp_path / "out"), save_method="merged_16bit", max_shard_size="50KB")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32,
                                                           attn_implementation="eager")  # fmt: skip
    assert rel_err(logits(hf, ids), before) < 1e-5
    assert torch.equal(logits(model, ids), before)  # export merged into copies, not into the model
    assert velotune.lora.has_lora(model)


def test_lora_save_method_writes_the_adapter_and_tokenizer(tmp_path):
    model = lora_model("llama", tmp_path / "src")
    tok = build_tokenizer(str(tmp_path / "tok"))
    model.save_pretrained_merged(str(tmp_path / "out"), tok, save_method="lora")
    names = set(os.listdir(tmp_path / "out"))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert not any(n.startswith("model") for n in names)


def test_unavailable_and_unknown_save_methods_are_refused(tmp_path):
    model = lora_model("llama", tmp_path / "src")
    with pytest.raises(UnsupportedModelError, match="merged_4bit"):
        model.save_pretrained_merged(str(tmp_path / "out"), save_method="merged_4bit")
    with pytest.raises(ConfigError, match="save_method"):
        model.save_pretrained_merged(str(tmp_path / "out"), save_method="merged_8bit")
    assert not (tmp_path / "out").exists()
