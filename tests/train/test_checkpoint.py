"""Checkpoints survive kill -9 at any moment: every checkpoint-<step> is whole, leftovers are hidden and
cleaned up, and the newest whole checkpoint resumes the exact run."""

import json
import multiprocessing
import os
import random
import re
import shutil
import time

import pytest
import torch

from tests.train import fault_worker
from tests.train.helpers import random_examples, tiny_model
from velotune.errors import CheckpointError
from velotune.train import Trainer, TrainingArguments
from velotune.train import checkpoint as ckpt
from velotune.train.data import TokenizedDataset


pytestmark = pytest.mark.usefixtures("one_thread")


def losses(out) -> list[tuple[int, float]]:
    with open(os.path.join(out, "log.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def receive(conn, proc, timeout: float = 60.0):
    if not conn.poll(timeout):
        proc.kill()
        raise AssertionError(f"no word from the training process in {timeout} s (exit code {proc.exitcode})")
    return conn.recv()


def test_kill_9_at_random_moments_of_checkpoint_writing_never_costs_the_newest_whole_checkpoint(
    folder, tmp_path
):
    """20 runs in a row, each resumed from the newest checkpoint and killed with SIGKILL after a random delay
    while it checkpoints every step (file syncs slowed down so most kills land inside a write). After each
    kill every checkpoint-<step> folder is whole and the next run resumes from the newest; at the end the
    loss sequence is that of one uninterrupted run."""
    out = tmp_path / "run"
    common = dict(batch_size=2, lr_scheduler="constant", learning_rate=1e-3, max_grad_norm=1.0, seed=5,
                  progress=False)  # fmt: skip
    spec = {"model": str(folder), "examples": 16, "data_seed": 0, "slow_fsync": 0.004,
            "args": {**common, "output_dir": str(out), "max_steps": 1000, "save_steps": 1, "save_total_limit": 2}}  # fmt: skip
    context = multiprocessing.get_context("forkserver")
    # The server imports torch and velotune once; each run is a fork of it (milliseconds, not seconds).
    context.set_forkserver_preload(["tests.train.fault_worker"])
    delays = random.Random(12)
    killed_mid_write = 0
    for _ in range(20):
        whole = ckpt.checkpoints(str(out))
        newest = whole[-1][0] if whole else 0
        parent, child = context.Pipe()
        proc = context.Process(target=fault_worker.child, args=(spec, child))
        proc.start()
        assert receive(parent, proc) == ("begin", newest)  # resumed from the newest whole checkpoint
        assert receive(parent, proc) == ("step", newest + 1)  # ... and trains on from it
        time.sleep(delays.uniform(0.0, 0.3))  # a step and its checkpoint take about 0.1 s
        proc.kill()
        proc.join()
        names = os.listdir(out)
        killed_mid_write += any(name.startswith(".checkpoint-") for name in names)
        for name in names:
            if re.fullmatch(r"checkpoint-\d+", name):
                assert ckpt.is_complete(str(out / name)), name
                with open(out / name / ckpt.STATE) as f:
                    assert json.load(f)["global_step"] == int(name.split("-")[1])
    assert killed_mid_write >= 3  # the kills did land inside checkpoint writes

    # A last run goes to the end; its log, rewritten at every resume, is one uninterrupted history.
    final_steps = ckpt.checkpoints(str(out))[-1][0] + 3
    spec["args"]["max_steps"] = final_steps
    parent, child = context.Pipe()
    proc = context.Process(target=fault_worker.child, args=(spec, child))
    proc.start()
    while (message := receive(parent, proc))[0] != "done":
        pass
    proc.join()
    assert message == ("done", final_steps)
    assert not [name for name in os.listdir(out) if name.startswith(".")]  # leftovers were cleaned up

    data = TokenizedDataset.from_examples(random_examples(16, seed=0))
    model = fault_worker.velotune.FastLanguageModel.from_pretrained(
        str(folder), dtype=torch.float32, device_map="cpu", full_finetuning=True, max_seq_length=64, progress=False
    )[0]  # fmt: skip
    reference = tmp_path / "reference"
    Trainer(model, TrainingArguments(output_dir=str(reference), max_steps=final_steps, **common),
            train_dataset=data).train()  # fmt: skip
    assert losses(out) == losses(reference)


def write(out, step: int, model, trainer) -> str:
    trainer.state["global_step"] = step
    return trainer.save_checkpoint()


@pytest.fixture
def trainer(folder, tmp_path):
    model = tiny_model(tmp_path / "model", "llama")
    data = TokenizedDataset.from_examples(random_examples(4, seed=0))
    t = Trainer(model, TrainingArguments(output_dir=str(tmp_path / "out"), batch_size=4, max_steps=1, progress=False,
                                         save_total_limit=None), train_dataset=data)  # fmt: skip
    t.train()
    return t


def test_a_failed_write_leaves_no_temporary_folder_and_the_old_checkpoints_stand(trainer, monkeypatch):
    out = trainer.args.output_dir
    trainer.save_checkpoint()

    def full(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", full)
    trainer.state["global_step"] = 2
    with pytest.raises(OSError, match="No space left"):
        trainer.save_checkpoint()
    assert sorted(os.listdir(out)) == ["checkpoint-1", "log.jsonl"]


def test_leftovers_of_a_killed_run_are_hidden_from_resume_and_cleaned_up(trainer):
    out = trainer.args.output_dir
    whole = trainer.save_checkpoint()  # checkpoint-1
    # What kill -9 can leave: a half-written checkpoint, a half-deleted rotated one, and a checkpoint being
    # replaced by a rerun whose replacement never got its name.
    shutil.copytree(whole, os.path.join(out, ".checkpoint-2.tmp"))
    os.remove(os.path.join(out, ".checkpoint-2.tmp", "rng.pt"))
    shutil.copytree(whole, os.path.join(out, ".checkpoint-0.deleting"))
    os.rename(whole, os.path.join(out, ".checkpoint-1.old"))
    assert ckpt.resolve(True, out) is None
    ckpt.clean_stale(out)
    assert sorted(os.listdir(out)) == ["checkpoint-1", "log.jsonl"]
    assert ckpt.resolve(True, out) == os.path.join(out, "checkpoint-1")


def test_a_checkpoint_folder_missing_a_file_is_skipped_by_resume_and_refused_by_name(trainer):
    out = trainer.args.output_dir
    trainer.save_checkpoint()
    broken = write(out, 2, trainer.model, trainer)
    os.remove(os.path.join(broken, "optimizer.pt"))
    assert ckpt.resolve(True, out) == os.path.join(out, "checkpoint-1")
    with pytest.raises(CheckpointError, match=r"incomplete \(missing optimizer\.pt\)"):
        ckpt.resolve(broken, out)


def test_rotation_and_replacement_keep_whole_checkpoints_only(trainer):
    out = trainer.args.output_dir
    trainer.args.save_total_limit = 2
    for step in (1, 2, 3):
        write(out, step, trainer.model, trainer)
    write(out, 3, trainer.model, trainer)  # a rerun writes over checkpoint-3
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-3", "log.jsonl"]


def test_a_resumed_run_drops_logged_steps_it_will_redo_and_a_line_torn_by_a_kill(trainer):
    from velotune.train.callbacks import JsonlLogger

    path = os.path.join(trainer.args.output_dir, "log.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps({"step": 2, "loss": 1.0}) + "\n" + '{"step": 3, "lo')
    trainer.state["global_step"] = 1  # resuming from checkpoint-1
    JsonlLogger(path).on_train_begin(trainer)
    with open(path) as f:
        assert [json.loads(line)["step"] for line in f] == [1]
