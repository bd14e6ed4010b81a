"""Llama 2/3/3.1/3.2/3.3 (llama3 rope scaling), Yi and the DeepSeek-R1 Llama distills."""

from velotune.models.families.common import Family, base_spec, llama_style_slots


def build_spec(cfg: dict):
    bias = bool(cfg.get("attention_bias", False))
    return base_spec(cfg, default_tie=False, qkv_bias=bias, o_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)))


FAMILY = Family("llama", build_spec, llama_style_slots, "Llama 2/3.x, Yi, DeepSeek-R1 Llama distills")
