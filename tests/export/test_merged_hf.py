"""A merged 16-bit export is a standard Hugging Face folder: Transformers loads it with the original
tensor names and layout, and its logits equal velotune's."""

import json
import os

import pytest
import torch
import transformers
from safetensors import safe_open

import velotune
from tests.model_zoo import FAMILY_CONFIGS, VOCAB, rel_err, save_hf_model, shard_count
from velotune.errors import ConfigError
from velotune.export import merged_hf
from velotune.export.merged_hf import parse_size, save_merged_16bit


def tensor_table(folder: str) -> dict[str, tuple]:
    table = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                for key in f.keys():
                    table[key] = tuple(f.get_slice(key).get_shape())
    return table


def perturbed_model(folder: str, seed: int = 1):
    """Loaded, then changed in place, so that an export which copied the source files would fail."""
    model, _ = velotune.FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32, device_map="cpu",
                                                          progress=False)  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def hf_logits(folder: str, ids: torch.Tensor) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        return hf(ids).logits


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_transformers_loads_the_export_with_equal_logits_and_original_names(family, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    save_hf_model(family, str(src))
    model = perturbed_model(src)
    save_merged_16bit(model, str(out), max_shard_size="30KB")

    assert tensor_table(str(out)) == tensor_table(str(src))
    assert shard_count(str(out)) > 1
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids).logits
    assert rel_err(hf_logits(str(out), ids), ours) < 1e-5

    exported, original = (json.load(open(f / "config.json")) for f in (out, src))
    assert exported == original  # float32 model, float32 export: nothing to change
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")], "temporary folder left behind"


def test_export_casts_to_bfloat16_and_records_it_in_the_config(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    save_hf_model("qwen2", str(src))
    model = perturbed_model(src)
    save_merged_16bit(model, str(out), dtype=torch.bfloat16)
    assert json.load(open(out / "config.json"))["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
    assert embed.dtype == torch.bfloat16
    assert torch.equal(embed, model.embed_tokens.weight.detach().to(torch.bfloat16))
    assert not (out / "model.safetensors.index.json").exists()  # one shard: no index, as Transformers does


def test_tokenizer_and_generation_config_travel_with_the_weights(tmp_path):
    from velotune.quickstart import build_tokenizer

    src, out = tmp_path / "src", tmp_path / "out"
    save_hf_model("llama", str(src))
    build_tokenizer(str(src))
    model = perturbed_model(src)
    save_merged_16bit(model, str(out))  # no tokenizer object: the source folder's files are copied
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert (
        tok("A LoRA adapter").input_ids
        == transformers.AutoTokenizer.from_pretrained(str(src))("A LoRA adapter").input_ids
    )
    gen = json.load(open(out / "generation_config.json"))
    assert gen["eos_token_id"] == 2 and gen["bos_token_id"] == 1


def test_saving_over_an_earlier_export_removes_its_stale_shards_and_keeps_other_files(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    save_hf_model("llama", str(src))
    model = perturbed_model(src)
    save_merged_16bit(model, str(out), max_shard_size="10KB")
    many = shard_count(str(out))
    (out / "notes.txt").write_text("mine")
    save_merged_16bit(model, str(out), max_shard_size="1GB")
    assert shard_count(str(out)) == 1 < many
    assert not (out / "model.safetensors.index.json").exists()
    assert (out / "notes.txt").read_text() == "mine"
    ids = torch.tensor([[5, 9, 33, 4]])
    with torch.no_grad():
        assert rel_err(hf_logits(str(out), ids), model(ids).logits) < 1e-5


def test_a_failed_export_leaves_no_folder_behind(tmp_path, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    save_hf_model("llama", str(src))
    model = perturbed_model(src)
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(tensors, path, metadata=metadata)

    from safetensors.torch import save_file

    monkeypatch.setattr(merged_hf, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_merged_16bit(model, str(out), max_shard_size="10KB")
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_shard_sizes_read_like_transformers():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size(1234) == 1234
    with pytest.raises(ConfigError, match="not a size"):
        parse_size("lots")
