"""GPU check of issue #8: the phi3 float32 greedy check of `benchmarks/bench_generate.py`, run every way.

    python tests/infer/gpu_check_phi3_greedy.py --out DIR          (from the repo root; ~1 minute on an H100)

The check's phi3 model (tests/model_zoo, LongRoPE with original length 8) and prompts (row 0 left-padded,
8 columns, 24 new tokens, float32). The reference is Transformers' forward over the whole sequence at every
step (no cache: the model's own definition of the next token). Against it:
  - Transformers' cached `generate` (5.17 re-encodes only the last token where LongRoPE switches: expected
    to differ there; it is reported, not counted);
  - velotune's eager decode step (logits captured at every step), and its CUDA graph (tokens).
For every system and row it prints the first step whose token differs from the reference and the max abs
logit difference per step, with the logits recomputed by the reference on that system's own tokens (teacher
forcing), so the differences stay meaningful after a divergence; also the reference's top-2 margin at the
first divergence (a margin far above float32 noise means a real bug, not rounding). Then it runs the
benchmark's own phi3 check (`run_checks`). Writes DIR/phi3_greedy.json; exits 1 when velotune differs from
the reference or the benchmark's check fails.
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

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def reference_logits(hf, tokens: torch.Tensor, mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """[B, steps, V]: logits of the next token after every prefix prompt + tokens[:, :k], each prefix run whole
    (no cache), with Transformers generate's position ids (mask cumsum - 1)."""
    out = []
    for k in range(tokens.shape[1] - prompt_len):
        prefix = tokens[:, : prompt_len + k]
        m = torch.cat([mask, torch.ones_like(prefix[:, prompt_len:])], dim=-1)
        pos = (m.cumsum(-1) - 1).masked_fill(m == 0, 1)
        with torch.no_grad():
            out.append(
                hf(input_ids=prefix, attention_mask=m, position_ids=pos, use_cache=False)
                .logits[:, -1]
                .float()
            )
    return torch.stack(out, dim=1)


def compare(name: str, tokens, logits, ref_tokens, hf, mask, prompt_len: int) -> dict:
    """Per row: first step whose token differs from the reference, max abs logit diff per step (teacher-forced
    on `tokens`), and the reference's top-2 margin at the first difference."""
    forced = reference_logits(hf, tokens, mask, prompt_len)
    rows = []
    for r in range(tokens.shape[0]):
        got, want = tokens[r, prompt_len:].tolist(), ref_tokens[r, prompt_len:].tolist()
        first = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), None)
        row = {"row": r, "first_token_difference": first, "tokens": got}
        if logits is not None:
            diff = (logits[r] - forced[r]).abs().amax(-1)
            row["max_abs_logit_diff_per_step"] = [float(d) for d in diff]
            row["first_step_logit_diff_over_1e-4"] = next(
                (k for k, d in enumerate(diff.tolist()) if d > 1e-4), None
            )
        if first is not None:
            top = forced[r, first].topk(2)
            row["reference_top2_at_first_difference"] = {
                "tokens": top.indices.tolist(), "margin": float(top.values[0] - top.values[1]),
                "system_token": got[first],
            }  # fmt: skip
        rows.append(row)
    return {"system": name, "same_tokens": torch.equal(tokens.cpu(), ref_tokens.cpu()), "rows": rows}


def show(result: dict) -> None:
    print(f"{result['system']:>22}: {'same tokens' if result['same_tokens'] else 'DIFFERENT tokens'}")
    for row in result["rows"]:
        line = f"{'':>24}row {row['row']}: first token difference at step {row['first_token_difference']}"
        if "reference_top2_at_first_difference" in row:
            t = row["reference_top2_at_first_difference"]
            line += (
                f" (reference top-2 {t['tokens']} margin {t['margin']:.2e}, system chose {t['system_token']})"
            )
        print(line)
        if "max_abs_logit_diff_per_step" in row:
            print(f"{'':>28}max |logit diff| per step: "
                  + " ".join(f"{d:.0e}" for d in row["max_abs_logit_diff_per_step"]))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    import transformers

    import velotune
    from benchmarks.bench_generate import CHECK_NEW_TOKENS, CHECK_PROMPTS, reference_greedy, run_checks
    from tests.model_zoo import save_hf_model
    from velotune.infer import decode

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    head = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "kernels": os.environ.get("VELOTUNE_KERNELS", "auto"),
    }  # fmt: skip
    print(json.dumps(head))
    ids = torch.tensor(CHECK_PROMPTS, device=device)
    mask = (ids != 0).long()
    n, prompt_len = CHECK_NEW_TOKENS, ids.shape[1]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "phi3")
        hf = save_hf_model("phi3", folder).to(device)
        ours, _ = velotune.FastLanguageModel.from_pretrained(folder, dtype=torch.float32, device_map=str(device),
                                                             progress=False)  # fmt: skip
        kw = dict(eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        ref = reference_greedy(hf, ids, mask, n, **kw)
        ref_tokens = ref.sequences
        # The reference against itself, teacher-forced: shows the recomputation reproduces generate (diff ~0).
        results.append(compare("transformers_no_cache", ref_tokens, torch.stack(ref.logits, 1).float(), ref_tokens,
                               hf, mask, prompt_len))  # fmt: skip
        cached = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, **kw)
        results.append(compare("transformers_cached", cached.sequences, torch.stack(cached.logits, 1).float(),
                               ref_tokens, hf, mask, prompt_len))  # fmt: skip

        captured: list[torch.Tensor] = []
        original_choose = decode.StaticDecoder.choose

        def choose(self, logits):  # every step's logits, eager steps only (a graph replay runs no Python)
            captured.append(logits.detach().clone())
            return original_choose(self, logits)

        decode.StaticDecoder.choose = choose
        try:
            eager = ours.generate(ids, attention_mask=mask, max_new_tokens=n, use_cuda_graph=False)
        finally:
            decode.StaticDecoder.choose = original_choose
        results.append(
            compare("velotune_eager", eager, torch.stack(captured, 1), ref_tokens, hf, mask, prompt_len)
        )
        if cuda:
            graph = ours.generate(ids, attention_mask=mask, max_new_tokens=n, use_cuda_graph=True)
            results.append(compare("velotune_graph", graph, None, ref_tokens, hf, mask, prompt_len))
        del hf, ours
    print(f"reference: Transformers without cache, tokens {ref_tokens[:, prompt_len:].tolist()}")
    for result in results:
        show(result)
    checks = run_checks(device, families=("phi3",), qlora=False)
    velotune_ok = all(r["same_tokens"] for r in results if r["system"].startswith("velotune"))
    checks_ok = all(c["ok"] for c in checks)
    summary = {**head, "velotune_equals_reference": velotune_ok, "benchmark_checks_ok": checks_ok,
               "transformers_cached_equals_reference": results[1]["same_tokens"], "seconds": time.time() - start,
               "results": results, "benchmark_checks": checks}  # fmt: skip
    (args.out / "phi3_greedy.json").write_text(json.dumps(summary, indent=1))
    print(f"velotune == reference: {velotune_ok}; Transformers cached == reference: "
          f"{results[1]['same_tokens']}; benchmark phi3 checks: {'ok' if checks_ok else 'FAILED'}; "
          f"{time.time() - start:.0f} s; {args.out / 'phi3_greedy.json'}")  # fmt: skip
    return 0 if velotune_ok and checks_ok else 1


if __name__ == "__main__":
    sys.exit(main())
