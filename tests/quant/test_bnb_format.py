"""bitsandbytes' pre-quantized checkpoint layout: folders saved by Transformers + bitsandbytes read back
without bitsandbytes, and folders we write load in Transformers + bitsandbytes."""

import json
import os
import subprocess
import sys

import bitsandbytes.functional as bnbf
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.quant.helpers import hf_model, linear4bit_modules, save_transformers_4bit
from velotune.errors import CheckpointError, UnsupportedModelError
from velotune.quant.bnb_format import (
    NF4Collector,
    check_bnb_config,
    decode_quant_state,
    encode_quant_state,
    is_bnb_quantized,
    nf4_from_bnb,
    nf4_to_bnb,
    quantization_config,
    quantized_weight_names,
    split_name,
)
from velotune.quant.nf4 import dequantize_nf4_reference, quantize_nf4


@pytest.fixture(scope="module", params=[True, False], ids=["double_quant", "single_quant"])
def transformers_folder(request, tmp_path_factory):
    """A 4-bit folder saved by Transformers + bitsandbytes, and the model it was saved from."""
    return save_transformers_4bit(tmp_path_factory.mktemp("bnb"), double_quant=request.param)


_READ_WITHOUT_BNB = r"""
import json, sys
from safetensors import safe_open
from safetensors.torch import save_file
from velotune.quant.bnb_format import NF4Collector, check_bnb_config, is_bnb_quantized, quantized_weight_names
from velotune.quant.nf4 import dequantize_nf4

folder, out = sys.argv[1], sys.argv[2]
config = json.load(open(folder + "/config.json"))
assert is_bnb_quantized(config)
check_bnb_config(config, folder)
collector, values = NF4Collector(), {}
with safe_open(folder + "/model.safetensors", framework="pt") as f:
    quantized = quantized_weight_names(f.keys())
    for name in f.keys():
        if name.split(".weight")[0] + ".weight" in quantized:
            done = collector.add(name, f.get_tensor(name))
            if done:
                values[done[0]] = dequantize_nf4(done[1]).contiguous()
assert not collector.incomplete(), collector.incomplete()
assert "bitsandbytes" not in sys.modules, "reading a bitsandbytes folder imported bitsandbytes"
save_file(values, out)
"""


def test_transformers_saved_folder_reads_without_bitsandbytes_to_bitsandbytes_values(
    transformers_folder, tmp_path
):
    folder, model = transformers_folder
    out = tmp_path / "values.safetensors"
    subprocess.run([sys.executable, "-c", _READ_WITHOUT_BNB, str(folder), str(out)], check=True,
                   env={**os.environ, "PYTHONPATH": os.getcwd()})  # fmt: skip
    ours = load_file(out)
    modules = linear4bit_modules(model)
    assert sorted(ours) == sorted(f"{name}.weight" for name in modules) and len(modules) == 14
    for name, module in modules.items():
        expected = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
        assert torch.equal(ours[f"{name}.weight"], expected), name


def test_our_writer_gives_the_bytes_transformers_writes(transformers_folder):
    folder, model = transformers_folder
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        saved = {name: f.get_tensor(name) for name in f.keys()}
    collector = NF4Collector()
    for name in sorted(
        saved, key=lambda n: split_name(n)[1] == ""
    ):  # companions first: order must not matter
        if split_name(name)[0] in quantized_weight_names(saved):
            done = collector.add(name, saved[name])
            if done:
                for key, tensor in nf4_to_bnb(*done).items():
                    assert torch.equal(tensor, saved[key]) and tensor.dtype == saved[key].dtype, key
    assert not collector.incomplete()


def test_folder_we_write_loads_in_transformers_with_our_values(tmp_path):
    source = hf_model(seed=1)
    tensors, ours = {}, {}
    for name, p in source.state_dict().items():
        if name.endswith("proj.weight"):
            q = quantize_nf4(p)
            ours[name] = dequantize_nf4_reference(q)
            tensors.update(nf4_to_bnb(name, q))
        else:
            tensors[name] = p.contiguous()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = source.config.to_dict()
    config["quantization_config"] = quantization_config(torch.float32)
    (tmp_path / "config.json").write_text(json.dumps(config))

    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, device_map="cpu", dtype=torch.float32
    )
    modules = linear4bit_modules(loaded)
    assert len(modules) == 14
    for name, module in modules.items():
        assert torch.equal(
            bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state), ours[f"{name}.weight"]
        )
    assert torch.equal(loaded.model.embed_tokens.weight, source.model.embed_tokens.weight)


def test_quant_state_bytes_equal_bitsandbytes_packing():
    from bitsandbytes.utils import pack_dict_to_tensor

    w = torch.randn(64, 128)
    _, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    packed = state.as_dict(packed=True)
    blob = packed["quant_state.bitsandbytes__nf4"]
    decoded = decode_quant_state(blob)
    assert torch.equal(encode_quant_state(decoded), blob)
    assert torch.equal(encode_quant_state(decoded), pack_dict_to_tensor(decoded))
    parts = {"": torch.zeros(4096, 1, dtype=torch.uint8)} | {k: v for k, v in packed.items()}
    q = nf4_from_bnb("w", parts)
    assert q.shape == (64, 128) and q.dtype == torch.float32 and q.double_quant
    assert float(q.nested_offset) == float(state.offset)


def test_a_non_uint8_quant_storage_is_read_as_the_same_bytes():
    q = quantize_nf4(torch.randn(16, 64))
    tensors = nf4_to_bnb("w", q)
    tensors["w"] = tensors["w"].view(-1).view(torch.bfloat16).reshape(-1, 1)
    parts = {split_name(k)[1]: v for k, v in tensors.items()}
    assert torch.equal(nf4_from_bnb("w", parts).data, q.data)


def test_configs_and_names_are_recognised_and_bad_ones_refused():
    assert is_bnb_quantized({"quantization_config": quantization_config(torch.bfloat16)})
    assert not is_bnb_quantized({"quantization_config": {"quant_method": "gptq"}})
    assert not is_bnb_quantized({})
    check_bnb_config({"quantization_config": quantization_config(torch.bfloat16)}, "f")
    with pytest.raises(UnsupportedModelError, match="8-bit"):
        check_bnb_config({"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}, "f")
    with pytest.raises(UnsupportedModelError, match="fp4"):
        check_bnb_config({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                                  "bnb_4bit_quant_type": "fp4"}}, "f")  # fmt: skip
    assert split_name("m.q_proj.weight.quant_state.bitsandbytes__nf4") == (
        "m.q_proj.weight",
        "quant_state.bitsandbytes__nf4",
    )
    assert split_name("m.q_proj.weight.absmax") == ("m.q_proj.weight", "absmax")
    assert split_name("m.norm.weight") == ("m.norm.weight", "")
    assert quantized_weight_names(["a.weight", "a.weight.absmax", "b.weight"]) == {"a.weight"}


def test_missing_or_corrupt_parts_fail_with_the_tensor_name():
    q = quantize_nf4(torch.randn(8, 64))
    parts = {split_name(k)[1]: v for k, v in nf4_to_bnb("layer.w", q).items()}
    with pytest.raises(CheckpointError, match="layer.w lacks layer.w.absmax"):
        nf4_from_bnb("layer.w", {k: v for k, v in parts.items() if k != "absmax"})
    with pytest.raises(CheckpointError, match="nested_absmax"):
        nf4_from_bnb("layer.w", {k: v for k, v in parts.items() if k != "nested_absmax"})
    with pytest.raises(CheckpointError, match="UTF-8 JSON"):
        nf4_from_bnb(
            "layer.w", {**parts, "quant_state.bitsandbytes__nf4": torch.tensor([255, 0], dtype=torch.uint8)}
        )
    with pytest.raises(CheckpointError, match="inconsistent"):
        nf4_from_bnb("layer.w", {**parts, "": parts[""][:-3]})
    state = decode_quant_state(parts["quant_state.bitsandbytes__nf4"])
    with pytest.raises(UnsupportedModelError, match="fp4"):
        nf4_from_bnb(
            "layer.w",
            {**parts, "quant_state.bitsandbytes__nf4": encode_quant_state({**state, "quant_type": "fp4"})},
        )
    collector = NF4Collector()
    assert collector.add("layer.w.absmax", parts["absmax"]) is None
    assert collector.incomplete() == {"layer.w": ["absmax"]}
