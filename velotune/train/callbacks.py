"""Hooks into the training loop, and the built-in ones: JSONL log, console log, progress bar, TensorBoard."""

from __future__ import annotations

import json
import logging
import os
import resource
import sys

import torch

from velotune.memory import layer_graphs

logger = logging.getLogger("velotune.train")


class TrainerCallback:
    """Subclass and override what you need; every hook gets the trainer (its .state, .model, .args)."""

    def on_train_begin(self, trainer) -> None: ...

    def on_step_end(self, trainer) -> None: ...

    def on_log(self, trainer, record: dict) -> None: ...

    def on_save(self, trainer, path: str) -> None: ...

    def on_train_end(self, trainer) -> None: ...


def memory_gb(device: torch.device, model=None) -> float:
    """Peak memory so far: allocated GPU memory on CUDA (plus the memory pool of `model`'s CUDA graphs,
    which the allocator's peak does not count while they replay), the process's peak resident size
    elsewhere."""
    if device.type == "cuda":
        graphs = layer_graphs.pool_bytes(model) if model is not None else 0
        return (torch.cuda.max_memory_allocated(device) + graphs) / 2**30
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak_kb / (2**30 if sys.platform == "darwin" else 2**20)


class JsonlLogger(TrainerCallback):
    """Appends every log record as one JSON line (appending keeps the history of a resumed run).

    When training begins, records of steps after the one it starts from are dropped: they belong to a run
    that went further than its last checkpoint before it was killed, and are about to be done again. So
    the file holds the history of the steps that led to the current weights (a fresh run starts it over).
    """

    def __init__(self, path: str):
        self.path = path

    def on_train_begin(self, trainer) -> None:
        if not os.path.isfile(self.path):
            return
        start, kept = trainer.state["global_step"], []
        with open(self.path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the last line, torn by a kill in the middle of writing it
                continue
            if isinstance(record, dict) and record.get("step", 0) <= start:
                kept.append(line)
        if len(kept) == len(lines):
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def on_log(self, trainer, record: dict) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class ConsoleLogger(TrainerCallback):
    def on_log(self, trainer, record: dict) -> None:
        logger.info("  ".join(f"{k}={_fmt(v)}" for k, v in record.items()))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class ProgressBar(TrainerCallback):
    """A tqdm bar over optimizer steps, showing loss, tokens/s and memory."""

    def __init__(self):
        self.bar = None

    def on_train_begin(self, trainer) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=trainer.state["max_steps"], initial=trainer.state["global_step"], desc="training",
                        unit="step", dynamic_ncols=True)  # fmt: skip

    def on_step_end(self, trainer) -> None:
        self.bar.update(trainer.state["global_step"] - self.bar.n)

    def on_log(self, trainer, record: dict) -> None:
        if record.get("loss") is not None:  # None: every step since the last record was skipped
            self.bar.set_postfix_str(
                f"loss {record['loss']:.4f}  {record['tokens_per_s']:,.0f} tok/s  mem {record['memory_gb']:.2f} GB",
                refresh=False,
            )
        if "eval_loss" in record:
            self.bar.write(f"step {record['step']}: eval_loss {record['eval_loss']:.4f}")

    def on_train_end(self, trainer) -> None:
        self.bar.close()


class TensorBoardLogger(TrainerCallback):
    """Scalars to TensorBoard (needs the `tensorboard` package)."""

    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir)

    def on_log(self, trainer, record: dict) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(
                    f"train/{key}" if not key.startswith("eval") else key, value, record["step"]
                )

    def on_train_end(self, trainer) -> None:
        self.writer.close()
