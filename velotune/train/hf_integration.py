"""Training velotune models with Hugging Face's `transformers.Trainer` (and TRL's trainers).

A velotune model already works as the `model` of a plain `transformers.Trainer`: its forward takes
`labels` and `num_items_in_batch`, and it carries the few attributes the Trainer reads. A plain
Trainer, though, saves the whole state dict in its checkpoints, frozen base included, because the
model is not a `PreTrainedModel` or `PeftModel`. `HFTrainer` (or `AdapterCheckpointMixin` mixed
into another Trainer subclass such as `trl.SFTTrainer`) writes the LoRA adapter in PEFT's format
plus the trainable weights instead, and loads them back for `train(resume_from_checkpoint=True)`.

    from velotune.train import DataCollator, prepare_dataset
    from velotune.train.hf_integration import HFTrainer

    trainer = HFTrainer(model=model, args=transformers.TrainingArguments(...),
                        train_dataset=prepare_dataset("chats.jsonl", tokenizer, max_seq_length=2048),
                        data_collator=DataCollator(tokenizer.pad_token_id, packing=True, max_seq_length=2048))
    trainer.train()

    # TRL: class SFT(AdapterCheckpointMixin, trl.SFTTrainer): pass
"""

from __future__ import annotations

import logging
import os

import torch
import transformers

from velotune.errors import CheckpointError
from velotune.train.checkpoint import TRAINABLE, load_trainables, trainable_state

logger = logging.getLogger(__name__)

TRAINING_ARGS_NAME = "training_args.bin"  # transformers.trainer's name for the pickled TrainingArguments


def _has_lora(model) -> bool:
    from velotune.lora import has_lora

    return has_lora(model)


class AdapterCheckpointMixin:
    """Overrides a Trainer's model saving and loading: PEFT adapter + trainable weights, never the frozen base."""

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        from safetensors.torch import save_file

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        if _has_lora(model):
            model.save_pretrained(output_dir)
        save_file(trainable_state(model), os.path.join(output_dir, TRAINABLE), metadata={"format": "pt"})
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        logger.info("loading trainable weights from %s", resume_from_checkpoint)
        load_trainables(model, os.path.join(resume_from_checkpoint, TRAINABLE))

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None:
            raise CheckpointError(
                "no best checkpoint was recorded; set metric_for_best_model and save_strategy."
            )
        self._load_from_checkpoint(best)


class HFTrainer(AdapterCheckpointMixin, transformers.Trainer):
    """`transformers.Trainer` whose checkpoints hold the LoRA adapter (PEFT format), not the frozen base."""
