"""The benchmark harness runs end to end on CPU (tiny model) and the report builds from its results."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # `benchmarks` is not an installed package

from benchmarks import report  # noqa: E402
from benchmarks.shapes import SHAPES, matmul_params_per_token  # noqa: E402

TINY_VOCAB = SHAPES["tiny-llama"]["vocab_size"]


def run_harness(tmp: Path, cache: Path, systems: str, dtype: str = "float32", batch: str = "2") -> list[dict]:
    out = tmp / "results.jsonl"
    cmd = [
        sys.executable, "-m", "benchmarks.train_step", "--model", "tiny-llama", "--method", "lora",
        "--batch", batch, "--seq", "16", "--warmup", "1", "--steps", "2", "--systems", systems,
        "--dtype", dtype, "--out", str(out), "--cache-dir", str(cache),
    ]  # fmt: skip
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(scope="module")
def hf_and_failing_run(tmp_path_factory, cache_dir) -> list[dict]:
    # Unsloth cannot run here (not installed, or no GPU): its failure must be recorded, not fatal.
    return run_harness(tmp_path_factory.mktemp("run"), cache_dir, "unsloth,hf_peft")


def test_hf_peft_trains_the_tiny_model_on_cpu_and_records_one_result_line(hf_and_failing_run):
    by_system = {r["system"]: r for r in hf_and_failing_run}
    r = by_system["hf_peft"]
    assert r["status"] == "ok", r.get("error")
    assert len(r["losses"]) == 3 and len(r["step_times_s"]) == 3
    assert all(math.isfinite(x) for x in r["losses"])
    # Random weights with std 0.02 give near-uniform logits: the first loss is about ln(vocab).
    assert abs(r["loss_first"] - math.log(TINY_VOCAB)) < 0.05
    assert r["tokens_per_s"] == pytest.approx(2 * 16 / r["step_time_median_s"])
    assert r["peak_allocated_bytes"] is None and r["weights_bytes"] is None  # no CUDA
    # LoRA r=16 on the seven projections of each of the 2 layers: (in + out) * 16 per projection.
    cfg = SHAPES["tiny-llama"]
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    per_layer = 16 * ((h + q) * 2 + (h + kv) * 2 + (h + i) * 3)
    assert r["trainable_params"] == cfg["num_hidden_layers"] * per_layer
    assert (
        r["device_kind"] == "cpu"
        and r["versions"]["torch"]
        and r["command"].startswith("python -m benchmarks")
    )
    expected_flops = 4 * matmul_params_per_token(cfg) * 32 + 3 * 2 * 16 * q * 32 * cfg["num_hidden_layers"]
    assert r["model_tflops_per_step"] == pytest.approx(expected_flops / 1e12)


def test_a_failing_system_records_its_error_and_the_run_goes_on(hf_and_failing_run):
    assert [r["system"] for r in hf_and_failing_run] == ["unsloth", "hf_peft"]
    failed = hf_and_failing_run[0]
    assert failed["status"] == "error"
    assert failed["error"]["type"] and failed["error"]["message"]
    assert failed["error"]["traceback_tail"] or failed["error"]["log_tail"]
    assert "tokens_per_s" not in failed
    assert hf_and_failing_run[1]["status"] == "ok"


def test_the_checkpoint_folder_loads_with_transformers_and_is_reused(hf_and_failing_run, cache_dir):
    from transformers import AutoModelForCausalLM

    folders = [p for p in cache_dir.iterdir() if p.name.startswith("tiny-llama-")]
    assert len(folders) == 1 and (folders[0] / "COMPLETE").exists()
    model = AutoModelForCausalLM.from_pretrained(folders[0])
    w = model.model.layers[0].self_attn.q_proj.weight
    assert w.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.model.norm.weight.eq(1).all()


def test_a_run_past_its_deadline_records_every_system_as_skipped_and_builds_nothing(tmp_path):
    out, cache = tmp_path / "r.jsonl", tmp_path / "cache"
    cmd = [
        sys.executable, "-m", "benchmarks.train_step", "--model", "llama-3.1-8b", "--method", "qlora",
        "--systems", "hf_peft_bnb,velotune", "--deadline", "1", "--out", str(out), "--cache-dir", str(cache),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["system"], r["status"]) for r in rows] == [("hf_peft_bnb", "skipped"), ("velotune", "skipped")]
    assert all(r["skip_reason"].startswith("time budget") for r in rows)
    assert not any(p.name.startswith("llama") for p in cache.iterdir())


def _velotune_has_peft() -> bool:
    try:
        import velotune
    except Exception:
        return False
    return hasattr(getattr(velotune, "FastLanguageModel", None), "get_peft_model")


@pytest.mark.skipif(
    not _velotune_has_peft(),
    reason="velotune.FastLanguageModel.get_peft_model does not exist yet (issue 4); the velotune system needs it",
)
def test_velotune_system_trains_the_tiny_model_on_cpu_and_starts_at_the_reference_loss(
    hf_and_failing_run, tmp_path, cache_dir
):
    (r,) = run_harness(tmp_path, cache_dir, "velotune")
    assert r["status"] == "ok", r.get("error")
    assert all(math.isfinite(x) for x in r["losses"])
    # Same weights, same tokens, LoRA B initialised to zero: the first loss is the base model's.
    hf = next(x for x in hf_and_failing_run if x["system"] == "hf_peft")
    assert r["loss_first"] == pytest.approx(hf["loss_first"], rel=1e-4)


def test_a_batch_list_measures_every_size_on_one_load_and_records_a_line_per_size(tmp_path, cache_dir):
    rows = run_harness(tmp_path, cache_dir, "velotune_no_recompute,hf_peft", batch="1,3")
    assert [(r["system"], r["batch"]) for r in rows] == [
        ("velotune_no_recompute", 1), ("velotune_no_recompute", 3), ("hf_peft", 1), ("hf_peft", 3)
    ]
    for r in rows:
        assert r["status"] == "ok", r.get("error")
        assert len(r["losses"]) == 3
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 16 / r["step_time_median_s"])
    # The second size continues from the weights the first one left (with a fresh optimizer), on its own
    # tokens; a few steps at lr 1e-4 keep both near ln(vocab).
    for r in rows:
        assert abs(r["loss_first"] - math.log(TINY_VOCAB)) < 0.05
    assert rows[0]["model_tflops_per_step"] * 3 == pytest.approx(rows[1]["model_tflops_per_step"])


def _row(system: str, **kw) -> dict:
    base = {
        "run_id": "r1", "timestamp": "2026-11-20T10:00:00+00:00", "device": "NVIDIA H100 80GB HBM3",
        "device_kind": "cuda", "driver": "580.1", "cuda_runtime": "13.0", "model": "llama-3.1-8b",
        "method": "lora", "batch": 2, "seq": 2048, "warmup": 3, "steps": 10, "matmul_tflops": 700.0,
        "versions": {"torch": "2.11.0", "transformers": "5.17.0"}, "git_commit": "abc123",
        "command": "python -m benchmarks.train_step --model llama-3.1-8b", "note": "", "system": system,
    }  # fmt: skip
    base.update(kw)
    return base


def _ok(system: str, tps: float, peak_gib: float, weights_gib: float, **kw) -> dict:
    g = 2**30
    return _row(
        system, status="ok", tokens_per_s=tps, step_time_median_s=4096 / tps, peak_allocated_bytes=peak_gib * g,
        peak_reserved_bytes=(peak_gib + 1) * g, weights_bytes=weights_gib * g,
        above_weights_bytes=(peak_gib - weights_gib) * g, mfu=0.5, loss_first=11.76, loss_last=11.70, **kw,
    )  # fmt: skip


def test_report_tabulates_ratios_goals_failures_and_draws_charts(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    rows = [
        _ok("velotune", 13000.0, 17.0, 15.0),
        _ok("unsloth", 10000.0, 18.0, 15.0),
        _ok("hf_peft", 5000.0, 22.0, 15.0),
        _row("liger", status="error", error={"type": "RuntimeError", "message": "CUDA error: boom", "phase": "step 0",
                                             "traceback_tail": ["Traceback (most recent call last):", "RuntimeError: boom"]}),
        _row("hf_peft_bnb", status="skipped", skip_reason="not for lora"),
        # An older run of the same table: must be ignored.
        _ok("velotune", 1.0, 99.0, 15.0, run_id="r0", timestamp="2026-11-01T10:00:00+00:00"),
        # A CPU run: left out by default.
        _ok("hf_peft", 50.0, 0.0, 0.0, run_id="cpu", device="some cpu", device_kind="cpu"),
    ]  # fmt: skip
    (results / "run.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    output = tmp_path / "BENCHMARKS.md"
    text = report.build_report(results, output, charts_dir=results)

    assert output.read_text() == text
    assert "some cpu" not in text and "| 1 |" not in text
    velotune_line = next(line for line in text.splitlines() if line.startswith("| velotune |"))
    cells = [c.strip() for c in velotune_line.strip("|").split("|")]
    assert cells[1:4] == ["13,000", "2.60×", "1.30×"]  # tokens/s, vs Transformers + PEFT, vs Unsloth
    assert cells[9] == "0.67×"  # above weights: 2 GiB vs Unsloth's 3 GiB
    assert "tokens/s ≥ 1.3× Unsloth's: 1.30× — met" in text
    assert "memory above the resident weights ≤ 0.75× Unsloth's: 0.67× — met" in text
    assert "`RuntimeError`: CUDA error: boom" in text and "skipped: not for lora" in text
    assert "Command: `python -m benchmarks.train_step --model llama-3.1-8b`" in text
    if importlib.util.find_spec("matplotlib") is None:  # until requirements-ci.txt carries it
        assert "charts not drawn" in text and not list(results.glob("*.png"))
    else:
        (chart,) = results.glob("*.png")
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({chart.resolve().relative_to(tmp_path.resolve()).as_posix()})" in text
    assert "## How these numbers are measured" in text


def test_report_states_the_goals_unmeasured_when_there_are_no_results(tmp_path):
    text = report.build_report(tmp_path, tmp_path / "B.md", charts_dir=tmp_path)
    assert "not measured yet" in text and "No results yet" in text


# Parameter counts of the published checkpoints (their safetensors totals): the shapes are the real ones.
PUBLISHED_PARAMS = {
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "qwen2.5-7b": 7_615_616_512,
    "mistral-7b": 7_248_023_552,
    "gemma-2-9b": 9_241_705_984,
    "phi-3-mini": 3_821_079_552,
    "mixtral-8x7b": 46_702_792_704,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_each_shape_has_the_parameter_count_of_the_published_checkpoint(name):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from benchmarks.train_step import checkpoint_tensors

    cfg = dict(SHAPES[name])
    model_type = cfg.pop("model_type")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))
    tensors = checkpoint_tensors(model, model_type)
    assert sum(torch.Size(shape).numel() for _, shape in tensors) == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_a_shrunk_random_checkpoint_of_each_family_loads_in_transformers_with_no_missing_keys(name, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.train_step import build_random_checkpoint

    cfg = dict(SHAPES[name])
    cfg.update(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=512
    )
    cfg["num_key_value_heads"] = (
        4 if SHAPES[name]["num_key_value_heads"] == SHAPES[name]["num_attention_heads"] else 2
    )
    if "head_dim" in cfg:
        cfg["head_dim"] = 16
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if key in cfg:
            cfg[key] = min(cfg[key], 3)
    if "num_local_experts" in cfg:
        cfg["num_local_experts"] = 3
    build_random_checkpoint(cfg, tmp_path, seed=0, device=torch.device("cpu"))
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    identity = 0.0 if cfg["model_type"] == "gemma2" else 1.0  # Gemma's norm scales by (1 + w)
    assert model.model.norm.weight.eq(identity).all()
