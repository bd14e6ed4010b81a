"""velotune models under transformers.Trainer: a plain Trainer steps; HFTrainer checkpoints hold the PEFT
adapter (not the frozen base) and resume from them."""

import os

import pytest
import torch
import transformers
from safetensors.torch import load_file

import velotune
from tests.train.helpers import random_examples, tiny_model
from velotune.train import DataCollator
from velotune.train.data import TokenizedDataset
from velotune.train.hf_integration import HFTrainer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_model(path, "llama")
    return path


def load(folder, lora: bool):
    model, _ = velotune.FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32, device_map="cpu",
                                                          full_finetuning=not lora, max_seq_length=64, progress=False)  # fmt: skip
    if lora:
        # At Transformers' init scale (0.02) the frozen LM head caps the logits near +-1, so no adapter
        # could lower the loss much; a wider head leaves the adapters room to learn.
        with torch.no_grad():
            model.lm_head_weight.mul_(10)
        model = velotune.FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False,
                                                          random_state=0)  # fmt: skip
    return model


def hf_args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=1,
                report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0)  # fmt: skip
    return transformers.TrainingArguments(**{**base, **kw})


def test_a_plain_transformers_trainer_takes_a_step(folder, tmp_path):
    model = load(folder, lora=False)
    before = model.embed_tokens.weight.detach().clone()
    data = TokenizedDataset.from_examples(random_examples(8, seed=0))
    trainer = transformers.Trainer(model=model, args=hf_args(tmp_path, max_steps=1), train_dataset=data,
                                   data_collator=DataCollator(0))  # fmt: skip
    out = trainer.train()
    assert out.global_step == 1 and torch.isfinite(torch.tensor(out.training_loss))
    assert not torch.equal(before, model.embed_tokens.weight)


class Snapshot(transformers.TrainerCallback):
    def __init__(self, model):
        self.model, self.params = model, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.params = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("packing", [False, True])
def test_hf_trainer_learns_with_lora_and_checkpoints_the_peft_adapter_only(folder, tmp_path, packing):
    data = TokenizedDataset.from_examples(random_examples(8, seed=1))
    collator = DataCollator(0, packing=packing, max_seq_length=64)
    trainer = HFTrainer(model=load(folder, lora=True), args=hf_args(tmp_path, max_steps=10, learning_rate=1e-2, save_strategy="steps",
                        save_steps=10), train_dataset=data, data_collator=collator)  # fmt: skip
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 10 and losses[-1] < 0.7 * losses[0]
    ckpt = tmp_path / "checkpoint-10"
    files = set(os.listdir(ckpt))
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "trainable.safetensors",
        "optimizer.pt",
    } <= files
    assert "model.safetensors" not in files  # the frozen base is not copied into every checkpoint
    assert all("lora" in key for key in load_file(str(ckpt / "adapter_model.safetensors")))

    # Resuming loads the checkpoint's trainable weights into a fresh model before training on.
    model = load(folder, lora=True)
    snap = Snapshot(model)
    resumed = HFTrainer(model=model, args=hf_args(tmp_path, max_steps=12), train_dataset=data,
                        data_collator=collator, callbacks=[snap])  # fmt: skip
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 12
    saved = load_file(str(ckpt / "trainable.safetensors"))
    assert set(saved) == set(snap.params) and all(torch.equal(saved[n], snap.params[n]) for n in saved)
