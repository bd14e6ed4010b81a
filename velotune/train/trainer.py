"""The training loop: a reader can follow one optimizer step from top to bottom in `Trainer.train`.

One optimizer step takes `gradient_accumulation_steps` micro-batches. The number of label tokens
in all of them is counted on the CPU first and passed to every forward as `num_items_in_batch`,
so each micro-batch's loss is its summed token loss over that count: the accumulated gradient is
exactly the gradient of the large batch's mean loss, however the tokens fall into micro-batches.

What can go wrong on the way is handled where it happens (see velotune.train.faults and
docs/reliability.md): SIGINT/SIGTERM finish the step and write a checkpoint; a non-finite loss or
gradient is seen before the optimizer uses it (one host sync per step, for the loss and the gradient
norm together); running out of memory is reported with the planner's estimate and settings that fit.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from velotune.errors import ConfigError, DataError, NonFiniteError, OutOfMemoryError, TrainingInterrupted
from velotune.train import checkpoint as ckpt
from velotune.train import faults
from velotune.train.callbacks import (
    ConsoleLogger,
    JsonlLogger,
    ProgressBar,
    TensorBoardLogger,
    TrainerCallback,
    memory_gb,
)
from velotune.train.data import TokenizedDataset
from velotune.train.distributed import Parallel
from velotune.train.optim import build_optimizer, build_scheduler
from velotune.train.packing import BatchPlan, collate_packed, collate_padded, num_label_tokens

logger = logging.getLogger(__name__)


@dataclass
class TrainingArguments:
    """Everything the loop needs. Each field is also a key of the `training:` section of the YAML config.

    Args:
        output_dir: checkpoints, log.jsonl and the final adapter go here.
        num_epochs: passes over the data (ignored when max_steps > 0).
        max_steps: optimizer steps to run; > 0 overrides num_epochs.
        batch_size: rows per micro-batch (packed rows, or examples without packing).
        gradient_accumulation_steps: micro-batches per optimizer step.
        learning_rate / weight_decay / adam_beta1 / adam_beta2 / adam_epsilon: AdamW settings; weight decay
            never applies to biases and norm weights.
        optim: "adamw" (torch; fused on CUDA) or "adamw_8bit" (bitsandbytes).
        lr_scheduler: "linear", "cosine" or "constant" after the warm-up.
        warmup_steps / warmup_ratio: linear warm-up length, in steps or as a fraction of all steps.
        max_grad_norm: clip the gradient norm to this (None or 0: no clipping).
        packing: several examples per row, attention kept within each example.
        max_seq_length: packed row length (default: the model's max_seq_length).
        pad_to_multiple_of: round batch widths up (e.g. 8 on GPUs).
        mixed_precision: "no", "bf16" or "fp16" autocast. fp16 (and a float16 model) trains with a gradient
            scaler (torch.amp.GradScaler): its overflowing steps are skipped and counted as overflow_steps, not
            as non-finite faults, while the scale is above 1.
        nonfinite: what a step with a NaN or infinite loss or gradient does. "stop" (the default): write a
            checkpoint of the state before that step and raise velotune.errors.NonFiniteError naming the first
            module (decoder layer) that went non-finite. "skip": no update (the optimizer and the learning-rate
            schedule do not advance), the step is counted (nonfinite_steps) and logged; 10 such steps in a row
            stop the run as "stop" does.
        gradient_checkpointing: True / False, or None to keep the model's setting.
        seed: data order and torch's generator (LoRA dropout).
        shuffle: shuffle the data each epoch.
        logging_steps: log every N optimizer steps.
        eval_steps: evaluate every N steps (0: only at the end, when there is eval data).
        save_steps: checkpoint every N steps and at the end (0: no checkpoints).
        save_total_limit: keep only the newest N checkpoints (None: all).
        progress: a progress bar (else one log line per logging step).
        report_to: "none" or "tensorboard".
        parallel: with several processes (torchrun / accelerate launch): "auto" (DDP with LoRA, FSDP2 for full
            fine-tuning), "ddp" or "fsdp". batch_size is per process. See velotune.train.distributed.
        deepspeed: a DeepSpeed config file (ZeRO-2 / ZeRO-3): DeepSpeed's engine trains instead (launch with the
            `deepspeed` launcher; parallel stays "auto"). See velotune.train.zero.
    """

    output_dir: str = "outputs"
    num_epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    optim: str = "adamw"
    lr_scheduler: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    packing: bool = True
    max_seq_length: int | None = None
    pad_to_multiple_of: int | None = None
    mixed_precision: str = "no"
    gradient_checkpointing: bool | None = None
    seed: int = 3407
    shuffle: bool = True
    logging_steps: int = 1
    eval_steps: int = 0
    save_steps: int = 0
    save_total_limit: int | None = 2
    progress: bool = True
    report_to: str = "none"
    parallel: str = "auto"
    deepspeed: str | None = None
    nonfinite: str = "stop"
    extra: dict = field(default_factory=dict, repr=False)  # free-form, saved with checkpoints

    def __post_init__(self):
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"mixed_precision={self.mixed_precision!r}: use 'no', 'bf16' or 'fp16'.")
        if self.gradient_accumulation_steps < 1 or self.batch_size < 1:
            raise ConfigError("batch_size and gradient_accumulation_steps must be at least 1.")
        if self.report_to not in ("none", "tensorboard"):
            raise ConfigError(f"report_to={self.report_to!r}: use 'none' or 'tensorboard'.")
        if self.nonfinite not in ("stop", "skip"):
            raise ConfigError(f"nonfinite={self.nonfinite!r}: use 'stop' or 'skip'.")


def _as_dataset(data) -> TokenizedDataset | None:
    if data is None or isinstance(data, TokenizedDataset):
        return data
    if isinstance(data, Sequence) and data and isinstance(data[0], dict) and "input_ids" in data[0]:
        return TokenizedDataset.from_examples([(list(map(int, e["input_ids"])), list(map(int, e["labels"])))
                                               for e in data])  # fmt: skip
    raise DataError("train_dataset must be a velotune TokenizedDataset (velotune.train.prepare_dataset(...)) or a "
                    "list of {'input_ids', 'labels'} dicts.")  # fmt: skip


def _has_adapter(model) -> bool:
    try:
        from velotune.lora import has_lora
    except ImportError:
        return False
    return has_lora(model)


class Trainer:
    """Trains `model` on a tokenized dataset.

    Args:
        model: a velotune model with trainable parameters (LoRA via get_peft_model, or full_finetuning=True).
        args: TrainingArguments.
        train_dataset / eval_dataset: from `velotune.train.prepare_dataset`.
        tokenizer: used for its pad id (and saved beside the final adapter).
        callbacks: extra TrainerCallback objects.
    """

    def __init__(self, model, args: TrainingArguments | None = None, train_dataset=None, eval_dataset=None,
                 tokenizer=None, callbacks: Sequence[TrainerCallback] = ()):  # fmt: skip
        self.model, self.tokenizer = model, tokenizer
        self.args = args or TrainingArguments()
        self.train_dataset = _as_dataset(train_dataset)
        self.eval_dataset = _as_dataset(eval_dataset)
        if self.train_dataset is None or len(self.train_dataset) == 0:
            raise DataError("the trainer needs a non-empty train_dataset.")
        pad = None if tokenizer is None else (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                              else tokenizer.eos_token_id)  # fmt: skip
        self.pad_token_id = 0 if pad is None else pad
        self.max_seq_length = self.args.max_seq_length or getattr(model, "max_seq_length", None)
        self.callbacks: list[TrainerCallback] = [JsonlLogger(os.path.join(self.args.output_dir, "log.jsonl"))]
        self.callbacks.append(ProgressBar() if self.args.progress else ConsoleLogger())
        if self.args.report_to == "tensorboard":
            self.callbacks.append(TensorBoardLogger(os.path.join(self.args.output_dir, "runs")))
        self.callbacks.extend(callbacks)
        self.state: dict = {
            "global_step": 0,
            "max_steps": 0,
            "epoch": 0.0,
            "tokens_seen": 0,
            "nonfinite_steps": 0,
            "overflow_steps": 0,
            "log_history": [],
        }
        self.optimizer = self.scheduler = self.scaler = None
        # Ranks come from the environment (torchrun / accelerate); one process: everything as before.
        self.parallel = Parallel(self.args.parallel, deepspeed=self.args.deepspeed)
        self._forward = model

    # ------------------------------------------------------------------------------------ helpers

    def _check_lengths(self, dataset: TokenizedDataset, name: str) -> None:
        if self.max_seq_length is None:
            return
        lengths = dataset.lengths
        too_long = [i for i in range(len(lengths)) if lengths[i] > self.max_seq_length]
        if too_long:
            i = too_long[0]
            raise DataError(f"{name}: {len(too_long)} example(s) longer than max_seq_length={self.max_seq_length}, "
                            f"e.g. {dataset.where[i]} ({int(lengths[i])} tokens). Shorten or drop them.")  # fmt: skip

    def _collate(self, dataset: TokenizedDataset, rows: list[list[int]]) -> tuple[dict, int]:
        """This rank's share of a micro-batch: its tensors and its count of real (non-pad) tokens."""
        rows, stand_in = self.parallel.rows_of(rows, self.args.batch_size)
        real = 0 if stand_in else sum(int(dataset.lengths[i]) for row in rows for i in row)
        if self.args.packing:
            batch = collate_packed([[dataset[i] for i in row] for row in rows], self.pad_token_id,
                                   self.args.pad_to_multiple_of)  # fmt: skip
        else:
            batch = collate_padded(
                [dataset[row[0]] for row in rows], self.pad_token_id, self.args.pad_to_multiple_of
            )
        if stand_in:  # a rank with no rows left joins the step's collectives with zero loss
            batch["labels"].fill_(-100)
        return batch, real

    @staticmethod
    def _label_count(dataset: TokenizedDataset, rows: list[list[int]]) -> int:
        """num_label_tokens of these rows once collated (each example's first label is masked), from the data."""
        return sum(int((dataset[i]["labels"][1:] != -100).sum()) for row in rows for i in row)

    def _to_device(self, batch: dict) -> dict:
        device = self.model.device
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def _autocast(self):
        if self.args.mixed_precision == "no":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.args.mixed_precision == "bf16" else torch.float16
        return torch.autocast(self.model.device.type, dtype=dtype)

    def _emit(self, hook: str, *extra) -> None:
        if not self.parallel.is_main:  # logs, progress and files come from rank 0 only
            return
        for cb in self.callbacks:
            getattr(cb, hook)(self, *extra)

    def log(self, record: dict) -> None:
        self.state["log_history"].append(record)
        self._emit("on_log", record)

    # ------------------------------------------------------------------------------------ training

    def train(self, resume_from_checkpoint: str | bool | None = None) -> dict:
        """Runs the loop; returns the trainer state (global_step, log_history, ...).

        Args:
            resume_from_checkpoint: a checkpoint folder, or True for the newest in output_dir: the run
                continues exactly where that one stopped (same data order, optimizer, schedule and RNG).

        Raises:
            TrainingInterrupted: SIGINT or SIGTERM arrived; the step in progress was finished and a checkpoint
                written (the message says how to resume). The previous signal handlers are back.
            NonFiniteError: with nonfinite="stop", a step's loss or gradient was NaN or infinite; the
                checkpoint holds the state before that step.
            OutOfMemoryError: the device ran out of memory in a step; nothing was written for it.
        """
        args, model, data = self.args, self.model, self.train_dataset
        self._check_lengths(data, "train_dataset")
        if self.eval_dataset is not None:
            self._check_lengths(self.eval_dataset, "eval_dataset")
        torch.manual_seed(args.seed)
        par = self.parallel
        if args.gradient_checkpointing is not None:
            model.gradient_checkpointing = bool(args.gradient_checkpointing)
        # Before the optimizer: FSDP2 replaces the parameters by sharded ones.
        self._forward = par.wrap(model, _has_adapter(model))
        plan = BatchPlan(data.lengths, par.global_batch_size(args.batch_size), args.seed, args.packing,
                         self.max_seq_length, args.shuffle)  # fmt: skip
        accum = args.gradient_accumulation_steps
        steps_per_epoch = math.ceil(len(plan) / accum)
        max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_epochs * steps_per_epoch)
        if max_steps <= 0:
            raise ConfigError("nothing to train: set num_epochs > 0 or max_steps > 0.")
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizer = build_optimizer(params, args.optim, args.learning_rate, args.weight_decay,
                                         (args.adam_beta1, args.adam_beta2), args.adam_epsilon)  # fmt: skip
        warmup = args.warmup_steps or math.ceil(args.warmup_ratio * max_steps)
        self.scheduler = build_scheduler(self.optimizer, max_steps, warmup, args.lr_scheduler)
        self.scaler = None
        if args.mixed_precision == "fp16" or model.dtype == torch.float16:
            # float16 activations underflow in the backward without loss scaling; the scaler unscales the
            # gradients in place, which it refuses to do in float16.
            half = [n for n, p in params if p.dtype == torch.float16]
            if half:
                raise ConfigError(
                    f"{half[0]} (and {len(half) - 1} more) would train in float16, whose gradients cannot be "
                    "loss-scaled; load the model with dtype=torch.float32 and use mixed_precision='fp16', or "
                    "use bfloat16."
                )
            self.scaler = torch.amp.GradScaler(model.device.type)
        self.state.update(max_steps=max_steps, global_step=0, nonfinite_steps=0, overflow_steps=0)
        # DeepSpeed's engine takes over the model and the optimizer here (a no-op otherwise).
        self._forward = par.attach(self.optimizer, args)

        if par.is_main:  # what a killed run left half-written (see velotune.train.checkpoint)
            ckpt.clean_stale(args.output_dir)
        path = ckpt.resolve(resume_from_checkpoint, args.output_dir)
        if path is not None:
            with par.loading(model, self.optimizer) as (into, optimizer):
                saved, extra = ckpt.load_checkpoint(path, into, optimizer, self.scheduler)
            self.state.update(saved, max_steps=max_steps)
            if self.scaler is not None and "scaler" in extra:
                self.scaler.load_state_dict(extra["scaler"])
            logger.info("resumed from %s at step %d", path, self.state["global_step"])

        model.train()
        self._batch_shape: tuple[int, int] | None = None
        self._faults_in_a_row = 0
        epoch_batches, epoch_of_batches = None, -1
        loss_sum, good_steps, real_tokens, grad_norm = 0.0, 0, 0, None
        clock = time.perf_counter()
        self._emit("on_train_begin")
        with faults.StopSignals() as stop, self._train_end_on_exit():
            for step in range(self.state["global_step"], max_steps):
                epoch, window = divmod(step, steps_per_epoch)
                if epoch != epoch_of_batches:
                    epoch_batches, epoch_of_batches = plan.epoch(epoch), epoch
                window_rows = epoch_batches[window * accum : (window + 1) * accum]
                micro = [self._collate(data, rows) for rows in window_rows]
                # The whole step's label count, known before the first forward: every micro-batch's loss is
                # a share of the large batch's mean, and no device sync is needed to get it.
                # With several ranks it counts every rank's rows, from the plan (no communication).
                if par.world_size > 1:
                    n_items = max(1, sum(self._label_count(data, rows) for rows in window_rows))
                else:
                    n_items = max(1, sum(num_label_tokens(batch) for batch, _ in micro))
                lr = self.scheduler.get_last_lr()[0]
                # torch's generators as the step begins: a checkpoint of the state before a faulty step needs them.
                rng = ckpt.torch_rng_state()
                out_of_memory = None
                try:
                    loss, norm, stopping = self._step(step, micro, n_items, params, rng, stop)
                except torch.OutOfMemoryError as exc:
                    out_of_memory = str(exc)  # leaving the handler drops the traceback and the step's tensors
                if out_of_memory is not None:
                    self._raise_out_of_memory(step, out_of_memory)
                real_tokens += sum(real for _, real in micro)
                if loss is not None:
                    loss_sum, good_steps = loss_sum + loss, good_steps + 1
                grad_norm = norm if norm is not None else grad_norm
                self.state["global_step"] = step + 1
                self.state["epoch"] = (step + 1) / steps_per_epoch
                self._emit("on_step_end")

                done = step + 1 == max_steps
                if (step + 1) % args.logging_steps == 0 or done:
                    elapsed = time.perf_counter() - clock
                    loss_sum, real_tokens = par.sum([loss_sum, real_tokens], model.device)
                    real_tokens = int(real_tokens)
                    self.state["tokens_seen"] += real_tokens
                    record = {"step": step + 1, "epoch": round(self.state["epoch"], 4),
                              "loss": loss_sum / good_steps if good_steps else None, "lr": lr, "grad_norm": grad_norm,
                              "tokens_per_s": real_tokens / max(elapsed, 1e-9),
                              "tokens_seen": self.state["tokens_seen"],
                              "memory_gb": round(memory_gb(model.device, model), 3)}  # fmt: skip
                    record.update(
                        {k: self.state[k] for k in ("nonfinite_steps", "overflow_steps") if self.state[k]}
                    )
                    self.log(record)
                    loss_sum, good_steps, real_tokens, clock = 0.0, 0, 0, time.perf_counter()
                if self.eval_dataset is not None and (
                    (args.eval_steps and (step + 1) % args.eval_steps == 0) or done
                ):
                    self.log({"step": step + 1, "eval_loss": self.evaluate()})
                saved = None
                if args.save_steps and ((step + 1) % args.save_steps == 0 or done):
                    saved = self.save_checkpoint()
                # One process can heed a signal that came after the step's check; several decided together.
                stopping = stopping or (par.world_size == 1 and stop.received is not None)
                if stopping and not done:
                    path = saved or self.save_checkpoint()
                    signum = stop.received or signal.SIGTERM
                    message = faults.resume_hint(signum, step + 1, max_steps, path)
                    logger.warning(message)
                    raise TrainingInterrupted(message, signum, path)
        return self.state

    @contextlib.contextmanager
    def _train_end_on_exit(self):
        """on_train_end when the loop ends, also by an exception (whose callback errors then stay quiet: the
        exception is what the caller must see)."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):
                self._emit("on_train_end")
            raise
        self._emit("on_train_end")

    def _step(self, step: int, micro: list, n_items: int, named: list, rng: dict, stop: faults.StopSignals):
        """Forward and backward of the step's micro-batches, the health check, then the update or the
        non-finite policy. Returns (loss or None for a skipped step, gradient norm or None when it was not
        finite, whether to stop after this step)."""
        par = self.parallel
        losses = []
        for i, (batch, _) in enumerate(micro):
            self._batch_shape = tuple(batch["input_ids"].shape)
            with par.sync_gradients(i == len(micro) - 1):
                with self._autocast():
                    loss = self._forward(**self._to_device(batch), num_items_in_batch=n_items).loss
                par.backward(loss, self.scaler)
            losses.append(loss.detach())
        step_loss = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
        if par.engine is not None:
            # DeepSpeed clipped and stepped at the last micro-batch's backward (Parallel.backward).
            norm = par.grad_norm(None) if self.args.max_grad_norm else None
        else:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            # One fused pass over the gradients: clipping's norm is also the non-finite check's other half.
            # Clipping waits for the check, so a faulty step's gradients reach the diagnosis unscaled.
            local_norm = torch.nn.utils.get_total_norm([p.grad for _, p in named if p.grad is not None])
            norm = par.grad_norm(local_norm)
        # The step's one host sync: the loss and the gradient norm come over together, before the optimizer
        # uses the gradients. A NaN or infinity anywhere in the gradients makes the norm non-finite.
        if isinstance(norm, torch.Tensor):
            loss_value, norm_value = torch.stack(
                [step_loss.float(), norm.float().to(step_loss.device)]
            ).tolist()
        else:
            loss_value, norm_value = step_loss.item(), 0.0 if norm is None else float(norm)
        loss_ok, grads_ok, stopping = (
            math.isfinite(loss_value),
            math.isfinite(norm_value),
            stop.received is not None,
        )
        if par.world_size > 1:  # every rank decides alike, or the next collective would wait forever
            flags = par.sum([float(not loss_ok), float(not grads_ok), float(stopping)], self.model.device)
            loss_ok, grads_ok, stopping = flags[0] == 0, flags[1] == 0, flags[2] > 0
        if loss_ok and grads_ok:
            if par.engine is None and self.args.max_grad_norm:
                torch.nn.utils.clip_grads_with_norm_(
                    [p for _, p in named], self.args.max_grad_norm, local_norm
                )
            self._update()
            self._faults_in_a_row = 0
            return loss_value, (norm_value if norm is not None else None), stopping
        if loss_ok and self.scaler is not None and par.engine is None and self.scaler.get_scale() > 1.0:
            # fp16: the scaled gradients overflowed. The scaler skips the update and lowers the scale.
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.state["overflow_steps"] += 1
            logger.info("step %d: fp16 gradients overflowed; update skipped, loss scale lowered to %g",
                        step + 1, self.scaler.get_scale())  # fmt: skip
            return loss_value, None, stopping
        self._nonfinite(step, micro, n_items, losses, loss_value, norm_value, not loss_ok, named, rng)
        return None, None, stopping

    def _update(self) -> None:
        if self.parallel.engine is None:  # DeepSpeed stepped in its backward
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _nonfinite(self, step: int, micro: list, n_items: int, losses: list, loss_value: float, norm_value: float,
                   forward_fault: bool, named: list, rng: dict) -> None:  # fmt: skip
        """The non-finite policy: find where, then skip the update or stop with the state before this step."""
        args, par = self.args, self.parallel
        applied = par.engine is not None  # DeepSpeed has applied this step's update already
        report = faults.NonFiniteReport(
            step + 1, loss_value, norm_value, parameters=faults.nonfinite_gradients(named)
        )
        if applied:
            self.scheduler.step()
        elif self.scaler is not None:
            self.scaler.update()  # unscale_ ran this step: the scaler must close it
        self.optimizer.zero_grad(set_to_none=True)  # also frees the gradients before the second forward
        if forward_fault:
            self._find_first_nonfinite(report, micro, n_items, losses)
        self.state["nonfinite_steps"] += 1
        self._faults_in_a_row += 1
        note = " DeepSpeed had already applied this step's update." if applied else ""
        if args.nonfinite == "skip" and self._faults_in_a_row < faults.MAX_CONSECUTIVE_SKIPS:
            logger.warning("%s%s nonfinite='skip': update skipped (%d non-finite steps so far).",
                           report.describe(), note, self.state["nonfinite_steps"])  # fmt: skip
            return
        checkpoint = None
        if not applied:  # global_step is still `step`: the checkpoint holds the state before this step
            checkpoint = self.save_checkpoint(rng=ckpt.rng_state(rng))
        why = ("nonfinite='stop'" if args.nonfinite == "stop"
               else f"{self._faults_in_a_row} non-finite steps in a row with nonfinite='skip'")  # fmt: skip
        where = (f"{checkpoint} holds the state before this step: lower the learning rate or check this step's "
                 f"data, then resume from it" if checkpoint else "resume from the newest checkpoint")  # fmt: skip
        raise NonFiniteError(f"{report.describe()}{note} Training stopped ({why}); {where} "
                             f"(resume_from_checkpoint=...), or set nonfinite='skip' to skip such steps.",
                             report, checkpoint)  # fmt: skip

    def _find_first_nonfinite(
        self, report: faults.NonFiniteReport, micro: list, n_items: int, losses: list
    ) -> None:
        """Re-runs the forward of the micro-batch(es) whose loss was non-finite with hooks on every module."""
        par = self.parallel
        if par.world_size > 1:
            order = list(range(len(micro)))  # every rank runs the same forwards (FSDP2 gathers in each)
        else:
            finite = torch.stack([torch.isfinite(v) for v in losses]).tolist()
            order = [i for i, ok in enumerate(finite) if not ok]
        try:
            with torch.no_grad(), faults.first_nonfinite_output(self.model) as found:
                for i in order:
                    with self._autocast():
                        self.model(**self._to_device(micro[i][0]), num_items_in_batch=n_items)
                    if found.name is not None and report.module is None:
                        report.module, report.micro_batch = found.name, i
                        if par.world_size == 1:
                            break
        except Exception as exc:  # the report is a help; failing to make it must not hide the fault
            logger.warning(
                "could not re-run step %d's forward to find the non-finite layer: %s", report.step, exc
            )

    def _raise_out_of_memory(self, step: int, detail: str):
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()
        found = ckpt.checkpoints(self.args.output_dir)
        shape = self._batch_shape or (self.args.batch_size, self.max_seq_length or 0)
        message = faults.oom_message(self.model, self.args.optim, shape, self.args.gradient_accumulation_steps,
                                     step + 1, detail, found[-1][1] if found else None)  # fmt: skip
        raise OutOfMemoryError(message) from None

    @torch.no_grad()
    def evaluate(self, dataset: TokenizedDataset | None = None) -> float:
        """Mean token loss over the eval data (every label token weighs the same)."""
        data = _as_dataset(dataset) or self.eval_dataset
        if data is None:
            raise DataError("no eval_dataset to evaluate on.")
        par = self.parallel
        plan = BatchPlan(data.lengths, par.global_batch_size(self.args.batch_size), 0, self.args.packing,
                         self.max_seq_length, shuffle=False)  # fmt: skip
        was_training = self.model.training
        self.model.eval()
        total, count = torch.zeros((), device=self.model.device), 0
        for rows in plan.epoch(0):
            batch, _ = self._collate(data, rows)
            n = num_label_tokens(batch)
            if n == 0 and par.world_size == 1:
                continue
            with self._autocast():
                # num_items_in_batch=1 turns the mean into the summed token loss.
                total += self._forward(
                    **self._to_device(batch), num_items_in_batch=1, return_logits=False
                ).loss.float()
            count += n
        self.model.train(was_training)
        total, count = par.sum([total.item(), count], self.model.device)
        return total / max(count, 1)

    # ------------------------------------------------------------------------------------ saving

    def save_checkpoint(self, rng: tuple[dict, dict] | None = None) -> str:
        """Writes checkpoint-<global_step> (atomically) and rotates old ones; `rng`: generator states to store
        instead of the current ones."""
        step = self.state["global_step"]
        state = {k: v for k, v in self.state.items()}
        state["args"] = {k: v for k, v in asdict(self.args).items()}
        extra = {"scaler": self.scaler.state_dict()} if self.scaler is not None else None
        adapter = self.model.save_pretrained if _has_adapter(self.model) else None
        path = os.path.join(self.args.output_dir, f"checkpoint-{step}")
        # Whole tensors in the one-process layout (gathered from every rank under FSDP2 / ZeRO), by rank 0.
        with self.parallel.whole_trainables(self.model) as model:
            optimizer = self.parallel.whole_optimizer(self.optimizer)
            if self.parallel.is_main:
                path = ckpt.save_checkpoint(self.args.output_dir, step, model, optimizer, self.scheduler, state,
                                            extra, adapter, rng)  # fmt: skip
                ckpt.rotate(self.args.output_dir, self.args.save_total_limit)
        self.parallel.barrier()
        self._emit("on_save", path)
        return path

    def save_model(self, output_dir: str | None = None) -> str:
        """The trained result: a PEFT adapter folder with LoRA (plus the tokenizer), else the trainable weights."""
        from safetensors.torch import save_file

        folder = output_dir or self.args.output_dir
        adapter = _has_adapter(self.model)
        # Whole trainable tensors (gathered from every rank under FSDP2 / ZeRO), written by rank 0.
        with self.parallel.whole_trainables(self.model) as model:
            if self.parallel.is_main:
                os.makedirs(folder, exist_ok=True)
                if adapter:
                    model.save_pretrained(folder)
                else:
                    save_file(
                        ckpt.trainable_state(model),
                        os.path.join(folder, ckpt.TRAINABLE),
                        metadata={"format": "pt"},
                    )
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(folder)
        self.parallel.barrier()
        return folder
