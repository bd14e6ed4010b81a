"""Adapter folders are untrusted input: a broken or hostile adapter_config.json or weight file fails
with an AdapterError naming the file, a pickle runs no code, and adapter names cannot be paths."""

import os
import shutil

import pytest
import torch

import velotune
from tests.lora.helpers import load_ours
from tests.model_zoo import save_hf_model
from velotune.errors import AdapterError
from velotune.lora.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_PICKLE


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(base folder, adapter folder) of a small llama with a velotune-saved LoRA adapter."""
    folder = str(tmp_path_factory.mktemp("llama"))
    save_hf_model("llama", folder)
    model = velotune.FastLanguageModel.get_peft_model(load_ours(folder), r=4, use_gradient_checkpointing=False)
    adapter = os.path.join(folder, "adapter")
    model.save_pretrained(adapter)
    return folder, adapter


@pytest.fixture
def adapter_copy(saved, tmp_path):
    dst = str(tmp_path / "adapter")
    shutil.copytree(saved[1], dst)
    return dst


def load_into_base(saved, adapter: str):
    return load_ours(saved[0]).load_adapter(adapter)


def test_the_untouched_adapter_loads(saved, adapter_copy):
    load_into_base(saved, adapter_copy)


@pytest.mark.parametrize(
    "content, pattern",
    [
        (b"\xff\xfe{}", "not valid UTF-8 JSON"),
        (b"[" * 100_000, "not valid UTF-8 JSON"),
        (b"[1, 2]", "must hold a JSON object"),
        (b'{"r": "four"}', "r='four' must be a positive integer"),
        (b'{"r": -4}', "must be a positive integer"),
        (b'{"r": 4, "rank_pattern": [1]}', "rank_pattern must be a JSON object"),
        (b'{"r": 4, "lora_dropout": "high"}', "cannot use"),
        (b'{"r": 4, "base_model_name_or_path": 7}', "base_model_name_or_path must be a string"),
    ],
)
def test_a_broken_adapter_config_is_an_adapter_error_naming_the_file(saved, adapter_copy, content, pattern):
    with open(os.path.join(adapter_copy, ADAPTER_CONFIG), "wb") as f:
        f.write(content)
    with pytest.raises(AdapterError, match=pattern) as err:
        load_into_base(saved, adapter_copy)
    assert ADAPTER_CONFIG in str(err.value)


@pytest.mark.parametrize("damage", ["truncate", "huge_header", "garbage"])
def test_a_corrupt_adapter_weight_file_is_an_adapter_error(saved, adapter_copy, damage):
    path = os.path.join(adapter_copy, ADAPTER_WEIGHTS)
    raw = open(path, "rb").read()
    raw = {"truncate": raw[: len(raw) // 2], "huge_header": (2**62).to_bytes(8, "little") + raw[8:],
           "garbage": b"\x00" * 7}[damage]  # fmt: skip
    with open(path, "wb") as f:
        f.write(raw)
    with pytest.raises(AdapterError, match=ADAPTER_WEIGHTS):
        load_into_base(saved, adapter_copy)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_a_pickled_adapter_with_code_is_refused_without_running_it(saved, adapter_copy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.remove(os.path.join(adapter_copy, ADAPTER_WEIGHTS))
    torch.save({"x.lora_A.weight": _Exploit()}, os.path.join(adapter_copy, ADAPTER_WEIGHTS_PICKLE))
    with pytest.raises(AdapterError, match="could not be read safely"):
        load_into_base(saved, adapter_copy)
    assert not (tmp_path / "pwned.txt").exists()


def test_a_pickled_adapter_that_is_not_a_tensor_map_is_refused(saved, adapter_copy):
    os.remove(os.path.join(adapter_copy, ADAPTER_WEIGHTS))
    torch.save([torch.zeros(2)], os.path.join(adapter_copy, ADAPTER_WEIGHTS_PICKLE))
    with pytest.raises(AdapterError, match="mapping of names to tensors"):
        load_into_base(saved, adapter_copy)


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "a/b", "..", "", "..\\x", 3])
def test_an_adapter_name_that_is_a_path_is_refused(saved, adapter_copy, name):
    with pytest.raises(AdapterError, match="adapter_name"):
        load_ours(saved[0]).load_adapter(adapter_copy, adapter_name=name)


def test_a_plain_adapter_name_is_accepted(saved, adapter_copy):
    load_ours(saved[0]).load_adapter(adapter_copy, adapter_name="my-adapter.v2")
