"""Small Llama models with widths that are whole 64-element blocks (bitsandbytes' CPU dequantizer is
exact only there, see tests/quant/test_nf4.py; real models are built that way), and 4-bit folders
saved by Transformers + bitsandbytes on the CPU."""

from __future__ import annotations

import torch
import transformers

CONFIG = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=48, max_position_embeddings=64, rms_norm_eps=1e-5)  # fmt: skip


def hf_model(seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def bnb_config(double_quant: bool = True):
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=double_quant,
                                           bnb_4bit_compute_dtype=torch.float32)  # fmt: skip


def linear4bit_modules(model) -> dict:
    import bitsandbytes as bnb

    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def save_transformers_4bit(root, double_quant: bool = True, seed: int = 0):
    """(folder of the 4-bit model saved by Transformers + bitsandbytes, that 4-bit model)."""
    hf_model(seed).save_pretrained(root / "fp32")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        root / "fp32", quantization_config=bnb_config(double_quant), device_map="cpu", dtype=torch.float32
    )
    model.save_pretrained(root / "q4")
    return root / "q4", model


def dequantized_twin(model_4bit, seed: int = 0):
    """The float32 model computing with the 4-bit model's dequantized weights (bitsandbytes' dequantize)."""
    import bitsandbytes.functional as bnbf

    twin = hf_model(seed)
    dense = {
        f"{name}.weight": bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state)
        for name, m in linear4bit_modules(model_4bit).items()
    }
    assert not twin.load_state_dict(dense, strict=False).unexpected_keys
    return twin
