"""The weights an export writes: each internal parameter as the model computes with it.

A LoRA-adapted projection contributes W + s B A (computed in float32 on the weight's device, one
parameter at a time, never written back into the model), so exporting needs one parameter's worth
of extra memory and leaves the model exactly as it was.
"""

from __future__ import annotations

import torch
from torch import nn

from velotune.errors import ConfigError


def base_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own parameters by name, without LoRA factors (those are merged, never written)."""
    from velotune.lora import lora_parameters

    adapter = {id(p) for p in lora_parameters(model)}
    return {name: p for name, p in model.named_parameters() if id(p) not in adapter}


def _owner(model: nn.Module, internal: str) -> tuple[nn.Module, str]:
    path, _, attr = internal.rpartition(".")
    try:
        return (model.get_submodule(path) if path else model), attr
    except AttributeError as exc:
        raise ConfigError(f"the model has no module {path!r} (needed for parameter {internal!r}).") from exc


def _lora_delta(module: nn.Module, attr: str, weight: torch.Tensor) -> torch.Tensor | None:
    """s B A laid out like `weight` (float32), or None when this parameter carries no unmerged LoRA."""
    rank = getattr(module, "rank", None)
    if not rank or getattr(module, "merged", False) or attr == "bias":
        return None
    if hasattr(module, "lora_a"):  # LoraProjection: one pair per named block of the fused rows
        delta = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        start = 0
        for name, size in zip(module.names, module.out_sizes):
            if name in rank:
                b, a = module.lora_B[name].float(), module.lora_a(name).float()
                delta[start : start + size] = (b @ a) * module.scale[name]
            start += size
        return delta
    if attr in rank:  # LoraSparseMoE: one (batched over experts) pair per unit
        return torch.matmul(module.lora_B[attr].float(), module.lora_A[attr].float()) * module.scale[attr]
    return None


class EffectiveWeights:
    """`tensor(internal)` gives the parameter the forward pass uses (LoRA merged in when present).

    The last merged parameter is kept so that the slices of one fused tensor (q, k, v) cost one merge.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._cached: tuple[str, torch.Tensor] | None = None

    @torch.no_grad()
    def tensor(self, internal: str) -> torch.Tensor:
        if self._cached is not None and self._cached[0] == internal:
            return self._cached[1]
        module, attr = _owner(self.model, internal)
        weight = getattr(module, attr)
        if not isinstance(weight, torch.Tensor):
            raise ConfigError(f"{internal!r} is not a tensor of the model.")
        delta = _lora_delta(module, attr, weight)
        value = weight.detach() if delta is None else weight.detach().float() + delta
        self._cached = (internal, value)
        return value

    def slice(self, internal: str, index: tuple) -> torch.Tensor:
        value = self.tensor(internal)
        return value[index] if index else value

    def shape(self, internal: str, index: tuple) -> tuple[int, ...]:
        """Shape of a slice without merging anything (the base parameter has the merged shape)."""
        module, attr = _owner(self.model, internal)
        weight = getattr(module, attr)
        return tuple(weight[index].shape) if index else tuple(weight.shape)
