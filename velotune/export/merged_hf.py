"""A standard Hugging Face folder from a velotune model: LoRA merged, original tensor names and layout.

The family adapter's `tensor_slots` (the one place that spells checkpoint names) says which slice
of which internal parameter each checkpoint tensor fills; export walks that map backwards. Fused
internal tensors are split back (q/k/v, gate/up, Mixtral's stacked experts), a tied head is not
written, and where a family lists two layouts for the same weights (Mixtral's published per-expert
tensors and Transformers' in-memory 3-D tensors) the first listed, the published one, is written.

Tensors are produced one at a time and shards are written as they fill, so host memory holds at
most one shard and device memory one merged parameter beyond the model.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import shutil

import torch
from safetensors.torch import save_file

from velotune.errors import ConfigError
from velotune.export.atomic import atomic_folder
from velotune.export.weights import EffectiveWeights, base_parameters
from velotune.io.hf_folder import SAFETENSORS_INDEX, SAFETENSORS_SINGLE
from velotune.models.families import family_of
from velotune.models.families.common import TensorSlot

logger = logging.getLogger(__name__)

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB" (10^9) or "500MiB" (2^20), as Transformers reads them."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise ConfigError(f"max_shard_size {size!r} is not a size; use e.g. 5GB, 500MB or an int of bytes.")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def export_slots(slots: dict[str, TensorSlot], params: dict[str, torch.Tensor]) -> dict[str, TensorSlot]:
    """The checkpoint tensors to write: per internal parameter, the first-listed layout that covers it.

    A whole-tensor slot is skipped when an earlier slot already covers part of that parameter, and a
    sliced slot is skipped when an earlier slot covers all of it; what is chosen must add up to
    exactly each parameter's size (checked, so a family map with a gap fails here, not in a reader).
    """
    chosen: dict[str, TensorSlot] = {}
    whole: set[str] = set()
    partial: dict[str, int] = {}
    for name, slot in slots.items():
        if slot.internal not in params:
            raise ConfigError(f"checkpoint tensor {name} maps to {slot.internal}, which the model lacks.")
        if slot.internal in whole or (not slot.index and slot.internal in partial):
            continue
        numel = params[slot.internal][slot.index].numel() if slot.index else params[slot.internal].numel()
        chosen[name] = slot
        if slot.index:
            partial[slot.internal] = partial.get(slot.internal, 0) + numel
        else:
            whole.add(slot.internal)
    for internal, covered in partial.items():
        if covered != params[internal].numel():
            raise ConfigError(
                f"the family's tensor map covers {covered} of {params[internal].numel()} elements of {internal}; "
                "the exported checkpoint would be incomplete."
            )
    missing = [n for n in params if n not in whole and n not in partial]
    if missing:
        raise ConfigError(f"no checkpoint name for parameter(s) {missing[:5]}; they cannot be exported.")
    return chosen


def _plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def _config_for_export(cfg: dict, dtype: torch.dtype) -> dict:
    out = copy.deepcopy(cfg)
    out["dtype"] = _DTYPE_NAMES[dtype]
    if out.get("torch_dtype") is not None:
        out["torch_dtype"] = _DTYPE_NAMES[dtype]
    # The weights written are dense: a quantization section would make readers expect packed ones.
    out.pop("quantization_config", None)
    return out


def _generation_config(model, cfg: dict) -> dict:
    source = getattr(model, "name_or_path", None)
    path = os.path.join(source, "generation_config.json") if isinstance(source, str) else None
    if path and os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    out = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if cfg.get(key) is not None:
            out[key] = cfg[key]
    return out


def _write_json(path: str, value: dict) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")


def save_merged_16bit(
    model,
    save_directory: str,
    tokenizer=None,
    *,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
) -> str:
    """Writes `model` (LoRA merged) as a Hugging Face folder that Transformers loads. Returns the folder.

    Args:
        model: a loaded velotune model (it keeps the config.json it was loaded from).
        save_directory: output folder; created, or updated in place (its earlier weight files go).
        tokenizer: saved beside the weights (any object with `save_pretrained`); when None, the
            tokenizer files of the folder the model was loaded from are copied.
        max_shard_size: largest shard, e.g. "5GB"; a single tensor larger than it gets its own shard.
        dtype: dtype of the written weights; default the model's (float16 / bfloat16, or float32 for a
            float32 model, so nothing is rounded that the model did not round).
    """
    cfg = getattr(model, "config_dict", None)
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise ConfigError(
            "this model has no config.json of its own (model.config_dict); export needs a model loaded "
            "with FastLanguageModel.from_pretrained."
        )
    dtype = dtype or model.dtype
    if dtype not in _DTYPE_NAMES:
        raise ConfigError(
            f"dtype {dtype} cannot be exported; use torch.float16, torch.bfloat16 or torch.float32."
        )
    max_bytes = parse_size(max_shard_size)
    weights = EffectiveWeights(model)
    slots = export_slots(family_of(cfg["model_type"]).tensor_slots(model.spec), base_parameters(model))
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = [(name, math.prod(weights.shape(s.internal, s.index)) * itemsize) for name, s in slots.items()]
    shards = _plan_shards(sizes, max_bytes)
    if len(shards) == 1:
        files = [SAFETENSORS_SINGLE]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    with atomic_folder(save_directory) as tmp:
        weight_map = {}
        for file, names in zip(files, shards):
            tensors = {}
            for name in names:
                slot = slots[name]
                tensors[name] = weights.slice(slot.internal, slot.index).to("cpu", dtype).contiguous()
                weight_map[name] = file
            save_file(tensors, os.path.join(tmp, file), metadata={"format": "pt"})
            del tensors
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(n for _, n in sizes)}, "weight_map": weight_map}
            _write_json(os.path.join(tmp, SAFETENSORS_INDEX), index)
        _write_json(os.path.join(tmp, "generation_config.json"), _generation_config(model, cfg))
        source = getattr(model, "name_or_path", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        elif isinstance(source, str) and os.path.isdir(source):
            _copy_tokenizer_files(source, tmp)
        _write_json(os.path.join(tmp, "config.json"), _config_for_export(cfg, dtype))
    logger.info("wrote %d tensors in %d file(s) to %s", len(slots), len(files), save_directory)
    return save_directory


def _copy_tokenizer_files(source: str, destination: str) -> None:
    """Without a tokenizer object, the source folder's tokenizer files keep the export usable."""
    from velotune.io.tokenizer import TOKENIZER_FILES

    for name in (*TOKENIZER_FILES, "special_tokens_map.json", "chat_template.jinja", "merges.txt"):
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy2(os.path.join(source, name), os.path.join(destination, name))
