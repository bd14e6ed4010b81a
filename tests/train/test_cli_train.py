"""`velotune train config.yaml`: the example configs are valid, training runs, mistakes fail early and say where."""

import glob
import json
import os

import pytest
import torch
import transformers

import velotune
from tests.train.helpers import build_tokenizer
from velotune.cli import main
from velotune.errors import ConfigError
from velotune.train.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "velotongue_lora.yaml")
TRAIN = os.path.join(ROOT, "velotune", "quickstart_data", "train.jsonl")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama with a real tokenizer (chatml markers included) in a Hugging Face folder."""
    folder = str(tmp_path_factory.mktemp("tiny"))
    tok = build_tokenizer()
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def quick(model_dir, out, *more):
    return ["train", EXAMPLE, f"--model.name={model_dir}", f"--training.output_dir={out}", "--training.max_steps=3",
            "--training.save_steps=0", "--training.eval_steps=0", "--training.progress=false", *more]  # fmt: skip


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "examples", "*.yaml"))))
def test_every_example_config_is_valid(path):
    config = load_config(path)
    assert config.model.name and config.data.train


def test_the_cli_trains_from_the_example_yaml_with_full_finetuning(model_dir, tmp_path, capsys):
    assert main(quick(model_dir, tmp_path, "--model.full_finetuning=true")) == 0
    with open(tmp_path / "log.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if "loss" in r] == [3]
    assert any("eval_loss" in r for r in records)  # the example has eval data: evaluated at the end
    assert os.path.isfile(tmp_path / "trainable.safetensors")
    assert "saved the trained result" in capsys.readouterr().out


def test_the_cli_trains_a_lora_adapter_in_peft_format(model_dir, tmp_path):
    assert main(quick(model_dir, tmp_path, "--lora.r=4", "--training.save_steps=3")) == 0
    assert os.path.isfile(tmp_path / "adapter_config.json") and os.path.isfile(
        tmp_path / "adapter_model.safetensors"
    )
    assert os.path.isfile(tmp_path / "checkpoint-3" / "adapter_model.safetensors")


def test_overrides_win_and_yaml_style_numbers_are_read(tmp_path):
    config = load_config(EXAMPLE, ["--training.learning_rate=2e-4", "--lora.target_modules=[q_proj, v_proj]"])
    assert config.training.learning_rate == 2e-4 and config.lora.target_modules == ["q_proj", "v_proj"]


def test_an_unknown_key_names_its_line_and_the_closest_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "model:\n  name: x\ndata:\n  train: t.jsonl\ntraining:\n  batch_size: 2\n  learning_rat: 1.0e-4\n"
    )
    with pytest.raises(
        ConfigError, match=r"bad\.yaml line 7: unknown key 'learning_rat'; did you mean 'learning_rate'"
    ):
        load_config(str(path))


def test_a_value_of_the_wrong_type_names_its_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name: x\ndata:\n  train: t.jsonl\ntraining:\n  batch_size: two\n")
    with pytest.raises(ConfigError, match=r"line 6: expected int, got 'two'"):
        load_config(str(path))


def test_a_missing_data_file_fails_before_the_model_loads(model_dir, tmp_path, monkeypatch, capsys):
    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(velotune.FastLanguageModel, "from_pretrained", must_not_load)
    assert main(quick(model_dir, tmp_path, f"--data.train={tmp_path / 'missing.jsonl'}")) == 2
    assert "DataError: data file not found" in capsys.readouterr().err


def test_a_row_without_the_expected_field_fails_naming_its_line(model_dir, tmp_path, monkeypatch, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text(open(TRAIN).readline() + json.dumps({"conversation": []}) + "\n")
    monkeypatch.setattr(velotune.FastLanguageModel, "from_pretrained", None)
    assert main(quick(model_dir, tmp_path, f"--data.train={data}")) == 2
    assert "rows.jsonl line 2: missing field 'messages'" in capsys.readouterr().err


def test_sigterm_stops_velotune_train_with_a_checkpoint_and_the_flag_that_resumes_it(
    model_dir, tmp_path, monkeypatch, capsys
):
    import signal

    from velotune.train.callbacks import JsonlLogger

    def signal_after_step_2(self, trainer):
        if trainer.state["global_step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(JsonlLogger, "on_step_end", signal_after_step_2)
    resume, run = (
        "--resume_from_checkpoint=true",
        ("--lora.r=4", "--training.max_steps=4", "--training.logging_steps=1"),
    )
    assert main(quick(model_dir, tmp_path, *run)) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after step 2 of 4" in err and resume in err
    assert os.path.isdir(tmp_path / "checkpoint-2")
    assert not os.path.exists(tmp_path / "adapter_model.safetensors")  # no "trained result" from half a run

    monkeypatch.undo()
    assert main(quick(model_dir, tmp_path, *run, resume)) == 0
    with open(tmp_path / "log.jsonl") as f:
        assert [r["step"] for r in map(json.loads, f) if "loss" in r] == [1, 2, 3, 4]
    assert os.path.isfile(tmp_path / "adapter_model.safetensors")


def test_data_overlong_is_read_from_the_yaml_and_error_refuses_long_rows_before_the_model_loads(
    model_dir, tmp_path, monkeypatch, capsys
):
    assert load_config(EXAMPLE).data.overlong == "truncate"
    monkeypatch.setattr(velotune.FastLanguageModel, "from_pretrained", None)
    args = quick(model_dir, tmp_path, "--model.max_seq_length=4", "--data.overlong=error")
    assert main(args) == 2
    assert "longer than max_seq_length=4: train.jsonl line 1" in capsys.readouterr().err
