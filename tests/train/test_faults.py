"""Faults during training: signals stop after a whole step with a checkpoint, non-finite steps are caught
the step they happen with the layer named, fp16 overflows are the scaler's business, and running out of
memory is reported with the planner's estimate and settings that fit."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import velotune
from tests.train.helpers import random_examples
from velotune.errors import ConfigError, NonFiniteError, OutOfMemoryError, TrainingInterrupted
from velotune.memory.planner import RESERVE_BYTES, SLACK, estimate_memory
from velotune.train import Trainer, TrainerCallback, TrainingArguments
from velotune.train import checkpoint as ckpt
from velotune.train import faults
from velotune.train.data import TokenizedDataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "tests", "train", "fault_worker.py")


pytestmark = pytest.mark.usefixtures("one_thread")


def fresh(folder, dtype=torch.float32):
    return velotune.FastLanguageModel.from_pretrained(str(folder), dtype=dtype, device_map="cpu", full_finetuning=True,
                                                      max_seq_length=64, progress=False)[0]  # fmt: skip


def dataset(n=12, seed=0, **kw):
    return TokenizedDataset.from_examples(random_examples(n, seed=seed, **kw))


def args(out, **kw):
    base = dict(output_dir=str(out), batch_size=2, learning_rate=1e-3, progress=False, seed=5)
    return TrainingArguments(**{**base, **kw})


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


# ---------------------------------------------------------------------------------------- interruption


def test_sigterm_ends_a_subprocess_after_a_whole_step_and_the_resumed_run_repeats_the_uninterrupted_losses(
    folder, tmp_path
):
    common = dict(batch_size=2, max_steps=8, lr_scheduler="cosine", warmup_steps=2, learning_rate=1e-3,
                  max_grad_norm=1.0, seed=5, progress=False)  # fmt: skip
    Trainer(fresh(folder), TrainingArguments(output_dir=str(tmp_path / "full"), **common),
            train_dataset=dataset()).train()  # fmt: skip

    out = tmp_path / "run"
    spec = {"model": str(folder), "examples": 12, "data_seed": 0, "step_delay": 0.2,
            "args": {**common, "output_dir": str(out)}}  # fmt: skip
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, WORKER, str(spec_path)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    for line in proc.stdout:
        if line.split() == ["step", "3"]:
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    stopped = ckpt.checkpoints(str(out))
    assert len(stopped) == 1 and 3 <= stopped[0][0] < 8  # the step in progress was finished, then saved
    assert "SIGTERM" in err and f"resume_from_checkpoint={stopped[0][1]!r}" in err
    assert "--resume_from_checkpoint=true" in err

    Trainer(fresh(folder), TrainingArguments(output_dir=str(out), **common),
            train_dataset=dataset()).train(resume_from_checkpoint=True)  # fmt: skip
    assert losses(out) == losses(tmp_path / "full")  # bitwise: float32 on CPU is deterministic


class SignalAt(TrainerCallback):
    def __init__(self, signum, step):
        self.signum, self.step = signum, step

    def on_step_end(self, trainer):
        if trainer.state["global_step"] == self.step:
            os.kill(os.getpid(), self.signum)


def test_ctrl_c_raises_training_interrupted_after_a_checkpoint_and_puts_the_old_handlers_back(
    folder, tmp_path
):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    trainer = Trainer(fresh(folder), args(tmp_path, max_steps=5, save_steps=0), train_dataset=dataset(),
                      callbacks=[SignalAt(signal.SIGINT, 2)])  # fmt: skip
    with pytest.raises(TrainingInterrupted) as info:
        trainer.train()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert info.value.signal == signal.SIGINT
    assert info.value.checkpoint == str(tmp_path / "checkpoint-2")
    assert "stopped by SIGINT after step 2 of 5" in str(info.value)
    assert [s for s, _ in ckpt.checkpoints(str(tmp_path))] == [2]
    assert [s for s, _ in losses(tmp_path)] == [1, 2]

    trainer.callbacks.pop()  # an uninterrupted run also leaves the handlers as it found them
    trainer.train(resume_from_checkpoint=True)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------------------------------- non-finite steps


def poison_output(module, trainer, step):
    """Writes NaNs into `module`'s output during optimizer step `step` (1-based) only."""

    def hook(mod, inputs, output):
        if trainer.state["global_step"] == step - 1:
            output = output.clone()
            output.view(-1)[::7] = float("nan")
            return output

    return module.register_forward_hook(hook)


def test_a_nan_in_one_layer_stops_the_step_it_happens_naming_the_layer_with_the_state_before_it(
    folder, tmp_path
):
    model = fresh(folder)
    trainer = Trainer(model, args(tmp_path / "run", max_steps=5), train_dataset=dataset())
    poison_output(model.layers[1].mlp, trainer, step=3)
    with pytest.raises(NonFiniteError) as info:
        trainer.train()
    report = info.value.report
    assert (report.step, report.layer, report.module, report.micro_batch) == (3, 1, "layers.1.mlp", 0)
    assert math.isnan(report.loss)
    assert "first non-finite output in the forward pass: decoder layer 1 (layers.1.mlp)" in str(info.value)
    assert info.value.checkpoint == str(tmp_path / "run" / "checkpoint-2")

    # The checkpoint holds the state before the faulty step: that of a clean run after two steps, and
    # resuming from it (with the fault gone) gives the clean run's losses.
    Trainer(fresh(folder), args(tmp_path / "clean", max_steps=5, save_steps=2, save_total_limit=None),
            train_dataset=dataset()).train()  # fmt: skip
    saved, clean = (
        load_file(str(tmp_path / name / "checkpoint-2" / ckpt.TRAINABLE)) for name in ("run", "clean")
    )
    assert all(torch.equal(saved[k], clean[k]) for k in clean)
    resumed = Trainer(fresh(folder), args(tmp_path / "run", max_steps=5), train_dataset=dataset())
    resumed.train(resume_from_checkpoint=True)
    assert losses(tmp_path / "run") == losses(tmp_path / "clean")


def test_a_nan_gradient_with_a_finite_loss_is_traced_to_its_layer_in_the_backward_pass(folder, tmp_path):
    model = fresh(folder)
    trainer = Trainer(model, args(tmp_path, max_steps=3), train_dataset=dataset())
    weight = model.layers[1].attn.o_proj.weight
    weight.register_hook(lambda g: g * float("nan") if trainer.state["global_step"] == 1 else g)
    with pytest.raises(NonFiniteError) as info:
        trainer.train()
    report = info.value.report
    assert report.step == 2 and math.isfinite(report.loss) and math.isnan(report.grad_norm)
    assert (
        report.module is None and report.parameters == ["layers.1.attn.o_proj.weight"] and report.layer == 1
    )
    assert "backward pass went non-finite first in decoder layer 1 (layers.1.attn.o_proj)" in str(info.value)


def test_skip_counts_a_non_finite_step_leaves_the_weights_and_schedule_alone_and_trains_on(
    folder, tmp_path, caplog
):
    model = fresh(folder)
    trainer = Trainer(model, args(tmp_path, max_steps=5, nonfinite="skip"), train_dataset=dataset())
    poison_output(model.layers[0].attn, trainer, step=3)
    with caplog.at_level("WARNING", logger="velotune.train.trainer"):
        state = trainer.train()
    assert state["global_step"] == 5 and state["nonfinite_steps"] == 1
    assert "step 3:" in caplog.text and "decoder layer 0 (layers.0.attn)" in caplog.text
    records = {r["step"]: r for r in state["log_history"]}
    assert records[3]["loss"] is None and records[5]["nonfinite_steps"] == 1
    assert all(math.isfinite(records[s]["loss"]) for s in (1, 2, 4, 5))
    assert trainer.scheduler.last_epoch == 4  # four updates, the schedule advanced four times
    assert all(trainer.optimizer.state[p]["step"] == 4 for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_gives_up_after_ten_non_finite_steps_in_a_row(folder, tmp_path):
    model = fresh(folder)
    trainer = Trainer(model, args(tmp_path, max_steps=20, nonfinite="skip"), train_dataset=dataset())
    model.layers[0].mlp.register_forward_hook(lambda m, i, o: o * float("inf"))
    with pytest.raises(NonFiniteError, match="10 non-finite steps in a row"):
        trainer.train()
    assert trainer.state["nonfinite_steps"] == 10


def test_fp16_trains_with_a_loss_scaler_whose_overflows_are_not_faults(folder, tmp_path):
    """fp16 autocast runs on CPU too: the scaler skips an overflowing step and halves its scale; a NaN loss
    under fp16 is still a fault."""
    data = dataset(8, seed=1)
    full = Trainer(
        fresh(folder), args(tmp_path / "fp32", max_steps=2, batch_size=8), train_dataset=data
    ).train()
    model = fresh(folder)
    trainer = Trainer(model, args(tmp_path / "fp16", max_steps=5, batch_size=8, mixed_precision="fp16",
                                  nonfinite="skip", save_steps=5), train_dataset=data)  # fmt: skip
    weight = model.layers[1].mlp.down_proj.weight
    weight.register_hook(lambda g: g * float("inf") if trainer.state["global_step"] == 2 else g)
    poison_output(model.layers[1].mlp, trainer, step=5)
    state = trainer.train()
    assert isinstance(trainer.scaler, torch.amp.GradScaler)
    first = state["log_history"][0]["loss"]
    assert first != full["log_history"][0]["loss"]  # autocast really computed in fp16
    assert abs(first - full["log_history"][0]["loss"]) < 0.02 * first
    assert state["overflow_steps"] == 1 and state["nonfinite_steps"] == 1
    assert trainer.scaler.get_scale() == 65536.0 / 2 / 2  # the overflow, then the NaN step
    assert trainer.scheduler.last_epoch == 3
    extra = torch.load(str(tmp_path / "fp16" / "checkpoint-5" / "scheduler.pt"), weights_only=True)
    assert extra["scaler"]["scale"] == trainer.scaler.get_scale()


def test_float16_weights_cannot_be_fully_fine_tuned_without_float32_master_weights(folder, tmp_path):
    trainer = Trainer(fresh(folder, torch.float16), args(tmp_path, max_steps=1), train_dataset=dataset())
    with pytest.raises(ConfigError, match="would train in float16"):
        trainer.train()


def test_an_unknown_nonfinite_policy_is_refused():
    with pytest.raises(ConfigError, match="nonfinite='ignore': use 'stop' or 'skip'"):
        TrainingArguments(nonfinite="ignore")


# ---------------------------------------------------------------------------------------- out of memory


def lora(folder):
    return velotune.FastLanguageModel.get_peft_model(fresh(folder), r=4, lora_alpha=8, use_gradient_checkpointing=False,
                                                     random_state=1)  # fmt: skip


def test_out_of_memory_is_reported_with_the_peak_the_planner_estimate_and_settings_that_fit(
    folder, tmp_path, monkeypatch
):
    model = lora(folder)
    # Rows of 16 tokens, 4 per micro-batch: the failing micro-batch is 4 x 16.
    data = dataset(16, min_len=16, max_len=16)
    out = tmp_path / "run"
    trainer = Trainer(model, args(out, batch_size=4, gradient_accumulation_steps=2, packing=False, max_steps=4,
                                  save_steps=1, save_total_limit=None), train_dataset=data)  # fmt: skip
    settings = faults.run_settings(model, "adamw", 4, 16)
    assert (settings["method"], settings["lora_r"], settings["gradient_checkpointing"]) == ("lora", 4, False)
    # A device on which this micro-batch does not fit and one of 2 rows does (the planner's own margins).
    at = {b: estimate_memory(model.spec, **{**settings, "batch": b}) for b in (2, 4)}
    capacity = math.ceil(at[2].total * (1 + SLACK)) + RESERVE_BYTES
    assert at[2].fits(capacity) and not at[4].fits(capacity)
    monkeypatch.setattr(faults, "device_capacity", lambda device: capacity)

    mlp, forward = model.layers[1].mlp, model.layers[1].mlp.forward

    def forward_or_oom(*a, **k):
        if trainer.state["global_step"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return forward(*a, **k)

    monkeypatch.setattr(mlp, "forward", forward_or_oom)
    with pytest.raises(OutOfMemoryError) as info:
        trainer.train()
    assert isinstance(info.value, torch.OutOfMemoryError)  # code that retries on PyTorch's error still does
    message = str(info.value)
    assert (
        "out of memory in training step 3 (micro-batch of 4 x 16 tokens on cpu): CUDA out of memory"
        in message
    )
    assert "measured peak: not available on cpu" in message
    assert (
        f"memory planner estimate for this run: {faults._size(at[4].total)} (lora, 4 x 16 tokens" in message
    )
    assert "- batch_size=2, gradient_accumulation_steps=4 (the same tokens per optimizer step):" in message
    assert 'use_gradient_checkpointing="offload"' in message and "load_in_4bit=True" in message
    assert f"the newest checkpoint, {out / 'checkpoint-2'}, is intact" in message
    # Nothing half-written: the two whole checkpoints and the log, no temporary folder, no checkpoint-3.
    assert sorted(os.listdir(out)) == ["checkpoint-1", "checkpoint-2", "log.jsonl"]
    assert ckpt.is_complete(str(out / "checkpoint-2"))


def test_every_suggestion_fits_by_the_planner_with_the_largest_micro_batch_that_does(folder):
    model = lora(folder)
    settings = faults.run_settings(model, "adamw", 8, 48)
    current = estimate_memory(model.spec, **settings)
    smallest = estimate_memory(model.spec, **{**settings, "batch": 1, "gradient_checkpointing": "offload",
                                              "method": "qlora"})  # fmt: skip
    capacity = math.ceil(smallest.total * (1 + SLACK)) + RESERVE_BYTES
    assert smallest.fits(capacity) and not current.fits(capacity)
    found = faults.suggestions(model.spec, settings, accumulation=1, capacity=capacity)
    assert found
    for option in found:
        assert estimate_memory(model.spec, **option.settings).fits(capacity)
        b = option.settings["batch"]
        if b < 8:  # the next larger divisor of 8 would not have fitted
            larger = min(d for d in (2, 4, 8) if d > b)
            assert not estimate_memory(model.spec, **{**option.settings, "batch": larger}).fits(capacity)
            assert f"batch_size={b}, gradient_accumulation_steps={8 // b}" in option.text

    unknown = faults.suggestions(model.spec, settings, accumulation=1, capacity=None)
    assert [o.settings["batch"] for o in unknown] == [4, 8, 8, 8]  # half the batch; each change as it is


def test_the_settings_of_a_run_with_lora_dropout_plan_both_halves_through_autograd(folder):
    # The hand-written MLP and attention halves step aside under LoRA dropout: the estimate behind an
    # out-of-memory report must count what autograd keeps instead.
    plain = faults.run_settings(lora(folder), "adamw", 2, 16)
    assert "fused_mlp" not in plain and "fused_attention" not in plain
    model = velotune.FastLanguageModel.get_peft_model(fresh(folder), r=4, lora_alpha=8, lora_dropout=0.1,
                                                      use_gradient_checkpointing=True, random_state=1)  # fmt: skip
    dropped = faults.run_settings(model, "adamw", 2, 16)
    assert dropped["fused_mlp"] is False and dropped["fused_attention"] is False
    assert estimate_memory(model.spec, **dropped).total > estimate_memory(model.spec, **{**dropped, **{
        "fused_mlp": None, "fused_attention": None}}).total  # fmt: skip
