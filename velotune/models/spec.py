"""`ArchSpec`: every knob in which the supported decoder families differ.

The decoder (`velotune.models.decoder`) reads only this; the per-family adapters in
`velotune.models.families` build it from a Hugging Face config.json.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters, normalised from the several spellings config.json files use."""

    theta: float = 10000.0
    kind: str = "default"  # default | linear | dynamic | llama3 | longrope | yarn
    rotary_dim: int = 0  # rotated dims per head (partial rotary when < head_dim)
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    max_position_embeddings: int = 2048
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    short_factor: tuple[float, ...] | None = None  # longrope
    long_factor: tuple[float, ...] | None = None  # longrope
    attention_factor: float | None = None  # longrope / yarn
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int
    normalize_top_k: bool = True  # Mixtral renormalises the chosen experts' weights to sum to 1


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope: RopeSpec
    rms_norm_eps: float = 1e-6
    norm_offset: float = 0.0  # 1.0 for Gemma's (1 + w) RMSNorm
    activation: str = "silu"  # silu | gelu_tanh (gated)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before rope
    sandwich_norms: bool = False  # Gemma-2: extra norms on the attention and MLP outputs
    embedding_scale: float | None = None  # Gemma: embeddings times sqrt(hidden) (in the model dtype)
    attention_scale: float | None = None  # default head_dim ** -0.5
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None = full attention
    tie_word_embeddings: bool = False
    moe: MoESpec | None = None
    # PEFT module names of the fused projections; a checkpoint that stores q/k/v (or gate/up) fused
    # is adapted with one LoRA pair per fused tensor, as PEFT does for that family.
    qkv_names: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    gate_up_names: tuple[str, ...] = ("gate_proj", "up_proj")
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def scale(self) -> float:
        return self.attention_scale if self.attention_scale is not None else self.head_dim**-0.5

    @property
    def qkv_sizes(self) -> tuple[int, ...]:
        if len(self.qkv_names) == 1:
            return (self.q_size + 2 * self.kv_size,)
        return (self.q_size, self.kv_size, self.kv_size)

    @property
    def gate_up_sizes(self) -> tuple[int, ...]:
        if len(self.gate_up_names) == 1:
            return (2 * self.intermediate_size,)
        return (self.intermediate_size, self.intermediate_size)

    def replace(self, **changes) -> ArchSpec:
        return dataclasses.replace(self, **changes)
