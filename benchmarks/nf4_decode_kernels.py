"""Per-kernel GPU time of the 4-bit decoding product (`velotune.quant.nf4_matmul`): 4 layers x 7 projections
of Llama-3.1-8B's shapes replayed from a CUDA graph under the profiler; each kernel's time and the idle gap
before it, at 1 and 8 rows of x. Shows whether a decoding step's projections are bound by the kernels or by
the time between them. On the GPU machine: OUT=dir python3 benchmarks/nf4_decode_kernels.py
"""

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "quant"))

import gpu_check_nf4_matmul as check  # noqa: E402
import torch  # noqa: E402

from velotune.quant import nf4_matmul  # noqa: E402

LAYERS = 4


def main() -> None:
    device = torch.device("cuda")
    weights = check._layer_weights(device)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": LAYERS,
              "weights": [list(q.shape) for q, _ in weights], "rows": {}}  # fmt: skip
    for rows in (1, 8):
        xs = {k: torch.randn(rows, k, device=device, dtype=torch.bfloat16) for _, _, k, _ in check.SHAPES}

        def step(xs=xs):
            return [nf4_matmul.nf4_matmul_triton(xs[q.shape[1]], q) for _ in range(LAYERS) for q, _ in weights]

        graph = check.captured(step)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
        kernels = sorted(
            (e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
            key=lambda e: e.time_range.start,
        )
        last = kernels[-len(kernels) // 3 :]  # the third replay
        listed, prev_end = [], None
        for e in last:
            gap = e.time_range.start - prev_end if prev_end is not None else 0.0
            listed.append({"kernel": e.name[:48], "us": round(e.time_range.elapsed_us(), 2), "gap_before_us": round(gap, 2)})
            prev_end = e.time_range.end
        busy, idle = sum(k["us"] for k in listed), sum(k["gap_before_us"] for k in listed)
        report["rows"][rows] = {"kernels_per_layer": len(listed) // LAYERS, "busy_us_per_layer": busy / LAYERS,
                                "idle_us_per_layer": idle / LAYERS, "one_layer": listed[: len(listed) // LAYERS]}  # fmt: skip
        print(f"rows {rows}: {len(listed) // LAYERS} kernels per layer, busy {busy / LAYERS:.1f} us, idle "
              f"{idle / LAYERS:.1f} us per layer")  # fmt: skip
        for k in listed[: len(listed) // LAYERS]:
            print(f"   {k['kernel']:<48} {k['us']:8.2f} us  (gap before {k['gap_before_us']:.2f})")
    Path(os.environ.get("OUT", ".")).joinpath("nf4_decode_kernels.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
