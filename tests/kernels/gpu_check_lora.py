"""GPU check of the fused LoRA projection: numerics of the hand-written Function against the
reference (fp32, and bf16 against float64 truth with the reference's own bf16 error as yardstick),
then forward+backward time and peak extra memory at Llama-3.1-8B shapes (4096 tokens, hidden 4096,
q/k/v 4096/1024/1024, gate/up 2 x 14336, down 14336 -> 4096, r=16, bf16 base, fp32 LoRA weights)
against the plain-autograd reference and a PEFT-style layout (one nn.Linear per projection, LoRA
computed in float32 as PEFT does with its default autocast_adapter_dtype=True).

Not collected by pytest. Run from the repo root:   python tests/kernels/gpu_check_lora.py [--out lora.json]
Exit status 1 if a numeric check fails. `--smoke` runs tiny sizes (works on CPU; no timings there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from velotune.kernels.lora import LoraProjectionFunction, lora_layout, lora_projection_reference


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _make(tokens, in_features, out_sizes, r, dev, dtype, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    k = len(out_sizes)
    return dict(
        x=torch.randn(tokens, in_features, generator=g, device=dev).to(dtype),
        weight=(torch.randn(sum(out_sizes), in_features, generator=g, device=dev) * in_features**-0.5).to(
            dtype
        ),
        lora_a=torch.randn(k * r, in_features, generator=g, device=dev) * in_features**-0.5,
        lora_bs=[torch.randn(size, r, generator=g, device=dev) * 0.05 for size in out_sizes],
        out_sizes=tuple(out_sizes),
        scales=(2.0,) * k,
    )


def _fused(x, weight, lora_a, lora_bs, out_sizes, scales):
    layout = lora_layout(x.shape[-1], out_sizes, scales, [b.shape[1] for b in lora_bs])
    return LoraProjectionFunction.apply(x, None, weight, None, lora_a, layout, *lora_bs)


def _reference(x, weight, lora_a, lora_bs, out_sizes, scales):
    return lora_projection_reference(x, weight, None, lora_a, lora_bs, out_sizes, scales)


def _peft_style(x, weight, lora_a, lora_bs, out_sizes, scales):
    """One base linear per projection; the LoRA branch in the adapter's dtype (float32), as PEFT runs it."""
    outs, row, col = [], 0, 0
    for size, b, s in zip(out_sizes, lora_bs, scales):
        r = b.shape[1]
        base = F.linear(x, weight[row : row + size])
        lora = F.linear(F.linear(x.to(lora_a.dtype), lora_a[col : col + r]), b) * s
        outs.append((base + lora).to(x.dtype))
        row, col = row + size, col + r
    return torch.cat(outs, dim=-1)


def _run(fn, case, dy_seed=1):
    x = case["x"].detach().clone().requires_grad_(True)
    a = case["lora_a"].detach().clone().requires_grad_(True)
    bs = [b.detach().clone().requires_grad_(True) for b in case["lora_bs"]]
    y = fn(x, case["weight"], a, bs, case["out_sizes"], case["scales"])
    g = torch.Generator(device=y.device).manual_seed(dy_seed)
    y.backward(torch.randn(y.shape, generator=g, device=y.device).to(y.dtype))
    return [y.detach(), x.grad, a.grad, *[b.grad for b in bs]]


def numerics(dev: str, smoke: bool) -> list[dict]:
    tokens, hidden, sizes = (37, 40, (48, 16, 16)) if smoke else (1000, 1024, (1024, 256, 256))
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        case = _make(tokens, hidden, sizes, 8, dev, dtype)
        got, ref = _run(_fused, case), _run(_reference, case)
        exact_case = dict(case, x=case["x"].double(), weight=case["weight"].double(),
                          lora_a=case["lora_a"].double(), lora_bs=[b.double() for b in case["lora_bs"]])  # fmt: skip
        exact = _run(_reference, exact_case)
        names = ["y", "dx", "dA"] + [f"dB{i}" for i in range(len(sizes))]
        for name, g, r, e in zip(names, got, ref, exact):
            err, ref_err = _rel(g, r), _rel(r, e)
            ok = err < 1e-5 if dtype == torch.float32 else _rel(g, e) <= 2 * ref_err + 1e-3
            rows.append(
                dict(dtype=str(dtype), tensor=name, rel_err_vs_ref=err, ref_rel_err_vs_fp64=ref_err, ok=ok)
            )
    return rows


def _measure(fn, case, reps):
    times, peaks = [], []
    for i in range(reps + 2):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        out = _run(fn, case)
        torch.cuda.synchronize()
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - start)
            peaks.append(torch.cuda.max_memory_allocated() - base)
        del out
    return statistics.median(times) * 1e3, max(peaks) / 2**20


def timings(reps: int) -> list[dict]:
    tokens, r = 4096, 16
    layers = {"qkv": (4096, (4096, 1024, 1024)), "gate_up": (4096, (14336, 14336)), "down": (14336, (4096,))}
    rows = []
    for layer, (in_features, sizes) in layers.items():
        case = _make(tokens, in_features, sizes, r, "cuda", torch.bfloat16)
        flops = 3 * 2 * tokens * in_features * sum(sizes)  # base forward + dx (dW frozen), as a yardstick
        for system, fn in (("fused", _fused), ("reference", _reference), ("peft_style", _peft_style)):
            ms, peak = _measure(fn, case, reps)
            rows.append(
                dict(layer=layer, system=system, ms=ms, tflops_base=flops / ms / 1e9, peak_extra_mib=peak)
            )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows = numerics(dev, args.smoke)
    failed = [row for row in rows if not row["ok"]]
    for row in rows:
        print(f"{row['dtype']:>15} {row['tensor']:>4}  vs ref {row['rel_err_vs_ref']:.2e}  "
              f"ref vs fp64 {row['ref_rel_err_vs_fp64']:.2e}  {'ok' if row['ok'] else 'FAIL'}")  # fmt: skip
    timing_rows = []
    if dev == "cuda" and not args.smoke:
        timing_rows = timings(args.reps)
        print(f"\n{'layer':>8} {'system':>11} {'fwd+bwd ms':>11} {'base TFLOP/s':>13} {'peak extra MiB':>15}")
        for row in timing_rows:
            print(f"{row['layer']:>8} {row['system']:>11} {row['ms']:>11.3f} {row['tflops_base']:>13.1f} "
                  f"{row['peak_extra_mib']:>15.1f}")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                           torch=torch.__version__, numerics=rows, timings=timing_rows), f, indent=2)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
