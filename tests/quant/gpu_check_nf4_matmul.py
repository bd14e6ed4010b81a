"""GPU check of the small-batch NF4 product (`velotune/quant/nf4_matmul.py`, a decoding step's projections).

1. numerics: the compiled kernel against the float32 product with the dequantized weight (bf16, fp16,
   fp32; 1 to 16 rows; single and double quantization; a forced K split; writing into a column slice of
   a NaN-filled wider output), and bit-exactness where the float32 sums are exact (x in {-1, 0, 1}).
2. timings on Llama-3.1-8B's projection shapes at 1, 8 and 16 rows (bf16) against dequantize-into-scratch
   + cuBLAS (the path it replaces) and cuBLAS on the bf16 weight, in us and GB/s; bitsandbytes' 4-bit
   product too when it imports (run with PYTHONPATH=/tmp/site for it).
3. a sweep of the launch settings (NF4MatmulLaunch) at 1 and 8 rows, scored by one decoding step's 4-bit
   projections (32 layers x q, k, v, o, gate, up, down) replayed from a CUDA graph, then that step with
   the default and the best settings against dequantize + cuBLAS and cuBLAS bf16.

Not collected by pytest (it needs CUDA). Run from the repo root (about 2 minutes on an H100):

    python tests/quant/gpu_check_nf4_matmul.py --out OUT_DIR [--no-sweep]

Writes OUT_DIR/nf4_matmul_gpu_check.json, prints a table and the settings to paste into nf4_matmul.py
(LAUNCHES, MAX_ROWS); exit status 1 when a numeric check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from velotune.quant import nf4_matmul  # noqa: E402
from velotune.quant.nf4 import dequantize_nf4_triton, quantize_nf4  # noqa: E402
from velotune.quant.nf4_matmul import NF4MatmulLaunch, nf4_matmul_triton  # noqa: E402

# (name, rows N, inputs K, tensors per layer) of Llama-3.1-8B's checkpoint tensors (q/k/v and gate/up are
# quantized one by one, so each is its own launch).
SHAPES = [("q_proj/o_proj", 4096, 4096, 2), ("k_proj/v_proj", 1024, 4096, 2), ("gate/up_proj", 14336, 4096, 2),
          ("down_proj", 4096, 14336, 1)]  # fmt: skip
LAYERS = 32
SWEEP_DEADLINE_S = 140  # seconds after the start past which sweep settings are skipped
T0 = time.time()
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def numerics(device) -> list[dict]:
    out = []
    cases = list(itertools.product((torch.bfloat16, torch.float16, torch.float32), ((37, 192), (4096, 4096),
                                   (1000, 14336)), (1, 3, 8, 16), (True,)))  # fmt: skip
    cases += [
        (dtype, (300, 4096), rows, False) for dtype in (torch.bfloat16, torch.float32) for rows in (1, 8)
    ]
    for dtype, (n, k), rows, double_quant in cases:
        gen = torch.Generator(device=device).manual_seed(n + rows)
        q = quantize_nf4(torch.randn(n, k, device=device, generator=gen, dtype=torch.bfloat16),
                         double_quant=double_quant)  # fmt: skip
        x = torch.randn(rows, k, device=device, generator=gen, dtype=dtype)
        dense = dequantize_nf4_triton(q, dtype)
        err = _rel(nf4_matmul_triton(x, q), x.float() @ dense.float().t())
        row = {"dtype": str(dtype), "n": n, "k": k, "rows": rows, "double_quant": double_quant, "rel_err": err,
               "ok": err < TOL[dtype]}  # fmt: skip
        if k == 192 and dtype != torch.float32:
            # Weights of 8-bit mantissas over |x| <= 1 integers: the float32 sums are exact in any order,
            # so the result must be the dequantized product bit for bit.
            xi = torch.randint(-1, 2, (rows, k), device=device, generator=gen).to(dtype)
            row["exact"] = bool(
                torch.equal(nf4_matmul_triton(xi, q), (xi.float() @ dense.float().t()).to(dtype))
            )
            row["ok"] = row["ok"] and row["exact"]
        out.append(row)
    # A forced split of K (partials + the summing kernel) writing into a column slice of a poisoned output.
    for dtype in (torch.bfloat16, torch.float32):
        gen = torch.Generator(device=device).manual_seed(9)
        q = quantize_nf4(torch.randn(1000, 4096, device=device, generator=gen, dtype=torch.bfloat16))
        x = torch.randn(3, 4096, device=device, generator=gen, dtype=dtype)
        wide = torch.full((3, 1100), float("nan"), device=device, dtype=dtype)
        nf4_matmul_triton(
            x, q, out=wide[:, 50:1050], launch=NF4MatmulLaunch(block_n=4, block_k=256, split_k=3)
        )
        err = _rel(wide[:, 50:1050], x.float() @ dequantize_nf4_triton(q, dtype).float().t())
        untouched = bool(torch.isnan(wide[:, :50]).all() and torch.isnan(wide[:, 1050:]).all())
        out.append({"dtype": str(dtype), "n": 1000, "k": 4096, "rows": 3, "split_k": 3, "out_slice": True,
                    "rel_err": err, "untouched": untouched, "ok": untouched and err < TOL[dtype]})  # fmt: skip
    return out


def _bnb_product(w: torch.Tensor, x: torch.Tensor):
    """bitsandbytes' 4-bit product of x with w (gemv_4bit at one row), or None when it does not import."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except Exception:
        return None
    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    return lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state)


def _bytes_nf4(n: int, k: int) -> int:
    return n * k // 2 + n * k // 64  # codes + one 8-bit scale per 64 elements (nested scales: 1/256 of that)


def timings(device) -> list[dict]:
    results = []
    for (name, n, k, _), rows in itertools.product(SHAPES, (1, 8, 16)):
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        q = quantize_nf4(w)
        x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
        scratch = torch.empty(n * k, device=device, dtype=torch.bfloat16)

        def dequant_then_gemm(q=q, x=x, scratch=scratch, n=n, k=k):
            return x @ dequantize_nf4_triton(q, out=scratch).view(n, k).t()

        fns = {"nf4_matmul": lambda q=q, x=x: nf4_matmul_triton(x, q), "dequant+cublas": dequant_then_gemm,
               "cublas_bf16": lambda w=w, x=x: x @ w.t()}  # fmt: skip
        ms = {key: do_bench(fn, warmup=10, rep=40) for key, fn in fns.items()}
        try:  # a peer's failure is reported, not fatal
            bnb_fn = _bnb_product(w, x) if rows == 1 else None
            if bnb_fn is not None:
                ms["bnb_4bit"] = do_bench(bnb_fn, warmup=10, rep=40)
        except Exception as exc:
            print(f"bitsandbytes 4-bit product failed: {repr(exc)[:200]}")
        row = {"shape": name, "n": n, "k": k, "rows": rows, **{f"{key}_ms": v for key, v in ms.items()},
               "nf4_matmul_gbs": _bytes_nf4(n, k) / (ms["nf4_matmul"] * 1e-3) / 1e9,
               "cublas_bf16_gbs": 2 * n * k / (ms["cublas_bf16"] * 1e-3) / 1e9}  # fmt: skip
        results.append(row)
        extra = f" | bnb 4-bit {ms['bnb_4bit'] * 1e3:6.1f} us" if "bnb_4bit" in ms else ""
        print(f"{name:>14} rows {rows:2}: nf4_matmul {ms['nf4_matmul'] * 1e3:6.1f} us ({row['nf4_matmul_gbs']:5.0f} GB/s)"
              f" | dequant+cuBLAS {ms['dequant+cublas'] * 1e3:6.1f} us | cuBLAS bf16 {ms['cublas_bf16'] * 1e3:6.1f} us "
              f"({row['cublas_bf16_gbs']:5.0f} GB/s){extra}", flush=True)  # fmt: skip
        del w, q, scratch
    return results


def recommended_max_rows(timings_rows: list[dict]) -> int:
    """The most rows (of those timed) up to which the kernel beat dequantize + cuBLAS on every shape."""
    best = 0
    for rows in sorted({r["rows"] for r in timings_rows}):
        if all(r["nf4_matmul_ms"] < r["dequant+cublas_ms"] for r in timings_rows if r["rows"] == rows):
            best = rows
        else:
            break
    return best


def _layer_weights(device):
    """One layer's 7 projections in launch order, each its own tensor (no L2 reuse between launches)."""
    weights = []
    for _, n, k, count in SHAPES:
        for _ in range(count):
            w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
            weights.append((quantize_nf4(w), w))
    return weights


def step_ms(weights, xs, launch: NF4MatmulLaunch) -> float:
    """Time of one decoding step's 4-bit projections (LAYERS layers), replayed from a CUDA graph as the
    decoder runs them (per-launch timings carry each launch's host overhead, larger than most of these
    kernels: session 9's pair-table sweep picked a per-launch "best" that lost in the graph)."""
    return graph_step_ms(
        lambda: [nf4_matmul_triton(xs[q.shape[1]], q, launch=launch) for _ in range(LAYERS) for q, _ in weights]
    )


def _m1_configs() -> list[NF4MatmulLaunch]:
    # 16 bytes of codes per thread per step: warps follow the tile.
    configs = []
    for block_n, block_k, pps in itertools.product((4, 8, 16), (256, 512, 1024), (4, 8)):
        warps = max(1, min(8, block_n * block_k // 2 // 512))
        configs.append(
            NF4MatmulLaunch(block_n=block_n, block_k=block_k, num_warps=warps, programs_per_sm=pps)
        )
    return configs


def _around(best: NF4MatmulLaunch) -> list[NF4MatmulLaunch]:
    out = [
        dataclasses.replace(best, num_warps=w)
        for w in (best.num_warps // 2, best.num_warps * 2)
        if 1 <= w <= 8
    ]
    out += [dataclasses.replace(best, num_stages=s) for s in (1, 3)]
    out += [dataclasses.replace(best, programs_per_sm=p) for p in (2, 16)]
    return out


def _m8_configs(pps: int) -> list[NF4MatmulLaunch]:
    return [NF4MatmulLaunch(block_n=bn, block_k=bk, num_warps=4, programs_per_sm=pps)
            for bn, bk in itertools.product((2, 4, 8), (64, 128, 256))]  # fmt: skip


def sweep(device, weights) -> dict:
    results: dict = {}
    for rows in (1, 8):
        xs = {k: torch.randn(rows, k, device=device, dtype=torch.bfloat16) for _, _, k, _ in SHAPES}
        tried: list[dict] = []

        def score(launch, rows=rows, xs=xs, tried=tried):
            if time.time() - T0 > SWEEP_DEADLINE_S:  # keep the whole check within its few minutes
                tried.append({**dataclasses.asdict(launch), "error": "skipped: time"})
                return
            try:
                ms = step_ms(weights, xs, launch)
            except Exception as exc:  # a setting that does not compile is recorded, not fatal
                tried.append({**dataclasses.asdict(launch), "error": repr(exc)[:300]})
                print(f"rows {rows} {launch.label()}: failed {repr(exc)[:120]}", flush=True)
                return
            tried.append({**dataclasses.asdict(launch), "step_ms": ms})
            print(f"rows {rows} {launch.label():>24}: {ms:6.2f} ms per token ({LAYERS} layers' projections)",
                  flush=True)  # fmt: skip

        score(nf4_matmul.LAUNCHES[rows])
        first = _m1_configs() if rows == 1 else _m8_configs(nf4_matmul.LAUNCHES[rows].programs_per_sm)
        for launch in first:
            score(launch)
        ok = [r for r in tried if "error" not in r]
        if rows == 1 and ok:
            best = NF4MatmulLaunch(
                **{k: v for k, v in min(ok, key=lambda r: r["step_ms"]).items() if k != "step_ms"}
            )
            for launch in _around(best):
                score(launch)
        results[rows] = tried
    return results


def captured(fn) -> torch.cuda.CUDAGraph:
    """A CUDA graph of fn, captured after a warm-up that compiles everything, replayed once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def graph_step_ms(fn, reps: int = 10) -> float:
    """ms of one replay of a CUDA graph of fn (`captured`)."""
    graph = captured(fn)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def graph_steps(device, weights, launches: dict[str, NF4MatmulLaunch | None], rows: int) -> dict:
    """One decoding step's projections (LAYERS x 7 launches on the same 7 weights, 109 MB of NF4 per layer:
    more than L2, so little is reused between layers) replayed from a CUDA graph."""
    xs = {k: torch.randn(rows, k, device=device, dtype=torch.bfloat16) for _, _, k, _ in SHAPES}
    scratch = torch.empty(max(q.numel() for q, _ in weights), device=device, dtype=torch.bfloat16)
    out = {}
    for label, launch in launches.items():
        out[f"nf4_matmul {label}"] = graph_step_ms(
            lambda launch=launch: [nf4_matmul_triton(xs[q.shape[1]], q, launch=launch)
                                   for _ in range(LAYERS) for q, _ in weights])  # fmt: skip
    out["dequant+cublas"] = graph_step_ms(
        lambda: [xs[q.shape[1]] @ dequantize_nf4_triton(q, out=scratch[: q.numel()]).view(q.shape).t()
                 for _ in range(LAYERS) for q, _ in weights])  # fmt: skip
    out["cublas_bf16"] = graph_step_ms(
        lambda: [xs[w.shape[1]] @ w.t() for _ in range(LAYERS) for _, w in weights]
    )
    bytes_nf4 = LAYERS * sum(_bytes_nf4(*q.shape) for q, _ in weights)
    for key, ms in out.items():
        print(
            f"graph, rows {rows}: {key:>28} {ms:6.2f} ms per token"
            + (f" ({bytes_nf4 / (ms * 1e-3) / 1e9:5.0f} GB/s of NF4)" if key.startswith("nf4") else ""),
            flush=True,
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    t0 = T0
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "defaults": {str(m): dataclasses.asdict(v) for m, v in nf4_matmul.LAUNCHES.items()},
                    "max_rows": nf4_matmul.MAX_ROWS}  # fmt: skip

    def save():
        (args.out / "nf4_matmul_gpu_check.json").write_text(json.dumps(report, indent=1))

    report["numerics"] = numerics(device)
    bad = [r for r in report["numerics"] if not r["ok"]]
    print(f"numerics: {len(report['numerics']) - len(bad)} of {len(report['numerics'])} ok "
          f"({time.time() - t0:.0f} s)", flush=True)  # fmt: skip
    for r in bad:
        print("  FAILED", r)
    save()
    report["timings"] = timings(device)
    report["recommended_max_rows"] = recommended_max_rows(report["timings"])
    save()
    print(f"timings done ({time.time() - t0:.0f} s); kernel beats dequantize + cuBLAS up to "
          f"{report['recommended_max_rows']} rows", flush=True)  # fmt: skip
    weights = _layer_weights(device)
    best: dict[int, NF4MatmulLaunch] = {}
    if not args.no_sweep:
        report["sweep"] = sweep(device, weights)
        save()
        for rows, tried in report["sweep"].items():
            ok = [r for r in tried if "error" not in r]
            if ok:
                pick = min(ok, key=lambda r: r["step_ms"])
                best[rows] = NF4MatmulLaunch(**{k: v for k, v in pick.items() if k != "step_ms"})
                print(
                    f"best at {rows} row(s): {best[rows].label()} {pick['step_ms']:.2f} ms per token",
                    flush=True,
                )
    report["graph"] = {}
    for rows in (1, 8):
        launches = {"default": None, **({"best": best[rows]} if rows in best else {})}
        report["graph"][rows] = graph_steps(device, weights, launches, rows)
        save()
    print("\nsettings to paste into velotune/quant/nf4_matmul.py (rows not swept keep their defaults):")
    for rows, launch in best.items():
        print(f"    {rows}: {launch!r},")
    print(f"MAX_ROWS = {report['recommended_max_rows']}")
    report["best"] = {str(rows): dataclasses.asdict(launch) for rows, launch in best.items()}
    report["seconds"] = time.time() - t0
    save()
    print(f"done in {report['seconds']:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
