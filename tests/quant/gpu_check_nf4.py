"""GPU check of NF4 / QLoRA (issue 5): compiled-kernel numerics, dequantization bandwidth against
bitsandbytes, and peak memory while loading a Llama-3.1-8B-shaped random checkpoint in 4 bits and
running QLoRA steps on it.

Not collected by pytest (it needs CUDA). Run from the repo root:

    python tests/quant/gpu_check_nf4.py --out benchmarks/results/nf4 [--sections kernels,bandwidth,qlora]
        [--model llama-3.1-8b] [--cache-dir /tmp/velotune-ckpt] [--batch 2 --seq 2048 --steps 3]

Sections:
  kernels    quantize/dequantize through the compiled Triton kernels (bf16, fp16, fp32 inputs; bf16,
             fp16, fp32 outputs) equal the PyTorch reference bit for bit, and equal bitsandbytes' CUDA
             quantize_4bit / dequantize_4bit (packed bytes, scales, 8-bit absmax codes, values);
             NF4Weight's GEMMs equal the same GEMMs on the dequantized weight.
  bandwidth  dequantization of the 8B / 70B projection shapes to bf16: ours vs
             bitsandbytes.functional.dequantize_4bit (median of CUDA-event timings, GB/s over the
             floor bytes), with a sweep of elements per program and warps; goal >= 1.5x bitsandbytes.
  qlora      (in a subprocess, for clean memory counters) builds the random bf16 checkpoint of --model
             on disk one shard at a time (cached in --cache-dir), loads it with load_in_4bit=True
             (peak memory of the load vs the resident 4-bit model + the largest 16-bit tensor), then
             r=16 LoRA on all seven projections and --steps training steps at --batch x --seq (AdamW):
             step time, tokens/s, peak memory; and a bf16 numerics check of a small 4-bit model's
             loss and LoRA gradients against the same model computing with dense dequantized weights.

Prints a short table per section and writes <out>/nf4_gpu_check.json (+ .md). Exit status 1 when a
numeric check fails. `--smoke` runs tiny sizes (works on the CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from velotune.quant import nf4  # noqa: E402
from velotune.quant.nf4 import (  # noqa: E402
    NF4Tensor,
    absmax_float32,
    dequantize_nf4_reference,
    dequantize_nf4_triton,
    quantize_nf4_reference,
    quantize_nf4_triton,
)
from velotune.quant.nf4_weight import NF4Weight  # noqa: E402

GIB = 2**30


def _bnb():
    try:
        import bitsandbytes.functional as bnbf

        return bnbf
    except Exception as exc:  # reported, and the comparisons that need it are skipped
        print(f"bitsandbytes unavailable ({type(exc).__name__}: {exc}); its comparisons are skipped")
        return None


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time_ms(fn, dev, iters: int) -> float:
    """Median milliseconds of fn() (CUDA events on the GPU, wall clock elsewhere)."""
    for _ in range(3):
        fn()
    _sync(dev)
    times = []
    for _ in range(iters):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def _from_bnb(packed, state) -> NF4Tensor:
    nested = state.state2
    return NF4Tensor(
        data=packed.view(-1), absmax=state.absmax, code=state.code, shape=state.shape, dtype=state.dtype,
        blocksize=state.blocksize, nested_absmax=None if nested is None else nested.absmax,
        nested_code=None if nested is None else nested.code, nested_offset=state.offset,
        nested_blocksize=256 if nested is None else nested.blocksize,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------- kernels


def check_kernels(dev, smoke: bool) -> list[dict]:
    bnbf = _bnb() if dev.type == "cuda" else None
    shapes = (
        [(37, 130), (1, 7), (64, 256)]
        if smoke
        else [(4096, 4096), (1024, 4096), (14336, 4096), (333, 777), (1, 7)]
    )
    rows = []
    for shape in shapes:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            gen = torch.Generator(device=dev).manual_seed(hash(shape) % 2**31)
            w = (torch.randn(shape, generator=gen, device=dev) * 0.02).to(dtype)
            row = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}
            ref, tri = quantize_nf4_reference(w), quantize_nf4_triton(w)
            row["quantize_equal_reference"] = all(
                torch.equal(getattr(tri, f), getattr(ref, f))
                for f in ("data", "absmax", "nested_absmax", "nested_offset")
            )
            for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
                key = f"dequant_{str(out_dtype)[6:]}_equal_reference"
                if dev.type != "cuda" and out_dtype == torch.bfloat16:
                    row[key] = "n/a: the interpreter truncates to bf16"
                    continue
                got = dequantize_nf4_triton(tri, out_dtype)
                row[key] = torch.equal(got, dequantize_nf4_reference(tri, out_dtype))
            if bnbf is not None:
                packed, state = bnbf.quantize_4bit(
                    w, blocksize=64, compress_statistics=True, quant_type="nf4"
                )
                row["bnb_packed_equal"] = torch.equal(packed.view(-1), tri.data)
                row["bnb_packed_byte_mismatches"] = int((packed.view(-1) != tri.data).sum())
                row["bnb_offset_equal"] = torch.equal(state.offset.reshape(()), tri.nested_offset.reshape(()))
                row["bnb_nested_absmax_equal"] = torch.equal(state.state2.absmax, tri.nested_absmax)
                theirs = _from_bnb(packed, state)
                # Codes may differ only where the values cannot (a single block: bitsandbytes scales 0/0).
                row["bnb_absmax_code_mismatches"] = int((state.absmax != tri.absmax).sum())
                row["bnb_absmax_values_equal"] = torch.equal(absmax_float32(theirs), absmax_float32(tri))
                row["bnb_dequant_equal"] = torch.equal(
                    bnbf.dequantize_4bit(packed, state), dequantize_nf4_triton(theirs)
                )
                packed1, state1 = bnbf.quantize_4bit(
                    w, blocksize=64, compress_statistics=False, quant_type="nf4"
                )
                ours1 = quantize_nf4_triton(w, double_quant=False)
                row["bnb_single_quant_equal"] = torch.equal(packed1.view(-1), ours1.data) and torch.equal(
                    state1.absmax, ours1.absmax
                )
            rows.append(row)
    # NF4Weight's per-part GEMMs against the same GEMMs on its dense weight (bf16, cuBLAS both).
    out_f, in_f, t = (88, 128, 9) if smoke else (6144, 4096, 4096)
    parts = [
        (0, out_f * 2 // 3),
        (out_f * 2 // 3, out_f // 6),
        (out_f * 2 // 3 + out_f // 6, out_f - out_f * 2 // 3 - out_f // 6),
    ]
    weight = NF4Weight(out_f, in_f, torch.bfloat16, device=dev)
    for row0, n in parts:
        weight.set_part(
            row0, quantize_nf4_triton(torch.randn(n, in_f, device=dev, dtype=torch.bfloat16) * 0.02)
        )
    dense = weight.dequantize()
    x = torch.randn(t, in_f, device=dev, dtype=torch.bfloat16)
    dy = torch.randn(t, out_f, device=dev, dtype=torch.bfloat16)
    # The folded LoRA product: x_wide @ [W | cols]^T, W dequantized into the first columns of wider
    # scratch rows (whole here, and part by part), and that dequantization alone, bit for bit.
    x_wide = torch.randn(t, in_f + 48, device=dev, dtype=torch.bfloat16)
    cols = torch.randn(out_f, 48, device=dev, dtype=torch.bfloat16) * 0.02
    folded_want = x_wide @ torch.cat((dense, cols), 1).t()
    folded = {}
    for limit in (0, weight.numel()):
        weight.whole_numel_limit = limit
        folded[limit] = _rel(weight.linear_folded(x_wide, cols), folded_want)
    # bf16 on the GPU; float32 under the interpreter, which truncates to bf16 instead of rounding.
    strided_dtype = torch.bfloat16 if torch.device(dev).type == "cuda" else torch.float32
    wide_rows = torch.full((parts[0][1], in_f + 48), float("nan"), device=dev, dtype=strided_dtype)
    q0 = weight.parts()[0][1]
    dequantize_nf4_triton(q0, out=wide_rows[:, :in_f])
    rows.append({
        "shape": [out_f, in_f], "dtype": "NF4Weight bf16, 3 parts",
        "linear_rel_err": _rel(weight.linear(x), x @ dense.t()),
        "grad_input_rel_err": _rel(weight.grad_input(dy), dy @ dense),
        "linear_folded_by_part_rel_err": folded[0],
        "linear_folded_whole_rel_err": folded[weight.numel()],
        "dequant_strided_equal_reference": bool(
            torch.equal(wide_rows[:, :in_f], dequantize_nf4_reference(q0, strided_dtype))
            and wide_rows[:, in_f:].isnan().all()
        ),
    })  # fmt: skip
    return rows


# What must hold on the GPU: our compiled kernels equal the reference (which equals bitsandbytes' CPU
# ops bit for bit, tests/quant/test_nf4.py), and bitsandbytes' CUDA tensors decode through our kernels
# to exactly bitsandbytes' own dequantization (the format converts both ways without loss). Whether
# bitsandbytes' CUDA *quantizer* picks the same codes is recorded, not required: it is built with
# --use_fast_math (approximate reciprocal), so elements within an ulp of a threshold can land on the
# neighbouring code (velotune/quant/nf4.py's docstring).
REQUIRED_EQUAL = (
    "quantize_equal_reference",
    "dequant_bfloat16_equal_reference",
    "dequant_float16_equal_reference",
    "dequant_float32_equal_reference",
    "bnb_dequant_equal",
    "bnb_offset_equal",
    "dequant_strided_equal_reference",
)


def kernels_ok(rows: list[dict]) -> bool:
    ok = True
    for row in rows:
        for key, value in row.items():
            if key in REQUIRED_EQUAL and value is False:
                ok = False
            if key.endswith("rel_err") and value > 1e-2:
                ok = False
    return ok


# --------------------------------------------------------------------------------------- bandwidth


def _floor_bytes(q: NF4Tensor, out_bytes: int) -> int:
    return (
        q.data.numel()
        + q.absmax.numel() * q.absmax.element_size()
        + q.nested_absmax.numel() * 4
        + q.numel() * out_bytes
    )


def check_bandwidth(dev, smoke: bool, iters: int) -> tuple[list[dict], list[dict]]:
    bnbf = _bnb() if dev.type == "cuda" else None
    shapes = {
        "8b q/o_proj": (4096, 4096), "8b k/v_proj": (1024, 4096), "8b gate/up_proj": (14336, 4096),
        "8b down_proj": (4096, 14336), "70b gate/up_proj": (28672, 8192),
    }  # fmt: skip
    if smoke:
        shapes = {"smoke": (128, 256)}
    rows, sweep = [], []
    for name, shape in shapes.items():
        w = torch.randn(shape, device=dev, dtype=torch.bfloat16) * 0.02
        q = quantize_nf4_triton(w)
        bnb_state = None
        if bnbf is not None:
            bnb_state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        del w
        out = torch.empty(shape, device=dev, dtype=torch.bfloat16)
        floor = _floor_bytes(q, 2)
        ms = _time_ms(functools.partial(dequantize_nf4_triton, q, out=out), dev, iters)
        row = {"weight": name, "shape": list(shape), "ours_ms": ms, "ours_GBps": floor / ms / 1e6}
        if bnb_state is not None:
            packed, state = bnb_state
            out2 = torch.empty_like(out)
            bnb_ms = _time_ms(functools.partial(bnbf.dequantize_4bit, packed, state, out=out2), dev, iters)
            row.update(bnb_ms=bnb_ms, bnb_GBps=floor / bnb_ms / 1e6, speedup=bnb_ms / ms)
            del packed, state, out2
        rows.append(row)
        if name in ("8b gate/up_proj", "smoke"):
            # A short sweep; tests/quant/gpu_sweep_nf4_dequant.py times every candidate on every shape.
            for elements in (1024, 2048, 4096, 8192, 16384):
                for warps in (2, 4, 8):
                    launch = nf4.DequantLaunch(elements_per_program=elements, num_warps=warps)
                    ok = (
                        torch.equal(
                            dequantize_nf4_triton(q, launch=launch),
                            dequantize_nf4_reference(q, torch.bfloat16),
                        )
                        if dev.type == "cuda"
                        else True
                    )
                    t = _time_ms(
                        functools.partial(dequantize_nf4_triton, q, out=out, launch=launch), dev, iters
                    )
                    sweep.append(
                        {
                            "elements_per_program": elements,
                            "warps": warps,
                            "ms": t,
                            "GBps": floor / t / 1e6,
                            "exact": ok,
                        }
                    )
    return rows, sweep


# ------------------------------------------------------------------------------------------- qlora


def _qlora_worker(args) -> dict:
    """Runs in its own process: load 4-bit + QLoRA steps on the big shape, then the small bf16 check."""
    import velotune
    from benchmarks.shapes import LORA_TARGETS, model_config
    from benchmarks.train_step import build_random_checkpoint

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.type == "cuda"
    result: dict = {"model": args.model, "batch": args.batch, "seq": args.seq}
    cache = Path(args.cache_dir)
    folder = cache / f"{args.model}-random-bf16"
    if not (folder / "COMPLETE").exists():
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        build_random_checkpoint(model_config(args.model), folder, seed=0, device=dev)
        (folder / "COMPLETE").write_text("ok\n")
        result["build_s"] = time.perf_counter() - t0
    from velotune.io.hf_folder import weight_files
    from velotune.io.safetensors_reader import read_header

    largest_projection = max(
        2 * int(torch.Size(info["shape"]).numel())
        for path in weight_files(str(folder)).paths
        for name, info in read_header(path).items()
        if name.endswith("proj.weight")
    )
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model, _ = velotune.FastLanguageModel.from_pretrained(
        str(folder), dtype=torch.bfloat16, load_in_4bit=True, max_seq_length=args.seq, progress=False
    )
    result["load_s"] = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize()
        result["resident_after_load_GiB"] = torch.cuda.memory_allocated() / GIB
        result["peak_during_load_GiB"] = torch.cuda.max_memory_allocated() / GIB
        result["largest_16bit_projection_GiB"] = largest_projection / GIB
        result["load_peak_minus_resident_GiB"] = (
            result["peak_during_load_GiB"] - result["resident_after_load_GiB"]
        )
        # Goal: the load never holds more than one 16-bit tensor (+ its quantization buffers) beyond the model.
        result["load_peak_ok"] = (
            result["load_peak_minus_resident_GiB"] <= 1.2 * largest_projection / GIB + 0.05
        )
    nf4_bytes = sum(
        m.weight.nbytes() for m in model.modules() if isinstance(getattr(m, "weight", None), NF4Weight)
    )
    result["nf4_weights_GiB"] = nf4_bytes / GIB
    model = velotune.FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=16,
        target_modules=list(LORA_TARGETS),
        use_gradient_checkpointing=args.checkpointing,
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    vocab = model.spec.vocab_size
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=gen) for _ in range(args.steps + 1)]
    times, losses = [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i, ids in enumerate(batches):
        ids = ids.to(dev)
        _sync(dev)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(dev)
        if i > 0:  # the first step compiles the kernels
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    step_s = sorted(times)[len(times) // 2]
    result.update(step_s=step_s, tokens_per_s=args.batch * args.seq / step_s, losses=losses,
                  checkpointing=str(args.checkpointing))  # fmt: skip
    if cuda:
        result["peak_training_GiB"] = torch.cuda.max_memory_allocated() / GIB
        result["peak_reserved_GiB"] = torch.cuda.max_memory_reserved() / GIB
    del model, opt, params
    result["small_model_bf16"] = _small_model_check(dev, Path(args.cache_dir))
    return result


def _small_model_check(dev, cache: Path) -> dict:
    """A small 4-bit Llama (Triton path, scratch-buffer GEMMs) against the same model computing with
    dense dequantized bf16 weights: loss and LoRA gradients, bf16."""
    import transformers

    import velotune
    from velotune.lora import adapter_tensors

    folder = Path(tempfile.mkdtemp(dir=cache))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, head_dim=64)  # fmt: skip
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    kw = dict(dtype=torch.bfloat16, device_map=str(dev), progress=False)
    q4, _ = velotune.FastLanguageModel.from_pretrained(str(folder), load_in_4bit=True, **kw)
    dense, _ = velotune.FastLanguageModel.from_pretrained(str(folder), **kw)
    with torch.no_grad():
        for name, module in q4.named_modules():
            if isinstance(getattr(module, "weight", None), NF4Weight):
                dense.get_submodule(name).weight.copy_(module.weight.dequantize())
    out = {}
    grads = []
    ids = torch.randint(0, 1000, (2, 256), generator=torch.Generator().manual_seed(1)).to(dev)
    for model in (q4, dense):
        model = velotune.FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0,
                                                          use_gradient_checkpointing=False)  # fmt: skip
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if ".lora_B." in pname:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)).to(p) * 0.05)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append((float(loss), adapter_tensors(model, grad=True)))
    (l4, g4), (ld, gd) = grads
    out["loss_4bit"], out["loss_dense"] = l4, ld
    out["loss_rel_err"] = abs(l4 - ld) / abs(ld)
    out["max_lora_grad_rel_err"] = max(_rel(g4[k], gd[k]) for k in gd)
    out["ok"] = out["loss_rel_err"] < 1e-2 and out["max_lora_grad_rel_err"] < 5e-2
    return out


def run_qlora(args) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--cache-dir", args.cache_dir,
           "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
           "--checkpointing", str(args.checkpointing)]  # fmt: skip
    with tempfile.NamedTemporaryFile("r", suffix=".json") as f:
        proc = subprocess.run(cmd + ["--worker-out", f.name], cwd=REPO)
        if proc.returncode != 0:
            return {"error": f"worker exited with {proc.returncode} (see its output above)"}
        return json.load(open(f.name))


# -------------------------------------------------------------------------------------------- main


def _table(rows: list[dict], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = []
        for k in keys:
            v = row.get(k, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/nf4")
    ap.add_argument("--sections", default="kernels,bandwidth,qlora")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "velotune-ckpt"))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument(
        "--checkpointing", default="offload", help="use_gradient_checkpointing: offload, True, False"
    )
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU under TRITON_INTERPRET=1 works)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.checkpointing = {"True": True, "False": False}.get(args.checkpointing, args.checkpointing)
    Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(_qlora_worker(args)))
        return 0

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.iters, args.model, args.seq, args.steps = 3, "tiny-llama", 64, 2
    sections = set(args.sections.split(","))
    report: dict = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                    "torch": torch.__version__, "triton": __import__("triton").__version__}  # fmt: skip
    md, ok = [f"# NF4 GPU check on {report['device']}", ""], True
    if "kernels" in sections:
        rows = check_kernels(dev, args.smoke)
        report["kernels"], report["kernels_ok"] = rows, kernels_ok(rows)
        ok &= report["kernels_ok"]
        keys = sorted({k for r in rows for k in r})
        md += [
            f"## kernels: {'all equal' if report['kernels_ok'] else 'MISMATCH'}",
            "",
            _table(rows, keys),
            "",
        ]
    if "bandwidth" in sections:
        rows, sweep = check_bandwidth(dev, args.smoke, args.iters)
        report["bandwidth"], report["dequant_sweep"] = rows, sweep
        md += ["## dequantize to bf16 (goal: >= 1.5x bitsandbytes)", "",
               _table(rows, ["weight", "shape", "ours_ms", "ours_GBps", "bnb_ms", "bnb_GBps", "speedup"]), "",
               "sweep (8b gate/up):", "", _table(sweep, ["elements_per_program", "warps", "ms", "GBps", "exact"]), ""]  # fmt: skip
        ok &= all(r["exact"] for r in sweep)
    if "qlora" in sections:
        res = run_qlora(args)
        report["qlora"] = res
        ok &= (
            "error" not in res
            and res.get("load_peak_ok", True)
            and res.get("small_model_bf16", {}).get("ok", False)
        )
        md += [f"## load_in_4bit + QLoRA step, {args.model}, batch {args.batch} x {args.seq}", "",
               "```", json.dumps(res, indent=1), "```", ""]  # fmt: skip
    report["ok"] = bool(ok)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "nf4_gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "nf4_gpu_check.md").write_text("\n".join(md))
    print("\n".join(md))
    print(f"overall: {'OK' if ok else 'FAILED'}; wrote {out / 'nf4_gpu_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
