"""Where a velotune LoRA training step spends its GPU time: a kernel breakdown by op family.

    python -m benchmarks.profile_step --model llama-3.2-1b --batch 2 --seq 2048 [--checkpointing true|false|offload]

Builds (or reuses) the harness's random checkpoint of that shape, runs a few warm-up steps, profiles
two steps with torch.profiler, and prints the CUDA time per category (GEMM, attention, loss, norm,
rope, activation, LoRA glue, copies/elementwise, optimizer), the top kernels, step time and peak memory.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
from pathlib import Path

import torch

from benchmarks.train_step import prepare_model_folder

CATEGORIES = [
    ("attention", r"attn|flash|fmha|attention"),
    ("loss", r"cross_entropy|_ce_|softmax_ce|logsumexp"),
    ("rmsnorm", r"rms_norm|rmsnorm"),
    ("rope", r"rope|rotary"),
    ("activation", r"gated|swiglu|geglu|silu|gelu"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("gemm", r"gemm|cutlass|xmma|nvjet|cublas|sm90|splitk|ampere_bf16"),
    ("copy/elementwise", r"copy|elementwise|vectorized|fill|cat|index|reduce|mul|add"),
]


def categorize(name: str, categories: list[tuple[str, str]] = CATEGORIES) -> str:
    """The op family of a kernel name: the first of `categories` whose pattern it matches."""
    low = name.lower()
    for cat, pattern in categories:
        if re.search(pattern, low):
            return cat
    return "other"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-3.2-1b")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--checkpointing", default="true")
    parser.add_argument("--cache-dir", default="/tmp/velotune-bench")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import velotune

    device = torch.device("cuda")
    folder = prepare_model_folder(args.model, Path(args.cache_dir), seed=0, device=device)
    model, _ = velotune.FastLanguageModel.from_pretrained(str(folder), max_seq_length=args.seq,
                                                          dtype=torch.bfloat16, progress=False)  # fmt: skip
    ckpt = {"true": True, "false": False}.get(args.checkpointing, args.checkpointing)
    model = velotune.FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                    "up_proj", "down_proj"], use_gradient_checkpointing=ckpt)  # fmt: skip
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ids = torch.randint(0, model.spec.vocab_size, (args.batch, args.seq), device=device)
    weights = torch.cuda.memory_allocated()

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated()
    step_s = sorted(times)[len(times) // 2]

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    per_cat: dict[str, float] = collections.defaultdict(float)
    per_kernel: dict[str, float] = collections.defaultdict(float)
    for evt in prof.key_averages():
        cuda_us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if cuda_us <= 0 or evt.key.startswith(("aten::", "autograd::", "Optimizer", "ProfilerStep")):
            continue
        per_kernel[evt.key] += cuda_us / 2e3  # ms per step
        per_cat[categorize(evt.key)] += cuda_us / 2e3
    total = sum(per_cat.values())
    report = {
        "model": args.model, "batch": args.batch, "seq": args.seq, "checkpointing": args.checkpointing,
        "step_ms": step_s * 1e3, "tokens_per_s": args.batch * args.seq / step_s,
        "peak_gib": peak / 2**30, "weights_gib": weights / 2**30, "above_weights_gib": (peak - weights) / 2**30,
        "gpu_busy_ms": total, "categories_ms": dict(sorted(per_cat.items(), key=lambda kv: -kv[1])),
        "top_kernels_ms": dict(sorted(per_kernel.items(), key=lambda kv: -kv[1])[:25]),
    }  # fmt: skip
    print(f"{args.model} b{args.batch}x{args.seq} ckpt={args.checkpointing}: {report['step_ms']:.1f} ms/step, "
          f"{report['tokens_per_s']:.0f} tok/s, peak {report['peak_gib']:.2f} GiB "
          f"({report['above_weights_gib']:.2f} above weights), GPU busy {total:.1f} ms")  # fmt: skip
    for cat, ms in report["categories_ms"].items():
        print(f"  {cat:18s} {ms:8.2f} ms  {100 * ms / total:5.1f}%")
    for name, ms in list(report["top_kernels_ms"].items())[:15]:
        print(f"    {ms:8.2f} ms  {name[:110]}")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
