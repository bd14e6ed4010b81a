"""The optimizer (AdamW: torch's fused kernel on CUDA, or bitsandbytes' 8-bit) and the learning-rate
schedule (linear / cosine / constant after a linear warm-up)."""

from __future__ import annotations

import math

import torch

from velotune.errors import ConfigError

OPTIMIZERS = ("adamw", "adamw_8bit")
SCHEDULES = ("linear", "cosine", "constant")


def build_optimizer(
    params: list[tuple[str, torch.nn.Parameter]],
    name: str,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
) -> torch.optim.Optimizer:
    """AdamW over the named trainable parameters; biases and norm weights (1-D) get no weight decay."""
    if not params:
        raise ConfigError(
            "the model has no trainable parameters: add LoRA adapters with FastLanguageModel.get_peft_model(model), "
            "or load with full_finetuning=True."
        )
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]  # fmt: skip
    if name == "adamw":
        fused = all(p.is_cuda and p.is_floating_point() for _, p in params)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
    if name == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ConfigError(
                "optim 'adamw_8bit' needs bitsandbytes (`pip install bitsandbytes`); or use 'adamw'."
            ) from exc
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas, eps=eps)
    raise ConfigError(f"unknown optim {name!r}; use one of {list(OPTIMIZERS)}.")


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate at `step` (0-based) of `total` steps."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ConfigError(f"unknown lr_scheduler {kind!r}; use one of {list(SCHEDULES)}.")


def build_scheduler(optimizer: torch.optim.Optimizer, total: int, warmup: int, kind: str):
    if kind not in SCHEDULES:
        raise ConfigError(f"unknown lr_scheduler {kind!r}; use one of {list(SCHEDULES)}.")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, kind))
