"""A static, preallocated key/value cache: one [B, max_len, Hk, D] buffer pair per layer, reused."""

from __future__ import annotations

import torch

from velotune.errors import ConfigError


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

    def commit(self) -> None:
        self.length += self._pending
        self._pending = 0

    def reset(self) -> None:
        self.length = 0
        self._pending = 0
