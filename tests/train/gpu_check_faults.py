"""GPU check of the trainer's fault handling (docs/reliability.md): what the CPU tests can only inject.

    python tests/train/gpu_check_faults.py [--model llama-3.2-1b] [--out benchmarks/results]

1. Non-finite steps on CUDA: a NaN written into layer 1's activations under bf16 autocast stops the
   step it happens with layer 1 named and a checkpoint of the state before; fp16 autocast trains with
   a GradScaler whose overflowing step is skipped and counted, not taken as a fault.
2. A real CUDA out-of-memory error: LoRA on a `--model`-shaped random model with a micro-batch far too
   large raises velotune's OutOfMemoryError with the measured peak, the GPU's capacity, the planner's
   estimate and settings that fit; afterwards the step's memory is released; the first suggested
   smaller micro-batch then trains (its measured peak printed beside the planner's estimate).
3. Cost of the per-step check: the gradient norm plus the one host sync, against the step time.

Prints a table and writes benchmarks/results/faults-<gpu>.json. --cpu-smoke runs part 1 on CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def tiny(device: str, dtype=torch.float32):
    import velotune
    from tests.model_zoo import save_hf_model

    folder = tempfile.mkdtemp()
    save_hf_model("llama", folder)
    return velotune.FastLanguageModel.from_pretrained(folder, dtype=dtype, device_map=device, full_finetuning=True,
                                                      max_seq_length=64, progress=False)[0]  # fmt: skip


def check_nonfinite(device: str) -> dict:
    from tests.train.helpers import random_examples
    from velotune.errors import NonFiniteError
    from velotune.train import Trainer, TrainingArguments
    from velotune.train.data import TokenizedDataset

    data = TokenizedDataset.from_examples(random_examples(12, seed=0))
    results = {}

    model = tiny(device)
    out = tempfile.mkdtemp()
    precision = "bf16" if device == "cuda" else "no"
    trainer = Trainer(model, TrainingArguments(output_dir=out, batch_size=2, max_steps=5, progress=False,
                                               mixed_precision=precision), train_dataset=data)  # fmt: skip

    def poison(mod, inputs, output):
        if trainer.state["global_step"] == 2:
            output = output.clone()
            output.view(-1)[::7] = float("nan")
            return output

    model.layers[1].mlp.register_forward_hook(poison)
    try:
        trainer.train()
        results["nan_named"] = "not raised"
    except NonFiniteError as exc:
        r = exc.report
        results["nan_named"] = (
            f"step {r.step}, layer {r.layer}, {r.module}, checkpoint {os.path.basename(exc.checkpoint)}"
        )
        results["nan_ok"] = (r.step, r.layer, os.path.basename(exc.checkpoint)) == (3, 1, "checkpoint-2")

    model = tiny(device)
    trainer = Trainer(model, TrainingArguments(output_dir=tempfile.mkdtemp(), batch_size=4, max_steps=4, progress=False,
                                               mixed_precision="fp16"), train_dataset=data)  # fmt: skip
    model.layers[1].mlp.down_proj.weight.register_hook(
        lambda g: g * float("inf") if trainer.state["global_step"] == 1 else g
    )
    state = trainer.train()
    losses = [r["loss"] for r in state["log_history"] if r.get("loss") is not None]
    results["fp16"] = (
        f"overflow_steps {state['overflow_steps']}, scale {trainer.scaler.get_scale():g}, losses {losses}"
    )
    results["fp16_ok"] = (
        state["overflow_steps"] == 1 and state["nonfinite_steps"] == 0 and all(map(math.isfinite, losses))
        and trainer.scaler.get_scale() == 32768.0
    )  # fmt: skip
    return results


def long_rows(vocab: int, n: int, length: int, seed: int):
    from velotune.train.data import TokenizedDataset

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(10, vocab, (length,), generator=gen).tolist()
        rows.append((ids, [-100] + ids[1:]))
    return TokenizedDataset.from_examples(rows)


def check_out_of_memory(model_name: str, seed: int) -> dict:
    import velotune
    from benchmarks.train_step import prepare_model_folder
    from velotune.errors import OutOfMemoryError
    from velotune.train import Trainer, TrainerCallback, TrainingArguments, faults

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, trainer):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    cache = Path(os.environ.get("VELOTUNE_BENCH_CACHE", tempfile.gettempdir())) / "velotune-bench-models"
    folder = prepare_model_folder(model_name, cache, seed, torch.device("cuda"))
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    seq, batch = 4096, 64
    data = long_rows(vocab, 4 * batch, seq, seed)

    def lora_model():
        model, _ = velotune.FastLanguageModel.from_pretrained(str(folder), max_seq_length=seq, device_map="cuda",
                                                              progress=False)  # fmt: skip
        return velotune.FastLanguageModel.get_peft_model(
            model, r=16, lora_alpha=16, use_gradient_checkpointing=False
        )

    model = lora_model()
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = tempfile.mkdtemp()
    trainer = Trainer(model, TrainingArguments(output_dir=out, batch_size=batch, max_steps=2, progress=False,
                                               max_seq_length=seq, save_steps=1), train_dataset=data)  # fmt: skip
    message, is_torch_oom = None, False
    try:
        trainer.train()
    except OutOfMemoryError as exc:
        message, is_torch_oom = str(exc), isinstance(exc, torch.OutOfMemoryError)
    del trainer
    torch.cuda.synchronize()
    left_over = torch.cuda.memory_allocated() - baseline
    result = {"message": message, "left_over_mib": left_over / 2**20,
              "output_folder": sorted(os.listdir(out)) if os.path.isdir(out) else []}  # fmt: skip
    settings = faults.run_settings(model, "adamw", batch, seq)
    capacity = torch.cuda.get_device_properties(0).total_memory
    options = faults.suggestions(model.spec, settings, 1, capacity)
    smaller = next((o for o in options if o.settings == {**settings, "batch": o.settings["batch"]}), None)
    result["oom_ok"] = bool(
        message and is_torch_oom and "measured peak:" in message and "of the GPU's" in message
        and "settings that fit" in message and left_over < 256 * 2**20
        and not any(name.startswith((".checkpoint", "checkpoint")) for name in result["output_folder"])
    )  # fmt: skip
    del model
    torch.cuda.empty_cache()
    if smaller is None:
        result["suggestion"] = "no smaller micro-batch fits by the planner"
        return result

    # The suggested micro-batch really trains, and the check's cost against its step time.
    b = smaller.settings["batch"]
    model = lora_model()
    torch.cuda.reset_peak_memory_stats()
    times = StepTimes()
    trainer = Trainer(model, TrainingArguments(output_dir=tempfile.mkdtemp(), batch_size=b, max_steps=4,
                                               gradient_accumulation_steps=batch // b, progress=False,
                                               max_seq_length=seq), train_dataset=data, callbacks=[times])  # fmt: skip
    trainer.train()
    step_s = (times.times[-1] - times.times[1]) / (len(times.times) - 2)
    grads = [torch.randn_like(p) for p in model.parameters() if p.requires_grad]
    loss = torch.zeros((), device="cuda")
    for _ in range(3):
        torch.nn.utils.get_total_norm(grads)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(50):
        norm = torch.nn.utils.get_total_norm(grads)
        torch.stack([loss, norm.float()]).tolist()
    check_s = (time.perf_counter() - start) / 50
    result.update(suggestion=smaller.text, planned_gib=smaller.estimate / 2**30,
                  measured_peak_gib=torch.cuda.max_memory_allocated() / 2**30, step_ms=step_s * 1e3,
                  check_us=check_s * 1e6, check_share=check_s / step_s)  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama-3.2-1b")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--cpu-smoke", action="store_true", help="part 1 on CPU")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        print(check_nonfinite("cpu"))
        return 0
    if not torch.cuda.is_available():
        sys.stderr.write("needs a CUDA GPU\n")
        return 2
    checks = check_nonfinite("cuda")
    print(f"non-finite: {checks}")
    oom = check_out_of_memory(args.model, args.seed)
    print(
        f"\nout-of-memory report ({args.model}, LoRA r=16, batch 64 x 4096, no checkpointing):\n{oom['message']}"
    )
    print(
        f"memory left allocated after the error: {oom['left_over_mib']:.0f} MiB; output folder: {oom['output_folder']}"
    )
    if "step_ms" in oom:
        print(
            f"\n{'suggestion':60} {'planned GiB':>11} {'peak GiB':>9} {'step ms':>8} {'check us':>9} {'share':>7}"
        )
        print(f"{oom['suggestion'][:60]:60} {oom['planned_gib']:>11.2f} {oom['measured_peak_gib']:>9.2f} "
              f"{oom['step_ms']:>8.1f} {oom['check_us']:>9.1f} {oom['check_share']:>7.3%}")  # fmt: skip
    else:
        print(oom["suggestion"])
    ok = checks.get("nan_ok") and checks.get("fp16_ok") and oom["oom_ok"]
    print(f"\nall checks {'passed' if ok else 'FAILED'}")
    os.makedirs(args.out, exist_ok=True)
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    path = Path(args.out) / f"faults-{gpu}.json"
    meta = {"model": args.model, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "command": "python tests/train/gpu_check_faults.py " + " ".join(argv or sys.argv[1:])}  # fmt: skip
    path.write_text(
        json.dumps({"meta": meta, "nonfinite": checks, "out_of_memory": oom}, indent=2, default=str)
    )
    print(f"wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
