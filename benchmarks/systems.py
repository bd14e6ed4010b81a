"""The systems under test: how each one loads the model and wraps it for training.

Every loader takes the job spec (a dict, see `train_step.job_spec`) and returns the model ready to
train (in training mode, gradient checkpointing on, LoRA attached for lora/qlora) and a dict of
notes recorded with the result. The training step itself is the same for all systems
(`worker.train_loop`). The Unsloth loader must run in a process that imported `unsloth` before
`torch` (the worker does that); the others import their library lazily.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from benchmarks.shapes import LORA_TARGETS

# Fused projection names some checkpoints use (Phi-3) for the same seven projections.
FUSED_TARGETS = ("qkv_proj", "gate_up_proj")

# (system, method) pairs that do not make sense; the harness records them as skipped, not failed.
NOT_APPLICABLE = {
    ("hf_peft", "qlora"): "Transformers + PEFT in 4-bit is the hf_peft_bnb system",
    ("hf_peft_bnb", "lora"): "hf_peft_bnb is the 4-bit (QLoRA) baseline; 16-bit LoRA is hf_peft",
    ("hf_peft_bnb", "full"): "bitsandbytes 4-bit weights cannot be fully fine-tuned",
}


class NotApplicable(Exception):
    """The system cannot run this method by design (recorded as skipped)."""


def _device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def _dtype(spec: dict[str, Any]) -> torch.dtype:
    return getattr(torch, spec["dtype"])


def peft_targets(model: torch.nn.Module) -> list[str]:
    """The seven projections' module names as this model spells them (fused names where fused).

    Mixtral's experts are 3-D parameters in Transformers 5, not Linear modules, so on Mixtral the
    PEFT systems put LoRA on the attention projections only; the result records the list.
    """
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in LORA_TARGETS + FUSED_TARGETS if t in leaf_names]
    if not targets:
        raise RuntimeError(f"none of the LoRA target names {LORA_TARGETS + FUSED_TARGETS} is a module here")
    return targets


def _hf_load(spec: dict[str, Any], quantize_4bit: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": _dtype(spec), "attn_implementation": "sdpa"}
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=_dtype(spec),
        )
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(spec["folder"], **kwargs)
    model.config.use_cache = False
    return model


def _hf_wrap(model: torch.nn.Module, spec: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """HF gradient checkpointing (non-reentrant) and, for lora/qlora, PEFT's LoRA on the projections."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    notes: dict[str, Any] = {"gradient_checkpointing": "transformers, use_reentrant=False"}
    if spec["method"] != "full":
        from peft import LoraConfig, get_peft_model

        targets = peft_targets(model)
        config = LoraConfig(
            r=spec["lora_r"],
            lora_alpha=spec["lora_alpha"],
            lora_dropout=spec["lora_dropout"],
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
        )
        torch.manual_seed(spec["seed"])
        model = get_peft_model(model, config)
        notes["lora_targets"] = targets
    model.train()
    return model, notes


def load_hf_peft(spec: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    return _hf_wrap(_hf_load(spec, quantize_4bit=False), spec)


def load_hf_peft_bnb(spec: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    # No peft.prepare_model_for_kbit_training: it upcasts every non-quantized weight (embedding and
    # LM head included) to float32, which no other system does and which would inflate its memory.
    return _hf_wrap(_hf_load(spec, quantize_4bit=True), spec)


def load_liger(spec: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    apply_fn = MODEL_TYPE_TO_APPLY_LIGER_FN.get(spec["model_type"])
    if apply_fn is None:
        raise NotApplicable(f"Liger-Kernel has no patch for model_type {spec['model_type']!r}")
    apply_fn()  # default: rope, rms_norm, swiglu/geglu, fused linear cross-entropy
    model, notes = _hf_wrap(_hf_load(spec, quantize_4bit=spec["method"] == "qlora"), spec)
    notes["liger_patch"] = apply_fn.__name__
    return model, notes


def load_unsloth(spec: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    from unsloth import FastLanguageModel  # already imported first by the worker

    model, _tokenizer = FastLanguageModel.from_pretrained(
        spec["folder"],
        max_seq_length=spec["seq"],
        dtype=_dtype(spec),
        load_in_4bit=spec["method"] == "qlora",
        full_finetuning=spec["method"] == "full",
        use_gradient_checkpointing="unsloth",
        use_exact_model_name=True,
        random_state=spec["seed"],
    )
    notes: dict[str, Any] = {"gradient_checkpointing": "unsloth"}
    if spec["method"] != "full":
        model = FastLanguageModel.get_peft_model(
            model,
            r=spec["lora_r"],
            lora_alpha=spec["lora_alpha"],
            lora_dropout=spec["lora_dropout"],
            target_modules=list(LORA_TARGETS),
            bias="none",
            use_gradient_checkpointing="unsloth",
            random_state=spec["seed"],
            max_seq_length=spec["seq"],
        )
        notes["lora_targets"] = list(LORA_TARGETS)
    FastLanguageModel.for_training(model)
    return model, notes


def load_velotune(spec: dict[str, Any], checkpointing: bool | str = "offload") -> tuple[torch.nn.Module, dict[str, Any]]:
    """velotune as a user gets it by default: offloaded checkpointing, embedding in host memory."""
    import velotune

    fast = velotune.FastLanguageModel
    kwargs: dict[str, Any] = {
        "max_seq_length": spec["seq"],
        "dtype": _dtype(spec),
        "load_in_4bit": spec["method"] == "qlora",
        "full_finetuning": spec["method"] == "full",
    }
    notes: dict[str, Any] = {}
    full_takes_checkpointing = (
        "use_gradient_checkpointing" in inspect.signature(fast.from_pretrained).parameters
    )
    if spec["method"] == "full" and full_takes_checkpointing:
        kwargs["use_gradient_checkpointing"] = True
    model, _tokenizer = fast.from_pretrained(spec["folder"], **kwargs)
    if spec["method"] != "full":
        torch.manual_seed(spec["seed"])
        model = fast.get_peft_model(
            model,
            r=spec["lora_r"],
            lora_alpha=spec["lora_alpha"],
            lora_dropout=spec["lora_dropout"],
            target_modules=list(LORA_TARGETS),
            # Offloaded layer inputs by default, like Unsloth's "unsloth" mode above: the same memory class.
            use_gradient_checkpointing=checkpointing,
        )
        notes["lora_targets"] = list(LORA_TARGETS)
        notes["gradient_checkpointing"] = f"velotune {checkpointing} (get_peft_model)"
        notes["embedding_on_host"] = bool(getattr(model, "embedding_on_host", False))
    elif full_takes_checkpointing:
        notes["gradient_checkpointing"] = "velotune (from_pretrained)"
    else:
        notes["gradient_checkpointing"] = "not requested: from_pretrained takes no use_gradient_checkpointing"
    if hasattr(model, "train"):
        model.train()
    return model, notes


def load_velotune_no_recompute(spec: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """velotune with gradient checkpointing off: every activation kept, a third fewer FLOPs per step,
    for when the GPU has the memory (`velotune plan --gradient-checkpointing false` says whether)."""
    if spec["method"] == "full":
        raise NotApplicable("full fine-tuning: the velotune system already chooses its checkpointing")
    return load_velotune(spec, checkpointing=False)


def load_velotune_save_mlp(spec: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """velotune with offloaded checkpoints under checkpoint_policy="save_mlp": each layer's MLP input,
    and half the layers' gate/up outputs, wait in pinned host memory instead of being recomputed."""
    if spec["method"] == "full":
        raise NotApplicable("full fine-tuning: the velotune system already chooses its checkpointing")
    model, notes = load_velotune(spec)
    model.checkpoint_policy = "save_mlp"
    notes["checkpoint_policy"] = "save_mlp"
    return model, notes


def load_velotune_graphs(spec: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """velotune with `cuda_graphs = True`: each checkpointed layer's first forward replayed from a
    CUDA graph (velotune.memory.layer_graphs), the default checkpointing otherwise."""
    if spec["method"] == "full":
        raise NotApplicable("full fine-tuning: the velotune system already chooses its checkpointing")
    model, notes = load_velotune(spec)
    model.cuda_graphs = True
    notes["cuda_graphs"] = True
    return model, notes


def load_velotune_save_mlp_graphs(spec: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """velotune under checkpoint_policy="save_mlp" with `cuda_graphs = True`: each checkpointed
    layer's first forward and its backward replayed from CUDA graphs."""
    model, notes = load_velotune_save_mlp(spec)
    model.cuda_graphs = True
    notes["cuda_graphs"] = True
    return model, notes


LOADERS: dict[str, Callable[[dict[str, Any]], tuple[torch.nn.Module, dict[str, Any]]]] = {
    "velotune": load_velotune,
    "velotune_no_recompute": load_velotune_no_recompute,
    "velotune_save_mlp": load_velotune_save_mlp,
    "velotune_graphs": load_velotune_graphs,
    "velotune_save_mlp_graphs": load_velotune_save_mlp_graphs,
    "hf_peft": load_hf_peft,
    "hf_peft_bnb": load_hf_peft_bnb,
    "liger": load_liger,
    "unsloth": load_unsloth,
}
