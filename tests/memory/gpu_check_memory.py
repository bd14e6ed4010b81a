"""GPU check of velotune.memory: numerics of every checkpointing mode, then the speed of the
selective-recomputation policies, the cost of offload, and the planner against measured peaks.

  1. numerics (float32, small Llama, full fine-tuning; and LoRA with dropout): loss and every gradient
     under True / "offload" / policy "save_attn" / MLP tiling against no checkpointing. "offload" must
     equal True bitwise; everything must be within 1e-6 of no checkpointing (1e-5 with tiling; with
     dropout, tiles draw their own masks, so tiled offload is compared with tiled, uncheckpointed);
     the pinned host memory must not grow after the first step.
  2. policies: one Llama-3.1-8B layer with LoRA r=16 in bf16, forward + backward at 1k / 4k / 16k
     tokens, checkpoint policy "full" vs "save_attn" vs none: time and peak memory.
  3. offload cost: Llama-3.1-8B LoRA training step (forward + backward) at 2k and 8k tokens, "offload"
     vs True (goal: under 5% slower at 2k).
  4. planner: Llama-3.2-1B, Phi-3-mini and Llama-3.1-8B with LoRA r=16 (AdamW, "offload"), batch 1:
     estimate_memory vs torch.cuda.max_memory_allocated of a step after the first (goal: within 10%).

Not collected by pytest. Run from the repo root (one command, about 4-6 minutes on an H100):

    python tests/memory/gpu_check_memory.py

Writes benchmarks/results/memory-<device>.json and .md; prints the tables. Exit status 1 if a
numeric check fails. `--smoke` runs tiny sizes on whatever device there is (CPU works).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.shapes import model_config  # noqa: E402
from velotune import FastLanguageModel  # noqa: E402
from velotune.io.load import empty_model  # noqa: E402
from velotune.memory.checkpoint import activation_store, recompute  # noqa: E402
from velotune.memory.planner import estimate_memory  # noqa: E402
from velotune.model import VelotuneModel  # noqa: E402
from velotune.models.families import family_of  # noqa: E402
from velotune.models.rope_scaling import rope_cos_sin  # noqa: E402

GIB = 1024**3
BUDGET_S = 7.5 * 60
START = time.monotonic()

SMALL = {
    "model_type": "llama", "vocab_size": 2048, "hidden_size": 1024, "intermediate_size": 2816,
    "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 32768,
}  # fmt: skip


def elapsed() -> float:
    return time.monotonic() - START


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(
    cfg: dict, device: str, dtype: torch.dtype, lora_r: int | None, dropout: float = 0.0, seed: int = 0
):
    spec = family_of(cfg["model_type"]).build_spec(cfg)
    model = empty_model(spec, torch.device(device), dtype, VelotuneModel)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).mul_(0.02))
            else:
                p.fill_(1.0)
    if lora_r:
        model = FastLanguageModel.get_peft_model(model, r=lora_r, lora_alpha=2 * lora_r, lora_dropout=dropout)
        with torch.no_grad():  # B starts at zero; make the adapters matter
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    return model.train()


def tokens(vocab: int, batch: int, seq: int, device: str, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=gen, device=device)


def loss_and_grads(model, ids, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {
        n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
    }


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def compare(ref, got) -> tuple[bool, float]:
    (ref_loss, ref_grads), (loss, grads) = ref, got
    if grads.keys() != ref_grads.keys():
        return False, float("inf")
    exact = torch.equal(loss, ref_loss) and all(torch.equal(grads[k], ref_grads[k]) for k in grads)
    worst = max([rel(loss, ref_loss)] + [rel(grads[k], ref_grads[k]) for k in grads])
    return exact, worst


def numerics(device: str, smoke: bool) -> tuple[list[dict], bool]:
    cfg = model_config("tiny-llama") if smoke else SMALL
    batch, seq = (2, 64) if smoke else (2, 1024)
    rows, ok = [], True
    for lora in (False, True):
        model = build(cfg, device, torch.float32, lora_r=8 if lora else None, dropout=0.1 if lora else 0.0)
        ids = tokens(cfg["vocab_size"], batch, seq, device)
        model.gradient_checkpointing = False
        ref = loss_and_grads(model, ids)
        results = {}
        cases = [
            (True, "full", None),
            ("offload", "full", None),
            (True, "save_attn", None),
            ("offload", "save_attn", None),
            (False, "full", seq // 3),
            ("offload", "full", seq // 3),
        ]
        for mode, policy, tile in cases:
            model.gradient_checkpointing, model.checkpoint_policy, model.mlp_tile_tokens = mode, policy, tile
            got = loss_and_grads(model, ids)
            results[(mode, policy, tile)] = got
            # Tiles draw their own dropout masks: with dropout, tiled runs are compared with each other.
            base = results[(False, "full", tile)] if tile and lora and mode else ref
            exact, worst = compare(base, got)
            if tile and lora and not mode:
                exact, worst = None, 0.0  # nothing to compare it with
            limit = 1e-5 if tile else 1e-6
            passed = worst < limit
            if mode == "offload" and tile is None:
                same_as_gpu, _ = compare(results[(True, policy, None)], got)
                passed = passed and same_as_gpu
            ok &= passed
            rows.append(
                dict(
                    model="LoRA r8 + dropout" if lora else "full fine-tuning",
                    mode=str(mode),
                    policy=policy,
                    tile=tile or "-",
                    bitwise_vs_plain=exact,
                    max_rel_err=worst,
                    passed=passed,
                )  # fmt: skip
            )
        # Pinned host memory is allocated by the first offloaded step and only reused afterwards.
        model.gradient_checkpointing, model.checkpoint_policy, model.mlp_tile_tokens = "offload", "full", None
        store = activation_store(model)
        loss_and_grads(model, ids)
        first = store.pinned_bytes
        loss_and_grads(model, ids)
        loss_and_grads(model, ids)
        reused = store.pinned_bytes == first and (first > 0 or device == "cpu")
        ok &= reused
        rows.append(
            dict(
                model="LoRA r8 + dropout" if lora else "full fine-tuning",
                mode="offload x3",
                policy="full",
                tile="-",
                bitwise_vs_plain=None,
                max_rel_err=None,
                passed=reused,
                pinned_MiB=first / 2**20,
            )  # fmt: skip
        )
        del model
    return rows, ok


def timed(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_of(fn) -> float:
    if not torch.cuda.is_available():
        return float("nan")
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - base) / GIB


def policies(device: str, smoke: bool) -> list[dict]:
    cfg = model_config("tiny-llama" if smoke else "llama-3.1-8b")
    cfg.update(num_hidden_layers=1, vocab_size=256)
    dtype = torch.float32 if smoke else torch.bfloat16
    model = build(cfg, device, dtype, lora_r=16)
    layer, spec = model.layers[0], model.spec
    params = [p for p in layer.parameters() if p.requires_grad]
    rows = []
    for seq in (64, 128) if smoke else (1024, 4096, 16384):
        if elapsed() > BUDGET_S * 0.45:
            break
        x = torch.randn(1, seq, spec.hidden_size, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn_like(x)
        cos, sin = rope_cos_sin(spec.rope, torch.arange(seq, device=device)[None], dtype)

        def attention_half(t):
            return layer.attention_block(t, cos, sin, None, None)

        def run_none():
            layer(x, cos, sin, None, None).backward(dy)

        def run_full():
            recompute(attention_half, layer.mlp_block, x, params).backward(dy)

        def run_save_attn():
            recompute(None, layer.mlp_block, attention_half(x), params).backward(dy)

        result = {}
        for name, fn in (("none", run_none), ("full", run_full), ("save_attn", run_save_attn)):
            ms = timed(fn, 2, 3 if smoke else 10) * 1e3
            result[name] = (ms, peak_of(fn))
            layer.zero_grad(set_to_none=True)
            x.grad = None
        faster = min(("full", "save_attn"), key=lambda k: result[k][0])
        rows.append(
            dict(
                tokens=seq,
                **{f"{k}_ms": v[0] for k, v in result.items()},
                **{f"{k}_peak_GiB": v[1] for k, v in result.items()},
                save_attn_speedup=result["full"][0] / result["save_attn"][0],
                faster=faster,
            )
        )
    del model
    return rows


def offload_cost(device: str, smoke: bool) -> list[dict]:
    cfg = model_config("tiny-llama" if smoke else "llama-3.1-8b")
    dtype = torch.float32 if smoke else torch.bfloat16
    model = build(cfg, device, dtype, lora_r=16)
    rows = []
    for seq in (128,) if smoke else (2048, 8192):
        if elapsed() > BUDGET_S * 0.6:
            break
        ids = tokens(cfg["vocab_size"], 1, seq, device)

        def step(model=model, ids=ids):
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()

        result = {}
        for mode in (True, "offload"):
            model.gradient_checkpointing = mode
            result[mode] = (timed(step, 2, 3 if smoke else 6), peak_of(step))
        rows.append(
            dict(
                tokens=seq,
                gpu_ckpt_s=result[True][0],
                offload_s=result["offload"][0],
                offload_overhead=result["offload"][0] / result[True][0] - 1,
                gpu_ckpt_peak_GiB=result[True][1],
                offload_peak_GiB=result["offload"][1],
            )  # fmt: skip
        )
    del model
    return rows


def planner(device: str, smoke: bool) -> list[dict]:
    plan = (
        [("tiny-llama", (64, 256))]
        if smoke
        else [
            ("llama-3.2-1b", (2048, 8192, 32768)),
            ("phi-3-mini", (2048, 8192)),
            ("llama-3.1-8b", (2048, 8192, 32768)),
        ]
    )
    dtype = torch.float32 if smoke else torch.bfloat16
    rows = []
    for name, lengths in plan:
        if elapsed() > BUDGET_S * 0.85:
            break
        cfg = model_config(name)
        model = build(cfg, device, dtype, lora_r=16)
        model.gradient_checkpointing = "offload"
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        for seq in lengths:
            if elapsed() > BUDGET_S * 0.9:
                break
            ids = tokens(cfg["vocab_size"], 1, seq, device)

            def step(model=model, opt=opt, ids=ids):
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            step()  # the first step creates the optimizer state
            t0 = time.perf_counter()
            measured = None
            if torch.cuda.is_available():
                sync()
                torch.cuda.reset_peak_memory_stats()
                step()
                sync()
                measured = torch.cuda.max_memory_allocated()
            else:
                step()
            step_s = time.perf_counter() - t0
            est = estimate_memory(
                cfg, "lora", seq=seq, lora_r=16, gradient_checkpointing="offload",
                dtype="float32" if smoke else "bfloat16",
            )  # fmt: skip
            rows.append(
                dict(
                    model=name,
                    tokens=seq,
                    estimate_GiB=est.total / GIB,
                    peak_phase=est.peak_phase,
                    measured_GiB=None if measured is None else measured / GIB,
                    error=None if measured is None else est.total / measured - 1,
                    step_s=step_s,
                    host_pinned_GiB=est.host_pinned / GIB,
                )  # fmt: skip
            )
        del model, opt
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    if not rows:
        return "(skipped: time budget)\n"
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true", help="tiny sizes (any device)")
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + ("-smoke" if args.smoke else "")
    report = {"device": name, "torch": torch.__version__, "command": " ".join(sys.argv)}
    md = [f"# velotune.memory on {name}\n", f"torch {torch.__version__}; `python {' '.join(sys.argv)}`\n"]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def save():
        (out_dir / f"memory-{slug}.json").write_text(json.dumps(report, indent=2, default=str))
        (out_dir / f"memory-{slug}.md").write_text("\n".join(md))

    ok = True
    sections = [
        ("numerics", "1. Numerics vs no checkpointing (float32)", lambda: numerics(device, args.smoke)),
        ("policies", "2. Checkpoint policy, one Llama-3.1-8B layer, LoRA r16, bf16", lambda: policies(device, args.smoke)),
        ("offload_cost", "3. Offload vs GPU checkpoints, Llama-3.1-8B LoRA step", lambda: offload_cost(device, args.smoke)),
        ("planner", "4. Planner estimate vs measured peak (LoRA r16, AdamW, offload)", lambda: planner(device, args.smoke)),
    ]  # fmt: skip
    for key, title, run in sections:
        t0 = time.monotonic()
        try:
            rows = run()
            if key == "numerics":
                rows, passed = rows
                ok &= passed
        except Exception as exc:  # record and go on: the other sections still measure
            rows, ok = [{"error": f"{type(exc).__name__}: {exc}"}], False
        report[key] = rows
        text = f"## {title}\n\n{table(rows)}\n({time.monotonic() - t0:.0f} s)\n"
        md.append(text)
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        save()
    sys.stdout.write(
        f"{'PASS' if ok else 'FAIL'} in {elapsed():.0f} s; results in {out_dir}/memory-{slug}.*\n"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
