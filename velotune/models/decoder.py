"""One decoder-only causal LM, driven entirely by an `ArchSpec`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from velotune.errors import DataError
from velotune.kernels._dispatch import use_triton
from velotune.kernels.cross_entropy import fused_linear_cross_entropy, plan_labels
from velotune.memory.checkpoint import run_layers
from velotune.models.kv_cache import StaticKVCache
from velotune.models.layers import DecoderLayer, RMSNorm
from velotune.models.rope_scaling import rope_cos_sin
from velotune.models.spec import ArchSpec

IGNORE_INDEX = -100


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Document boundaries of packed rows: a document starts wherever a position is not its
    predecessor + 1 (Transformers' rule), and at every row start. None when nothing is packed."""
    batch, seq = position_ids.shape
    step = torch.diff(position_ids, dim=-1) != 1
    starts = torch.cat([torch.ones(batch, 1, dtype=torch.bool, device=position_ids.device), step], dim=-1)
    if batch == 1 and not bool(step.any()):
        return None
    idx = starts.flatten().nonzero().flatten()
    total = torch.tensor([batch * seq], device=position_ids.device)
    return torch.cat([idx, total]).to(torch.int32)


class DecoderModel(nn.Module):
    """Causal LM: embed -> L x DecoderLayer -> norm -> LM head (+ loss without full logits)."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.norm_offset)
        self.lm_head = None if spec.tie_word_embeddings else nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        # False | True (inputs kept on the GPU) | "offload" (pinned CPU memory); policy "full" | "save_attn" | "save_mlp";
        # MLP sequence tile (None: automatic). See velotune.memory.checkpoint.
        self.gradient_checkpointing: bool | str = False
        self.checkpoint_policy = "full"
        self.gate_up_kept_layers: int | None = None  # under "save_mlp" (None: automatic)
        self.mlp_tile_tokens: int | None = None
        # On CUDA under the "full" / "save_mlp" policies: replay each layer's first forward (and its
        # backward under "save_mlp") from CUDA graphs (velotune.memory.layer_graphs).
        self.cuda_graphs = False
        self.max_seq_length: int | None = None
        # "auto": the frozen, untied input embedding waits in host memory while training on a GPU and
        # comes back for inference; True / False: always on the host / on the device.
        self.embedding_placement: bool | str = "auto"

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        # The final norm, not the embedding: the embedding table may be kept in host memory.
        return self.norm.weight.device

    @property
    def embedding_on_host(self) -> bool:
        return self.embed_tokens.weight.device != self.device

    def keep_embedding_on_host(self, on_host: bool) -> bool:
        """Moves the input embedding table to pinned host memory (True) or back to the model's device.

        A frozen, untied table is only read at the rows of the batch, so the GPU needs just those rows:
        they are gathered on the host and copied over (batch x seq x hidden values, e.g. 32 MiB for
        4,096 tokens at hidden 4,096), which frees the whole table (1 GiB for Llama-3's 128,256 x 4,096
        in bf16). Returns whether the table is on the host afterwards; a table that trains or that the
        LM head shares stays where it is.
        """
        weight = self.embed_tokens.weight
        if on_host:
            if weight.requires_grad or self.lm_head is None or self.device.type != "cuda":
                return self.embedding_on_host
            if not self.embedding_on_host:
                weight.data = weight.data.to("cpu").pin_memory()
            return True
        if self.embedding_on_host:
            weight.data = weight.data.to(self.device)
        return False

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.embedding_on_host:
            return self.embed_tokens(input_ids)
        # Table on the host: gather the rows there into pinned memory, then one asynchronous copy.
        weight = self.embed_tokens.weight
        ids = input_ids.to("cpu").reshape(-1)
        rows = torch.empty((ids.numel(), weight.shape[1]), dtype=weight.dtype, pin_memory=True)
        torch.index_select(weight, 0, ids, out=rows)
        return rows.view(*input_ids.shape, -1).to(self.device, non_blocking=True)

    def logits_of(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.lm_head_weight)
        if self.spec.final_logit_softcap is not None:
            cap = self.spec.final_logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits

    def new_kv_cache(self, batch: int, max_len: int) -> StaticKVCache:
        s = self.spec
        return StaticKVCache(s.num_layers, batch, max_len, s.num_kv_heads, s.head_dim, self.dtype, self.device)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        past_key_values: StaticKVCache | None = None,
    ) -> torch.Tensor:
        batch, seq = input_ids.shape
        if self.max_seq_length is not None and past_key_values is None and seq > self.max_seq_length:
            raise DataError(
                f"sequence of {seq} tokens is longer than max_seq_length={self.max_seq_length}; truncate the "
                "data or load the model with a larger max_seq_length."
            )
        past = past_key_values.length if past_key_values is not None else 0
        explicit_positions = position_ids is not None
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=input_ids.device).unsqueeze(0).expand(batch, -1)
        key_padding_mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise DataError("attention_mask must be [batch, seq] with 1 for tokens and 0 for padding.")
            key_padding_mask = attention_mask.bool()
        elif cu_seqlens is None and explicit_positions and past_key_values is None:
            cu_seqlens = cu_seqlens_from_position_ids(position_ids)

        x = self.embed(input_ids)
        if self.spec.embedding_scale is not None:
            x = x * torch.tensor(self.spec.embedding_scale, dtype=x.dtype)
        cos, sin = rope_cos_sin(self.spec.rope, position_ids, x.dtype)
        if past_key_values is None:
            x = run_layers(self, x, cos, sin, key_padding_mask, cu_seqlens)
        else:
            for layer in self.layers:
                x = layer(x, cos, sin, key_padding_mask, cu_seqlens, past_key_values)
            past_key_values.commit()
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
        past_key_values: StaticKVCache | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        logits_to_keep: int = 0,
        return_logits: bool | None = None,
        **unused,
    ) -> CausalLMOutputWithPast:
        """Same contract as Transformers' *ForCausalLM.forward: labels are shifted inside and -100 ignored.

        In training mode with labels, logits are not computed (the loss never needs them whole);
        pass return_logits=True to get them anyway.
        """
        plan = None
        if labels is not None:
            head = self.lm_head_weight
            shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(head.device)
            if use_triton(head):
                # The loss's host sync (counting the labels), here at the start of the step, where it
                # waits for nothing, and not after the layers (velotune.kernels.cross_entropy.plan_labels).
                plan = plan_labels(shifted, head.shape[0], IGNORE_INDEX, head.device)
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, cu_seqlens, past_key_values)
        loss = None
        if labels is not None:
            loss = fused_linear_cross_entropy(
                hidden.reshape(-1, hidden.shape[-1]),
                self.lm_head_weight,
                shifted,
                ignore_index=IGNORE_INDEX,
                logit_softcap=self.spec.final_logit_softcap,
                num_items_in_batch=num_items_in_batch,
                label_plan=plan,
            )
        if return_logits is None:
            return_logits = labels is None or not self.training
        logits = None
        if return_logits:
            kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
            logits = self.logits_of(kept)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)
