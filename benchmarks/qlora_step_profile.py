"""Where an 8B QLoRA training step spends its time, and what the host link can carry (issue 5).

    python benchmarks/qlora_step_profile.py --out DIR    (writes DIR/qlora_step_profile.json and .md)

1. Host link: pinned-memory copies of 224 MiB (one Llama-8B gate/up output at 4,096 tokens), device
   to host, host to device, both at once on two streams, and device to host while a bf16 GEMM runs on
   the compute stream (the GEMM's own slowdown is reported too). Decides how many bytes per step can
   wait in host memory instead of being recomputed.
2. The Llama-3.1-8B shape built in 4 bits on the GPU (benchmarks/qlora_70b.py's builder), LoRA r=16
   on the seven projections, AdamW fused, batch 2 x 2048. For each checkpointing configuration:
   2 warm-up + 4 timed steps; forward, backward and optimizer times (synchronised), peak memory,
   the planner's estimate.
3. torch.profiler over one step of each configuration: GPU time per op family, time the GPU is idle
   (wall time minus the union of kernel intervals), copy-engine time.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.profile_step import CATEGORIES as STEP_CATEGORIES  # noqa: E402
from benchmarks.profile_step import categorize as categorize_among  # noqa: E402
from benchmarks.qlora_70b import build_random_qlora_model  # noqa: E402
from benchmarks.shapes import model_config  # noqa: E402
import velotune.kernels.lora as lora_module  # noqa: E402
import velotune.memory.checkpoint as checkpoint_module  # noqa: E402
import velotune.memory.fused_attention as fused_attention_module  # noqa: E402
import velotune.memory.fused_mlp as fused_mlp_module  # noqa: E402
from velotune import FastLanguageModel  # noqa: E402
from velotune.memory.layer_graphs import pool_bytes  # noqa: E402
from velotune.memory.planner import estimate_memory  # noqa: E402

GIB = 2**30
MODEL = "llama-3.1-8b"
# profile_step's op families, with the two this step adds in front of them.
CATEGORIES = [("nf4 dequant", r"nf4|dequant"), ("host copies", r"memcpy|memset"), *STEP_CATEGORIES]
AUTOGRAD_ATTENTION = "autograd attention half"
PER_FACTOR_CASTS = "a cast per LoRA factor"
UNFOLDED = "LoRA added after the base GEMM"
GRAPHS = "CUDA graphs"
BOTTOM_UP = "kept from the bottom up"
TOP_DOWN = "kept from the top down"
CONFIGS = [  # label, gradient_checkpointing, checkpoint_policy, gate_up_kept_layers
    ("offload, full", "offload", "full", None),
    ("offload, save_attn", "offload", "save_attn", None),
    ("no recomputation", False, "full", None),
    ("offload, save_mlp, 0 gate/up kept", "offload", "save_mlp", 0),
    ("offload, save_mlp, 11 kept", "offload", "save_mlp", 11),
    ("offload, save_mlp, 16 kept", "offload", "save_mlp", 16),
    ("offload, save_mlp, 21 kept", "offload", "save_mlp", 21),
    ("offload, save_mlp, 26 kept", "offload", "save_mlp", 26),
    ("offload, save_mlp, 32 kept", "offload", "save_mlp", 32),
    # The attention half recomputed through the modules' autograd graph, as before
    # velotune.memory.fused_attention (the label says so; see `configure`).
    (f"offload, full, {AUTOGRAD_ATTENTION}", "offload", "full", None),
    (f"offload, save_mlp, 16 kept, {AUTOGRAD_ATTENTION}", "offload", "save_mlp", 16),
    # The LoRA factors (and their gradients) cast one at a time, as before kernels.lora.cast_factors.
    (f"offload, full, {PER_FACTOR_CASTS}", "offload", "full", None),
    (f"offload, save_mlp, 16 kept, {PER_FACTOR_CASTS}", "offload", "save_mlp", 16),
    # The same policies with every checkpoint kept on the GPU: the step without the host link's copies
    # (more GPU memory), which tells the link's share of the offloaded step from the rest.
    ("GPU checkpoints, full", True, "full", None),
    ("GPU checkpoints, save_mlp, 16 kept", True, "save_mlp", 16),
    # The LoRA term added to each 4-bit projection's output by an addmm per block, as before
    # kernels.lora folded it into the base GEMM (the label says so; see `configure`).
    (f"offload, full, {UNFOLDED}", "offload", "full", None),
    (f"offload, save_mlp, 16 kept, {UNFOLDED}", "offload", "save_mlp", 16),
    # Each layer's first forward replayed from a CUDA graph, and under "save_mlp" its backward too
    # (velotune.memory.layer_graphs).
    (f"offload, full, {GRAPHS}", "offload", "full", None),
    (f"GPU checkpoints, full, {GRAPHS}", True, "full", None),
    (f"offload, save_mlp, 16 kept, {GRAPHS}", "offload", "save_mlp", 16),
    (f"offload, save_mlp, 8 kept, {GRAPHS}", "offload", "save_mlp", 8),
    (f"offload, save_mlp, 12 kept, {GRAPHS}", "offload", "save_mlp", 12),
    (f"offload, save_mlp, 20 kept, {GRAPHS}", "offload", "save_mlp", 20),
    (f"offload, save_mlp, 0 gate/up kept, {GRAPHS}", "offload", "save_mlp", 0),
    # The keeping layers in the other mode's order (see `configure`): eager layers keep from the top layer
    # down, graphed ones from the bottom up (checkpoint.gate_up_keeping_layers).
    (f"offload, save_mlp, 16 kept, {GRAPHS}, {TOP_DOWN}", "offload", "save_mlp", 16),
    (f"offload, save_mlp, 16 kept, {BOTTOM_UP}", "offload", "save_mlp", 16),
]
HAND_WRITTEN_ATTENTION = checkpoint_module.fused_attention_block
CAST_FACTORS = lora_module.cast_factors
FOLD_WIDTH = lora_module.fold_width
KEEPING_LAYERS = checkpoint_module.gate_up_keeping_layers


def _keeping(bottom_up: bool):
    """`gate_up_keeping_layers` in a fixed order, whatever `model.cuda_graphs` says."""

    def layers(model) -> frozenset[int]:
        n, graphed = len(model.layers), model.cuda_graphs
        model.cuda_graphs = False
        try:
            top_down = KEEPING_LAYERS(model)
        finally:
            model.cuda_graphs = graphed
        return frozenset(n - 1 - i for i in top_down) if bottom_up else top_down

    return layers


def _cast_each(tensors, dtypes):
    return [t if t is None or t.dtype == d else t.to(d) for t, d in zip(tensors, dtypes)]


def configure(model, index: int) -> tuple[str, object, str, int | None]:
    """Sets the model (and the attention half's path) to CONFIGS[index]; returns that entry."""
    label, mode, policy, kept = CONFIGS[index]
    model.gradient_checkpointing, model.checkpoint_policy, model.gate_up_kept_layers = mode, policy, kept
    # velotune has no switch for this (the hand-written half gives bitwise the autograd gradients):
    # the comparison swaps the checkpoint module's lookup for one that always declines.
    autograd = label.endswith(AUTOGRAD_ATTENTION)
    checkpoint_module.fused_attention_block = (lambda *args: None) if autograd else HAND_WRITTEN_ATTENTION
    cast = _cast_each if label.endswith(PER_FACTOR_CASTS) else CAST_FACTORS
    for module in (lora_module, fused_mlp_module, fused_attention_module):
        module.cast_factors = cast
    lora_module.fold_width = (lambda *args: 0) if label.endswith(UNFOLDED) else FOLD_WIDTH
    model.cuda_graphs = label.endswith(GRAPHS) or f"{GRAPHS}, {TOP_DOWN}" in label
    order = {BOTTOM_UP: True, TOP_DOWN: False}.get(label.rsplit(", ", 1)[-1])
    checkpoint_module.gate_up_keeping_layers = KEEPING_LAYERS if order is None else _keeping(order)
    return label, mode, policy, kept


def grads_of(model, ids) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(loss), grads


def check_policies(model, ids) -> dict:
    """Loss and LoRA gradients of every checkpointed configuration against "offload, full", on the
    same weights (no optimizer step in between): the same numbers are expected bit for bit."""
    out = {}
    ref_loss, ref = None, None
    for index in range(len(CONFIGS)):
        label, mode, _, _ = configure(model, index)
        if not mode:
            continue
        if label.endswith(GRAPHS):
            # The first step at a shape runs eagerly, the next captures (and replays): check a replay.
            for _ in range(2):
                grads_of(model, ids)
        loss, grads = grads_of(model, ids)
        if ref is None:
            ref_loss, ref = loss, grads
            # The same configuration again: the floor set by nondeterministic kernels (the attention
            # backward's atomics), against which the other policies' differences are read.
            again_loss, again = grads_of(model, ids)
            floor = max(float((again[n] - ref[n]).abs().max()) for n in ref)
            out[f"{label} (repeat)"] = {"loss": again_loss, "loss_diff": again_loss - ref_loss, "max_abs_grad_diff": floor}
            print(f"check {label} repeated: max |grad diff| {floor:.3e}, largest |grad| "
                  f"{max(float(g.abs().max()) for g in ref.values()):.3e}", flush=True)  # fmt: skip
            continue
        worst = max(float((grads[n] - ref[n]).abs().max()) for n in ref)
        out[label] = {"loss": loss, "loss_diff": loss - ref_loss, "max_abs_grad_diff": worst,
                      "same_parameters": sorted(grads) == sorted(ref), "bitwise": worst == 0.0 and loss == ref_loss}  # fmt: skip
        print(f"check {label}: loss {loss:.6f} (full {ref_loss:.6f}), max |grad diff| {worst:.3e}", flush=True)
    return out


def categorize(name: str) -> str:
    return categorize_among(name, CATEGORIES)


def _event_ms(fn, reps: int = 5) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def host_link(device: torch.device) -> dict:
    nbytes = 224 * 2**20
    gpu_a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    gpu_b = torch.empty(nbytes, dtype=torch.uint8, device=device)
    host_a = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host_b = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    s1, s2 = torch.cuda.Stream(device), torch.cuda.Stream(device)

    def d2h():
        host_a.copy_(gpu_a, non_blocking=True)

    def h2d():
        gpu_b.copy_(host_b, non_blocking=True)

    def both():
        cur = torch.cuda.current_stream(device)
        s1.wait_stream(cur)
        s2.wait_stream(cur)
        with torch.cuda.stream(s1):
            host_a.copy_(gpu_a, non_blocking=True)
        with torch.cuda.stream(s2):
            gpu_b.copy_(host_b, non_blocking=True)
        cur.wait_stream(s1)
        cur.wait_stream(s2)

    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    w = torch.randn(14336 * 2, 4096, device=device, dtype=torch.bfloat16)

    def gemm():
        torch.mm(a, w.t())

    def gemm_with_d2h():
        cur = torch.cuda.current_stream(device)
        s1.wait_stream(cur)
        with torch.cuda.stream(s1):
            host_a.copy_(gpu_a, non_blocking=True)
        for _ in range(3):
            torch.mm(a, w.t())
        cur.wait_stream(s1)

    out = {"bytes": nbytes}
    for label, fn in (("d2h", d2h), ("h2d", h2d), ("both", both)):
        ms = _event_ms(fn)
        out[f"{label}_ms"] = ms
        out[f"{label}_gb_s"] = nbytes * (2 if label == "both" else 1) / ms / 1e6
    gemm_ms = _event_ms(gemm)
    out["gemm_ms"] = gemm_ms
    out["gemm_tflops"] = 2 * 4096 * 4096 * w.shape[0] / gemm_ms / 1e9
    out["3_gemms_with_d2h_ms"] = _event_ms(gemm_with_d2h)
    out["3_gemms_alone_ms"] = 3 * gemm_ms
    print("host link: " + ", ".join(f"{k} {v:.2f}" for k, v in out.items() if k != "bytes"), flush=True)
    return out


def run_step(model, optimizer, ids) -> tuple[float, float, float, float]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    loss.backward()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2, float(loss)


def memory_phases(model, optimizer, ids) -> dict:
    """GiB allocated at the start of a step and after each phase, and each phase's peak, plus the CUDA
    graphs' static buffers and pool (layer_graphs): where a configuration's peak comes from."""
    gib = {}
    torch.cuda.synchronize()
    gib["start"] = torch.cuda.memory_allocated() / GIB
    phases = ("forward", "backward", "optimizer")
    loss = None
    for name in phases:
        torch.cuda.reset_peak_memory_stats()
        if name == "forward":
            loss = model(input_ids=ids, labels=ids).loss
        elif name == "backward":
            loss.backward()
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        gib[f"{name}_peak"] = torch.cuda.max_memory_allocated() / GIB
        gib[f"after_{name}"] = torch.cuda.memory_allocated() / GIB
    sets = model.__dict__.get("_cuda_graph_sets") or {}
    gib["graph_static_buffers"] = sum(
        b.numel() * b.element_size() for g in sets.values() for b in g.buffers.values()
    ) / GIB
    gib["graph_pool"] = pool_bytes(model) / GIB
    return gib


def whole_step(model, optimizer, ids) -> tuple[float, float]:
    """One training step as a user runs it (no synchronisation inside): (seconds, loss)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, float(loss.detach())


def profile_step(model, optimizer, ids, trace: Path | None = None) -> dict:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        run_step(model, optimizer, ids)
        wall_ms = (time.perf_counter() - t0) * 1e3
    if trace is not None:
        # Chrome trace (kernels, CPU ops and their launch links) for a gap-by-gap reading offline.
        raw = trace.with_suffix("")
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(trace, "wb") as dst:
            dst.write(src.read())
        raw.unlink()
    per_cat: dict[str, float] = collections.defaultdict(float)
    per_kernel: dict[str, float] = collections.defaultdict(float)
    compute, copies = [], []
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        start, end = evt.time_range.start, evt.time_range.end
        if end <= start:
            continue
        cat = categorize(evt.name)
        per_cat[cat] += (end - start) / 1e3
        per_kernel[evt.name] += (end - start) / 1e3
        (copies if cat == "host copies" else compute).append((start, end))
    busy = 0.0
    last = None
    for start, end in sorted(compute):
        if last is None or start > last:
            busy += end - start
            last = end
        elif end > last:
            busy += end - last
            last = end
    span = (max(e for _, e in compute) - min(s for s, _ in compute)) / 1e3 if compute else 0.0
    return {
        "wall_ms": wall_ms,
        "kernel_span_ms": span,
        "gpu_busy_ms": busy / 1e3,
        "gpu_idle_ms": span - busy / 1e3,
        "categories_ms": dict(sorted(per_cat.items(), key=lambda kv: -kv[1])),
        "top_kernels_ms": dict(sorted(per_kernel.items(), key=lambda kv: -kv[1])[:20]),
    }


def host_profile(model, optimizer, ids) -> dict:
    """Where the host's time goes in one step: the time to enqueue it (forward, backward, optimizer,
    no synchronisation; a host that waits on the GPU inside shows it as time in a synchronising call)
    against the step's wall time, and cProfile's functions by own time. A host-bound step enqueues in
    about its wall time; a GPU-bound one well before."""
    import cProfile
    import io
    import pstats

    # Per layer of the forward: when the host finished enqueueing it (perf_counter) and when the GPU
    # finished running it (an event after it; events do not synchronise), from the step's start.
    marks: list[tuple[float, torch.cuda.Event]] = []
    real_layer_step = checkpoint_module._layer_step

    def timed_layer_step(*args):
        out = real_layer_step(*args)
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        marks.append((time.perf_counter(), event))
        return out

    checkpoint_module._layer_step = timed_layer_step
    start_event = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    start_event.record()
    try:
        loss = model(input_ids=ids, labels=ids).loss
    finally:
        checkpoint_module._layer_step = real_layer_step
    forward_issued = time.perf_counter() - t0
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    issued = time.perf_counter() - t0
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    layers = [((t - t0) * 1e3, start_event.elapsed_time(e)) for t, e in marks]
    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    profiler.enable()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    profiler.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(profiler)
    top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:30]
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(45)
    return {
        "forward_issue_ms": forward_issued * 1e3,
        "layers_host_gpu_ms": layers,
        "issue_ms": issued * 1e3,
        "wall_ms": wall * 1e3,
        "top_own_time": [
            {"function": f"{Path(f).name}:{line}({name})", "calls": nc, "own_ms": tt * 1e3, "cumulative_ms": ct * 1e3}
            for (f, line, name), (_, nc, tt, ct, _) in top
        ],
        "by_cumulative": text.getvalue(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds over the configurations")
    p.add_argument("--profile", action="store_true", help="profile one step of each configuration")
    p.add_argument("--trace", action="store_true", help="write a gzipped chrome trace of each profiled step")
    p.add_argument("--configs", default=",".join(str(i) for i in range(len(CONFIGS))), help="indices into CONFIGS")
    p.add_argument("--memory", action="store_true", help="allocated memory per phase of one step of each configuration")
    p.add_argument("--host", action="store_true", help="time the host's enqueueing of a step and cProfile it")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("qlora_step_profile needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda", torch.cuda.current_device())
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "model": MODEL,
              "batch": args.batch, "seq": args.seq}  # fmt: skip
    result["host_link"] = host_link(device)
    torch.cuda.empty_cache()

    t0 = time.perf_counter()
    model = build_random_qlora_model(MODEL, args.seq, 0, device)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, random_state=0)
    model.train()
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4, fused=True)
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated()
    result["weights_gib"] = weights / GIB
    print(f"8B QLoRA built in {time.perf_counter() - t0:.0f} s, resident {weights / GIB:.2f} GiB", flush=True)
    ids = torch.randint(3, model.spec.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    rows = []
    embed_ms = []
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.embed(ids)
        torch.cuda.synchronize()
        embed_ms.append((time.perf_counter() - t) * 1e3)
    result["embedding_gather_ms"] = embed_ms
    print(f"embedding gather on host: {[round(v, 2) for v in embed_ms]} ms", flush=True)
    result["policy_check"] = check_policies(model, ids)
    indices = [int(i) for i in args.configs.split(",")]
    # Interleaved rounds: the host of these machines drifts (the same configuration measured 362 and
    # 426 ms per step in two sessions' runs), so every configuration is timed in every round.
    samples: dict[int, list[float]] = {i: [] for i in indices}
    peaks: dict[int, int] = {i: 0 for i in indices}
    losses: dict[int, list[float]] = {i: [] for i in indices}
    for rnd in range(args.rounds):
        for index in indices:
            configure(model, index)
            for _ in range(args.warmup):
                whole_step(model, optimizer, ids)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            for _ in range(args.steps):
                seconds, loss = whole_step(model, optimizer, ids)
                samples[index].append(seconds)
                losses[index].append(loss)
            # The graphs' pool is memory max_memory_allocated does not count (layer_graphs.pool_bytes).
            peaks[index] = max(peaks[index], torch.cuda.max_memory_allocated() + pool_bytes(model))
        print(f"round {rnd}: " + ", ".join(f"{i}: {statistics.median(samples[i][-args.steps:]) * 1e3:.1f} ms"
                                          for i in indices), flush=True)  # fmt: skip
    for index in indices:
        label, mode, policy, kept = configure(model, index)
        for _ in range(args.warmup):
            run_step(model, optimizer, ids)
        split = [run_step(model, optimizer, ids) for _ in range(args.steps)]
        fwd, bwd, opt = (statistics.median(t[i] for t in split) for i in range(3))
        step = statistics.median(samples[index])
        plan = estimate_memory(model_config(MODEL), "qlora", batch=args.batch, seq=args.seq, lora_r=16,
                               gradient_checkpointing=mode, checkpoint_policy=policy, gate_up_kept_layers=kept,
                               fused_attention=not label.endswith(AUTOGRAD_ATTENTION))  # fmt: skip
        row = {"config": label, "step_ms": step * 1e3, "step_min_ms": min(samples[index]) * 1e3,
               "forward_ms": fwd * 1e3, "backward_ms": bwd * 1e3, "optimizer_ms": opt * 1e3,
               "tokens_per_s": args.batch * args.seq / step, "peak_gib": peaks[index] / GIB,
               "planner_gib": plan.total / GIB, "losses": losses[index], "step_samples_ms": [v * 1e3 for v in samples[index]]}  # fmt: skip
        trace = args.out / f"trace-{index}.json.gz" if args.trace else None
        row["profile"] = profile_step(model, optimizer, ids, trace) if args.profile else {}
        if args.memory:
            row["memory_gib"] = memory_phases(model, optimizer, ids)
            print(f"{label}: memory GiB " + ", ".join(f"{k} {v:.3f}" for k, v in row["memory_gib"].items()),
                  flush=True)  # fmt: skip
        if args.host:
            row["host"] = host_profile(model, optimizer, ids)
            host = row["host"]
            print(f"{label}: host enqueues the step in {host['issue_ms']:.1f} ms of its {host['wall_ms']:.1f} ms, "
                  f"the forward in {host['forward_issue_ms']:.1f} ms; per layer, host done / GPU done (ms):\n    "
                  + ", ".join(f"{h:.0f}/{g:.0f}" for h, g in host["layers_host_gpu_ms"]) + "\n  own time:",
                  flush=True)  # fmt: skip
            for item in row["host"]["top_own_time"][:25]:
                print(f"    {item['own_ms']:8.2f} ms own {item['cumulative_ms']:8.2f} cum {item['calls']:6d}x "
                      f"{item['function']}", flush=True)  # fmt: skip
        rows.append(row)
        prof = row["profile"]
        busy = f"  GPU busy {prof['gpu_busy_ms']:.1f} of {prof['kernel_span_ms']:.1f} ms" if prof else ""
        print(f"{label:34s} step {row['step_ms']:6.1f} ms (min {row['step_min_ms']:.1f}; synchronised fwd {fwd * 1e3:.1f},"
              f" bwd {bwd * 1e3:.1f}, opt {opt * 1e3:.1f})  {row['tokens_per_s']:7.0f} tok/s  peak {row['peak_gib']:.2f} GiB"
              f" (planner {row['planner_gib']:.2f}){busy}", flush=True)  # fmt: skip
        for cat, ms in prof.get("categories_ms", {}).items():
            print(f"    {cat:18s} {ms:8.2f} ms", flush=True)
        torch.cuda.empty_cache()
    result["rows"] = rows
    (args.out / "qlora_step_profile.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# 8B QLoRA step profile ({result['device']}, torch {result['torch']}, {args.batch} x {args.seq})",
             "", "Host link (224 MiB pinned copies): " + ", ".join(
                 f"{k} {v:.2f}" for k, v in result["host_link"].items() if k != "bytes"), "",
             f"Step: median of {args.rounds} interleaved rounds x {args.steps} steps, no synchronisation inside a step;"
             " fwd/bwd/opt: separate steps synchronised between the phases (pending host copies land in fwd).", "",
             "| config | tok/s | step ms | min ms | fwd | bwd | opt | peak GiB | planner | GPU busy ms | GPU idle ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        pr = r["profile"]
        prof_cells = f"{pr['gpu_busy_ms']:.1f} | {pr['gpu_idle_ms']:.1f}" if pr else "- | -"
        lines.append(f"| {r['config']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {r['step_min_ms']:.1f} | "
                     f"{r['forward_ms']:.1f} | {r['backward_ms']:.1f} | {r['optimizer_ms']:.1f} | {r['peak_gib']:.2f} | "
                     f"{r['planner_gib']:.2f} | {prof_cells} |")  # fmt: skip
    lines += ["", "Loss and LoRA gradients against the first configuration, same weights (`policy_check`):", "",
              "| config | loss diff | max abs grad diff |", "| --- | --- | --- |"]  # fmt: skip
    for label, c in result["policy_check"].items():
        lines.append(f"| {label} | {c['loss_diff']:.2e} | {c['max_abs_grad_diff']:.3e} |")
    cats = sorted({c for r in rows for c in r["profile"].get("categories_ms", {})})
    if cats:
        lines += ["", "GPU time per op family (ms, one profiled step):", "",
                  "| family | " + " | ".join(r["config"] for r in rows) + " |", "| --- |" + " --- |" * len(rows)]  # fmt: skip
    for c in cats:
        lines.append(f"| {c} | " + " | ".join(f"{r['profile']['categories_ms'].get(c, 0.0):.1f}" for r in rows) + " |")
    (args.out / "qlora_step_profile.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
