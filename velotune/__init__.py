"""velotune: fast, memory-lean fine-tuning of open LLMs, numerically matched to Transformers + PEFT."""

import os as _os

# The Triton interpreter must be chosen before Triton compiles anything; with VELOTUNE_KERNELS=triton
# on a machine without CUDA, that is the only way the Triton path can run.
if _os.environ.get("VELOTUNE_KERNELS", "").lower() == "triton" and "TRITON_INTERPRET" not in _os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        _os.environ["TRITON_INTERPRET"] = "1"

from velotune.api import FastLanguageModel, FastModel  # noqa: E402
from velotune.errors import (  # noqa: E402
    AdapterError,
    CheckpointError,
    ConfigError,
    DataError,
    KernelError,
    UnsupportedModelError,
    VelotuneError,
)
from velotune.train.chat_templates import get_chat_template  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FastLanguageModel",
    "FastModel",
    "KernelError",
    "UnsupportedModelError",
    "VelotuneError",
    "__version__",
    "get_chat_template",
]
