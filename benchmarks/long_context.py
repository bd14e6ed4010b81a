"""Longest sequence that trains: peak GPU memory of one training step against sequence length.

    python -m benchmarks.long_context --system velotune --method qlora --lengths 16384,32768,65536
    python -m benchmarks.long_context --system hf_peft_bnb --method qlora --search 8192

Batch 1, random tokens, LoRA r=16 on the seven projections, AdamW, each system with its own
gradient checkpointing (velotune: offloaded layer inputs; Transformers: non-reentrant checkpointing).
The model is loaded once (the random checkpoint of `benchmarks.train_step`, cached) and every length
runs one step after one step at the shortest length or --warmup-length (so optimizer state exists, as in a real run):
peak allocated GPU memory, the process's resident host memory (offloaded inputs live there), time.

--lengths measures the given lengths; a length that runs out of GPU memory is recorded as such.
--search L doubles from L until a step runs out of memory, then bisects between the last length
that trained and the first that did not until they are within --tolerance (5%) of each other.
For velotune the planner's estimate is recorded next to every measurement. One JSON line per
length goes to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.shapes import model_config
from benchmarks.systems import LOADERS
from benchmarks.train_step import prepare_model_folder

GIB = 2**30


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Runner:
    def __init__(self, system: str, method: str, model: str, max_len: int, cache_dir: Path):
        self.system, self.method, self.model_name = system, method, model
        device = torch.device("cuda", torch.cuda.current_device())
        folder = prepare_model_folder(model, cache_dir, 0, device)
        spec = {
            "folder": str(folder), "seq": max_len, "dtype": "bfloat16", "method": method, "lora_r": 16,
            "lora_alpha": 16, "lora_dropout": 0.0, "seed": 0, "model_type": model_config(model)["model_type"],
        }  # fmt: skip
        self.model, self.notes = LOADERS[system](spec)
        self.vocab = model_config(model)["vocab_size"]
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
        self.device = device

    def step(self, seq: int) -> dict:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, self.vocab, (1, seq), generator=torch.Generator().manual_seed(seq)).to(self.device)
        torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            out = self.model(input_ids=ids, labels=ids)
            loss = out.loss
            del out
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
        except torch.OutOfMemoryError:
            self.optimizer.zero_grad(set_to_none=True)
            loss = None
            torch.cuda.empty_cache()
            return {"seq": seq, "status": "oom", "peak_gib": torch.cuda.max_memory_allocated() / GIB}
        return {
            "seq": seq,
            "status": "ok",
            "step_s": time.perf_counter() - start,
            "peak_gib": torch.cuda.max_memory_allocated() / GIB,
            "host_rss_gib": _rss_bytes() / GIB,
            "loss": float(loss.detach()),
        }


def _estimate(model: str, method: str, seq: int) -> float | None:
    from velotune.memory.planner import estimate_memory

    return estimate_memory(model_config(model), method, batch=1, seq=seq).total / GIB


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--system", required=True, choices=sorted(LOADERS))
    p.add_argument("--method", default="qlora", choices=("lora", "qlora"))
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--lengths", default="")
    p.add_argument("--search", type=int, default=0, help="double from this length, then bisect")
    p.add_argument("--max-length", type=int, default=1 << 20)
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--budget-s", type=float, default=480.0, help="start no step after this many seconds")
    p.add_argument("--multiple-of", type=int, default=1024)
    p.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("VELOTUNE_BENCH_CACHE", "/tmp/velotune-bench")))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--warmup-length", type=int, default=0,
                   help="length of the warm-up step (default: the shortest measured length); a short one saves minutes "
                        "when a single very long length is measured")
    args = p.parse_args()
    t0 = time.time()
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    first = args.warmup_length or (min(lengths) if lengths else args.search)
    runner = Runner(args.system, args.method, args.model, args.max_length, args.cache_dir)
    base = {"system": args.system, "method": args.method, "model": args.model, "batch": 1,
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, **runner.notes}  # fmt: skip
    runner.step(first)  # optimizer state exists from here on

    def record(r: dict) -> None:
        if args.system.startswith("velotune"):
            r["planner_gib"] = _estimate(args.model, args.method, r["seq"])
        line = {**base, **r}
        print(json.dumps(line), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(line) + "\n")

    def out_of_time() -> bool:
        return time.time() - t0 > args.budget_s

    for seq in lengths:
        if out_of_time():
            break
        record(runner.step(seq))
    if args.search:
        good, bad, seq = 0, None, args.search
        while seq <= args.max_length and not out_of_time():
            r = runner.step(seq)
            record(r)
            if r["status"] != "ok":
                bad = seq
                break
            good, seq = seq, seq * 2
        while bad is not None and good and (bad - good) / good > args.tolerance and not out_of_time():
            seq = (good + bad) // 2 // args.multiple_of * args.multiple_of
            if seq in (good, bad):
                break
            r = runner.step(seq)
            record(r)
            good, bad = (seq, bad) if r["status"] == "ok" else (good, seq)
        summary = {"summary": True, "longest_ok": good, "first_oom": bad, "within": None if not good or bad is None else (bad - good) / good}
        record(summary | {"seq": good, "status": "summary"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
