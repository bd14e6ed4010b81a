"""Host cost of the fused LoRA projection and of one decoder layer: torch ops and host time per call.

At Llama-3.2-1B the training step is host-bound (benchmarks/NOTES.md, "One training step"): the GPU
waits for Python and kernel launches. The op count is device-independent (on CUDA each non-view op is
about one kernel launch), so it is counted with a dispatch-mode counter; the host time is measured on
tiny tensors, where the arithmetic is negligible and what remains is Python, the dispatcher and the
autograd bookkeeping (plus, on CUDA, the launches). The model is the training setup on CUDA: a
bfloat16 base with float32 LoRA weights (as PEFT keeps them, so each call casts them), r=16 on every
projection. On CPU the default is float32 throughout: CPU bfloat16 GEMMs carry a fixed cost of their
own that would hide the host cost being measured (`--dtype bfloat16` to see it anyway).

The LoRA projection runs its hand-written `torch.autograd.Function` ("function", the path CUDA takes)
or its plain-autograd reference ("reference"); the layer's other ops take the device's own path.

On CUDA it also runs the Llama-3.2-1B shapes (2 x 2048 tokens): per projection and per checkpointed
layer, the wall time of a call against the GPU's busy time in it (torch.profiler); a wall time well
above the busy time is a GPU waiting on the host.

Correctness first, then timing: the function path must give the reference's outputs and gradients, a
forward without grad must give bitwise the output of a recorded one, and a checkpointed layer the
output and gradients of a plain one; the script exits with status 1 before timing anything otherwise.

    python benchmarks/lora_host_cost.py --out DIR                         # CUDA when present, else CPU
    python benchmarks/lora_host_cost.py --velotune-root /tmp/old --out DIR  # the same, on another checkout

Writes DIR/lora_host_cost-<device>.json and .md. Under 2 minutes on an H100 or on a laptop CPU.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = os.path.dirname(os.path.abspath(__file__))

# Ops that only make a new view of existing memory, or only allocate: no kernel on any device.
NO_KERNEL_OPS = {
    "view", "_unsafe_view", "reshape", "t", "transpose", "slice", "split", "split_with_sizes", "select",
    "as_strided", "detach", "alias", "unsqueeze", "squeeze", "expand", "permute", "unbind", "narrow",
    "_reshape_alias", "lift_fresh", "empty", "empty_like", "empty_strided",
}  # fmt: skip


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active (forward, and autograd's backward run inside)."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def kernels(self) -> int:
        return sum(n for op, n in self.ops.items() if op not in NO_KERNEL_OPS)


def import_velotune(root: str | None):
    """velotune from `root` (another checkout, for a before/after comparison) or from this one."""
    sys.path.insert(0, os.path.abspath(root) if root else os.path.dirname(HERE))
    import velotune
    import velotune.kernels.lora as lora_kernel
    from velotune.lora import add_lora
    from velotune.memory.checkpoint import recompute
    from velotune.models.decoder import DecoderModel
    from velotune.models.rope_scaling import rope_cos_sin
    from velotune.models.spec import ArchSpec, RopeSpec

    return dict(
        velotune=velotune, lora_kernel=lora_kernel, add_lora=add_lora, recompute=recompute,
        DecoderModel=DecoderModel, rope_cos_sin=rope_cos_sin, ArchSpec=ArchSpec, RopeSpec=RopeSpec,
    )  # fmt: skip


def git_revision(root: str) -> str | None:
    try:
        sha = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "velotune"], capture_output=True, text=True
        )
    except OSError:
        return None
    if sha.returncode != 0:
        return None
    return sha.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")


def build_layer_model(vt, device, dtype, hidden, heads, kv_heads, intermediate, seed=0):
    """One decoder layer with LoRA r=16 (alpha 16) on q/k/v, o, gate/up, down; B random so it counts."""
    spec = vt["ArchSpec"](
        model_type="llama", vocab_size=128, hidden_size=hidden, num_layers=1, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=hidden // heads, intermediate_size=intermediate,
        rope=vt["RopeSpec"](rotary_dim=hidden // heads),
    )  # fmt: skip
    torch.manual_seed(seed)
    with torch.device(device):
        model = vt["DecoderModel"](spec)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, hidden**-0.5)
    model = model.to(dtype)
    vt["add_lora"](model, r=16, lora_alpha=16)  # float32 LoRA weights on a 16-bit base, as PEFT does
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.to(device).train()


def set_lora_path(vt, path: str) -> None:
    """ "function": the LoRA projection takes its autograd Function on every device (CUDA's path);
    "reference": its plain-autograd reference (CPU's path). Other ops keep the device's own path."""
    vt["lora_kernel"].use_triton = (lambda *tensors: True) if path == "function" else (lambda *tensors: False)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def projections(model):
    layer = model.layers[0]
    return {
        "qkv": layer.attn.qkv,
        "o": layer.attn.o_proj,
        "gate_up": layer.mlp.gate_up,
        "down": layer.mlp.down_proj,
    }


def projection_input(module, tokens, dtype, device, seed=1, batch=1):
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(
        batch, tokens, module.in_features, device=device, dtype=dtype, generator=gen
    ).requires_grad_()


def zero_grads(x, params):
    # As a training loop's zero_grad(set_to_none=True): no gradient accumulation ops are counted.
    x.grad = None
    for p in params:
        p.grad = None


def projection_step(module, x):
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        y = module(x)
        y.backward(torch.ones_like(y))
        zero_grads(x, params)

    return step


def no_grad_step(module, x):
    def step():
        with torch.no_grad():
            module(x)

    return step


def layer_step(vt, model, x, cos, sin, checkpointed: bool):
    layer = model.layers[0]
    params = [p for p in layer.parameters() if p.requires_grad]

    def attention_half(t):
        return layer.attention_block(t, cos, sin, None, None)

    def step():
        if checkpointed:
            y = vt["recompute"](attention_half, layer.mlp_block, x, params)
        else:
            y = layer.mlp_block(attention_half(x))
        y.backward(torch.ones_like(y))
        zero_grads(x, params)

    return step


def host_cost(step, device: str, iters: int, repeats: int = 5) -> dict:
    """Ops per call and the best (over repeats) wall time per call of `iters` back-to-back calls."""
    for _ in range(20):
        step()
    with OpCounter() as counter:
        step()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        sync(device)
        best = min(best, (time.perf_counter() - t0) / iters)
    return {
        "ops": counter.total,
        "kernels": counter.kernels,
        "us_per_call": round(best * 1e6, 1),
        "op_histogram": dict(sorted(counter.ops.items(), key=lambda kv: -kv[1])),
    }


def gpu_busy_us(step, calls: int = 3) -> float | None:
    """Summed kernel time per call (µs) from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    total = 0.0
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if us > 0 and not evt.key.startswith(("aten::", "autograd::", "ProfilerStep")):
            total += us
    return total / calls if total else None


def wall_and_busy(step, iters: int = 20, repeats: int = 3) -> dict:
    for _ in range(5):
        step()
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / iters)
    busy = gpu_busy_us(step)
    wall = best * 1e6
    return {
        "wall_us": round(wall, 1),
        "gpu_busy_us": None if busy is None else round(busy, 1),
        "gpu_idle_fraction": None if busy is None else round(max(0.0, 1 - busy / wall), 3),
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check_correctness(vt, device: str) -> list[str]:
    """Failures (empty: all good). float32 model so the comparisons mean something at 1e-5."""
    failures = []
    model = build_layer_model(vt, device, torch.float32, hidden=64, heads=4, kv_heads=2, intermediate=128)
    for name, module in projections(model).items():
        x = projection_input(module, 13, torch.float32, device)
        dy = torch.randn(
            1, 13, module.out_features, device=device, generator=torch.Generator(device).manual_seed(2)
        )
        params = [p for p in module.parameters() if p.requires_grad]
        results = {}
        for path in ("function", "reference"):
            set_lora_path(vt, path)
            y = module(x)
            grads = torch.autograd.grad(y, [x, *params], dy)
            results[path] = (y.detach(), grads)
        (y_f, g_f), (y_r, g_r) = results["function"], results["reference"]
        errs = [rel_err(y_f, y_r)] + [rel_err(a, b) for a, b in zip(g_f, g_r)]
        if max(errs) > 1e-5:
            failures.append(f"{name}: function vs reference, output/gradient relative errors {errs}")
    set_lora_path(vt, "function")
    bf16 = build_layer_model(vt, device, torch.bfloat16, hidden=64, heads=4, kv_heads=2, intermediate=128)
    for name, module in projections(bf16).items():
        x = projection_input(module, 13, torch.bfloat16, device)
        with torch.no_grad():
            free = module(x)
        if not torch.equal(free, module(x).detach()):
            failures.append(f"{name}: the no-grad forward differs from the recorded one")
    positions = torch.arange(13, device=device)[None]
    cos, sin = vt["rope_cos_sin"](model.spec.rope, positions, torch.float32)
    layer = model.layers[0]
    params = [p for p in layer.parameters() if p.requires_grad]
    x = projection_input(layer.attn.qkv, 13, torch.float32, device)
    got = {}
    for checkpointed in (False, True):

        def attention_half(t):
            return layer.attention_block(t, cos, sin, None, None)

        if checkpointed:
            y = vt["recompute"](attention_half, layer.mlp_block, x, params)
        else:
            y = layer.mlp_block(attention_half(x))
        got[checkpointed] = (y.detach(), torch.autograd.grad(y, [x, *params], torch.ones_like(y)))
    errs = [rel_err(got[True][0], got[False][0])]
    errs += [rel_err(a, b) for a, b in zip(got[True][1], got[False][1])]
    if max(errs) > 1e-4:  # the same kernels twice; 1e-4 leaves room for atomics in a backward kernel
        failures.append(f"checkpointed layer vs plain layer: output/gradient relative errors {errs}")
    return failures


def llama_1b_rows(vt, device, hidden=2048, heads=32, kv_heads=8, intermediate=8192, batch=2, seq=2048):
    """Wall time against GPU busy time per call at the Llama-3.2-1B shapes, on the function path."""
    set_lora_path(vt, "function")
    dtype = torch.bfloat16
    big = build_layer_model(vt, device, dtype, hidden, heads, kv_heads, intermediate)
    prj = projections(big)
    x = projection_input(prj["qkv"], seq, dtype, device, batch=batch)
    h = projection_input(prj["down"], seq, dtype, device, batch=batch)
    cos, sin = vt["rope_cos_sin"](big.spec.rope, torch.arange(seq, device=device)[None], dtype)
    cases = {
        "qkv projection, forward+backward": projection_step(prj["qkv"], x),
        "o projection, forward+backward": projection_step(prj["o"], x),
        "gate_up projection, forward+backward": projection_step(prj["gate_up"], x),
        "down projection, forward+backward": projection_step(prj["down"], h),
        "decoder layer, checkpointed": layer_step(vt, big, x, cos, sin, True),
    }
    print(f"\nLlama-3.2-1B shapes, {batch} x {seq} tokens: {'wall us':>9s} {'busy us':>9s} {'idle':>6s}")
    rows = {}
    for name, step in cases.items():
        r = rows[name] = wall_and_busy(step)
        busy, idle = r["gpu_busy_us"], r["gpu_idle_fraction"]
        print(f"{name:45s} {r['wall_us']:9.1f} {busy if busy is not None else float('nan'):9.1f} "
              f"{idle if idle is not None else float('nan'):6.3f}")  # fmt: skip
    return rows


def markdown(result: dict) -> str:
    lines = [
        f"# LoRA projection host cost ({result['device']}, torch {result['torch']}, velotune {result['velotune']})",
        "",
        f"Tiny shapes (hidden {result['tiny']['hidden']}, {result['tiny']['tokens']} tokens), "
        f"{result['tiny']['dtype']} base + float32 LoRA r=16: host time per call, ops dispatched, and ops "
        "that launch a kernel.",
        "",
        "| case | ops | kernels | µs/call |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, r in result["tiny"]["rows"].items():
        lines.append(f"| {name} | {r['ops']} | {r['kernels']} | {r['us_per_call']} |")
    if result.get("llama_1b"):
        lines += [
            "",
            "Llama-3.2-1B shapes (2 x 2048 tokens, bfloat16 base + float32 LoRA, function path): wall time of "
            "a call against the GPU's busy time.",
            "",
            "| case | wall µs | GPU busy µs | GPU idle |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name, r in result["llama_1b"].items():
            lines.append(f"| {name} | {r['wall_us']} | {r['gpu_busy_us']} | {r['gpu_idle_fraction']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--paths", default="function,reference", help="LoRA paths to time, comma-separated")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="base weights and activations (auto: bfloat16 on CUDA, float32 on CPU)")  # fmt: skip
    parser.add_argument("--velotune-root", default=None, help="import velotune from this checkout instead")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    torch.set_num_threads(1)  # host cost of one Python thread, not of a CPU GEMM's thread pool
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 checks compare true float32 math
    torch.backends.cudnn.allow_tf32 = False
    started = time.perf_counter()
    vt = import_velotune(args.velotune_root)
    root = os.path.dirname(os.path.dirname(os.path.abspath(vt["velotune"].__file__)))

    failures = check_correctness(vt, device)
    for failure in failures:
        print("FAILED:", failure)
    if failures:
        return 1
    print("correctness: function path = reference (outputs, gradients), no-grad forward = recorded, "
          "checkpointed layer = plain layer")  # fmt: skip

    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    model = build_layer_model(
        vt, device, dtype, hidden=args.hidden, heads=4, kv_heads=2, intermediate=2 * args.hidden
    )
    prj = projections(model)
    x = projection_input(prj["qkv"], args.tokens, dtype, device)
    h = projection_input(prj["down"], args.tokens, dtype, device)
    cos, sin = vt["rope_cos_sin"](model.spec.rope, torch.arange(args.tokens, device=device)[None], dtype)
    cases = {
        "qkv projection (3 LoRA blocks), forward+backward": projection_step(prj["qkv"], x),
        "o projection (1 LoRA block), forward+backward": projection_step(prj["o"], x),
        "gate_up projection (2 LoRA blocks), forward+backward": projection_step(prj["gate_up"], x),
        "down projection (1 LoRA block), forward+backward": projection_step(prj["down"], h),
        "qkv projection, forward under no_grad": no_grad_step(prj["qkv"], x),
        "decoder layer, no checkpointing": layer_step(vt, model, x, cos, sin, checkpointed=False),
        "decoder layer, checkpointed (forward, recompute, backward)": layer_step(
            vt, model, x, cos, sin, True
        ),
    }
    rows = {}
    for path in args.paths.split(","):
        set_lora_path(vt, path)
        for name, step in cases.items():
            rows[f"{path}: {name}"] = host_cost(step, device, args.iters)
    print(f"{'case':80s} {'ops':>5s} {'kernels':>7s} {'us/call':>9s}")
    for name, r in rows.items():
        print(f"{name:80s} {r['ops']:5d} {r['kernels']:7d} {r['us_per_call']:9.1f}")

    llama_1b = llama_1b_rows(vt, device) if device == "cuda" else {}

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        result = {
            "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "velotune": git_revision(root) or root,
            "tiny": {"tokens": args.tokens, "hidden": args.hidden, "dtype": dtype_name, "rows": rows},
            "llama_1b": llama_1b,
        }
        stem = os.path.join(args.out, f"lora_host_cost-{device}")
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(markdown(result))
        print(f"wrote {stem}.json and {stem}.md")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
