"""A QLoRA model (4-bit base + LoRA) merges into a 16-bit Hugging Face folder with its own logits."""

import torch
import transformers

import velotune
from tests.model_zoo import random_batch, rel_err, save_hf_model


def test_qlora_model_merges_into_a_folder_transformers_loads(tmp_path):
    save_hf_model("llama", str(tmp_path / "base"))
    model, _ = velotune.FastLanguageModel.from_pretrained(
        str(tmp_path / "base"), dtype=torch.float32, device_map="cpu", load_in_4bit=True, progress=False
    )
    model = velotune.FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False)
    model.save_pretrained_merged(str(tmp_path / "merged"), None, save_method="merged_16bit")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    ids, _, _ = random_batch(2, 9, seed=1)
    model.eval()
    with torch.no_grad():
        assert rel_err(hf(input_ids=ids).logits, model(input_ids=ids).logits) < 1e-5
