"""A training process for the interruption tests (tests/train/test_faults.py, tests/train/test_checkpoint.py).

    python tests/train/fault_worker.py SPEC.json

prints "begin <step>" when training starts and "step <n>" after every step, and exits with 128 + the
signal number when SIGINT/SIGTERM interrupted it. `child(spec, conn)` does the same in a multiprocessing
child, sending ("begin", step), ("step", n) and ("done", n) through `conn`.

SPEC: {"model": folder, "args": TrainingArguments fields, "examples": n, "data_seed": int} and optionally
"step_delay" (seconds to wait after each step) and "slow_fsync" (seconds added to every file fsync of a
checkpoint, so that kills land inside checkpoint writes). Training always resumes from the newest
checkpoint in the output folder, if there is one.
"""

import json
import sys
import time

import torch
import torch._dynamo  # noqa: F401  (loading a model imports it lazily: seconds in every forked child)

import velotune
from tests.train.helpers import random_examples
from velotune.errors import TrainingInterrupted
from velotune.train import Trainer, TrainerCallback, TrainingArguments
from velotune.train import checkpoint as ckpt
from velotune.train.data import TokenizedDataset


class Report(TrainerCallback):
    def __init__(self, send, delay: float):
        self.send, self.delay = send, delay

    def on_train_begin(self, trainer) -> None:
        self.send(("begin", trainer.state["global_step"]))

    def on_step_end(self, trainer) -> None:
        self.send(("step", trainer.state["global_step"]))
        if self.delay:
            time.sleep(self.delay)


def train(spec: dict, send) -> None:
    torch.set_num_threads(1)  # the same arithmetic as the test process's reference run
    if spec.get("slow_fsync"):
        fsync = ckpt._fsync_file

        def slow_fsync(path: str) -> None:
            time.sleep(spec["slow_fsync"])
            fsync(path)

        ckpt._fsync_file = slow_fsync
    model, _ = velotune.FastLanguageModel.from_pretrained(
        spec["model"], dtype=torch.float32, device_map="cpu", full_finetuning=True, max_seq_length=64,
        progress=False,
    )  # fmt: skip
    data = TokenizedDataset.from_examples(random_examples(spec["examples"], seed=spec["data_seed"]))
    trainer = Trainer(model, TrainingArguments(**spec["args"]), train_dataset=data,
                      callbacks=[Report(send, spec.get("step_delay", 0.0))])  # fmt: skip
    trainer.train(resume_from_checkpoint=True)
    send(("done", trainer.state["global_step"]))


def child(spec: dict, conn) -> None:
    """multiprocessing target."""
    train(spec, conn.send)


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)

    def send(message) -> None:
        print(*message, flush=True)

    try:
        train(spec, send)
    except TrainingInterrupted as exc:
        return 128 + exc.signal
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
