"""GPU check of velotune's TRL integration (`velotune.train.hf_integration.SFTTrainer`, needs trl==1.16.0).

    python tests/train/gpu_check_sft.py [--steps 30] [--out benchmarks/results]   # --cpu: a small smoke run

1. Correctness (tiny Llama, float32, TF32 off, velotune's Triton kernels): 10 steps of velotune's
   SFTTrainer and of TRL's SFTTrainer on Transformers + PEFT, from the same initial adapter, padded
   and packed (TRL's padding-free packing): the logged losses agree (max relative difference < 1e-3),
   and the checkpoint's adapter loads into PEFT with the same logits.
2. Speed (random ~120M Llama, bf16 weights, bf16 autocast, LoRA r=16 on every projection, gradient
   checkpointing, packing, sequences of 64..1024 tokens): tokens/s and peak memory of the two trainers.

Prints a table and writes <out>/trl_sft-<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sft_config(out: str, device: str, packing: bool, batch: int, max_length: int, steps: int, bf16: bool):
    import trl

    return trl.SFTConfig(output_dir=out, per_device_train_batch_size=batch, learning_rate=1e-2 if not bf16 else 2e-4,
                         logging_steps=1, report_to="none", use_cpu=device == "cpu", disable_tqdm=True,
                         save_strategy="no", seed=0, max_length=max_length, packing=packing, bf16=bf16,
                         max_steps=steps, gradient_checkpointing=True,
                         include_num_input_tokens_seen="non_padding")  # fmt: skip


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def check_correctness(device: str) -> list[dict]:
    import datasets
    import peft
    import trl

    import velotune
    from tests.model_zoo import build_hf_model, rel_err
    from tests.train.test_hf_integration import counting_texts, counting_tokenizer
    from velotune.train.hf_integration import SFTTrainer

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    folder = tempfile.mkdtemp()
    hf = build_hf_model("llama", seed=0)
    with torch.no_grad():
        hf.lm_head.weight.mul_(10)
    hf.save_pretrained(folder)
    counting_tokenizer().save_pretrained(folder)
    data = datasets.Dataset.from_dict({"text": counting_texts()})
    rows = []
    for packing in (False, True):
        batch = 2 if packing else 4
        out = tempfile.mkdtemp()
        model, tok = velotune.FastLanguageModel.from_pretrained(folder, dtype=torch.float32, device_map=device,
                                                                max_seq_length=64 * batch, progress=False)  # fmt: skip
        model = velotune.FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)
        model.save_pretrained(os.path.join(out, "initial"))
        ours = SFTTrainer(model=model, args=sft_config(os.path.join(out, "v"), device, packing, batch, 64, 10, False),
                          train_dataset=data, processing_class=tok)  # fmt: skip
        ours.train()
        ours.save_model(os.path.join(out, "final"))
        ref_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
        ref_model = peft.PeftModel.from_pretrained(ref_model, os.path.join(out, "initial"), is_trainable=True)
        theirs = trl.SFTTrainer(model=ref_model, args=sft_config(os.path.join(out, "h"), device, packing, batch, 64, 10,
                                False), train_dataset=data, processing_class=tok)  # fmt: skip
        theirs.train()
        a, b = losses(ours), losses(theirs)
        loss_diff = max(abs(x - y) / abs(y) for x, y in zip(a, b))

        ids = tok(counting_texts()[:3], return_tensors="pt")["input_ids"].to(device)
        base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
        loaded = peft.PeftModel.from_pretrained(base, os.path.join(out, "final")).eval()
        with torch.no_grad():
            logit_err = rel_err(ours.model.eval()(ids).logits, loaded(ids).logits)
        ok = len(a) == len(b) == 10 and loss_diff < 1e-3 and logit_err < 1e-4 and a[-1] < 0.5 * a[0]
        rows.append({"packing": packing, "losses_velotune": a, "losses_trl_peft": b, "max_rel_loss_diff": loss_diff,
                     "adapter_logits_rel_err": logit_err, "ok": ok})  # fmt: skip
    return rows


def measure_speed(device: str, steps: int, small: bool) -> list[dict]:
    import datasets
    import peft
    import trl

    import velotune
    from tests.train.test_hf_integration import counting_tokenizer
    from velotune.train.hf_integration import SFTTrainer

    folder = tempfile.mkdtemp()
    size = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512) if small else dict(
                hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                num_key_value_heads=4, vocab_size=32000)  # fmt: skip
    max_length, batch = (128, 2) if small else (1024, 4)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**size, max_position_embeddings=4096, pad_token_id=0, eos_token_id=2)
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    tok = counting_tokenizer()  # only its pad/eos ids are used: the data is already tokenized
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(max_length // 16, max_length + 1, (batch * steps * 4,), generator=gen).tolist()
    ids = [torch.randint(3, size["vocab_size"], (n,), generator=gen).tolist() for n in lengths]
    data = datasets.Dataset.from_dict({"input_ids": ids})
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bf16 = device == "cuda"
    rows = []
    for name in ("velotune", "trl+peft"):
        out = tempfile.mkdtemp()
        args = sft_config(out, device, True, batch, max_length, steps, bf16)
        if name == "velotune":
            model, _ = velotune.FastLanguageModel.from_pretrained(folder, dtype=dtype, device_map=device,
                                                                  max_seq_length=batch * max_length, progress=False)  # fmt: skip
            model = velotune.FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, target_modules=TARGETS,
                                                              random_state=0)  # fmt: skip
            trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
            model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS))
            trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
        tokens = Tokens()
        trainer.add_callback(tokens)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        seconds = tokens.seconds()
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        rows.append({"trainer": name, "tokens_per_s": tokens.count / seconds, "peak_gib": peak,
                     "first_loss": losses(trainer)[0], "last_loss": losses(trainer)[-1]})  # fmt: skip
        del trainer, model
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


class Tokens(transformers.TrainerCallback):
    """Counts the real tokens the trainer saw after a 3-step warm-up, and the time they took."""

    WARMUP = 3

    def __init__(self):
        self.count, self.start, self.end, self.seen, self.seen_at_start = 0, None, None, 0, 0

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if state.global_step == self.WARMUP:
            self.start, self.seen_at_start = time.perf_counter(), state.num_input_tokens_seen
        self.end, self.seen = time.perf_counter(), state.num_input_tokens_seen

    def on_train_end(self, args, state, control, **kwargs):
        self.count = self.seen - self.seen_at_start

    def seconds(self) -> float:
        return self.end - self.start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--cpu", action="store_true", help="small smoke run on the CPU (no files written)")
    args = parser.parse_args(argv)
    device = "cpu" if args.cpu else "cuda"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

    checks = check_correctness(device)
    print("\ncorrectness (float32): velotune SFTTrainer vs TRL SFTTrainer on Transformers + PEFT, 10 steps")
    print(f"{'packing':>8} {'max rel loss diff':>18} {'adapter logits err':>19} {'first->last loss':>18}  ok")
    for r in checks:
        a = r["losses_velotune"]
        print(f"{r['packing']!s:>8} {r['max_rel_loss_diff']:>18.2e} {r['adapter_logits_rel_err']:>19.2e} "
              f"{a[0]:>8.3f}->{a[-1]:<8.3f}  {r['ok']}")  # fmt: skip

    steps = 6 if args.cpu else args.steps
    rows = measure_speed(device, steps, small=args.cpu)
    print(f"\nspeed: LoRA r=16, packing, {'bf16' if device == 'cuda' else 'float32'}, {steps} steps")
    print(f"{'trainer':>10} {'tokens/s':>10} {'peak GiB':>9} {'loss first->last':>18}")
    for r in rows:
        print(f"{r['trainer']:>10} {r['tokens_per_s']:>10.0f} {r['peak_gib']:>9.2f} "
              f"{r['first_loss']:>8.3f}->{r['last_loss']:<8.3f}")  # fmt: skip
    if not args.cpu:
        import trl

        gpu = torch.cuda.get_device_name().replace(" ", "_")
        path = Path(args.out) / f"trl_sft-{gpu}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "transformers": transformers.__version__, "trl": trl.__version__, "steps": args.steps}  # fmt: skip
        path.write_text(json.dumps({"meta": meta, "checks": checks, "speed": rows}, indent=2))
        print(f"wrote {path}")
    return 0 if all(r["ok"] for r in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
