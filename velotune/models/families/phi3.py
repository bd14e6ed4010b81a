"""Phi-3 / Phi-3.5 / Phi-4-mini: q/k/v and gate/up stored fused in the checkpoint, LongRoPE scaling,
optional partial rotary and sliding window."""

from velotune.models.families.common import Family, base_spec, llama_style_slots, sliding_windows_of


def build_spec(cfg: dict):
    return base_spec(
        cfg,
        default_tie=False,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        sliding_windows=sliding_windows_of(cfg, cfg.get("sliding_window")),
        qkv_names=("qkv_proj",),
        gate_up_names=("gate_up_proj",),
    )


def slots(spec):
    return llama_style_slots(spec, fused_qkv=True, fused_gate_up=True)


FAMILY = Family("phi3", build_spec, slots, "Phi-3, Phi-3.5, Phi-4-mini")
