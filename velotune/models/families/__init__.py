"""One adapter per Hugging Face `model_type`."""

from __future__ import annotations

from velotune.errors import UnsupportedModelError
from velotune.models.families import gemma, gemma2, llama, mistral, mixtral, phi3, qwen2, qwen3
from velotune.models.families.common import Family, TensorSlot

FAMILIES: dict[str, Family] = {
    m.FAMILY.model_type: m.FAMILY for m in (llama, mistral, qwen2, qwen3, gemma, gemma2, phi3, mixtral)
}


def family_of(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        supported = ", ".join(f"{k} ({v.description})" for k, v in FAMILIES.items())
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported. Supported model types: {supported}. "
            "Open an issue with the model's config.json to ask for another family."
        )
    return FAMILIES[model_type]


__all__ = ["FAMILIES", "Family", "TensorSlot", "family_of"]
