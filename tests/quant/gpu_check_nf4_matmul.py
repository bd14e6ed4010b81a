"""GPU check of the small-batch NF4 product (`velotune/quant/nf4_matmul.py`, a decoding step's projections):
compiled numerics against the product with the dequantized weight, then time and bandwidth on Llama-3.1-8B's
projection shapes at 1 and 8 rows against (a) dequantize-into-scratch + cuBLAS (the path it replaces) and
(b) cuBLAS on the bf16 weight, with a sweep of the kernel's tile settings.

Not collected by pytest (it needs CUDA). Run from the repo root:

    python tests/quant/gpu_check_nf4_matmul.py --out OUT_DIR [--no-sweep]

Writes OUT_DIR/nf4_matmul_gpu_check.json and prints a table; exit status 1 when a numeric check fails.
The best sweep setting is printed as the constants to put at the top of nf4_matmul.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from velotune.quant import nf4_matmul  # noqa: E402
from velotune.quant.nf4 import dequantize_nf4_triton, quantize_nf4  # noqa: E402
from velotune.quant.nf4_matmul import nf4_matmul_triton  # noqa: E402

# (name, rows N, inputs K) of Llama-3.1-8B's checkpoint tensors (q/k/v and gate/up are quantized one by one).
SHAPES = [("q_proj/o_proj", 4096, 4096), ("k_proj/v_proj", 1024, 4096), ("gate/up_proj", 14336, 4096),
          ("down_proj", 4096, 14336)]  # fmt: skip
SWEEP = {"BLOCK_N": (16, 32, 64), "STEP_ELEMENTS": (128, 256, 512), "NUM_WARPS": (2, 4, 8)}


def numerics(device) -> list[dict]:
    out = []
    for dtype, (n, k), rows in itertools.product((torch.bfloat16, torch.float16, torch.float32),
                                                  ((37, 192), (4096, 4096)), (1, 5, 16)):  # fmt: skip
        gen = torch.Generator(device=device).manual_seed(n + rows)
        q = quantize_nf4(torch.randn(n, k, device=device, generator=gen, dtype=torch.bfloat16))
        x = torch.randn(rows, k, device=device, generator=gen, dtype=dtype)
        dense = dequantize_nf4_triton(q, dtype)
        want = (x.float() @ dense.float().t()).to(dtype)
        got = nf4_matmul_triton(x, q)
        err = float((got.float() - want.float()).abs().max() / want.float().abs().max())
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
        out.append({"dtype": str(dtype), "n": n, "k": k, "rows": rows, "rel_err": err, "ok": err < tol})
    return out


def timings(device) -> list[dict]:
    results = []
    for (name, n, k), rows in itertools.product(SHAPES, (1, 8)):
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        q = quantize_nf4(w)
        x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
        scratch = torch.empty(n * k, device=device, dtype=torch.bfloat16)

        def dequant_then_gemm(q=q, x=x, scratch=scratch, n=n, k=k):
            return x @ dequantize_nf4_triton(q, out=scratch).view(n, k).t()

        packed_bytes = n * k // 2 + q.absmax.numel()
        ms = {
            "nf4_matmul": do_bench(lambda q=q, x=x: nf4_matmul_triton(x, q), warmup=25, rep=200),
            "dequant+cublas": do_bench(dequant_then_gemm, warmup=25, rep=200),
            "cublas_bf16": do_bench(lambda w=w, x=x: x @ w.t(), warmup=25, rep=200),
        }
        row = {"shape": name, "n": n, "k": k, "rows": rows, **{f"{key}_ms": v for key, v in ms.items()},
               "nf4_matmul_gbs": packed_bytes / (ms["nf4_matmul"] * 1e-3) / 1e9,
               "cublas_bf16_gbs": 2 * n * k / (ms["cublas_bf16"] * 1e-3) / 1e9}  # fmt: skip
        results.append(row)
        print(f"{name:>14} rows {rows}: nf4_matmul {ms['nf4_matmul'] * 1e3:7.1f} us ({row['nf4_matmul_gbs']:6.0f} GB/s)"
              f" | dequant+cuBLAS {ms['dequant+cublas'] * 1e3:7.1f} us | cuBLAS bf16 {ms['cublas_bf16'] * 1e3:7.1f} us "
              f"({row['cublas_bf16_gbs']:6.0f} GB/s)", flush=True)  # fmt: skip
        del w, q, scratch
    return results


def sweep(device) -> list[dict]:
    """Total time of one decoding step's 4-bit projections (32 layers of the shapes above, batch 1) per setting."""
    weights = [(quantize_nf4(torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02), count, k)
               for (_, n, k), count in zip(SHAPES, (2, 2, 2, 1))]  # fmt: skip
    xs = {k: torch.randn(1, k, device=device, dtype=torch.bfloat16) for _, _, k in SHAPES}
    saved = {name: getattr(nf4_matmul, name) for name in SWEEP}
    results = []
    try:
        for values in itertools.product(*SWEEP.values()):
            setting = dict(zip(SWEEP, values))
            for name, value in setting.items():
                setattr(nf4_matmul, name, value)
            try:
                per_layer = sum(
                    count * do_bench(lambda q=q, x=xs[k]: nf4_matmul_triton(x, q), warmup=10, rep=50)
                    for q, count, k in weights
                )
                results.append({**setting, "step_ms_32_layers": 32 * per_layer})
                print(f"sweep {setting}: {32 * per_layer:.2f} ms per token (32 layers)", flush=True)
            except Exception as exc:  # a setting that does not compile is recorded, not fatal
                results.append({**setting, "error": repr(exc)[:300]})
    finally:
        for name, value in saved.items():
            setattr(nf4_matmul, name, value)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    report["numerics"] = numerics(device)
    bad = [r for r in report["numerics"] if not r["ok"]]
    print(f"numerics: {len(report['numerics']) - len(bad)} of {len(report['numerics'])} ok", flush=True)
    for r in bad:
        print("  FAILED", r)
    report["timings"] = timings(device)
    if not args.no_sweep:
        report["sweep"] = sweep(device)
        best = min((r for r in report["sweep"] if "error" not in r), key=lambda r: r["step_ms_32_layers"])
        print("best setting:", {k: best[k] for k in SWEEP}, f"{best['step_ms_32_layers']:.2f} ms")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "nf4_matmul_gpu_check.json").write_text(json.dumps(report, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
