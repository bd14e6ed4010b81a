"""`VelotuneModel`: the decoder plus the user-facing methods, each a thin call into the layer that owns it."""

from __future__ import annotations

import logging

import torch
import transformers

from velotune import lora
from velotune.errors import AdapterError, ConfigError
from velotune.infer.generate import generate as _generate
from velotune.models.decoder import DecoderModel

logger = logging.getLogger(__name__)


class VelotuneModel(DecoderModel):
    lora_settings: lora.LoraSettings | None = None

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """See `velotune.infer.generate.generate` for the arguments (max_new_tokens, do_sample, ...)."""
        return _generate(self, input_ids, attention_mask, **kwargs)

    # Read by transformers.Trainer: labels are shifted inside the loss (so it counts num_items_in_batch
    # over labels[..., 1:]), and the name of the tensor it counts tokens from.
    loss_type = "ForCausalLM"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    model_tags: list[str] | None = None

    # Read and written by Transformers' and TRL's trainers (TRL's SFTTrainer sets the pad token id on
    # both). Built once from the loaded folder's config.json; a model built without a folder has none.
    @property
    def config(self) -> transformers.PretrainedConfig:
        cfg = self.__dict__.get("_hf_config")
        if cfg is None:
            raw = self.__dict__.get("config_dict")
            if raw is None:
                raise AttributeError("this model was not loaded from a folder, so it has no config")
            known = raw.get("model_type") in transformers.CONFIG_MAPPING
            cls = transformers.CONFIG_MAPPING[raw["model_type"]] if known else transformers.PretrainedConfig
            cfg = cls.from_dict(raw)
            cfg._name_or_path = getattr(self, "name_or_path", "") or ""
            self.__dict__["_hf_config"] = cfg
        return cfg

    @property
    def generation_config(self) -> transformers.GenerationConfig:
        if "_generation_config" not in self.__dict__:
            self.__dict__["_generation_config"] = transformers.GenerationConfig.from_model_config(self.config)
        return self.__dict__["_generation_config"]

    def add_model_tags(self, tags: list[str] | str) -> None:
        """Transformers' name: tags for a model card (TRL's trainers add theirs)."""
        old = self.model_tags or []
        self.model_tags = old + [t for t in ([tags] if isinstance(tags, str) else tags) if t not in old]

    def num_parameters(
        self,
        trainable_only: bool = False,
        exclude_embeddings: bool = False,
        only_trainable: bool | None = None,
    ) -> int:
        """Parameter count (`only_trainable` / `exclude_embeddings`: Transformers' names, used by its Trainer)."""
        trainable_only = trainable_only or bool(only_trainable)
        skip = {id(self.embed_tokens.weight)} if exclude_embeddings else set()
        return sum(
            p.numel()
            for p in self.parameters()
            if (p.requires_grad or not trainable_only) and id(p) not in skip
        )

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs=None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """Transformers' Trainer calls this (>= 5.2x): every layer, its input kept on the GPU or, with offload,
        in pinned host memory. An "offload" setting made at load time is not downgraded."""
        if every_n_layers != 1:
            raise ConfigError(
                f"every_n_layers={every_n_layers}: velotune checkpoints every layer; drop every_n_layers, or "
                "use model.checkpoint_policy='save_attn' to keep more activations."
            )
        self.gradient_checkpointing = "offload" if offload else (self.gradient_checkpointing or True)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs) -> None:
        # Older Transformers' name, still called by its Trainer where the new one is absent.
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def save_pretrained(self, save_directory: str, **unused) -> None:
        """Saves the LoRA adapter in PEFT's format (adapter_config.json + adapter_model.safetensors)."""
        if not lora.has_lora(self):
            raise AdapterError(
                "this model has no LoRA adapter, and save_pretrained writes adapters only. To write the full "
                "model, use model.save_pretrained_merged(folder)."
            )
        lora.save_adapter(self, save_directory)

    def load_adapter(
        self, model_id: str, adapter_name: str = "default", is_trainable: bool = False, **unused
    ) -> VelotuneModel:
        """Loads a PEFT LoRA adapter folder (PEFT's signature). LoRA already on the same modules is replaced.

        velotune holds one adapter at a time: `adapter_name` is accepted for compatibility only, and
        refused if it is not a plain name (PEFT makes it a sub-folder of the save directory).
        """
        lora.peft_format.check_adapter_name(adapter_name)
        return lora.load_adapter(self, model_id, is_trainable=is_trainable)

    def merge_and_unload(self, **unused) -> VelotuneModel:
        """Folds the LoRA weights into the base (W += scale * B @ A) and removes the adapter modules."""
        return lora.merge_and_unload(self)

    def save_pretrained_merged(
        self,
        save_directory: str,
        tokenizer=None,
        save_method: str = "merged_16bit",
        max_shard_size: int | str = "5GB",
        dtype: torch.dtype | None = None,
        **unused,
    ) -> str:
        """Saves a merged Hugging Face folder ("merged_16bit") or the adapter alone ("lora").

        See `velotune.export.save_pretrained_merged`; the model itself is left unchanged (LoRA is merged
        into the written copy, one parameter at a time).
        """
        from velotune.export import save_pretrained_merged

        if unused:
            logger.warning("ignoring unknown save_pretrained_merged arguments: %s", sorted(unused))
        kwargs = {"max_shard_size": max_shard_size, "dtype": dtype} if save_method == "merged_16bit" else {}
        return save_pretrained_merged(self, save_directory, tokenizer, save_method, **kwargs)

    def save_pretrained_gguf(
        self, save_directory: str, tokenizer, quantization_method: str = "f16", **unused
    ) -> str:
        """Writes a GGUF file for llama.cpp and an Ollama Modelfile; see `velotune.export.save_pretrained_gguf`."""
        from velotune.export import save_pretrained_gguf

        if unused:
            logger.warning("ignoring unknown save_pretrained_gguf arguments: %s", sorted(unused))
        return save_pretrained_gguf(self, save_directory, tokenizer, quantization_method)

    def print_trainable_parameters(self) -> None:
        """Logs PEFT's line: trainable params, all params, trainable %."""
        logger.info(lora.trainable_summary(self))
