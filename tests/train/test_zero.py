"""DeepSpeed's config through velotune (velotune.train.zero): what is filled in from the training settings, what
is refused and why, and a one-process ZeRO run of `velotune train` as the `deepspeed` launcher starts it. The
2-rank runs against one process are in test_distributed.py."""

import json
import os

import pytest
import torch

from tests.model_zoo import save_hf_model
from velotune.errors import ConfigError
from velotune.train import zero
from velotune.train.distributed import Parallel, Ranks

SETTINGS = dict(
    batch_size=2, accumulation=4, world_size=8, max_grad_norm=1.0, mixed_precision="no", optim="adamw"
)


def build(config, **changes):
    return zero.build_config(config, **{**SETTINGS, **changes})


def test_auto_and_missing_values_are_filled_from_the_training_settings():
    config = build({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
                    "gradient_clipping": "auto", "bf16": {"enabled": "auto"}})  # fmt: skip
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 2 * 4 * 8
    assert config["gradient_clipping"] == 1.0
    assert config["bf16"] == {"enabled": False}
    assert build({"bf16": {"enabled": "auto"}}, mixed_precision="bf16")["bf16"] == {"enabled": True}
    assert build({}, max_grad_norm=None)["gradient_clipping"] == 0.0
    # Values that agree with the training settings are kept; the caller's dict is not changed.
    given = {"train_batch_size": 64, "gradient_accumulation_steps": 4, "zero_optimization": {"stage": 3}}
    assert build(given)["train_batch_size"] == 64 and "train_micro_batch_size_per_gpu" not in given


@pytest.mark.parametrize(
    "config, says",
    [
        ({"train_micro_batch_size_per_gpu": 4}, "training.batch_size"),
        ({"gradient_accumulation_steps": 1}, "gradient_accumulation_steps"),
        ({"train_batch_size": 32}, "world size"),
        ({"gradient_clipping": 0.5}, "max_grad_norm"),
        ({"optimizer": {"type": "AdamW"}}, "'optimizer' section"),
        ({"scheduler": {"type": "WarmupLR"}}, "'scheduler' section"),
        ({"zero_optimization": {"stage": 4}}, "stage=4"),
        ([1, 2], "JSON object"),
    ],
)
def test_a_config_that_contradicts_the_training_settings_is_refused_with_what_to_change(config, says):
    with pytest.raises(ConfigError, match=says):
        build(config)


def test_fp16_autocast_and_8bit_adam_are_refused_with_deepspeeds_own_way_named():
    with pytest.raises(ConfigError, match='"fp16": {"enabled": true}'):
        build({}, mixed_precision="fp16")
    with pytest.raises(ConfigError, match="optim: adamw"):
        build({}, optim="adamw_8bit")


def test_the_config_file_is_read_and_a_missing_or_broken_one_is_named(tmp_path):
    good, broken = tmp_path / "ds.json", tmp_path / "broken.json"
    good.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    broken.write_text("{'stage': 3")
    assert zero.stage_of(build(str(good))) == 3
    with pytest.raises(ConfigError, match="not valid JSON"):
        build(str(broken))
    with pytest.raises(ConfigError, match="no such file"):
        build(str(tmp_path / "missing.json"))


def test_a_deepspeed_config_with_another_parallel_strategy_is_refused():
    with pytest.raises(ConfigError, match="parallel: auto"):
        Parallel("fsdp", Ranks(0, 2, 0), deepspeed={"zero_optimization": {"stage": 2}})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    save_hf_model("llama", str(path), seed=0)
    return str(path)


@pytest.mark.parametrize("what", ["checkpointing", "4-bit"])
def test_zero3_refuses_gradient_checkpointing_and_a_4bit_base_and_points_to_fsdp2(folder, what):
    import velotune

    model, _ = velotune.FastLanguageModel.from_pretrained(
        folder, dtype=torch.float32, device_map="cpu", max_seq_length=64, progress=False,
        load_in_4bit=what == "4-bit",
    )  # fmt: skip
    model = velotune.FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=what != "4-bit")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ConfigError, match="parallel: fsdp"):
        zero.initialize(model, optimizer, {"zero_optimization": {"stage": 3}})


@pytest.fixture
def one_process_ds_environment(monkeypatch):
    """The `deepspeed` launcher's environment for one process, on CPU without DeepSpeed's compiled all-reduce
    (see distributed_worker.without_shared_memory_all_reduce)."""
    from tests.train.distributed_worker import without_shared_memory_all_reduce

    for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", DS_ACCELERATOR="cpu").items():
        monkeypatch.setenv(name, value)
    without_shared_memory_all_reduce()


def test_velotune_train_runs_zero2_from_the_yaml_on_one_process_like_the_plain_trainer(
    tmp_path, one_process_ds_environment
):
    import transformers

    from tests.train.helpers import build_tokenizer
    from velotune.cli import main

    model_dir = str(tmp_path / "tiny")
    tok = build_tokenizer()
    tok.save_pretrained(model_dir)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id)  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    ds = tmp_path / "ds_config.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}))
    example = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "velotongue_lora.yaml")

    def train(out, *more):
        return main(["train", example, f"--model.name={model_dir}", f"--training.output_dir={out}", "--lora.r=4",
                     "--training.max_steps=2", "--training.save_steps=0", "--training.eval_steps=0",
                     "--training.progress=false", "--training.logging_steps=1", *more])  # fmt: skip

    assert train(tmp_path / "plain") == 0
    # The launcher appends --local_rank=N to the command.
    assert train(tmp_path / "zero2", f"--training.deepspeed={ds}", "--local_rank=0") == 0
    logs = [[json.loads(line) for line in open(tmp_path / run / "log.jsonl")] for run in ("plain", "zero2")]
    losses = [[r["loss"] for r in log if "loss" in r] for log in logs]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-6)
