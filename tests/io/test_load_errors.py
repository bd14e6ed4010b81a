"""Bad model folders fail fast, naming the file and the problem."""

import json
import logging
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import velotune
from velotune.errors import CheckpointError, UnsupportedModelError
from tests.model_zoo import random_batch, rel_err, save_hf_model


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    save_hf_model("llama", str(folder))
    return str(folder)


@pytest.fixture
def copy_of(llama_folder, tmp_path):
    def make() -> str:
        dst = str(tmp_path / "copy")
        shutil.copytree(llama_folder, dst)
        return dst

    return make


def load(folder):
    return velotune.FastLanguageModel.from_pretrained(folder, dtype=torch.float32, device_map="cpu", progress=False)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load(str(tmp_path))


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        load(str(tmp_path / "nope"))


def test_unknown_model_type_lists_supported_ones(copy_of):
    folder = copy_of()
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg["model_type"] = "gpt_bigcode"
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(UnsupportedModelError, match="gpt_bigcode") as err:
        load(folder)
    for family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral"):
        assert family in str(err.value)


def test_missing_shard_is_named(copy_of):
    folder = copy_of()
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
    victim = sorted(set(index["weight_map"].values()))[1]
    os.remove(os.path.join(folder, victim))
    with pytest.raises(CheckpointError, match=victim):
        load(folder)


def test_truncated_shard_is_named(copy_of):
    folder = copy_of()
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
    victim = os.path.join(folder, sorted(set(index["weight_map"].values()))[0])
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match="truncated"):
        load(folder)


def test_corrupt_header_is_reported(copy_of):
    folder = copy_of()
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
    victim = os.path.join(folder, sorted(set(index["weight_map"].values()))[0])
    with open(victim, "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe not json")
    with pytest.raises(CheckpointError, match="corrupt|JSON"):
        load(folder)


def test_huge_header_length_does_not_allocate(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with open(folder / "model.safetensors", "wb") as f:
        f.write((2**62).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="header length"):
        from velotune.io.safetensors_reader import read_header

        read_header(str(folder / "model.safetensors"))


def test_tensor_shape_disagreeing_with_config_is_named(copy_of):
    folder = copy_of()
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg["intermediate_size"] = 64
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=r"mlp\.(gate|up|down)_proj\.weight.*shape"):
        load(folder)


def test_missing_tensor_is_reported(copy_of, tmp_path):
    folder = copy_of()
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg["num_hidden_layers"] = 3  # the weights hold two layers
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="lacks"):
        load(folder)


def test_missing_tokenizer_warns_and_model_still_loads(llama_folder, caplog):
    with caplog.at_level(logging.WARNING):
        model, tokenizer = load(llama_folder)
    assert tokenizer is None
    assert model is not None
    assert any("tokenizer" in r.message for r in caplog.records)


def test_trust_remote_code_is_refused(llama_folder):
    with pytest.raises(UnsupportedModelError, match="trust_remote_code"):
        velotune.FastLanguageModel.from_pretrained(llama_folder, trust_remote_code=True)


def test_pickled_checkpoint_loads_tensors_only(llama_folder, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(os.path.join(llama_folder, "config.json"), folder)
    reference, _ = load(llama_folder)
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_folder)
    torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    model, _ = load(str(folder))
    ids, _, _ = random_batch(1, 6, seed=3)
    with torch.no_grad():
        assert rel_err(model(input_ids=ids).logits, reference(input_ids=ids).logits) == 0.0


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_with_code_is_refused(llama_folder, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(os.path.join(llama_folder, "config.json"), folder)
    torch.save({"model.embed_tokens.weight": _Exploit()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safely"):
        load(str(folder))


def test_shard_path_escaping_the_folder_is_refused(llama_folder, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(os.path.join(llama_folder, "config.json"), folder)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "outside.safetensors"))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "../outside.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="outside"):
        load(str(folder))
