"""Linear (LM head) + cross-entropy loss without materialising the [tokens, vocab] logits.

hidden [N, H] and labels [N] are already aligned (the caller shifts: hidden of token t predicts
label t+1). The loss is the sum of per-token losses over labels != ignore_index divided by
`num_items_in_batch` when given (gradient accumulation over several micro-batches), else by the
number of non-ignored labels: the same convention as Transformers' causal-LM loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from velotune.kernels._dispatch import use_triton  # noqa: F401


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    logit_softcap: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias)
    if logit_softcap is not None:
        logits = torch.tanh(logits / logit_softcap) * logit_softcap
    logits = logits.float()
    if num_items_in_batch is None:
        return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="mean")
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    logit_softcap: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean (or sum / num_items_in_batch) cross-entropy of softmax(hidden @ weight.T + bias) vs labels."""
    # TRITON-PATH (issue 3)
    return linear_cross_entropy_reference(
        hidden,
        weight,
        labels,
        bias=bias,
        ignore_index=ignore_index,
        logit_softcap=logit_softcap,
        num_items_in_batch=num_items_in_batch,
    )
