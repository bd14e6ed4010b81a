"""Gemma: (1 + w) RMSNorm, GELU-tanh gated MLP, embeddings scaled by sqrt(hidden), tied head."""

from velotune.models.families.common import Family, activation_of, base_spec, llama_style_slots


def build_spec(cfg: dict):
    bias = bool(cfg.get("attention_bias", False))
    return base_spec(
        cfg,
        default_tie=True,
        activation=activation_of(cfg.get("hidden_act"), "gelu_pytorch_tanh"),
        norm_offset=1.0,
        embedding_scale=cfg["hidden_size"] ** 0.5,
        qkv_bias=bias,
        o_bias=bias,
    )


FAMILY = Family("gemma", build_spec, llama_style_slots, "Gemma 1 (2B, 7B)")
