"""The `velotune` command: quickstart, env."""

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


def _quickstart(args: argparse.Namespace) -> int:
    from velotune.quickstart import run

    text = run(args.output_dir, args.prompt, args.max_new_tokens)
    sys.stdout.write(f"\n--- generation ---\n{text}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="velotune", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quickstart", help="build a tiny model locally, load it through velotune, generate")
    q.add_argument("--output-dir", default="quickstart_out")
    q.add_argument("--prompt", default="A LoRA adapter")
    q.add_argument("--max-new-tokens", type=int, default=24)
    q.set_defaults(func=_quickstart)
    e = sub.add_parser("env", help="versions and device")
    e.set_defaults(func=_env)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)
