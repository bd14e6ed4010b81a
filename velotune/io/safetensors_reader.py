"""Validated, streaming reads of safetensors files.

The header is checked before any tensor is read or any model memory is allocated, so a truncated
or hostile file fails with a `CheckpointError` naming the file instead of reading out of bounds or
making the loader allocate what the file cannot back:

- the header length fits in the file and under the safetensors library's own limit (100 MB);
- the header is UTF-8 JSON holding an object; `__metadata__`, if present, maps strings to strings;
- every tensor entry has a known dtype, a shape of non-negative integers, and byte offsets that are
  integers, in order, non-overlapping, inside the data section, and exactly
  prod(shape) * itemsize long; together the tensors cover the data section with no gap.

These are the rules the safetensors library itself applies when it opens the file, checked here
first so that every failure is velotune's typed error with a message saying what to do; the
library's own errors are translated too, in case a rule is ever added there.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from velotune.errors import CheckpointError

DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
# The safetensors library refuses larger headers; refusing them here keeps the two in agreement.
MAX_HEADER_BYTES = 100_000_000
_ENTRY_KEYS = ("dtype", "shape", "data_offsets")


def _corrupt(path: str, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}. The file is truncated or corrupt: re-download or re-save it.")


def _is_count(value) -> bool:
    """A non-negative JSON integer (JSON `true` parses as a Python bool, which is an int: refused)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_utf8(text: str) -> bool:
    # JSON escapes can spell lone surrogates ("\ud800"), which no UTF-8 reader accepts.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _load_json(path: str, raw: bytes):
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise _corrupt(path, f"the safetensors header is not valid UTF-8 JSON ({type(exc).__name__}: {exc})")


def _check_entry(path: str, name, info, data_size: int) -> tuple[int, int]:
    """(begin, end) of one validated tensor entry."""
    if not isinstance(info, dict) or any(key not in info for key in _ENTRY_KEYS):
        raise _corrupt(
            path, f"tensor {name!r} has a malformed header entry {info!r:.200} (needs {_ENTRY_KEYS})"
        )
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise CheckpointError(
            f"{path}: tensor {name!r} has dtype {dtype!r:.50}, which velotune does not read "
            f"(known: {', '.join(DTYPE_SIZES)})."
        )
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _corrupt(path, f"tensor {name!r} has an invalid shape {shape!r:.200}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise _corrupt(path, f"tensor {name!r} has invalid data_offsets {offsets!r:.200}")
    begin, end = offsets
    if not begin <= end <= data_size:
        raise _corrupt(
            path, f"tensor {name!r} lies at bytes [{begin}, {end}) but the file holds {data_size} data bytes"
        )
    # Python integers do not overflow, so a hostile shape cannot wrap around to a small product.
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise _corrupt(
            path,
            f"tensor {name!r} ({dtype}, shape {shape}) needs {expected} bytes but occupies {end - begin}",
        )
    return begin, end


def read_header(path: str) -> dict[str, dict]:
    """The validated tensor table {name: {"dtype", "shape", "data_offsets"}} of one file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"it holds {size} bytes, fewer than a safetensors header needs")
            header_len = int.from_bytes(prefix, "little")
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                raise _corrupt(
                    path,
                    f"header length {header_len} exceeds the file ({size} bytes) or the {MAX_HEADER_BYTES}-byte "
                    "limit of the format",
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint file {path}: {exc}") from exc
    header = _load_json(path, raw)
    if not isinstance(header, dict):
        raise _corrupt(path, "the safetensors header is not a JSON object")
    metadata = header.get("__metadata__")
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(
            isinstance(k, str) and isinstance(v, str) and _is_utf8(k) and _is_utf8(v)
            for k, v in metadata.items()
        )
    ):
        raise _corrupt(path, "the header's __metadata__ is not a map of strings to strings")
    data_size = size - 8 - header_len
    tensors, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not _is_utf8(name):
            raise _corrupt(path, f"tensor name {name!r} is not valid UTF-8")
        spans.append((*_check_entry(path, name, info, data_size), name))
        tensors[name] = info
    # The tensors must tile the data section: in order, no overlap, no gap, nothing after the last.
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else f"leaves a gap at byte {position}"
            raise _corrupt(path, f"tensor {name!r} at bytes [{begin}, {end}) {what}")
        position = end
    if position != data_size:
        raise _corrupt(
            path, f"the tensors end at data byte {position} but the file holds {data_size} data bytes"
        )
    return tensors


@contextlib.contextmanager
def open_safetensors(path: str) -> Iterator[tuple[dict[str, dict], Callable[[str], torch.Tensor]]]:
    """(validated header, read(name) -> CPU tensor) for one file; read errors are CheckpointErrors."""
    header = read_header(path)
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{path} could not be opened as safetensors ({exc}); the file is corrupt."
        ) from exc

    def read(name: str) -> torch.Tensor:
        try:
            return handle.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(
                f"{path}: tensor {name!r} could not be read ({exc}); the file is corrupt."
            ) from exc

    with handle:
        yield header, read


def iter_tensors(path: str, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, CPU tensor) one at a time from a validated file."""
    with open_safetensors(path) as (header, read):
        for name in names if names is not None else list(header):
            yield name, read(name)
