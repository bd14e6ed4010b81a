"""Validated, streaming reads of safetensors files.

The header is checked (size, JSON, dtypes, shapes, offsets inside the file and consistent with
the shapes) before any tensor is read, so a truncated or hostile file fails with a clear message
instead of an out-of-bounds read or an unbounded allocation. Tensors are then read one at a time.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open

from velotune.errors import CheckpointError

DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_header(path: str) -> dict[str, dict]:
    """The validated tensor table {name: {"dtype", "shape", "data_offsets"}} of one file."""
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint file {path}: {exc}") from exc
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is truncated ({size} bytes): not a safetensors file. Re-download it.")
        header_len = int.from_bytes(prefix, "little")
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(
                f"{path}: header length {header_len} exceeds the file ({size} bytes): the file is truncated or "
                "corrupt. Re-download or re-save it."
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({exc}); the file is corrupt.")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object; the file is corrupt.")
    data_size = size - 8 - header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry ({exc}).") from exc
        if dtype not in DTYPE_SIZES:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}.")
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape}.")
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_size):
            raise CheckpointError(
                f"{path}: tensor {name!r} lies at bytes [{begin}, {end}) but the file holds {data_size} data bytes: "
                "the file is truncated or corrupt. Re-download or re-save it."
            )
        if end - begin != expected:
            raise CheckpointError(
                f"{path}: tensor {name!r} ({dtype}, shape {shape}) needs {expected} bytes but occupies {end - begin}."
            )
        tensors[name] = info
    return tensors


def iter_tensors(path: str, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, CPU tensor) one at a time from a validated file."""
    header = read_header(path)
    with safe_open(path, framework="pt", device="cpu") as f:
        for name in names if names is not None else list(header):
            yield name, f.get_tensor(name)
