"""Typed errors. Every message says what was wrong and what to do about it."""


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
