"""The `velotune` command: quickstart, train, plan, export, env."""

from __future__ import annotations

import argparse
import logging
import platform
import sys


def _env(_: argparse.Namespace) -> int:
    import torch
    import transformers

    import velotune

    rows = [
        ("velotune", velotune.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("transformers", transformers.__version__),
        ("cuda", torch.version.cuda or "none"),
        ("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"),
    ]
    try:
        import triton

        rows.append(("triton", triton.__version__))
    except ImportError:
        rows.append(("triton", "not installed"))
    for key, value in rows:
        sys.stdout.write(f"{key:>13}: {value}\n")
    return 0


def _train(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from velotune.train.config import load_config, run
    from velotune.train.distributed import ranks_from_env

    config = load_config(args.config, args.overrides)
    with logging_redirect_tqdm():
        folder = run(config)
    if ranks_from_env().is_main:
        sys.stdout.write(f"saved the trained result to {folder}\n")
    return 0


def _export(args: argparse.Namespace) -> int:
    import velotune

    model, tokenizer = velotune.FastLanguageModel.from_pretrained(args.model, max_seq_length=None, dtype=args.dtype)
    if args.adapter:
        model.load_adapter(args.adapter)
    if args.to == "gguf":
        model.save_pretrained_gguf(args.out, tokenizer, quantization_method=args.quant)
    else:
        model.save_pretrained_merged(args.out, tokenizer, save_method={"merged": "merged_16bit"}.get(args.to, args.to))
    sys.stdout.write(f"wrote {args.to} export to {args.out}\n")
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from velotune.quickstart import run

    with logging_redirect_tqdm():
        result = run(args.output_dir, args.max_steps, say=lambda line: sys.stdout.write(line + "\n"))
    return 0 if result["right"] > 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="velotune", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser(
        "quickstart",
        help="build a tiny model locally, fine-tune it with LoRA on a made-up task, show what it learned",
    )
    q.add_argument("--output-dir", default="quickstart_out")
    q.add_argument("--max-steps", type=int, default=120)
    q.set_defaults(func=_quickstart)
    t = sub.add_parser(
        "train",
        help="train from a YAML config (see velotune/train/config.py for the schema)",
        epilog="Any --section.key=value after the config overrides that YAML value, e.g. --training.max_steps=100.",
    )
    t.add_argument("config", help="path of the YAML config")
    # The `deepspeed` launcher appends --local_rank=N; the rank is read from the environment (LOCAL_RANK).
    t.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    t.set_defaults(func=_train)
    from velotune.memory.planner import add_plan_command

    add_plan_command(sub)
    x = sub.add_parser("export", help="write a model (+ adapter) as a merged HF folder, a PEFT adapter or GGUF")
    x.add_argument("model", help="model folder (or an adapter folder whose config names its base)")
    x.add_argument("--to", choices=("merged", "lora", "gguf"), default="merged")
    x.add_argument("--out", required=True, help="output folder")
    x.add_argument("--adapter", default=None, help="PEFT adapter folder to apply first")
    x.add_argument("--quant", default="f16", help="GGUF type: f32, f16, bf16, q8_0, q4_k_m, ...")
    x.add_argument("--dtype", default=None, help="load dtype (default: bf16 on GPU, float32 on CPU)")
    x.set_defaults(func=_export)
    e = sub.add_parser("env", help="versions and device")
    e.set_defaults(func=_env)
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":
        bad = [a for a in extra if not (a.startswith("--") and "=" in a)]
        if bad:
            parser.error(f"train overrides look like --section.key=value; got {' '.join(bad)}")
        args.overrides = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    from velotune.errors import TrainingInterrupted, VelotuneError

    try:
        return args.func(args)
    except TrainingInterrupted as exc:  # a clean stop: the message says how to resume
        sys.stderr.write(f"velotune {args.command}: {exc}\n")
        return 128 + exc.signal  # the shell's convention for "ended by a signal"
    except VelotuneError as exc:  # a typed error already says what to do: no traceback unless asked
        if args.verbose:
            raise
        sys.stderr.write(f"velotune {args.command}: {type(exc).__name__}: {exc}\n")
        return 2
