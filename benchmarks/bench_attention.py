"""Attention benchmark on CUDA: velotune's Triton kernel against SDPA and FlexAttention.

    python -m benchmarks.bench_attention [--cases llama,packed,window,gemma,gemma_window] [--out-dir DIR]

1. Correctness first, at small sizes: the Triton kernel (fixed tiles: 64x64, 32x32 for head_dim
   256) against `attention_reference` in float32 (relative error < 1e-4) and in bf16 (error against the
   float32 reference of the same bf16 inputs at most 2x the bf16 reference's own error, plus 1e-3),
   outputs and dq/dk/dv, over plain causal, GQA, odd head dims, packed documents, padding, sliding
   window and softcap.
2. Timing (triton.testing.do_bench, median) of forward and forward+backward at Llama-3.1-8B shapes
   (32 query / 8 kv heads, head_dim 128, bf16): 1x8192 causal; 4 packed documents of 2048; sliding
   window 4096 over 8192; and Gemma-2 shapes (16 / 8 heads, head_dim 256, softcap 50) causal and
   with window 4096. Peers: SDPA (enable_gqa, is_causal; its default backend and pinned to flash
   and to cuDNN; the packed documents as a [4, 2048] batch, the same work) and compiled
   FlexAttention with the matching block mask. Each peer's output and gradients are compared with
   ours at full size, which checks the tuned tile configs too (the autotuner's choices are printed:
   TRITON_PRINT_AUTOTUNING=1). TFLOP/s count 4*D*Hq FLOPs per visible query-key pair in the forward
   (causal: 4*T^2*Hq*D/2) and 2.5x that in the backward.
Writes `attention-<device>.md` (and `.json`) into --out-dir (default benchmarks/results) after every
case, so a run cut short keeps what it measured; results of earlier runs on the same device are kept
unless re-measured, so the work can be split over several commands, e.g.
    python -m benchmarks.bench_attention --cases llama,packed
    python -m benchmarks.bench_attention --skip-checks --cases window,gemma,gemma_window
Exit status 1 when a correctness check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_PRINT_AUTOTUNING", "1")  # the chosen tile configs go to the log

if __package__ in (None, ""):  # run as a script: make `velotune` and `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import triton
import triton.testing

from velotune.kernels import attention as attn

LLAMA = dict(n_heads=32, n_kv=8, head_dim=128)
GEMMA = dict(n_heads=16, n_kv=8, head_dim=256)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_inputs(batch, q_len, kv_len, n_heads, n_kv, head_dim, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, q_len, n_heads, head_dim, generator=gen, device=device).to(dtype)
    k = torch.randn(batch, kv_len, n_kv, head_dim, generator=gen, device=device).to(dtype)
    v = torch.randn(batch, kv_len, n_kv, head_dim, generator=gen, device=device).to(dtype)
    dout = torch.randn(batch, q_len, n_heads, head_dim, generator=gen, device=device).to(dtype)
    return q, k, v, dout


def fwd_bwd(fn, q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


# ---------------------------------------------------------------------------------------------
# 1. correctness at small sizes

CHECKS = [
    # name, (batch, q_len, kv_len, n_heads, n_kv, head_dim), options
    ("causal", (2, 300, 300, 4, 4, 64), {}),
    ("gqa 3, head_dim 80", (1, 257, 257, 6, 2, 80), {}),
    ("head_dim 96, decode-style S>T", (2, 37, 300, 4, 2, 96), {}),
    ("head_dim 256, softcap 50", (1, 300, 300, 4, 2, 256), {"softcap": 50.0}),
    ("packed 3 docs", (1, 333, 333, 4, 2, 128), {"cu_seqlens": [0, 100, 101, 333]}),
    ("window 64 + packed", (1, 333, 333, 4, 2, 128), {"sliding_window": 64, "cu_seqlens": [0, 200, 333]}),
    ("left/right padding", (3, 200, 200, 4, 2, 128), {"padding": True}),
    (
        "everything",
        (1, 300, 300, 8, 2, 64),
        {"sliding_window": 50, "softcap": 20.0, "cu_seqlens": [0, 150, 300]},
    ),
]


def _options(opts: dict, batch: int, kv_len: int, device) -> dict:
    out = {k: v for k, v in opts.items() if k not in ("cu_seqlens", "padding")}
    if "cu_seqlens" in opts:
        out["cu_seqlens"] = torch.tensor(opts["cu_seqlens"], dtype=torch.int32, device=device)
    if opts.get("padding"):
        mask = torch.ones(batch, kv_len, dtype=torch.long, device=device)
        mask[0, : kv_len // 5] = 0
        if batch > 1:
            mask[1, kv_len // 2 :] = 0
        out["key_padding_mask"] = mask
    return out


def run_checks(device) -> tuple[list[dict], bool]:
    rows, ok_all = [], True
    for name, shape, opts in CHECKS:
        for blocks in ((64, 64) if shape[5] <= 128 else (32, 32),):
            kw = _options(opts, shape[0], shape[2], device)
            scale = shape[5] ** -0.5

            def ours(q, k, v, kw=kw, blocks=blocks):
                return attn.attention_triton(q, k, v, scale=scale, blocks=blocks, **kw)

            def ref(q, k, v, kw=kw):
                return attn.attention_reference(q, k, v, scale=scale, **kw)

            # float32: the kernel multiplies in full float32 (IEEE dots), so it must agree closely.
            q, k, v, dout = make_inputs(*shape, torch.float32, device)
            got, want = fwd_bwd(ours, q, k, v, dout), fwd_bwd(ref, q, k, v, dout)
            err32 = max(rel(a, b) for a, b in zip(got, want))
            # bf16: judged against the float32 result of the same bf16 inputs, next to the bf16
            # reference's own error there.
            qb, kb, vb, db = (t.to(torch.bfloat16) for t in (q, k, v, dout))
            truth = fwd_bwd(ref, qb.float(), kb.float(), vb.float(), db.float())
            got16 = fwd_bwd(ours, qb, kb, vb, db)
            ref16 = fwd_bwd(ref, qb, kb, vb, db)
            err16 = max(rel(a, b) for a, b in zip(got16, truth))
            noise16 = max(rel(a, b) for a, b in zip(ref16, truth))
            finite = all(torch.isfinite(t).all() for t in got + got16)
            ok = finite and err32 < 1e-4 and err16 <= 2 * noise16 + 1e-3
            ok_all &= ok
            row = dict(name=name, blocks="%dx%d" % blocks, err32=err32, err16=err16, noise16=noise16, ok=ok)
            rows.append(row)
            print(
                f"[check] {name:32s} {row['blocks']:6s} fp32 {err32:.2e}  bf16 {err16:.2e} "
                f"(bf16 reference {noise16:.2e})  {'ok' if ok else 'FAIL'}",
                flush=True,
            )
    return rows, ok_all


# ---------------------------------------------------------------------------------------------
# 2. timing at model sizes


def visible_pairs(q_len: int, window: int | None, docs: list[int]) -> int:
    total = 0
    for n in docs:
        i = torch.arange(n, dtype=torch.float64)
        seen = i + 1 if window is None else torch.clamp(i + 1, max=window)
        total += int(seen.sum())
    return total


CASES = {
    # name: (shape dict, total tokens, docs, window, softcap)
    "llama": (LLAMA, 8192, [8192], None, None),
    "packed": (LLAMA, 8192, [2048] * 4, None, None),
    "window": (LLAMA, 8192, [8192], 4096, None),
    "gemma": (GEMMA, 8192, [8192], None, 50.0),
    "gemma_window": (GEMMA, 8192, [8192], 4096, 50.0),
}


def _flex_fn(docs, window, softcap, scale, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    total = sum(docs)
    doc_id = torch.repeat_interleave(
        torch.arange(len(docs), device=device), torch.tensor(docs, device=device)
    )

    def mask_mod(b, h, q_idx, kv_idx):
        keep = (q_idx >= kv_idx) & (doc_id[q_idx] == doc_id[kv_idx])
        if window is not None:
            keep = keep & (q_idx - kv_idx < window)
        return keep

    block_mask = create_block_mask(mask_mod, None, None, total, total, device=device)
    score_mod = None
    if softcap is not None:

        def score_mod(score, b, h, q_idx, kv_idx):
            return softcap * torch.tanh(score / softcap)

    compiled = torch.compile(flex_attention, dynamic=False)

    def fn(q, k, v):
        out = compiled(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            block_mask=block_mask,
            score_mod=score_mod,
            scale=scale,
            enable_gqa=True,
        )
        return out.transpose(1, 2)

    return fn


def _sdpa_fn(docs, scale, backend=None):
    """`attention_sdpa` (what PLAIN_CAUSAL_BACKEND = "sdpa" runs), optionally pinned to one backend."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    pin = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}.get(backend)

    def fn(q, k, v):
        if len(docs) > 1:  # equal documents as a batch: the same work SDPA can do without a mask
            n = len(docs)
            q, k, v = (t.reshape(n, t.shape[1] // n, *t.shape[2:]) for t in (q, k, v))
        with sdpa_kernel(pin) if pin is not None else nullcontext():
            out = attn.attention_sdpa(q, k, v, scale=scale)
        return out.reshape(1, -1, *out.shape[2:])

    return fn


def bench(fn, q, k, v, dout) -> tuple[float, float]:
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))

    def forward():
        with torch.no_grad():
            fn(q, k, v)

    def step():
        fn(q, k, v).backward(dout)

    forward()
    step()
    t_fwd = triton.testing.do_bench(forward, warmup=25, rep=100, return_mode="median")
    t_step = triton.testing.do_bench(step, warmup=25, rep=100, grad_to_none=[q, k, v], return_mode="median")
    return t_fwd, t_step


def run_case(name, device, skip_flex: bool) -> list[dict]:
    shape, total, docs, window, softcap = CASES[name]
    head_dim, n_heads = shape["head_dim"], shape["n_heads"]
    scale = head_dim**-0.5
    q, k, v, dout = make_inputs(1, total, total, n_heads, shape["n_kv"], head_dim, torch.bfloat16, device)
    kw = {"sliding_window": window, "softcap": softcap}
    if len(docs) > 1:
        bounds = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32, device=device)
        kw["cu_seqlens"] = bounds

    impls = {"velotune triton": lambda q, k, v: attn.attention_triton(q, k, v, scale=scale, **kw)}
    if window is None and softcap is None:
        as_batch = " as 4x2048 batch" if len(docs) > 1 else ""
        for backend in ("default", "flash", "cudnn"):
            impls[f"sdpa ({backend}){as_batch}"] = _sdpa_fn(docs, scale, backend)
    if not skip_flex:
        try:
            impls["flex_attention (compiled)"] = _flex_fn(docs, window, softcap, scale, device)
        except Exception as exc:  # an older torch without FlexAttention
            print(f"[bench] {name}: flex_attention unavailable: {exc!r}", flush=True)

    fwd_flops = 4.0 * head_dim * n_heads * visible_pairs(total, window, docs)
    rows, ours = [], None
    for impl, fn in impls.items():
        row = dict(case=name, impl=impl)
        try:
            t0 = time.time()
            result = fwd_bwd(fn, q, k, v, dout)
            if ours is None:
                ours = result
                row["vs_ours"] = "-"
            else:
                row["vs_ours"] = f"{max(rel(a, b) for a, b in zip(result, ours)):.1e}"
            t_fwd, t_step = bench(fn, q, k, v, dout)
            t_bwd = t_step - t_fwd
            row.update(
                fwd_ms=t_fwd,
                bwd_ms=t_bwd,
                step_ms=t_step,
                fwd_tflops=fwd_flops / t_fwd / 1e9,
                bwd_tflops=2.5 * fwd_flops / t_bwd / 1e9,
                step_tflops=3.5 * fwd_flops / t_step / 1e9,
                setup_s=time.time() - t0 - (t_fwd + t_step) / 1e3,
            )
            print(
                f"[bench] {name:13s} {impl:34s} fwd {t_fwd:7.3f} ms ({row['fwd_tflops']:5.0f} TFLOP/s)  "
                f"bwd {t_bwd:7.3f} ms ({row['bwd_tflops']:5.0f} TFLOP/s)  vs ours {row['vs_ours']}",
                flush=True,
            )
        except Exception as exc:
            row["error"] = repr(exc)[:200]
            print(f"[bench] {name} {impl}: FAILED {exc!r}", flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def write_report(path: Path, meta: dict, checks: list[dict], rows: list[dict]) -> None:
    lines = [
        f"# Attention: velotune Triton vs SDPA vs FlexAttention on {meta['device']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, Python {meta['python']};"
        f" command: `{meta['command']}`",
        "",
        "Forward/backward TFLOP/s count 4*D*Hq FLOPs per visible query-key pair (causal: 4*T^2*Hq*D/2)"
        " and 2.5x that for the backward; bwd ms = (fwd+bwd) - fwd. 'vs ours' is the largest relative"
        " difference of output, dq, dk, dv from velotune's (all bf16).",
        "",
        "## Correctness (small sizes)",
        "",
        "| case | tiles | fp32 rel err | bf16 rel err vs fp32 | bf16 reference's own | ok |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c in checks:
        lines.append(
            f"| {c['name']} | {c['blocks']} | {c['err32']:.2e} | {c['err16']:.2e} | {c['noise16']:.2e} | "
            f"{'yes' if c['ok'] else '**NO**'} |"
        )
    lines += [
        "",
        "## Timing (bf16, 8192 tokens)",
        "",
        "| case | implementation | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s | fwd+bwd ms | vs ours |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['impl']} | failed: {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['case']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_tflops']:.0f} | {r['bwd_ms']:.3f} | "
            f"{r['bwd_tflops']:.0f} | {r['step_ms']:.3f} | {r['vs_ours']} |"
        )
    plain = {r["impl"]: r for r in rows if r["case"] == "llama" and "error" not in r}
    ours, sdpa = plain.get("velotune triton"), plain.get("sdpa (default)")
    if ours and sdpa:
        faster = "sdpa" if sdpa["step_ms"] < ours["step_ms"] else "triton"
        lines += [
            "",
            f"Plain causal (1x8192) fwd+bwd: velotune {ours['step_ms']:.3f} ms, SDPA (its default backend,"
            f" what `attention_sdpa` runs) {sdpa['step_ms']:.3f} ms"
            f' -> `PLAIN_CAUSAL_BACKEND = "{faster}"` in velotune/kernels/attention.py.',
        ]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ",".join(CASES))
    parser.add_argument("--out-dir", action="append", default=None)
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--skip-flex", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    out_dirs = [Path(d) for d in (args.out_dir or ["benchmarks/results"])]
    meta = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        python=platform.python_version(),
        command="python -m benchmarks.bench_attention " + " ".join(argv or sys.argv[1:]),
    )
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", meta["device"]).strip("-").lower()
    previous = out_dirs[0] / f"attention-{slug}.json"
    kept = json.loads(previous.read_text()) if previous.exists() else {"checks": [], "rows": []}
    checks, ok = ([], True) if args.skip_checks else run_checks(device)
    checks = checks or kept["checks"]
    rows: list[dict] = []

    def write():
        fresh = {(r["case"], r["impl"]) for r in rows}
        merged = [r for r in kept["rows"] if (r["case"], r["impl"]) not in fresh] + rows
        order = list(CASES)
        merged.sort(key=lambda r: order.index(r["case"]) if r["case"] in order else len(order))
        for d in out_dirs:
            d.mkdir(parents=True, exist_ok=True)
            write_report(d / f"attention-{slug}.md", meta, checks, merged)
            (d / f"attention-{slug}.json").write_text(
                json.dumps({"checks": checks, "rows": merged}, indent=1)
            )

    write()
    for name in [c for c in args.cases.split(",") if c]:
        rows += run_case(name, device, args.skip_flex)
        write()
    print(f"[bench] wrote attention-{slug}.md into {', '.join(map(str, out_dirs))}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
