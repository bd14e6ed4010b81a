"""What the training loop does when a run is interrupted, goes non-finite or runs out of memory.

* Interruption: `StopSignals` turns SIGINT / SIGTERM into a request that the loop honours after the
  current optimizer step (checkpoint, then `TrainingInterrupted` with the resume instructions).
* Numeric faults: the loop checks the step's loss and gradient norm once per step (one host sync for
  both numbers). Only when one is non-finite does it look for the cause: `first_nonfinite_output` re-runs
  the micro-batch's forward with hooks on every module, `nonfinite_gradients` checks each gradient.
* Out of memory: `oom_message` reports the measured peak, the memory planner's estimate of the run and
  the settings the planner says would fit.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import signal
import threading
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------- interruption


class StopSignals:
    """While active (a `with` block in the main thread), SIGINT and SIGTERM set `received` instead of
    stopping the process; the handlers that were there before come back on exit.

    A second signal of the same kind gets the previous behaviour at once (Ctrl-C twice: KeyboardInterrupt;
    SIGTERM twice: the process ends), for when the current step takes too long to wait for.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        # Python only lets the main thread install handlers; elsewhere (a trainer in a worker thread) the
        # signals keep their usual meaning.
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                previous = signal.getsignal(sig)
                if previous is None:  # installed outside Python: it could not be put back
                    continue
                self._previous[sig] = previous
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            return
        self.received = signum
        signal.signal(signum, self._previous[signum])
        logger.warning(
            "%s received: finishing the current step, then writing a checkpoint (send it again to stop at once, "
            "without a checkpoint).",
            signal.Signals(signum).name,
        )

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def resume_hint(signum: int, step: int, max_steps: int, checkpoint: str) -> str:
    return (
        f"training stopped by {signal.Signals(signum).name} after step {step} of {max_steps}; the checkpoint "
        f"{checkpoint} holds everything needed to continue exactly. Resume with "
        f"Trainer.train(resume_from_checkpoint={checkpoint!r}) (or resume_from_checkpoint=True for the newest "
        f"checkpoint in the output folder), or add --resume_from_checkpoint=true to the same `velotune train` "
        f"command."
    )


# ---------------------------------------------------------------------------------------- non-finite values

# With nonfinite="skip", this many non-finite steps in a row mean the weights or the data are broken, not
# one batch: the run stops as with "stop".
MAX_CONSECUTIVE_SKIPS = 10
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def layer_of(name: str | None) -> int | None:
    """The decoder layer index in a module or parameter name ("layers.3.mlp.down_proj" -> 3)."""
    m = _LAYER.search(name or "")
    return int(m.group(1)) if m else None


def _where(name: str | None) -> str:
    layer = layer_of(name)
    if layer is not None:
        return f"decoder layer {layer} ({name})"
    return {"embed_tokens": "the input embedding", "norm": "the final norm", "lm_head": "the LM head"}.get(
        name, name or "?"
    )


@dataclass
class NonFiniteReport:
    """Where a step went non-finite.

    Attributes:
        step: the optimizer step (1-based, as logged).
        loss / grad_norm: the step's summed loss and gradient norm, as measured.
        module: the first module (a name from model.named_modules()) whose forward output held a NaN or
            infinity, when the loss was non-finite and a second forward pass reproduced it.
        micro_batch: the index, within the step, of the micro-batch whose forward `module` was found in.
        parameters: trainable parameters whose gradient held a NaN or infinity.
    """

    step: int
    loss: float
    grad_norm: float
    module: str | None = None
    micro_batch: int | None = None
    parameters: list[str] = field(default_factory=list)

    @property
    def layer(self) -> int | None:
        """The decoder layer that went non-finite first: that of `module`, else that of the first non-finite
        gradient in backward order (the backward pass reaches the last layer first)."""
        if self.module is not None:
            return layer_of(self.module)
        return layer_of(_first_in_backward(self.parameters)) if self.parameters else None

    def describe(self) -> str:
        head = f"step {self.step}: the loss was {self.loss:.6g} and the gradient norm {self.grad_norm:.6g}."
        if self.module is not None:
            where = (
                f" The first non-finite output in the forward pass: {_where(self.module)}, micro-batch "
                f"{self.micro_batch}."
            )
        elif not math.isfinite(self.loss):
            where = (
                " A second forward pass of the step's micro-batches stayed finite, so no layer could be named; "
                "the fault did not repeat (look for nondeterministic kernels or hardware errors)."
            )
        elif self.parameters:
            where = (
                f" The forward pass was finite; the backward pass went non-finite first in "
                f"{_where(_first_in_backward(self.parameters))}."
            )
        else:
            where = ""
        if self.parameters:
            shown = ", ".join(self.parameters[:4]) + (
                f" and {len(self.parameters) - 4} more" if len(self.parameters) > 4 else ""
            )
            where += f" Parameters with non-finite gradients: {shown}."
        return head + where


def _first_in_backward(names: list[str]) -> str:
    """The parameter the backward pass reaches first among `names`: the highest layer's, and outside the
    layers the head (the loss's gradient starts there)."""
    in_layers = [n for n in names if layer_of(n) is not None]
    if len(in_layers) < len(names):
        outside = [n for n in names if layer_of(n) is None and not n.startswith("embed_tokens")]
        if outside:
            return outside[0].rsplit(".", 1)[0]
    if in_layers:
        return max(in_layers, key=layer_of).rsplit(".", 1)[0]
    return names[0].rsplit(".", 1)[0]


def _nonfinite(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and not bool(torch.isfinite(value).all())
    if isinstance(value, (tuple, list)):
        return any(_nonfinite(v) for v in value)
    return False


class _FirstNonFinite:
    def __init__(self):
        self.name: str | None = None

    def hook(self, name: str):
        def check(module, args, output):
            if self.name is None and _nonfinite(output):
                self.name = name

        return check


@contextlib.contextmanager
def first_nonfinite_output(model: nn.Module):
    """Hooks on every submodule of `model` for the block's duration; the yielded object's `.name` is the
    first module, in execution order, whose output held a NaN or infinity (None while there is none).

    Modules run inside out (q_proj before the attention that calls it), so the name is the innermost
    module where the value appeared. Each hook syncs with the device: use it on the fault path only.
    """
    found = _FirstNonFinite()
    handles = [m.register_forward_hook(found.hook(name)) for name, m in model.named_modules() if name]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def nonfinite_gradients(named_params: list[tuple[str, nn.Parameter]]) -> list[str]:
    """Names of the parameters whose gradient holds a NaN or infinity (one device sync for all)."""
    with_grad = [(n, p.grad) for n, p in named_params if p.grad is not None]
    if not with_grad:
        return []
    # FSDP2's gradients are DTensors: each rank checks its own shard.
    local = [g.to_local() if hasattr(g, "to_local") else g for _, g in with_grad]
    flags = torch.stack([torch.isfinite(g).all().to(local[0].device) for g in local]).tolist()
    return [name for (name, _), ok in zip(with_grad, flags) if not ok]


# ---------------------------------------------------------------------------------------- out of memory

_GIB = 1024**3


def device_capacity(device: torch.device) -> int | None:
    """Bytes of memory the device has, None where unknown (CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return None


def device_peak(device: torch.device) -> int | None:
    """torch.cuda.max_memory_allocated on CUDA, None elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return None


def _lora_targets(model: nn.Module) -> list[str] | None:
    from velotune.lora.layers import LoraProjection
    from velotune.lora.tuner import lora_modules

    targets: set[str] = set()
    for module in lora_modules(model).values():
        if not isinstance(module, LoraProjection):
            return None  # MoE experts: the planner counts every projection
        targets.update(module.lora_blocks())
    return sorted(targets) or None


def run_settings(model: nn.Module, optim: str, batch: int, seq: int) -> dict:
    """Keyword arguments of `velotune.memory.planner.estimate_memory` that describe this model's training run."""
    from velotune.lora.tuner import has_lora
    from velotune.quant.nf4_weight import NF4Weight

    adapter = has_lora(model)
    if not adapter:
        method = "full"
    else:
        method = "qlora" if any(isinstance(m, NF4Weight) for m in model.modules()) else "lora"
    settings = dict(
        method=method,
        batch=batch,
        seq=seq,
        gradient_checkpointing=getattr(model, "gradient_checkpointing", False),
        checkpoint_policy=getattr(model, "checkpoint_policy", "full"),
        mlp_tile_tokens=getattr(model, "mlp_tile_tokens", None),
        dtype=str(model.dtype).removeprefix("torch."),
        optimizer="adamw8bit" if optim == "adamw_8bit" else "adamw",
    )
    if adapter:
        settings["lora_r"] = model.lora_settings.r
        settings["target_modules"] = _lora_targets(model)
        if model.lora_settings.lora_dropout > 0:
            # The hand-written MLP and attention halves step aside under LoRA dropout (autograd runs).
            settings.update(fused_mlp=False, fused_attention=False)
    return settings


def _plan(spec, settings: dict):
    from velotune.memory.planner import estimate_memory

    try:
        return estimate_memory(spec, **settings)
    except Exception:
        if settings.get("target_modules") is None:
            raise
        # Targets the planner does not model: count LoRA on every projection (an upper bound).
        return estimate_memory(spec, **{**settings, "target_modules": None})


@dataclass
class Suggestion:
    """A change of settings, the planner's keyword arguments with it, and its estimated peak in bytes."""

    text: str
    settings: dict
    estimate: int


def suggestions(spec, settings: dict, accumulation: int, capacity: int | None) -> list[Suggestion]:
    """Changes of settings that lower the peak: a smaller micro-batch with more accumulation, offloaded
    checkpointing, a 4-bit base, and those together.

    With `capacity` known, only changes the planner says fit are returned, each with the largest micro-batch
    that fits; without it, every change at the current micro-batch, and the next smaller micro-batch.
    """
    batch = settings["batch"]
    # Divisors keep the tokens per optimizer step exactly (batch x accumulation).
    smaller = [d for d in range(batch - 1, 0, -1) if batch % d == 0]

    def largest_batch(change: dict, batches: list[int]) -> Suggestion | None:
        for b in batches if capacity is not None else batches[:1]:
            planned = _plan(spec, {**settings, **change, "batch": b})
            if capacity is None or planned.fits(capacity):
                return Suggestion("", {**settings, **change, "batch": b}, planned.total)
        return None

    def described(found: Suggestion, parts: list[str]) -> Suggestion:
        b = found.settings["batch"]
        if b != batch:
            parts = [f"batch_size={b}, gradient_accumulation_steps={accumulation * batch // b} (the same tokens "
                     f"per optimizer step)", *parts]  # fmt: skip
        found.text = "; ".join(parts)
        return found

    options = []
    if smaller:
        found = largest_batch({}, smaller)
        if found is not None:
            options.append(described(found, []))
    changes = []
    if settings["gradient_checkpointing"] != "offload":
        where = ('model.gradient_checkpointing = "offload"' if settings["method"] == "full"
                 else 'get_peft_model(..., use_gradient_checkpointing="offload")')  # fmt: skip
        changes.append(({"gradient_checkpointing": "offload"}, f"{where} (layer inputs wait in CPU memory)"))
    if settings["method"] == "lora":
        changes.append(
            ({"method": "qlora"}, "from_pretrained(..., load_in_4bit=True) (QLoRA: NF4 base weights)")
        )
    elif settings["method"] == "full":
        changes.append(({"method": "qlora", "lora_r": 16, "target_modules": None},
                        "LoRA on a 4-bit base instead of full fine-tuning: from_pretrained(..., load_in_4bit=True) "
                        "then get_peft_model(model, r=16)"))  # fmt: skip
    if len(changes) > 1:
        changes.append(({k: v for change, _ in changes for k, v in change.items()},
                        " and ".join(text for _, text in changes)))  # fmt: skip
    for change, text in changes:
        found = largest_batch(change, [batch, *smaller])
        if found is not None:
            options.append(described(found, [text]))
    return options


def _size(n: int) -> str:
    return f"{n / _GIB:.2f} GiB" if n >= _GIB else f"{n / 1024**2:.1f} MiB"


def oom_message(model: nn.Module, optim: str, batch_shape: tuple[int, int], accumulation: int, step: int,
                original: str, checkpoint: str | None) -> str:  # fmt: skip
    """The report of an out-of-memory error in training step `step`, for velotune.errors.OutOfMemoryError."""
    from velotune.memory.planner import RESERVE_BYTES, SLACK

    device = model.device
    batch, seq = batch_shape
    lines = [f"out of memory in training step {step} (micro-batch of {batch} x {seq} tokens on {device}): "
             f"{original.splitlines()[0] if original else 'no detail'}"]  # fmt: skip
    peak, capacity = device_peak(device), device_capacity(device)
    if peak is not None:
        total = f" of the GPU's {_size(capacity)}" if capacity else ""
        lines.append(
            f"measured peak: {_size(peak)} allocated by PyTorch{total} (torch.cuda.max_memory_allocated)."
        )
    else:
        lines.append(f"measured peak: not available on {device.type} (PyTorch measures it on CUDA devices).")
    options: list[Suggestion] = []
    try:
        spec = getattr(model, "spec", None)
        if spec is None:
            raise ValueError("the model has no velotune ArchSpec")
        settings = run_settings(model, optim, batch, seq)
        estimate = _plan(spec, settings).total
        lines.append(f"memory planner estimate for this run: {_size(estimate)} ({settings['method']}, {batch} x "
                     f"{seq} tokens, gradient checkpointing {settings['gradient_checkpointing']!r}, "
                     f"{settings['dtype']}); `velotune plan` prints the breakdown.")  # fmt: skip
        options = suggestions(spec, settings, accumulation, capacity)
    except Exception as exc:  # the report must not hide the out-of-memory error behind another one
        lines.append(f"memory planner estimate: not available ({type(exc).__name__}: {exc}).")
        spec = None
    if spec is not None and capacity is not None:
        if options:
            lines.append(f"settings that fit this {_size(capacity)} device by the planner (keeping "
                         f"{RESERVE_BYTES / _GIB:g} GiB + {SLACK:.0%} aside):")  # fmt: skip
        else:
            lines.append(f"neither a smaller micro-batch, offloaded checkpointing nor a 4-bit base fits this "
                         f"{_size(capacity)} device by the planner: shorten max_seq_length, or use a larger GPU.")  # fmt: skip
    elif options:
        lines.append(
            "settings that lower the peak (the device's capacity is unknown, so none is checked to fit):"
        )
    lines.extend(f"  - {o.text}: {_size(o.estimate)} estimated" for o in options)
    if checkpoint is not None:
        lines.append(f"nothing was written for the failed step; the newest checkpoint, {checkpoint}, is intact: "
                     f"resume from it with the new settings (resume_from_checkpoint=True; a different batch "
                     f"size changes which rows later steps see).")  # fmt: skip
    else:
        lines.append("nothing was written for the failed step (no checkpoint exists yet: set save_steps to keep "
                     "progress).")  # fmt: skip
    return "\n".join(lines)
