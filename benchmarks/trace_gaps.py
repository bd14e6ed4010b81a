"""Why the GPU idles in a training step: the gaps on the compute stream of a torch.profiler chrome
trace (`qlora_step_profile.py --trace`), each put down to its cause.

    python benchmarks/trace_gaps.py TRACE.json.gz [--min-us 20] [--top 15]

For every gap between two kernels on the busiest stream longer than --min-us:
  host late  the next kernel was launched (cudaLaunchKernel & co.) after the previous kernel had
             ended: the GPU waited for the host. Attributed to the innermost CPU op around that
             launch, and to the autograd node (or Python-level region) around it.
  waiting    the launch came before the previous kernel ended: the stream waited for something
             else (an event of a copy stream, a host-to-device copy on the same stream).
Gaps are also split by phase: before the first autograd engine event (forward) and after.
The profiler adds host time to every op, so "host late" is an upper bound for an unprofiled step;
where the gaps fall is what this reads.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
from pathlib import Path

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaMemcpyAsync", "cudaGraphLaunch",
            "cudaMemsetAsync")  # fmt: skip


def load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def analyse(events: list[dict], min_us: float, top: int) -> dict:
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")]
    by_stream = collections.defaultdict(list)
    for k in kernels:
        by_stream[(k.get("pid"), k.get("tid"))].append(k)
    stream = max(by_stream, key=lambda s: sum(k["dur"] for k in by_stream[s] if k.get("cat") == "kernel"))
    ks = sorted(by_stream[stream], key=lambda k: k["ts"])
    launch_of = {}
    for e in events:
        # Triton launches through the driver API (category "cuda_driver"), cuBLAS and ATen through the runtime.
        if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver") and e.get("name") in LAUNCHES:
            corr = e.get("args", {}).get("correlation")
            if corr is not None:
                launch_of[corr] = e
    cpu_ops = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "python_function",
                      "user_annotation")), key=lambda e: e["ts"])  # fmt: skip
    starts = [e["ts"] for e in cpu_ops]
    engine = [e["ts"] for e in cpu_ops if "autograd::engine" in e["name"]]
    backward_start = min(engine) if engine else float("inf")

    def enclosing(ts: float, tid) -> tuple[str, str]:
        """(innermost op, outermost autograd node or region) around a host timestamp on thread tid."""
        inner, outer = "?", "?"
        i = bisect.bisect_right(starts, ts)
        best = None
        for e in cpu_ops[max(0, i - 4000) : i]:
            if e.get("tid") != tid or not (e["ts"] <= ts <= e["ts"] + e["dur"]):
                continue
            if best is None or e["dur"] < best["dur"]:
                best = e
            if "Backward" in e["name"] or "autograd::engine" in e["name"]:
                outer = e["name"]
        if best is not None:
            inner = best["name"]
        return inner, outer

    totals = collections.Counter()
    by_cause = collections.Counter()
    by_place = collections.Counter()
    count = 0
    largest = []  # (gap, offset from the first kernel, cause, next kernel)
    for prev, nxt in zip(ks, ks[1:]):
        gap = nxt["ts"] - (prev["ts"] + prev["dur"])
        if gap < min_us:
            continue
        count += 1
        phase = "forward" if nxt["ts"] < backward_start else "backward"
        launch = launch_of.get(nxt.get("args", {}).get("correlation"))
        late = launch is not None and launch["ts"] + launch["dur"] > prev["ts"] + prev["dur"]
        cause = "host late" if late else ("waiting" if launch is not None else "no launch")
        totals[phase] += gap
        by_cause[(phase, cause)] += gap
        largest.append((gap, nxt["ts"] - ks[0]["ts"], cause, nxt["name"][:50]))
        if late:
            inner, outer = enclosing(launch["ts"], launch.get("tid"))
            by_place[(phase, outer, inner)] += gap
        else:
            by_place[(phase, f"({cause})", nxt["name"][:60])] += gap
    span = ks[-1]["ts"] + ks[-1]["dur"] - ks[0]["ts"]
    busy = sum(k["dur"] for k in ks)
    return {
        "span_ms": span / 1e3,
        "busy_ms": busy / 1e3,
        "gaps": count,
        "gap_ms": {k: v / 1e3 for k, v in totals.items()},
        "by_cause_ms": {f"{p} / {c}": v / 1e3 for (p, c), v in by_cause.most_common()},
        "top_places_ms": [(p, o, i, round(v / 1e3, 2)) for (p, o, i), v in by_place.most_common(top)],
        # Where in the step the largest gaps fall: (ms into the step, gap ms, cause, next kernel).
        "largest_gaps": [(round(at / 1e3, 1), round(g / 1e3, 2), c, n) for g, at, c, n in sorted(largest)[::-1][:top]],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", type=Path)
    p.add_argument("--min-us", type=float, default=20.0)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()
    result = analyse(load(args.trace), args.min_us, args.top)
    print(f"{args.trace.name}: compute stream span {result['span_ms']:.1f} ms, busy {result['busy_ms']:.1f} ms, "
          f"{result['gaps']} gaps >= {args.min_us:g} us")  # fmt: skip
    for key, ms in result["gap_ms"].items():
        print(f"  {key:10s} {ms:8.2f} ms idle")
    for key, ms in result["by_cause_ms"].items():
        print(f"  {key:24s} {ms:8.2f} ms")
    for phase, outer, inner, ms in result["top_places_ms"]:
        print(f"  {ms:7.2f} ms  {phase:8s} {outer[:50]:50s} {inner[:50]}")
    print("  largest gaps (ms into the step: gap ms, cause, next kernel):")
    for at, ms, cause, name in result["largest_gaps"]:
        print(f"    {at:8.1f}: {ms:6.2f} {cause:10s} {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
