"""Writing export outputs so that a crash never leaves a half-written model where a good one was.

A folder is built in a hidden sibling (same filesystem, so the final move is a rename). A new
target is created by one rename; an existing target keeps its unrelated files, loses the weight
files an earlier save left (their shard count may differ) and receives the new files by rename,
the config last, so that a reader never sees a config without its weights.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from velotune.errors import ConfigError

# Written last: loaders look for these first, so they must not point at files not yet in place.
_LAST = ("model.safetensors.index.json", "config.json")
_WEIGHT_SUFFIXES = (".safetensors",)
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _is_stale_weight(name: str) -> bool:
    return name in _WEIGHT_INDEXES or (name.startswith("model") and name.endswith(_WEIGHT_SUFFIXES))


@contextlib.contextmanager
def atomic_folder(target: str) -> Iterator[str]:
    """Yields a temporary folder to fill; on success its content replaces `target`'s model files."""
    target = os.path.abspath(target)
    if os.path.exists(target) and not os.path.isdir(target):
        raise ConfigError(f"{target} exists and is not a folder; choose another output path.")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.partial-", dir=parent)
    try:
        yield tmp
        if not os.path.exists(target):
            os.rename(tmp, target)
            return
        for name in os.listdir(target):
            if _is_stale_weight(name) and not os.path.exists(os.path.join(tmp, name)):
                os.remove(os.path.join(target, name))
        names = sorted(os.listdir(tmp), key=lambda n: (n in _LAST, _LAST.index(n) if n in _LAST else 0, n))
        for name in names:
            dest = os.path.join(target, name)
            if os.path.isdir(dest) and not os.path.islink(dest):
                shutil.rmtree(dest)
            os.replace(os.path.join(tmp, name), dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yields a temporary path beside `path`; renamed onto `path` only if the block succeeds."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.partial-", dir=os.path.dirname(path))
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
