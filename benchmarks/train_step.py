"""Training-step benchmark: one model shape, one method, several systems, each in its own process.

    python -m benchmarks.train_step --model llama-3.1-8b --method lora --batch 2 --seq 2048 \
        --systems velotune,hf_peft,liger,unsloth [--steps 10 --warmup 3] [--out FILE]

The parent builds the random-weight checkpoint of the shape once (streamed to disk in safetensors
shards, seeded, cached under --cache-dir), draws the token batches once (seeded), measures the bf16
matmul rate, and then runs every system in a fresh subprocess (`benchmarks.worker`) so that GPU
memory does not leak from one to the next. Each system appends one JSON line to --out; a system
that fails records its error instead of numbers and the others still run. Without CUDA everything
runs on the CPU (memory fields are null) so that the harness can be tested.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
import uuid
import zlib
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from benchmarks.shapes import LORA_TARGETS, SHAPES, model_config, training_flops
from benchmarks.systems import LOADERS, NOT_APPLICABLE

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "train_step.jsonl"
SHARD_BYTES = 2 * 1024**3
CHECKPOINT_FORMAT = 1  # bump when the way random checkpoints are written changes
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
VERSION_PACKAGES = (
    "torch", "triton", "transformers", "peft", "accelerate", "safetensors", "bitsandbytes",
    "liger-kernel", "unsloth", "unsloth_zoo", "trl", "velotune",
)  # fmt: skip


# ----------------------------------------------------------------------------- random checkpoint


def _init_kind(name: str, shape: tuple[int, ...], model_type: str) -> str:
    if len(shape) >= 2:
        return "normal"
    if "norm" in name:
        # Gemma's RMSNorm multiplies by (1 + w), so its identity weight is 0.
        return "zeros" if model_type.startswith("gemma") else "ones"
    return "zeros"  # biases


def checkpoint_tensors(model: torch.nn.Module, model_type: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the checkpoint as the hub stores it.

    Mostly the model's own parameter names (tied weights appear once). Transformers 5 fuses
    Mixtral's experts into 3-D parameters on load; the hub format keeps one w1/w2/w3 per expert.
    """
    out: list[tuple[str, tuple[int, ...]]] = []
    for name, param in model.named_parameters():
        shape = tuple(param.shape)
        if model_type == "mixtral" and ".mlp." in name:
            prefix = name.split(".mlp.")[0] + ".block_sparse_moe"
            if name.endswith(".experts.gate_up_proj"):
                n_exp, two_i, hidden = shape
                for e in range(n_exp):
                    out.append((f"{prefix}.experts.{e}.w1.weight", (two_i // 2, hidden)))
                    out.append((f"{prefix}.experts.{e}.w3.weight", (two_i // 2, hidden)))
                continue
            if name.endswith(".experts.down_proj"):
                n_exp, hidden, inter = shape
                out.extend((f"{prefix}.experts.{e}.w2.weight", (hidden, inter)) for e in range(n_exp))
                continue
            if name.endswith(".gate.weight"):
                out.append((f"{prefix}.gate.weight", shape))
                continue
        out.append((name, shape))
    return out


def _plan_shards(
    tensors: list[tuple[str, tuple[int, ...]]], itemsize: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = itemsize * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _save_tokenizer(folder: Path, max_length: int) -> None:
    """A small word-level tokenizer: the benchmark feeds token ids directly, but Unsloth's loader
    insists on loading a tokenizer from the model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({f"w{i}": 4 + i for i in range(252)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=max_length,
    )
    fast.save_pretrained(folder)


def build_random_checkpoint(cfg: dict[str, Any], folder: Path, seed: int, device: torch.device) -> None:
    """Write a Transformers-format folder with random bf16 weights of the shape `cfg`.

    The model is built on the meta device (no memory); each tensor is drawn from its own seeded
    generator (so values do not depend on shard layout) and one shard at a time is held in host
    memory, so an 8B model never needs 16 GB of RAM, let alone twice.
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(cfg)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, dtype="bfloat16", **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tensors = checkpoint_tensors(model, model_type)
    del model
    std = float(cfg.get("initializer_range", 0.02))
    shards = _plan_shards(tensors, itemsize=2)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        data: dict[str, torch.Tensor] = {}
        for name, shape in shard:
            kind = _init_kind(name, shape, model_type)
            if kind == "normal":
                gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                t = torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16).mul_(std)
            elif kind == "ones":
                t = torch.ones(shape, dtype=torch.bfloat16, device=device)
            else:
                t = torch.zeros(shape, dtype=torch.bfloat16, device=device)
            data[name] = t.cpu()
            weight_map[name] = fname
            total += t.numel() * 2
        save_file(data, str(folder / fname), metadata={"format": "pt"})
        del data
    with open(folder / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config.save_pretrained(folder)
    _save_tokenizer(folder, int(cfg.get("max_position_embeddings", 4096)))


def prepare_model_folder(name: str, cache_dir: Path, seed: int, device: torch.device) -> Path:
    """The cached checkpoint folder of shape `name`, built on first use."""
    cfg = model_config(name)
    key = json.dumps(
        {"cfg": cfg, "seed": seed, "gen": device.type, "format": CHECKPOINT_FORMAT}, sort_keys=True
    )
    folder = cache_dir / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (folder / "COMPLETE").exists():
        return folder
    partial = cache_dir / f"{folder.name}.partial-{os.getpid()}"
    partial.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    build_random_checkpoint(cfg, partial, seed, device)
    (partial / "COMPLETE").write_text(f"built in {time.perf_counter() - start:.1f} s\n")
    try:
        os.replace(partial, folder)
    except OSError:  # built concurrently by another run: keep theirs
        if not (folder / "COMPLETE").exists():
            raise
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return folder


def prepare_tokens(folder: Path, vocab: int, n_steps: int, batch: int, seq: int, seed: int) -> Path:
    path = folder / f"tokens-s{seed}-{n_steps}x{batch}x{seq}.pt"
    if not path.exists():
        gen = torch.Generator().manual_seed(seed + 1)
        ids = torch.randint(0, vocab, (n_steps, batch, seq), generator=gen, dtype=torch.long)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(ids, tmp)
        os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- run-level facts


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul rate measured now: 8192^3 on CUDA (triton's do_bench), 512^3 on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        n = 8192
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        ms = do_bench(lambda: torch.matmul(a, b, out=c), warmup=100, rep=500)
        del a, b, c
        torch.cuda.empty_cache()
        return 2 * n**3 / (ms * 1e-3) / 1e12
    n = 512
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e12


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"device": _cpu_name(), "device_kind": "cpu", "cpu_count": os.cpu_count()}
    idx = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(idx)
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(idx),
        "device_kind": "cuda",
        "device_memory_bytes": props.total_memory,
        "compute_capability": f"{props.major}.{props.minor}",
        "cuda_runtime": torch.version.cuda,
        "driver": None,
    }
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", str(idx)],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        info["driver"] = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """HEAD of the working tree (with '+dirty' when it has changes); $BENCH_GIT_COMMIT overrides,
    for copies of the tree that carry no .git."""
    if os.environ.get("BENCH_GIT_COMMIT"):
        return os.environ["BENCH_GIT_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=30,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


# ----------------------------------------------------------------------------- one system


def _tail(path: Path, lines: int = 40) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    # Progress bars rewrite one line with carriage returns; keep the last state of each line.
    return [line.rsplit("\r", 1)[-1] for line in text.rstrip().splitlines()[-lines:]]


def run_system(spec: dict[str, Any], log_dir: Path, timeout_s: float) -> dict[str, Any]:
    """Run one system in a fresh process; always returns a result dict."""
    tag = f"{spec['run_id']}-{spec['system']}"
    spec_path = log_dir / f"{tag}.spec.json"
    log_path = log_dir / f"{tag}.log"
    spec = dict(spec, result_path=str(log_dir / f"{tag}.result.json"))
    spec_path.write_text(json.dumps(spec, indent=2))
    env = dict(os.environ, **OFFLINE_ENV)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    # The worker runs in the log folder, so that caches peers write into the working directory
    # (Unsloth's compiled-module cache) stay out of the repository.
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker", str(spec_path)],
            cwd=log_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the worker and anything it spawned
            proc.wait()
            rc = None
    wall = time.perf_counter() - start
    result: dict[str, Any]
    try:
        result = json.loads(Path(spec["result_path"]).read_text())
    except (OSError, ValueError):
        if rc is None:
            err = {"type": "Timeout", "message": f"killed after {timeout_s:.0f} s", "phase": "?"}
        else:
            err = {
                "type": "ProcessDied",
                "message": f"worker exited with code {rc} without a result",
                "phase": "?",
            }
        result = {"status": "error", "error": err}
    if result.get("status") == "error":
        result["error"]["log_tail"] = _tail(log_path)
    result["wall_s"] = wall
    result["log"] = str(log_path)
    return result


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, choices=sorted(SHAPES))
    p.add_argument("--method", required=True, choices=("lora", "qlora", "full"))
    p.add_argument(
        "--batch", default="2",
        help="rows per step; a comma list (2,4) measures each size on one load of every system",
    )
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--systems", default="velotune,hf_peft,hf_peft_bnb,liger,unsloth")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON-lines file results are appended to")
    p.add_argument(
        "--also-out", type=Path, action="append", default=[], help="append the same lines here too"
    )
    p.add_argument(
        "--cache-dir", type=Path, default=Path(os.environ.get("VELOTUNE_BENCH_CACHE", "/tmp/velotune-bench"))
    )
    p.add_argument("--log-dir", type=Path, default=None, help="worker logs (default: CACHE_DIR/logs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one system may take")
    p.add_argument("--deadline", type=float, default=None, help="epoch seconds: start no system after it")
    p.add_argument(
        "--min-system-s", type=float, default=60.0, help="skip a system if less time than this is left"
    )
    p.add_argument("--note", default="", help="free text recorded with every result")
    args = p.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    try:
        args.batches = [int(b) for b in str(args.batch).split(",") if b.strip()]
    except ValueError:
        p.error(f"--batch {args.batch!r}: expected an integer or a comma list of integers")
    if not args.batches or min(args.batches) < 1:
        p.error("--batch: at least one positive batch size")
    args.batch = args.batches[0]
    unknown = [s for s in args.systems if s not in LOADERS]
    if unknown:
        p.error(f"unknown systems {unknown}; known: {', '.join(LOADERS)}")
    return args


def _fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def print_table(results: list[dict[str, Any]]) -> None:
    print(
        f"{'system':<12} {'status':<8} {'tok/s':>10} {'step s':>8} {'peak GiB':>9} {'weights GiB':>11} {'MFU':>6}  loss"
    )
    for r in results:
        if r["status"] != "ok":
            why = r.get("skip_reason") or f"{r['error']['type']}: {r['error']['message'][:80]}"
            print(f"{r['system']:<12} {r['status']:<8} {why}")
            continue
        print(
            f"{r['system']:<12} {'ok':<8} {r['tokens_per_s']:>10.1f} {r['step_time_median_s']:>8.3f} "
            f"{_fmt(r.get('peak_allocated_bytes'), 2**30):>9} {_fmt(r.get('weights_bytes'), 2**30):>11} "
            f"{_fmt(r.get('mfu') and r['mfu'] * 100, 1, 1):>5}%  {r['loss_first']:.4f} -> {r['loss_last']:.4f}"
        )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    cfg = model_config(args.model)
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    args.cache_dir = args.cache_dir.resolve()
    log_dir = (args.log_dir or args.cache_dir / "logs").resolve()  # workers run with it as their cwd
    log_dir.mkdir(parents=True, exist_ok=True)

    def time_left() -> float | None:
        return None if args.deadline is None else args.deadline - time.time()

    out_of_time = (left := time_left()) is not None and left < args.min_system_s
    folder = tokens_path = matmul_tflops = prepare_s = None
    if not out_of_time:  # nothing will run: do not spend the budget building a checkpoint
        start = time.perf_counter()
        folder = prepare_model_folder(args.model, args.cache_dir, args.seed, device)
        prepare_s = time.perf_counter() - start
        tokens_paths = {
            b: prepare_tokens(folder, cfg["vocab_size"], args.warmup + args.steps, b, args.seq, args.seed)
            for b in args.batches
        }
        tokens_path = tokens_paths[args.batch]
        matmul_tflops = measure_matmul_tflops(device, dtype)
    flops = training_flops(cfg, args.batch, args.seq, full=args.method == "full")
    common: dict[str, Any] = {
        "run_id": run_id,
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "benchmarks.train_step", *argv]),
        "model": args.model,
        "model_type": cfg["model_type"],
        "method": args.method,
        "batch": args.batch,
        "seq": args.seq,
        "warmup": args.warmup,
        "steps": args.steps,
        "dtype": args.dtype,
        "seed": args.seed,
        "lora": None
        if args.method == "full"
        else {"r": 16, "alpha": 16, "dropout": 0.0, "targets": list(LORA_TARGETS)},
        "optimizer": f"AdamW lr={args.lr}" + (" fused" if cuda else ""),
        "matmul_tflops": matmul_tflops,
        "model_tflops_per_step": flops / 1e12,
        "checkpoint_prepare_s": prepare_s,
        "git_commit": git_commit(),
        "versions": library_versions(),
        "note": args.note,
        **device_info(),
    }
    spec_base = {
        "run_id": run_id, "model": args.model, "model_type": cfg["model_type"], "method": args.method,
        "folder": str(folder), "tokens_path": str(tokens_path), "batch": args.batch, "seq": args.seq,
        "warmup": args.warmup, "steps": args.steps, "seed": args.seed, "dtype": args.dtype, "lr": args.lr,
        "lora_r": 16, "lora_alpha": 16, "lora_dropout": 0.0,
    }  # fmt: skip
    if len(args.batches) > 1 and tokens_path is not None:
        spec_base["batches"] = [{"batch": b, "tokens_path": str(tokens_paths[b])} for b in args.batches]

    results = []
    outs = [args.out, *args.also_out]
    for out in outs:
        out.parent.mkdir(parents=True, exist_ok=True)
    for system in args.systems:
        remaining = time_left()
        if (system, args.method) in NOT_APPLICABLE:
            result = {"status": "skipped", "skip_reason": NOT_APPLICABLE[(system, args.method)]}
        elif remaining is not None and remaining < args.min_system_s:
            result = {
                "status": "skipped",
                "skip_reason": f"time budget: {max(remaining, 0):.0f} s left of the run's deadline",
            }
        else:
            timeout = args.timeout if remaining is None else min(args.timeout, remaining)
            print(
                f"[train_step] {args.model} {args.method} {args.batch}x{args.seq}: {system} ...", flush=True
            )
            result = run_system(dict(spec_base, system=system), log_dir, timeout)
        per_batch = result.pop("runs", None)
        if per_batch is None:
            per_batch = [dict(result, batch=b) for b in args.batches] if len(args.batches) > 1 else [result]
        else:
            per_batch = [
                {**{k: v for k, v in result.items() if k != "status"}, **one, "batch": b}
                for one, b in zip(per_batch, args.batches)
            ]
        for one in per_batch:
            batch = one.get("batch", args.batch)
            flops = training_flops(cfg, batch, args.seq, full=args.method == "full")
            one = {**common, "batch": batch, "model_tflops_per_step": flops / 1e12, "system": system, **one}
            if one["status"] == "ok":
                one["mfu"] = flops / one["step_time_median_s"] / (matmul_tflops * 1e12)
            for key in ("peak_allocated_bytes", "peak_reserved_bytes", "weights_bytes", "above_weights_bytes"):
                one.setdefault(key, None)
            results.append(one)
            line = json.dumps(one, sort_keys=True)
            for out in outs:
                with open(out, "a") as f:
                    f.write(line + "\n")
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
