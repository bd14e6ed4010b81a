"""The weights an export writes: each checkpoint tensor as the model computes with it.

A LoRA-adapted projection contributes W + s B A. It is computed for the requested slice only (the
q rows of a fused q/k/v weight, one expert of a stacked tensor), in float32 on the weight's device,
added in place into that slice's float32 copy, and never written back into the model: exporting
needs one slice's float32 copy of extra memory and leaves the model exactly as it was.
"""

from __future__ import annotations

import torch
from torch import nn

from velotune.errors import ConfigError


def base_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own parameters by name, without LoRA factors (those are merged, never written)."""
    from velotune.lora import lora_parameters

    adapter = {id(p) for p in lora_parameters(model)}
    params = {name: p for name, p in model.named_parameters() if id(p) not in adapter}
    for name, module in model.named_modules():
        if hasattr(module, "dequantize") and hasattr(module, "shape"):
            # A 4-bit base weight is a module holding packed data; its shape stands in for the tensor.
            params[name] = torch.empty(module.shape, device="meta")
    return params


def _owner(model: nn.Module, internal: str) -> tuple[nn.Module, str]:
    path, _, attr = internal.rpartition(".")
    try:
        return (model.get_submodule(path) if path else model), attr
    except AttributeError as exc:
        raise ConfigError(f"the model has no module {path!r} (needed for parameter {internal!r}).") from exc


def _add_product(out: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scale: float) -> None:
    """out += scale * b @ a, in place (batched over leading expert dims when there are any)."""
    if out.dim() == 2:
        out.addmm_(b.float(), a.float(), alpha=scale)
    else:
        out.view(-1, *out.shape[-2:]).baddbmm_(
            b.float().reshape(-1, *b.shape[-2:]), a.float().reshape(-1, *a.shape[-2:]), alpha=scale
        )


def _float_copy(base: torch.Tensor) -> torch.Tensor:
    # Always a copy: for a float32 model .float() would return the parameter itself, and the in-place
    # merge below would change the model.
    return base.to(torch.float32, copy=True).contiguous()


def _merge_projection(module: nn.Module, value: torch.Tensor, rows: slice, total_rows: int) -> None:
    """Adds each LoRA block's s B A to the rows of a fused projection that `value` holds."""
    first, last, _ = rows.indices(total_rows)
    start = 0
    for name, size in zip(module.names, module.out_sizes):
        lo, hi = max(start, first), min(start + size, last)
        if name in module.rank and lo < hi:
            b = module.lora_B[name][lo - start : hi - start]
            _add_product(value[lo - first : hi - first], b, module.lora_a(name), module.scale[name])
        start += size


class EffectiveWeights:
    """`slice(internal, index)`: that slice of a parameter as the forward pass uses it (LoRA merged in)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def _parameter(self, internal: str) -> tuple[nn.Module, str, torch.Tensor]:
        module, attr = _owner(self.model, internal)
        weight = getattr(module, attr)
        if not isinstance(weight, torch.Tensor) and hasattr(weight, "dequantize"):
            # A 4-bit base (QLoRA) is merged in 16-bit: dequantized one projection at a time.
            weight = weight.dequantize()
        if not isinstance(weight, torch.Tensor):
            raise ConfigError(f"{internal!r} is not a tensor of the model.")
        return module, attr, weight

    @torch.no_grad()
    def slice(self, internal: str, index: tuple = ()) -> torch.Tensor:
        module, attr, weight = self._parameter(internal)
        base = (weight[index] if index else weight).detach()
        rank = getattr(module, "rank", None)
        if not rank or getattr(module, "merged", False) or attr == "bias":
            return base
        if hasattr(module, "lora_a"):  # LoraProjection: a pair per named block of the fused rows
            value = _float_copy(base)
            _merge_projection(module, value, index[0] if index else slice(None), weight.shape[0])
            return value
        if attr in rank:  # LoraSparseMoE: one pair per unit, batched over experts
            b, a = module.lora_B[attr], module.lora_A[attr]
            lead = b.dim() - 2  # expert dims, indexed like the weight's; A has no output rows to slice
            value = _float_copy(base)
            _add_product(value, b[index] if index else b, a[index[:lead]] if index else a, module.scale[attr])
            return value
        return base

    def shape(self, internal: str, index: tuple = ()) -> tuple[int, ...]:
        """Shape of a slice without merging anything (the base parameter has the merged shape)."""
        module, attr = _owner(self.model, internal)
        weight = getattr(module, attr)
        if not isinstance(weight, torch.Tensor) and hasattr(weight, "dequantize"):
            return tuple(torch.empty(weight.shape, device="meta")[index].shape) if index else tuple(weight.shape)
        _, _, weight = self._parameter(internal)
        return tuple(weight[index].shape) if index else tuple(weight.shape)
