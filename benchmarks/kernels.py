"""Kernel benchmark: velotune's ops against PyTorch eager, torch.compile and Liger-Kernel.

    python -m benchmarks.kernels [--ops rms_norm,rope,swiglu,geglu,flce,attention] [--out-dir DIR]

On CUDA, at Llama-3.1-8B sizes (hidden 4096, 8192 tokens, intermediate 14336, 32 query / 8 kv
heads of 128, vocabulary 128,256, bf16), for each op:
  1. correctness first: velotune's public function against its `*_reference`, outputs and the
     gradient of every differentiable input, in float32 and bf16 (bf16 also against the float32
     reference, next to the bf16 reference's own error, which is the noise floor);
  2. forward + backward time (triton.testing.do_bench, median) of velotune, the reference in eager
     PyTorch, torch.compile(reference), Liger-Kernel's op where one exists (and SDPA for attention);
  3. the achieved rate against what this GPU measured in the same run: GB/s over the op's byte
     floor vs a large tensor copy for memory-bound ops, TFLOP/s vs an 8192^3 bf16 matmul for
     matmul-bound ones; and the peak memory each implementation allocates beyond its inputs.
Writes `kernels-<device>.md` (and `.json`) into --out-dir (default benchmarks/results).
`--smoke` runs tiny sizes, also on CPU (no compile, no Liger), to check the script itself.
Exit status 1 when a correctness check fails (timings are still written).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import re
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.train_step import REPO_ROOT, device_info, git_commit, library_versions

MIB = 2**20
# Relative error (norm of the difference over the norm of the reference) the issue asks for.
TOL = {"float32": 1e-5, "bfloat16": 2e-2}
MEMORY_BOUND_GOAL = 0.80  # of the measured copy bandwidth


@dataclasses.dataclass
class Sizes:
    tokens: int = 8192
    batch: int = 4  # attention and rope: batch x seq = tokens
    hidden: int = 4096
    intermediate: int = 14336
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    vocab: int = 128256
    eps: float = 1e-5

    @property
    def seq(self) -> int:
        return self.tokens // self.batch


SMOKE = Sizes(tokens=36, batch=2, hidden=96, intermediate=200, heads=4, kv_heads=2, head_dim=32, vocab=1003)

# setup(inputs) -> (fn returning the outputs in the canonical layout, leaves that require grad,
#                   map from the leaves' grads to the canonical grads)
Setup = Callable[
    [dict[str, torch.Tensor]], tuple[Callable[[], Any], list[torch.Tensor], Callable[[list], list]]
]


@dataclasses.dataclass
class Case:
    name: str
    make_inputs: Callable[[torch.dtype], dict[str, torch.Tensor]]
    differentiable: tuple[str, ...]
    impls: dict[str, Setup]
    floor_kind: str  # "bytes" or "flops"
    floor: Callable[[int], float]  # element size in bytes -> floor
    memory_bound: bool
    note: str = ""
    materialised_bytes: float | None = None  # what the naive op would allocate, for the memory goal


def _leaves(inputs: dict[str, torch.Tensor], names: tuple[str, ...]) -> list[torch.Tensor]:
    return [inputs[n].detach().clone().requires_grad_(True) for n in names]


def plain(fn: Callable[..., Any], names: tuple[str, ...], consts: tuple[str, ...] = ()) -> Setup:
    """Setup for a function taking the canonical inputs positionally (differentiable ones first)."""

    def setup(inputs):
        leaves = _leaves(inputs, names)
        const = [inputs[c] for c in consts]
        return (lambda: fn(*leaves, *const)), leaves, (lambda grads: list(grads))

    return setup


def _as_tuple(x: Any) -> tuple[torch.Tensor, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _liger() -> Any | None:
    try:
        import liger_kernel  # noqa: F401
    except Exception:
        return None
    return liger_kernel


# ----------------------------------------------------------------------------- the cases


def build_cases(s: Sizes, device: torch.device, use_liger: bool) -> list[Case]:
    from velotune.kernels import activations, attention, cross_entropy, rmsnorm, rope

    def randn(gen, *shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale

    def gen():
        return torch.Generator(device=device).manual_seed(0)

    liger = _liger() if use_liger else None
    cases: list[Case] = []

    # --- RMSNorm (frozen weight, as in LoRA; and trainable, as in full fine-tuning)
    def rms_inputs(dtype):
        g = gen()
        return {
            "x": randn(g, s.tokens, s.hidden).to(dtype),
            "w": (1 + randn(g, s.hidden, scale=0.1)).to(dtype),
        }

    for trainable in (False, True):
        names = ("x", "w") if trainable else ("x",)
        consts = () if trainable else ("w",)
        impls: dict[str, Setup] = {
            "velotune": plain(lambda x, w: rmsnorm.rms_norm(x, w, s.eps), names, consts),
            "eager": plain(lambda x, w: rmsnorm.rms_norm_reference(x, w, s.eps), names, consts),
            "compile": plain(
                torch.compile(lambda x, w: rmsnorm.rms_norm_reference(x, w, s.eps)), names, consts
            ),
        }
        if liger is not None:

            def liger_rms(inputs, trainable=trainable):
                from liger_kernel.transformers import LigerRMSNorm

                mod = LigerRMSNorm(s.hidden, eps=s.eps).to(device=device, dtype=inputs["x"].dtype)
                mod.weight.data.copy_(inputs["w"])
                mod.weight.requires_grad_(trainable)
                x = inputs["x"].detach().clone().requires_grad_(True)
                leaves = [x, mod.weight] if trainable else [x]
                return (lambda: mod(x)), leaves, list

            impls["liger"] = liger_rms
        n, h = s.tokens, s.hidden
        cases.append(
            Case(
                name="rms_norm" + (" (trainable weight)" if trainable else ""),
                make_inputs=rms_inputs,
                differentiable=names,
                impls=impls,
                floor_kind="bytes",
                floor=lambda e, n=n, h=h: 5 * n * h * e,  # fwd: read x, write y; bwd: read dy, x, write dx
                memory_bound=True,
                note="floor 5·N·H elements (fwd reads x, writes y; bwd reads dy and x, writes dx); O(N)+O(H) terms left out",
            )
        )

    # --- rotary embedding, q [B, T, Hq, D] and k [B, T, Hk, D], cos/sin [B, T, D]
    def rope_inputs(dtype):
        g = gen()
        pos = torch.arange(s.seq, device=device, dtype=torch.float32)
        inv = 1.0 / 500000.0 ** (
            torch.arange(0, s.head_dim, 2, device=device, dtype=torch.float32) / s.head_dim
        )
        ang = torch.cat([pos[:, None] * inv] * 2, dim=-1).expand(s.batch, s.seq, s.head_dim)
        return {
            "q": randn(g, s.batch, s.seq, s.heads, s.head_dim).to(dtype),
            "k": randn(g, s.batch, s.seq, s.kv_heads, s.head_dim).to(dtype),
            "cos": ang.cos().to(dtype).contiguous(),
            "sin": ang.sin().to(dtype).contiguous(),
        }

    rope_impls: dict[str, Setup] = {
        "velotune": plain(rope.apply_rotary, ("q", "k"), ("cos", "sin")),
        "eager": plain(rope.apply_rotary_reference, ("q", "k"), ("cos", "sin")),
        "compile": plain(torch.compile(rope.apply_rotary_reference), ("q", "k"), ("cos", "sin")),
    }
    if liger is not None:

        def liger_rope(inputs):
            from liger_kernel.transformers.rope import liger_rotary_pos_emb

            q, k = _leaves(inputs, ("q", "k"))
            cos, sin = inputs["cos"], inputs["sin"]

            def fn():  # Liger takes Transformers' [B, H, T, D] layout
                qo, ko = liger_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
                return qo.transpose(1, 2), ko.transpose(1, 2)

            return fn, [q, k], list

        rope_impls["liger"] = liger_rope
    q_el = s.tokens * s.heads * s.head_dim
    k_el = s.tokens * s.kv_heads * s.head_dim
    cases.append(
        Case(
            name="apply_rotary",
            make_inputs=rope_inputs,
            differentiable=("q", "k"),
            impls=rope_impls,
            floor_kind="bytes",
            floor=lambda e: (4 * (q_el + k_el) + 4 * s.tokens * s.head_dim) * e,
            memory_bound=True,
            note="floor: fwd and bwd each read q, k, cos, sin and write q, k",
        )
    )

    # --- gated activations on the fused [N, 2I] gate/up output
    for act, liger_fn in (("silu", "swiglu"), ("gelu_tanh", "geglu")):

        def gated_inputs(dtype):
            return {"gate_up": randn(gen(), s.tokens, 2 * s.intermediate).to(dtype)}

        impls = {
            # In the model gate_up is a GEMM output, so the backward writes its gradient over it; a view
            # makes the benchmark's leaf an intermediate too (the leaf's own storage gets overwritten).
            "velotune": plain(
                lambda gu, act=act: activations.gated_activation(gu.view_as(gu), act), ("gate_up",)
            ),
            "eager": plain(lambda gu, act=act: activations.gated_activation_reference(gu, act), ("gate_up",)),
            "compile": plain(
                torch.compile(lambda gu, act=act: activations.gated_activation_reference(gu, act)),
                ("gate_up",),
            ),
        }
        if liger is not None:

            def liger_gated(inputs, liger_fn=liger_fn):
                if liger_fn == "swiglu":
                    from liger_kernel.ops.swiglu import LigerSiLUMulFunction as F
                else:
                    from liger_kernel.ops.geglu import LigerGELUMulFunction as F
                # Liger takes gate and up as separate contiguous tensors (Transformers' unfused MLP).
                gate, up = (
                    t.contiguous().requires_grad_(True) for t in inputs["gate_up"].detach().chunk(2, dim=-1)
                )
                return (lambda: F.apply(gate, up)), [gate, up], (lambda grads: [torch.cat(grads, dim=-1)])

            impls["liger"] = liger_gated
        cases.append(
            Case(
                name=f"gated_activation ({act})",
                make_inputs=gated_inputs,
                differentiable=("gate_up",),
                impls=impls,
                floor_kind="bytes",
                floor=lambda e: 8 * s.tokens * s.intermediate * e,
                memory_bound=True,
                note="floor 8·N·I elements: fwd reads 2NI, writes NI; bwd reads dy (NI) and gate_up (2NI), writes 2NI",
            )
        )

    # --- fused linear + cross-entropy, frozen LM head (LoRA)
    def flce_inputs(dtype):
        g = gen()
        return {
            "hidden": randn(g, s.tokens, s.hidden).to(dtype),
            "weight": randn(g, s.vocab, s.hidden, scale=0.02).to(dtype),
            "labels": torch.randint(0, s.vocab, (s.tokens,), generator=g, device=device),
        }

    flce_impls: dict[str, Setup] = {
        "velotune": plain(cross_entropy.fused_linear_cross_entropy, ("hidden",), ("weight", "labels")),
        "eager": plain(cross_entropy.linear_cross_entropy_reference, ("hidden",), ("weight", "labels")),
        "compile": plain(
            torch.compile(cross_entropy.linear_cross_entropy_reference), ("hidden",), ("weight", "labels")
        ),
    }
    if liger is not None:

        def liger_flce(inputs):
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            loss = LigerFusedLinearCrossEntropyLoss()
            (hidden,) = _leaves(inputs, ("hidden",))
            return (lambda: loss(inputs["weight"], hidden, inputs["labels"])), [hidden], list

        flce_impls["liger"] = liger_flce
    cases.append(
        Case(
            name="fused_linear_cross_entropy (frozen head)",
            make_inputs=flce_inputs,
            differentiable=("hidden",),
            impls=flce_impls,
            floor_kind="flops",
            floor=lambda e: 4.0 * s.tokens * s.vocab * s.hidden,
            memory_bound=False,
            note="floor 4·N·V·H FLOPs: the logits GEMM and the hidden-state gradient GEMM",
            materialised_bytes=4.0 * s.tokens * s.vocab,
        )
    )

    # --- causal attention, q [B, T, Hq, D], k/v [B, T, Hk, D]
    scale = 1.0 / math.sqrt(s.head_dim)

    def attn_inputs(dtype):
        g = gen()
        return {
            "q": randn(g, s.batch, s.seq, s.heads, s.head_dim).to(dtype),
            "k": randn(g, s.batch, s.seq, s.kv_heads, s.head_dim).to(dtype),
            "v": randn(g, s.batch, s.seq, s.kv_heads, s.head_dim).to(dtype),
        }

    def sdpa(q, k, v):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            scale=scale,
            enable_gqa=True,
        )
        return out.transpose(1, 2)

    attn_impls: dict[str, Setup] = {
        "velotune": plain(lambda q, k, v: attention.attention(q, k, v, scale=scale), ("q", "k", "v")),
    }
    if hasattr(attention, "attention_triton") and device.type == "cuda":
        attn_impls["velotune (Triton kernel)"] = plain(
            lambda q, k, v: attention.attention_triton(q, k, v, scale=scale), ("q", "k", "v")
        )
    attn_impls.update(
        {
            "eager": plain(
                lambda q, k, v: attention.attention_reference(q, k, v, scale=scale), ("q", "k", "v")
            ),
            "compile": plain(
                torch.compile(lambda q, k, v: attention.attention_reference(q, k, v, scale=scale)),
                ("q", "k", "v"),
            ),
            "sdpa": plain(sdpa, ("q", "k", "v")),
        }
    )
    cases.append(
        Case(
            name="attention (causal)",
            make_inputs=attn_inputs,
            differentiable=("q", "k", "v"),
            impls=attn_impls,
            floor_kind="flops",
            # causal forward 2·B·Hq·T²·D (QKᵀ and PV on half the square); backward 2.5× (flash-attention's count)
            floor=lambda e: 3.5 * 2.0 * s.batch * s.heads * s.seq**2 * s.head_dim,
            memory_bound=False,
            note="floor: causal forward 2·B·Hq·T²·D FLOPs, backward 2.5× that (recomputes QKᵀ); Liger has no attention op",
        )
    )
    return cases


# ----------------------------------------------------------------------------- measuring


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom > 0 else 1.0)


def run_once(setup: Setup, inputs: dict[str, torch.Tensor], dys: list[torch.Tensor] | None = None):
    """Outputs and canonical gradients of one implementation, for upstream gradients `dys` (random,
    seeded, when not given)."""
    fn, leaves, to_canonical = setup(inputs)
    outs = _as_tuple(fn())
    if dys is None:
        g = torch.Generator(device=outs[0].device).manual_seed(1)
        dys = [
            torch.randn(o.shape, generator=g, device=o.device, dtype=torch.float32).to(o.dtype) for o in outs
        ]
    grads = torch.autograd.grad(outs, leaves, [d.to(o.dtype) for d, o in zip(dys, outs)])
    return [o.detach() for o in outs], to_canonical(list(grads)), dys


def check_correctness(
    case: Case, device: torch.device, ref32: list[torch.Tensor] | None
) -> list[dict[str, Any]]:
    """velotune vs the reference in float32 and bf16; `ref32` is the float32 reference on the bf16
    inputs (upcast), against which both bf16 paths are also measured."""
    rows = []
    for dtype_name in ("float32", "bfloat16"):
        dtype = getattr(torch, dtype_name)
        row: dict[str, Any] = {"case": case.name, "dtype": dtype_name}
        try:
            inputs = case.make_inputs(dtype)
            ref_out, ref_grads, dys = run_once(case.impls["eager"], inputs)
            vt_out, vt_grads, _ = run_once(case.impls["velotune"], inputs, dys)
            names = [f"out{i}" for i in range(len(ref_out))] + [f"d{n}" for n in case.differentiable]
            errs = [_rel(a, b) for a, b in zip(vt_out + vt_grads, ref_out + ref_grads)]
            row["errors"] = dict(zip(names, errs))
            row["max_error"] = max(errs)
            if dtype_name == "bfloat16" and ref32 is not None:
                row["vs_fp32_velotune"] = max(_rel(a, b) for a, b in zip(vt_out + vt_grads, ref32))
                row["vs_fp32_reference"] = max(_rel(a, b) for a, b in zip(ref_out + ref_grads, ref32))
            row["pass"] = row["max_error"] < TOL[dtype_name]
            del inputs, ref_out, ref_grads, vt_out, vt_grads
        except Exception as exc:
            row.update(
                error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc().splitlines()[-6:]
            )
            row["pass"] = False
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def time_fn(fn: Callable[[], Any], device: torch.device) -> float:
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def time_impl(
    case: Case, impl: str, device: torch.device, ref32: list[torch.Tensor] | None
) -> dict[str, Any]:
    row: dict[str, Any] = {"case": case.name, "impl": impl}
    try:
        inputs = case.make_inputs(torch.bfloat16)
        fn, leaves, to_canonical = case.impls[impl](inputs)
        outs = _as_tuple(fn())  # also compiles, for torch.compile
        g = torch.Generator(device=device).manual_seed(1)
        dys = [
            torch.randn(o.shape, generator=g, device=device, dtype=torch.float32).to(o.dtype) for o in outs
        ]
        grads = to_canonical(list(torch.autograd.grad(outs, leaves, dys)))
        if ref32 is not None:
            row["error_vs_fp32"] = max(_rel(a, b) for a, b in zip([o.detach() for o in outs] + grads, ref32))
        del outs, grads

        def step():
            torch.autograd.grad(_as_tuple(fn()), leaves, dys)

        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            row["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
        row["ms"] = time_fn(step, device)
        floor = case.floor(2)
        if case.floor_kind == "bytes":
            row["gb_per_s"] = floor / (row["ms"] * 1e-3) / 1e9
        else:
            row["tflop_per_s"] = floor / (row["ms"] * 1e-3) / 1e12
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        row["traceback"] = traceback.format_exc().splitlines()[-6:]
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def fp32_reference_of_bf16_inputs(case: Case) -> list[torch.Tensor] | None:
    """The float32 reference's outputs and grads on the bf16 inputs (upcast), with the same seeded dy."""
    try:
        inputs = {
            k: (v.float() if v.is_floating_point() else v)
            for k, v in case.make_inputs(torch.bfloat16).items()
        }
        fn, leaves, to_canonical = case.impls["eager"](inputs)
        outs = _as_tuple(fn())
        g = torch.Generator(device=outs[0].device).manual_seed(1)
        dys = [
            torch.randn(o.shape, generator=g, device=o.device, dtype=torch.float32).to(torch.bfloat16).float()
            for o in outs
        ]
        grads = to_canonical(list(torch.autograd.grad(outs, leaves, dys)))
        return [o.detach() for o in outs] + grads
    except Exception:
        return None


def measure_copy_gb_per_s(device: torch.device, nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def measure_matmul_tflops(device: torch.device, n: int) -> float:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_fn(lambda: a @ b, device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------- report


def _f(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def write_markdown(
    path: Path, meta: dict[str, Any], correctness: list[dict], timings: list[dict], cases: list[Case]
) -> None:
    copy_bw, mm = meta["copy_gb_per_s"], meta["matmul_tflops"]
    lines = [
        f"# Kernel benchmark — {meta['device']}",
        "",
        f"Measured in this run: copy bandwidth **{copy_bw:,.0f} GB/s** (`dst.copy_(src)`, {meta['copy_bytes'] / 2**30:.0f} GiB, "
        f"read + write counted), bf16 matmul **{mm:,.0f} TFLOP/s** ({meta['matmul_n']}³). Sizes: {meta['sizes']}. "
        "Times are forward + backward (`torch.autograd.grad` of the outputs w.r.t. the differentiable inputs with a fixed "
        "random upstream gradient), median of `triton.testing.do_bench`. `peak extra` is `max_memory_allocated()` during one "
        "forward + backward minus what was allocated before it (inputs excluded). Achieved rate = the op's floor (bytes or "
        "FLOPs, computed, not measured) / time.",
        "",
        "## Correctness (velotune vs its reference, outputs and every input gradient)",
        "",
        "| op | dtype | max rel. error | per tensor | bf16: velotune vs fp32 ref | bf16: reference vs fp32 ref | pass (< tol) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in correctness:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['dtype']} | **error**: {r['error'][:200]} | | | | no |")
            continue
        per = ", ".join(f"{k} {v:.1e}" for k, v in r["errors"].items())
        lines.append(
            f"| {r['case']} | {r['dtype']} | {r['max_error']:.2e} | {per} | {_f(r.get('vs_fp32_velotune'), '.2e')} "
            f"| {_f(r.get('vs_fp32_reference'), '.2e')} | {'yes' if r['pass'] else '**no**'} (tol {TOL[r['dtype']]:g}) |"
        )
    lines += ["", "## Timings (bf16)", ""]
    for case in cases:
        rows = [t for t in timings if t["case"] == case.name]
        rate_head = "GB/s (% of copy)" if case.floor_kind == "bytes" else "TFLOP/s (% of matmul)"
        lines += [
            f"### {case.name}",
            "",
            case.note + ".",
            "",
            f"| implementation | fwd+bwd ms | {rate_head} | peak extra MiB | rel. error vs fp32 reference |",
            "|---|---|---|---|---|",
        ]
        for t in rows:
            if "error" in t:
                lines.append(f"| {t['impl']} | **failed**: {t['error'][:300]} | | | |")
                continue
            if case.floor_kind == "bytes":
                rate = f"{t['gb_per_s']:,.0f} ({100 * t['gb_per_s'] / copy_bw:.0f}%)"
            else:
                rate = f"{t['tflop_per_s']:,.1f} ({100 * t['tflop_per_s'] / mm:.0f}%)"
            peak = t.get("peak_extra_bytes")
            lines.append(
                f"| {t['impl']} | {t['ms']:.3f} | {rate} | {_f(peak and peak / 2**20, ',.0f')} | {_f(t.get('error_vs_fp32'), '.2e')} |"
            )
        lines.append("")
        lines += _goal_lines(case, rows, copy_bw)
    lines += [
        "<sub>" + f"{meta['timestamp']}; {meta['device']}"
        + (f", driver {meta['driver']}" if meta.get("driver") else "")
        + (f", CUDA {meta['cuda_runtime']}" if meta.get("cuda_runtime") else "")
        + "; " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
        + f"; commit `{meta['git_commit']}`.<br>Command: `{meta['command']}`</sub>",
        "",
    ]  # fmt: skip
    path.write_text("\n".join(lines))


def _goal_lines(case: Case, rows: list[dict], copy_bw: float) -> list[str]:
    by = {t["impl"]: t for t in rows if "error" not in t}
    vt, lg = by.get("velotune"), by.get("liger")
    out = []
    if vt and case.memory_bound:
        frac = vt["gb_per_s"] / copy_bw
        out.append(
            f"- Goal ≥ {MEMORY_BOUND_GOAL:.0%} of copy bandwidth: {frac:.0%} — {'met' if frac >= MEMORY_BOUND_GOAL else 'not met'}"
        )
    if vt and lg:
        out.append(
            f"- Goal no slower than Liger: {lg['ms'] / vt['ms']:.2f}× Liger's speed — {'met' if vt['ms'] <= lg['ms'] else 'not met'}"
        )
    if vt and case.materialised_bytes and vt.get("peak_extra_bytes") is not None:
        frac = vt["peak_extra_bytes"] / case.materialised_bytes
        out.append(
            f"- Goal peak memory ≤ 1/8 of materialised fp32 logits ({case.materialised_bytes / 2**20:,.0f} MiB): "
            f"{frac:.3f}× — {'met' if frac <= 1 / 8 else 'not met'}"
        )
    return out + ([""] if out else [])


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", default="", help="comma-separated substrings of op names to run (default: all)")
    p.add_argument("--out-dir", type=Path, action="append", default=None, help="where to write (repeatable)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (works on CPU)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    p.add_argument("--no-liger", action="store_true")
    args = p.parse_args(argv)
    out_dirs = args.out_dir or [REPO_ROOT / "benchmarks" / "results"]

    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 checks compare true float32 math
        torch.backends.cudnn.allow_tf32 = False
    sizes = SMOKE if args.smoke or device.type == "cpu" else Sizes()
    use_compile = not args.no_compile and device.type == "cuda"
    cases = build_cases(sizes, device, use_liger=not args.no_liger and device.type == "cuda")
    wanted = [w.strip() for w in args.ops.split(",") if w.strip()]
    if wanted:
        cases = [c for c in cases if any(w in c.name for w in wanted)]
    for c in cases:
        if not use_compile:
            c.impls.pop("compile", None)

    info = device_info()
    copy_bytes = 2**30 if device.type == "cuda" else 2**24
    meta = {
        **info,
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "benchmarks.kernels", *argv]),
        "versions": library_versions(),
        "git_commit": git_commit(),
        "sizes": ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(sizes).items()),
        "copy_bytes": copy_bytes,
        "copy_gb_per_s": measure_copy_gb_per_s(device, copy_bytes),
        "matmul_n": 8192 if device.type == "cuda" else 256,
    }
    meta["matmul_tflops"] = measure_matmul_tflops(device, meta["matmul_n"])
    print(
        f"[kernels] {meta['device']}: copy {meta['copy_gb_per_s']:.0f} GB/s, matmul {meta['matmul_tflops']:.1f} TFLOP/s",
        flush=True,
    )

    slug = re.sub(r"[^A-Za-z0-9.]+", "-", str(meta["device"])).strip("-").lower()

    def write(done: list[Case]) -> None:
        # Rewritten after every op, so that a run stopped by a time limit keeps what it measured.
        for out_dir in out_dirs:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_markdown(out_dir / f"kernels-{slug}.md", meta, correctness, timings, done)
            (out_dir / f"kernels-{slug}.json").write_text(
                json.dumps(
                    {"meta": meta, "correctness": correctness, "timings": timings}, indent=1, default=str
                )
            )

    correctness: list[dict] = []
    timings: list[dict] = []
    for case in cases:
        ref32 = fp32_reference_of_bf16_inputs(case)
        rows = check_correctness(case, device, ref32)
        correctness += rows
        for r in rows:
            status = "ok" if r["pass"] else "FAIL"
            print(
                f"[kernels] check {case.name:<42} {r['dtype']:<9} {status} {r.get('max_error', r.get('error'))}",
                flush=True,
            )
        for impl in case.impls:
            t = time_impl(case, impl, device, ref32)
            timings.append(t)
            shown = t.get("error") or f"{t['ms']:.3f} ms"
            print(f"[kernels] time  {case.name:<42} {impl:<24} {shown}", flush=True)
        del ref32
        write(cases[: cases.index(case) + 1])
    print(f"[kernels] wrote kernels-{slug}.md/.json into {', '.join(map(str, out_dirs))}", flush=True)
    return 0 if all(r["pass"] for r in correctness) else 1


if __name__ == "__main__":
    sys.exit(main())
