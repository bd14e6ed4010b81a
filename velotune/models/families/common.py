"""What the family adapters share: reading config.json values and naming checkpoint tensors.

A family adapter turns a config.json dict into an `ArchSpec` and says, for every tensor name in
that family's checkpoints, which internal parameter (and which slice of it) the tensor fills.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from velotune.errors import ConfigError, UnsupportedModelError
from velotune.models.spec import ArchSpec, RopeSpec

ACTIVATION_NAMES = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
}


@dataclass(frozen=True)
class TensorSlot:
    """Where a checkpoint tensor goes: `internal[index]` (index () means the whole tensor)."""

    internal: str
    index: tuple = ()


@dataclass(frozen=True)
class Family:
    model_type: str
    build_spec: Callable[[dict], ArchSpec]
    tensor_slots: Callable[[ArchSpec], dict[str, TensorSlot]]
    description: str


def require(cfg: dict, key: str):
    if cfg.get(key) is None:
        raise ConfigError(f"config.json has no {key!r}; it is required for model_type {cfg.get('model_type')!r}.")
    return cfg[key]


def activation_of(name: str | None, default: str) -> str:
    name = name or default
    if name not in ACTIVATION_NAMES:
        raise UnsupportedModelError(
            f"activation {name!r} is not supported; supported: {sorted(ACTIVATION_NAMES)}."
        )
    return ACTIVATION_NAMES[name]


def head_dim_of(cfg: dict) -> int:
    hidden, heads = require(cfg, "hidden_size"), require(cfg, "num_attention_heads")
    if cfg.get("head_dim"):
        return int(cfg["head_dim"])
    if hidden % heads:
        raise ConfigError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads} and no head_dim is set.")
    return hidden // heads


def rope_of(cfg: dict, head_dim: int, default_theta: float = 10000.0) -> RopeSpec:
    """Reads both spellings: Transformers 5's `rope_parameters` and the older `rope_theta` + `rope_scaling`."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise UnsupportedModelError("per-layer-type rope_parameters are not supported for this model_type.")
    if not params:
        params = dict(cfg.get("rope_scaling") or {})
        params.setdefault("rope_theta", cfg.get("rope_theta", default_theta))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    kind = {"su": "longrope", "mrope": "default"}.get(kind, kind)
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) or 1.0
    rotary_dim = int(head_dim * partial)
    if rotary_dim % 2:
        raise ConfigError(f"rotary dimension {rotary_dim} (head_dim {head_dim} x {partial}) must be even.")

    def tup(key: str):
        value = params.get(key)
        return tuple(float(v) for v in value) if value is not None else None

    return RopeSpec(
        theta=float(params.get("rope_theta", default_theta)),
        kind=kind,
        rotary_dim=rotary_dim,
        factor=float(params.get("factor") or 1.0),
        original_max_position_embeddings=params.get(
            "original_max_position_embeddings", cfg.get("original_max_position_embeddings")
        ),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        short_factor=tup("short_factor"),
        long_factor=tup("long_factor"),
        attention_factor=params.get("attention_factor"),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
    )


def sliding_windows_of(cfg: dict, window: int | None, default_pattern: Callable[[int], bool] | None = None):
    """Per-layer windows from `layer_types` when present, else from the family's default pattern."""
    n = require(cfg, "num_hidden_layers")
    types = cfg.get("layer_types")
    if types:
        if len(types) != n:
            raise ConfigError(f"layer_types has {len(types)} entries for {n} layers.")
        unknown = set(types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise UnsupportedModelError(f"layer types {sorted(unknown)} are not supported.")
        return tuple(window if t == "sliding_attention" else None for t in types)
    if window is None:
        return (None,) * n
    if default_pattern is None:
        return (window,) * n
    return tuple(window if default_pattern(i) else None for i in range(n))


def base_spec(cfg: dict, *, default_tie: bool, default_act: str = "silu", default_theta: float = 10000.0, **kw):
    head_dim = head_dim_of(cfg)
    heads = require(cfg, "num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ConfigError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}.")
    values = dict(
        model_type=cfg["model_type"],
        vocab_size=require(cfg, "vocab_size"),
        hidden_size=require(cfg, "hidden_size"),
        num_layers=require(cfg, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=require(cfg, "intermediate_size"),
        rope=rope_of(cfg, head_dim, default_theta),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        activation=activation_of(cfg.get("hidden_act"), default_act),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", default_tie)),
    )
    values.update(kw)
    return ArchSpec(**values)


def llama_style_slots(
    spec: ArchSpec,
    *,
    fused_qkv: bool = False,
    fused_gate_up: bool = False,
    norm_names: dict[str, str] | None = None,
) -> dict[str, TensorSlot]:
    """Tensor names of the Llama layout (model.layers.N.self_attn.q_proj.weight, ...)."""
    norm_names = norm_names or {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}
    slots = {
        "model.embed_tokens.weight": TensorSlot("embed_tokens.weight"),
        "model.norm.weight": TensorSlot("norm.weight"),
    }
    if not spec.tie_word_embeddings:
        slots["lm_head.weight"] = TensorSlot("lm_head.weight")
    q, kv = spec.q_size, spec.kv_size
    qkv_rows = {"q_proj": slice(0, q), "k_proj": slice(q, q + kv), "v_proj": slice(q + kv, q + 2 * kv)}
    inter = spec.intermediate_size
    for i in range(spec.num_layers):
        hf, me = f"model.layers.{i}.", f"layers.{i}."
        for theirs, ours in norm_names.items():
            slots[f"{hf}{theirs}.weight"] = TensorSlot(f"{me}{ours}.weight")
        kinds = ("weight", "bias") if spec.qkv_bias else ("weight",)
        for kind in kinds:
            if fused_qkv:
                slots[f"{hf}self_attn.qkv_proj.{kind}"] = TensorSlot(f"{me}attn.qkv.{kind}")
            else:
                for name, rows in qkv_rows.items():
                    slots[f"{hf}self_attn.{name}.{kind}"] = TensorSlot(f"{me}attn.qkv.{kind}", (rows,))
        slots[f"{hf}self_attn.o_proj.weight"] = TensorSlot(f"{me}attn.o_proj.weight")
        if spec.o_bias:
            slots[f"{hf}self_attn.o_proj.bias"] = TensorSlot(f"{me}attn.o_proj.bias")
        if spec.qk_norm:
            slots[f"{hf}self_attn.q_norm.weight"] = TensorSlot(f"{me}attn.q_norm.weight")
            slots[f"{hf}self_attn.k_norm.weight"] = TensorSlot(f"{me}attn.k_norm.weight")
        if spec.moe is not None:
            continue
        mlp_kinds = ("weight", "bias") if spec.mlp_bias else ("weight",)
        for kind in mlp_kinds:
            if fused_gate_up:
                slots[f"{hf}mlp.gate_up_proj.{kind}"] = TensorSlot(f"{me}mlp.gate_up.{kind}")
            else:
                slots[f"{hf}mlp.gate_proj.{kind}"] = TensorSlot(f"{me}mlp.gate_up.{kind}", (slice(0, inter),))
                slots[f"{hf}mlp.up_proj.{kind}"] = TensorSlot(f"{me}mlp.gate_up.{kind}", (slice(inter, 2 * inter),))
            slots[f"{hf}mlp.down_proj.{kind}"] = TensorSlot(f"{me}mlp.down_proj.{kind}")
    return slots
