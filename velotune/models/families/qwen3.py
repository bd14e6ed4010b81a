"""Qwen3 (dense): RMSNorm on q and k per head, head_dim independent of the hidden size."""

from velotune.models.families.common import Family, base_spec, llama_style_slots
from velotune.models.families.qwen2 import qwen_windows


def build_spec(cfg: dict):
    bias = bool(cfg.get("attention_bias", False))
    return base_spec(
        cfg, default_tie=False, qkv_bias=bias, o_bias=bias, qk_norm=True, sliding_windows=qwen_windows(cfg)
    )


FAMILY = Family("qwen3", build_spec, llama_style_slots, "Qwen3 dense models")
