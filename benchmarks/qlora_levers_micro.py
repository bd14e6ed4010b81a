"""The next two levers on the 8B QLoRA step, measured before building them (benchmarks/NOTES.md, session 8).

1. The backward's LoRA input gradient folded into the base GEMM, as the forward's up-projection is:
   today dx = dy W (one GEMM per 4-bit part, accumulating) then dx += dyb A (cuBLAS addmm, K = R, a
   pass that reads and writes dx once more); folded, dx = [dy | dyb] @ [W ; A] in one GEMM over
   K = out + R, where dyb lands in spare columns of dy's buffer and A in spare rows of the dequantized
   weight's scratch. Where dy is not produced into such a buffer (down's and o's dy come from the layer
   above), a copy of dy into it costs extra: timed too. Dense bf16 weights stand in for the dequantized
   scratch (the dequantization costs the same either way). Checks that both forms agree to rounding.
2. The host cost of one 4-bit part's dequantization call (velotune's wrapper and Triton's launch),
   against a plain torch.mm call's: what launching all of a weight's parts at once would save per part.

    python benchmarks/qlora_levers_micro.py --out DIR      # CUDA only; ~30 s on an H100
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lora_fold_micro import PROJECTIONS, gpu_time_us  # noqa: E402  (the same 8B shapes)
from velotune.quant.nf4 import dequantize_nf4, quantize_nf4  # noqa: E402

RANK = 16  # LoRA rank per part (a fused projection stacks its parts' A)
ITERS = 50


def host_us(fn, iters: int = 200) -> float:
    """Host time per call while the GPU keeps up (small work per call): enqueue cost."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    elapsed = time.perf_counter() - t
    torch.cuda.synchronize()
    return elapsed / iters * 1e6


def input_grad_fold(tokens: int) -> list[dict]:
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, fan_in, parts in PROJECTIONS:
        out, r = sum(parts), RANK * len(parts)
        w = torch.randn(out, fan_in, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        a = torch.randn(r, fan_in, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        dy = torch.randn(tokens, out, device="cuda", dtype=torch.bfloat16, generator=gen)
        dyb = torch.randn(tokens, r, device="cuda", dtype=torch.bfloat16, generator=gen)
        bounds = [sum(parts[:i]) for i in range(len(parts) + 1)]

        def today():
            dx = torch.mm(dy[:, : bounds[1]], w[: bounds[1]])
            for lo, hi in zip(bounds[1:-1], bounds[2:]):
                dx.addmm_(dy[:, lo:hi], w[lo:hi])
            return dx.addmm_(dyb, a)

        wide_dy = torch.cat((dy, dyb), 1)
        wide_w = torch.cat((w, a), 0)

        def folded():
            return torch.mm(wide_dy, wide_w)

        def copy_in():
            wide_dy[:, :out].copy_(dy)

        err = float((today().float() - folded().float()).abs().max() / today().float().abs().max())
        row = {"projection": name, "tokens": tokens, "today_us": gpu_time_us(today, ITERS),
               "folded_us": gpu_time_us(folded, ITERS), "dy_copy_us": gpu_time_us(copy_in, ITERS),
               "rel_err": err}  # fmt: skip
        rows.append(row)
        print(f"{name:8s} today {row['today_us']:7.1f} us  folded {row['folded_us']:7.1f} us  "
              f"dy copy {row['dy_copy_us']:6.1f} us  rel err {err:.1e}", flush=True)  # fmt: skip
    return rows


def dequant_host() -> dict:
    part = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    q = quantize_nf4(part)
    out = torch.empty_like(part)
    x, y = torch.randn(64, 64, device="cuda"), torch.empty(64, 64, device="cuda")
    row = {"dequantize_call_us": host_us(lambda: dequantize_nf4(q, out=out)),
           "mm_call_us": host_us(lambda: torch.mm(x, x, out=y)),
           "dequantize_gpu_us": gpu_time_us(lambda: dequantize_nf4(q, out=out), ITERS)}  # fmt: skip
    print(f"host per call: dequantize_nf4 {row['dequantize_call_us']:.1f} us, torch.mm {row['mm_call_us']:.1f} us; "
          f"the 1024 x 4096 part's dequantization on the GPU {row['dequantize_gpu_us']:.1f} us", flush=True)  # fmt: skip
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokens", type=int, default=4096)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("qlora_levers_micro needs a CUDA GPU")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "input_grad": input_grad_fold(args.tokens), "dequant_host": dequant_host()}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "qlora_levers_micro.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
