"""Builds a `DecoderModel` from a Hugging Face folder and streams its weights in.

The model is first built on the meta device (no memory), and every checkpoint tensor's shape, taken
from the validated file headers, is checked against the shape config.json implies, and every
parameter checked to be covered, before anything is allocated: a config.json that disagrees with
its weights (or a hostile one, vocab_size=10**12) fails with a CheckpointError instead of allocating
what the files cannot back. Parameters are then created empty on the target device in the target
dtype, and each checkpoint tensor is read, converted and copied into place one at a time: host
memory stays near one tensor, device memory near the model itself.

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

from velotune.errors import CheckpointError, ConfigError, VelotuneError
from velotune.io.hf_folder import WeightFiles, read_config, weight_files
from velotune.io.safetensors_reader import DTYPE_SIZES, open_safetensors, read_header
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


def build_spec(cfg: dict, folder: str) -> ArchSpec:
    """The family's ArchSpec of a config.json whose values `read_config` has type-checked.

    Families read further keys (rope_scaling's entries, layer_types, ...) and assume them well
    formed; any value they cannot use is reported as the ConfigError it is, naming the folder.
    """
    family = family_of(cfg.get("model_type"))
    try:
        return family.build_spec(cfg)
    except (TypeError, ValueError, KeyError, AttributeError, ArithmeticError) as exc:
        if isinstance(exc, VelotuneError):  # already says what is wrong
            raise
        raise ConfigError(
            f"{folder}/config.json holds a value velotune cannot use ({type(exc).__name__}: {exc}). "
            "Check the config against the model's original config.json."
        ) from exc


def spec_from_folder(folder: str) -> tuple[dict, ArchSpec]:
    cfg = read_config(folder)
    return cfg, build_spec(cfg, folder)


def meta_model(
    spec: ArchSpec, dtype: torch.dtype, model_cls=DecoderModel, load_in_4bit: bool = False
) -> DecoderModel:
    """The model on the meta device (shapes, no memory), in `dtype`, with NF4 projections if asked."""
    with torch.device("meta"):
        model = model_cls(spec)
    if load_in_4bit:
        # Before allocation, so the dense projection weights never exist. Embedding, LM head, norms,
        # biases (and MoE experts) stay 16-bit.
        projections = [m for m in model.modules() if isinstance(m, Projection)]
        # A fused 4-bit weight no larger than the largest single block (the scratch buffer's size
        # anyway) is dequantized whole for its GEMMs (velotune.quant.nf4_weight).
        largest_block = max((max(m.out_sizes) * m.in_features for m in projections), default=0)
        for module in projections:
            weight = NF4Weight(module.out_features, module.in_features, dtype)
            weight.whole_numel_limit = largest_block
            module.use_quantized_weight(weight)
        if spec.moe is not None:
            logger.warning(
                "load_in_4bit: MoE experts and router stay in %s; attention projections are 4-bit.", dtype
            )
    # Cast on meta (free) before allocating, so the device never holds a float32 copy.
    return model.to(dtype)


def empty_model(
    spec: ArchSpec,
    device: torch.device,
    dtype: torch.dtype,
    model_cls=DecoderModel,
    load_in_4bit: bool = False,
) -> DecoderModel:
    return meta_model(spec, dtype, model_cls, load_in_4bit).to_empty(device=device)


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


def _expected_shape(target, index: tuple, name: str) -> tuple[int, ...]:
    """The shape config.json implies for the checkpoint tensor that fills `target[index]`."""
    if isinstance(target, NF4Weight):
        return _row_range(index, target.out_features, name)[1], target.in_features
    return tuple((target[index] if index else target).shape)


def _shape_mismatch(path: str, name: str, shape, expected) -> CheckpointError:
    return CheckpointError(
        f"{path}: tensor {name} has shape {list(shape)} but config.json implies {list(expected)}. "
        "The config and the weights disagree: check that config.json belongs to these weights."
    )


def _place(target, index: tuple, name: str, shape: tuple, value: NF4Tensor | None, read, path: str) -> None:
    """Puts one checkpoint tensor into its parameter or 4-bit weight: `value` when the checkpoint
    holds it pre-quantized, else `read()` (the dense tensor)."""
    expected = _expected_shape(target, index, name)
    if shape != expected:
        raise _shape_mismatch(path, name, shape, expected)
    with torch.no_grad():
        if isinstance(target, NF4Weight):
            if value is None:
                # Quantized from the model dtype, as Transformers + bitsandbytes quantize after the cast.
                value = quantize_nf4(read().to(device=target.device, dtype=target.dtype))
            target.set_part(_row_range(index, target.out_features, name)[0], value)
        else:
            view = target[index] if index else target
            if value is not None:
                view.copy_(dequantize_nf4(value.to(view.device), view.dtype))
            else:
                view.copy_(read())


def _load_pickle(path: str) -> dict[str, torch.Tensor]:
    # Pickled checkpoints are read with weights_only=True: tensors only, no code can run. mmap keeps
    # host memory near one tensor.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path} could not be read safely ({type(exc).__name__}: {exc}). Convert it to safetensors with "
            "Transformers (`AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out, safe_serialization=True)`) "
            "in an environment you trust."
        ) from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path} does not hold a mapping of tensor names to tensors; it is not a checkpoint.")
    return state


def _checkpoint_entries(path: str, fmt: str):
    """(name, shape, loader) for each tensor of one file, without reading tensor data yet."""
    if fmt == "safetensors":
        with open_safetensors(path) as (header, read):
            for name, info in header.items():
                dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
                yield name, tuple(info["shape"]), dtype, (lambda n=name: read(n))
        return
    for name, tensor in _load_pickle(path).items():
        yield name, tuple(tensor.shape), tensor.dtype, (lambda t=tensor: t)


def checkpoint_inventory(files: WeightFiles) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """{tensor name: (file, shape, bytes)} of every checkpoint tensor, from the validated headers
    (safetensors) or a memory-mapped, tensors-only read (pickle): no tensor data is read."""
    inventory = {}
    for path in files.paths:
        if files.format == "safetensors":
            entries = ((n, i["shape"], DTYPE_SIZES[i["dtype"]]) for n, i in read_header(path).items())
        else:
            entries = ((n, t.shape, t.element_size()) for n, t in _load_pickle(path).items())
        for name, shape, itemsize in entries:
            if name in inventory:
                raise CheckpointError(f"tensor {name} appears in both {inventory[name][0]} and {path}.")
            inventory[name] = (path, tuple(shape), math.prod(shape) * itemsize)
    return inventory


def _targets(model: DecoderModel) -> dict[str, torch.Tensor | NF4Weight]:
    """What checkpoint tensors fill: every parameter, and every 4-bit projection weight."""
    targets: dict[str, torch.Tensor | NF4Weight] = dict(model.named_parameters())
    for path, module in model.named_modules():
        if isinstance(module, Projection) and isinstance(module.weight, NF4Weight):
            targets[f"{path}.weight"] = module.weight
    return targets


def _numel(target) -> int:
    return math.prod(target.shape)


def _check_filled(targets: dict, filled: dict[str, int], slots: dict[str, TensorSlot], folder: str) -> None:
    incomplete = [name for name, t in targets.items() if filled[name] != _numel(t)]
    if not incomplete:
        return
    overfilled = [name for name in incomplete if filled[name] > _numel(targets[name])]
    if overfilled:
        raise CheckpointError(f"{folder}: tensors for {overfilled} appear more than once across the shards.")
    missing = sorted(k for k, s in slots.items() if s.internal in incomplete)
    raise CheckpointError(
        f"{folder}: the checkpoint lacks {len(missing)} tensor(s) this config needs, e.g. {missing[:5]}. "
        "The download may be incomplete or config.json may belong to another model."
    )


def check_checkpoint_fits(
    model: DecoderModel,
    folder: str,
    slots: dict[str, TensorSlot],
    inventory: dict[str, tuple[str, tuple[int, ...], int]],
    quantized: set[str] = frozenset(),
) -> None:
    """Before allocation: every tensor the (meta) model needs is in the checkpoint with the shape
    config.json implies, and nothing is covered twice. Then the model's size is the checkpoint's,
    whatever config.json claims.

    A bitsandbytes-packed weight (named in `quantized`) holds ceil(numel / 2) bytes of 4-bit codes;
    its companions (absmax, quant state...) are checked when they are read.
    """
    targets = _targets(model)
    filled = {name: 0 for name in targets}
    for name, (path, shape, nbytes) in inventory.items():
        if quantized and split_name(name)[1]:
            continue  # a quantized weight's companion
        slot = slots.get(name)
        if slot is None:
            continue  # unused tensors are reported (not refused) while loading
        if slot.internal not in targets:
            raise CheckpointError(f"{path}: tensor {name} maps to {slot.internal}, which this model lacks.")
        expected = _expected_shape(targets[slot.internal], slot.index, name)
        if name in quantized:
            if nbytes != (math.prod(expected) + 1) // 2:
                raise CheckpointError(
                    f"{path}: 4-bit tensor {name} holds {nbytes} bytes but config.json implies shape "
                    f"{list(expected)} ({(math.prod(expected) + 1) // 2} bytes of NF4 codes). Check that "
                    "config.json belongs to these weights."
                )
        elif shape != expected:
            raise _shape_mismatch(path, name, shape, expected)
        filled[slot.internal] += math.prod(expected)
    _check_filled(targets, filled, slots, folder)


def load_weights(
    model: DecoderModel,
    folder: str,
    slots: dict[str, TensorSlot],
    progress: bool = True,
    prequantized: bool = False,
) -> None:
    files = weight_files(folder)
    params = _targets(model)
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
    _check_filled(params, filled, slots, folder)
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
    cfg = read_config(folder)
    family = family_of(cfg.get("model_type"))
    prequantized = is_bnb_quantized(cfg)
    if prequantized:
        check_bnb_config(cfg, folder)
        if not load_in_4bit:
            logger.info("%s is pre-quantized (bitsandbytes NF4): dequantizing it into 16-bit weights", folder)
    # Every shard is present and every header valid before anything is built or allocated.
    files = weight_files(folder)
    inventory = checkpoint_inventory(files)
    spec = build_spec(cfg, folder)
    device = resolve_device(device_map)
    dtype = resolve_dtype(dtype, device)
    slots = family.tensor_slots(spec)
    try:
        model = meta_model(spec, dtype, model_cls, load_in_4bit)
    except (RuntimeError, ValueError, TypeError, OverflowError) as exc:
        if isinstance(exc, VelotuneError):
            raise
        # Sizes whose products overflow even a shape-only (meta) tensor: no checkpoint can back them.
        raise ConfigError(f"{folder}/config.json gives sizes no model can have ({exc}).") from exc
    # Only safetensors checkpoints are read as pre-quantized (see load_weights).
    quantized = quantized_weight_names(inventory) if prequantized and files.format == "safetensors" else set()
    check_checkpoint_fits(model, folder, slots, inventory, quantized)
    model = model.to_empty(device=device)
    load_weights(model, folder, slots, progress=progress, prequantized=prequantized)
    model.max_seq_length = max_seq_length
    model.config_dict = cfg
    model.name_or_path = folder
    model.eval()
    return model
