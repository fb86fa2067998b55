"""The ``rfmpc`` command line: ``demo | generate | switch | restore | convert | cache | bench``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _print(obj: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj))
    else:
        for k, v in obj.items():
            print(f"{k}: {v}")


def cmd_demo(args) -> int:
    from rfmpc.demo_gmm import run_gmm_demo

    out = Path(args.out)
    summary = run_gmm_demo(out, steps=args.steps, seed=args.seed)
    _print(summary, args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rfmpc", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the end-to-end demo and write PNGs + a summary")
    d.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    d.add_argument("--steps", type=int, default=28)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    d.set_defaults(func=cmd_demo)
    from rfmpc.cache.cli import add_cache_parser

    add_cache_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"rfmpc {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
