"""The public entry points, familiar to Unsloth users. No logic lives here: each call forwards."""

from __future__ import annotations

import logging

import torch

from velotune.errors import UnsupportedModelError
from velotune.io.load import load_model
from velotune.io.tokenizer import load_tokenizer
from velotune.model import VelotuneModel

logger = logging.getLogger(__name__)


class FastLanguageModel:
    @staticmethod
    def from_pretrained(
        model_name: str,
        max_seq_length: int | None = 2048,
        dtype: torch.dtype | str | None = None,
        load_in_4bit: bool = False,
        load_in_8bit: bool = False,
        full_finetuning: bool = False,
        device_map="auto",
        trust_remote_code: bool = False,
        progress: bool = True,
        **unused,
    ) -> tuple[VelotuneModel, object]:
        """Loads a local Hugging Face folder. Returns (model, tokenizer or None).

        Args:
            model_name: path of a folder with config.json and safetensors weights.
            max_seq_length: longest sequence the model accepts in training (None: no limit).
            dtype: None picks bf16 on GPUs that support it, else fp16; float32 on CPU.
            load_in_4bit / load_in_8bit: quantized base weights.
            full_finetuning: every weight trainable instead of LoRA adapters.
            device_map: "auto" (first GPU, else CPU), a device string, or an int GPU index.
            trust_remote_code: never needed; True is refused (velotune runs no code from model folders).
        """
        if trust_remote_code:
            raise UnsupportedModelError(
                "trust_remote_code=True is refused: velotune implements each supported family itself and never "
                "runs code shipped with a model. Leave it False."
            )
        if load_in_4bit or load_in_8bit:
            raise UnsupportedModelError(
                "quantized loading (load_in_4bit / load_in_8bit) is not supported yet; load in 16-bit."
            )
        if unused:
            logger.warning("ignoring unknown from_pretrained arguments: %s", sorted(unused))
        model = load_model(
            model_name,
            dtype=dtype,
            device_map=device_map,
            max_seq_length=max_seq_length,
            progress=progress,
            model_cls=VelotuneModel,
        )
        for p in model.parameters():
            p.requires_grad_(full_finetuning)
        return model, load_tokenizer(model_name)

    @staticmethod
    def for_inference(model: VelotuneModel) -> VelotuneModel:
        model.eval()
        return model

    @staticmethod
    def for_training(model: VelotuneModel) -> VelotuneModel:
        model.train()
        return model


FastModel = FastLanguageModel
