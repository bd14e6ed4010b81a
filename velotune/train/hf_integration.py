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

TRL (tested with trl 1.16): `velotune.train.hf_integration.SFTTrainer` is `trl.SFTTrainer` with the same
checkpoints, taking TRL's datasets (text, prompt-completion, conversations) and `trl.SFTConfig`:

    from velotune.train.hf_integration import SFTTrainer

    trainer = SFTTrainer(model=model, args=trl.SFTConfig(...), train_dataset=dataset, processing_class=tokenizer)
"""

from __future__ import annotations

import logging
import os

import torch
import transformers

from velotune.errors import CheckpointError, ConfigError
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


def _sft_trainer_class() -> type:
    try:
        import trl
    except ImportError as exc:
        raise ConfigError(
            "SFTTrainer needs TRL: `pip install trl==1.16.0` (the version velotune is tested with)."
        ) from exc

    class SFTTrainer(AdapterCheckpointMixin, trl.SFTTrainer):
        """`trl.SFTTrainer` for a velotune model: the loss is the model's own (velotune's fused, chunked LM head
        and cross-entropy), and checkpoints hold the LoRA adapter in PEFT's format, not the frozen base.

        TRL's own loss path asks the model for per-token log-probabilities through a head it attaches to
        Transformers' backbone (`model.base_model`), which a velotune model does not have; the model's loss is
        the same negative log-likelihood ("nll"), normalised over the tokens of the accumulated batch. TRL's
        per-token metrics (entropy, token accuracy) need those log-probabilities and are not logged.

        With `packing=True` TRL joins a batch's packed rows into one row of up to
        `per_device_train_batch_size * max_length` tokens (documents told apart by `position_ids`), so load
        the model with a `max_seq_length` at least that long.
        """

        def __init__(self, model, args=None, *pos, **kwargs):
            if kwargs.get("peft_config") is not None:
                raise ConfigError(
                    "a velotune model takes LoRA from FastLanguageModel.get_peft_model(model, ...), not from "
                    "peft_config: apply it there and drop peft_config."
                )
            if isinstance(model, str):
                raise ConfigError(
                    "pass a model loaded with velotune.FastLanguageModel.from_pretrained, not a name or path."
                )
            loss_type = getattr(args, "loss_type", "nll")
            if loss_type != "nll" or getattr(args, "label_smoothing_factor", 0.0):
                raise ConfigError(
                    f"loss_type={loss_type!r} / label_smoothing_factor need logits that a velotune model does "
                    "not build while training; use loss_type='nll' and label_smoothing_factor=0."
                )
            super().__init__(model, args, *pos, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return transformers.Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    SFTTrainer.__qualname__ = "SFTTrainer"
    return SFTTrainer


def __getattr__(name: str):
    # TRL stays optional: `SFTTrainer` is built (and trl imported) on first use.
    if name == "SFTTrainer":
        cls = globals()["SFTTrainer"] = _sft_trainer_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
