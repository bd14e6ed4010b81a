"""The public entry points, familiar to Unsloth users. No logic lives here: each call forwards."""

from __future__ import annotations

import logging
import os

import torch

from velotune import lora
from velotune.errors import AdapterError, UnsupportedModelError
from velotune.io.load import load_model
from velotune.io.tokenizer import TOKENIZER_FILES, load_tokenizer
from velotune.lora.peft_format import ADAPTER_CONFIG, read_settings
from velotune.memory.checkpoint import checkpoint_mode
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
            model_name: path of a folder with config.json and safetensors weights, or of a LoRA adapter
                folder (adapter_config.json naming its base in base_model_name_or_path): the base is
                loaded, then the adapter, trainable.
            max_seq_length: longest sequence the model accepts in training (None: no limit).
            dtype: None picks bf16 on GPUs that support it, else fp16; float32 on CPU.
            load_in_4bit: the decoder's projections in NF4 (QLoRA), quantized on the device as the weights
                stream in; a folder saved pre-quantized by Transformers + bitsandbytes loads directly (without
                load_in_4bit it is dequantized into 16-bit weights).
            load_in_8bit: not supported yet (raises).
            full_finetuning: every weight trainable instead of LoRA adapters.
            device_map: "auto" (first GPU, else CPU), a device string, or an int GPU index.
            trust_remote_code: never needed; True is refused (velotune runs no code from model folders).
        """
        if trust_remote_code:
            raise UnsupportedModelError(
                "trust_remote_code=True is refused: velotune implements each supported family itself and never "
                "runs code shipped with a model. Leave it False."
            )
        if load_in_8bit:
            raise UnsupportedModelError(
                "load_in_8bit is not supported yet; use load_in_4bit=True (NF4, QLoRA) or 16-bit weights."
            )
        if load_in_4bit and full_finetuning:
            raise UnsupportedModelError(
                "full_finetuning=True trains every weight and needs 16-bit weights; drop load_in_4bit, or train "
                "LoRA adapters on the 4-bit model (get_peft_model)."
            )
        if unused:
            logger.warning("ignoring unknown from_pretrained arguments: %s", sorted(unused))
        adapter_dir = None
        if os.path.isfile(os.path.join(model_name, ADAPTER_CONFIG)) and not os.path.isfile(
            os.path.join(model_name, "config.json")
        ):
            if full_finetuning:
                raise AdapterError(
                    f"{model_name} is a LoRA adapter; full_finetuning=True needs a full model. Merge the adapter "
                    "first (model.merge_and_unload()) or load its base model."
                )
            adapter_dir, model_name = model_name, read_settings(model_name).base_model_name_or_path
            if not model_name or not os.path.isdir(model_name):
                raise AdapterError(
                    f"{adapter_dir}/{ADAPTER_CONFIG} names base model {model_name!r}, which is not a local folder. "
                    "Load the base with from_pretrained(<base folder>) and then model.load_adapter(adapter_dir)."
                )
        model = load_model(
            model_name,
            dtype=dtype,
            device_map=device_map,
            max_seq_length=max_seq_length,
            progress=progress,
            model_cls=VelotuneModel,
            load_in_4bit=load_in_4bit,
        )
        for p in model.parameters():
            p.requires_grad_(full_finetuning)
        if adapter_dir is None:
            return model, load_tokenizer(model_name)
        model.load_adapter(adapter_dir, is_trainable=True)
        has_tokenizer = any(os.path.isfile(os.path.join(adapter_dir, n)) for n in TOKENIZER_FILES)
        return model, load_tokenizer(adapter_dir if has_tokenizer else model_name)

    @staticmethod
    def get_peft_model(
        model: VelotuneModel,
        r: int = 16,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        bias: str = "none",
        use_gradient_checkpointing: bool | str = "offload",
        random_state: int = 3407,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        lora_dtype: torch.dtype | None = None,
        embedding_on_host: bool | str = "auto",
        **unused,
    ) -> VelotuneModel:
        """Freezes the base and adds LoRA adapters to the projections `target_modules` names.

        Args:
            r / lora_alpha: rank and alpha; the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora).
            lora_dropout: dropout on the LoRA branch's input, in training.
            target_modules: PEFT's module names ("q_proj", ..., "qkv_proj" for Phi-3, "w1"/"w2"/"w3"/"gate" for
                Mixtral's experts and router; gate_proj/up_proj/down_proj select Mixtral's experts too),
                "all-linear", or a regular expression over the module paths.
            bias: PEFT's modes: "none", "all" (every base bias trains) or "lora_only" (the adapted projections').
            use_gradient_checkpointing: "offload" (layer inputs wait in pinned CPU memory), True (on the GPU)
                or False; see velotune.memory.checkpoint.
            random_state: seed of the LoRA initialisation.
            init_lora_weights: True (A kaiming-uniform, B zero), "gaussian", or False (B random too).
            lora_dtype: dtype of the LoRA weights; default float32 on a 16-bit base (as PEFT), else the base's.
            embedding_on_host: "auto" keeps the frozen input embedding table in pinned host memory while
                training on a GPU (only the batch's rows are copied over: ~1 GiB less GPU memory at
                Llama-3-8B) and moves it back in for_inference; True keeps it there for inference too;
                False never moves it. Tied embeddings (shared with the LM head) always stay on the GPU.
        """
        if unused:
            logger.warning("ignoring unknown get_peft_model arguments: %s", sorted(unused))
        if use_gradient_checkpointing not in (True, False, "offload", "unsloth"):
            raise AdapterError(
                f"use_gradient_checkpointing={use_gradient_checkpointing!r}: use True, False or 'offload'."
            )
        lora.add_lora(
            model,
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=target_modules,
            bias=bias,
            random_state=random_state,
            use_rslora=use_rslora,
            init_lora_weights=init_lora_weights,
            lora_dtype=lora_dtype,
        )
        if embedding_on_host not in (True, False, "auto"):
            raise AdapterError(f"embedding_on_host={embedding_on_host!r}: use 'auto', True or False.")
        model.gradient_checkpointing = checkpoint_mode(use_gradient_checkpointing)
        model.embedding_placement = embedding_on_host
        return FastLanguageModel.for_training(model)

    @staticmethod
    def for_inference(model: VelotuneModel) -> VelotuneModel:
        """Evaluation mode: LoRA dropout and gradient checkpointing off (both follow the training flag)."""
        model.eval()
        if model.embedding_placement == "auto":
            model.keep_embedding_on_host(False)  # one row per generated token: not worth a host round trip
        return model

    @staticmethod
    def for_training(model: VelotuneModel) -> VelotuneModel:
        """Training mode: LoRA dropout on, gradient checkpointing as chosen in get_peft_model."""
        model.train()
        model._velotune_decoder = None  # generate()'s kept KV cache and CUDA graph: memory training can use
        if model.embedding_placement is not False:
            model.keep_embedding_on_host(True)
        return model


FastModel = FastLanguageModel
