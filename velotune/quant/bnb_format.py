"""bitsandbytes' pre-quantized 4-bit checkpoint layout, read and written without bitsandbytes.

Transformers saves a model loaded with `BitsAndBytesConfig(load_in_4bit=True)` with
`config.json["quantization_config"]["quant_method"] == "bitsandbytes"`, and every quantized
`<module>.weight` as six tensors:

    <module>.weight                                  uint8 [ceil(n / 2), 1]  packed codes (or the same
                                                     bytes viewed as `bnb_4bit_quant_storage`)
    <module>.weight.absmax                           uint8 [blocks] (double quant) or float32 [blocks]
    <module>.weight.quant_map                        float32 [16]   the NF4 table
    <module>.weight.nested_absmax                    float32 [ceil(blocks / 256)]   (double quant only)
    <module>.weight.nested_quant_map                 float32 [256]  (double quant only)
    <module>.weight.quant_state.bitsandbytes__nf4    uint8 [k]: UTF-8 JSON {quant_type, blocksize,
                                                     dtype, shape, nested_blocksize, nested_dtype,
                                                     nested_offset}

This module is the one place that spells those names and keys.
"""

from __future__ import annotations

import json

import torch

from velotune.errors import CheckpointError, UnsupportedModelError
from velotune.quant.nf4 import NF4Tensor

QUANT_METHOD = "bitsandbytes"
QUANT_STATE_PREFIX = "quant_state.bitsandbytes__"
NF4_STATE = QUANT_STATE_PREFIX + "nf4"
COMPANIONS = (
    "absmax",
    "quant_map",
    "nested_absmax",
    "nested_quant_map",
    NF4_STATE,
    QUANT_STATE_PREFIX + "fp4",
)
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def is_bnb_quantized(config: dict) -> bool:
    qc = config.get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def check_bnb_config(config: dict, source: str) -> None:
    """Raises unless config.json describes a 4-bit NF4 bitsandbytes checkpoint velotune can load."""
    qc = config["quantization_config"]
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise UnsupportedModelError(
            f"{source} holds bitsandbytes 8-bit (LLM.int8) weights, which velotune does not load yet; use the "
            "16-bit checkpoint (with load_in_4bit=True to quantize it on load)."
        )
    quant_type = qc.get("bnb_4bit_quant_type", "fp4")
    if quant_type != "nf4":
        raise UnsupportedModelError(
            f"{source} holds bitsandbytes {quant_type!r} 4-bit weights; velotune reads NF4 only. Use an NF4 or a "
            "16-bit checkpoint (with load_in_4bit=True)."
        )


def split_name(name: str) -> tuple[str, str]:
    """('<module>.weight', companion suffix) for a companion tensor, (name, '') for any other."""
    for suffix in COMPANIONS:
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1], suffix
    return name, ""


def decode_quant_state(tensor: torch.Tensor, name: str = "quant_state") -> dict:
    """The JSON object bitsandbytes packs, one UTF-8 byte per uint8 element."""
    try:
        state = json.loads(bytes(tensor.to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{name} does not hold a bitsandbytes quant state (UTF-8 JSON): {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{name} holds JSON that is not an object; the checkpoint is corrupt.")
    return state


def encode_quant_state(state: dict) -> torch.Tensor:
    # json.dumps' default separators, as bitsandbytes writes it, so the bytes are the same.
    return torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)


def nf4_from_bnb(name: str, parts: dict[str, torch.Tensor]) -> NF4Tensor:
    """Builds the NF4 tensor of `name` from its tensors keyed by companion suffix ('' = packed weight)."""
    missing = [s for s in ("", "absmax", "quant_map") if s not in parts]
    state_keys = [s for s in parts if s.startswith(QUANT_STATE_PREFIX)]
    if not state_keys:
        missing.append(NF4_STATE)
    if missing:
        raise CheckpointError(
            f"quantized tensor {name} lacks {', '.join(name + '.' + s if s else name for s in missing)}."
        )
    if state_keys != [NF4_STATE]:
        raise UnsupportedModelError(
            f"{name} is quantized as {state_keys}; velotune reads bitsandbytes NF4 only."
        )
    state = decode_quant_state(parts[NF4_STATE], f"{name}.{NF4_STATE}")
    try:
        shape = torch.Size(int(d) for d in state["shape"])
        dtype = _DTYPE_NAMES[state["dtype"]]
        blocksize = int(state["blocksize"])
        nested = "nested_offset" in state
        nested_blocksize = int(state["nested_blocksize"]) if nested else 256
        offset = torch.tensor(float(state["nested_offset"]), dtype=torch.float32) if nested else None
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{name}: malformed bitsandbytes quant state {state} ({exc!r}).") from exc
    if state.get("quant_type") != "nf4":
        raise UnsupportedModelError(
            f"{name} is quantized as {state.get('quant_type')!r}; velotune reads NF4 only."
        )
    if nested and ("nested_absmax" not in parts or "nested_quant_map" not in parts):
        raise CheckpointError(
            f"quantized tensor {name} is double-quantized but lacks its nested_absmax/nested_quant_map."
        )
    data = parts[""].contiguous()
    # bnb_4bit_quant_storage other than uint8 stores the same bytes under another dtype.
    data = data.view(torch.uint8).reshape(-1) if data.dtype != torch.uint8 else data.reshape(-1)
    try:
        return NF4Tensor(
            data=data,
            absmax=parts["absmax"].reshape(-1),
            code=parts["quant_map"].float().reshape(-1),
            shape=shape,
            dtype=dtype,
            blocksize=blocksize,
            nested_absmax=parts["nested_absmax"].float().reshape(-1) if nested else None,
            nested_code=parts["nested_quant_map"].float().reshape(-1) if nested else None,
            nested_offset=offset,
            nested_blocksize=nested_blocksize,
        )
    except Exception as exc:
        raise CheckpointError(f"quantized tensor {name} is inconsistent: {exc}") from exc


def nf4_to_bnb(name: str, q: NF4Tensor) -> dict[str, torch.Tensor]:
    """The checkpoint tensors (full names) that store `q` as `name` in bitsandbytes' layout."""
    state = {
        "quant_type": "nf4",
        "blocksize": q.blocksize,
        "dtype": str(q.dtype).removeprefix("torch."),
        "shape": list(q.shape),
    }
    out = {name: q.data.reshape(-1, 1), f"{name}.absmax": q.absmax, f"{name}.quant_map": q.code}
    if q.double_quant:
        out[f"{name}.nested_absmax"] = q.nested_absmax
        out[f"{name}.nested_quant_map"] = q.nested_code
        state.update(nested_blocksize=q.nested_blocksize, nested_dtype="float32",
                     nested_offset=float(q.nested_offset.item()))  # fmt: skip
    out[f"{name}.{NF4_STATE}"] = encode_quant_state(state)
    return out


def quantization_config(compute_dtype: torch.dtype, double_quant: bool = True, skip_modules=None) -> dict:
    """config.json's `quantization_config` for NF4 weights, as Transformers writes it."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": QUANT_METHOD,
    }


def quantized_weight_names(names) -> set[str]:
    """The weights stored quantized, among a checkpoint's tensor names: those with companions."""
    return {base for base, suffix in map(split_name, names) if suffix}


class NF4Collector:
    """Gathers the parts of quantized weights while a checkpoint streams by (they may sit in
    different shards). Feed it the companions and the packed weights named by
    `quantized_weight_names`; `add` returns (weight name, NF4Tensor) once a weight is complete.
    """

    def __init__(self) -> None:
        self._pending: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> tuple[str, NF4Tensor] | None:
        base, suffix = split_name(name)
        parts = self._pending.setdefault(base, {})
        parts[suffix] = tensor
        states = [s for s in parts if s.startswith(QUANT_STATE_PREFIX)]
        if "" not in parts or not states:
            return None
        needed = {"", "absmax", "quant_map"}
        if "nested_offset" in decode_quant_state(parts[states[0]], f"{base}.{states[0]}"):
            needed |= {"nested_absmax", "nested_quant_map"}
        if not needed <= parts.keys():
            return None
        del self._pending[base]
        return base, nf4_from_bnb(base, parts)

    def incomplete(self) -> dict[str, list[str]]:
        """Weights some of whose parts arrived but not all: {weight name: suffixes present}."""
        return {base: sorted(parts) for base, parts in self._pending.items()}
