"""The `velotune plan` and `velotune export` commands run end to end on a tiny model folder."""

import torch
import transformers

from tests.model_zoo import random_batch, rel_err, save_hf_model
from velotune.cli import main


def test_plan_prints_an_estimate(tmp_path, capsys):
    save_hf_model("llama", str(tmp_path / "m"))
    assert main(["plan", str(tmp_path / "m"), "--method", "lora", "--batch", "1", "--seq", "64"]) == 0
    assert "GiB" in capsys.readouterr().out


def test_export_merged_folder_loads_in_transformers(tmp_path):
    hf = save_hf_model("qwen2", str(tmp_path / "m"))
    assert main(["export", str(tmp_path / "m"), "--to", "merged", "--out", str(tmp_path / "out"), "--dtype", "float32"]) == 0
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    ids, _, _ = random_batch(1, 7, seed=4)
    with torch.no_grad():
        assert rel_err(again(input_ids=ids).logits, hf(input_ids=ids).logits) < 1e-5
