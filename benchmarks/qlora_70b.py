"""QLoRA on a Llama-3.1-70B-shaped model on one GPU, with no checkpoint on disk.

    python -m benchmarks.qlora_70b [--batch 1 --seq 4096 --warmup 1 --steps 2] [--out FILE.json]

A 70B checkpoint is 141 GB of bf16 safetensors; writing a random one would take longer than the
training steps. Instead the model is built empty with 4-bit projections, as `load_in_4bit` builds it,
and each projection is filled the way the loader fills it: one checkpoint tensor (q_proj, k_proj,
... as the hub stores them) at a time drawn in bf16 on the GPU, quantized there, and freed. Then LoRA
r=16 on the seven projections, offloaded gradient checkpointing (velotune's defaults), AdamW, and
timed steps on random tokens. Records the GPU memory after building, the peak of the steps, tokens/s
and the planner's estimate for the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.shapes import model_config, training_flops
from velotune import FastLanguageModel
from velotune.io.load import build_spec, empty_model
from velotune.memory.planner import estimate_memory
from velotune.model import VelotuneModel
from velotune.models.layers import Projection
from velotune.quant.nf4 import quantize_nf4
from velotune.quant.nf4_weight import NF4Weight

GIB = 2**30


def randomize_parameters_(model: torch.nn.Module, std: float, gen: torch.Generator) -> None:
    """Random weights as a fresh checkpoint would have them: matrices N(0, std), norm weights 1, biases 0."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std, generator=gen)
            else:
                p.fill_(1.0 if "norm" in name else 0.0)


def build_random_qlora_model(name: str, seq: int, seed: int, device: torch.device) -> VelotuneModel:
    cfg = model_config(name)
    spec = build_spec(cfg, f"<random {name}>")
    model = empty_model(spec, device, torch.bfloat16, VelotuneModel, load_in_4bit=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    std = cfg.get("initializer_range", 0.02)
    randomize_parameters_(model, std, gen)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Projection) and isinstance(module.weight, NF4Weight):
                row0 = 0
                for rows in module.out_sizes:  # one part per checkpoint tensor, as the loader makes them
                    dense = torch.empty(rows, module.in_features, device=device, dtype=torch.bfloat16)
                    module.weight.set_part(row0, quantize_nf4(dense.normal_(0.0, std, generator=gen)))
                    row0 += rows
                    del dense
    model.requires_grad_(False)
    model.max_seq_length = seq
    model.config_dict = cfg
    model.name_or_path = f"<random {name}>"
    return model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3.1-70b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("qlora_70b needs a CUDA GPU")
    device = torch.device("cuda", torch.cuda.current_device())
    start = time.perf_counter()
    model = build_random_qlora_model(args.model, args.seq, args.seed, device)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - start
    built_bytes = torch.cuda.memory_allocated()
    build_peak = torch.cuda.max_memory_allocated()
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, random_state=args.seed)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    weights_bytes = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    vocab = model.spec.vocab_size
    gen = torch.Generator().manual_seed(args.seed + 1)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(device)
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
        print(f"[qlora_70b] step {step}: {times[-1]:.2f} s, loss {losses[-1]:.4f}", flush=True)
    step_s = statistics.median(times[args.warmup :])
    estimate = estimate_memory(
        model_config(args.model), "qlora", batch=args.batch, seq=args.seq, lora_r=16
    )
    tokens = args.batch * args.seq
    result = {
        "model": args.model,
        "method": "qlora",
        "batch": args.batch,
        "seq": args.seq,
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "build_s": round(build_s, 1),
        "built_gib": built_bytes / GIB,
        "build_peak_gib": build_peak / GIB,
        "weights_with_lora_gib": weights_bytes / GIB,
        "peak_gib": torch.cuda.max_memory_allocated() / GIB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
        "planner_estimate_gib": estimate.total / GIB,
        "embedding_on_host": model.embedding_on_host,
        "step_times_s": times,
        "losses": losses,
        "tokens_per_s": tokens / step_s,
        "model_tflops_per_s": training_flops(model_config(args.model), args.batch, args.seq, full=False)
        / step_s
        / 1e12,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
