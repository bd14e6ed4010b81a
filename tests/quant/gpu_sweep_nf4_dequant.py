"""GPU sweep of NF4 dequantization launch settings (issue 5: >= 1.5x bitsandbytes.functional.dequantize_4bit).

Not collected by pytest (it needs CUDA). Run from the repo root, bitsandbytes from the peers bundle:

    PYTHONPATH=/tmp/site:$PYTHONPATH python tests/quant/gpu_sweep_nf4_dequant.py --out $OUT

1. every candidate `DequantLaunch` dequantizes to bf16 bit for bit as dequantize_nf4_reference does, on
   the 8B gate/up shape (whole chunks) and on an odd shape (masked tail); fp16 and fp32 outputs are
   checked for the default and the winner;
2. each candidate is timed on the 8B q/o, k/v, gate/up, down and 70B gate/up shapes (bf16 output,
   double quantization) against bitsandbytes: "call" = CUDA events around one call (median; host
   launch cost included, as tests/quant/gpu_check_nf4.py measures), "stream" = 20 calls back to back
   between two events / 20 (the kernel's own time once launches overlap);
3. the candidate with the least total call time over the five shapes wins; prints the line to paste into
   velotune/quant/nf4.py and writes <out>/nf4_dequant_sweep.json and .md. Exit status 1 when a
   candidate is not bit-exact. Candidates left when DEADLINE_S has passed are skipped (and listed).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from velotune.quant import nf4  # noqa: E402
from tests.quant.gpu_check_nf4 import _floor_bytes, _time_ms  # noqa: E402
from velotune.quant.nf4 import (  # noqa: E402
    DequantLaunch,
    dequantize_nf4_reference,
    dequantize_nf4_triton,
    quantize_nf4_triton,
)

DEADLINE_S = 100
SHAPES = {
    "8b q/o": (4096, 4096), "8b k/v": (1024, 4096), "8b gate/up": (14336, 4096),
    "8b down": (4096, 14336), "70b gate/up": (28672, 8192),
}  # fmt: skip
ODD_SHAPE = (333, 777)
STREAM_CALLS = 20


def candidates() -> list[DequantLaunch]:
    cands = [nf4.DEQUANT_LAUNCH]
    for elements in (1024, 2048, 4096, 8192):
        for warps in (2, 4, 8):
            cands.append(DequantLaunch(elements_per_program=elements, num_warps=warps))
    for elements, warps in ((2048, 4), (4096, 4), (4096, 8), (8192, 8)):
        for per_sm in (4, 8, 16):
            cands.append(
                DequantLaunch(elements_per_program=elements, num_warps=warps, programs_per_sm=per_sm)
            )
    cands.append(DequantLaunch(evict_first=False))
    cands.append(
        DequantLaunch(load_bytes=16)
    )  # the old layout: 16-byte loads, shuffled through shared memory
    seen, unique = set(), []
    for c in cands:
        if c not in seen:
            seen.add(c)
            unique.append(c)
    return unique


def _stream_ms(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(STREAM_CALLS):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / STREAM_CALLS)
    return sorted(times)[len(times) // 2]


def _exact(q, launch: DequantLaunch, dtype: torch.dtype, ref: torch.Tensor | None = None) -> bool:
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=q.device)
    dequantize_nf4_triton(q, out=out, launch=launch)
    return torch.equal(out, dequantize_nf4_reference(q, dtype) if ref is None else ref)


def _label(c: DequantLaunch) -> str:
    return (f"e{c.elements_per_program}/w{c.num_warps}" + (f"/p{c.programs_per_sm}" if c.programs_per_sm else "")
            + ("" if c.evict_first else "/no-evict") + (f"/ld{c.load_bytes}" if c.load_bytes else ""))  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--iters", type=int, default=40)
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dev = torch.device("cuda")
    try:
        import bitsandbytes.functional as bnbf
    except Exception as exc:
        print(f"bitsandbytes unavailable ({type(exc).__name__}: {exc}); timing ours only")
        bnbf = None

    gen = torch.Generator(device=dev).manual_seed(0)
    weights = {}
    for name, shape in SHAPES.items():
        w = torch.randn(shape, generator=gen, device=dev, dtype=torch.bfloat16) * 0.02
        bnb = (
            bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4") if bnbf else None
        )
        weights[name] = (quantize_nf4_triton(w), bnb, torch.empty(shape, device=dev, dtype=torch.bfloat16))
        del w
    odd = quantize_nf4_triton(torch.randn(ODD_SHAPE, generator=gen, device=dev, dtype=torch.bfloat16) * 0.02)
    big_ref = dequantize_nf4_reference(weights["8b gate/up"][0], torch.bfloat16)

    report = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "bnb": {}, "copy": {},
              "candidates": [], "skipped": []}  # fmt: skip
    import triton

    report["triton"] = triton.__version__
    for name, (q, bnb, out) in weights.items():
        floor = _floor_bytes(q, 2)
        src = torch.empty_like(out)
        copy_ms = _stream_ms(functools.partial(out.copy_, src), 5)
        report["copy"][name] = {"stream_ms": copy_ms, "GBps": 2 * out.numel() * 2 / copy_ms / 1e6}
        del src
        if bnb is not None:
            packed, state = bnb
            out2 = torch.empty_like(out)
            fn = lambda: bnbf.dequantize_4bit(packed, state, out=out2)  # noqa: E731
            report["bnb"][name] = {"call_ms": _time_ms(fn, dev, args.iters), "stream_ms": _stream_ms(fn, 5),
                                   "floor_bytes": floor}  # fmt: skip
            del out2

    ok = True
    for cand in candidates():
        if time.perf_counter() - t0 > DEADLINE_S:
            report["skipped"].append(_label(cand))
            continue
        q_big = weights["8b gate/up"][0]
        row = {"label": _label(cand), "launch": asdict(cand),
               "exact_bf16": _exact(q_big, cand, torch.bfloat16, big_ref) and _exact(odd, cand, torch.bfloat16)}  # fmt: skip
        ok &= row["exact_bf16"]
        row["shapes"] = {}
        for name, (q, _, out) in weights.items():
            fn = lambda: dequantize_nf4_triton(q, out=out, launch=cand)  # noqa: E731, B023
            call, stream = _time_ms(fn, dev, args.iters), _stream_ms(fn, 5)
            entry = {"call_ms": call, "stream_ms": stream, "GBps_stream": _floor_bytes(q, 2) / stream / 1e6}
            if name in report["bnb"]:
                entry["speedup_call"] = report["bnb"][name]["call_ms"] / call
                entry["speedup_stream"] = report["bnb"][name]["stream_ms"] / stream
            row["shapes"][name] = entry
        row["total_call_ms"] = sum(e["call_ms"] for e in row["shapes"].values())
        row["total_stream_ms"] = sum(e["stream_ms"] for e in row["shapes"].values())
        report["candidates"].append(row)
        print(f"{row['label']:>24} exact={row['exact_bf16']} total call {row['total_call_ms']:.4f} ms "
              f"stream {row['total_stream_ms']:.4f} ms  ({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip

    exact_rows = [r for r in report["candidates"] if r["exact_bf16"]]
    best = min(exact_rows, key=lambda r: r["total_call_ms"]) if exact_rows else None
    if best is not None:
        launch = DequantLaunch(**best["launch"])
        for label, c in (("default", nf4.DEQUANT_LAUNCH), ("best", launch)):
            for dtype in (torch.float16, torch.float32):
                key = f"{label}_exact_{str(dtype)[6:]}"
                report[key] = _exact(odd, c, dtype) and _exact(weights["8b q/o"][0], c, dtype)
                ok &= report[key]
        fields = ", ".join(
            f"{k}={v!r}" for k, v in best["launch"].items() if v != getattr(DequantLaunch(), k)
        )
        report["paste"] = f"DEQUANT_LAUNCH = DequantLaunch({fields})"
    report["seconds"] = time.perf_counter() - t0

    lines = [f"# NF4 dequantization sweep on {report['device']} (torch {report['torch']}, triton {report['triton']})",
             "", "bf16 output, double quantization; call = one call between CUDA events (median), "
             f"stream = {STREAM_CALLS} calls back to back / {STREAM_CALLS}.", ""]  # fmt: skip
    head = "| shape | bnb call ms | bnb stream ms | copy stream GB/s |"
    lines += [head, "|---|---|---|---|"]
    for name in SHAPES:
        b = report["bnb"].get(name, {})
        lines.append(f"| {name} | {b.get('call_ms', float('nan')):.4f} | {b.get('stream_ms', float('nan')):.4f} | "
                     f"{report['copy'][name]['GBps']:.0f} |")  # fmt: skip
    lines += ["", "| candidate | exact | total call ms | total stream ms | " + " | ".join(
        f"{n} call ms (x bnb) / stream GB/s" for n in SHAPES) + " |", "|---" * (4 + len(SHAPES)) + "|"]  # fmt: skip
    for r in sorted(report["candidates"], key=lambda r: r["total_call_ms"]):
        cells = [f"{e['call_ms']:.4f} ({e.get('speedup_call', float('nan')):.2f}x) / {e['GBps_stream']:.0f}"
                 for e in r["shapes"].values()]  # fmt: skip
        lines.append(f"| {r['label']} | {r['exact_bf16']} | {r['total_call_ms']:.4f} | {r['total_stream_ms']:.4f} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    if report["skipped"]:
        lines += ["", "skipped (deadline): " + ", ".join(report["skipped"])]
    if best is not None:
        lines += ["", f"fp16/fp32 exact: default {report['default_exact_float16']}/{report['default_exact_float32']}, "
                  f"best {report['best_exact_float16']}/{report['best_exact_float32']}",
                  "", "paste into velotune/quant/nf4.py:", "", f"    {report['paste']}"]  # fmt: skip
    lines += ["", f"{report['seconds']:.0f} s"]
    text = "\n".join(lines) + "\n"
    print(text)
    (out_dir / "nf4_dequant_sweep.md").write_text(text)
    (out_dir / "nf4_dequant_sweep.json").write_text(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
