"""GPU check of the embedding table kept in host memory (get_peft_model(embedding_on_host=...)).

On a GPU, with a Llama of Llama-3 vocabulary (128,256, untied) and a few small layers, LoRA r=16:
  1. float32: loss and every LoRA gradient with the table on the host equal those with the table on
     the GPU, bitwise (a row gather is exact wherever it runs);
  2. bf16: the GPU memory after loading drops by exactly the table's bytes, and the step's peak by
     at least that much;
  3. for_inference brings the table back (greedy tokens equal), for_training sends it out again.

Not collected by pytest. Run from the repo root: `python tests/models/gpu_check_embedding_on_host.py
[--out FILE.json]`. Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from velotune import FastLanguageModel  # noqa: E402


def _folder(tmp: str) -> str:
    cfg = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=512, intermediate_size=1408, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp)
    return tmp


def _model(folder: str, dtype: torch.dtype, on_host: bool):
    model, _ = FastLanguageModel.from_pretrained(folder, dtype=dtype, device_map="cuda", progress=False)
    return FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=32, init_lora_weights=False, random_state=1, embedding_on_host=on_host
    )


def _step(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    failures, report = [], {}
    ids = torch.randint(0, 128256, (2, 1024), generator=torch.Generator().manual_seed(2)).cuda()
    with tempfile.TemporaryDirectory() as tmp:
        folder = _folder(tmp)
        # 1. float32, bitwise
        results = {}
        for on_host in (False, True):
            model = _model(folder, torch.float32, on_host)
            assert model.embedding_on_host == on_host, "placement not applied"
            results[on_host] = _step(model, ids)
            del model
            torch.cuda.empty_cache()
        (loss_gpu, g_gpu), (loss_host, g_host) = results[False], results[True]
        same = torch.equal(loss_gpu, loss_host) and all(torch.equal(g_gpu[n], g_host[n]) for n in g_gpu)
        report["float32_bitwise_equal"] = same
        if not same:
            failures.append("float32 loss/gradients differ between host and GPU embedding")
        # 2. bf16 memory
        mem = {}
        for on_host in (False, True):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            model = _model(folder, torch.bfloat16, on_host)
            loaded = torch.cuda.memory_allocated() - base
            torch.cuda.reset_peak_memory_stats()
            _step(model, ids)
            mem[on_host] = (loaded, torch.cuda.max_memory_allocated() - base)
            if on_host:
                # 3. for_inference / for_training round trip ("auto": out for training, back for inference)
                model.embedding_placement = "auto"
                FastLanguageModel.for_inference(model)
                back = not model.embedding_on_host
                tokens = model.generate(ids[:1, :16], max_new_tokens=8, do_sample=False)
                FastLanguageModel.for_training(model)
                report["inference_round_trip"] = back and model.embedding_on_host
                report["generated_tokens"] = tokens[0, 16:].tolist()
                if not report["inference_round_trip"]:
                    failures.append("for_inference/for_training did not move the table")
            del model
        table = 128256 * 512 * 2
        report.update(
            table_bytes=table,
            loaded_bytes_gpu=mem[False][0], loaded_bytes_host=mem[True][0],
            peak_bytes_gpu=mem[False][1], peak_bytes_host=mem[True][1],
        )  # fmt: skip
        # The caching allocator hands out large blocks in 2 MiB steps.
        rounded = -(-table // (2 << 20)) * (2 << 20)
        if not table <= mem[False][0] - mem[True][0] <= rounded:
            failures.append(f"load memory dropped by {mem[False][0] - mem[True][0]} bytes, expected {table}..{rounded}")
        if mem[False][1] - mem[True][1] < table:
            failures.append(f"peak dropped by {mem[False][1] - mem[True][1]} bytes, expected >= {table}")
    report["failures"] = failures
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
