"""GPU check for velotune.train.distributed on one host with 2+ GPUs (NCCL): correctness only, no timing.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        .venv/bin/python tests/train/gpu_check_distributed.py --out gpu_check_distributed.json

For LoRA + DDP, QLoRA + DDP and full fine-tuning + FSDP2 it trains a small random Llama 3 steps on
1 GPU x batch 4 and on 2 GPUs x batch 2 (torchrun, NCCL), then resumes the 2-GPU checkpoint of step 2
on 1 GPU, and compares losses and final trainable weights, in float32. The all-reduce sums in another
order than one GPU's GEMMs, and Adam's first steps magnify that on tiny gradients, so the bar is 1e-4
relative (the CPU tests hold 1e-6 with gloo). `--cpu` runs the same on CPU with gloo (a smoke test).
Prints a table and writes it as JSON. The scaling benchmark (tokens/s, peak memory) is issue 11.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
WORKER = os.path.join(ROOT, "tests", "train", "distributed_worker.py")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(spec: dict, work: str, name: str, processes: int) -> str:
    spec = {**spec, "args": {**spec["args"], "output_dir": os.path.join(work, name)}}
    path = os.path.join(work, f"{name}.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    env = {**os.environ, **NO_MULTICAST, "PYTHONPATH": ROOT}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if processes == 1:
        command = [sys.executable, WORKER, path]
    else:
        command = [TORCHRUN, "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1",
                   "--master_port", str(free_port()), WORKER, path]  # fmt: skip
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        lines = [line for line in (done.stdout + done.stderr).splitlines() if "Warning" not in line]
        raise RuntimeError(f"{name} failed:\n" + "\n".join(lines)[-8000:])
    return spec["args"]["output_dir"]


def losses(folder: str) -> list[float]:
    with open(os.path.join(folder, "log.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def weight_err(a: str, b: str, file: str) -> float:
    wa, wb = load_file(os.path.join(a, file)), load_file(os.path.join(b, file))
    if wa.keys() != wb.keys():
        return float("inf")
    return max(float((wa[k] - wb[k]).abs().max() / wa[k].abs().max().clamp_min(1e-30)) for k in wa)


def loss_err(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        return float("inf")
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_check_distributed.json")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU instead of NCCL on 2 GPUs")
    opts = parser.parse_args()
    if not opts.cpu and torch.cuda.device_count() < 2:
        sys.stderr.write("needs 2 or more CUDA GPUs\n")
        return 2
    from tests.model_zoo import save_hf_model

    work = tempfile.mkdtemp(prefix="velotune_dist_")
    model = os.path.join(work, "llama")
    save_hf_model("llama", model, seed=0)
    args = dict(learning_rate=1e-3, max_steps=3, progress=False, seed=5, max_grad_norm=1.0, save_steps=2,
                save_total_limit=None, packing=True, max_seq_length=48)  # fmt: skip
    cases = {
        "lora+ddp": dict(lora=True, parallel="ddp", file="adapter_model.safetensors"),
        "qlora+ddp": dict(lora=True, load_in_4bit=True, parallel="ddp", file="adapter_model.safetensors"),
        "full+fsdp2": dict(lora=False, parallel="fsdp", file="trainable.safetensors"),
    }
    rows = []
    for name, case in cases.items():
        base = dict(model=model, lora=case["lora"], load_in_4bit=case.get("load_in_4bit", False),
                    device_map="cpu" if opts.cpu else "auto", dtype="float32", examples=40, data_seed=3)  # fmt: skip
        one = run({**base, "args": {**args, "batch_size": 4}}, work, f"{name}-1gpu", 1)
        two = run(
            {**base, "args": {**args, "batch_size": 2, "parallel": case["parallel"]}}, work, f"{name}-2gpu", 2
        )
        resumed = run({**base, "resume": os.path.join(two, "checkpoint-2"), "args": {**args, "batch_size": 4}},
                      work, f"{name}-resumed", 1)  # fmt: skip
        file = case["file"]
        row = {
            "case": name,
            "loss_rel_err_2gpu": loss_err(losses(one), losses(two)),
            "weight_rel_err_2gpu": weight_err(one, two, file),
            "loss_rel_err_resumed": loss_err(losses(two)[2:], losses(resumed)),
            "weight_rel_err_resumed": weight_err(two, resumed, file),
        }
        row["ok"] = all(v <= opts.tol for k, v in row.items() if k.endswith("err_2gpu") or "resumed" in k)
        rows.append(row)
    print(
        f"{'case':<12} {'loss 2gpu':>10} {'weights 2gpu':>13} {'loss resumed':>13} {'weights resumed':>16}  ok"
    )
    for r in rows:
        print(f"{r['case']:<12} {r['loss_rel_err_2gpu']:>10.2e} {r['weight_rel_err_2gpu']:>13.2e} "
              f"{r['loss_rel_err_resumed']:>13.2e} {r['weight_rel_err_resumed']:>16.2e}  {r['ok']}")  # fmt: skip
    device = "cpu (gloo)" if opts.cpu else torch.cuda.get_device_name(0)
    result = {"device": device, "gpus": 0 if opts.cpu else torch.cuda.device_count(), "torch": torch.__version__,
              "tolerance": opts.tol, "rows": rows}  # fmt: skip
    with open(opts.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
