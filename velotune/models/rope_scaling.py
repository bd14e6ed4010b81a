"""Rotary frequencies for each rope variant a supported family uses.

Each function returns (inv_freq [rotary_dim // 2] float32, attention_factor) where attention_factor
multiplies cos and sin (LongRoPE and YaRN temper attention that way). `seq_len` matters only to
the length-dependent variants (dynamic NTK, LongRoPE); they are evaluated per forward from the
largest position in the batch, so the result depends only on the batch, never on earlier calls.
"""

from __future__ import annotations

import math

import torch

from velotune.errors import ConfigError
from velotune.models.spec import RopeSpec


def _base_inv_freq(rope: RopeSpec, theta: float | None = None) -> torch.Tensor:
    dim = rope.rotary_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / ((rope.theta if theta is None else theta) ** exponents)


def _llama3(rope: RopeSpec) -> torch.Tensor:
    inv_freq = _base_inv_freq(rope)
    old_len = rope.original_max_position_embeddings
    if old_len is None:
        raise ConfigError("llama3 rope scaling needs original_max_position_embeddings in rope_scaling.")
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are interpolated by `factor`, short ones kept; the band between is blended.
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    in_band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(in_band, blended, scaled)


def _longrope(rope: RopeSpec, seq_len: int) -> tuple[torch.Tensor, float]:
    original = rope.original_max_position_embeddings
    if original is None or rope.short_factor is None or rope.long_factor is None:
        raise ConfigError(
            "longrope scaling needs short_factor, long_factor and original_max_position_embeddings in config.json."
        )
    factor = rope.factor if rope.factor != 1.0 else rope.max_position_embeddings / original
    attention_factor = rope.attention_factor
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = rope.long_factor if seq_len > original else rope.short_factor
    ext_t = torch.tensor(ext, dtype=torch.float32)
    exponents = torch.arange(0, rope.rotary_dim, 2, dtype=torch.int64).float() / rope.rotary_dim
    return 1.0 / (ext_t * rope.theta**exponents), attention_factor


def _yarn(rope: RopeSpec) -> tuple[torch.Tensor, float]:
    dim = rope.rotary_dim
    original = rope.original_max_position_embeddings or rope.max_position_embeddings
    factor = rope.factor

    def mscale_of(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = mscale_of(factor, rope.mscale) / mscale_of(factor, rope.mscale_all_dim)
        else:
            attention_factor = mscale_of(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def rope_frequencies(rope: RopeSpec, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """inv_freq (float32, CPU) and the cos/sin multiplier for a batch whose largest position is seq_len - 1."""
    if rope.kind == "default":
        return _base_inv_freq(rope), 1.0
    if rope.kind == "linear":
        return _base_inv_freq(rope) / rope.factor, 1.0
    if rope.kind == "dynamic":
        max_len = rope.max_position_embeddings
        if seq_len is None or seq_len <= max_len:
            return _base_inv_freq(rope), 1.0
        dim = rope.rotary_dim
        theta = rope.theta * ((rope.factor * seq_len / max_len) - (rope.factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(rope, theta), 1.0
    if rope.kind == "llama3":
        return _llama3(rope), 1.0
    if rope.kind == "longrope":
        return _longrope(rope, seq_len)
    if rope.kind == "yarn":
        return _yarn(rope)
    raise ConfigError(
        f"rope type {rope.kind!r} is not supported; supported: default, linear, dynamic, llama3, longrope, yarn."
    )


def rope_cos_sin(
    rope: RopeSpec, position_ids: torch.Tensor, dtype: torch.dtype, seq_len: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, T, rotary_dim] in `dtype` for integer positions [B, T] (computed in float32)."""
    if seq_len is None and rope.kind in ("dynamic", "longrope"):
        # Only these variants depend on length; reading it elsewhere would cost a device sync.
        seq_len = int(position_ids.max().item()) + 1 if position_ids.numel() else 1
    inv_freq, attention_factor = rope_frequencies(rope, seq_len)
    inv_freq = inv_freq.to(position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_factor).to(dtype), (emb.sin() * attention_factor).to(dtype)
