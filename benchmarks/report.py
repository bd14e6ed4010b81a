"""Turns the JSON-lines results in benchmarks/results/ into BENCHMARKS.md and PNG bar charts.

    python -m benchmarks.report [--results-dir benchmarks/results] [--output BENCHMARKS.md]

One table per (device, model, method, batch x seq), from the most recent run that measured it
(every system of one table ran in the same `train_step` invocation, on the same GPU). CPU results
are left out unless --include-cpu (they only show that the harness works).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.shapes import SHAPES

log = logging.getLogger("benchmarks.report")

REPO_ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
SYSTEM_ORDER = ("velotune", "velotune_no_recompute", "unsloth", "liger", "hf_peft", "hf_peft_bnb")
SYSTEM_LABEL = {
    "velotune": "velotune",
    "velotune_no_recompute": "velotune, no recomputation",
    "unsloth": "Unsloth",
    "liger": "Liger-Kernel (Transformers + PEFT)",
    "hf_peft": "Transformers + PEFT",
    "hf_peft_bnb": "Transformers + PEFT + bitsandbytes",
}
METHOD_ORDER = ("lora", "qlora", "full")
# The shape the project's goals are stated for.
GOAL_MODEL = "llama-3.1-8b"

METHOD_TEXT = """\
## How these numbers are measured

- **Harness**: `python -m benchmarks.train_step` (the exact command is under each table). The
  parent process builds a checkpoint of the model shape with random bf16 weights (the published
  `config.json` values, `benchmarks/shapes.py`; seeded, streamed to disk in safetensors shards) and
  draws random token ids (seeded), identical for every system. Each system then runs in a fresh
  process, so no GPU memory carries over from one to the next, and loads the model from that folder.
- **Same work for everyone**: LoRA r=16, alpha=16, dropout 0 on all seven projections
  (q, k, v, o, gate, up, down); gradient checkpointing on (each system's own: Transformers'
  non-reentrant checkpointing for Transformers + PEFT and Liger, `"unsloth"` for Unsloth,
  velotune's own); AdamW, lr 1e-4 (`fused=True`) over the trainable parameters; one step is
  `loss = model(input_ids=ids, labels=ids).loss; loss.backward(); opt.step(); opt.zero_grad()`.
  QLoRA: NF4 with double quantization and bf16 compute (bitsandbytes for Transformers + PEFT and
  Liger, each library's own loader for Unsloth and velotune). Transformers + PEFT is run without
  `prepare_model_for_kbit_training`, which would upcast the embedding and LM head to float32.
- **Timing**: warm-up steps first (not timed), then timed steps, each bracketed by
  `torch.cuda.synchronize()`; the table gives the median step time and tokens/s = batch x seq /
  median.
- **Memory**: `weights` is `torch.cuda.memory_allocated()` after loading and attaching LoRA, before
  the first step (the resident model); `peak alloc` / `peak reserved` are
  `torch.cuda.max_memory_allocated()` / `max_memory_reserved()` over the training steps (the
  optimizer state included); `above weights` = peak alloc - weights. For velotune with CUDA graphs
  (`cuda_graphs = True`) `peak alloc` also includes the graphs' memory pool, which
  `max_memory_allocated()` does not count while graphs replay (`layer_graphs.pool_bytes`).
- **MFU**: model FLOPs per step / median step time / the bf16 matmul rate measured in the same run
  (an 8192^3 matmul timed with `triton.testing.do_bench`), so it reads as a fraction of what this
  GPU really sustains, not of its datasheet peak. Model FLOPs: 2 per weight per token forward, 2
  more for the input gradient, 2 more for the weight gradient in full fine-tuning only, plus
  causal attention (2 x seq x heads x head_dim per token and layer forward, twice that backward);
  recomputation by checkpointing is not counted.
- **Losses**: the first and last step's loss; with the same weights and tokens every 16-bit system
  should start at the same loss (a check that they compute the same function).
- **Failures** are recorded with their exact error and the other systems still run.
"""


def load_results(results_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(results_dir.glob("*.jsonl")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                log.warning("%s:%d is not JSON; skipped", path, n)
    return rows


def latest_tables(rows: list[dict[str, Any]], include_cpu: bool = False) -> dict[tuple, list[dict[str, Any]]]:
    """(device, model, method, batch, seq) -> the rows of the most recent run of that key."""
    runs: dict[tuple, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("device_kind") != "cuda" and not include_cpu:
            continue
        key = (r.get("device"), r.get("model"), r.get("method"), r.get("batch"), r.get("seq"))
        runs[key][r.get("run_id", "")].append(r)
    tables = {}
    for key, by_run in runs.items():
        latest = max(
            by_run.values(), key=lambda rs: (max(x.get("timestamp", "") for x in rs), rs[0].get("run_id", ""))
        )
        # A system listed twice in one run (should not happen) keeps its last line.
        by_system = {r["system"]: r for r in latest}
        tables[key] = sorted(by_system.values(), key=lambda r: _order(SYSTEM_ORDER, r["system"]))
    model_order = list(SHAPES)
    return dict(
        sorted(
            tables.items(),
            key=lambda kv: (
                str(kv[0][0]),
                _order(model_order, kv[0][1]),
                _order(METHOD_ORDER, kv[0][2]),
                kv[0][3] or 0,
                kv[0][4] or 0,
            ),
        )
    )


def _order(seq: tuple | list, item: Any) -> int:
    return seq.index(item) if item in seq else len(seq)


def baseline_system(method: str) -> str:
    return "hf_peft_bnb" if method == "qlora" else "hf_peft"


def _ok(rows: list[dict[str, Any]], system: str) -> dict[str, Any] | None:
    for r in rows:
        if r["system"] == system and r.get("status") == "ok":
            return r
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _gib(x: float | None) -> str:
    return "–" if x is None else f"{x / GIB:.2f}"


def _x(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def goals_for(key: tuple, rows: list[dict[str, Any]]) -> list[tuple[str, float | None, float, bool]]:
    """(goal text, measured ratio, threshold, higher_is_better) for the goals that apply to this table."""
    _, _, method, _, _ = key
    us = _ok(rows, "unsloth")
    get = lambda r, k: None if r is None else r.get(k)  # noqa: E731
    goals = []
    for system in ("velotune", "velotune_no_recompute"):
        vt = _ok(rows, system)
        if system != "velotune" and vt is None:
            continue  # the optional variant: listed only when it ran
        tag = "" if system == "velotune" else f" [{SYSTEM_LABEL[system]}]"
        if method in ("lora", "qlora"):
            goals.append(
                (f"tokens/s ≥ 1.3× Unsloth's{tag}",
                 _ratio(get(vt, "tokens_per_s"), get(us, "tokens_per_s")), 1.3, True)
            )  # fmt: skip
        if method == "qlora":
            goals.append(
                (f"peak memory ≤ 0.85× Unsloth's{tag}",
                 _ratio(get(vt, "peak_allocated_bytes"), get(us, "peak_allocated_bytes")), 0.85, False)
            )  # fmt: skip
        if method == "lora":
            goals.append(
                (f"memory above the resident weights ≤ 0.75× Unsloth's{tag}",
                 _ratio(get(vt, "above_weights_bytes"), get(us, "above_weights_bytes")), 0.75, False)
            )  # fmt: skip
    return goals


def _goal_cell(measured: float | None, threshold: float, higher: bool) -> str:
    if measured is None:
        return "not measured (velotune or Unsloth has no result)"
    met = measured >= threshold if higher else measured <= threshold
    return f"{measured:.2f}× — {'met' if met else 'not met'}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(text)).strip("-").lower()


def chart_name(key: tuple) -> str:
    device, model, method, batch, seq = key
    return f"train_step-{_slug(device)}-{model}-{method}-{batch}x{seq}.png"


def draw_chart(key: tuple, rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device, model, method, batch, seq = key
    ok = [r for r in rows if r.get("status") == "ok"]
    names = [r["system"] for r in ok]
    colors = ["#d62728" if n == "velotune" else "#7f7f7f" for n in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax1.barh(names, [r["tokens_per_s"] for r in ok], color=colors)
    ax1.set_xlabel("tokens / s (higher is better)")
    ax1.invert_yaxis()
    weights = [(r.get("weights_bytes") or 0) / GIB for r in ok]
    above = [(r.get("above_weights_bytes") or 0) / GIB for r in ok]
    ax2.barh(names, weights, color="#bbbbbb", label="resident weights")
    ax2.barh(names, above, left=weights, color=colors, label="above weights")
    ax2.set_xlabel("peak allocated GiB (lower is better)")
    ax2.invert_yaxis()
    ax2.legend(loc="lower right", fontsize=8)
    for ax, values in (
        (ax1, [r["tokens_per_s"] for r in ok]),
        (ax2, [w + a for w, a in zip(weights, above)]),
    ):
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:,.0f}" if ax is ax1 else f" {v:.1f}", va="center", fontsize=8)
        ax.margins(x=0.18)
    fig.suptitle(f"{model} {method}, batch {batch} × {seq}, {device}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table_markdown(key: tuple, rows: list[dict[str, Any]], chart_link: str | None) -> str:
    device, model, method, batch, seq = key
    base = _ok(rows, baseline_system(method))
    us = _ok(rows, "unsloth")
    out = [f"### {model} — {method} — batch {batch} × {seq} — {device}", ""]
    out.append(
        "| system | tokens/s | vs "
        + SYSTEM_LABEL[baseline_system(method)]
        + " | vs Unsloth | step (s) | peak alloc GiB "
        "| peak reserved GiB | weights GiB | above weights GiB | above weights vs Unsloth | MFU | loss first → last |"
    )
    out.append("|" + "---|" * 12)
    for r in rows:
        name = SYSTEM_LABEL.get(r["system"], r["system"])
        if r.get("status") != "ok":
            what = (
                "skipped: " + r.get("skip_reason", "")
                if r.get("status") == "skipped"
                else f"**failed** ({r['error']['type']}, see below)"
            )
            out.append(f"| {name} | {what} |" + " |" * 10)
            continue
        mfu = "–" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        out.append(
            f"| {name} | {r['tokens_per_s']:,.0f} | {_x(_ratio(r['tokens_per_s'], base and base['tokens_per_s']))} "
            f"| {_x(_ratio(r['tokens_per_s'], us and us['tokens_per_s']))} | {r['step_time_median_s']:.3f} "
            f"| {_gib(r.get('peak_allocated_bytes'))} | {_gib(r.get('peak_reserved_bytes'))} | {_gib(r.get('weights_bytes'))} "
            f"| {_gib(r.get('above_weights_bytes'))} | {_x(_ratio(r.get('above_weights_bytes'), us and us.get('above_weights_bytes')))} "
            f"| {mfu} | {r['loss_first']:.4f} → {r['loss_last']:.4f} |"
        )
    out.append("")
    goals = goals_for(key, rows)
    if goals:
        scope = "" if model == GOAL_MODEL else f" (stated for {GOAL_MODEL}; shown here for reference)"
        out.append(f"Goals{scope}:")
        out.append("")
        out.extend(f"- velotune {text}: {_goal_cell(m, t, h)}" for text, m, t, h in goals)
        out.append("")
    if chart_link:
        out += [f"![{model} {method} {batch}×{seq}]({chart_link})", ""]

    failed = [r for r in rows if r.get("status") == "error"]
    for r in failed:
        err = r["error"]
        out.append(
            f"**{SYSTEM_LABEL.get(r['system'], r['system'])} failed** in phase `{err.get('phase', '?')}`: `{err['type']}`: {_one_line(err['message'])}"
        )
        out.append("")
        tail = err.get("traceback_tail") or err.get("log_tail") or []
        if tail:
            out += ["```", *tail[-12:], "```", ""]

    r0 = rows[0]
    v = r0.get("versions", {})
    vers = ", ".join(
        f"{k} {v[k]}"
        for k in (
            "python",
            "torch",
            "triton",
            "transformers",
            "peft",
            "bitsandbytes",
            "liger-kernel",
            "unsloth",
            "unsloth_zoo",
            "velotune",
        )
        if v.get(k)
    )
    out.append(
        f"<sub>Run `{r0.get('run_id')}` at {r0.get('timestamp')}; {device}"
        + (f", driver {r0['driver']}" if r0.get("driver") else "")
        + (f", CUDA {r0['cuda_runtime']}" if r0.get("cuda_runtime") else "")
        + f"; measured matmul {r0.get('matmul_tflops', 0):.3g} TFLOP/s; {r0.get('warmup')} warm-up + {r0.get('steps')} timed steps; "
        f"{vers}; commit `{r0.get('git_commit')}`"
        + (f"; note: {r0['note']}" if r0.get("note") else "")
        + f".<br>Command: `{r0.get('command')}`</sub>"
    )
    out.append("")
    return "\n".join(out)


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + " …"


def goals_summary(tables: dict[tuple, list[dict[str, Any]]]) -> str:
    out = [
        "## Goals",
        "",
        f"Stated for the {GOAL_MODEL} shape, measured against Unsloth in the same run:",
        "",
        "| goal | method | measured | device |",
        "|---|---|---|---|",
    ]
    found = False
    for key, rows in tables.items():
        if key[1] != GOAL_MODEL:
            continue
        for text, m, t, h in goals_for(key, rows):
            found = True
            out.append(f"| velotune {text} | {key[2]} {key[3]}×{key[4]} | {_goal_cell(m, t, h)} | {key[0]} |")
    if not found:
        out += [
            "| velotune tokens/s ≥ 1.3× Unsloth's | lora, qlora | not measured yet | |",
            "| velotune peak memory ≤ 0.85× Unsloth's | qlora | not measured yet | |",
            "| velotune memory above the resident weights ≤ 0.75× Unsloth's | lora | not measured yet | |",
        ]
    out.append("")
    return "\n".join(out)


def build_report(
    results_dir: Path, output: Path, charts_dir: Path, include_cpu: bool = False, charts: bool = True
) -> str:
    tables = latest_tables(load_results(results_dir), include_cpu=include_cpu)
    parts = [
        "# Benchmarks",
        "",
        "Training-step speed and memory of velotune and the libraries people would use instead, measured "
        "side by side on one GPU with one harness (`benchmarks/`). Regenerate this page with "
        "`python -m benchmarks.report`; the raw results are the JSON lines in `benchmarks/results/`.",
        "",
        goals_summary(tables),
    ]
    chart_error = None
    if charts:
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            chart_error = f"charts not drawn: {exc} (pip install matplotlib)"
    if not tables:
        parts += [
            "## Results",
            "",
            "No results yet: run `bash benchmarks/gpu_peers.sh` on a GPU machine.",
            "",
        ]
    else:
        parts += ["## Results", ""]
        if chart_error:
            parts += [f"_{chart_error}_", ""]
        for key, rows in tables.items():
            link = None
            if charts and not chart_error and any(r.get("status") == "ok" for r in rows):
                path = charts_dir / chart_name(key)
                draw_chart(key, rows, path)
                try:
                    link = path.resolve().relative_to(output.resolve().parent).as_posix()
                except ValueError:
                    link = path.resolve().as_posix()
            parts.append(table_markdown(key, rows, link))
    parts.append(METHOD_TEXT)
    text = "\n".join(parts)
    output.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    p.add_argument("--output", type=Path, default=REPO_ROOT / "BENCHMARKS.md")
    p.add_argument("--charts-dir", type=Path, default=None, help="PNG charts (default: the results dir)")
    p.add_argument("--include-cpu", action="store_true", help="also tabulate CPU runs (harness checks)")
    p.add_argument("--no-charts", action="store_true")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_report(
        args.results_dir,
        args.output,
        args.charts_dir or args.results_dir,
        args.include_cpu,
        not args.no_charts,
    )
    log.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
