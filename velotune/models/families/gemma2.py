"""Gemma 2: Gemma plus attention and final-logit soft-capping, norms before and after each block,
query scaling by query_pre_attn_scalar, and a sliding window on every other layer."""

from velotune.models.families.common import Family, activation_of, base_spec, llama_style_slots, sliding_windows_of

NORM_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "attn_out_norm",
    "pre_feedforward_layernorm": "mlp_norm",
    "post_feedforward_layernorm": "mlp_out_norm",
}


def build_spec(cfg: dict):
    bias = bool(cfg.get("attention_bias", False))
    return base_spec(
        cfg,
        default_tie=True,
        activation=activation_of(cfg.get("hidden_activation") or cfg.get("hidden_act"), "gelu_pytorch_tanh"),
        norm_offset=1.0,
        embedding_scale=cfg["hidden_size"] ** 0.5,
        qkv_bias=bias,
        o_bias=bias,
        sandwich_norms=True,
        attention_scale=float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5,
        attn_logit_softcap=cfg.get("attn_logit_softcapping", 50.0),
        final_logit_softcap=cfg.get("final_logit_softcapping", 30.0),
        sliding_windows=sliding_windows_of(cfg, cfg.get("sliding_window", 4096), lambda i: i % 2 == 0),
    )


def slots(spec):
    return llama_style_slots(spec, norm_names=NORM_NAMES)


FAMILY = Family("gemma2", build_spec, slots, "Gemma 2 (2B, 9B, 27B)")
