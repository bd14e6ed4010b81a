"""Mistral: Llama layout with a sliding attention window on every layer."""

from velotune.models.families.common import Family, base_spec, llama_style_slots, sliding_windows_of


def build_spec(cfg: dict):
    return base_spec(cfg, default_tie=False, sliding_windows=sliding_windows_of(cfg, cfg.get("sliding_window")))


FAMILY = Family("mistral", build_spec, llama_style_slots, "Mistral 7B and its fine-tunes")
