"""`VelotuneModel`: the decoder plus the user-facing methods, each a thin call into the layer that owns it."""

from __future__ import annotations

import torch

from velotune.infer.generate import generate as _generate
from velotune.models.decoder import DecoderModel


class VelotuneModel(DecoderModel):
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """See `velotune.infer.generate.generate` for the arguments (max_new_tokens, do_sample, ...)."""
        return _generate(self, input_ids, attention_mask, **kwargs)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False
