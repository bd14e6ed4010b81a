"""Several processes (gloo, CPU, spawned through torchrun): 2 ranks x batch 2 train exactly as 1 rank x batch 4,
with DDP (LoRA) and FSDP2 (full fine-tuning), and a checkpoint written by 2 ranks resumes on 1."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.model_zoo import save_hf_model
from tests.train import distributed_worker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    save_hf_model("llama", str(path), seed=0)
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_spec(tmp_path, name, **spec) -> str:
    path = os.path.join(tmp_path, f"{name}.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    return path


def run_one_process(spec_path: str) -> None:
    distributed_worker.main(spec_path)


def run_two_processes(spec_path: str) -> None:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               os.path.join(ROOT, "tests", "train", "distributed_worker.py"), spec_path]  # fmt: skip
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:  # the ranks' own errors, without the launcher's warnings
        lines = [line for line in (done.stdout + done.stderr).splitlines() if "Warning" not in line]
        pytest.fail("torchrun failed:\n" + "\n".join(lines)[-12000:])


def losses(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_run(a_dir, b_dir, weights_file, tol=1e-6):
    log_a, log_b = losses(a_dir), losses(b_dir)
    assert [r["step"] for r in log_a] == [r["step"] for r in log_b]
    eval_a, eval_b = [r for r in log_a if "eval_loss" in r], [r for r in log_b if "eval_loss" in r]
    assert len(eval_a) == len(eval_b) > 0
    for ra, rb in zip(eval_a, eval_b):
        assert abs(ra["eval_loss"] - rb["eval_loss"]) <= tol * abs(ra["eval_loss"]), (ra, rb)
    log_a, log_b = [r for r in log_a if "loss" in r], [r for r in log_b if "loss" in r]
    for ra, rb in zip(log_a, log_b):
        assert abs(ra["loss"] - rb["loss"]) <= tol * abs(ra["loss"]), (ra, rb)
        assert abs(ra["grad_norm"] - rb["grad_norm"]) <= tol * abs(ra["grad_norm"]), (ra, rb)
        assert ra["tokens_seen"] == rb["tokens_seen"]
    wa, wb = load_file(os.path.join(a_dir, weights_file)), load_file(os.path.join(b_dir, weights_file))
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        err = (wa[name] - wb[name]).abs().max() / wa[name].abs().max()
        assert err <= tol, (name, float(err))


def training_args(output_dir, **kw):
    base = dict(output_dir=str(output_dir), learning_rate=1e-3, max_steps=3, progress=False, seed=5,
                max_grad_norm=1e9, save_steps=0)  # fmt: skip
    return {**base, **kw}


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["lora", "qlora"])
def test_ddp_on_two_ranks_of_batch_two_trains_the_adapter_like_one_rank_of_batch_four(
    folder, tmp_path, load_in_4bit
):
    # 11 packed examples, accumulation 2: the last micro-batch of the epoch leaves rank 1 without a row.
    # Gradient checkpointing on: its recompute hands the adapter weights to DDP's hooks in the backward.
    common = dict(
        model=folder, lora=True, load_in_4bit=load_in_4bit, examples=11, data_seed=1, eval_examples=5
    )
    one = tmp_path / "one"
    two = tmp_path / "two"
    run_one_process(write_spec(tmp_path, "one", **common, args=training_args(
        one, batch_size=4, gradient_accumulation_steps=2, packing=True, max_seq_length=24,
        gradient_checkpointing=True)))  # fmt: skip
    run_two_processes(write_spec(tmp_path, "two", **common, args=training_args(
        two, batch_size=2, gradient_accumulation_steps=2, packing=True, max_seq_length=24, parallel="ddp",
        gradient_checkpointing=True)))  # fmt: skip
    assert_same_run(one, two, "adapter_model.safetensors")
    assert not os.path.exists(two / "checkpoint-1")


def assert_resumed_final_step(resumed_dir, reference_dir, weights_file="trainable.safetensors"):
    """A run resumed at checkpoint-2 logs step 3 only, with the reference's loss, and ends at its weights."""
    log_resumed = [r for r in losses(resumed_dir) if "loss" in r]
    log_reference = [r for r in losses(reference_dir) if "loss" in r]
    assert [r["step"] for r in log_resumed] == [3]
    assert abs(log_resumed[0]["loss"] - log_reference[2]["loss"]) <= 1e-6 * abs(log_reference[2]["loss"])
    wa = load_file(os.path.join(reference_dir, weights_file))
    wb = load_file(os.path.join(resumed_dir, weights_file))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert (wa[name] - wb[name]).abs().max() <= 1e-6 * wa[name].abs().max(), name


def test_fsdp2_full_finetuning_on_two_ranks_matches_one_rank_and_checkpoints_move_between_world_sizes(
    folder, tmp_path
):
    # 10 unpacked examples, accumulation 2: micro-batches of 4, 4, 2 rows per epoch, so step 2 is one micro-batch
    # where rank 1 runs a stand-in row, and step 3 (the resumed one) starts the second epoch.
    common = dict(model=folder, lora=False, examples=10, data_seed=2, eval_examples=3)
    kw = dict(packing=False, save_steps=2, save_total_limit=None, lr_scheduler="cosine", warmup_steps=1,
              weight_decay=0.01, max_grad_norm=0.5, gradient_accumulation_steps=2)  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    run_one_process(write_spec(tmp_path, "one", **common, args=training_args(one, batch_size=4, **kw)))
    run_two_processes(write_spec(tmp_path, "two", **common, args=training_args(
        two, batch_size=2, parallel="fsdp", **kw)))  # fmt: skip
    assert_same_run(one, two, "trainable.safetensors")
    # The checkpoint holds whole tensors and the one-process optimizer layout.
    saved = load_file(os.path.join(two, "checkpoint-2", "trainable.safetensors"))
    model_shapes = load_file(os.path.join(one, "checkpoint-2", "trainable.safetensors"))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in model_shapes.items()}
    opt_two = torch.load(os.path.join(two, "checkpoint-2", "optimizer.pt"), weights_only=True)
    opt_one = torch.load(os.path.join(one, "checkpoint-2", "optimizer.pt"), weights_only=True)
    assert opt_two["state"].keys() == opt_one["state"].keys()
    for index, values in opt_one["state"].items():
        for key, value in values.items():
            other = opt_two["state"][index][key]
            assert other.shape == value.shape and (other - value).abs().max() <= 1e-5 * value.abs().max(), key

    # Written by 2 ranks, resumed by 1.
    on_one = tmp_path / "on_one"
    run_one_process(write_spec(tmp_path, "on_one", **common, resume=str(two / "checkpoint-2"),
                               args=training_args(on_one, batch_size=4, **kw)))  # fmt: skip
    assert_resumed_final_step(on_one, two)
    # Written by 1 process, resumed by 2 ranks: whole tensors and optimizer state resharded on load.
    on_two = tmp_path / "on_two"
    run_two_processes(write_spec(tmp_path, "on_two", **common, resume=str(one / "checkpoint-2"),
                                 args=training_args(on_two, batch_size=2, parallel="fsdp", **kw)))  # fmt: skip
    assert_resumed_final_step(on_two, one)


def assert_sharded(output_dir, dtypes):
    """Each of the 2 ranks holds about half of every parameter of these dtypes, never the whole."""
    r0, r1 = (json.load(open(os.path.join(output_dir, f"shards-rank{r}.json"))) for r in (0, 1))
    for dtype in dtypes:
        whole = r0["whole"][dtype]
        assert whole == r1["whole"][dtype] > 0
        assert r0["local"][dtype] + r1["local"][dtype] >= whole  # FSDP2 pads the last shard
        assert max(r0["local"][dtype], r1["local"][dtype]) <= 0.6 * whole, (dtype, r0, r1)


@pytest.mark.parametrize(
    "load_in_4bit, checkpointing, policy",
    [(False, False, "full"), (False, "offload", "full"), (True, True, "save_attn")],
    ids=["lora", "lora-offloaded-checkpoints", "qlora-checkpoints-save-attn"],
)
def test_fsdp2_with_lora_on_two_ranks_shards_the_base_and_trains_the_adapter_like_one_rank(
    folder, tmp_path, load_in_4bit, checkpointing, policy
):
    # Frozen base weights (16-bit, or the 4-bit codes and scales) and trainable adapters share each layer's
    # FSDP2 unit; under checkpointing the recompute runs on the layer's gathered weights.
    common = dict(model=folder, lora=True, load_in_4bit=load_in_4bit, examples=11, data_seed=1, eval_examples=5,
                  checkpointing=checkpointing, checkpoint_policy=policy)  # fmt: skip
    kw = dict(
        gradient_accumulation_steps=2, packing=True, max_seq_length=24, save_steps=2, save_total_limit=None
    )
    one, two = tmp_path / "one", tmp_path / "two"
    run_one_process(write_spec(tmp_path, "one", **common, args=training_args(one, batch_size=4, **kw)))
    run_two_processes(write_spec(tmp_path, "two", **common, report_shards=True, args=training_args(
        two, batch_size=2, parallel="fsdp", **kw)))  # fmt: skip
    assert_same_run(one, two, "adapter_model.safetensors")
    assert_sharded(two, ["nf4", "float32"] if load_in_4bit else ["float32"])
    if not load_in_4bit and not checkpointing:
        # The adapter's checkpoint, gathered from 2 ranks, resumes on 1.
        on_one = tmp_path / "on_one"
        run_one_process(write_spec(tmp_path, "on_one", **common, resume=str(two / "checkpoint-2"),
                                   args=training_args(on_one, batch_size=4, **kw)))  # fmt: skip
        assert_resumed_final_step(on_one, two, "adapter_model.safetensors")


def test_fsdp2_full_finetuning_with_checkpoints_and_mlp_tiles_matches_one_rank(folder, tmp_path):
    common = dict(model=folder, lora=False, examples=10, data_seed=2, eval_examples=3, checkpointing=True,
                  mlp_tile_tokens=7)  # fmt: skip
    kw = dict(packing=False, lr_scheduler="cosine", warmup_steps=1, weight_decay=0.01, max_grad_norm=0.5,
              gradient_accumulation_steps=2)  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    run_one_process(write_spec(tmp_path, "one", **common, args=training_args(one, batch_size=4, **kw)))
    run_two_processes(write_spec(tmp_path, "two", **common, args=training_args(
        two, batch_size=2, parallel="fsdp", **kw)))  # fmt: skip
    assert_same_run(one, two, "trainable.safetensors")


def deepspeed_config(tmp_path, stage: int) -> str:
    path = os.path.join(tmp_path, f"ds_zero{stage}.json")
    with open(path, "w") as f:  # the batch sizes, accumulation and clipping come from the training settings
        json.dump({"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
                   "gradient_clipping": "auto"}, f)  # fmt: skip
    return path


@pytest.mark.parametrize(
    "stage, load_in_4bit, checkpointing",
    [(2, True, "offload"), (3, False, False)],
    ids=["zero2-qlora-offloaded-checkpoints", "zero3-lora"],
)
def test_deepspeed_zero_on_two_ranks_trains_the_adapter_like_one_rank(
    folder, tmp_path, stage, load_in_4bit, checkpointing
):
    # The last step of the epoch has one micro-batch of the two: DeepSpeed's accumulation boundary follows it.
    common = dict(model=folder, lora=True, load_in_4bit=load_in_4bit, examples=11, data_seed=1, eval_examples=5,
                  checkpointing=checkpointing)  # fmt: skip
    kw = dict(
        gradient_accumulation_steps=2, packing=True, max_seq_length=24, save_steps=2, save_total_limit=None
    )
    one, two = tmp_path / "one", tmp_path / "two"
    run_one_process(write_spec(tmp_path, "one", **common, args=training_args(one, batch_size=4, **kw)))
    run_two_processes(write_spec(tmp_path, "two", **common, args=training_args(
        two, batch_size=2, deepspeed=deepspeed_config(tmp_path, stage), **kw)))  # fmt: skip
    assert_same_run(one, two, "adapter_model.safetensors")
    # The checkpoint holds the one-process layout, gathered out of ZeRO's partitions: one process resumes it.
    on_one = tmp_path / "on_one"
    run_one_process(write_spec(tmp_path, "on_one", **common, resume=str(two / "checkpoint-2"),
                               args=training_args(on_one, batch_size=4, **kw)))  # fmt: skip
    assert_resumed_final_step(on_one, two, "adapter_model.safetensors")


def test_deepspeed_zero3_full_finetuning_matches_one_rank_and_resumes_a_one_process_checkpoint(
    folder, tmp_path
):
    # Two parameter groups (weight decay or not), clipping, warm-up: the optimizer state written into ZeRO-3's
    # partitions on resume must land on the right parameters.
    common = dict(model=folder, lora=False, examples=10, data_seed=2, eval_examples=3)
    kw = dict(packing=False, save_steps=2, save_total_limit=None, lr_scheduler="cosine", warmup_steps=1,
              weight_decay=0.01, max_grad_norm=0.5, gradient_accumulation_steps=2)  # fmt: skip
    ds = dict(deepspeed=deepspeed_config(tmp_path, 3))
    one, two = tmp_path / "one", tmp_path / "two"
    run_one_process(write_spec(tmp_path, "one", **common, args=training_args(one, batch_size=4, **kw)))
    run_two_processes(
        write_spec(tmp_path, "two", **common, args=training_args(two, batch_size=2, **ds, **kw))
    )
    assert_same_run(one, two, "trainable.safetensors")
    opt_two = torch.load(os.path.join(two, "checkpoint-2", "optimizer.pt"), weights_only=True)
    opt_one = torch.load(os.path.join(one, "checkpoint-2", "optimizer.pt"), weights_only=True)
    assert [g["params"] for g in opt_two["param_groups"]] == [g["params"] for g in opt_one["param_groups"]]
    assert opt_two["state"].keys() == opt_one["state"].keys()
    for index, values in opt_one["state"].items():
        for key, value in values.items():
            other = opt_two["state"][index][key]
            assert other.shape == value.shape and (other - value).abs().max() <= 1e-5 * value.abs().max(), key
    on_two = tmp_path / "on_two"
    run_two_processes(write_spec(tmp_path, "on_two", **common, resume=str(one / "checkpoint-2"),
                                 args=training_args(on_two, batch_size=2, **ds, **kw)))  # fmt: skip
    assert_resumed_final_step(on_two, one)


@pytest.fixture(scope="module")
def model_with_tokenizer(tmp_path_factory):
    """A tiny Llama with a real tokenizer in a Hugging Face folder, for the `velotune train` command."""
    import transformers

    from tests.train.helpers import build_tokenizer

    path = str(tmp_path_factory.mktemp("tiny"))
    tok = build_tokenizer()
    tok.save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


EXAMPLE = os.path.join(ROOT, "examples", "velotongue_lora.yaml")


def train_command(model_dir, out, batch_size, *more) -> list[str]:
    return ["train", EXAMPLE, f"--model.name={model_dir}", f"--training.output_dir={out}", "--training.max_steps=3",
            "--training.save_steps=0", "--training.eval_steps=0", "--training.progress=false",
            f"--training.batch_size={batch_size}", *more]  # fmt: skip


def launch(launcher: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run(launcher, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "Warning" not in line]
    assert done.returncode == 0, "\n".join(lines)[-12000:]
    assert done.stdout.count("saved the trained result") == 1  # rank 0 only


def test_torchrun_launches_velotune_train_on_two_ranks_with_the_same_yaml(model_with_tokenizer, tmp_path):
    from velotune.cli import main

    one, two = tmp_path / "one", tmp_path / "two"
    assert main(train_command(model_with_tokenizer, one, 4, "--lora.r=4")) == 0
    launch([TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            "-m", "velotune", *train_command(model_with_tokenizer, two, 2, "--lora.r=4")])  # fmt: skip
    # DDP (auto, with LoRA): the same run as one process. lora_B starts at zero, so after 3 steps it is Adam's
    # sign-like first updates, where the all-reduce's different summation order shows at a few 1e-6.
    assert_same_run(one, two, "adapter_model.safetensors", tol=1e-5)


def test_accelerate_launch_runs_full_finetuning_with_fsdp2_from_the_same_yaml(model_with_tokenizer, tmp_path):
    from velotune.cli import main

    one, two = tmp_path / "one", tmp_path / "two"
    full = "--model.full_finetuning=true"
    assert main(train_command(model_with_tokenizer, one, 4, full)) == 0
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    # --multi_gpu is accelerate's name for "several processes through torchrun"; on CPU they use gloo.
    launch([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            "-m", "velotune", *train_command(model_with_tokenizer, two, 2, full)])  # fmt: skip
    assert_same_run(one, two, "trainable.safetensors")  # auto picks FSDP2 for full fine-tuning
