"""The building blocks of the decoder: projections, norms, attention, dense and sparse MLPs.

Projections that read the same input are stored fused (q/k/v in one weight, gate/up in one
weight) so the base GEMM runs once; each keeps the PEFT names and sizes of its parts so that
LoRA adapters and checkpoints address them as Transformers and PEFT do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from velotune.kernels.activations import gated_activation
from velotune.kernels.attention import attention
from velotune.kernels.lora import lora_layout, lora_project
from velotune.kernels.rmsnorm import rms_norm
from velotune.kernels.rope import apply_rotary
from velotune.models.spec import ArchSpec


class Projection(nn.Module):
    """y = x W^T (+ b), where W stacks one or more named projections along its output rows."""

    def __init__(self, in_features: int, out_sizes: tuple[int, ...], names: tuple[str, ...], bias: bool):
        super().__init__()
        if len(out_sizes) != len(names):
            raise ValueError(f"{len(names)} names for {len(out_sizes)} output blocks")
        self.in_features = in_features
        self.out_sizes = tuple(out_sizes)
        self.names = tuple(names)
        self.weight = nn.Parameter(torch.empty(sum(out_sizes), in_features))
        self.bias = nn.Parameter(torch.empty(sum(out_sizes))) if bias else None
        n = len(self.out_sizes)
        self._plain_layout = lora_layout(in_features, self.out_sizes, (0.0,) * n, (0,) * n)

    @property
    def out_features(self) -> int:
        return sum(self.out_sizes)

    def use_quantized_weight(self, weight: nn.Module) -> None:
        """Swaps the dense weight for a frozen quantized one (`velotune.quant.nf4_weight.NF4Weight`)."""
        del self.weight
        self.weight = weight

    def lora_parts(self) -> tuple:
        """(weight, bias, stacked A or None, Bs, layout, dropout): what `lora_project` computes this
        projection from (`velotune.memory.fused_mlp` calls the op's pieces itself)."""
        return self.weight, self.bias, None, (), self._plain_layout, 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if isinstance(weight, torch.Tensor):
            return F.linear(x, weight, self.bias)
        # A quantized weight is dequantized inside the projection op, never kept dense.
        return lora_project(x, weight, self.bias, None, (), self._plain_layout)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={dict(zip(self.names, self.out_sizes))}, bias={self.bias is not None}"


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, offset: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.offset)


class Attention(nn.Module):
    def __init__(self, spec: ArchSpec, layer_idx: int):
        super().__init__()
        self.spec = spec
        self.layer_idx = layer_idx
        self.sliding_window = spec.sliding_windows[layer_idx] if spec.sliding_windows else None
        self.qkv = Projection(spec.hidden_size, spec.qkv_sizes, spec.qkv_names, spec.qkv_bias)
        self.o_proj = Projection(spec.q_size, (spec.hidden_size,), ("o_proj",), spec.o_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, spec.norm_offset)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, spec.norm_offset)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        kv_cache=None,
    ) -> torch.Tensor:
        spec = self.spec
        batch, seq = x.shape[:2]
        qkv = self.qkv(x)
        q, k, v = qkv.split((spec.q_size, spec.kv_size, spec.kv_size), dim=-1)
        q = q.view(batch, seq, spec.num_heads, spec.head_dim)
        k = k.view(batch, seq, spec.num_kv_heads, spec.head_dim)
        v = v.view(batch, seq, spec.num_kv_heads, spec.head_dim)
        if spec.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, k, cos, sin)
        if kv_cache is not None and kv_cache.decoding:
            # One token per row over the whole static cache, shapes fixed (velotune.infer's decode step).
            out = kv_cache.attend(self.layer_idx, q, k, v, scale=spec.scale, sliding_window=self.sliding_window,
                                  softcap=spec.attn_logit_softcap)  # fmt: skip
            return self.o_proj(out.reshape(batch, seq, spec.q_size))
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        if cu_seqlens is not None:
            # A packed batch is one long row: attention never crosses a document, hence never a row.
            out = attention(
                q.reshape(1, batch * seq, *q.shape[2:]),
                k.reshape(1, batch * seq, *k.shape[2:]),
                v.reshape(1, batch * seq, *v.shape[2:]),
                scale=spec.scale,
                sliding_window=self.sliding_window,
                softcap=spec.attn_logit_softcap,
                cu_seqlens=cu_seqlens,
            )
        else:
            out = attention(
                q,
                k,
                v,
                scale=spec.scale,
                sliding_window=self.sliding_window,
                softcap=spec.attn_logit_softcap,
                key_padding_mask=key_padding_mask,
            )
        return self.o_proj(out.reshape(batch, seq, spec.q_size))


class MLP(nn.Module):
    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.activation = spec.activation
        self.gate_up = Projection(spec.hidden_size, spec.gate_up_sizes, spec.gate_up_names, spec.mlp_bias)
        self.down_proj = Projection(spec.intermediate_size, (spec.hidden_size,), ("down_proj",), spec.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gated_activation(self.gate_up(x), self.activation))


class SparseMoE(nn.Module):
    """Top-k routed experts (Mixtral): softmax router in float32, chosen weights renormalised."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        assert spec.moe is not None
        self.moe = spec.moe
        self.activation = spec.activation
        n, hidden, inter = spec.moe.num_experts, spec.hidden_size, spec.intermediate_size
        self.router = nn.Parameter(torch.empty(n, hidden))
        self.gate_up = nn.Parameter(torch.empty(n, 2 * inter, hidden))
        self.down = nn.Parameter(torch.empty(n, hidden, inter))

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.router)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(self.router_logits(x).float(), dim=-1)
        weights, experts = torch.topk(probs, self.moe.top_k, dim=-1)
        if self.moe.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        h = gated_activation(F.linear(x, self.gate_up[expert]), self.activation)
        return F.linear(h, self.down[expert])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts = self.route(x)
        out = torch.zeros_like(x)
        # Tokens are grouped per expert so each expert runs one GEMM over its tokens.
        order = experts.flatten().argsort(stable=True)
        counts = torch.bincount(experts.flatten(), minlength=self.moe.num_experts).tolist()
        token_of = order // self.moe.top_k
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            idx = order[start : start + count]
            tokens = token_of[start : start + count]
            start += count
            y = self.expert_forward(expert, x[tokens])
            y = y * weights.flatten()[idx, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out.reshape(shape)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ArchSpec, layer_idx: int):
        super().__init__()
        self.spec = spec
        eps, off = spec.rms_norm_eps, spec.norm_offset
        self.attn_norm = RMSNorm(spec.hidden_size, eps, off)
        self.attn = Attention(spec, layer_idx)
        self.mlp_norm = RMSNorm(spec.hidden_size, eps, off)
        self.mlp = SparseMoE(spec) if spec.moe is not None else MLP(spec)
        if spec.sandwich_norms:
            self.attn_out_norm = RMSNorm(spec.hidden_size, eps, off)
            self.mlp_out_norm = RMSNorm(spec.hidden_size, eps, off)

    def forward(self, x, cos, sin, key_padding_mask, cu_seqlens, kv_cache=None) -> torch.Tensor:
        return self.mlp_block(self.attention_block(x, cos, sin, key_padding_mask, cu_seqlens, kv_cache))

    def attention_block(self, x, cos, sin, key_padding_mask, cu_seqlens, kv_cache=None) -> torch.Tensor:
        """x + attention(norm(x)): the half of the layer that mixes tokens."""
        h = self.attn(self.attn_norm(x), cos, sin, key_padding_mask, cu_seqlens, kv_cache)
        if self.spec.sandwich_norms:
            h = self.attn_out_norm(h)
        return x + h

    def mlp_block(self, x: torch.Tensor) -> torch.Tensor:
        """x + mlp(norm(x)): each token on its own, so `velotune.memory` may run it over sequence tiles
        and recompute it apart from the attention half."""
        h = self.mlp(self.mlp_norm(x))
        if self.spec.sandwich_norms:
            h = self.mlp_out_norm(h)
        return x + h
