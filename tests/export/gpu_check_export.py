"""GPU check for velotune.export: merging a LoRA model into a Hugging Face folder (and a GGUF file) costs
at most about one layer of extra GPU memory, writes correct tensors, and how long it takes.

Run on a GPU machine from the repository root:
    python tests/export/gpu_check_export.py --layers 32 --out /tmp/export_check
It builds a Llama-3.1-8B-shaped model with random bf16 weights on the GPU (no download), adds LoRA
(r=16, all projections, B random so the merge matters), then:
  1. checks a few exported tensors against W + s B A computed here independently (bf16 rounding);
  2. measures peak GPU memory above the model during save_pretrained_merged and save_pretrained_gguf
     (f16), and compares it with one decoder layer's bf16 size;
  3. times both, prints a table, and writes results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import torch
from safetensors import safe_open

import velotune
from velotune.io.load import empty_model
from velotune.models.families import family_of
from velotune.model import VelotuneModel
from velotune.quickstart import build_tokenizer

LLAMA_8B = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
                intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                max_position_embeddings=131072, tie_word_embeddings=False, bos_token_id=128000,
                eos_token_id=128001, hidden_act="silu",
                rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                 "rope_theta": 500000.0})  # fmt: skip


def build(layers: int, tokenizer_vocab: int) -> VelotuneModel:
    cfg = dict(LLAMA_8B, num_hidden_layers=layers)
    spec = family_of("llama").build_spec(cfg)
    model = empty_model(spec, torch.device("cuda"), torch.bfloat16, VelotuneModel)
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=gen)
    model.config_dict, model.name_or_path, model.max_seq_length = cfg, None, None
    return velotune.FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, init_lora_weights=False,
                                                     use_gradient_checkpointing=False)  # fmt: skip


def layer_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.layers[0].named_parameters() if "lora" not in n)


def measure(fn) -> tuple[float, int]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() - before


def check_tensors(model, folder: str) -> float:
    """Largest relative error of q_proj / down_proj of layer 0 against W + s B A (float32, then bf16)."""
    qkv, down = model.layers[0].attn.qkv, model.layers[0].mlp.down_proj
    q = model.spec.q_size
    expect = {
        "model.layers.0.self_attn.q_proj.weight": qkv.weight[:q].float()
        + qkv.scale["q_proj"] * qkv.lora_B["q_proj"].float() @ qkv.lora_a("q_proj").float(),
        "model.layers.0.mlp.down_proj.weight": down.weight.float()
        + down.scale["down_proj"] * down.lora_B["down_proj"].float() @ down.lora_a("down_proj").float(),
    }
    index_path = os.path.join(folder, "model.safetensors.index.json")
    index = json.load(open(index_path))["weight_map"] if os.path.exists(index_path) else {}
    worst = 0.0
    for name, ref in expect.items():
        with safe_open(os.path.join(folder, index.get(name, "model.safetensors")), "pt") as f:
            got = f.get_tensor(name).float()
        ref = ref.to(torch.bfloat16).float().cpu()
        worst = max(worst, float((got - ref).abs().max() / ref.abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--out", default="/tmp/export_check")
    parser.add_argument("--skip-gguf", action="store_true")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    tokenizer = build_tokenizer(os.path.join(args.out, "tokenizer"))
    model = build(args.layers, len(tokenizer))
    one_layer = layer_bytes(model)
    rows = []

    merged_dir = os.path.join(args.out, "merged")
    seconds, extra = measure(
        lambda: model.save_pretrained_merged(merged_dir, tokenizer, max_shard_size="5GB")
    )
    err = check_tensors(model, merged_dir)
    rows.append(("save_pretrained_merged (bf16)", seconds, extra, err))
    assert err < 1e-2, f"merged tensors differ from W + sBA: {err}"
    shutil.rmtree(merged_dir)

    if not args.skip_gguf:
        gguf_dir = os.path.join(args.out, "gguf")
        # The 128k-token embedding has no tokenizer this size here: a GGUF needs one token per row, so
        # the check pads the small tokenizer's vocabulary (placeholder tokens), as for padded embeddings.
        seconds, extra = measure(
            lambda: model.save_pretrained_gguf(gguf_dir, tokenizer, quantization_method="f16")
        )
        rows.append(("save_pretrained_gguf (f16)", seconds, extra, float("nan")))
        shutil.rmtree(gguf_dir)

    print(
        f"\n{torch.cuda.get_device_name(0)}, Llama-3.1-8B shape, {args.layers} layers, LoRA r=16 (all projections)"
    )
    print(f"one decoder layer (bf16): {one_layer / 2**20:.0f} MiB")
    print(f"{'export':34} {'seconds':>8} {'extra GPU MiB':>14} {'x layer':>8} {'max rel err':>12}")
    for name, s, e, err in rows:
        print(f"{name:34} {s:8.1f} {e / 2**20:14.0f} {e / one_layer:8.2f} {err:12.2e}")
    results = {"device": torch.cuda.get_device_name(0), "layers": args.layers, "one_layer_bytes": one_layer,
               "rows": [dict(zip(("export", "seconds", "extra_gpu_bytes", "max_rel_err"), r)) for r in rows]}  # fmt: skip
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
