"""Exact causal attention for padded or packed batches, with sliding window and logit soft-capping.

Layout: q [B, T, Hq, D], k and v [B, S, Hk, D] with Hq % Hk == 0 (grouped-query attention) and
S >= T. Query row i sits at absolute position S - T + i (bottom-right aligned, so a KV cache of
S - T earlier tokens works). A query at position i sees key j when j <= i, i - j < sliding_window
(Transformers' convention: the window counts the query itself), the key is not padding, and both
lie in the same packed document.

Packed batches: B == 1 and `cu_seqlens` (int32, [n_docs + 1], starting at 0, ending at T) marks
where each document starts; no attention crosses a boundary. Padded batches: `key_padding_mask`
[B, S] is 1 for real tokens, 0 for padding. Query rows that see no key return zeros.
"""

from __future__ import annotations

import torch

from velotune.kernels._dispatch import use_triton  # noqa: F401


def attention_mask_reference(
    batch: int,
    q_len: int,
    kv_len: int,
    device: torch.device,
    *,
    sliding_window: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean [B, 1, T, S] mask, True where a query may attend a key."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed = allowed & (q_pos - k_pos < sliding_window)
    allowed = allowed[None, None].expand(batch, 1, q_len, kv_len)
    if cu_seqlens is not None:
        doc = torch.zeros(kv_len, dtype=torch.long, device=device)
        doc[cu_seqlens[1:-1].long()] = 1
        doc = doc.cumsum(0)
        allowed = allowed & (doc[kv_len - q_len :, None] == doc[None, :])[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.bool()[:, None, None, :]
    return allowed


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked attention in plain PyTorch: scores in the input dtype, softmax in float32."""
    batch, q_len, n_heads, _ = q.shape
    kv_len, n_kv = k.shape[1], k.shape[2]
    groups = n_heads // n_kv
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(groups, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(groups, dim=1)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    allowed = attention_mask_reference(
        batch,
        q_len,
        kv_len,
        q.device,
        sliding_window=sliding_window,
        cu_seqlens=cu_seqlens,
        key_padding_mask=key_padding_mask,
    )
    scores = scores.float().masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0).to(q.dtype)  # rows that see no key
    return torch.matmul(probs, vh).transpose(1, 2)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(mask(softcap(q k^T * scale))) v, returned as [B, T, Hq, D]."""
    # TRITON-PATH (issue 3)
    return attention_reference(
        q,
        k,
        v,
        scale=scale,
        sliding_window=sliding_window,
        softcap=softcap,
        cu_seqlens=cu_seqlens,
        key_padding_mask=key_padding_mask,
    )
