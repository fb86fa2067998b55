"""The ``rfmpc`` command line: ``demo | generate | switch | restore | convert | cache``.

One module per subcommand (``rfmpc.cli.generate``, ``.switch``, ``.cache``, ``.restore``); this
module builds the parser and dispatches. Nothing below the CLI package imports it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rfmpc.cli._common import emit
from rfmpc.cli.cache import add_cache_parser
from rfmpc.cli.generate import add_generate_parser
from rfmpc.cli.restore import add_restore_parser
from rfmpc.cli.switch import CONTROLLERS, add_switch_parser

__all__ = ["CONTROLLERS", "build_parser", "main"]


def cmd_demo(args) -> int:
    from rfmpc.pipeline import EMBEDDED_DIR

    out = Path(args.out)
    if (EMBEDDED_DIR / "model_index.json").is_file() and not args.analytic:
        from rfmpc.demo import run_demo

        summary = run_demo(out, steps=args.steps, seed=args.seed, progress=not args.json)
        if not args.json:
            print((out / "summary.txt").read_text(), end="")
            return 0
    else:
        from rfmpc.demo_gmm import run_gmm_demo

        summary = run_gmm_demo(out, steps=args.steps, seed=args.seed)
    emit(summary, args.json)
    return 0


def cmd_convert(args) -> int:
    import time

    import jax.numpy as jnp

    from rfmpc.convert import convert_folder

    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
    t0 = time.perf_counter()
    out = convert_folder(
        args.src,
        args.dst,
        dtype=dtypes[args.dtype],
        overwrite=args.overwrite,
        log=None if args.json else print,
    )
    emit(
        {
            "src": args.src,
            "dst": str(out),
            "dtype": args.dtype,
            "seconds": time.perf_counter() - t0,
        },
        args.json,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rfmpc", description=__doc__)
    p.add_argument(
        "--compilation-cache",
        metavar="DIR",
        default=None,
        help="persistent XLA compilation cache folder, reused across runs "
        "(default: $RFMPC_COMPILATION_CACHE if set, else off)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the end-to-end demo and write PNGs + a summary")
    d.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    d.add_argument("--steps", type=int, default=28)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    d.add_argument(
        "--analytic",
        action="store_true",
        help="run the analytic Gaussian-mixture demo instead of the embedded model",
    )
    d.set_defaults(func=cmd_demo)

    add_generate_parser(sub)

    c = sub.add_parser("convert", help="diffusers SD3 folder -> rfmpc-format folder")
    c.add_argument("src", help="diffusers StableDiffusion3Pipeline folder or transformer folder")
    c.add_argument("dst", help="output folder")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_convert)
    add_cache_parser(sub)
    add_switch_parser(sub)
    add_restore_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    import os

    args = build_parser().parse_args(argv)
    try:
        cache_dir = args.compilation_cache or os.environ.get("RFMPC_COMPILATION_CACHE")
        if cache_dir:
            from rfmpc.compilation import enable_compilation_cache

            enable_compilation_cache(cache_dir)
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"rfmpc {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
