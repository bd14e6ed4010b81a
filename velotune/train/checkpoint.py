"""Training checkpoints, written atomically so a crash at any moment leaves only whole checkpoints.

A checkpoint folder `checkpoint-<step>` holds:

    trainable.safetensors   every parameter with requires_grad, by its name in model.named_parameters()
    adapter_config.json +   the LoRA adapter in PEFT's format, when the model has one
    adapter_model.safetensors
    optimizer.pt            optimizer state (tensors and numbers only: loaded with weights_only=True)
    scheduler.pt            learning-rate scheduler state (and the fp16 grad scaler's)
    rng.pt                  torch CPU / CUDA generator states
    trainer_state.json      global step (which fixes the data position), log history, Python/NumPy RNG

It is first written to a hidden temporary folder beside it, every file fsync'ed, then renamed into
place (rename is atomic on POSIX file systems) and the parent folder fsync'ed. So a process killed at
any moment (kill -9, power loss after the fsync) leaves every `checkpoint-<step>` whole; what it can
leave behind are hidden folders, which no listing counts and `clean_stale` removes:

    .checkpoint-<step>.tmp        a checkpoint being written (incomplete)
    .checkpoint-<step>.old        a whole older checkpoint of the same step being replaced (put back
                                  by clean_stale if the new one never got its name)
    .checkpoint-<step>.deleting   a rotated-out checkpoint being deleted
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil

import numpy as np
import torch

from velotune.errors import CheckpointError

logger = logging.getLogger(__name__)

TRAINABLE = "trainable.safetensors"
STATE = "trainer_state.json"
# Every checkpoint has these; the adapter files come on top when the model has LoRA.
REQUIRED = (TRAINABLE, "optimizer.pt", "scheduler.pt", "rng.pt", STATE)
_NAME = re.compile(r"^checkpoint-(\d+)$")
_STALE = re.compile(r"^\.checkpoint-(\d+)\.(tmp|old|deleting)$")


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def torch_rng_state() -> dict:
    """torch's CPU and CUDA generator states (for rng.pt): cheap enough to take every step."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return tensors


def rng_state(tensors: dict | None = None) -> tuple[dict, dict]:
    """(tensors for rng.pt, JSON-able Python/NumPy states); `tensors` from an earlier torch_rng_state()."""
    tensors = torch_rng_state() if tensors is None else tensors
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    plain = {"python": _listify(random.getstate()),
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]}  # fmt: skip
    return tensors, plain


def _listify(x):
    return [_listify(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def set_rng_state(tensors: dict, plain: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["cuda"]))
    random.setstate(_tuplify(plain["python"]))
    kind, keys, pos, has_gauss, gauss = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))


def save_checkpoint(output_dir: str, step: int, model, optimizer, scheduler, state: dict, extra: dict | None = None,
                    save_adapter=None, rng: tuple[dict, dict] | None = None) -> str:  # fmt: skip
    """Writes checkpoint-<step> under output_dir atomically; returns its path.

    Args:
        state: JSON-able trainer state (must hold "global_step").
        extra: more torch-serialisable state for scheduler.pt (e.g. the grad scaler).
        save_adapter: callable(folder) writing the PEFT adapter, or None.
        rng: generator states from `rng_state()` (default: the current ones).
    """
    from safetensors.torch import save_file

    os.makedirs(output_dir, exist_ok=True)
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".checkpoint-{step}.tmp")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        save_file(trainable_state(model), os.path.join(tmp, TRAINABLE), metadata={"format": "pt"})
        if save_adapter is not None:
            save_adapter(tmp)
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save({"scheduler": scheduler.state_dict(), **(extra or {})}, os.path.join(tmp, "scheduler.pt"))
        tensors, plain = rng if rng is not None else rng_state()
        torch.save(tensors, os.path.join(tmp, "rng.pt"))
        with open(os.path.join(tmp, STATE), "w", encoding="utf-8") as f:
            json.dump({**state, "rng": plain}, f)
        for name in os.listdir(tmp):
            path = os.path.join(tmp, name)
            if os.path.isfile(path):
                _fsync_file(path)
        _fsync_dir(tmp)
    except BaseException:  # a failed write (disk full, Ctrl-C) leaves nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(final):
        # A rerun over an old output folder: the old checkpoint keeps a hidden name until the new one has
        # its name (clean_stale puts it back if the process dies in between).
        old = os.path.join(output_dir, f".checkpoint-{step}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(output_dir)
    return final


def is_complete(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, name)) for name in REQUIRED)


def checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in output_dir, oldest first (a folder missing a file is left out, with a warning)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _NAME.match(name)
        if m is None:
            continue
        path = os.path.join(output_dir, name)
        if is_complete(path):
            found.append((int(m.group(1)), path))
        else:
            logger.warning(
                "%s is not a complete checkpoint (it lacks one of %s); ignoring it.", path, REQUIRED
            )
    return sorted(found)


def rotate(output_dir: str, keep: int | None) -> None:
    if keep is None or keep <= 0:
        return
    for step, path in checkpoints(output_dir)[:-keep]:
        # Renamed first, so a process killed while deleting never leaves a half-deleted checkpoint-<step>.
        doomed = os.path.join(output_dir, f".checkpoint-{step}.deleting")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def clean_stale(output_dir: str) -> None:
    """Removes what a killed process left in output_dir (see the module docstring); an older checkpoint that
    was being replaced gets its name back if its replacement never got it."""
    if not os.path.isdir(output_dir):
        return
    for name in sorted(os.listdir(output_dir)):
        m = _STALE.match(name)
        if m is None:
            continue
        path, final = os.path.join(output_dir, name), os.path.join(output_dir, f"checkpoint-{m.group(1)}")
        if m.group(2) == "old" and not os.path.exists(final) and is_complete(path):
            os.replace(path, final)
            logger.warning("restored %s: its replacement was never completed.", final)
        else:
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed %s, left by an interrupted run.", path)


def resolve(resume_from_checkpoint, output_dir: str) -> str | None:
    """True -> the latest checkpoint in output_dir (None if there is none yet); a path -> that path."""
    if resume_from_checkpoint in (None, False):
        return None
    if resume_from_checkpoint is True:
        found = checkpoints(output_dir)
        return found[-1][1] if found else None
    path = os.fspath(resume_from_checkpoint)
    if not os.path.isfile(os.path.join(path, STATE)):
        raise CheckpointError(
            f"{path} is not a velotune checkpoint (no {STATE}); pass a checkpoint-<step> folder."
        )
    if not is_complete(path):
        missing = [name for name in REQUIRED if not os.path.isfile(os.path.join(path, name))]
        raise CheckpointError(
            f"{path} is incomplete (missing {', '.join(missing)}); resume from another checkpoint."
        )
    return path


def load_trainables(model, file: str) -> None:
    """Copies a trainable.safetensors file into the model's trainable parameters (names must match exactly)."""
    from safetensors.torch import load_file

    if not os.path.isfile(file):
        raise CheckpointError(
            f"{file} not found: the checkpoint is incomplete or was not written by velotune."
        )
    saved = load_file(file)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise CheckpointError(
            f"{file} does not match the model's trainable parameters (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}). Resume with the same model and LoRA settings as the run that wrote it."
        )
    with torch.no_grad():
        for name, p in params.items():
            if saved[name].shape != p.shape:
                raise CheckpointError(
                    f"{file}: {name} has shape {list(saved[name].shape)}, the model {list(p.shape)}."
                )
            p.copy_(saved[name])


def load_checkpoint(path: str, model, optimizer, scheduler) -> tuple[dict, dict]:
    """Restores trainables, optimizer, scheduler and RNG from `path`; returns (trainer state, extra)."""
    load_trainables(model, os.path.join(path, TRAINABLE))
    optimizer.load_state_dict(
        torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True)
    )
    extra = torch.load(os.path.join(path, "scheduler.pt"), map_location="cpu", weights_only=True)
    scheduler.load_state_dict(extra.pop("scheduler"))
    with open(os.path.join(path, STATE), encoding="utf-8") as f:
        state = json.load(f)
    set_rng_state(
        torch.load(os.path.join(path, "rng.pt"), map_location="cpu", weights_only=True), state.pop("rng")
    )
    return state, extra
