"""The training loop: accumulation equals the large batch, exact resume, atomic checkpoints, errors up front."""

import json
import math
import os
import shutil

import pytest
import torch

from tests.train.helpers import random_examples, tiny_model
from velotune.errors import DataError
from velotune.train import Trainer, TrainingArguments
from velotune.train import checkpoint as ckpt
from velotune.train.data import TokenizedDataset


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """One saved tiny model; every test loads its own fresh copy from it."""
    path = tmp_path_factory.mktemp("llama")
    tiny_model(path, "llama")
    return path


def fresh(folder):
    import velotune

    model, _ = velotune.FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32, device_map="cpu",
                                                          full_finetuning=True, max_seq_length=64, progress=False)  # fmt: skip
    return model


def dataset(n=16, seed=0):
    return TokenizedDataset.from_examples(random_examples(n, seed=seed))


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), learning_rate=1e-3, max_grad_norm=1e9, progress=False, seed=5)
    return TrainingArguments(**{**base, **kw})


def read_log(path):
    with open(os.path.join(path, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("packing", [False, True])
def test_four_micro_batches_of_two_equal_one_batch_of_eight(folder, tmp_path, packing):
    runs = []
    for batch_size, accum in ((8, 1), (2, 4)):
        model = fresh(folder)
        out = tmp_path / f"{batch_size}x{accum}"
        trainer = Trainer(model, args(out, batch_size=batch_size, gradient_accumulation_steps=accum, max_steps=1,
                                      packing=packing, max_seq_length=24), train_dataset=dataset(24))  # fmt: skip
        trainer.train()
        # After one AdamW step, exp_avg = (1 - beta1) * gradient: the step's whole gradient, kept.
        grads = {n: trainer.optimizer.state[p]["exp_avg"].clone() for n, p in model.named_parameters()}
        runs.append((read_log(out)[0], grads))
    (log_a, grads_a), (log_b, grads_b) = runs
    assert abs(log_a["loss"] - log_b["loss"]) <= 1e-6 * abs(log_a["loss"])
    assert abs(log_a["grad_norm"] - log_b["grad_norm"]) <= 1e-6 * abs(log_a["grad_norm"])
    for name in grads_a:
        err = (grads_a[name] - grads_b[name]).abs().max() / grads_a[name].abs().max()
        assert err <= 1e-6, name


def test_resuming_from_a_checkpoint_continues_the_exact_loss_sequence(folder, tmp_path):
    common = dict(batch_size=2, gradient_accumulation_steps=2, max_steps=6, save_steps=4, save_total_limit=None,
                  lr_scheduler="cosine", warmup_steps=2, weight_decay=0.01)  # fmt: skip
    data = dataset(12)  # 3 steps per epoch: the checkpoint at step 4 is in the middle of the second epoch
    Trainer(fresh(folder), args(tmp_path / "full", **common), train_dataset=data).train()
    full = [r["loss"] for r in read_log(tmp_path / "full")]
    assert len(full) == 6

    resumed_dir = tmp_path / "resumed"
    os.makedirs(resumed_dir)
    shutil.copytree(tmp_path / "full" / "checkpoint-4", resumed_dir / "checkpoint-4")
    Trainer(fresh(folder), args(resumed_dir, **common), train_dataset=data).train(resume_from_checkpoint=True)
    resumed = [r["loss"] for r in read_log(resumed_dir)]
    assert resumed == full[4:]  # bitwise: float32 on CPU is deterministic


def test_the_loss_falls_on_data_it_can_learn(folder, tmp_path):
    data = dataset(8, seed=1)
    state = Trainer(fresh(folder), args(tmp_path, batch_size=8, max_steps=15, learning_rate=1e-2, lr_scheduler="constant",
                                        max_grad_norm=1.0), train_dataset=data).train()  # fmt: skip
    losses = [r["loss"] for r in state["log_history"]]
    assert losses[-1] < 0.5 * losses[0]


def test_eval_loss_is_the_mean_over_every_label_token(folder, tmp_path):
    model = fresh(folder)
    data = dataset(5, seed=2)
    trainer = Trainer(model, args(tmp_path, batch_size=2), train_dataset=data, eval_dataset=data)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(len(data)):
            ex = data[i]
            out = model(ex["input_ids"][None], labels=ex["labels"][None])
            n = int((ex["labels"][1:] != -100).sum())
            total, count = total + out.loss.item() * n, count + n
    assert abs(trainer.evaluate() - total / count) <= 1e-6


def test_a_too_long_example_fails_before_any_step(folder, tmp_path):
    data = TokenizedDataset.from_examples(
        random_examples(3, seed=0) + [(list(range(3, 83)), list(range(3, 83)))]
    )
    with pytest.raises(DataError, match=r"longer than max_seq_length=64, e\.g\. row 3 \(80 tokens\)"):
        Trainer(fresh(folder), args(tmp_path, max_steps=2), train_dataset=data).train()
    assert not os.path.exists(tmp_path / "log.jsonl")


def test_checkpoints_are_whole_or_absent_and_rotated(folder, tmp_path, monkeypatch):
    trainer = Trainer(fresh(folder), args(tmp_path, batch_size=4, max_steps=3, save_steps=1, save_total_limit=2),
                      train_dataset=dataset(8))  # fmt: skip
    trainer.train()
    assert [s for s, _ in ckpt.checkpoints(str(tmp_path))] == [2, 3]
    assert sorted(os.listdir(tmp_path / "checkpoint-3")) == sorted(
        ["trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json"]
    )

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    trainer.state["global_step"] = 4
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    # The interrupted checkpoint never appears under its final name: resuming picks the last whole one.
    assert ckpt.resolve(True, str(tmp_path)).endswith("checkpoint-3")


def lora_model(folder, dropout: float):
    import velotune

    model = fresh(folder)
    return velotune.FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, lora_dropout=dropout,
                                                     use_gradient_checkpointing=False, random_state=1)  # fmt: skip


def test_lora_with_dropout_resumes_exactly_and_checkpoints_hold_the_peft_adapter(folder, tmp_path):
    """Dropout draws from torch's generator: an exact resume needs its state restored too."""
    common = dict(batch_size=2, max_steps=4, save_steps=2, save_total_limit=None, learning_rate=1e-2)
    data = dataset(8)
    Trainer(lora_model(folder, 0.1), args(tmp_path / "full", **common), train_dataset=data).train()
    full = [r["loss"] for r in read_log(tmp_path / "full")]
    files = os.listdir(tmp_path / "full" / "checkpoint-2")
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files

    os.makedirs(tmp_path / "resumed")
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    torch.manual_seed(12345)  # whatever the generator holds before, the checkpoint's state wins
    trainer = Trainer(lora_model(folder, 0.1), args(tmp_path / "resumed", **common), train_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    assert [r["loss"] for r in read_log(tmp_path / "resumed")] == full[2:]
    assert os.path.isfile(trainer.save_model(str(tmp_path / "final")) + "/adapter_model.safetensors")


def test_bf16_autocast_computes_in_bf16_and_stays_close_to_float32(folder, tmp_path):
    data = dataset(8, seed=1)
    first = {}
    for mode in ("no", "bf16"):
        state = Trainer(fresh(folder), args(tmp_path / mode, batch_size=8, max_steps=2, mixed_precision=mode),
                        train_dataset=data).train()  # fmt: skip
        first[mode] = state["log_history"][0]["loss"]
        assert all(math.isfinite(r["loss"]) for r in state["log_history"])
    assert first["bf16"] != first["no"]  # autocast really ran the matmuls in bf16
    assert abs(first["bf16"] - first["no"]) < 0.02 * first["no"]
