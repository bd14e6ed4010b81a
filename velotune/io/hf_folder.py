"""A Hugging Face model folder on disk: its config.json and the list of its weight files."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from velotune.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"


@dataclass(frozen=True)
class WeightFiles:
    paths: tuple[str, ...]
    format: str  # "safetensors" | "pickle"


def read_config(folder: str) -> dict:
    if not os.path.isdir(folder):
        raise CheckpointError(
            f"{folder!r} is not a folder. velotune loads local Hugging Face folders (config.json + *.safetensors); "
            "download the model first, e.g. `huggingface-cli download <repo> --local-dir <folder>`."
        )
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder} has no config.json; point from_pretrained at the model's folder.")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} must hold a JSON object.")
    if "text_config" in cfg and "model_type" not in cfg.get("text_config", {}):
        raise ConfigError(f"{path} describes a multimodal model; only text decoders are supported.")
    return cfg


def _index_files(folder: str, index_name: str) -> tuple[str, ...]:
    path = os.path.join(folder, index_name)
    try:
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a valid shard index (needs a 'weight_map' object): {exc}") from exc
    files = list(dict.fromkeys(weight_map.values()))
    for name in files:
        if os.path.basename(name) != name:
            raise CheckpointError(f"{path} names shard {name!r} outside the model folder; refusing to read it.")
    missing = [name for name in files if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise CheckpointError(
            f"{path} lists shard(s) that are not in {folder}: {', '.join(missing)}. The download is incomplete; "
            "fetch the missing files."
        )
    return tuple(os.path.join(folder, name) for name in files)


def weight_files(folder: str) -> WeightFiles:
    if os.path.isfile(os.path.join(folder, SAFETENSORS_INDEX)):
        return WeightFiles(_index_files(folder, SAFETENSORS_INDEX), "safetensors")
    if os.path.isfile(os.path.join(folder, SAFETENSORS_SINGLE)):
        return WeightFiles((os.path.join(folder, SAFETENSORS_SINGLE),), "safetensors")
    if os.path.isfile(os.path.join(folder, PICKLE_INDEX)):
        return WeightFiles(_index_files(folder, PICKLE_INDEX), "pickle")
    if os.path.isfile(os.path.join(folder, PICKLE_SINGLE)):
        return WeightFiles((os.path.join(folder, PICKLE_SINGLE),), "pickle")
    raise CheckpointError(
        f"{folder} has no weights: expected {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} (or a pytorch_model.bin)."
    )
