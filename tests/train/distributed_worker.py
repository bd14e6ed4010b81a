"""One training process for tests/train/test_distributed.py: run it alone (one process) or under torchrun.

    python tests/train/distributed_worker.py SPEC.json [SPEC.json ...]

SPEC: {"model": folder, "lora": bool, "args": TrainingArguments fields, "examples": n, "data_seed": int} and
optionally "load_in_4bit", "device_map" ("cpu"), "dtype" ("float32"), "eval_examples", "resume" (a checkpoint),
"checkpointing" (the model's gradient_checkpointing: false, true or "offload"), "checkpoint_policy",
"mlp_tile_tokens", "report_shards" (write shards-rank<r>.json: this rank's and the whole element counts of the
model's parameters after training, by dtype, the 4-bit weights' as "nf4").
Writes the trained result with Trainer.save_model into args.output_dir.
"""

import gc
import json
import os
import sys

import torch

import velotune
from tests.train.helpers import random_examples
from velotune.train import Trainer, TrainingArguments
from velotune.train import distributed
from velotune.train.data import TokenizedDataset


def main(*spec_paths: str) -> None:
    specs = []
    for path in spec_paths:
        with open(path) as f:
            specs.append(json.load(f))
    if any(spec["args"].get("deepspeed") for spec in specs) and os.environ.get("DS_ACCELERATOR") == "cpu":
        without_shared_memory_all_reduce()
    distributed.init_from_env()
    for spec in specs:  # one after the other in the same process group (the GPU check runs its cases so)
        train(spec)  # returns having dropped the model and trainer, which hold the process group
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    distributed.shutdown()


def train(spec: dict) -> None:
    model, _ = velotune.FastLanguageModel.from_pretrained(
        spec["model"], dtype=getattr(torch, spec.get("dtype", "float32")),
        device_map=spec.get("device_map", "cpu"), full_finetuning=not spec["lora"],
        max_seq_length=64, progress=False, load_in_4bit=spec.get("load_in_4bit", False),
    )  # fmt: skip
    if spec["lora"]:
        model = velotune.FastLanguageModel.get_peft_model(
            model, r=4, lora_alpha=8, use_gradient_checkpointing=False, random_state=11,
            init_lora_weights=False,
        )  # fmt: skip
    if "checkpointing" in spec:
        model.gradient_checkpointing = spec["checkpointing"]
    model.checkpoint_policy = spec.get("checkpoint_policy", model.checkpoint_policy)
    model.mlp_tile_tokens = spec.get("mlp_tile_tokens", model.mlp_tile_tokens)
    data = TokenizedDataset.from_examples(random_examples(spec["examples"], seed=spec["data_seed"]))
    evaluation = None
    if spec.get("eval_examples"):
        evaluation = TokenizedDataset.from_examples(
            random_examples(spec["eval_examples"], seed=spec["data_seed"] + 1)
        )
    trainer = Trainer(model, TrainingArguments(**spec["args"]), train_dataset=data, eval_dataset=evaluation)
    trainer.train(resume_from_checkpoint=spec.get("resume"))
    trainer.save_model()
    if spec.get("report_shards"):
        report_shards(model, spec["args"]["output_dir"])


def without_shared_memory_all_reduce() -> None:
    """On CPU, DeepSpeed compiles a C++ shared-memory all-reduce the first time it starts (over a minute, with a
    compiler); marked unavailable, its collectives run on gloo, as DDP's and FSDP2's do in these tests."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def report_shards(model, folder: str) -> None:
    from torch.distributed.tensor import DTensor

    if hasattr(model, "reshard"):  # FSDP2 leaves the root unit gathered after a forward (here: the evaluation)
        model.reshard()
    local, whole = {}, {}
    for name, p in model.named_parameters():
        key = "nf4" if ".part" in name else str(p.dtype).removeprefix("torch.")  # 4-bit codes and scales
        part = p.to_local() if isinstance(p, DTensor) else p
        local[key] = local.get(key, 0) + part.numel()
        whole[key] = whole.get(key, 0) + p.numel()
    rank = int(os.environ.get("RANK", 0))
    with open(os.path.join(folder, f"shards-rank{rank}.json"), "w") as f:
        json.dump({"local": local, "whole": whole}, f)


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])  # the deepspeed launcher adds it
