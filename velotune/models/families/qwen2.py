"""Qwen2 / Qwen2.5 (q/k/v bias) and the DeepSeek-R1 Qwen distills."""

from velotune.models.families.common import Family, base_spec, llama_style_slots, sliding_windows_of


def qwen_windows(cfg: dict):
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
    first_sliding = cfg.get("max_window_layers", 28)
    return sliding_windows_of(cfg, window, lambda i: i >= first_sliding)


def build_spec(cfg: dict):
    return base_spec(cfg, default_tie=False, qkv_bias=True, sliding_windows=qwen_windows(cfg))


FAMILY = Family("qwen2", build_spec, llama_style_slots, "Qwen2, Qwen2.5, DeepSeek-R1 Qwen distills")
