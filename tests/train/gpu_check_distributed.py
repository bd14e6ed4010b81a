"""GPU check and benchmark of velotune.train.distributed on one host with 2 GPUs (NCCL), in one command:

    .venv/bin/python tests/train/gpu_check_distributed.py --out-dir "$OUT"

It sets NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 for itself and every
process it starts (NVLink multicast off), and stops starting work past --budget-s (default 480 s; the
longest single launch is capped by --launch-timeout-s), recording what it skipped.

1. Correctness, first (a small random Llama, float32): 1 GPU x batch 4 against 2 GPUs x batch 2, 3 steps,
   for LoRA + DDP, QLoRA + DDP, full fine-tuning + FSDP2, LoRA + FSDP2 with offloaded checkpoints, QLoRA +
   FSDP2 with checkpoints (4-bit base sharded) and, with DeepSpeed installed, ZeRO-2 LoRA with offloaded
   checkpoints and ZeRO-3 full fine-tuning (started by the `deepspeed` launcher); then every 2-GPU checkpoint
   of step 2 resumed on 1 GPU, and a 1-GPU checkpoint resumed by ZeRO-3 on 2. Losses and final trainable
   tensors are compared; the all-reduce sums in another order than one GPU's GEMMs and Adam's first steps
   magnify that on tiny gradients, so the bar is 1e-4 relative (the CPU tests hold 1e-6 with gloo).
2. Scaling (Llama-3.1-8B shape, random bf16 weights built once in --cache-dir, batch 2 x 2048 tokens per GPU,
   velotune's Trainer): LoRA with offloaded checkpoints on 1 GPU, with DDP and with FSDP2 on 2 GPUs; full
   fine-tuning (bf16 weights and AdamW state: 8 bytes per parameter, 64 GB at 8B, plus activations without
   checkpointing) on 1 GPU and with FSDP2 on 2 GPUs; with DeepSpeed ZeRO-2 LoRA and ZeRO-3 full fine-tuning on
   2 GPUs. tokens/s over all GPUs (median of the timed steps), scaling against 1 GPU, peak memory per GPU.
   A run that does not fit is recorded as out of memory (e.g. 8B full fine-tuning on one 80 GB H100).

Writes distributed.jsonl (one record per row) and distributed.md (the tables) to --out-dir.
`--cpu` runs on CPU with gloo, a smoke test of the script (`--shape tiny-llama --bench-seq 64` for scaling).

DeepSpeed: the GPU machine has no internet. Carry the wheels in .peers/wheels (built on a machine with PyPI:
    DS_BUILD_OPS=0 pip wheel deepspeed==0.19.8 --no-deps -w .peers/wheels
    pip download einops==0.8.2 hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 py-cpuinfo==9.0.0 psutil==7.2.2 \\
        pydantic==2.14.3 --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \\
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .peers/wheels
); when deepspeed does not import, this script installs it from there with
`pip install --no-index --find-links .peers/wheels deepspeed==0.19.8` (pure Python, no CUDA ops are built;
only the dependencies missing on the machine are taken from the folder).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
WORKER = ROOT / "tests" / "train" / "distributed_worker.py"
BENCH_WORKER = ROOT / "tests" / "train" / "distributed_bench_worker.py"
BIN = Path(sys.executable).parent
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NO_MULTICAST)  # before torch is imported: this process and everything it starts

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

DEEPSPEED_VERSION = "0.19.8"
LAUNCH_ENV_DROP = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


class Clock:
    """Work starts only while `budget_s` allows it; no launch runs past `deadline_s` (it is killed there)."""

    def __init__(self, budget_s: float, deadline_s: float):
        self.start, self.budget_s, self.deadline_s = time.perf_counter(), budget_s, deadline_s

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, needed_s: float) -> bool:
        return self.elapsed + needed_s <= self.budget_s

    def timeout(self, cap_s: float) -> float:
        return max(5.0, min(cap_s, self.deadline_s - self.elapsed))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path, args: list[str], processes: int, launcher: str, cpu: bool, timeout_s: float) -> str:
    """Runs script under one process, torchrun or the deepspeed launcher; returns the output's tail on failure."""
    env = {**os.environ, **NO_MULTICAST, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "4"}
    env["DS_ACCELERATOR"] = "cpu" if cpu else "cuda"
    for key in LAUNCH_ENV_DROP:
        env.pop(key, None)
    port = str(free_port())
    if processes == 1 and launcher != "deepspeed":
        command = [sys.executable, str(script), *args]
    elif launcher == "deepspeed":
        command = [
            str(BIN / "deepspeed"),
            "--num_gpus",
            str(processes),
            "--master_port",
            port,
            str(script),
            *args,
        ]
    else:
        command = [str(BIN / "torchrun"), "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1",
                   "--master_port", port, str(script), *args]  # fmt: skip
    try:
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
        return f"timed out after {timeout_s:.0f} s\n" + out[-4000:]
    if done.returncode != 0:
        lines = [line for line in (done.stdout + done.stderr).splitlines() if "Warning" not in line]
        return "\n".join(lines)[-6000:]
    return ""


def ensure_deepspeed(wheels: Path) -> str:
    """'' when deepspeed imports (installing it from the carried wheels if needed), else why not."""
    if importlib.util.find_spec("deepspeed") is not None:
        return ""
    if not wheels.is_dir():
        return f"deepspeed is not installed and {wheels} does not exist (see this script's docstring)"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels),
                           f"deepspeed=={DEEPSPEED_VERSION}"], capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        return "pip install from the carried wheels failed: " + (done.stdout + done.stderr)[-1500:]
    importlib.invalidate_caches()
    return "" if importlib.util.find_spec("deepspeed") is not None else "deepspeed still does not import"


# ----------------------------------------------------------------------------------------- correctness

CASES = {
    # name: (spec fields, 2-GPU training args, launcher, file compared)
    "lora+ddp": (dict(lora=True), dict(parallel="ddp"), "torchrun", "adapter_model.safetensors"),
    "qlora+ddp": (dict(lora=True, load_in_4bit=True), dict(parallel="ddp"), "torchrun", "adapter_model.safetensors"),
    "full+fsdp2": (dict(lora=False), dict(parallel="fsdp"), "torchrun", "trainable.safetensors"),
    "lora+fsdp2+offload": (dict(lora=True, checkpointing="offload"), dict(parallel="fsdp"), "torchrun",
                           "adapter_model.safetensors"),
    "qlora+fsdp2+ckpt": (dict(lora=True, load_in_4bit=True, checkpointing=True), dict(parallel="fsdp"), "torchrun",
                         "adapter_model.safetensors"),
    "lora+zero2+offload": (dict(lora=True, checkpointing="offload"), dict(deepspeed="zero2"), "deepspeed",
                           "adapter_model.safetensors"),
    "full+zero3": (dict(lora=False), dict(deepspeed="zero3"), "deepspeed", "trainable.safetensors"),
}  # fmt: skip


def losses(folder: Path) -> list[float]:
    with open(folder / "log.jsonl") as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def weight_err(a: Path, b: Path, file: str) -> float:
    wa, wb = load_file(a / file), load_file(b / file)
    if wa.keys() != wb.keys() or not wa:
        return float("inf")
    return max(float((wa[k] - wb[k]).abs().max() / wa[k].abs().max().clamp_min(1e-30)) for k in wa)


def loss_err(a: list[float], b: list[float]) -> float:
    if len(a) != len(b) or not a:
        return float("inf")
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))


def safe(fn, *args) -> float:
    try:
        return fn(*args)
    except (OSError, KeyError, ValueError):
        return float("inf")


def correctness(opts, work: Path, clock: Clock, ds_missing: str) -> list[dict]:
    from tests.model_zoo import save_hf_model

    model = work / "llama"
    save_hf_model("llama", str(model), seed=0)
    for stage in (2, 3):
        (work / f"zero{stage}.json").write_text(json.dumps(
            {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto"}))  # fmt: skip
    base_args = dict(learning_rate=1e-3, max_steps=3, progress=False, seed=5, max_grad_norm=1.0, save_steps=2,
                     save_total_limit=None, packing=True, max_seq_length=48, gradient_accumulation_steps=2)  # fmt: skip
    cases = {k: v for k, v in CASES.items() if not (v[2] == "deepspeed" and ds_missing)}
    rows = {name: {"case": name} for name in CASES}
    for name in set(CASES) - set(cases):
        rows[name]["skipped"] = ds_missing

    def spec(name: str, run: str, batch: int, extra_args: dict, resume: Path | None = None) -> str:
        fields, _, _, _ = CASES[name]
        args = {**base_args, **extra_args, "batch_size": batch, "output_dir": str(work / f"{name}-{run}")}
        if "deepspeed" in args:
            args["deepspeed"] = str(work / f"{args['deepspeed']}.json")
        body = dict(model=str(model), device_map="cpu" if opts.cpu else "auto", dtype="float32", examples=40,
                    data_seed=3, **fields, args=args)  # fmt: skip
        if resume is not None:
            body["resume"] = str(resume)
        path = work / f"{name}-{run}.json"
        path.write_text(json.dumps(body))
        return str(path)

    def batch(label: str, specs: list[str], processes: int, launcher: str, names: list[str]) -> None:
        if not specs:
            return
        if not clock.allows(opts.correctness_launch_s):
            for n in names:
                rows[n].setdefault("skipped", f"time budget ({label})")
            return
        error = launch(WORKER, specs, processes, launcher, opts.cpu, clock.timeout(opts.launch_timeout_s))
        if error:
            for n in names:
                rows[n].setdefault("errors", {})[label] = error[-2500:]

    # 1 GPU x batch 4, then 2 GPUs x batch 2 (torchrun; the deepspeed launcher for ZeRO), then resumes.
    names = list(cases)
    batch("1gpu", [spec(n, "1gpu", 4, {}) for n in names], 1, "python", names)
    plain = [n for n in names if cases[n][2] == "torchrun"]
    zero = [n for n in names if cases[n][2] == "deepspeed"]
    batch("2gpu", [spec(n, "2gpu", 2, cases[n][1]) for n in plain], 2, "torchrun", plain)
    batch("2gpu", [spec(n, "2gpu", 2, cases[n][1]) for n in zero], 2, "deepspeed", zero)
    batch("resumed-1gpu", [spec(n, "resumed", 4, {}, work / f"{n}-2gpu" / "checkpoint-2") for n in names], 1,
          "python", names)  # fmt: skip
    if "full+zero3" in zero:
        batch("resumed-2gpu", [spec("full+zero3", "resumed2", 2, cases["full+zero3"][1],
                                    work / "full+zero3-1gpu" / "checkpoint-2")], 2, "deepspeed", ["full+zero3"])  # fmt: skip

    out = []
    for name in CASES:
        row = rows[name]
        if "skipped" not in row:
            file = CASES[name][3]
            one, two, resumed = (work / f"{name}-{r}" for r in ("1gpu", "2gpu", "resumed"))
            row["loss_rel_err_2gpu"] = safe(lambda: loss_err(losses(one), losses(two)))
            row["weight_rel_err_2gpu"] = safe(weight_err, one, two, file)
            row["loss_rel_err_resumed"] = safe(lambda: loss_err(losses(two)[2:], losses(resumed)))
            row["weight_rel_err_resumed"] = safe(weight_err, two, resumed, file)
            if name == "full+zero3":
                resumed2 = work / f"{name}-resumed2"
                row["loss_rel_err_resumed_on_2"] = safe(lambda: loss_err(losses(one)[2:], losses(resumed2)))
                row["weight_rel_err_resumed_on_2"] = safe(weight_err, one, resumed2, file)
            row["ok"] = all(v <= opts.tol for k, v in row.items() if k.startswith(("loss_rel", "weight_rel")))
        out.append(row)
    return out


# ----------------------------------------------------------------------------------------- scaling

SCALING = [
    # name, method, GPUs, parallel, deepspeed stage, checkpointing, baseline row
    ("lora 1gpu", "lora", 1, "auto", None, "offload", None),
    ("lora ddp 2gpu", "lora", 2, "ddp", None, "offload", "lora 1gpu"),
    ("full 1gpu", "full", 1, "auto", None, False, None),
    ("full fsdp2 2gpu", "full", 2, "fsdp", None, False, "full 1gpu"),
    # ZeRO-3 refuses velotune's checkpointing (see velotune.train.zero), so full fine-tuning keeps activations.
    ("full zero3 2gpu", "full", 2, "auto", 3, False, "full 1gpu"),
    ("lora zero2 2gpu", "lora", 2, "auto", 2, "offload", "lora 1gpu"),
    ("lora fsdp2 2gpu", "lora", 2, "fsdp", None, "offload", "lora 1gpu"),
]


def scaling(opts, work: Path, clock: Clock, ds_missing: str) -> list[dict]:
    from benchmarks.train_step import prepare_model_folder

    rows: list[dict] = []
    if not clock.allows(opts.bench_launch_s + 60):
        return [{"row": r[0], "status": "skipped: time budget (before building the model)"} for r in SCALING]
    start = time.perf_counter()
    device = torch.device("cpu") if opts.cpu else torch.device("cuda", 0)
    folder = prepare_model_folder(opts.shape, Path(opts.cache_dir), 0, device)
    build_s = time.perf_counter() - start
    if not opts.cpu:
        torch.cuda.empty_cache()
    wanted = set(opts.rows.split(",")) if opts.rows else None
    for name, method, gpus, parallel, stage, checkpointing, baseline in SCALING:
        if wanted is not None and name not in wanted:
            continue
        row = {"row": name, "shape": opts.shape, "method": method, "gpus": gpus, "checkpointing": checkpointing,
               "batch_per_gpu": opts.bench_batch, "seq": opts.bench_seq, "model_build_s": round(build_s, 1)}  # fmt: skip
        rows.append(row)
        if stage is not None and ds_missing:
            row["status"] = f"skipped: {ds_missing[:200]}"
            continue
        if not clock.allows(opts.bench_launch_s):
            row["status"] = "skipped: time budget"
            continue
        out_dir = work / ("bench-" + name.replace(" ", "-"))
        ds_config = None
        if stage is not None:
            ds_config = work / f"bench-zero{stage}.json"
            # DeepSpeed's bf16 mode, as its users run it: bf16 weights, fp32 master copies and AdamW state.
            ds_config.write_text(
                json.dumps({"zero_optimization": {"stage": stage}, "bf16": {"enabled": True}})
            )
        spec = dict(folder=str(folder), method=method, checkpointing=checkpointing, batch_size=opts.bench_batch,
                    seq=opts.bench_seq, warmup=opts.bench_warmup, steps=opts.bench_steps, parallel=parallel,
                    deepspeed=str(ds_config) if ds_config else None, output_dir=str(out_dir))  # fmt: skip
        spec_path = work / f"bench-{name.replace(' ', '-')}.json"
        spec_path.write_text(json.dumps(spec))
        began = time.perf_counter()
        launcher = "deepspeed" if stage is not None else "torchrun"
        error = launch(
            BENCH_WORKER, [str(spec_path)], gpus, launcher, opts.cpu, clock.timeout(opts.launch_timeout_s)
        )
        row["wall_s"] = round(time.perf_counter() - began, 1)
        results = []
        for rank in range(gpus):
            path = out_dir / f"result-rank{rank}.json"
            if path.exists():
                results.append(json.loads(path.read_text()))
        statuses = {r.get("status") for r in results}
        if len(results) == gpus and statuses == {"ok"}:
            row.update(status="ok", strategy=results[0]["strategy"], tokens_per_s=results[0]["tokens_per_s"],
                       loss_first=results[0]["losses"][0], loss_last=results[0]["losses"][-1],
                       peak_allocated_gb_per_gpu=[round(r["peak_allocated_gb"], 2) for r in results],
                       peak_reserved_gb_per_gpu=[round(r["peak_reserved_gb"], 2) for r in results],
                       weights_gb_per_gpu=[round(r["weights_gb"], 2) for r in results])  # fmt: skip
            base = next((r for r in rows if r["row"] == baseline), None)
            if base is not None and base.get("status") == "ok":
                row["scaling_vs_1gpu"] = round(row["tokens_per_s"] / base["tokens_per_s"], 3)
        else:
            oom = "out of memory" in statuses
            row["status"] = "out of memory" if oom else "error"
            row["peak_allocated_gb_per_gpu"] = [round(r.get("peak_allocated_gb", 0), 2) for r in results]
            row["error"] = (error or json.dumps([r.get("error") for r in results]))[-2500:]
    return rows


# ----------------------------------------------------------------------------------------- report


def fmt(value, digits=2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}e}" if value < 1e-2 or value == float("inf") else f"{value:.{digits}f}"
    return str(value)


def markdown(info: dict, checks: list[dict], bench: list[dict]) -> str:
    lines = [f"# velotune distributed: {info['device']} x {info['gpus']}", "",
             f"torch {info['torch']}, deepspeed {info['deepspeed']}, NVLink multicast off; {info['elapsed_s']:.0f} s"]  # fmt: skip
    if checks:
        lines += ["", f"## Correctness (small Llama, float32, 3 steps; bar {info['tolerance']:g} relative)", "",
                  "| case | loss 2 GPUs | weights 2 GPUs | loss resumed on 1 | weights resumed on 1 | ok |",
                  "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in checks:
        if "skipped" in r:
            lines.append(f"| {r['case']} | skipped: {r['skipped'][:80]} | | | | |")
            continue
        lines.append(f"| {r['case']} | {fmt(r['loss_rel_err_2gpu'])} | {fmt(r['weight_rel_err_2gpu'])} | "
                     f"{fmt(r['loss_rel_err_resumed'])} | {fmt(r['weight_rel_err_resumed'])} | {r['ok']} |")  # fmt: skip
    zero3 = next((r for r in checks if r["case"] == "full+zero3" and "loss_rel_err_resumed_on_2" in r), None)
    if zero3:
        lines += ["", f"full+zero3, a 1-GPU checkpoint resumed on 2 GPUs: loss {fmt(zero3['loss_rel_err_resumed_on_2'])}, "
                      f"weights {fmt(zero3['weight_rel_err_resumed_on_2'])}"]  # fmt: skip
    if bench:
        b0 = bench[0]
        lines += ["", f"## Scaling ({b0['shape']}, bf16, {b0.get('batch_per_gpu')} x {b0.get('seq')} tokens per GPU)", "",
                  "| run | status | tokens/s (all GPUs) | x 1 GPU | peak allocated GB per GPU | weights GB per GPU | "
                  "checkpointing | loss first -> last |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for r in bench:
            losses_txt = f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}" if "loss_first" in r else "-"
            lines.append(f"| {r['row']} | {r.get('status')} | {fmt(r.get('tokens_per_s'), 0)} | "
                         f"{fmt(r.get('scaling_vs_1gpu'))} | {r.get('peak_allocated_gb_per_gpu', '-')} | "
                         f"{r.get('weights_gb_per_gpu', '-')} | {r.get('checkpointing')} | {losses_txt} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out-dir", default=os.environ.get("OUT", "gpu_check_distributed_out"))
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--cpu", action="store_true", help="correctness only, gloo on CPU (a smoke test)")
    parser.add_argument(
        "--parts", default="correctness,scaling", help="comma-separated: correctness, scaling"
    )
    parser.add_argument("--budget-s", type=float, default=480.0, help="no new launch after this")
    parser.add_argument("--deadline-s", type=float, default=525.0, help="launches are killed here")
    parser.add_argument("--launch-timeout-s", type=float, default=240.0)
    parser.add_argument(
        "--correctness-launch-s", type=float, default=40.0, help="time one launch is assumed to need"
    )
    parser.add_argument("--bench-launch-s", type=float, default=60.0)
    parser.add_argument(
        "--rows", default="", help="comma-separated scaling rows to run (default: all), e.g. 'lora 1gpu,lora ddp 2gpu'"
    )
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "velotune_bench_cache"))
    parser.add_argument("--bench-batch", type=int, default=2)
    parser.add_argument("--bench-seq", type=int, default=2048)
    parser.add_argument("--bench-warmup", type=int, default=2)
    parser.add_argument("--bench-steps", type=int, default=5)
    parser.add_argument("--wheels", default=str(ROOT / ".peers" / "wheels"))
    opts = parser.parse_args()
    if not opts.cpu and torch.cuda.device_count() < 2:
        sys.stderr.write("needs 2 or more CUDA GPUs (or --cpu)\n")
        return 2
    unknown = set(filter(None, opts.rows.split(","))) - {row[0] for row in SCALING}
    if unknown:
        sys.stderr.write(f"unknown --rows {sorted(unknown)}: choose from {[row[0] for row in SCALING]}\n")
        return 2
    clock = Clock(opts.budget_s, opts.deadline_s)
    parts = {p.strip() for p in opts.parts.split(",")}
    out_dir = Path(opts.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ds_missing = ensure_deepspeed(Path(opts.wheels))
    work = Path(tempfile.mkdtemp(prefix="velotune_dist_"))
    try:
        checks = correctness(opts, work, clock, ds_missing) if "correctness" in parts else []
        bench = scaling(opts, work, clock, ds_missing) if "scaling" in parts else []
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ds_version = None
    if not ds_missing:
        from importlib.metadata import version

        ds_version = version("deepspeed")
    info = {"device": "cpu (gloo)" if opts.cpu else torch.cuda.get_device_name(0),
            "gpus": 0 if opts.cpu else torch.cuda.device_count(), "torch": torch.__version__,
            "deepspeed": ds_version or f"not available ({ds_missing[:120]})", "tolerance": opts.tol,
            "elapsed_s": clock.elapsed}  # fmt: skip
    with open(out_dir / "distributed.jsonl", "w") as f:
        f.write(json.dumps({"kind": "info", **info}) + "\n")
        for r in checks:
            f.write(json.dumps({"kind": "correctness", **r}) + "\n")
        for r in bench:
            f.write(json.dumps({"kind": "scaling", **r}) + "\n")
    report = markdown(info, checks, bench)
    (out_dir / "distributed.md").write_text(report)
    sys.stdout.write(report)
    for r in checks:
        for label, error in r.get("errors", {}).items():
            sys.stdout.write(f"\n--- {r['case']} {label} failed:\n{error[-1500:]}\n")
    ok = all(r.get("ok", "skipped" in r) for r in checks) and all(
        r.get("status") in ("ok", "out of memory") or str(r.get("status", "")).startswith("skipped")
        for r in bench
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
