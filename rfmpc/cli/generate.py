"""``rfmpc generate``: text-to-image, optionally served from a trajectory cache.

Without ``--cache``: one batch from scratch; ``--json`` prints one object for the call and
``--out`` writes a captioned grid.

With ``--cache DIR``: :class:`rfmpc.cached.CachedGenerator` serves each prompt from the cache
where it can (exact repeat, hit, or miss: see its docstring); ``--json`` prints **one line per
image** with at least ``prompt, seed_used, steps, from_cache, kind, cached_prompt, similarity,
resume_step, nfe, wall_s, controller, fallback, out``; ``--out FILE.png`` writes one PNG per image
(``FILE.png`` for one prompt, ``FILE-<i>.png`` for several). Below the similarity threshold a
prompt is generated from scratch and stored (the line says ``"kind": "miss"``); a damaged entry
is reported and skipped.
"""

from __future__ import annotations

import time
from pathlib import Path

from rfmpc.cli._common import emit

__all__ = ["add_generate_parser"]

SEED_MAX = 2**63 - 1


def _check(args) -> None:
    if args.out and Path(args.out).suffix.lower() != ".png":
        raise ValueError(f"--out {args.out}: images are written as PNG; give a path ending in .png")
    if not 0 <= args.seed <= SEED_MAX:
        raise ValueError(f"--seed must be an integer in [0, {SEED_MAX}], got {args.seed}")
    if args.cache is None and (args.controller is not None or args.min_similarity is not None):
        raise ValueError("--controller and --min-similarity need --cache DIR")
    if args.min_similarity is not None and not -1.0 < args.min_similarity <= 1.0:
        raise ValueError(f"--min-similarity must lie in (-1, 1], got {args.min_similarity}")


def _scores(model, images, prompts) -> dict:
    if model is not None:  # only the embedded model's prompts can be checked exactly
        return {}
    from rfmpc.data import attribute_accuracy, parse_prompt

    try:
        accs = [attribute_accuracy(im, parse_prompt(p)) for im, p in zip(images, prompts)]
    except ValueError as e:  # a prompt outside the procedural grammar
        return {"attribute_accuracy": f"not scored: {e}"}
    return {
        "attribute_accuracy": [a["mean"] for a in accs],
        "all_attributes_right": [a["all"] == 1.0 for a in accs],
    }


def _plain(args, pipe, t0, t_load) -> int:
    import numpy as np

    from rfmpc.compilation import CompileStats
    from rfmpc.viz import save_grid

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
            strict=args.strict,
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
        **_scores(args.model, out.images, args.prompt),
    }
    if args.out:
        save_grid(args.out, out.images, args.prompt, ncols=min(4, len(args.prompt)), scale=6)
        rec["out"] = args.out
    emit(rec, args.json)
    return 0


def _cached(args, pipe) -> int:
    from rfmpc.cache import DiskCacheStore, ResumePolicy
    from rfmpc.cached import CachedGenerator
    from rfmpc.cli.switch import controller_from_name
    from rfmpc.viz import save_grid

    if args.negative_prompt is not None:
        raise ValueError("--negative-prompt is not supported with --cache (it is not cached)")
    policy = ResumePolicy()
    if args.min_similarity is not None:  # below the serving band: the edit bands, to the floor
        policy = policy.with_lower_bands(ResumePolicy.edit_bands()).with_min_similarity(
            args.min_similarity
        )
    controller = controller_from_name(args.controller or "mpc")
    with DiskCacheStore(args.cache) as store:
        gen = CachedGenerator(
            pipe,
            store,
            controller,
            policy,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            height=args.height,
            width=args.width,
        )
        out = gen(args.prompt, seed=args.seed, strict=args.strict)
    scores = _scores(args.model, out.images, args.prompt)
    n = len(args.prompt)
    for i, rec in enumerate(out.records):
        line = rec.to_dict()
        line["model"] = pipe.model_id
        if "all_attributes_right" in scores:
            line["all_attributes_right"] = scores["all_attributes_right"][i]
        if args.out:
            path = args.out if n == 1 else str(Path(args.out).with_suffix("")) + f"-{i}.png"
            caption = f"{rec.kind}: {rec.prompt}"
            save_grid(path, out.images[i : i + 1], [caption], ncols=1, scale=6)
            line["out"] = path
        else:
            line["out"] = None
        emit(line, args.json)
        if not args.json:
            print()
    return 0


def cmd_generate(args) -> int:
    import jax.numpy as jnp

    from rfmpc.pipeline import load_pipeline

    _check(args)
    t0 = time.perf_counter()
    pipe = load_pipeline(args.model, dtype=jnp.dtype(args.dtype))
    t_load = time.perf_counter() - t0
    if args.cache is None:
        return _plain(args, pipe, t0, t_load)
    return _cached(args, pipe)


def add_generate_parser(sub) -> None:
    from rfmpc.cli.switch import CONTROLLERS

    g = sub.add_parser("generate", help="text-to-image with the embedded model or an SD3 folder")
    g.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--seed", type=int, default=0, help="noise seed (each prompt gets it)")
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
    g.add_argument(
        "--cache", default=None, metavar="DIR", help="serve prompts from this trajectory cache"
    )
    g.add_argument(
        "--controller",
        choices=list(CONTROLLERS),
        default=None,
        help="switch controller on cache hits (default: mpc)",
    )
    g.add_argument(
        "--min-similarity",
        type=float,
        default=None,
        help="resume from cached prompts at least this similar (default 0.97, the fitted serving "
        "policy: same prompt or a paraphrase, resumed at 80%% of the steps); below 0.97 the "
        "write-up's edit bands apply (>= 0.95: 45%%, 0.90: 30%%, 0.85: 20%%), down to X",
    )
    g.add_argument(
        "--strict",
        action="store_true",
        help="fail on words outside the embedded model's vocabulary (default: warn)",
    )
    g.add_argument("--out", default=None, help="PNG (a captioned grid; per image with --cache)")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_generate)
