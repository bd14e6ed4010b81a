"""GPU check of velotune.memory.layer_graphs: CUDA-graphed checkpointed layers give the eager step's
loss and gradients, including when forwards and backwards interleave (two forwards before their
backwards, in either order, and one backward of their summed losses), where the static buffers the
graphs share and the offload copies out of and back into them could otherwise clobber each other.

Small bf16 Llama (4 layers, LoRA r=16, dense and 4-bit), "offload" checkpoints, policies "save_mlp"
(2 of 4 layers keeping their gate/up output) and "full". Per scenario, the graphed run's losses and
gradients against the same scenario run eagerly on the same weights: the loss within 1e-3, every
gradient within 1e-2 (relative to its largest entry; the floor is the attention backward's
nondeterminism, ~1e-3 in bf16; a clobbered buffer gives O(1) errors).

Not collected by pytest. Run from the repo root (about a minute on an H100):

    python tests/memory/gpu_check_layer_graphs.py [--out FILE.json]

Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.memory.gpu_check_memory import build, tokens  # noqa: E402
from velotune import FastLanguageModel  # noqa: E402
from velotune.io.load import empty_model  # noqa: E402
from velotune.model import VelotuneModel  # noqa: E402
from velotune.models.layers import Projection  # noqa: E402
from velotune.quant.nf4 import quantize_nf4  # noqa: E402
from velotune.quant.nf4_weight import NF4Weight  # noqa: E402

CONFIG = {
    "model_type": "llama", "vocab_size": 2048, "hidden_size": 1024, "intermediate_size": 2816,
    "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 32768,
}  # fmt: skip
LOSS_TOL, GRAD_TOL = 1e-3, 1e-2


def quantized_copy(model, device: str = "cuda"):
    """A copy of `model` (no LoRA yet) with every projection's base weight in NF4, one part per row block
    as the loader makes them (as `benchmarks.qlora_70b` builds its model), then LoRA r=16 on it."""
    q = empty_model(model.spec, torch.device(device), torch.bfloat16, VelotuneModel, load_in_4bit=True)
    dense = dict(model.named_parameters())
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, t in q.named_parameters():
            if name in dense and t.shape == dense[name].shape:
                t.copy_(dense[name])
        for name, module in q.named_modules():
            if isinstance(module, Projection) and isinstance(module.weight, NF4Weight):
                w, row0 = modules[name].weight, 0
                for rows in module.out_sizes:
                    module.weight.set_part(row0, quantize_nf4(w[row0 : row0 + rows].detach().to(torch.bfloat16)))
                    row0 += rows
    q = FastLanguageModel.get_peft_model(q.requires_grad_(False), r=16, lora_alpha=32)
    with torch.no_grad():
        for name, p in q.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return q.train()


def grads_of(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def scenario(model, name: str, a: torch.Tensor, b: torch.Tensor) -> tuple[list[float], list[dict]]:
    """(losses, gradients after each backward) of one interleaving of forwards and backwards."""
    model.zero_grad(set_to_none=True)
    if name == "one step":
        loss = model(input_ids=a, labels=a).loss
        loss.backward()
        return [float(loss)], [grads_of(model)]
    loss_a = model(input_ids=a, labels=a).loss
    loss_b = model(input_ids=b, labels=b).loss
    if name == "two forwards, summed backward":
        (loss_a + loss_b).backward()
        return [float(loss_a), float(loss_b)], [grads_of(model)]
    first, second = (loss_a, loss_b) if name == "two forwards, backwards in order" else (loss_b, loss_a)
    first.backward()
    g1 = grads_of(model)
    second.backward()
    return [float(loss_a), float(loss_b)], [g1, grads_of(model)]


SCENARIOS = ("one step", "two forwards, summed backward", "two forwards, backwards in order",
             "two forwards, backwards in reverse")  # fmt: skip


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check(weights: str, policy: str) -> list[dict]:
    torch.manual_seed(0)
    if weights == "4-bit":
        model = quantized_copy(build(CONFIG, "cuda", torch.bfloat16, lora_r=None))
    else:
        model = build(CONFIG, "cuda", torch.bfloat16, lora_r=16)
    model.gradient_checkpointing, model.checkpoint_policy, model.gate_up_kept_layers = "offload", policy, 2
    a, b = tokens(CONFIG["vocab_size"], 2, 512, "cuda", seed=1), tokens(CONFIG["vocab_size"], 2, 512, "cuda", seed=2)
    rows = []
    for name in SCENARIOS:
        model.cuda_graphs = False
        ref_losses, ref_grads = scenario(model, name, a, b)
        model.cuda_graphs = True
        for _ in range(3):  # at this shape: eager, eager (new scratch), then captured
            scenario(model, "one step", a, b)
        replays = len(next(iter(model.__dict__["_cuda_graph_sets"].values())).replays)
        losses, grads = scenario(model, name, a, b)
        loss_err = max(abs(x - y) / abs(y) for x, y in zip(losses, ref_losses))
        grad_err = max(rel(g[k], r[k]) for g, r in zip(grads, ref_grads) for k in r)
        same_keys = all(g.keys() == r.keys() for g, r in zip(grads, ref_grads))
        ok = same_keys and replays > 0 and loss_err <= LOSS_TOL and grad_err <= GRAD_TOL
        rows.append({"weights": weights, "policy": policy, "scenario": name, "graphs": replays,
                     "loss_rel_err": loss_err, "grad_rel_err": grad_err, "ok": ok})  # fmt: skip
        print(f"{weights:6s} {policy:9s} {name:36s} graphs {replays:3d}  loss {loss_err:.1e}  grads {grad_err:.1e}  "
              f"{'ok' if ok else 'FAIL'}", flush=True)  # fmt: skip
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    rows = [row for weights in ("dense", "4-bit") for policy in ("save_mlp", "full") for row in check(weights, policy)]
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
