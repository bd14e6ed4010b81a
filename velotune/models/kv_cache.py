"""A static, preallocated key/value cache: one [B, max_len, Hk, D] buffer pair per layer, reused.

It is filled two ways:
- `update` (the prompt, any number of tokens per row): writes at the host-side `length` and hands
  the attention the filled prefix;
- `attend` (decoding, one token per row): writes at the column held in the device tensor `column`
  and attends over every column of the buffer under the additive masks in `masks` (one per sliding
  window), which `velotune.infer` rebuilds each step. Shapes never change and nothing is read back
  to the host, so a CUDA graph can capture the step once and replay it for every token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from velotune.errors import ConfigError


def decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """One query per row against the whole cache: q [B, 1, Hq, D], keys/values [B, L, Hk, D], mask
    [B, 1, 1, L] additive (0 where visible, -inf elsewhere, at least one column visible). -> [B, 1, Hq, D].

    The Hq / Hk query heads that share a KV head are laid out as that head's query rows, so grouped-query
    attention needs no copy of K and V. Soft-capped scores (Gemma 2) are computed in plain PyTorch with the
    softmax in float32, as `velotune.kernels.attention.attention_reference` does.
    """
    batch, _, n_heads, dim = q.shape
    n_kv = keys.shape[2]
    qg = q.reshape(batch, n_kv, n_heads // n_kv, dim)
    kh, vh = keys.transpose(1, 2), values.transpose(1, 2)
    if softcap is None:
        out = F.scaled_dot_product_attention(qg, kh, vh, attn_mask=mask, scale=scale)
    else:
        scores = torch.matmul(qg, kh.transpose(-1, -2)) * scale
        scores = torch.tanh(scores / softcap) * softcap
        probs = torch.softmax(scores.float() + mask.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, vh)
    return out.reshape(batch, 1, n_heads, dim)


class StaticKVCache:
    def __init__(
        self,
        num_layers: int,
        batch: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (batch, max_len, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0  # tokens already stored (committed after the last layer of a forward)
        self._pending = 0
        # Decoding (see the module docstring): set by velotune.infer.
        self.decoding = False
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.masks: dict[int | None, torch.Tensor] = {}

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new = k.shape[1]
        end = self.length + new
        if end > self.max_len:
            raise ConfigError(
                f"KV cache holds {self.max_len} tokens; this step needs {end}. Raise max_new_tokens' budget "
                "(the cache size) or shorten the prompt."
            )
        self.keys[layer][:, self.length : end] = k
        self.values[layer][:, self.length : end] = v
        self._pending = new
        return self.keys[layer][:, :end], self.values[layer][:, :end]

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float,
        sliding_window: int | None,
        softcap: float | None,
    ) -> torch.Tensor:
        """Stores this token's k, v [B, 1, Hk, D] at `column` and returns its attention output [B, 1, Hq, D]."""
        self.keys[layer].index_copy_(1, self.column, k)
        self.values[layer].index_copy_(1, self.column, v)
        mask = self.masks[sliding_window]
        return decode_attention(q, self.keys[layer], self.values[layer], mask, scale=scale, softcap=softcap)

    def commit(self) -> None:
        self.length += self._pending
        self._pending = 0

    def reset(self) -> None:
        self.length = 0
        self._pending = 0
