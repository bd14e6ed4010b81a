"""LoRA adapters: parameters on the fused projections, injection by PEFT's target names,
merge / unmerge, and PEFT-format save and load. The forward math is `velotune.kernels.lora`."""

from velotune.lora.layers import LoraProjection, LoraSparseMoE
from velotune.lora.peft_format import LoraSettings, LoraSite, lora_sites
from velotune.lora.tuner import (
    adapter_tensors,
    add_lora,
    has_lora,
    load_adapter,
    lora_parameters,
    merge_and_unload,
    save_adapter,
    trainable_summary,
)

__all__ = [
    "LoraProjection",
    "LoraSettings",
    "LoraSite",
    "LoraSparseMoE",
    "adapter_tensors",
    "add_lora",
    "has_lora",
    "load_adapter",
    "lora_parameters",
    "lora_sites",
    "merge_and_unload",
    "save_adapter",
    "trainable_summary",
]
