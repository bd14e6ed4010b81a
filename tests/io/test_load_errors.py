"""Bad model folders fail fast, naming the file and the problem."""

import json
import logging
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import velotune
from velotune.errors import CheckpointError, ConfigError, UnsupportedModelError
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


# ------------------------------------------------------------------ hostile config.json values


def edit_config(folder: str, **changes) -> None:
    path = os.path.join(folder, "config.json")
    cfg = json.load(open(path))
    cfg.update(changes)
    json.dump(cfg, open(path, "w"))


@pytest.fixture
def no_allocation(monkeypatch):
    """Fails the test if the loader allocates the model (to_empty) at all."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("the loader allocated the model before refusing the checkpoint")

    monkeypatch.setattr(torch.nn.Module, "to_empty", refuse)


@pytest.mark.parametrize(
    "key, value, pattern",
    [
        ("vocab_size", 10**12, r"(embed_tokens|lm_head)\.weight has shape \[101, 48\] but config\.json implies \[1000000000000, 48\]"),
        ("hidden_size", 10**9, r"has shape .* but config\.json implies"),
        ("intermediate_size", 10**10, r"mlp\.(gate|up|down)_proj\.weight has shape"),
        ("num_attention_heads", 3 * 10**6, r"self_attn\.[qo]_proj\.weight has shape"),
    ],
)
def test_a_config_larger_than_its_weights_fails_before_allocating(copy_of, no_allocation, key, value, pattern):
    folder = copy_of()
    edit_config(folder, **{key: value})
    with pytest.raises(CheckpointError, match=pattern):
        load(folder)


@pytest.mark.parametrize(
    "key, value, pattern",
    [
        ("hidden_size", -48, "hidden_size must be a positive integer"),
        ("vocab_size", 0, "vocab_size must be a positive integer"),
        ("num_hidden_layers", "2", "num_hidden_layers must be a positive integer"),
        ("intermediate_size", 72.0, "intermediate_size must be a positive integer"),
        ("num_key_value_heads", True, "num_key_value_heads must be a positive integer"),
        ("rms_norm_eps", float("nan"), "rms_norm_eps must be a non-negative finite number"),
        ("rope_scaling", [1, 2], "rope_scaling must be a JSON object"),
        ("num_hidden_layers", 10**9, "num_hidden_layers=1000000000 is beyond any real model"),
    ],
)
def test_a_config_value_of_the_wrong_type_or_range_is_named(copy_of, no_allocation, key, value, pattern):
    folder = copy_of()
    edit_config(folder, **{key: value})
    with pytest.raises(ConfigError, match=pattern):
        load(folder)


def test_a_config_value_the_family_cannot_use_is_a_config_error(copy_of, no_allocation):
    folder = copy_of()
    edit_config(folder, rope_parameters={"rope_type": "llama3", "factor": "eight", "rope_theta": 1e4})
    with pytest.raises(ConfigError, match="cannot use"):
        load(folder)


@pytest.mark.parametrize("content", [b"\xff\xfe{}", b'{"model_type": ' * 50000, b"[1, 2]", b""])
def test_a_config_that_is_not_a_utf8_json_object_is_refused(copy_of, content):
    folder = copy_of()
    with open(os.path.join(folder, "config.json"), "wb") as f:
        f.write(content)
    with pytest.raises(ConfigError, match="config.json"):
        load(folder)


# ------------------------------------------------------------------ shard index names


@pytest.mark.parametrize(
    "shard", ["../outside.safetensors", "../../x", "/etc/passwd", "sub/model.safetensors", "..\\x", "", "..", 7, None]
)
def test_a_shard_name_that_is_not_a_plain_file_name_is_refused(llama_folder, tmp_path, shard):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(os.path.join(llama_folder, "config.json"), folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": shard}}))
    with pytest.raises(CheckpointError, match="names shard"):
        load(str(folder))


@pytest.mark.parametrize("index", [{"weight_map": ["a"]}, {"no_map": {}}, [1], "x"])
def test_a_malformed_shard_index_is_refused(llama_folder, tmp_path, index):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(os.path.join(llama_folder, "config.json"), folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="weight_map"):
        load(str(folder))


# ------------------------------------------------------------------ safetensors header rules


def write_safetensors(path, header, data: bytes) -> str:
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + data)
    return str(path)


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


@pytest.mark.parametrize(
    "header, data, pattern",
    [
        ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, 12, "overlaps"),
        ({"a": entry("F32", [2], 4, 12)}, 12, "gap"),
        ({"a": entry("F32", [2], 0, 8)}, 12, "end at data byte 8"),
        ({"a": entry("F32", [3], 0, 8)}, 8, "needs 12 bytes"),
        ({"a": entry("F32", [2], 8, 0)}, 8, "lies at bytes"),
        ({"a": entry("F32", [2], 0, 16)}, 8, "lies at bytes"),
        ({"a": entry("Q4", [2], 0, 8)}, 8, "dtype 'Q4'"),
        ({"a": entry(["F32"], [2], 0, 8)}, 8, "dtype"),
        ({"a": entry("U8", [True], 0, 1)}, 1, "invalid shape"),
        ({"a": entry("U8", [-1], 0, 1)}, 1, "invalid shape"),
        ({"a": entry("U8", 1, 0, 1)}, 1, "invalid shape"),
        ({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 2]}}, 1, "data_offsets"),
        ({"a": {"dtype": "U8", "shape": [1]}}, 1, "malformed header entry"),
        ({"a": "U8"}, 1, "malformed header entry"),
        ({"__metadata__": {"format": 1}}, 0, "__metadata__"),
        ({"a": entry("U8", [2**40, 2**40, 0], 0, 0), "b": entry("U8", [2**62, 2**62], 0, 1)}, 1, "needs"),
    ],
)
def test_a_header_breaking_a_safetensors_rule_is_refused(tmp_path, header, data, pattern):
    from velotune.io.safetensors_reader import read_header

    path = write_safetensors(tmp_path / "x.safetensors", header, b"\0" * data)
    with pytest.raises(CheckpointError, match=pattern):
        read_header(path)


def test_a_header_the_reader_accepts_is_read_back_tensor_by_tensor(tmp_path):
    from velotune.io.safetensors_reader import iter_tensors, read_header

    header = {"__metadata__": {"format": "pt"}, "empty": entry("F32", [0, 3], 0, 0),
              "b": entry("I16", [3], 8, 14), "a": entry("F32", [2], 0, 8), "s": entry("U8", [], 14, 15)}  # fmt: skip
    path = write_safetensors(tmp_path / "x.safetensors", header, bytes(range(15)))
    assert set(read_header(path)) == {"empty", "a", "b", "s"}
    shapes = {name: tuple(t.shape) for name, t in iter_tensors(path)}
    assert shapes == {"empty": (0, 3), "a": (2,), "b": (3,), "s": ()}
