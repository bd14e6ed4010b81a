"""What folding the LoRA up-projection into the base GEMM saves, per 8B projection, before building it.

A LoRA projection's forward today is y = x W^T, then x A^T, then y_i += s_i (x A_i^T) B_i^T per block:
the last step reads and writes the whole output once more (cuBLAS addmm, K = r). Folded, the same
sum is one GEMM over K + R: y = [x | x A^T] @ [W | blockdiag(s_i B_i)]^T, where x sits in a buffer
with R spare columns (written there by its producer, the rmsnorm or the activation), x A^T is written
into those columns, and the dequantized weight's scratch rows carry the scaled B columns.

This times, at Llama-3.1-8B shapes and T tokens, both forms of each projection's GEMMs (the weight
stands dense here: the 4-bit dequantization costs the same bytes either way) and the K = in and
K = in + R base GEMMs alone. It checks first that both give the same y (bf16, to rounding).

    python benchmarks/lora_fold_micro.py --out DIR      # CUDA only; ~30 s on an H100
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

# (name, in, out blocks): Llama-3.1-8B.
PROJECTIONS = [
    ("qkv", 4096, (4096, 1024, 1024)),
    ("o", 4096, (4096,)),
    ("gate_up", 4096, (14336, 14336)),
    ("down", 14336, (4096,)),
]


def gpu_time_us(fn, iters: int) -> float:
    """fn's GPU time per call in microseconds (CUDA events over `iters` calls, after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1000.0  # us


def run(tokens: int, rank: int, iters: int, pads: list[int]) -> list[dict]:
    rows = []
    for name, fan_in, blocks in PROJECTIONS:
        for pad in pads:
            rows.append(_projection(name, fan_in, blocks, tokens, rank, iters, pad))
    return rows


def _projection(name, fan_in, blocks, tokens, rank, iters, pad) -> dict:
    """One projection's timings, with the spare columns rounded up to a multiple of `pad` (zeros in the
    weight's extra columns, so x's extra columns only need to be finite)."""
    dev, dt = "cuda", torch.bfloat16
    out = sum(blocks)
    r_all = rank * len(blocks)
    width = -(-r_all // pad) * pad
    w = torch.randn(out, fan_in, device=dev, dtype=dt) / fan_in**0.5
    a = torch.randn(r_all, fan_in, device=dev, dtype=dt) / fan_in**0.5
    bs = [torch.randn(b, rank, device=dev, dtype=dt) / rank**0.5 for b in blocks]
    scale = 2.0
    x = torch.randn(tokens, fan_in, device=dev, dtype=dt)
    wide = torch.zeros(tokens, fan_in + width, device=dev, dtype=dt)
    wide[:, :fan_in].copy_(x)
    w_wide = torch.zeros(out, fan_in + width, device=dev, dtype=dt)
    w_wide[:, :fan_in].copy_(w)

    def unfolded():
        y = torch.mm(x, w.t())
        xa = torch.mm(x, a.t())
        for i, (part, xa_i, b) in enumerate(zip(y.split(blocks, 1), xa.split(rank, 1), bs)):
            part.addmm_(xa_i, b.t(), alpha=scale)
        return y

    def fill_tail():
        # The per-call work on the weight side: the scaled B columns written into the scratch rows.
        tail = w_wide[:, fan_in : fan_in + r_all]
        if len(blocks) > 1:
            tail.zero_()
        row = 0
        for i, b in enumerate(bs):
            torch.mul(b, scale, out=tail[row : row + b.shape[0], i * rank : (i + 1) * rank])
            row += b.shape[0]

    def folded():
        torch.mm(x, a.t(), out=wide[:, fan_in : fan_in + r_all])
        fill_tail()
        return torch.mm(wide, w_wide.t())

    def folded_per_part():
        # As NF4Weight runs a weight too large to dequantize whole: one GEMM per part.
        torch.mm(x, a.t(), out=wide[:, fan_in : fan_in + r_all])
        fill_tail()
        y = torch.empty(tokens, out, device=dev, dtype=dt)
        row = 0
        for size in blocks:
            y[:, row : row + size].addmm_(wide, w_wide[row : row + size].t(), beta=0)
            row += size
        return y

    ref, got = unfolded().float(), folded().float()
    err = ((ref - got).abs().max() / ref.abs().max()).item()
    return {
        "projection": name, "tokens": tokens, "in": fan_in, "out": out, "R": r_all, "K": fan_in + width,
        "max_rel_diff": err,
        "base_gemm_us": gpu_time_us(lambda: torch.mm(x, w.t()), iters),
        "base_gemm_wide_k_us": gpu_time_us(lambda: torch.mm(wide, w_wide.t()), iters),
        "unfolded_us": gpu_time_us(unfolded, iters),
        "folded_us": gpu_time_us(folded, iters),
        "folded_per_part_us": gpu_time_us(folded_per_part, iters),
        "copy_x_into_wide_us": gpu_time_us(lambda: wide[:, :fan_in].copy_(x), iters),
    }  # fmt: skip


def dequant_rows(iters: int) -> list[dict]:
    """The 4-bit weight's dequantization into contiguous scratch rows against the first columns of
    wider rows (the folded form), at the 8B shapes."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from velotune.quant.nf4 import dequantize_nf4_triton, quantize_nf4_triton

    rows = []
    for name, out, fan_in, extra in [("gate", 14336, 4096, 32), ("down", 4096, 14336, 16), ("q/k/v", 6144, 4096, 48)]:
        q = quantize_nf4_triton(torch.randn(out, fan_in, device="cuda", dtype=torch.bfloat16) * 0.02)
        flat = torch.empty(out, fan_in, device="cuda", dtype=torch.bfloat16)
        wide = torch.empty(out, fan_in + extra, device="cuda", dtype=torch.bfloat16)
        dequantize_nf4_triton(q, out=wide[:, :fan_in])
        dequantize_nf4_triton(q, out=flat)
        rows.append({
            "weight": name, "shape": [out, fan_in], "extra_columns": extra,
            "equal": bool(torch.equal(wide[:, :fan_in], flat)),
            "contiguous_us": gpu_time_us(lambda: dequantize_nf4_triton(q, out=flat), iters),
            "row_strided_us": gpu_time_us(lambda: dequantize_nf4_triton(q, out=wide[:, :fan_in]), iters),
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--pads", default="8,64,128", help="round the spare columns up to these multiples")
    args = parser.parse_args()
    deq = dequant_rows(args.iters)
    rows = run(args.tokens, args.rank, args.iters, [int(p) for p in args.pads.split(",")])
    os.makedirs(args.out, exist_ok=True)
    device = torch.cuda.get_device_name()
    with open(os.path.join(args.out, "lora_fold_micro.json"), "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "rows": rows, "dequant": deq}, f, indent=1)
    cols = ["projection", "R", "K", "max_rel_diff", "base_gemm_us", "base_gemm_wide_k_us", "unfolded_us",
            "folded_us", "folded_per_part_us", "copy_x_into_wide_us"]  # fmt: skip
    lines = [f"# LoRA fold, forward GEMMs per projection ({device}, {args.tokens} tokens, r={args.rank})", "",
             "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]  # fmt: skip
    for row in rows:
        lines.append(
            "| "
            + " | ".join(f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in cols)
            + " |"
        )
    saved = sum(
        min(r["unfolded_us"] - r["folded_us"] for r in rows if r["projection"] == p) for p, *_ in PROJECTIONS
    )
    lines += [
        "",
        f"Per layer, all four projections, each at its best padding: unfolded - folded = {saved:.0f} us.",
    ]
    lines += ["", "NF4 dequantization (us): contiguous rows vs the first columns of wider rows", ""]
    lines += [f"- {d['weight']} {d['shape']} +{d['extra_columns']}: {d['contiguous_us']:.1f} vs "
              f"{d['row_strided_us']:.1f}, equal {d['equal']}" for d in deq]  # fmt: skip
    text = "\n".join(lines)
    with open(os.path.join(args.out, "lora_fold_micro.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
