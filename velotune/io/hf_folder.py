"""A Hugging Face model folder on disk: its config.json and the list of its weight files.

Both come from files a user downloaded, so both are validated before anything is built from them:
config.json must be a bounded UTF-8 JSON object whose size-giving values have the right types and
ranges, and every shard name in an index must name a file inside the folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass

from velotune.errors import CheckpointError, ConfigError, VelotuneError
from velotune.paths import plain_file_name

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
# Real config.json files are a few kB and shard indexes a few MB; anything far larger is not one.
MAX_JSON_BYTES = 64 * 1024 * 1024
# Building the model costs Python work per layer and per expert before any shape can be compared with
# the weights; these bounds (far above any supported model: Llama 3.1 405B has 126 layers, Mixtral
# 8 experts) keep a corrupt config.json from turning that work into a hang.
MAX_LAYERS = 4096
MAX_LAYER_EXPERTS = 1 << 17  # num_hidden_layers * num_local_experts
# No tensor dimension of a real model comes near this; shape arithmetic must stay within int64.
MAX_SIZE = 1 << 40

# config.json keys the family adapters read, by the kind of value they must hold (null = absent).
_POSITIVE_INTS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "head_dim", "max_position_embeddings", "num_local_experts", "num_experts_per_tok",
    "sliding_window", "original_max_position_embeddings",
)  # fmt: skip
_NON_NEGATIVE_INTS = ("max_window_layers",)
_POSITIVE_NUMBERS = (
    "rope_theta", "partial_rotary_factor", "query_pre_attn_scalar", "attn_logit_softcapping",
    "final_logit_softcapping",
)  # fmt: skip
_NON_NEGATIVE_NUMBERS = ("rms_norm_eps",)
_TYPES = {
    "model_type": str, "hidden_act": str, "hidden_activation": str, "tie_word_embeddings": bool,
    "attention_bias": bool, "mlp_bias": bool, "use_sliding_window": bool, "rope_scaling": dict,
    "rope_parameters": dict, "quantization_config": dict, "text_config": dict, "layer_types": list,
}  # fmt: skip


@dataclass(frozen=True)
class WeightFiles:
    paths: tuple[str, ...]
    format: str  # "safetensors" | "pickle"


def read_json(path: str, error: type[VelotuneError]):
    """The JSON value of a small file, with every way it can be broken raised as `error`."""
    try:
        size = os.path.getsize(path)
        if size > MAX_JSON_BYTES:
            raise error(
                f"{path} is {size} bytes, far more than such a file holds; it is not a valid {os.path.basename(path)}."
            )
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise error(f"cannot read {path}: {exc}") from exc
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise error(f"{path} is not valid UTF-8 JSON ({type(exc).__name__}: {exc}).") from exc


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def check_config_values(cfg: dict, path: str) -> None:
    """Raises ConfigError for a value of the wrong type or range among the keys velotune reads.

    Whether the sizes agree with the weights is checked later, against the checkpoint's tensor
    shapes, before the model is allocated (velotune.io.load).
    """

    def bad(key: str, wanted: str) -> ConfigError:
        return ConfigError(f"{path}: {key} must be {wanted}, got {cfg[key]!r:.100}. Fix config.json.")

    for key, kind in _TYPES.items():
        if cfg.get(key) is not None and not isinstance(cfg[key], kind):
            raise bad(
                key, f"a JSON {dict(str='string', bool='boolean', dict='object', list='list')[kind.__name__]}"
            )
    for keys, low in ((_POSITIVE_INTS, 1), (_NON_NEGATIVE_INTS, 0)):
        for key in keys:
            if cfg.get(key) is not None and not (_is_int(cfg[key]) and low <= cfg[key] <= MAX_SIZE):
                raise bad(key, f"{'a positive' if low else 'a non-negative'} integer (at most 2**40)")
    for keys, positive in ((_POSITIVE_NUMBERS, True), (_NON_NEGATIVE_NUMBERS, False)):
        for key in keys:
            value = cfg.get(key)
            if value is not None and not (_is_number(value) and (value > 0 if positive else value >= 0)):
                raise bad(key, "a positive finite number" if positive else "a non-negative finite number")
    experts, top_k = cfg.get("num_local_experts"), cfg.get("num_experts_per_tok")
    if experts is not None and top_k is not None and top_k > experts:
        raise ConfigError(f"{path}: num_experts_per_tok {top_k} exceeds num_local_experts {experts}.")
    layers = cfg.get("num_hidden_layers")
    if layers is not None and layers > MAX_LAYERS:
        raise ConfigError(f"{path}: num_hidden_layers={layers} is beyond any real model (limit {MAX_LAYERS}); "
                          "config.json is corrupt.")  # fmt: skip
    if layers is not None and experts is not None and layers * experts > MAX_LAYER_EXPERTS:
        raise ConfigError(f"{path}: {layers} layers x {experts} experts is beyond any real model (limit "
                          f"{MAX_LAYER_EXPERTS}); config.json is corrupt.")  # fmt: skip


def read_config(folder: str) -> dict:
    if not os.path.isdir(folder):
        raise CheckpointError(
            f"{folder!r} is not a folder. velotune loads local Hugging Face folders (config.json + *.safetensors); "
            "download the model first, e.g. `huggingface-cli download <repo> --local-dir <folder>`."
        )
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder} has no config.json; point from_pretrained at the model's folder.")
    cfg = read_json(path, ConfigError)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} must hold a JSON object.")
    check_config_values(cfg, path)
    if "text_config" in cfg and "model_type" not in (cfg.get("text_config") or {}):
        raise ConfigError(f"{path} describes a multimodal model; only text decoders are supported.")
    return cfg


def _index_files(folder: str, index_name: str) -> tuple[str, ...]:
    path = os.path.join(folder, index_name)
    index = read_json(path, CheckpointError)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path} is not a valid shard index: it needs a 'weight_map' object.")
    files = list(dict.fromkeys(weight_map.values()))
    for name in files:
        # A shard name is joined to the folder: "../x" or "/x" would read a file outside it.
        plain_file_name(name, f"{path} names shard", CheckpointError)
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
