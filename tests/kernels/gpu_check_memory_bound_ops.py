"""GPU check of the memory-bound kernels (rms_norm, apply_rotary, gated_activation): compiled Triton,
bf16 and fp32 numerics, then fwd/bwd timings against the PyTorch reference at Llama-8B sizes.

Not collected by pytest (it needs CUDA and compiled Triton, while tests/kernels runs the interpreter).
Run from the repo root:   python tests/kernels/gpu_check_memory_bound_ops.py [--out results.json]
Exit status 1 if any numeric check fails. `--smoke` runs tiny sizes (CPU under TRITON_INTERPRET=1 works).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from velotune.kernels.activations import GatedActivationFunction, gated_activation_reference
from velotune.kernels.rmsnorm import RMSNormFunction, rms_norm_reference
from velotune.kernels.rope import RotaryFunction, apply_rotary_reference

GB = 1e9


def _as_tuple(o):
    return o if isinstance(o, tuple) else (o,)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _fwd_bwd(fn, inputs, grad_seed=0):
    """Outputs and gradients (of the inputs that require grad) of fn(*inputs) for a fixed random dy."""
    outs = _as_tuple(fn(*inputs))
    gen = torch.Generator(device=outs[0].device).manual_seed(grad_seed)
    dys = [
        torch.randn(o.shape, generator=gen, device=o.device, dtype=torch.float32).to(o.dtype) for o in outs
    ]
    diff = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(outs, diff, dys)
    return [o.detach() for o in outs] + list(grads)


def _cases(dev, smoke):
    n, h, inter, hq, hk, d = (37, 96, 200, 4, 2, 64) if smoke else (8192, 4096, 14336, 32, 8, 128)
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=dev) * scale

    pos = torch.arange(n, device=dev)[None].float()
    inv = 1.0 / 500000.0 ** (torch.arange(0, d, 2, device=dev).float() / d)
    emb = torch.cat([pos[..., None] * inv] * 2, -1)
    cos, sin = emb.cos(), emb.sin()
    qkv = rnd(1, n, (hq + 2 * hk) * d).view(1, n, hq + 2 * hk, d)
    bf, i2 = 2, n * h
    return [
        # name, triton fn, reference fn, make inputs(dtype) -> tuple, differentiable mask, floor bytes (bf16)
        (
            "rms_norm  w trainable",
            lambda x, w: RMSNormFunction.apply(x, w, 1e-5, 0.0),
            lambda x, w: rms_norm_reference(x, w, 1e-5, 0.0),
            lambda dt: (
                rnd(1, n, h).to(dt).requires_grad_(),
                (1 + rnd(h, scale=0.1)).to(dt).requires_grad_(),
            ),
            2 * i2 * bf + 3 * i2 * bf,
        ),
        (
            "rms_norm  w frozen",
            lambda x, w: RMSNormFunction.apply(x, w, 1e-5, 0.0),
            lambda x, w: rms_norm_reference(x, w, 1e-5, 0.0),
            lambda dt: (rnd(1, n, h).to(dt).requires_grad_(), (1 + rnd(h, scale=0.1)).to(dt)),
            2 * i2 * bf + 3 * i2 * bf,
        ),
        (
            "rms_norm  gemma (1+w)",
            lambda x, w: RMSNormFunction.apply(x, w, 1e-6, 1.0),
            lambda x, w: rms_norm_reference(x, w, 1e-6, 1.0),
            lambda dt: (rnd(1, n, h).to(dt).requires_grad_(), rnd(h, scale=0.1).to(dt).requires_grad_()),
            2 * i2 * bf + 3 * i2 * bf,
        ),
        (
            "rope q/k views of qkv",
            RotaryFunction.apply,
            apply_rotary_reference,
            lambda dt: (
                *(t.requires_grad_() for t in qkv.to(dt).split([hq, hk, hk], 2)[:2]),
                cos.to(dt),
                sin.to(dt),
            ),
            2 * (2 * n * (hq + hk) * d * bf + 2 * n * d * bf),
        ),
        (
            "swiglu",
            lambda x: GatedActivationFunction.apply(x, "silu"),
            lambda x: gated_activation_reference(x, "silu"),
            lambda dt: (rnd(1, n, 2 * inter, scale=2).to(dt).requires_grad_(),),
            (3 * n * inter + 5 * n * inter) * bf,
        ),
        (
            "geglu tanh",
            lambda x: GatedActivationFunction.apply(x, "gelu_tanh"),
            lambda x: gated_activation_reference(x, "gelu_tanh"),
            lambda dt: (rnd(1, n, 2 * inter, scale=2).to(dt).requires_grad_(),),
            (3 * n * inter + 5 * n * inter) * bf,
        ),
    ]


def _time_ms(fn, iters, dev):
    for _ in range(3):
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="memory_bound_ops.json")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ok, rows = True, []
    for name, tri, ref, make, floor in _cases(dev, args.smoke):
        # fp32: Triton vs reference. bf16: Triton's and the reference's error, both against float64.
        x32 = make(torch.float32)
        err32 = max(_rel(a, b) for a, b in zip(_fwd_bwd(tri, x32), _fwd_bwd(ref, x32)))
        xbf = make(torch.bfloat16)
        x64 = [t.detach().double().requires_grad_(t.requires_grad) for t in xbf]
        exact = _fwd_bwd(ref, x64)
        err_tri = max(_rel(a, b) for a, b in zip(_fwd_bwd(tri, xbf), exact))
        err_ref = max(_rel(a, b) for a, b in zip(_fwd_bwd(ref, xbf), exact))
        good = err32 < 1e-5 and err_tri <= 1.5 * err_ref + 1e-3
        ok &= good

        timings = {}
        for label, fn in (("triton", tri), ("torch", ref)):
            outs = _as_tuple(fn(*xbf))
            dys = [torch.randn_like(o) for o in outs]
            diff = [t for t in xbf if t.requires_grad]
            fwd = _time_ms(lambda fn=fn: fn(*xbf), args.iters, dev)
            both = _time_ms(
                lambda fn=fn: torch.autograd.grad(_as_tuple(fn(*xbf)), diff, dys), args.iters, dev
            )
            timings[label] = (fwd, both - fwd, both)
        tri_total = timings["triton"][2]
        rows.append(
            {
                "op": name,
                "fp32_rel_err": err32,
                "bf16_rel_err_triton": err_tri,
                "bf16_rel_err_torch": err_ref,
                "numerics_ok": good,
                "triton_ms_fwd_bwd_total": timings["triton"],
                "torch_ms_fwd_bwd_total": timings["torch"],
                "floor_bytes_fwd_bwd": floor,
                "triton_GBps_vs_floor": floor / GB / (tri_total / 1e3),
            }
        )
    print(
        f"device: {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}  torch {torch.__version__}"
    )
    hdr = f"{'op':24} {'fp32 err':>9} {'bf16 tri':>9} {'bf16 ref':>9} {'ok':>3} "
    hdr += f"{'tri fwd':>8} {'tri bwd':>8} {'ref fwd':>8} {'ref bwd':>8} {'floor MB':>9} {'GB/s':>7}"
    print(hdr)
    for r in rows:
        t, p = r["triton_ms_fwd_bwd_total"], r["torch_ms_fwd_bwd_total"]
        print(
            f"{r['op']:24} {r['fp32_rel_err']:9.1e} {r['bf16_rel_err_triton']:9.1e} "
            f"{r['bf16_rel_err_torch']:9.1e} {'y' if r['numerics_ok'] else 'N':>3} "
            f"{t[0]:8.3f} {t[1]:8.3f} {p[0]:8.3f} {p[1]:8.3f} {r['floor_bytes_fwd_bwd'] / 1e6:9.1f} "
            f"{r['triton_GBps_vs_floor']:7.0f}"
        )
    with open(args.out, "w") as f:
        json.dump({"device": str(dev), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
