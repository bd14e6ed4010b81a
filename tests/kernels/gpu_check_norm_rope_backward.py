"""GPU check of the rms_norm and rope backward kernels alone: compiled numerics, then device time of
the backward kernels (no autograd, no Python in the timed number) next to their forward, at Llama-8B
sizes (8192 tokens, hidden 4096, 32 q / 8 kv heads of 128, bf16).

gpu_check_memory_bound_ops.py times fwd+bwd through autograd for 20 iterations; at these sizes a
kernel takes ~0.1 ms, so host overhead (autograd engine, its device thread, Python, Triton's launcher)
can be what it measures. Here each row reports, for the same call:
  * kernel_ms: GPU time of every kernel the call launches, from torch.profiler (what the GPU costs),
  * loop_ms:   CUDA-event time of `iters` back-to-back calls of the launch function (kernel + gaps),
  * GB/s:      floor bytes / kernel_ms.
rms_norm's dW launch is swept over DW_PROGRAMS_PER_SM so the best value can be read off.

Not collected by pytest. Run from the repo root:
    python tests/kernels/gpu_check_norm_rope_backward.py [--out norm_rope_backward.json] [--iters 200]
`--smoke` runs tiny sizes (CPU under TRITON_INTERPRET=1 works; no profiler times there).
Exit status 1 if a numeric check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from velotune.kernels import rmsnorm
from velotune.kernels.rmsnorm import rms_norm_backward, rms_norm_forward, rms_norm_reference
from velotune.kernels.rope import RotaryFunction, apply_rotary_reference, rope_launch


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _loop_ms(fn, iters: int, dev: torch.device) -> float:
    for _ in range(5):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def _kernel_ms(fn, iters: int, dev: torch.device) -> float | None:
    """Mean GPU time per call of every kernel the call launches (torch.profiler device events)."""
    if dev.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total_us = sum(
        e.time_range.elapsed_us() for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
    )
    return total_us / 1e3 / iters


def _grads(fn, inputs, dys):
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    diff = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return [o.detach() for o in outs] + list(torch.autograd.grad(outs, diff, dys))


def _check(name, tri, ref, make, dev) -> dict:
    """fp32: Triton vs reference. bf16: Triton's and the reference's error against float64."""
    row = {"op": name}
    x32 = make(torch.float32)
    outs = tri(*x32)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator(device=dev).manual_seed(1)
    dys32 = [torch.randn(o.shape, generator=gen, device=dev) for o in outs]
    row["fp32_rel_err"] = max(_rel(a, b) for a, b in zip(_grads(tri, x32, dys32), _grads(ref, x32, dys32)))
    xbf = make(torch.bfloat16)
    dys = [d.bfloat16() for d in dys32]
    x64 = [t.detach().double().requires_grad_(t.requires_grad) for t in xbf]
    exact = _grads(ref, x64, [d.double() for d in dys])
    row["bf16_rel_err_triton"] = max(_rel(a, b) for a, b in zip(_grads(tri, xbf, dys), exact))
    row["bf16_rel_err_torch"] = max(_rel(a, b) for a, b in zip(_grads(ref, xbf, dys), exact))
    row["numerics_ok"] = row["fp32_rel_err"] < 1e-5 and (
        row["bf16_rel_err_triton"] <= 1.5 * row["bf16_rel_err_torch"] + 1e-3
    )
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="norm_rope_backward.json")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n, h, hq, hk, d = (37, 96, 4, 2, 64) if args.smoke else (8192, 4096, 32, 8, 128)
    iters = 3 if args.smoke else args.iters
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=dev) * scale

    pos = torch.arange(n, device=dev)[None].float()
    inv = 1.0 / 500000.0 ** (torch.arange(0, d, 2, device=dev).float() / d)
    emb = torch.cat([pos[..., None] * inv] * 2, -1)
    cos32, sin32 = emb.cos(), emb.sin()
    qkv32 = rnd(1, n, (hq + 2 * hk) * d).view(1, n, hq + 2 * hk, d)

    ok, checks, rows = True, [], []
    # 1. Numerics of the compiled kernels (gradients of every differentiable input).
    for name, offset, train_w in (
        ("rms_norm w trainable", 0.0, True),
        ("rms_norm w frozen", 0.0, False),
        ("rms_norm gemma (1+w)", 1.0, True),
        ("rms_norm gemma frozen", 1.0, False),
    ):
        x0, w0 = rnd(1, n, h), (1 - offset) + rnd(h, scale=0.1)

        def make(dt, x0=x0, w0=w0, train_w=train_w):
            return x0.to(dt).requires_grad_(), w0.to(dt).requires_grad_(train_w)

        checks.append(
            _check(
                name,
                lambda x, w, o=offset: rmsnorm.RMSNormFunction.apply(x, w, 1e-5, o),
                lambda x, w, o=offset: rms_norm_reference(x, w, 1e-5, o),
                make,
                dev,
            )
        )

    def make_rope(dt):
        q, k, _ = qkv32.to(dt).split([hq, hk, hk], 2)
        return q.requires_grad_(), k.requires_grad_(), cos32.to(dt), sin32.to(dt)

    checks.append(
        _check("rope q/k views of qkv", RotaryFunction.apply, apply_rotary_reference, make_rope, dev)
    )
    for c in checks:
        ok &= c["numerics_ok"]

    # 2. Device time: forward vs backward launch functions, bf16.
    x = rnd(1, n, h).bfloat16()
    w = (1 + rnd(h, scale=0.1)).bfloat16()
    dy = rnd(1, n, h).bfloat16()
    row_bytes = n * h * 2
    for offset in (0.0, 1.0):
        _, rstd = rms_norm_forward(x, w, 1e-5, offset)
        form = "gemma" if offset else "llama"
        cases = [(f"rms_norm fwd ({form})", lambda o=offset: rms_norm_forward(x, w, 1e-5, o), 2 * row_bytes)]
        cases.append(
            (
                f"rms_norm bwd frozen ({form})",
                lambda o=offset, r=rstd: rms_norm_backward(dy, x, w, r, o, False),
                3 * row_bytes,
            )
        )
        for per_sm in (1, 2, 4, 8):

            def bwd_dw(o=offset, r=rstd, per_sm=per_sm):
                saved = rmsnorm.DW_PROGRAMS_PER_SM
                rmsnorm.DW_PROGRAMS_PER_SM = per_sm
                try:
                    return rms_norm_backward(dy, x, w, r, o, True)
                finally:
                    rmsnorm.DW_PROGRAMS_PER_SM = saved

            cases.append((f"rms_norm bwd dW {per_sm}/SM ({form})", bwd_dw, 3 * row_bytes))
        for label, fn, floor in cases:
            rows.append(
                {
                    "op": label,
                    "kernel_ms": _kernel_ms(fn, iters, dev),
                    "loop_ms": _loop_ms(fn, iters, dev),
                    "floor_bytes": floor,
                }
            )

    # q-norm shape (Qwen3 / Gemma 3): rows of head_dim, one per token and head.
    xh, dyh = rnd(n * hq, d).bfloat16(), rnd(n * hq, d).bfloat16()
    wh = (1 + rnd(d, scale=0.1)).bfloat16()
    _, rstd_h = rms_norm_forward(xh, wh, 1e-6)
    head_cases = [
        ("rms_norm bwd frozen (q norm, 128)", lambda: rms_norm_backward(dyh, xh, wh, rstd_h, 0.0, False))
    ]
    for per_sm in (1, 2, 4, 8):

        def bwd_dw_head(per_sm=per_sm):
            saved = rmsnorm.DW_PROGRAMS_PER_SM
            rmsnorm.DW_PROGRAMS_PER_SM = per_sm
            try:
                return rms_norm_backward(dyh, xh, wh, rstd_h, 0.0, True)
            finally:
                rmsnorm.DW_PROGRAMS_PER_SM = saved

        head_cases.append((f"rms_norm bwd dW {per_sm}x (q norm, 128)", bwd_dw_head))
    for label, fn in head_cases:
        rows.append(
            {
                "op": label,
                "kernel_ms": _kernel_ms(fn, iters, dev),
                "loop_ms": _loop_ms(fn, iters, dev),
                "floor_bytes": 3 * n * hq * d * 2,
            }
        )

    q, k, _ = qkv32.bfloat16().split([hq, hk, hk], 2)
    cos, sin = cos32.bfloat16(), sin32.bfloat16()
    dq, dk = torch.randn_like(q.contiguous()), torch.randn_like(k.contiguous())
    rope_bytes = 2 * n * (hq + hk) * d * 2 + 2 * n * d * 2
    for label, fn in (
        ("rope fwd (q/k views of qkv)", lambda: rope_launch(q, k, cos, sin)),
        ("rope bwd", lambda: rope_launch(dq, dk, cos, sin, backward=True)),
    ):
        rows.append(
            {
                "op": label,
                "kernel_ms": _kernel_ms(fn, iters, dev),
                "loop_ms": _loop_ms(fn, iters, dev),
                "floor_bytes": rope_bytes,
            }
        )
    # The autograd-driven fwd+bwd, timed over `iters` (the other script uses 20).
    qr, kr = q.detach().requires_grad_(), k.detach().requires_grad_()
    outs = RotaryFunction.apply(qr, kr, cos, sin)
    dys = [torch.randn_like(o) for o in outs]
    rows.append(
        {
            "op": "rope fwd+bwd via autograd",
            "kernel_ms": _kernel_ms(
                lambda: torch.autograd.grad(RotaryFunction.apply(qr, kr, cos, sin), [qr, kr], dys),
                iters,
                dev,
            ),
            "loop_ms": _loop_ms(
                lambda: torch.autograd.grad(RotaryFunction.apply(qr, kr, cos, sin), [qr, kr], dys), iters, dev
            ),
            "floor_bytes": 2 * rope_bytes,
        }
    )
    xr = x.detach().requires_grad_()
    rows.append(
        {
            "op": "rms_norm frozen fwd+bwd via autograd",
            "kernel_ms": _kernel_ms(
                lambda: torch.autograd.grad(rmsnorm.RMSNormFunction.apply(xr, w, 1e-5, 0.0), [xr], dy),
                iters,
                dev,
            ),
            "loop_ms": _loop_ms(
                lambda: torch.autograd.grad(rmsnorm.RMSNormFunction.apply(xr, w, 1e-5, 0.0), [xr], dy),
                iters,
                dev,
            ),
            "floor_bytes": 5 * row_bytes,
        }
    )
    for r in rows:
        t = r["kernel_ms"] or r["loop_ms"]
        r["GBps_vs_floor"] = r["floor_bytes"] / 1e9 / (t / 1e3)

    print(
        f"device: {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}  torch {torch.__version__}"
    )
    print(f"{'check':28} {'fp32 err':>9} {'bf16 tri':>9} {'bf16 ref':>9} ok")
    for c in checks:
        print(
            f"{c['op']:28} {c['fp32_rel_err']:9.1e} {c['bf16_rel_err_triton']:9.1e} "
            f"{c['bf16_rel_err_torch']:9.1e} {'y' if c['numerics_ok'] else 'N'}"
        )
    print(f"{'op':36} {'kernel ms':>9} {'loop ms':>8} {'floor MB':>9} {'GB/s':>6}")
    for r in rows:
        k_ms = f"{r['kernel_ms']:9.3f}" if r["kernel_ms"] is not None else f"{'-':>9}"
        print(
            f"{r['op']:36} {k_ms} {r['loop_ms']:8.3f} {r['floor_bytes'] / 1e6:9.1f} {r['GBps_vs_floor']:6.0f}"
        )
    with open(args.out, "w") as f:
        json.dump(
            {"device": str(dev), "torch": torch.__version__, "checks": checks, "rows": rows}, f, indent=1
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
