"""Builds a `DecoderModel` from a Hugging Face folder and streams its weights in.

Parameters are created empty on the target device in the target dtype, then every checkpoint
tensor is read, checked against the shape the config implies, converted and copied into place
one at a time: host memory stays near one tensor, device memory near the model itself.

With `load_in_4bit` the decoder's projections hold `NF4Weight`s instead: each checkpoint tensor
(q_proj, k_proj, ... separately) is moved to the device in the model dtype, quantized there and
dropped, so device memory peaks at the 4-bit model plus one tensor in 16-bit. A folder saved
pre-quantized by Transformers + bitsandbytes is read as NF4 directly (no bitsandbytes needed), and
dequantized wherever a 16-bit parameter is wanted (`load_in_4bit=False`, or the MoE experts).
"""

from __future__ import annotations

import logging
import math

import torch
from tqdm.auto import tqdm

from velotune.errors import CheckpointError, ConfigError
from velotune.io.hf_folder import read_config, weight_files
from velotune.io.safetensors_reader import read_header
from velotune.models.decoder import DecoderModel
from velotune.models.families import family_of
from velotune.models.families.common import TensorSlot
from velotune.models.layers import Projection
from velotune.models.spec import ArchSpec
from velotune.quant.bnb_format import (
    NF4Collector,
    check_bnb_config,
    is_bnb_quantized,
    quantized_weight_names,
    split_name,
)
from velotune.quant.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4
from velotune.quant.nf4_weight import NF4Weight

logger = logging.getLogger(__name__)

# Tensors some checkpoints carry that the model recomputes or never uses.
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq", "attention.masked_bias", "attention.bias")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def spec_from_folder(folder: str) -> tuple[dict, ArchSpec]:
    cfg = read_config(folder)
    family = family_of(cfg.get("model_type"))
    return cfg, family.build_spec(cfg)


def empty_model(
    spec: ArchSpec,
    device: torch.device,
    dtype: torch.dtype,
    model_cls=DecoderModel,
    load_in_4bit: bool = False,
) -> DecoderModel:
    with torch.device("meta"):
        model = model_cls(spec)
    if load_in_4bit:
        # Before allocation, so the dense projection weights never exist. Embedding, LM head, norms,
        # biases (and MoE experts) stay 16-bit.
        for module in model.modules():
            if isinstance(module, Projection):
                module.use_quantized_weight(NF4Weight(module.out_features, module.in_features, dtype))
        if spec.moe is not None:
            logger.warning(
                "load_in_4bit: MoE experts and router stay in %s; attention projections are 4-bit.", dtype
            )
    # Cast on meta (free) before allocating, so the device never holds a float32 copy.
    return model.to(dtype).to_empty(device=device)


def _row_range(index: tuple, rows: int, name: str) -> tuple[int, int]:
    """(first row, row count) of a slot into a 4-bit weight: the whole weight or one row slice."""
    if not index:
        return 0, rows
    if len(index) == 1 and isinstance(index[0], slice) and index[0].step in (None, 1):
        start, stop, _ = index[0].indices(rows)
        return start, stop - start
    raise CheckpointError(
        f"tensor {name} fills {index} of a 4-bit weight; only whole row blocks can be 4-bit."
    )


def _place(target, index: tuple, name: str, shape: tuple, value: NF4Tensor | None, read, path: str) -> None:
    """Puts one checkpoint tensor into its parameter or 4-bit weight: `value` when the checkpoint
    holds it pre-quantized, else `read()` (the dense tensor)."""
    if isinstance(target, NF4Weight):
        row0, rows = _row_range(index, target.out_features, name)
        expected = (rows, target.in_features)
    else:
        view = target[index] if index else target
        expected = tuple(view.shape)
    if shape != expected:
        raise CheckpointError(
            f"{path}: tensor {name} has shape {list(shape)} but config.json implies {list(expected)}. "
            "The config and the weights disagree: check that config.json belongs to these weights."
        )
    with torch.no_grad():
        if isinstance(target, NF4Weight):
            if value is None:
                # Quantized from the model dtype, as Transformers + bitsandbytes quantize after the cast.
                value = quantize_nf4(read().to(device=target.device, dtype=target.dtype))
            target.set_part(row0, value)
        elif value is not None:
            view.copy_(dequantize_nf4(value.to(view.device), view.dtype))
        else:
            view.copy_(read())


def _checkpoint_entries(path: str, fmt: str):
    """(name, shape, loader) for each tensor of one file, without reading tensor data yet."""
    if fmt == "safetensors":
        from safetensors import safe_open

        header = read_header(path)
        with safe_open(path, framework="pt", device="cpu") as handle:
            for name, info in header.items():
                dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
                yield name, tuple(info["shape"]), dtype, (lambda n=name: handle.get_tensor(n))
        return
    # Pickled checkpoints are read with weights_only=True: tensors only, no code can run.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path} could not be read safely ({type(exc).__name__}: {exc}). Convert it to safetensors with "
            "Transformers (`AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out, safe_serialization=True)`) "
            "in an environment you trust."
        ) from exc
    for name, tensor in state.items():
        yield name, tuple(tensor.shape), tensor.dtype, (lambda t=tensor: t)


def load_weights(
    model: DecoderModel,
    folder: str,
    slots: dict[str, TensorSlot],
    progress: bool = True,
    prequantized: bool = False,
) -> None:
    files = weight_files(folder)
    params: dict[str, torch.Tensor | NF4Weight] = dict(model.named_parameters())
    for path, module in model.named_modules():
        if isinstance(module, Projection) and isinstance(module.weight, NF4Weight):
            params[f"{path}.weight"] = module.weight
    filled = {name: 0 for name in params}
    unexpected = []
    quantized, collector = set(), NF4Collector()
    if prequantized and files.format == "safetensors":
        quantized = quantized_weight_names(name for path in files.paths for name in read_header(path))
    bar = tqdm(total=len(files.paths), desc="loading shards", unit="file", disable=not progress or len(files.paths) < 2)
    for path in files.paths:
        for name, shape, _dtype, read in _checkpoint_entries(path, files.format):
            value = None
            if quantized and (name in quantized or split_name(name)[1]):
                done = collector.add(name, read())
                if done is None:
                    continue  # more parts of this weight are still to come
                name, value = done
                shape = tuple(value.shape)
            slot = slots.get(name)
            if slot is None:
                if name == "lm_head.weight" and model.spec.tie_word_embeddings:
                    continue  # tied: the embedding is the head
                if not name.endswith(IGNORABLE_SUFFIXES):
                    unexpected.append(name)
                continue
            if slot.internal not in params:
                raise CheckpointError(f"{path}: tensor {name} maps to {slot.internal}, which this model lacks.")
            target = params[slot.internal]
            target = target if isinstance(target, NF4Weight) else target.data
            _place(target, slot.index, name, shape, value, read, path)
            filled[slot.internal] += math.prod(shape)
        bar.update(1)
    bar.close()
    if collector.incomplete():
        parts = collector.incomplete()
        raise CheckpointError(
            f"{folder}: {len(parts)} quantized tensor(s) lack some of their parts (weight, absmax, quant_map, "
            f"quant_state...), e.g. {dict(list(parts.items())[:3])}. The checkpoint is incomplete."
        )
    incomplete = [name for name, p in params.items() if filled[name] != p.numel()]
    if incomplete:
        missing = sorted(k for k, s in slots.items() if s.internal in incomplete)
        overfilled = [name for name in incomplete if filled[name] > params[name].numel()]
        if overfilled:
            raise CheckpointError(f"{folder}: tensors for {overfilled} appear more than once across the shards.")
        raise CheckpointError(
            f"{folder}: the checkpoint lacks {len(missing)} tensor(s) this config needs, e.g. {missing[:5]}. "
            "The download may be incomplete or config.json may belong to another model."
        )
    if unexpected:
        logger.warning("ignored %d checkpoint tensor(s) this model does not use, e.g. %s", len(unexpected), unexpected[:5])


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, str):
        table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
                 "float32": torch.float32, "fp32": torch.float32, "auto": None}  # fmt: skip
        if dtype not in table:
            raise ConfigError(f"dtype {dtype!r} is not one of {sorted(table)}.")
        dtype = table[dtype]
    if dtype is not None:
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_device(device_map) -> torch.device:
    if device_map in (None, "auto"):
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ConfigError(
                "device_map spreading one model over several devices is not supported; use one device, or "
                "velotune's distributed training (torchrun) to use several GPUs."
            )
        device_map = devices.pop()
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    device = torch.device(device_map)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device_map={device_map!r} asks for CUDA but no CUDA device is available.")
    return device


def load_model(
    folder: str,
    *,
    dtype=None,
    device_map="auto",
    max_seq_length: int | None = None,
    progress: bool = True,
    model_cls=DecoderModel,
    load_in_4bit: bool = False,
) -> DecoderModel:
    cfg, spec = spec_from_folder(folder)
    prequantized = is_bnb_quantized(cfg)
    if prequantized:
        check_bnb_config(cfg, folder)
        if not load_in_4bit:
            logger.info("%s is pre-quantized (bitsandbytes NF4): dequantizing it into 16-bit weights", folder)
    family = family_of(cfg["model_type"])
    # Every shard is present and every header valid before anything is allocated.
    files = weight_files(folder)
    if files.format == "safetensors":
        for path in files.paths:
            read_header(path)
    device = resolve_device(device_map)
    dtype = resolve_dtype(dtype, device)
    model = empty_model(spec, device, dtype, model_cls, load_in_4bit)
    load_weights(model, folder, family.tensor_slots(spec), progress=progress, prequantized=prequantized)
    model.max_seq_length = max_seq_length
    model.config_dict = cfg
    model.name_or_path = folder
    model.eval()
    return model
