"""MLP tiles under offloaded checkpoints (issue 4): the fused MLP path's tiles against the untiled
MLP and the generic (autograd per tile) path, at Llama-3.1-8B LoRA r=16, batch 2 and 4 x 2048.

1. Correctness on CUDA: a 2-layer model of Llama-3.1-8B's width (random bf16 weights, LoRA B random)
   gives the same loss and LoRA gradients with the fused MLP untiled, in 512-token tiles (1,100
   tokens: odd tiles), and through the generic path; bf16 and float32 (TF32 off).
2. Speed and memory: the 32-layer model built once on the GPU (random weights, as
   benchmarks/qlora_70b.py builds its model), LoRA r=16 on the seven projections, offloaded
   checkpoints, AdamW fused; per configuration 3 warm-up + 5 timed steps (median), peak
   torch.cuda.max_memory_allocated minus the resident weights (memory_allocated after attaching
   LoRA, before the first step: the harness's "above weights"), and the planner's estimate.
   Configurations: generic (the code before the fused MLP: autograd per tile, 8,192-token tiles),
   fused untiled (mlp_tile_tokens=0), fused default (None), fused 2048 and 1024.

    python benchmarks/mlp_tiles.py --out DIR      (writes DIR/mlp_tiles.json and DIR/mlp_tiles.md)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.qlora_70b import randomize_parameters_  # noqa: E402
from benchmarks.shapes import model_config  # noqa: E402
from velotune import FastLanguageModel  # noqa: E402
from velotune.io.load import build_spec, empty_model  # noqa: E402
from velotune.memory import checkpoint  # noqa: E402
from velotune.memory.planner import estimate_memory  # noqa: E402
from velotune.model import VelotuneModel  # noqa: E402

GIB = 2**30
MODEL = "llama-3.1-8b"


def build(cfg: dict, dtype: torch.dtype, device: torch.device, seed: int, random_b: bool) -> VelotuneModel:
    spec = build_spec(cfg, f"<random {MODEL}>")
    model = empty_model(spec, device, dtype, VelotuneModel)
    gen = torch.Generator(device=device).manual_seed(seed)
    randomize_parameters_(model, cfg.get("initializer_range", 0.02), gen)
    model.requires_grad_(False)
    model.config_dict = cfg
    model.name_or_path = f"<random {MODEL}>"
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, random_state=seed)
    if random_b:  # B starts at zero, which would hide the B side of the gradients
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.normal_(0.0, 0.02, generator=gen)
    return model.train()


@contextmanager
def generic_mlp():
    """The MLP through autograd per tile (the code before velotune.memory.fused_mlp)."""
    real = checkpoint.fused_mlp_block
    checkpoint.fused_mlp_block = lambda layer, x: None
    try:
        yield
    finally:
        checkpoint.fused_mlp_block = real


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach().float(), {
        n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None
    }


def check(device: torch.device) -> dict:
    """Fused tiled / fused untiled / generic on a 2-layer 8B-width model: loss and LoRA gradients."""
    cfg = dict(model_config(MODEL), num_hidden_layers=2)
    out = {}
    torch.backends.cuda.matmul.allow_tf32 = False
    for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float32, 1e-4)):
        model = build(cfg, dtype, device, seed=1, random_b=True)
        model.gradient_checkpointing = "offload"
        ids = torch.randint(3, cfg["vocab_size"], (1, 1100), generator=torch.Generator().manual_seed(2)).to(
            device
        )
        runs = {}
        with generic_mlp():
            model.mlp_tile_tokens = None
            runs["generic"] = loss_and_grads(model, ids)
        for label, tile in (("fused untiled", 0), ("fused 512-token tiles", 512)):
            model.mlp_tile_tokens = tile
            runs[label] = loss_and_grads(model, ids)
        ref_loss, ref = runs["generic"]
        rows = {}
        for label, (loss, grads) in runs.items():
            assert grads.keys() == ref.keys() and ref
            worst = max(rel_err(grads[n], ref[n]) for n in ref)
            rows[label] = {
                "loss": float(loss),
                "loss_rel_err": rel_err(loss, ref_loss),
                "max_grad_rel_err": worst,
            }
        name = str(dtype).removeprefix("torch.")
        ok = all(r["loss_rel_err"] < tol and r["max_grad_rel_err"] < tol for r in rows.values())
        out[name] = {"tolerance": tol, "ok": ok, "runs": rows}
        print(f"check {name}: " + ", ".join(f"{k}: loss {v['loss']:.6f} grads {v['max_grad_rel_err']:.2e}"
                                            for k, v in rows.items()) + f" -> {'ok' if ok else 'FAILED'}")  # fmt: skip
        del model, runs
        torch.cuda.empty_cache()
    torch.backends.cuda.matmul.allow_tf32 = True
    return out


CONFIGS = [  # (label, generic path, mlp_tile_tokens)
    ("generic (before)", True, None),
    ("fused, untiled", False, 0),
    ("fused, default tile", False, None),
    ("fused, 2048-token tiles", False, 2048),
    ("fused, 1024-token tiles", False, 1024),
]


def time_steps(model, optimizer, ids, warmup: int, steps: int) -> tuple[list[float], list[float], int]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            losses.append(float(loss))
    return times, losses, torch.cuda.max_memory_allocated()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batches", default="2,4")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("mlp_tiles needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda", torch.cuda.current_device())
    t0 = time.perf_counter()
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "model": MODEL,
              "seq": args.seq, "warmup": args.warmup, "steps": args.steps}  # fmt: skip
    result["check"] = check(device)
    print(f"checks done in {time.perf_counter() - t0:.0f} s")

    cfg = model_config(MODEL)
    model = build(cfg, torch.bfloat16, device, seed=0, random_b=False)
    model.gradient_checkpointing = "offload"
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4, fused=True)
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated()
    result["weights_gib"] = weights / GIB
    print(f"8B built in {time.perf_counter() - t0:.0f} s, resident {weights / GIB:.2f} GiB")
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        ids = torch.randint(
            3, cfg["vocab_size"], (batch, args.seq), generator=torch.Generator().manual_seed(batch)
        )
        ids = ids.to(device)
        for label, generic, tile in CONFIGS:
            model.mlp_tile_tokens = tile
            if generic:
                with generic_mlp():
                    times, losses, peak = time_steps(model, optimizer, ids, args.warmup, args.steps)
            else:
                times, losses, peak = time_steps(model, optimizer, ids, args.warmup, args.steps)
            step = statistics.median(times)
            plan = estimate_memory(cfg, "lora", batch=batch, seq=args.seq, lora_r=16, mlp_tile_tokens=tile,
                                   fused_mlp=not generic)  # fmt: skip
            row = {"batch": batch, "config": label, "mlp_tile_tokens": tile, "step_s": step,
                   "tokens_per_s": batch * args.seq / step, "peak_gib": peak / GIB,
                   "above_weights_gib": (peak - weights) / GIB, "planner_gib": plan.total / GIB,
                   "planner_peak_at": plan.peak_phase, "losses": losses, "times": times}  # fmt: skip
            rows.append(row)
            print(f"b{batch} {label:26s} step {step * 1e3:7.1f} ms  {row['tokens_per_s']:8.0f} tok/s  peak "
                  f"{row['peak_gib']:.2f} GiB  above weights {row['above_weights_gib']:.2f} GiB  planner "
                  f"{row['planner_gib']:.2f} GiB ({plan.peak_phase})  [{time.perf_counter() - t0:.0f} s]")  # fmt: skip
    result["rows"] = rows
    result["total_s"] = time.perf_counter() - t0
    (args.out / "mlp_tiles.json").write_text(json.dumps(result, indent=1))
    lines = [f"# MLP tiles under offload ({result['device']}, torch {result['torch']}, {MODEL} LoRA r=16)", "",
             "Check (2-layer 8B-width model, 1,100 tokens, against the generic path): " + "; ".join(
                 f"{k}: {'ok' if v['ok'] else 'FAILED'} (tolerance {v['tolerance']:g})"
                 for k, v in result["check"].items()), "",
             f"{args.warmup} warm-up + {args.steps} timed steps, median; resident weights "
             f"{weights / GIB:.2f} GiB.", "",
             "| batch | config | step ms | tokens/s | vs generic | peak GiB | above weights GiB | planner GiB |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        base = next(b for b in rows if b["batch"] == r["batch"] and b["config"] == CONFIGS[0][0])
        lines.append(f"| {r['batch']} | {r['config']} | {r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{base['step_s'] / r['step_s']:.3f}x | {r['peak_gib']:.2f} | {r['above_weights_gib']:.2f} | "
                     f"{r['planner_gib']:.2f} |")  # fmt: skip
    (args.out / "mlp_tiles.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out}/mlp_tiles.json and .md in {result['total_s']:.0f} s")
    return 0 if all(v["ok"] for v in result["check"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
