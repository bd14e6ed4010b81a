"""Generation benchmark: velotune's CUDA-graph decoding against Transformers' and Unsloth's generate.

    python -m benchmarks.bench_generate --out OUT_DIR [--model llama-3.1-8b] [--precisions bf16,4bit]
        [--batches 1,8] [--new-tokens 512] [--peer-new-tokens 128] [--budget-s 540]

First it checks correctness on the device (small random models of several families, float32):
velotune's greedy tokens with the CUDA graph, without it, and Transformers' are the same, also for a
4-bit base with unmerged LoRA against PEFT on the dequantized weights, and in bfloat16 the graph
gives the eager step's tokens. Transformers' tokens come from its forward over the whole sequence at
every step (`use_cache=False`), the model's own definition of the next token; whether its cached
`generate` agrees is recorded beside (it does not decide the check: see `reference_greedy`). Then every system loads the same random checkpoint of the shape
(built once by `benchmarks.train_step.prepare_model_folder`, cached) in its own process and
generates greedily from the same random prompts (32 tokens, no end-of-sequence token, so every
system generates the same number of tokens): velotune (CUDA graph), Transformers' `generate`
(bf16; 4-bit through bitsandbytes), Unsloth's `FastLanguageModel.for_inference` when it imports, as
users get it and with its opt-in CUDA-graph decoding (UNSLOTH_DECODE_CUDA_GRAPHS=1, "unsloth_graphs").
The slow peers generate --peer-new-tokens tokens (the table says so): their tokens/s does not
depend on the length, their Python overhead per token does not change. Tokens/s = batch x new
tokens / wall time of one generate call (prompt included), after one untimed call.

Writes OUT_DIR/generate-<stamp>.jsonl (one line per system, precision and batch, plus one line of
checks), OUT_DIR/generate-<stamp>.md and the workers' logs (generate-<stamp>-logs.tar.gz), and prints
the table. `benchmarks/gpu_generate.sh` runs it on the GPU machine with the peers bundle. Keep these files out of
benchmarks/results/*.jsonl (the training report reads every JSON-lines file there): put them in
benchmarks/results/generate/. With --budget-s the run stops starting systems in time and kills
one that would run past the budget, so it ends cleanly before it.

The worker mode (`--worker SPEC.json`) runs one system; it imports nothing heavy before Unsloth.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ("velotune", "hf", "unsloth", "unsloth_graphs", "velotune_eager")
# Unsloth replays its decode step from CUDA graphs only when asked (plain generate() leaves them off).
SYSTEM_ENV = {"unsloth_graphs": {"UNSLOTH_DECODE_CUDA_GRAPHS": "1"}}
PRECISIONS = ("bf16", "4bit")
PROMPT_LEN = 32
CHECK_FAMILIES = ("llama", "qwen3", "gemma2", "phi3", "mixtral")


# ----------------------------------------------------------------------------- correctness


def _greedy(model, ids, mask, n: int, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, **kwargs)


# Prompts of the float32 checks: row 0 left-padded, row 1 not; 8 columns, LongRoPE's original length in the
# phi3 test model, so its rope switches to the long factors at the first new token.
CHECK_PROMPTS = [[0, 0, 0, 11, 12, 13, 14, 15], [5, 17, 33, 8, 90, 41, 7, 3]]
CHECK_NEW_TOKENS = 24


def reference_greedy(hf, ids, mask, n: int, **kwargs):
    """Transformers' (or PEFT's) greedy tokens, with the whole sequence run through the model at every step.

    Not the cached `generate`: its cache handling differs between Transformers versions, and for Phi-3
    LongRoPE it is wrong in some. Where the sequence first outgrows the original length, Phi-3's
    `prepare_inputs_for_generation` drops the cache to re-encode the sequence with the long factors, but in
    Transformers 5.17 the generic code still cuts the input to the last token, so every later token is
    predicted without the prompt (issue #8: row 1 became all token 0). Without a cache every step is the
    forward's own definition of the next token (short factors while the sequence fits, long ones after), which
    a correct cached `generate` reproduces, velotune's re-encoding included.
    """
    return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, use_cache=False,
                       **kwargs)  # fmt: skip


def run_checks(
    device, families: tuple[str, ...] = CHECK_FAMILIES, qlora: bool = True
) -> list[dict[str, Any]]:
    """Greedy tokens: velotune graph == velotune eager == Transformers (float32), per family; 4-bit + LoRA
    against PEFT on the dequantized weights; bfloat16 graph == eager. One record per check."""
    import torch

    import velotune

    sys.path.insert(0, str(REPO_ROOT))
    from tests.model_zoo import save_hf_model

    checks: list[dict[str, Any]] = []
    ids = torch.tensor(CHECK_PROMPTS, device=device)
    mask = (ids != 0).long()
    n = CHECK_NEW_TOKENS

    def record(name: str, got: dict[str, torch.Tensor], cached: torch.Tensor | None = None) -> None:
        first = next(iter(got.values()))
        same = all(torch.equal(first.cpu(), t.cpu()) for t in got.values())
        detail = {k: v[:, ids.shape[1] :].tolist() for k, v in got.items()} if not same else None
        entry = {"check": name, "ok": same, "compared": list(got), "tokens_if_different": detail}
        note = ""
        if cached is not None:
            # Transformers' cached generate against its own uncached forward: a difference is Transformers'
            # (see reference_greedy), recorded so that it is seen, not counted against velotune.
            agrees = torch.equal(cached.cpu(), first.cpu())
            entry["transformers_cached_generate_agrees"] = agrees
            if not agrees:
                entry["transformers_cached_tokens"] = cached[:, ids.shape[1] :].tolist()
                note = "; Transformers' cached generate differs from its own uncached forward"
        checks.append(entry)
        print(f"[check] {name}: {'ok' if same else 'DIFFERENT'} ({', '.join(got)}){note}", flush=True)

    hf_kwargs = dict(eos_token_id=None, pad_token_id=0)
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            try:
                folder = os.path.join(tmp, family)
                hf = save_hf_model(family, folder).to(device)
                ours, _ = velotune.FastLanguageModel.from_pretrained(folder, dtype=torch.float32,
                                                                     device_map=str(device), progress=False)  # fmt: skip
                cached = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, **hf_kwargs)
                got = {"transformers": reference_greedy(hf, ids, mask, n, **hf_kwargs),
                       "velotune_eager": _greedy(ours, ids, mask, n, use_cuda_graph=False)}  # fmt: skip
                if device.type == "cuda" and family != "mixtral":  # MoE decodes eagerly
                    got["velotune_graph"] = _greedy(ours, ids, mask, n, use_cuda_graph=True)
                    got["velotune_graph_again"] = _greedy(
                        ours, ids, mask, n, use_cuda_graph=True
                    )  # the kept graph, replayed
                record(f"{family} float32 greedy", got, cached)
                if family == "llama":
                    # Rows that end at different steps (two end tokens), read back every 8 steps (lagged on CUDA).
                    free = got["transformers"][:, ids.shape[1] :]
                    eos = sorted({int(free[0, 4]), int(free[1, 9])})
                    stop = dict(eos_token_id=eos, pad_token_id=0)
                    ended = {"transformers": reference_greedy(hf, ids, mask, n, **stop),
                             "velotune_eager": _greedy(ours, ids, mask, n, use_cuda_graph=False, **stop)}  # fmt: skip
                    if device.type == "cuda":
                        ended["velotune_graph"] = _greedy(ours, ids, mask, n, use_cuda_graph=True, **stop)
                    record("llama float32 greedy, rows ending at different steps", ended)
                if device.type == "cuda" and family != "mixtral":
                    ours16, _ = velotune.FastLanguageModel.from_pretrained(folder, dtype=torch.bfloat16,
                                                                           device_map=str(device), progress=False)  # fmt: skip
                    record(f"{family} bfloat16 graph vs eager",
                           {"velotune_eager": _greedy(ours16, ids, mask, n, use_cuda_graph=False),
                            "velotune_graph": _greedy(ours16, ids, mask, n, use_cuda_graph=True)})  # fmt: skip
                    del ours16
                del hf, ours
            except Exception as exc:  # a failing check is recorded, and the others still run
                checks.append({"check": f"{family} greedy", "ok": False, "error": repr(exc)[:2000]})
                print(f"[check] {family}: ERROR {exc!r}", flush=True)
        try:
            if qlora:
                from tests.quant.test_qlora import _qlora_pair

                ours, theirs = _qlora_pair("llama", Path(tmp) / "qlora")
                ours, theirs = ours.to(device), theirs.to(device).eval()
                got = {"peft_dequantized": reference_greedy(theirs, ids, mask, n, **hf_kwargs),
                       "velotune_eager": _greedy(ours, ids, mask, n, use_cuda_graph=False)}  # fmt: skip
                if device.type == "cuda":
                    got["velotune_graph"] = _greedy(ours, ids, mask, n, use_cuda_graph=True)
                record("llama 4-bit base + unmerged LoRA, float32", got)
        except Exception as exc:
            checks.append({"check": "llama 4-bit + LoRA", "ok": False, "error": repr(exc)[:2000]})
            print(f"[check] 4-bit + LoRA: ERROR {exc!r}", flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return checks


# ----------------------------------------------------------------------------- one system (worker)


def _load(spec: dict[str, Any]):
    """(model, generate(ids, mask, n) -> tokens, notes) for the system and precision of `spec`."""
    import torch

    system, four_bit = spec["system"], spec["precision"] == "4bit"
    if system.startswith("velotune"):
        import velotune

        model, _ = velotune.FastLanguageModel.from_pretrained(
            spec["folder"], dtype=torch.bfloat16, load_in_4bit=four_bit, max_seq_length=None, progress=False
        )
        velotune.FastLanguageModel.for_inference(model)
        # On CUDA the graph is required (a failed capture raises instead of quietly decoding eagerly).
        graph = (True if torch.cuda.is_available() else None) if system == "velotune" else False

        def generate(ids, mask, n):
            return model.generate(ids, attention_mask=mask, max_new_tokens=n, use_cuda_graph=graph)

        return model, generate, {}
    if system.startswith("unsloth"):
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(
            spec["folder"], max_seq_length=PROMPT_LEN + spec["new_tokens"], dtype=torch.bfloat16,
            load_in_4bit=four_bit, use_exact_model_name=True,
        )  # fmt: skip
        FastLanguageModel.for_inference(model)
        notes = {"for_inference": True, **SYSTEM_ENV.get(system, {})}
    else:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        kwargs: dict[str, Any] = {"dtype": torch.bfloat16, "attn_implementation": "sdpa"}
        if four_bit:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )  # fmt: skip
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": torch.cuda.current_device()}
        model = AutoModelForCausalLM.from_pretrained(spec["folder"], **kwargs).eval()
        notes = {"cache": "Transformers' default (DynamicCache)"}
    model.generation_config.eos_token_id = None  # random weights: no early stop, every system makes n tokens

    def generate(ids, mask, n):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                              pad_token_id=0)  # fmt: skip

    return model, generate, notes


def _timed(generate, ids, mask, n: int, sync) -> tuple[float, Any]:
    sync()
    start = time.perf_counter()
    out = generate(ids, mask, n)
    sync()
    return time.perf_counter() - start, out


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"status": "error", "phase": "import", "runs": []}

    def save() -> None:
        Path(spec["result_path"]).write_text(json.dumps(result))

    try:
        if spec["system"].startswith("unsloth"):
            import unsloth  # noqa: F401  (before torch: it patches Transformers on import)
        import torch

        cuda = torch.cuda.is_available()
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        result["phase"] = "load"
        start = time.perf_counter()
        model, generate, notes = _load(spec)
        sync()
        result.update(load_s=time.perf_counter() - start, notes=notes)
        if cuda:
            result["weights_bytes"] = torch.cuda.memory_allocated()
        n = spec["new_tokens"]
        gen = torch.Generator().manual_seed(spec["seed"])
        if spec["system"] == "velotune":
            # The graph replays what the eager step computes: same tokens, same cache length (bf16, 8B shape).
            result["phase"] = "graph vs eager"
            ids = torch.randint(3, spec["vocab"], (1, PROMPT_LEN), generator=gen).to(device)
            mask = torch.ones_like(ids)
            graph_out = model.generate(
                ids, attention_mask=mask, max_new_tokens=48, use_cuda_graph=cuda or None
            )
            eager_out = model.generate(ids, attention_mask=mask, max_new_tokens=48, use_cuda_graph=False)
            result["graph_equals_eager_48_tokens"] = bool(torch.equal(graph_out, eager_out))
            save()
        for batch in spec["batches"]:
            if time.time() > spec["deadline"] - 20:
                result["runs"].append({"batch": batch, "status": "skipped", "skip_reason": "time budget"})
                continue
            result["phase"] = f"batch {batch}"
            ids = torch.randint(3, spec["vocab"], (batch, PROMPT_LEN), generator=gen).to(device)
            mask = torch.ones_like(ids)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            # Untimed first call: kernels compiled, velotune's graph captured (kept for the same shapes).
            warm_n = n if spec["system"] == "velotune" else min(n, 8)
            warm_s, _ = _timed(generate, ids, mask, warm_n, sync)
            seconds, out = _timed(generate, ids, mask, n, sync)
            if spec["system"].startswith("velotune"):
                kept = getattr(model, "_velotune_decoder", None)
                notes["cuda_graph"] = kept is not None and kept.graph is not None
            made = out.shape[1] - PROMPT_LEN
            run = {
                "batch": batch, "status": "ok", "new_tokens": made, "seconds": seconds,
                "tokens_per_s": batch * made / seconds, "ms_per_step": 1000 * seconds / made,
                "first_call_s": warm_s, "first_call_new_tokens": warm_n,
                "peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            }  # fmt: skip
            if made != n:
                run.update(status="error", error=f"generated {made} tokens, asked for {n}")
            result["runs"].append(run)
            save()
        result["status"] = "ok"
        result.pop("phase", None)
    except BaseException as exc:
        tail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).splitlines()[-25:]
        if type(exc).__name__ in ("ModuleNotFoundError", "ImportError") and result["phase"] == "import":
            result.update(status="skipped", skip_reason=f"does not import: {exc}")
        else:
            result["error"] = {"type": type(exc).__name__, "message": str(exc)[:3000], "traceback_tail": tail}
    save()
    return result


# ----------------------------------------------------------------------------- parent


def run_worker(spec: dict[str, Any], log_dir: Path, timeout_s: float) -> dict[str, Any]:
    tag = f"{spec['system']}-{spec['precision']}"
    spec = dict(spec, result_path=str(log_dir / f"{tag}.result.json"))
    spec_path = log_dir / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.update(SYSTEM_ENV.get(spec["system"], {}))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    start = time.perf_counter()
    with open(log_dir / f"{tag}.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench_generate", "--worker", str(spec_path)],
            cwd=log_dir.parent, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            proc.wait(timeout=max(timeout_s, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the worker and anything it started
            proc.wait()
    try:
        result = json.loads(Path(spec["result_path"]).read_text())
    except (OSError, ValueError):
        result = {"status": "error", "runs": [], "error": {"type": "ProcessDied", "message": "no result"}}
    if result.get("status") != "ok" and result.get("phase"):
        result.setdefault("error", {})["killed_in_phase"] = result["phase"]
    result["wall_s"] = time.perf_counter() - start
    result["log"] = str(log_dir / f"{tag}.log")
    return result


def copy_bandwidth_gbs(device) -> float | None:
    """Device copy bandwidth now (GB/s, read + write counted), the ceiling of reading the weights."""
    import torch

    if device.type != "cuda":
        return None
    from triton.testing import do_bench

    a = torch.empty(2**30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = do_bench(lambda src=a, dst=b: dst.copy_(src), warmup=20, rep=200)
    del a, b
    torch.cuda.empty_cache()
    return 2 * 2**30 / (ms * 1e-3) / 1e9


def markdown(records: list[dict[str, Any]], checks: list[dict[str, Any]], head: dict[str, Any]) -> str:
    lines = [
        f"# Generation, {head['model']} (random weights), {head['device']}",
        "",
        f"`{head['command']}` at {head['timestamp']}, commit {head['git_commit']}; torch "
        f"{head['versions'].get('torch')}, transformers {head['versions'].get('transformers')}, unsloth "
        f"{head['versions'].get('unsloth')}. Greedy, prompt {PROMPT_LEN} tokens, no end-of-sequence token. "
        "Tokens/s = batch x new tokens / seconds of one generate call (prompt included) after an untimed call.",
        "",
    ]
    counts = sorted({(r["system"], r["new_tokens"]) for r in records if r["status"] == "ok"})
    if len({n for _, n in counts}) > 1:
        lines += [
            "Tokens generated per call differ (the slower systems make fewer, to fit the time budget; "
            "their per-token cost does not depend on the length): "
            + ", ".join(f"{system} {n}" for system, n in counts)
            + ".",
            "",
        ]
    if head.get("bound_tok_s"):
        lines += [
            f"Weight-read bound at batch 1 (bf16): {head['bytes_per_token'] / 1e9:.2f} GB read per token at the "
            f"measured copy bandwidth {head['copy_gbs']:.0f} GB/s = {head['bound_tok_s']:.0f} tokens/s.",
            "",
        ]
    failed = [c for c in checks if not c["ok"]]
    lines += [
        f"Correctness checks: {len(checks) - len(failed)} of {len(checks)} passed"
        + (": FAILED " + ", ".join(c["check"] for c in failed) if failed else "."),
        "",
    ]
    stale = [c["check"] for c in checks if c.get("transformers_cached_generate_agrees") is False]
    if stale:
        lines += [
            "Transformers' reference runs without its cache; its cached generate gave other tokens (a "
            "Transformers bug, not counted) in: " + ", ".join(stale) + ".",
            "",
        ]
    lines += [
        "| system | precision | batch | new tokens | tokens/s | ms / step | vs Transformers | vs Unsloth "
        "| vs Unsloth graphs | % of bound | peak GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def rate(system: str, precision: str, batch: int) -> float | None:
        for r in records:
            if (r["system"], r["precision"], r["batch"]) == (system, precision, batch) and r[
                "status"
            ] == "ok":
                return r["tokens_per_s"]
        return None

    for r in records:
        if r["status"] != "ok":
            why = r.get("skip_reason") or (r.get("error") or {}).get("message", "?")
            lines.append(f"| {r['system']} | {r['precision']} | {r['batch']} | | {r['status']}: "
                         f"{str(why)[:120]} | | | | | | |")  # fmt: skip
            continue
        ratios = []
        for peer in ("hf", "unsloth", "unsloth_graphs"):
            other = rate(peer, r["precision"], r["batch"])
            ratios.append(f"{r['tokens_per_s'] / other:.1f}x" if other and r["system"] != peer else "")
        bound = ""
        if head.get("bound_tok_s") and r["precision"] == "bf16":
            bound = f"{100 * r['tokens_per_s'] / r['batch'] / head['bound_tok_s']:.0f}%"
        peak = f"{r['peak_allocated_bytes'] / 2**30:.1f}" if r.get("peak_allocated_bytes") else ""
        lines.append(
            f"| {r['system']} | {r['precision']} | {r['batch']} | {r['new_tokens']} | {r['tokens_per_s']:.1f} "
            f"| {r['ms_per_step']:.2f} | {' | '.join(ratios)} | {bound} | {peak} |"
        )
    lines += ["", "% of bound: per-row tokens/s over the batch-1 weight-read bound (bf16 rows only).", ""]
    seen = set()
    for r in records:
        key = (r["system"], r["precision"])
        if key in seen or r.get("load_s") is None:
            continue
        seen.add(key)
        facts = [f"loaded in {r['load_s']:.0f} s"]
        if r.get("graph_equals_eager_48_tokens") is not None:
            same = r["graph_equals_eager_48_tokens"]
            facts.append(f"CUDA graph and eager step: {'same' if same else 'DIFFERENT'} 48 greedy tokens")
        facts += [f"{k}: {v}" for k, v in (r.get("notes") or {}).items()]
        lines.append(f"- {r['system']} {r['precision']}: " + "; ".join(facts))
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_generate", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON-lines file and the table")
    p.add_argument("--model", default="llama-3.1-8b", help="a shape of benchmarks/shapes.py")
    p.add_argument(
        "--systems", default="velotune,hf,unsloth,unsloth_graphs", help=f"comma list of {', '.join(SYSTEMS)}"
    )
    p.add_argument("--precisions", default="bf16,4bit", help="comma list of bf16, 4bit")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--new-tokens", type=int, default=512, help="tokens velotune generates per call")
    p.add_argument("--peer-new-tokens", type=int, default=128,
                   help="tokens the slower systems (Transformers, Unsloth, velotune_eager) generate per call")  # fmt: skip
    p.add_argument(
        "--budget-s", type=float, default=540.0, help="the whole run ends before this many seconds"
    )
    p.add_argument("--skip-checks", action="store_true", help="no correctness checks first")
    p.add_argument(
        "--cache-dir", type=Path, default=Path(os.environ.get("VELOTUNE_BENCH_CACHE", "/tmp/velotune-bench"))
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.systems = [s for s in args.systems.split(",") if s]
    args.precisions = [s for s in args.precisions.split(",") if s]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    bad = [s for s in args.systems if s not in SYSTEMS] + [s for s in args.precisions if s not in PRECISIONS]
    if bad:
        p.error(f"unknown systems or precisions {bad}; systems: {SYSTEMS}, precisions: {PRECISIONS}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(json.loads(Path(argv[1]).read_text()))
        return 0
    start = time.time()
    args = parse_args(argv)
    deadline = start + args.budget_s
    sys.path.insert(0, str(REPO_ROOT))
    import torch

    from benchmarks.shapes import matmul_params_per_token, model_config
    from benchmarks.train_step import device_info, git_commit, library_versions, prepare_model_folder

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    args.out.mkdir(parents=True, exist_ok=True)
    # Workers run in a scratch folder (peers write caches into their working directory); logs go below it.
    log_dir = Path(tempfile.mkdtemp(prefix="bench-generate-")) / "logs"
    log_dir.mkdir()
    cfg = model_config(args.model)
    head = {
        "kind": "generate", "model": args.model, "timestamp": stamp, "git_commit": git_commit(),
        "command": shlex.join(["python", "-m", "benchmarks.bench_generate", *argv]),
        "versions": library_versions(), **device_info(),
    }  # fmt: skip
    checks = [] if args.skip_checks else run_checks(device)
    head["copy_gbs"] = copy_bandwidth_gbs(device)
    head["bytes_per_token"] = 2 * matmul_params_per_token(cfg)
    head["bound_tok_s"] = head["copy_gbs"] * 1e9 / head["bytes_per_token"] if head["copy_gbs"] else None
    folder = prepare_model_folder(args.model, args.cache_dir.resolve(), args.seed, device)
    print(f"[bench] checkpoint ready at {time.time() - start:.0f} s", flush=True)

    records: list[dict[str, Any]] = []
    # Most telling first: velotune and its peers in bf16, then 4-bit, then velotune's eager step.
    order = [(s, p) for p in args.precisions for s in args.systems if s != "velotune_eager"]
    order += [("velotune_eager", p) for p in args.precisions if "velotune_eager" in args.systems]
    for system, precision in order:
        n = args.new_tokens if system == "velotune" else min(args.new_tokens, args.peer_new_tokens)
        left = deadline - time.time()
        base = {**head, "system": system, "precision": precision}
        if left < 60:
            records += [dict(base, batch=b, status="skipped", skip_reason=f"time budget ({left:.0f} s left)")
                        for b in args.batches]  # fmt: skip
            continue
        print(f"[bench] {system} {precision} ({left:.0f} s left) ...", flush=True)
        spec = {"system": system, "precision": precision, "folder": str(folder), "batches": args.batches,
                "new_tokens": n, "vocab": cfg["vocab_size"], "seed": args.seed, "deadline": deadline - 15}  # fmt: skip
        result = run_worker(spec, log_dir, timeout_s=left - 15)
        extra = {k: result.get(k) for k in ("load_s", "notes", "graph_equals_eager_48_tokens", "wall_s")}
        runs = {r["batch"]: r for r in result.get("runs", [])}
        for b in args.batches:
            if b in runs:
                records.append({**base, **extra, **runs[b]})
            else:
                why = result.get("skip_reason") or (result.get("error") or {}).get("message", "did not run")
                status = "skipped" if result.get("status") == "skipped" else "error"
                records.append({**base, **extra, "batch": b, "status": status, "skip_reason": str(why)[:500],
                                "error": result.get("error")})  # fmt: skip
        for r in records[-len(args.batches) :]:
            shown = (
                f"{r['tokens_per_s']:.1f} tok/s ({r['new_tokens']} tokens)"
                if r["status"] == "ok"
                else r["status"]
            )
            print(f"[bench]   {system} {precision} batch {r['batch']}: {shown}", flush=True)

    jsonl = args.out / f"generate-{stamp}.jsonl"
    with open(jsonl, "w") as f:
        f.write(json.dumps({**head, "system": "checks", "checks": checks}) + "\n")
        for r in records:
            f.write(json.dumps(r) + "\n")
    table = markdown(records, checks, head)
    (args.out / f"generate-{stamp}.md").write_text(table)
    shutil.make_archive(str(args.out / f"generate-{stamp}-logs"), "gztar", log_dir)
    print(table)
    print(f"[bench] done in {time.time() - start:.0f} s; {jsonl}")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
