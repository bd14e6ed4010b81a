"""GPU check of the trainer: packing is correct on CUDA, then how much faster it trains than padding.

    python tests/train/gpu_check_packing.py [--model llama-3.1-8b] [--steps 20] [--out benchmarks/results]

1. Correctness (tiny model, float32, Triton kernels): packed and padded batches give the same
   per-example losses, and 4 micro-batches of 2 give the gradient of one batch of 8.
2. Speed: `velotune.train.Trainer` with LoRA (r=16, all projections, gradient checkpointing, bf16)
   on an 8B-shaped random model, on examples whose lengths are drawn uniformly from 50 to 2048
   tokens: packed rows of 2048 tokens (batch 2) against batches of 4 padded to their longest.
   Reports real (non-pad) tokens/s, the share of computed positions that are padding, peak memory.

Prints a table and writes benchmarks/results/train_packing-<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def check_correctness(device: str = "cuda") -> dict:
    import velotune
    from tests.model_zoo import save_hf_model
    from tests.train.helpers import random_examples
    from velotune.train import DataCollator, Trainer, TrainingArguments
    from velotune.train.data import TokenizedDataset

    torch.backends.cuda.matmul.allow_tf32 = False
    folder = tempfile.mkdtemp()
    save_hf_model("qwen2", folder)
    model, _ = velotune.FastLanguageModel.from_pretrained(folder, dtype=torch.float32, device_map=device,
                                                          full_finetuning=True, max_seq_length=64, progress=False)  # fmt: skip
    data = TokenizedDataset.from_examples(random_examples(8, seed=3))
    examples = [data[i] for i in range(len(data))]
    model.eval()
    worst = 0.0
    with torch.no_grad():
        packed = {
            k: v.to(device) for k, v in DataCollator(0, packing=True, max_seq_length=48)(examples).items()
        }
        padded = {k: v.to(device) for k, v in DataCollator(0)(examples).items()}
        worst = abs(model(**packed).loss.item() - model(**padded).loss.item())
    grads = []
    for batch_size, accum in ((8, 1), (2, 4)):
        model, _ = velotune.FastLanguageModel.from_pretrained(folder, dtype=torch.float32, device_map=device,
                                                              full_finetuning=True, max_seq_length=64, progress=False)  # fmt: skip
        trainer = Trainer(model, TrainingArguments(output_dir=tempfile.mkdtemp(), batch_size=batch_size,
                                                   gradient_accumulation_steps=accum, max_steps=1, progress=False,
                                                   max_grad_norm=None, max_seq_length=24),
                          train_dataset=TokenizedDataset.from_examples(random_examples(24, seed=0)))  # fmt: skip
        trainer.train()
        grads.append(torch.cat([trainer.optimizer.state[p]["exp_avg"].flatten() for p in model.parameters()]))
    accum_err = float((grads[0] - grads[1]).abs().max() / grads[0].abs().max())
    ok = worst < 1e-4 and accum_err < 1e-4
    return {"packed_vs_padded_loss_abs_diff": worst, "accumulation_grad_rel_err": accum_err, "ok": ok}


def padding_share(lengths, batch: int, seed: int, packing: bool, n: int) -> float:
    """Share of the positions the first n micro-batches compute that are padding (the trainer's own plan)."""
    from velotune.train.packing import BatchPlan

    computed = real = 0
    for rows in BatchPlan(lengths, batch, seed, packing, 2048).epoch(0)[:n]:
        sizes = [sum(int(lengths[i]) for i in row) for row in rows]
        computed += len(rows) * max(sizes)
        real += sum(sizes)
    return 1 - real / computed


def bench(model_name: str, steps: int, seed: int, device: str) -> list[dict]:
    import velotune
    from benchmarks.train_step import prepare_model_folder
    from velotune.train import Trainer, TrainerCallback, TrainingArguments
    from velotune.train.data import TokenizedDataset

    class Collect(TrainerCallback):
        def __init__(self):
            self.records = []

        def on_log(self, trainer, record):
            self.records.append(record)

    cache = Path(os.environ.get("VELOTUNE_BENCH_CACHE", tempfile.gettempdir())) / "velotune-bench-models"
    folder = prepare_model_folder(model_name, cache, seed, torch.device(device))
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(50, 2049, (40 * (steps + 3),), generator=gen).tolist()
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    examples = []
    for n in lengths:
        ids = torch.randint(10, vocab, (n,), generator=gen).tolist()
        examples.append((ids, [-100] + ids[1:]))
    data = TokenizedDataset.from_examples(examples)
    rows = []
    for mode, packing, batch in (("packed", True, 2), ("padded", False, 4)):
        model, _ = velotune.FastLanguageModel.from_pretrained(str(folder), max_seq_length=2048, device_map=device,
                                                              progress=False)  # fmt: skip
        model = velotune.FastLanguageModel.get_peft_model(
            model, r=16, lora_alpha=16, use_gradient_checkpointing=True
        )
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        collect = Collect()
        args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=steps + 3, batch_size=batch, packing=packing,
                                 max_seq_length=2048, logging_steps=1, progress=False, learning_rate=1e-4, seed=seed)  # fmt: skip
        trainer = Trainer(model, args, train_dataset=data, callbacks=[collect])
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
        timed = collect.records[3:]  # the first steps compile and warm up
        real = sum(r["tokens_per_s"] for r in timed) / len(timed)
        rows.append({"mode": mode, "batch": batch, "steps": steps, "real_tokens_per_s": real,
                     "padding_share": padding_share(data.lengths, batch, seed, packing, steps + 3),
                     "loss_last": timed[-1]["loss"], "peak_memory_gb": timed[-1]["memory_gb"], "wall_s": wall})  # fmt: skip
        del trainer, model
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="run the script's logic on CPU on a tiny shape"
    )
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        print(check_correctness("cpu"))
        print(bench("tiny-llama", 1, args.seed, "cpu"))
        return 0
    if not torch.cuda.is_available():
        sys.stderr.write("needs a CUDA GPU\n")
        return 2
    checks = check_correctness()
    print(f"correctness: {checks}")
    if not checks["ok"]:
        return 1
    rows = bench(args.model, args.steps, args.seed, "cuda")
    print(f"\n{args.model} LoRA r=16, lengths 50..2048, {torch.cuda.get_device_name()}")
    print(f"{'mode':8} {'batch':>5} {'real tok/s':>11} {'padding':>8} {'peak GB':>8} {'last loss':>9}")
    for r in rows:
        print(f"{r['mode']:8} {r['batch']:>5} {r['real_tokens_per_s']:>11,.0f} {r['padding_share']:>8.1%} "
              f"{r['peak_memory_gb']:>8.1f} {r['loss_last']:>9.3f}")  # fmt: skip
    speedup = rows[0]["real_tokens_per_s"] / rows[1]["real_tokens_per_s"]
    print(f"packing speed-up on real tokens: {speedup:.2f}x")
    os.makedirs(args.out, exist_ok=True)
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    path = Path(args.out) / f"train_packing-{gpu}.json"
    meta = {"model": args.model, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "command": "python tests/train/gpu_check_packing.py " + " ".join(argv or sys.argv[1:])}  # fmt: skip
    path.write_text(json.dumps({"meta": meta, "checks": checks, "rows": rows, "speedup": speedup}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
