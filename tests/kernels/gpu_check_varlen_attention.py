"""GPU check of packed causal attention through PyTorch's varlen_attn (FlashAttention-2), the backend
`PACKED_BACKEND = "varlen"` selects, against velotune's reference and Triton kernel; then its speed.

    python tests/kernels/gpu_check_varlen_attention.py --out DIR        (from the repo root, < 3 min on H100)

1. Correctness, bf16 (one fp16 case): Llama-3.1-8B heads (32 / 8, head_dim 128) and Llama-3.2-1B heads
   (32 / 8, head_dim 64); odd document lengths with documents of length 1; sliding windows (including 1);
   batch 1 and 2 rows of 4096 packed into one row with cu_seqlens over the flattened batch, q/k/v as
   strided views of a fused qkv projection (the model's layout). Output, dq, dk, dv of
   `attention_varlen` and of `attention_triton` (fixed 64x64 tiles) against `attention_reference` on the
   same inputs upcast to float32 (norm-relative error < 2e-2 each), and varlen against Triton (< 2e-2).
   Then the dispatch: with PACKED_BACKEND = "varlen", `select_backend` picks varlen on this device and
   `attention` returns exactly `attention_varlen`'s output (softcap keeps Triton).
2. Timing (triton.testing.do_bench, median ms) of forward and forward+backward on 8192 tokens:
   varlen vs the Triton kernel (autotuned) vs SDPA (default backend, and pinned to cuDNN and to flash)
   on the same tokens unpacked as a batch of equal-length documents (SDPA needs no mask there); a case
   of mixed lengths (50..2048, as training packs them) has no SDPA equivalent. Each timed pair is also
   compared at full size (varlen vs Triton, tuned tiles).
Prints a table, writes DIR/varlen_attention.json, and says which PACKED_BACKEND measured faster.
Exit status 1 if a correctness check fails or varlen_attn is unusable on this machine.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `velotune` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import triton
import triton.testing

from velotune.kernels import attention as attn

TOL = 2e-2
LLAMA_8B = dict(n_heads=32, n_kv=8, head_dim=128)
LLAMA_1B = dict(n_heads=32, n_kv=8, head_dim=64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    # A window of one makes dq and dk exactly zero in exact arithmetic (softmax over one key), so the
    # bf16 kernels' rounding residue has no norm to be relative to: floor the denominator at an RMS of
    # 1e-2 per element, i.e. a zero reference passes when the RMS error is under 2e-4.
    a, b = a.double(), b.double()
    floor = 1e-2 * b.numel() ** 0.5
    return float((a - b).norm() / max(float(b.norm()), floor))


def offsets_of(docs: list[int]) -> list[int]:
    out = [0]
    for n in docs:
        out.append(out[-1] + n)
    return out


def packed_inputs(rows: list[list[int]], n_heads, n_kv, head_dim, dtype, device, seed=0):
    """q, k, v [1, B*T, H, D] as the model makes them: views of one fused qkv projection of B rows of T
    tokens, flattened into one packed row; cu_seqlens over the flattened batch; and a dout."""
    batch, seq = len(rows), sum(rows[0])
    assert all(sum(r) == seq for r in rows)
    gen = torch.Generator(device=device).manual_seed(seed)
    width = (n_heads + 2 * n_kv) * head_dim
    qkv = torch.randn(batch, seq, width, generator=gen, device=device).to(dtype)
    q, k, v = qkv.split((n_heads * head_dim, n_kv * head_dim, n_kv * head_dim), dim=-1)
    q = q.view(batch, seq, n_heads, head_dim).reshape(1, batch * seq, n_heads, head_dim)
    k = k.view(batch, seq, n_kv, head_dim).reshape(1, batch * seq, n_kv, head_dim)
    v = v.view(batch, seq, n_kv, head_dim).reshape(1, batch * seq, n_kv, head_dim)
    docs = [n for r in rows for n in r]
    cu = torch.tensor(offsets_of(docs), dtype=torch.int32, device=device)
    dout = torch.randn(1, batch * seq, n_heads, head_dim, generator=gen, device=device).to(dtype)
    return q, k, v, cu, dout, docs


def leaves(*tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in tensors]


def fwd_bwd(fn, q, k, v, dout):
    # Leaves that keep the fused-projection strides: detach() of a view is a view of the same storage.
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


def reference_fp32(q, k, v, dout, docs, scale, window, chunk=4096):
    """attention_reference in float32 on the upcast inputs, run over groups of whole documents of at most
    `chunk` tokens (documents never see each other, so this is the same function) to bound its memory."""
    qf, kf, vf = leaves(q, k, v, dtype=torch.float32)
    out = torch.empty(qf.shape, dtype=torch.float32, device=q.device)
    groups, current = [], []
    for n in docs:
        if current and sum(current) + n > chunk:
            groups.append(current)
            current = []
        current.append(n)
    groups.append(current)
    start = 0
    for group in groups:
        end = start + sum(group)
        local = torch.tensor(offsets_of(group), dtype=torch.int32, device=q.device)
        o = attn.attention_reference(
            qf[:, start:end], kf[:, start:end], vf[:, start:end], scale=scale, sliding_window=window,
            cu_seqlens=local,
        )  # fmt: skip
        o.backward(dout[:, start:end].float())
        out[:, start:end] = o.detach()
        start = end
    return [out, qf.grad, kf.grad, vf.grad]


CHECKS = [
    # name, shape, rows of documents (each row sums to the same length), sliding window, dtype
    ("8B odd docs incl. length 1", LLAMA_8B, [[1, 1000, 1, 333, 2000, 761]], None, torch.bfloat16),
    ("1B odd docs incl. length 1", LLAMA_1B, [[777, 1, 1, 1500, 1817]], None, torch.bfloat16),
    ("8B sliding window 512", LLAMA_8B, [[3000, 1, 1095]], 512, torch.bfloat16),
    ("1B sliding window 1", LLAMA_1B, [[100, 37, 1, 91]], 1, torch.bfloat16),
    ("8B 2 rows x 4096 packed", LLAMA_8B, [[1000, 3096], [1, 2047, 2048]], None, torch.bfloat16),
    ("1B 2 rows x 4096, window 256", LLAMA_1B, [[4096], [129, 1, 3966]], 256, torch.bfloat16),
    ("1B odd docs, float16", LLAMA_1B, [[999, 1, 2000, 1096]], None, torch.float16),
]


def run_checks(device) -> tuple[list[dict], bool]:
    rows, ok_all = [], True
    for name, shape, doc_rows, window, dtype in CHECKS:
        t0 = time.time()
        q, k, v, cu, dout, docs = packed_inputs(doc_rows, **shape, dtype=dtype, device=device)
        scale = shape["head_dim"] ** -0.5
        kw = dict(scale=scale, sliding_window=window, cu_seqlens=cu)
        if not attn._varlen_supported(q, k, v, window, None, cu, None):
            print(f"[check] {name}: FAIL, select_backend would not send these inputs to varlen", flush=True)
            rows.append(dict(name=name, ok=False, reason="not varlen-supported"))
            ok_all = False
            continue
        truth = reference_fp32(q, k, v, dout, docs, scale, window)
        varlen = fwd_bwd(lambda q, k, v: attn.attention_varlen(q, k, v, **kw), q, k, v, dout)
        tri = fwd_bwd(lambda q, k, v: attn.attention_triton(q, k, v, blocks=(64, 64), **kw), q, k, v, dout)
        err_v = [rel(a, b) for a, b in zip(varlen, truth)]
        err_t = [rel(a, b) for a, b in zip(tri, truth)]
        err_vt = [rel(a, b) for a, b in zip(varlen, tri)]
        finite = all(bool(torch.isfinite(t).all()) for t in varlen)
        ok = finite and max(err_v) < TOL and max(err_t) < TOL and max(err_vt) < TOL
        ok_all &= ok
        row = dict(name=name, tokens=q.shape[1], docs=len(docs), window=window, dtype=str(dtype),
                   varlen_vs_ref=err_v, triton_vs_ref=err_t, varlen_vs_triton=err_vt, finite=finite, ok=ok,
                   seconds=round(time.time() - t0, 1))  # fmt: skip
        rows.append(row)
        print(
            f"[check] {name:30s} varlen/ref {max(err_v):.2e}  triton/ref {max(err_t):.2e}  "
            f"varlen/triton {max(err_vt):.2e}  (out,dq,dk,dv max)  {'ok' if ok else 'FAIL'}",
            flush=True,
        )
        del q, k, v, dout, truth, varlen, tri
        torch.cuda.empty_cache()
    return rows, ok_all


def check_dispatch(device) -> tuple[dict, bool]:
    q, k, v, cu, _, _ = packed_inputs([[700, 1, 323]], **LLAMA_8B, dtype=torch.bfloat16, device=device)
    saved = attn.PACKED_BACKEND
    try:
        attn.PACKED_BACKEND = "varlen"
        chosen = attn.select_backend(q, k, v, cu_seqlens=cu)
        with_softcap = attn.select_backend(q, k, v, cu_seqlens=cu, softcap=50.0)
        same = torch.equal(
            attn.attention(q, k, v, scale=0.1, cu_seqlens=cu),
            attn.attention_varlen(q, k, v, scale=0.1, cu_seqlens=cu),
        )
    finally:
        attn.PACKED_BACKEND = saved
    ok = chosen == "varlen" and with_softcap == "triton" and same
    print(
        f"[dispatch] packed bf16 -> {chosen}; with softcap -> {with_softcap}; attention() == varlen: {same}"
    )
    return dict(packed=chosen, softcap=with_softcap, attention_equals_varlen=same, ok=ok), ok


TIMINGS = [
    # name, shape, documents of the 8192 tokens
    ("8B 4x2048", LLAMA_8B, [2048] * 4),
    ("8B 16x512", LLAMA_8B, [512] * 16),
    ("8B mixed 50..2048", LLAMA_8B, None),
    ("1B 4x2048", LLAMA_1B, [2048] * 4),
    ("1B 16x512", LLAMA_1B, [512] * 16),
    ("1B mixed 50..2048", LLAMA_1B, None),
]


def mixed_lengths(total: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    docs = []
    while sum(docs) < total:
        docs.append(int(torch.randint(50, 2049, (1,), generator=gen)))
    docs[-1] -= sum(docs) - total
    return [n for n in docs if n > 0]


def sdpa_fn(n_docs: int, scale: float, backend: str | None):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pin = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}.get(backend)

    def fn(q, k, v):
        q, k, v = (t.reshape(n_docs, t.shape[1] // n_docs, *t.shape[2:]) for t in (q, k, v))
        with sdpa_kernel(pin) if pin is not None else nullcontext():
            out = attn.attention_sdpa(q, k, v, scale=scale)
        return out.reshape(1, -1, *out.shape[2:])

    return fn


def bench(fn, q, k, v, dout) -> tuple[float, float]:
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))

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


def run_timings(device) -> tuple[list[dict], bool]:
    rows, ok_all = [], True
    for name, shape, docs in TIMINGS:
        docs = docs or mixed_lengths(8192)
        q, k, v, cu, dout, _ = packed_inputs([docs], **shape, dtype=torch.bfloat16, device=device)
        scale = shape["head_dim"] ** -0.5
        impls = {
            "varlen": lambda q, k, v: attn.attention_varlen(q, k, v, scale=scale, cu_seqlens=cu),
            "triton": lambda q, k, v: attn.attention_triton(q, k, v, scale=scale, cu_seqlens=cu),
        }
        if len(set(docs)) == 1:
            for backend in ("default", "cudnn", "flash"):
                impls[f"sdpa {backend}"] = sdpa_fn(len(docs), scale, backend)
        results = {}
        for impl, fn in impls.items():
            try:
                results[impl] = fwd_bwd(fn, q, k, v, dout)
                t_fwd, t_step = bench(fn, q, k, v, dout)
                rows.append(dict(case=name, impl=impl, fwd_ms=t_fwd, step_ms=t_step, docs=len(docs)))
            except Exception as exc:  # an SDPA backend this build or shape does not have
                rows.append(dict(case=name, impl=impl, error=repr(exc)[:200]))
                print(f"[time] {name} {impl}: unavailable: {exc!r}"[:240], flush=True)
        err = max(rel(a, b) for a, b in zip(results["varlen"], results["triton"]))
        ok_all &= err < TOL
        for row in rows:
            if row["case"] == name and "step_ms" in row:
                row["varlen_vs_triton"] = err if row["impl"] in ("varlen", "triton") else None
                print(
                    f"[time] {name:18s} {row['impl']:13s} fwd {row['fwd_ms']:7.3f} ms  "
                    f"fwd+bwd {row['step_ms']:7.3f} ms",
                    flush=True,
                )
        print(f"[time] {name:18s} varlen vs triton (tuned tiles) max rel diff {err:.2e}", flush=True)
        del q, k, v, dout, results
        torch.cuda.empty_cache()
    return rows, ok_all


def recommend(rows: list[dict]) -> dict:
    by = {(r["case"], r["impl"]): r["step_ms"] for r in rows if "step_ms" in r}
    ratios = {
        case: by[(case, "triton")] / by[(case, "varlen")]
        for case in {c for c, _ in by}
        if (case, "varlen") in by and (case, "triton") in by
    }
    backend = "varlen" if ratios and all(r > 1.0 for r in ratios.values()) else "triton"
    return dict(packed_backend=backend, triton_over_varlen_fwd_bwd=ratios)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="folder for varlen_attention.json")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 1
    device = torch.device("cuda")
    t_start = time.time()
    api = attn._varlen_api()
    meta = dict(
        device=torch.cuda.get_device_name(device),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=triton.__version__,
        python=platform.python_version(),
        varlen_signature=str(inspect.signature(api[0])) if api else None,
        varlen_takes_enable_gqa=api[1] if api else None,
        flash_device_ok=attn._flash_device_ok(device),
        command=" ".join(sys.argv),
    )
    print(json.dumps(meta, indent=1), flush=True)
    report: dict = dict(meta=meta)

    def write():
        report["seconds"] = round(time.time() - t_start, 1)
        (out_dir / "varlen_attention.json").write_text(json.dumps(report, indent=1))

    if api is None or not meta["flash_device_ok"]:
        report.update(ok=False, reason="varlen_attn unusable here (no scale/window_size, or no flash device)")
        write()
        print("FAIL: varlen_attn is unusable on this machine", flush=True)
        return 1
    checks, ok = run_checks(device)
    dispatch, ok_dispatch = check_dispatch(device)
    report.update(checks=checks, dispatch=dispatch, ok=ok and ok_dispatch)
    write()
    if not report["ok"]:
        print("FAIL: a correctness check failed; timing skipped", flush=True)
        return 1
    if not args.skip_timing:
        timings, ok_timed = run_timings(device)
        report.update(timings=timings, recommendation=recommend(timings), ok=ok_timed)
        write()
        print("\n| case | impl | fwd ms | fwd+bwd ms |\n| --- | --- | --- | --- |")
        for r in timings:
            if "step_ms" in r:
                print(f"| {r['case']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['step_ms']:.3f} |")
            else:
                print(f"| {r['case']} | {r['impl']} | n/a | n/a |")
        rec = report["recommendation"]
        ratios = ", ".join(f"{c} {x:.2f}x" for c, x in sorted(rec["triton_over_varlen_fwd_bwd"].items()))
        print(f"\nTriton time / varlen time (fwd+bwd): {ratios}")
        print(f'Measured faster on every packed case -> PACKED_BACKEND = "{rec["packed_backend"]}"')
        if not ok_timed:
            print("FAIL: varlen and Triton disagree at full size (tuned tiles)", flush=True)
            return 1
    print(f"done in {time.time() - t_start:.0f} s; wrote {out_dir / 'varlen_attention.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
