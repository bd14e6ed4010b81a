"""One system's training-step benchmark, run in its own process by `benchmarks.train_step`.

Usage: python -m benchmarks.worker SPEC.json   (writes the result JSON to spec["result_path"])

Nothing heavy is imported at module level: for the Unsloth system `unsloth` must be imported
before `torch` (it patches Transformers and PEFT on import).
"""

from __future__ import annotations

import gc
import json
import sys
import time
import traceback
from typing import Any


def error_record(exc: BaseException, phase: str) -> dict[str, Any]:
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    tail = "".join(lines).rstrip().splitlines()[-25:]
    return {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins."),
        "message": str(exc)[:4000],
        "phase": phase,
        "traceback_tail": tail,
    }


def train_loop(model: Any, spec: dict[str, Any], result: dict[str, Any]) -> None:
    """Warm-up and timed steps; fills `result` as it goes (so a failure mid-run keeps what was measured)."""
    import statistics

    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    tokens = torch.load(spec["tokens_path"])  # [warmup + steps, batch, seq] int64
    params = [p for p in model.parameters() if p.requires_grad]
    result["trainable_params"] = sum(p.numel() for p in params)
    result["total_params"] = sum(p.numel() for p in model.parameters())
    if not params:
        raise RuntimeError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=spec["lr"], **({"fused": True} if cuda else {}))

    if cuda:
        torch.cuda.synchronize()
        result["weights_bytes"] = torch.cuda.memory_allocated()
        result["load_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    n_steps = spec["warmup"] + spec["steps"]
    losses: list[float] = []
    times: list[float] = []
    for step in range(n_steps):
        result["phase"] = f"step {step}"
        ids = tokens[step].to(device, non_blocking=True)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        loss = out.loss
        del out  # Transformers returns the logits too; keeping them alive into the next step would be unfair
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach().float().item()))
        result["losses"] = losses
        result["step_times_s"] = times

    timed = times[spec["warmup"] :]
    median = statistics.median(timed)
    result["step_time_median_s"] = median
    result["tokens_per_s"] = spec["batch"] * spec["seq"] / median
    result["loss_first"] = losses[0]
    result["loss_last"] = losses[-1]
    if cuda:
        result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated() + _graph_pool_bytes(model, result)
        result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        result["above_weights_bytes"] = result["peak_allocated_bytes"] - result["weights_bytes"]


def _graph_pool_bytes(model, result: dict[str, Any]) -> int:
    """velotune's CUDA graph pools: memory max_memory_allocated misses (velotune.memory.layer_graphs.pool_bytes),
    added to the peak so that a graphed step is compared by its real footprint."""
    if not hasattr(model, "cuda_graphs"):
        return 0
    from velotune.memory.layer_graphs import pool_bytes

    result["graph_pool_bytes"] = pool_bytes(model)
    return result["graph_pool_bytes"]


def run(spec: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"status": "error", "phase": "import"}
    try:
        if spec["system"] == "unsloth":
            import unsloth  # noqa: F401  (first, before torch)
        import torch

        from benchmarks import systems

        torch.manual_seed(spec["seed"])
        result["phase"] = "load"
        start = time.perf_counter()
        model, notes = systems.LOADERS[spec["system"]](spec)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        result["load_s"] = time.perf_counter() - start
        result.update(notes)
        runs = spec.get("batches")
        if not runs:
            train_loop(model, spec, result)
            result["status"] = "ok"
            result.pop("phase", None)
        else:
            # Several batch sizes on one loaded model (loading an 8B model costs more than its steps):
            # one record per batch size, each with its own optimizer and peak-memory window.
            base = dict(result)
            result["runs"] = []
            for run_spec in runs:
                one = dict(base)
                result["runs"].append(one)
                try:
                    train_loop(model, dict(spec, **run_spec), one)
                    one["status"] = "ok"
                    one.pop("phase", None)
                except torch.OutOfMemoryError as exc:
                    one["error"] = error_record(exc, one.get("phase", "?"))
                    one["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
            result["status"] = "ok"
            result.pop("phase", None)
    except BaseException as exc:  # the record must be written whatever happened (OOM, import errors, ...)
        # Matched by name: importing benchmarks.systems here could itself fail (it imports torch).
        if type(exc).__name__ == "NotApplicable":
            result.update(status="skipped", skip_reason=str(exc))
        else:
            result["error"] = error_record(exc, result.get("phase", "?"))
            try:
                import torch

                if torch.cuda.is_available():
                    result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
                    result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
            except Exception:
                pass
        if isinstance(exc, KeyboardInterrupt):
            raise
    return result


def main(argv: list[str]) -> int:
    with open(argv[0]) as f:
        spec = json.load(f)
    result = run(spec)
    with open(spec["result_path"], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
