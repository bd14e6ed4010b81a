"""Export: merged Hugging Face folders, LoRA adapters, GGUF files for llama.cpp, Ollama Modelfiles.

The `save_pretrained_*` methods of `VelotuneModel` call these. The GGUF modules import the `gguf`
package, so they are imported only when a GGUF is asked for.
"""

from __future__ import annotations

import logging
import os

from velotune.errors import ConfigError, UnsupportedModelError

logger = logging.getLogger(__name__)

SAVE_METHODS = ("merged_16bit", "lora", "merged_4bit")


def save_pretrained_merged(
    model, save_directory: str, tokenizer=None, save_method: str = "merged_16bit", **kwargs
):
    """Writes `model` to `save_directory`; returns the folder.

    Args:
        save_method: "merged_16bit" (LoRA merged, a standard Hugging Face folder in the model's dtype; see
            `velotune.export.merged_hf.save_merged_16bit` for max_shard_size and dtype) or "lora" (the adapter
            alone, in PEFT's format, with the tokenizer).
    """
    if save_method == "merged_16bit":
        from velotune.export.merged_hf import save_merged_16bit

        return save_merged_16bit(model, save_directory, tokenizer, **kwargs)
    if save_method == "lora":
        from velotune import lora

        lora.save_adapter(model, save_directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(save_directory)
        return save_directory
    if save_method in ("merged_4bit", "merged_4bit_forced"):
        raise UnsupportedModelError(
            "save_method='merged_4bit' (a bitsandbytes 4-bit folder) is not available yet; save 'merged_16bit' "
            "(Transformers can quantize it on load with load_in_4bit) or 'lora'."
        )
    raise ConfigError(f"save_method {save_method!r} is not one of {SAVE_METHODS}.")


def save_pretrained_gguf(model, save_directory: str, tokenizer, quantization_method: str = "f16") -> str:
    """Writes `<save_directory>/model.<METHOD>.gguf` and an Ollama `Modelfile` beside it; returns the GGUF path.

    Args:
        quantization_method: "f32", "f16", "bf16", "q8_0", or llama.cpp's "q4_k_m", "q5_k_m", "q6_k", "q4_0".
    """
    from velotune.export.gguf import save_gguf
    from velotune.export.ollama import write_modelfile

    path = save_gguf(model, save_directory, tokenizer, quantization_method)
    write_modelfile(save_directory, os.path.basename(path), tokenizer)
    return path


__all__ = ["SAVE_METHODS", "save_pretrained_gguf", "save_pretrained_merged"]
