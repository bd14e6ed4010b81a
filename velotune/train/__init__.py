"""Training: data preparation, packing, the loop, checkpoints, and Hugging Face Trainer support."""

from velotune.train.callbacks import TrainerCallback
from velotune.train.chat_templates import get_chat_template
from velotune.train.data import TokenizedDataset, prepare_dataset
from velotune.train.packing import DataCollator
from velotune.train.trainer import Trainer, TrainingArguments

__all__ = [
    "DataCollator",
    "TokenizedDataset",
    "Trainer",
    "TrainerCallback",
    "TrainingArguments",
    "get_chat_template",
    "prepare_dataset",
]
