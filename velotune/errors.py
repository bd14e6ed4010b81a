"""Typed errors. Every message says what was wrong and what to do about it."""

import torch


class VelotuneError(Exception):
    """Base class of every error velotune raises on purpose."""


class ConfigError(VelotuneError, ValueError):
    """A configuration value (config.json, an argument) is missing or inconsistent."""


class UnsupportedModelError(VelotuneError, ValueError):
    """The model family (config.json's `model_type`) or one of its features is not supported."""


class CheckpointError(VelotuneError, OSError):
    """A checkpoint file is missing, truncated, corrupt or disagrees with the config."""


class KernelError(VelotuneError, RuntimeError):
    """A kernel was asked to run where it cannot (wrong device, dtype or layout)."""


class DataError(VelotuneError, ValueError):
    """A dataset row lacks an expected field or a sequence is longer than allowed."""


class AdapterError(VelotuneError, ValueError):
    """A LoRA/PEFT adapter request cannot be honoured (unknown target, incompatible adapter)."""


class NonFiniteError(VelotuneError, FloatingPointError):
    """A training step's loss or gradient was NaN or infinite (TrainingArguments.nonfinite="stop").

    `report` (a velotune.train.faults.NonFiniteReport) names the first module whose output went
    non-finite, or the parameters whose gradients did; `checkpoint` holds the last good state.
    """

    def __init__(self, message: str, report=None, checkpoint: str | None = None):
        super().__init__(message)
        self.report, self.checkpoint = report, checkpoint


class OutOfMemoryError(VelotuneError, MemoryError, torch.OutOfMemoryError):
    """The device ran out of memory during training. The message has the measured peak, the memory
    planner's estimate and settings that would fit. It is also a torch.OutOfMemoryError, so code that
    retries on PyTorch's out-of-memory error (smaller batches) still recognises it."""


class TrainingInterrupted(VelotuneError):
    """SIGINT or SIGTERM stopped training after a whole step; `checkpoint` is where to resume from."""

    def __init__(self, message: str, signal: int, checkpoint: str):
        super().__init__(message)
        self.signal, self.checkpoint = signal, checkpoint
