"""The attention half of a decoder layer, x + o(attention(rope(qkv(norm(x))))), recomputed and
differentiated by hand: what a checkpointed layer's backward runs for that half.

Why not autograd (what `velotune.memory.checkpoint` did for this half before): the recomputation
then rebuilt a graph of five autograd Functions through the modules and `torch.autograd.grad` walked
it, and it computed the o projection's output and the residual sum, which no gradient needs once the
MLP half has been differentiated from its kept input ("save_mlp"): an [T, hidden] x [hidden, q_size]
GEMM per layer (~7 ms per step at Llama-3.1-8B, 2 x 2048 tokens, on an H100) and its 4-bit weight's
dequantization. The host time of that graph left the GPU idle between the small LoRA kernels of the
q/k/v and o projections' backward (benchmarks/NOTES.md, session 5). Here the half is its kernels:

  recompute  rmsnorm, q/k/v (base GEMM + LoRA), rope, attention forward  (o only when its output is
             needed: the MLP half's input under the "full" policy)
  backward   o's LoRA grads and d(attention output) = dy W_o (+ LoRA), attention backward, rope
             backward, q/k/v's LoRA grads and d(normed) = dqkv W_qkv (+ LoRA), rmsnorm backward + dy

The attention kernel alone keeps a one-node graph: `velotune.kernels.attention.attention` picks the
same backend (SDPA, varlen or velotune's Triton kernel) as the module would and its own backward
runs. The ops are the ones the modules run, with the same arguments, in the same order, so the
gradients are bitwise those of autograd over `layer.attention_block`. It applies where that holds:
the Triton path (CUDA), no autocast, no LoRA dropout in training, frozen base and norm weights, no
q/k norms or sandwich norms; elsewhere `fused_attention_block` returns None and autograd runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from velotune.errors import KernelError
from velotune.kernels.attention import attention
from velotune.kernels.lora import (
    _fused_forward,
    _rows,
    lora_branch_inputs,
    lora_input_grad,
    with_cast_factors,
)
from velotune.kernels.rmsnorm import rms_norm_backward, rms_norm_output_dtype
from velotune.kernels.rope import rope_launch
from velotune.memory.fused_mlp import FactorGradients, hand_written_parts, norm_into_folded_input
from velotune.models.layers import Attention, DecoderLayer


@dataclass
class AttentionRecompute:
    """What the attention half's backward reads, recomputed from the layer input `x`."""

    x: torch.Tensor
    normed: torch.Tensor  # [T, hidden]
    rstd: torch.Tensor
    qkv_lora: tuple  # the cast A, x A^T and cast Bs of the q/k/v projection
    q: torch.Tensor  # the rotated q and k and the v view, leaves of the attention's one-node graph
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor  # the attention output [B, T, heads, head_dim], with that graph
    dtypes: tuple[torch.dtype, torch.dtype]  # q's and k's dtypes before the rotation
    o_parts: tuple  # o's `lora_parts()` with its factors cast to the attention output's dtype


class FusedAttentionBlock:
    """One layer's attention half (callable as `layer.attention_block`), with a hand-written
    recomputation and backward for `velotune.memory.checkpoint`."""

    def __init__(self, layer, cos, sin, key_padding_mask, cu_seqlens, qkv_parts: tuple, o_parts: tuple):
        self.layer, self.spec = layer, layer.spec
        self.norm, self.attn = layer.attn_norm, layer.attn
        self.cos, self.sin, self.key_padding_mask, self.cu_seqlens = cos, sin, key_padding_mask, cu_seqlens
        self.qkv, self.o = qkv_parts, o_parts

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x + attention(...); without grad mode (the first forward of a checkpointed layer) by the same
        ops as the recomputation, with the layer's LoRA factors cast in one go. out: a tensor of x's
        shape to write the result into (a CUDA graph's static buffer; without grad mode only)."""
        if torch.is_grad_enabled():
            if out is not None:
                raise KernelError("FusedAttentionBlock(x, out=...) runs without grad mode only.")
            return self.layer.attention_block(x, self.cos, self.sin, self.key_padding_mask, self.cu_seqlens)
        qkv_parts, o_parts = self._cast_parts(x)
        _, _, _, q, k, v, _ = self._project_qkv(x, qkv_parts)
        return torch.add(x, self._o_forward(self._attend(q, k, v), o_parts).view(x.shape), out=out)

    def _cast_parts(self, x: torch.Tensor) -> list[tuple]:
        """q/k/v's and o's parts with their LoRA factors in the dtype each computes in: the attention
        norm's output dtype, and the rotated q's (hence the attention output's)."""
        normed = rms_norm_output_dtype(x, self.norm.weight, self.norm.offset)
        return with_cast_factors((self.qkv, self.o), (normed, torch.promote_types(normed, self.cos.dtype)))

    def _project_qkv(self, x: torch.Tensor, qkv_parts: tuple):
        """(normed rows, rstd, q/k/v's LoRA pieces, rotated q, rotated k, v, q's and k's dtypes before
        the rotation), without a graph."""
        spec = self.spec
        batch, seq = x.shape[:2]
        with torch.no_grad():
            normed, rstd, wide = norm_into_folded_input(x, self.norm, qkv_parts)
            w, b, a, bs, layout, _ = qkv_parts
            qkv, a_c, xa, bs_c = _fused_forward(normed, None, w, b, a, layout, bs, wide=wide)
            q, k, v = qkv.view(batch, seq, -1).split((spec.q_size, spec.kv_size, spec.kv_size), dim=-1)
            q = q.view(batch, seq, spec.num_heads, spec.head_dim)
            k = k.view(batch, seq, spec.num_kv_heads, spec.head_dim)
            v = v.view(batch, seq, spec.num_kv_heads, spec.head_dim)
            dtypes = (q.dtype, k.dtype)
            # As `RotaryFunction` rotates them: new tensors, in the promoted dtypes.
            q, k = rope_launch(q, k, self.cos, self.sin, torch.promote_types(q.dtype, self.cos.dtype),
                               torch.promote_types(k.dtype, self.cos.dtype))  # fmt: skip
        return normed, rstd, (a_c, xa, bs_c), q, k, v, dtypes

    def _o_forward(self, out: torch.Tensor, o_parts: tuple) -> torch.Tensor:
        """o's output [T, hidden] from the attention output, without a graph."""
        w, b, a, bs, layout, _ = o_parts
        with torch.no_grad():
            return _fused_forward(out.detach().reshape(-1, self.spec.q_size), None, w, b, a, layout, bs)[0]

    def trains(self, params: Sequence[torch.Tensor], parts: tuple | None = None) -> bool:
        """Whether any of params is a LoRA factor of this half (or of one projection's `parts`): then
        its backward has work even when its input needs no gradient."""
        ids = {id(p) for p in params}
        return any(
            id(t) in ids
            for w in ((parts,) if parts else (self.qkv, self.o))
            for t in (w[2], *w[3])
            if t is not None
        )

    def recompute(self, x: torch.Tensor, need_output: bool) -> tuple[AttentionRecompute, torch.Tensor | None]:
        """The half's intermediates from its input x, and its output x + o(...) when need_output."""
        qkv_parts, o_parts = self._cast_parts(x)
        normed, rstd, qkv_lora, q, k, v, dtypes = self._project_qkv(x, qkv_parts)
        q, k, v = q.requires_grad_(), k.requires_grad_(), v.detach().requires_grad_()
        with torch.enable_grad():
            out = self._attend(q, k, v)
        state = AttentionRecompute(x, normed, rstd, qkv_lora, q, k, v, out, dtypes, o_parts)
        if not need_output:
            return state, None
        return state, x + self._o_forward(out, o_parts).view(x.shape)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`Attention.forward`'s attention call, batch layout included."""
        spec, batch, seq = self.spec, q.shape[0], q.shape[1]
        window, softcap = self.attn.sliding_window, spec.attn_logit_softcap
        if self.cu_seqlens is not None:
            packed = [t.reshape(1, batch * seq, *t.shape[2:]) for t in (q, k, v)]
            out = attention(*packed, scale=spec.scale, sliding_window=window, softcap=softcap,
                            cu_seqlens=self.cu_seqlens)  # fmt: skip
            return out.reshape(q.shape)
        return attention(q, k, v, scale=spec.scale, sliding_window=window, softcap=softcap,
                         key_padding_mask=self.key_padding_mask)  # fmt: skip

    def backward(
        self, state: AttentionRecompute, dy: torch.Tensor, params: Sequence[torch.Tensor], need_dx: bool,
        dx_out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:  # fmt: skip
        """Gradients of <half(x), dy> for x (when need_dx) and params (one gradient or None each).
        dx_out: a tensor of x's shape dx is written into (a CUDA graph's static buffer; not dy)."""
        factor_grads = FactorGradients(params)

        def finish(dx):
            # Both projections' factor gradients in their parameters' dtypes, cast in one copy.
            return dx, factor_grads.add_to([None] * len(params))

        spec = self.spec
        x, out = state.x, state.out
        with torch.no_grad():
            dy2 = _rows(dy)
            if dy2.stride(-1) != 1:
                dy2 = dy2.contiguous()
            attn2 = out.detach().reshape(-1, spec.q_size)
            w_o, _, a_o, bs_o, layout_o, _ = state.o_parts
            a_c, xa, bs_c = lora_branch_inputs(attn2, a_o, layout_o, bs_o)
            dyb = factor_grads.of(self.o, dy2, attn2, xa, a_c, bs_c)
            del xa
            d_out = lora_input_grad(dy2, w_o, dyb, a_c).view(out.shape)
            del dyb, attn2
        if not need_dx and not self.trains(params, self.qkv):
            return finish(None)  # nothing below o needs a gradient
        dq, dk, dv = torch.autograd.grad(out, (state.q, state.k, state.v), d_out)
        del d_out, out
        state.out = state.q = state.k = state.v = None
        with torch.no_grad():
            dq, dk = rope_launch(dq, dk, self.cos, self.sin, *state.dtypes, backward=True)
            t = x.shape[0] * x.shape[1]
            # The q/k/v split's gradient, as autograd forms it: one [T, q + 2 kv] tensor.
            dqkv = torch.cat((dq.reshape(t, -1), dk.reshape(t, -1), dv.reshape(t, -1)), dim=1)
            del dq, dk, dv
            w_qkv = self.qkv[0]
            a_c, xa, bs_c = state.qkv_lora
            dyb = factor_grads.of(self.qkv, dqkv, state.normed, xa, a_c, bs_c)
            state.qkv_lora = None
            if not need_dx:
                return finish(None)
            d_normed = lora_input_grad(dqkv, w_qkv, dyb, a_c)
            del dqkv, dyb
            state.normed = None
            dx = rms_norm_backward(
                d_normed.view(x.shape), x, self.norm.weight, state.rstd, self.norm.offset, False
            )[0]
            return finish(dx.add_(dy) if dx_out is None else torch.add(dx, dy, out=dx_out))


def fused_attention_block(
    layer, x: torch.Tensor, cos, sin, key_padding_mask, cu_seqlens
) -> FusedAttentionBlock | None:
    """The hand-written attention half of `layer` where it computes what `layer.attention_block`
    would, else None."""
    spec = getattr(layer, "spec", None)
    attn = getattr(layer, "attn", None)
    if spec is None or spec.sandwich_norms or spec.qk_norm:
        return None
    qkv, o = getattr(attn, "qkv", None), getattr(attn, "o_proj", None)
    if not hasattr(qkv, "lora_parts") or not hasattr(o, "lora_parts"):
        return None
    if type(layer).attention_block is not DecoderLayer.attention_block:
        return None
    if cos.requires_grad or sin.requires_grad:
        return None  # `apply_rotary` runs its reference path then, to give them a gradient
    parts = hand_written_parts(x, layer.attn_norm, (attn, Attention), qkv, o)
    return (
        FusedAttentionBlock(layer, cos, sin, key_padding_mask, cu_seqlens, *parts)
        if parts is not None
        else None
    )
