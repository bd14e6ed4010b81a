"""The kernel benchmark script runs on CPU at tiny sizes and writes its report (the GPU run uses the
same code at Llama-3.1-8B sizes)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # `benchmarks` is not an installed package

from benchmarks import kernels  # noqa: E402

OPS = (
    "rms_norm",
    "rms_norm (trainable weight)",
    "apply_rotary",
    "gated_activation (silu)",
    "gated_activation (gelu_tanh)",
    "fused_linear_cross_entropy (frozen head)",
    "attention (causal)",
)


def test_kernel_benchmark_checks_and_times_every_op_in_smoke_mode(tmp_path):
    assert kernels.main(["--smoke", "--out-dir", str(tmp_path)]) == 0
    (md,) = tmp_path.glob("kernels-*.md")
    (js,) = tmp_path.glob("kernels-*.json")
    data = json.loads(js.read_text())
    checked = {(r["case"], r["dtype"]) for r in data["correctness"] if r["pass"]}
    assert checked == {(op, dt) for op in OPS for dt in ("float32", "bfloat16")}
    for op in OPS:
        times = {t["impl"]: t for t in data["timings"] if t["case"] == op}
        assert {"velotune", "eager"} <= set(times), op
        assert all(t["ms"] > 0 and "error" not in t for t in times.values()), times
        # The bf16 paths are measured against the float32 reference on the same (rounded) inputs.
        assert 0 < times["eager"]["error_vs_fp32"] < 2e-2
    text = md.read_text()
    assert all(f"### {op}" in text for op in OPS)
    assert data["meta"]["copy_gb_per_s"] > 0 and data["meta"]["matmul_tflops"] > 0


def test_byte_floors_count_reads_and_writes_of_forward_and_backward():
    s = kernels.Sizes()
    cases = {c.name: c for c in kernels.build_cases(s, kernels.torch.device("cpu"), use_liger=False)}
    # rms_norm: x read twice, y written, dy read, dx written.
    assert cases["rms_norm"].floor(2) == 5 * 8192 * 4096 * 2
    # SwiGLU at Llama-3.1-8B: 8 * 8192 * 14336 bf16 elements = 1.88 GB.
    assert cases["gated_activation (silu)"].floor(2) == 8 * 8192 * 14336 * 2
    # The naive loss materialises float32 logits of 8192 x 128256.
    assert cases["fused_linear_cross_entropy (frozen head)"].materialised_bytes == 4 * 8192 * 128256
