"""The ``rfmpc`` command line: ``demo | generate | switch | restore | convert | cache``."""

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
    _print(summary, args.json)
    return 0


def cmd_generate(args) -> int:
    import time

    if args.out and Path(args.out).suffix.lower() != ".png":
        raise ValueError(
            f"--out {args.out}: the grid is written as a PNG; give a path ending in .png"
        )

    import jax.numpy as jnp
    import numpy as np

    from rfmpc.compilation import CompileStats
    from rfmpc.pipeline import load_pipeline
    from rfmpc.viz import save_grid

    t0 = time.perf_counter()
    pipe = load_pipeline(args.model, dtype=jnp.dtype(args.dtype))
    t_load = time.perf_counter() - t0
    with CompileStats() as stats:
        out = pipe(
            args.prompt,
            negative_prompt=args.negative_prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            height=args.height,
            width=args.width,
            seed=args.seed,
            progress=not args.json,
        )
    rec = {
        "model": pipe.model_id,
        "prompts": args.prompt,
        "seed": args.seed,
        "steps": args.steps if args.steps is not None else pipe.default_steps,
        "guidance": args.guidance if args.guidance is not None else pipe.default_guidance,
        "shape": list(np.asarray(out.images).shape),
        "dtype": args.dtype,
        "load_s": t_load,
        "wall_s": time.perf_counter() - t0,
        # compile time apart from run time (jax.monitoring events; see rfmpc.compilation)
        "compile": stats.as_dict(),
    }
    if args.model is None:  # the embedded model's prompts can be checked exactly
        from rfmpc.data import attribute_accuracy, parse_prompt

        try:
            accs = [
                attribute_accuracy(im, parse_prompt(p)) for im, p in zip(out.images, args.prompt)
            ]
            rec["attribute_accuracy"] = [a["mean"] for a in accs]
            rec["all_attributes_right"] = [a["all"] == 1.0 for a in accs]
        except ValueError as e:  # a prompt outside the procedural grammar
            rec["attribute_accuracy"] = f"not scored: {e}"
    if args.out:
        save_grid(args.out, out.images, args.prompt, ncols=min(4, len(args.prompt)), scale=6)
        rec["out"] = args.out
    _print(rec, args.json)
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
    _print(
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

    g = sub.add_parser("generate", help="text-to-image with the embedded model or an SD3 folder")
    g.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=None, help="default: the model's (28)")
    g.add_argument("--guidance", type=float, default=None, help="default: the model's")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--model", default=None, help="diffusers SD3 folder (default: embedded)")
    g.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="compute dtype of the networks (bfloat16: see docs/performance.md)",
    )
    g.add_argument("--out", default=None, help="PNG grid with captions")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="diffusers SD3 folder -> rfmpc-format folder")
    c.add_argument("src", help="diffusers StableDiffusion3Pipeline folder or transformer folder")
    c.add_argument("dst", help="output folder")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_convert)
    from rfmpc.cache.cli import add_cache_parser
    from rfmpc.inverse.cli import add_restore_parser
    from rfmpc.switch_cli import add_switch_parser

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
