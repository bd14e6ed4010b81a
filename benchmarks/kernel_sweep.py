"""Launch-configuration sweep of the gated activations and the fused linear + cross-entropy (issue 3).

    PYTHONPATH=/tmp/site:$PYTHONPATH python benchmarks/kernel_sweep.py --out DIR     (Liger from the peers bundle)

On CUDA, at benchmarks/kernels.py's Llama-3.1-8B sizes (8,192 tokens, hidden 4,096, intermediate
14,336, vocabulary 128,256, bf16):

1. Correctness first. Every gated candidate (`GATED_CANDIDATES`, used for forward and backward)
   runs SwiGLU forward + in-place backward on 37 rows of the real width in float32 (relative error
   < 1e-5 against the reference) and bf16 (< 2e-2; whether it is bitwise equal to today's default
   is recorded too: a launch changes no formula). Every loss candidate (`CE_CANDIDATES`) runs the chunked loss on 512
   tokens of the real hidden size and vocabulary, 30% of labels ignored, head trainable, in float32
   and bf16 against the reference (loss, d_hidden, d_weight). A failing candidate is not timed.
2. Gated: the forward kernel and the in-place backward kernel are timed apart for every candidate
   (SwiGLU), with Liger's kernels beside them; then today's default and the best forward + best
   backward run end to end (autograd forward + backward, as benchmarks/kernels.py measures it) for
   SwiGLU and GeGLU, next to Liger's autograd functions.
3. Loss: the chunk kernel alone on one logits chunk ([1024, 128256]) for every candidate; then the
   whole loss forward + backward (frozen head, as in benchmarks/kernels.py, and trainable head) for
   chunk sizes of 128-512 MiB with today's kernel launch and the best one, next to Liger's fused
   linear cross-entropy, with the peak memory each allocates beyond its inputs.

Times are medians of triton.testing.do_bench. Prints ranked tables, a suggested default for each
config, and writes DIR/kernel_sweep-<device>.json and .md. --budget-s (default 170) stops
starting new stages in time. --smoke runs tiny sizes on CPU under Triton's interpreter (checks the
script, not the speed).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import re
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # run as a script from the repository root

import torch  # noqa: E402

# Importing these imports Triton: TRITON_INTERPRET must be set before (main does, for --smoke).
from velotune.kernels.activations import GatedConfig, GatedLaunch  # noqa: E402
from velotune.kernels.cross_entropy import CEConfig  # noqa: E402

MIB = 2**20
TOL = {"float32": 1e-5, "bfloat16": 2e-2}
# A candidate replaces a default only when it is faster by more than run-to-run noise.
MIN_GAIN = 0.01

GATED_CANDIDATES: tuple[GatedLaunch, ...] = (
    GatedLaunch(),  # today's default: 2D grid (rows fastest), 1024 columns, 4 warps
    GatedLaunch("flat", 1024, 4),
    GatedLaunch("flat", 1024, 4, evict_first=True),
    GatedLaunch("flat", 2048, 4),
    GatedLaunch("flat", 2048, 8),
    GatedLaunch("flat", 4096, 8),
    GatedLaunch("flat", 4096, 16),
    GatedLaunch("2d", 2048, 8),
    GatedLaunch("row", 2048, 8),
    GatedLaunch("row", 4096, 16),
    GatedLaunch("row", 16384, 16),  # one step per row of 14,336 (Liger's layout)
    GatedLaunch("row", 16384, 32),
)

# Kernel-launch candidates of the loss (chunk size is swept apart, with the best of these).
CE_CANDIDATES: tuple[CEConfig, ...] = (
    CEConfig(),  # today's default: 256 MiB chunks, 4096-wide steps, 8 warps, a program per row
    CEConfig(block_v=8192, num_warps=16),
    CEConfig(block_v=16384, num_warps=16),
    CEConfig(block_v=16384, num_warps=32),
    CEConfig(block_v=32768, num_warps=32),  # Liger's launch
    CEConfig(l2_hint=True),
    CEConfig(block_v=8192, num_warps=16, l2_hint=True, programs_per_sm=1),
    CEConfig(block_v=16384, num_warps=32, l2_hint=True, programs_per_sm=1),
    CEConfig(block_v=8192, num_warps=16, l2_hint=True, programs_per_sm=2),
    CEConfig(block_v=4096, num_warps=8, l2_hint=True, programs_per_sm=4),
)
CHUNK_MIB = (128, 256, 384, 512)


@dataclasses.dataclass
class Sizes:
    tokens: int = 8192
    hidden: int = 4096
    intermediate: int = 14336
    vocab: int = 128256
    check_rows: int = 37  # gated correctness rows (odd: not a multiple of anything)
    check_tokens: int = 512  # loss correctness tokens


SMOKE = Sizes(tokens=24, hidden=40, intermediate=2051, vocab=5003, check_rows=5, check_tokens=13)


class Budget:
    def __init__(self, seconds: float):
        self.start = time.monotonic()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)


# ----------------------------------------------------------------------------- measuring


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom > 0 else 1.0)


def bench(fn: Callable[[], Any], device: torch.device, rep_ms: int = 100) -> float:
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def peak_extra(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Bytes allocated by one fn() beyond what was allocated before it."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def randn(shape, device, dtype, seed, scale=1.0):
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)


def _liger_swiglu():
    """Liger's SwiGLU pieces, or None when Liger does not import."""
    try:
        from liger_kernel.ops import swiglu
    except Exception:
        return None
    return swiglu


# ----------------------------------------------------------------------------- gated activations


def gated_run(gate_up: torch.Tensor, activation: str, config: GatedConfig | None, dy: torch.Tensor):
    """Output and d(gate_up) through autograd; the gradient is written over a view's storage, as in
    the MLP (config None: the reference)."""
    from velotune.kernels.activations import GatedActivationFunction, gated_activation_reference

    leaf = gate_up.detach().clone().requires_grad_(True)
    if config is None:
        y = gated_activation_reference(leaf, activation)
    else:
        y = GatedActivationFunction.apply(leaf.view_as(leaf), activation, config)
    (dgu,) = torch.autograd.grad(y, leaf, dy)
    return y.detach(), dgu


def check_gated(launch: GatedLaunch, s: Sizes, device: torch.device) -> dict[str, Any]:
    cfg = GatedConfig(launch, launch)
    row: dict[str, Any] = {"candidate": launch.label()}
    try:
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).removeprefix("torch.")
            gu = randn((s.check_rows, 2 * s.intermediate), device, dtype, seed=1, scale=2.0)
            dy = randn((s.check_rows, s.intermediate), device, dtype, seed=2)
            got = gated_run(gu, "silu", cfg, dy)
            want = gated_run(gu, "silu", None, dy)
            row[f"error_{name}"] = max(rel_err(a, b) for a, b in zip(got, want))
            if dtype == torch.bfloat16:
                default = gated_run(gu, "silu", GatedConfig(), dy)
                row["bitwise_equal_default"] = all(torch.equal(a, b) for a, b in zip(got, default))
        # Bitwise equality is recorded, not required: a launch changes no formula, but the compiler
        # may contract a multiply-add differently in another tiling.
        row["pass"] = row["error_float32"] < TOL["float32"] and row["error_bfloat16"] < TOL["bfloat16"]
    except Exception as exc:
        row.update(error=f"{type(exc).__name__}: {exc}"[:400], traceback=traceback.format_exc()[-800:])
        row["pass"] = False
    return row


def time_gated_kernels(launches, s: Sizes, device: torch.device, budget: Budget) -> list[dict[str, Any]]:
    """Forward kernel and in-place backward kernel of SwiGLU, timed apart, per launch."""
    from velotune.kernels.activations import gated_activation_backward, gated_activation_forward

    dtype = torch.bfloat16
    gu = randn((s.tokens, 2 * s.intermediate), device, dtype, seed=3, scale=2.0)
    dy = randn((s.tokens, s.intermediate), device, dtype, seed=4)
    scratch = torch.empty_like(gu)
    rows = []
    for launch in launches:
        if budget.left() < 0:
            break
        cfg = GatedConfig(launch, launch)
        r: dict[str, Any] = {"impl": f"velotune {launch.label()}", "candidate": launch.label()}
        try:
            r["fwd_ms"] = bench(lambda: gated_activation_forward(gu, "silu", cfg), device)
            scratch.copy_(gu)
            # In place, as in training; the values drift from call to call, the bytes moved do not.
            r["bwd_ms"] = bench(
                lambda: gated_activation_backward(dy, scratch, "silu", in_place=True, config=cfg), device
            )
        except Exception as exc:
            r["error"] = f"{type(exc).__name__}: {exc}"[:400]
        rows.append(r)
    if rows and "fwd_ms" in rows[0] and budget.left() > 0:
        # The first candidate (today's default) once more: the spread of the two is the noise floor.
        cfg = GatedConfig(launches[0], launches[0])
        r = {"impl": f"velotune {launches[0].label()} (timed again last)"}
        r["fwd_ms"] = bench(lambda: gated_activation_forward(gu, "silu", cfg), device)
        r["bwd_ms"] = bench(
            lambda: gated_activation_backward(dy, scratch, "silu", in_place=True, config=cfg), device
        )
        rows.append(r)
    liger = _liger_swiglu() if device.type == "cuda" else None
    if liger is not None:
        gate, up = (t.contiguous() for t in gu.chunk(2, dim=-1))
        r = {"impl": "liger swiglu (gate, up apart)"}
        try:
            r["fwd_ms"] = bench(lambda: liger.swiglu_forward(gate, up), device)
            r["bwd_ms"] = bench(lambda: liger.swiglu_backward(gate, up, dy), device)
        except Exception as exc:
            r["error"] = f"{type(exc).__name__}: {exc}"[:400]
        rows.append(r)
        if hasattr(liger, "swiglu_fused_gate_up_forward"):
            r = {"impl": "liger swiglu (fused gate_up, in place)"}
            try:
                r["fwd_ms"] = bench(lambda: liger.swiglu_fused_gate_up_forward(gu), device)
                scratch.copy_(gu)
                r["bwd_ms"] = bench(
                    lambda: liger.swiglu_fused_gate_up_backward(scratch, dy, in_place=True), device
                )
            except Exception as exc:
                r["error"] = f"{type(exc).__name__}: {exc}"[:400]
            rows.append(r)
    bytes_fwd = 3 * s.tokens * s.intermediate * 2
    bytes_bwd = 5 * s.tokens * s.intermediate * 2
    for r in rows:
        if "fwd_ms" in r and "bwd_ms" in r:
            r["total_ms"] = r["fwd_ms"] + r["bwd_ms"]
            r["fwd_gb_s"] = bytes_fwd / (r["fwd_ms"] * 1e-3) / 1e9
            r["bwd_gb_s"] = bytes_bwd / (r["bwd_ms"] * 1e-3) / 1e9
    return rows


def time_gated_end_to_end(
    configs: dict[str, GatedConfig], s: Sizes, device: torch.device
) -> list[dict[str, Any]]:
    """Autograd forward + backward (benchmarks/kernels.py's measure) of SwiGLU and GeGLU."""
    from velotune.kernels.activations import GatedActivationFunction

    rows = []
    gu0 = randn((s.tokens, 2 * s.intermediate), device, torch.bfloat16, seed=5, scale=2.0)
    dy = randn((s.tokens, s.intermediate), device, torch.bfloat16, seed=6)
    for act in ("silu", "gelu_tanh"):
        for name, cfg in configs.items():
            leaf = gu0.detach().clone().requires_grad_(True)

            def step(leaf=leaf, cfg=cfg, act=act):
                y = GatedActivationFunction.apply(leaf.view_as(leaf), act, cfg)
                torch.autograd.grad(y, leaf, dy)

            rows.append(_time_step(f"velotune {name}", act, step, device))
            del leaf
        liger_fn = _liger_autograd(act) if device.type == "cuda" else None
        if liger_fn is not None:
            gate, up = (t.contiguous().requires_grad_(True) for t in gu0.detach().chunk(2, dim=-1))

            def liger_step(gate=gate, up=up, liger_fn=liger_fn):
                torch.autograd.grad(liger_fn.apply(gate, up), [gate, up], dy)

            rows.append(_time_step("liger (gate, up apart)", act, liger_step, device))
            fused = _liger_fused_autograd() if act == "silu" else None
            if fused is not None:
                leaf = gu0.detach().clone().requires_grad_(True)

                def fused_step(leaf=leaf, fused=fused):
                    torch.autograd.grad(fused.apply(leaf.view_as(leaf), True), leaf, dy)

                rows.append(_time_step("liger (fused gate_up, in place)", act, fused_step, device))
    return rows


def _time_step(impl: str, act: str, step: Callable[[], None], device: torch.device) -> dict[str, Any]:
    r: dict[str, Any] = {"impl": impl, "activation": act}
    try:
        r["peak_extra_mib"] = (lambda b: None if b is None else b / MIB)(peak_extra(step, device))
        r["ms"] = bench(step, device)
    except Exception as exc:
        r["error"] = f"{type(exc).__name__}: {exc}"[:400]
    return r


def _liger_autograd(act: str):
    try:
        if act == "silu":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction as fn
        else:
            from liger_kernel.ops.geglu import LigerGELUMulFunction as fn
    except Exception:
        return None
    return fn


def _liger_fused_autograd():
    try:
        from liger_kernel.ops.swiglu import LigerFusedGateUpSiLUMulFunction as fn
    except Exception:
        return None
    return fn


def best_gated(kernel_rows: list[dict[str, Any]]) -> tuple[GatedConfig, dict[str, str]]:
    """The fastest passing forward and backward launch, each kept at today's default unless it is
    faster by more than MIN_GAIN."""
    by_label = {r["candidate"]: r for r in kernel_rows if "candidate" in r and "total_ms" in r}
    default = GatedLaunch().label()
    chosen = {}
    for part in ("fwd", "bwd"):
        best = min(by_label.values(), key=lambda r: r[f"{part}_ms"], default=None)
        base = by_label.get(default)
        if best is None or base is None or best[f"{part}_ms"] > (1 - MIN_GAIN) * base[f"{part}_ms"]:
            chosen[part] = default
        else:
            chosen[part] = best["candidate"]
    launches = {c.label(): c for c in GATED_CANDIDATES}
    return GatedConfig(launches[chosen["fwd"]], launches[chosen["bwd"]]), chosen


# ----------------------------------------------------------------------------- fused linear + CE


def ce_inputs(n: int, s: Sizes, device: torch.device, dtype: torch.dtype, seed: int, ignored: float = 0.0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, s.hidden, generator=g, device=device).to(dtype)
    # Logits with a spread of a few units, like a trained head's.
    weight = (torch.randn(s.vocab, s.hidden, generator=g, device=device) * (3.0 / s.hidden**0.5)).to(dtype)
    labels = torch.randint(0, s.vocab, (n,), generator=g, device=device)
    labels[torch.rand(n, generator=g, device=device) < ignored] = -100
    return hidden, weight, labels


def ce_run(hidden, weight, labels, config: CEConfig | None, train_weight: bool):
    from velotune.kernels.cross_entropy import linear_cross_entropy_chunked, linear_cross_entropy_reference

    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(train_weight)
    if config is None:
        loss = linear_cross_entropy_reference(h, w, labels)
    else:
        loss = linear_cross_entropy_chunked(h, w, labels, backend="triton", config=config)
    leaves = [h, w] if train_weight else [h]
    grads = torch.autograd.grad(loss, leaves)
    return [loss.detach(), *grads]


def check_ce(config: CEConfig, s: Sizes, device: torch.device) -> dict[str, Any]:
    row: dict[str, Any] = {"candidate": config.label()}
    try:
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).removeprefix("torch.")
            hidden, weight, labels = ce_inputs(s.check_tokens, s, device, dtype, seed=7, ignored=0.3)
            got = ce_run(hidden, weight, labels, config, train_weight=True)
            want = ce_run(hidden, weight, labels, None, train_weight=True)
            errs = [rel_err(a, b) for a, b in zip(got, want)]
            row[f"error_{name}"] = max(errs)
            row[f"errors_{name}"] = dict(zip(("loss", "d_hidden", "d_weight"), errs))
            del hidden, weight, got, want
        row["pass"] = row["error_float32"] < TOL["float32"] and row["error_bfloat16"] < TOL["bfloat16"]
    except Exception as exc:
        row.update(error=f"{type(exc).__name__}: {exc}"[:400], traceback=traceback.format_exc()[-800:])
        row["pass"] = False
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def time_ce_kernel(configs, s: Sizes, device: torch.device, budget: Budget) -> list[dict[str, Any]]:
    """The chunk kernel alone, in place over one [rows, V] bf16 logits chunk of today's chunk size."""
    from velotune.kernels import cross_entropy as ce

    rows_per_chunk = ce._rows_per_chunk(s.tokens, s.vocab, 2, ce.CHUNK_BYTES)
    logits0 = randn((rows_per_chunk, s.vocab), device, torch.bfloat16, seed=8, scale=3.0)
    g = torch.Generator(device=device).manual_seed(9)
    labels = torch.randint(0, s.vocab, (rows_per_chunk,), generator=g, device=device)
    loss = torch.empty(rows_per_chunk, dtype=torch.float32, device=device)
    scale = torch.full((1,), 1.0 / s.tokens, dtype=torch.float32, device=device)
    buf = torch.empty_like(logits0)
    nbytes = 3 * rows_per_chunk * s.vocab * 2
    out = []
    for cfg in configs:
        if budget.left() < 0:
            break
        r: dict[str, Any] = {"candidate": cfg.label(), "rows": rows_per_chunk}
        try:
            buf.copy_(logits0)
            # In place, as in the loss; after the first call the kernel reruns over gradients, same bytes.
            r["ms"] = bench(
                lambda cfg=cfg: ce._softmax_ce_inplace_triton(
                    buf, labels, loss, scale, -100, None, True, cfg
                ),
                device,
            )
            r["gb_s"] = nbytes / (r["ms"] * 1e-3) / 1e9
        except Exception as exc:
            r["error"] = f"{type(exc).__name__}: {exc}"[:400]
        out.append(r)
    return out


def time_ce_full(
    configs: dict[str, CEConfig], s: Sizes, device: torch.device, budget: Budget
) -> list[dict[str, Any]]:
    """Whole loss forward + backward (autograd, as benchmarks/kernels.py), frozen and trainable head."""
    from velotune.kernels.cross_entropy import linear_cross_entropy_chunked

    hidden, weight, labels = ce_inputs(s.tokens, s, device, torch.bfloat16, seed=10)
    flops_frozen = 4.0 * s.tokens * s.vocab * s.hidden
    out = []
    for head in ("frozen", "trainable"):
        w = weight.detach().clone().requires_grad_(head == "trainable")
        h = hidden.detach().clone().requires_grad_(True)
        leaves = [h, w] if head == "trainable" else [h]
        flops = flops_frozen * (1.5 if head == "trainable" else 1.0)
        impls: dict[str, Callable[[], None]] = {}
        for name, cfg in configs.items():
            impls[f"velotune {name}"] = lambda cfg=cfg, h=h, w=w, leaves=leaves: torch.autograd.grad(
                linear_cross_entropy_chunked(h, w, labels, config=cfg), leaves
            )
        liger = _liger_flce() if device.type == "cuda" else None
        if liger is not None:
            impls["liger"] = lambda h=h, w=w, leaves=leaves: torch.autograd.grad(liger(w, h, labels), leaves)
        for impl, step in impls.items():
            if budget.left() < 0:
                break
            r: dict[str, Any] = {"impl": impl, "head": head}
            try:
                peak = peak_extra(step, device)
                r["peak_extra_mib"] = None if peak is None else peak / MIB
                r["ms"] = bench(step, device, rep_ms=400)
                r["tflop_s"] = flops / (r["ms"] * 1e-3) / 1e12
            except Exception as exc:
                r["error"] = f"{type(exc).__name__}: {exc}"[:400]
            out.append(r)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del w, h, leaves, impls
    return out


def _liger_flce():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:
        return None
    return LigerFusedLinearCrossEntropyLoss()


def best_ce_kernel(kernel_rows: list[dict[str, Any]]) -> CEConfig:
    by_label = {r["candidate"]: r for r in kernel_rows if "ms" in r}
    default = CEConfig()
    base = by_label.get(default.label())
    best = min(by_label.values(), key=lambda r: r["ms"], default=None)
    if best is None or base is None or best["ms"] > (1 - MIN_GAIN) * base["ms"]:
        return default
    return {c.label(): c for c in CE_CANDIDATES}[best["candidate"]]


# ----------------------------------------------------------------------------- report


def _f(x: Any, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def markdown(result: dict[str, Any]) -> str:
    m = result["meta"]
    lines = [
        f"# Kernel launch sweep — {m['device']}",
        "",
        f"Sizes: {m['sizes']}. Medians of triton.testing.do_bench, bf16. Command: `{m['command']}`; "
        f"commit `{m['git_commit']}`; {m['timestamp']}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
        "",
        "## Correctness of every candidate (failing ones are not timed)",
        "",
        "| kind | candidate | fp32 rel. error | bf16 rel. error | bf16 bitwise = default | pass |",
        "|---|---|---|---|---|---|",
    ]
    for kind in ("gated", "ce"):
        for r in result["checks"][kind]:
            lines.append(
                f"| {kind} | {r['candidate']} | {_f(r.get('error_float32'), '.2e')} | {_f(r.get('error_bfloat16'), '.2e')} "
                f"| {r.get('bitwise_equal_default', '–')} | {'yes' if r['pass'] else '**no** ' + r.get('error', '')} |"
            )
    lines += [
        "",
        "## SwiGLU kernels (forward and in-place backward apart), ranked by forward + backward",
        "",
        "| rank | implementation | fwd ms | fwd GB/s | bwd ms | bwd GB/s | fwd+bwd ms |",
        "|---|---|---|---|---|---|---|",
    ]
    ranked = sorted((r for r in result["gated_kernels"] if "total_ms" in r), key=lambda r: r["total_ms"])
    for i, r in enumerate(ranked, 1):
        lines.append(
            f"| {i} | {r['impl']} | {r['fwd_ms']:.4f} | {r['fwd_gb_s']:,.0f} | {r['bwd_ms']:.4f} | {r['bwd_gb_s']:,.0f} | {r['total_ms']:.4f} |"
        )
    lines += [
        f"| – | {r['impl']} | **failed**: {r['error']} | | | | |"
        for r in result["gated_kernels"]
        if "error" in r
    ]
    lines += ["", "## Gated activations end to end (autograd fwd+bwd, as benchmarks/kernels.py)", ""]
    lines += ["| activation | implementation | ms | peak extra MiB |", "|---|---|---|---|"]
    for r in sorted(result["gated_end_to_end"], key=lambda r: (r["activation"], r.get("ms", 1e9))):
        lines.append(
            f"| {r['activation']} | {r['impl']} | {_f(r.get('ms'), '.4f')} | {_f(r.get('peak_extra_mib'), ',.0f')} |"
            + (f" failed: {r['error']}" if "error" in r else "")
        )
    lines += ["", "## Loss chunk kernel alone (one logits chunk, in place), ranked", ""]
    lines += ["| rank | candidate | ms | GB/s (3 passes) |", "|---|---|---|---|"]
    ranked = sorted((r for r in result["ce_kernel"] if "ms" in r), key=lambda r: r["ms"])
    for i, r in enumerate(ranked, 1):
        lines.append(f"| {i} | {r['candidate']} | {r['ms']:.4f} | {r['gb_s']:,.0f} |")
    lines += ["", "## Fused linear + cross-entropy (fwd+bwd), ranked per head", ""]
    lines += ["| head | rank | implementation | ms | TFLOP/s | peak extra MiB |", "|---|---|---|---|---|---|"]
    for head in ("frozen", "trainable"):
        ranked = sorted(
            (r for r in result["ce_full"] if r["head"] == head and "ms" in r), key=lambda r: r["ms"]
        )
        for i, r in enumerate(ranked, 1):
            lines.append(
                f"| {head} | {i} | {r['impl']} | {r['ms']:.3f} | {r['tflop_s']:.1f} | {_f(r.get('peak_extra_mib'), ',.0f')} |"
            )
    lines += ["", "## Suggested defaults", "", *[f"- {x}" for x in result["suggested"]], ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="benchmarks/kernel_sweep.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for kernel_sweep-<device>.json/.md")
    p.add_argument("--tokens", type=int, default=None, help="tokens (default 8192, benchmarks/kernels.py's)")
    p.add_argument("--budget-s", type=float, default=170.0, help="stop starting stages after this long")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU under Triton's interpreter")
    args = p.parse_args(argv)
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--smoke needs TRITON_INTERPRET=1 in the environment (Triton reads it when first imported)")
    budget = Budget(args.budget_s)
    device = torch.device("cuda") if torch.cuda.is_available() and not args.smoke else torch.device("cpu")
    if device.type == "cpu" and not args.smoke:
        p.error("no CUDA device; use --smoke (with TRITON_INTERPRET=1) to check the script on CPU")
    s = SMOKE if args.smoke else Sizes()
    if args.tokens:
        s = dataclasses.replace(s, tokens=args.tokens)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 checks compare true float32 math
        torch.backends.cudnn.allow_tf32 = False

    from benchmarks.train_step import device_info, git_commit, library_versions

    info = device_info()
    result: dict[str, Any] = {
        "meta": {
            **info,
            "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["python", "benchmarks/kernel_sweep.py", *argv]),
            "versions": library_versions(),
            "git_commit": git_commit(),
            "sizes": ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(s).items()),
        },
        "checks": {"gated": [], "ce": []},
        "gated_kernels": [],
        "gated_end_to_end": [],
        "ce_kernel": [],
        "ce_full": [],
        "suggested": [],
        "stopped_by_budget": [],
    }
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", str(info["device"])).strip("-").lower()
    args.out.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        (args.out / f"kernel_sweep-{slug}.json").write_text(json.dumps(result, indent=1, default=str))
        (args.out / f"kernel_sweep-{slug}.md").write_text(markdown(result))

    def say(msg: str) -> None:
        print(f"[sweep {budget.seconds - budget.left():6.1f}s] {msg}", flush=True)

    def stage(name: str) -> bool:
        if budget.left() > 0:
            return True
        result["stopped_by_budget"].append(name)
        say(f"budget spent: skipping {name}")
        return False

    # 1. correctness
    gated_ok: list[GatedLaunch] = []
    for launch in GATED_CANDIDATES:
        r = check_gated(launch, s, device)
        result["checks"]["gated"].append(r)
        gated_ok += [launch] if r["pass"] else []
        say(
            f"check gated {r['candidate']:<22} {'ok' if r['pass'] else 'FAIL'} fp32 {r.get('error_float32')} bf16 {r.get('error_bfloat16')}"
        )
    ce_ok: list[CEConfig] = []
    for cfg in CE_CANDIDATES:
        r = check_ce(cfg, s, device)
        result["checks"]["ce"].append(r)
        ce_ok += [cfg] if r["pass"] else []
        say(
            f"check ce    {r['candidate']:<30} {'ok' if r['pass'] else 'FAIL'} fp32 {r.get('error_float32')} bf16 {r.get('error_bfloat16')}"
        )
    write()

    # 2. gated activations
    if stage("gated kernels"):
        result["gated_kernels"] = time_gated_kernels(gated_ok, s, device, budget)
        for r in result["gated_kernels"]:
            say(
                f"gated {r['impl']:<40} fwd {_f(r.get('fwd_ms'), '.4f')} bwd {_f(r.get('bwd_ms'), '.4f')} {r.get('error', '')}"
            )
        write()
    best_cfg, chosen = best_gated(result["gated_kernels"])
    if stage("gated end to end"):
        configs = {"default": GatedConfig()}
        if best_cfg != GatedConfig():
            configs[f"best (fwd {chosen['fwd']}, bwd {chosen['bwd']})"] = best_cfg
        result["gated_end_to_end"] = time_gated_end_to_end(configs, s, device)
        for r in result["gated_end_to_end"]:
            say(
                f"gated e2e {r['activation']:<9} {r['impl']:<50} {_f(r.get('ms'), '.4f')} ms {r.get('error', '')}"
            )
        write()
    result["suggested"].append(
        f"DEFAULT_GATED_CONFIG = GatedConfig(forward={best_cfg.forward!r}, backward={best_cfg.backward!r})"
    )

    # 3. loss
    if stage("ce kernel"):
        result["ce_kernel"] = time_ce_kernel(ce_ok, s, device, budget)
        for r in result["ce_kernel"]:
            say(f"ce kernel {r['candidate']:<30} {_f(r.get('ms'), '.4f')} ms {r.get('error', '')}")
        write()
    best_kernel = best_ce_kernel(result["ce_kernel"])
    full: dict[str, CEConfig] = {}
    if stage("ce full"):
        for mib in CHUNK_MIB:
            full[CEConfig(chunk_bytes=mib * MIB).label()] = CEConfig(chunk_bytes=mib * MIB)
            if best_kernel != CEConfig():
                tuned = dataclasses.replace(best_kernel, chunk_bytes=mib * MIB)
                full[tuned.label()] = tuned
        result["ce_full"] = time_ce_full(full, s, device, budget)
        for r in result["ce_full"]:
            say(
                f"ce {r['head']:<9} {r['impl']:<40} {_f(r.get('ms'), '.3f')} ms peak {_f(r.get('peak_extra_mib'), '.0f')} MiB {r.get('error', '')}"
            )
    frozen = [
        r
        for r in result["ce_full"]
        if r["head"] == "frozen" and "ms" in r and r["impl"].startswith("velotune")
    ]
    default_row = next((r for r in frozen if r["impl"] == f"velotune {CEConfig().label()}"), None)
    # Memory goal of benchmarks/kernels.py: the loss's peak stays under 1/8 of float32 logits.
    limit_mib = 4.0 * s.tokens * s.vocab / 8 / MIB
    fits = [r for r in frozen if r.get("peak_extra_mib") is None or r["peak_extra_mib"] <= limit_mib]
    best_full = min(fits, key=lambda r: r["ms"], default=None)
    if best_full and default_row and best_full["ms"] < (1 - MIN_GAIN) * default_row["ms"]:
        label = best_full["impl"].removeprefix("velotune ")
        result["suggested"].append(
            f"DEFAULT_CE_CONFIG = {full[label]!r} ({best_full['ms']:.3f} ms vs {default_row['ms']:.3f} ms, "
            f"frozen head, peak within the {limit_mib:,.0f} MiB goal)"
        )
    else:
        result["suggested"].append(
            "DEFAULT_CE_CONFIG = CEConfig() (no candidate within the memory goal is >1% faster)"
        )
    write()
    print(markdown(result), flush=True)
    failed = [r["candidate"] for kind in ("gated", "ce") for r in result["checks"][kind] if not r["pass"]]
    if failed:
        print(f"[sweep] candidates that failed the correctness check: {failed}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
