"""One process of the scaling benchmark of tests/train/gpu_check_distributed.py, alone or under a launcher.

    torchrun --nproc_per_node 2 tests/train/distributed_bench_worker.py SPEC.json
    deepspeed --num_gpus 2 tests/train/distributed_bench_worker.py SPEC.json

SPEC: {"folder": HF folder, "method": "lora" | "qlora" | "full", "checkpointing": false | true | "offload",
"batch_size": rows per GPU, "seq": tokens per row, "warmup": steps, "steps": timed steps, "parallel": "auto" |
"ddp" | "fsdp", "deepspeed": config file or null, "output_dir": folder}. Trains through velotune's Trainer (the
path users run: data dealt to ranks, DDP / FSDP2 / ZeRO, logging) on random token rows in bf16, and writes
result-rank<r>.json into output_dir: tokens/s over all GPUs (median of the timed steps, from the trainer's log),
the losses, and this GPU's peak memory.
"""

import json
import os
import statistics
import sys
import traceback

import torch

import velotune
from velotune.train import Trainer, TrainingArguments, distributed
from velotune.train.data import TokenizedDataset


def run(spec: dict, result: dict) -> None:
    fast = velotune.FastLanguageModel
    model, _ = fast.from_pretrained(
        spec["folder"], dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
        max_seq_length=spec["seq"], progress=False,
        load_in_4bit=spec["method"] == "qlora", full_finetuning=spec["method"] == "full",
    )  # fmt: skip
    if spec["method"] == "full":
        model.gradient_checkpointing = spec["checkpointing"]
    else:
        # The embedding stays on the GPU in every run (one process would otherwise keep it in host memory):
        # the same model on 1 and on 2 GPUs.
        model = fast.get_peft_model(model, r=16, lora_alpha=16, random_state=0, embedding_on_host=False,
                                    use_gradient_checkpointing=spec["checkpointing"])  # fmt: skip
    ranks = distributed.ranks_from_env()
    cuda = torch.cuda.is_available()  # CPU: a smoke test of this script, memory not measured
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    result["weights_gb"] = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    steps = spec["warmup"] + spec["steps"]
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, model.spec.vocab_size, (steps * spec["batch_size"] * ranks.world_size, spec["seq"]),
                         generator=gen).tolist()  # fmt: skip
    data = TokenizedDataset.from_examples([(ids, ids) for ids in rows])
    args = TrainingArguments(
        output_dir=spec["output_dir"], max_steps=steps, batch_size=spec["batch_size"], packing=True,
        max_seq_length=spec["seq"], shuffle=False, logging_steps=1, progress=False, save_steps=0,
        learning_rate=1e-5, parallel=spec.get("parallel", "auto"), deepspeed=spec.get("deepspeed"), seed=0,
    )  # fmt: skip
    trainer = Trainer(model, args, train_dataset=data)
    trainer.train()
    records = [r for r in trainer.state["log_history"] if "loss" in r]
    timed = records[spec["warmup"] :]
    result.update(
        strategy=trainer.parallel.strategy,
        tokens_per_s=statistics.median(r["tokens_per_s"] for r in timed),
        losses=[r["loss"] for r in records],
        peak_allocated_gb=torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        peak_reserved_gb=torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0,
        status="ok",
    )
    del trainer, model


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    if spec.get("deepspeed") and os.environ.get("DS_ACCELERATOR") == "cpu":
        from tests.train.distributed_worker import without_shared_memory_all_reduce

        without_shared_memory_all_reduce()
    ranks = distributed.init_from_env()
    result = {"rank": ranks.rank, "world_size": ranks.world_size, "status": "error"}
    try:
        run(spec, result)
    except torch.OutOfMemoryError as exc:
        result.update(status="out of memory", error=str(exc)[:500],
                      peak_allocated_gb=torch.cuda.max_memory_allocated() / 2**30)  # fmt: skip
    except Exception:
        result["error"] = traceback.format_exc()[-3000:]
    os.makedirs(spec["output_dir"], exist_ok=True)
    with open(os.path.join(spec["output_dir"], f"result-rank{ranks.rank}.json"), "w") as f:
        json.dump(result, f)
    if result["status"] == "ok":
        distributed.shutdown()


if __name__ == "__main__":
    main(next(a for a in sys.argv[1:] if not a.startswith("--local_rank")))  # the deepspeed launcher adds it
