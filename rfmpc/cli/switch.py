"""``rfmpc switch``: finish prompt B from prompt A's cached state and measure it against B.

An evaluation harness, not a cache: it generates A (or takes A's state from ``--cache`` when an
entry with A's exact prompt holds the switch step), B from scratch, the switch and the equal-NFE
baseline, and reports how close the switch came to B.

The JSON contract (other tools parse it): method, at_step, steps, similarity, psnr_db, ssim,
nfe, jvps, vjps, wall_s, planning_s, speedup, equal_nfe_psnr_db, fallback; plus nfe_speedup,
first_call_s (incl. compilation), scratch_wall_s, equal_nfe_ssim, fallback_reason, result, from,
to, model and, with ``--cache``, whether A came from the cache.

Quality is measured against B generated from scratch with the same seed (the target the switch
tries to reproduce): PSNR in dB on images in [0, 1] and SSIM (scikit-image definition). Times are
steady state (a warm-up call first; ``first_call_s`` is the cold call), on this machine's device.
``speedup`` = B-from-scratch wall time / switch wall time (planning included); ``nfe_speedup``
= N / switch NFE. The equal-NFE baseline is B from scratch with only N - k steps.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from rfmpc.cli._common import emit

__all__ = ["CONTROLLERS", "add_switch_parser", "controller_from_name", "run_switch"]


def _controllers() -> dict:
    from rfmpc.control import (
        MPC,
        Adaptive,
        Blend,
        Direct,
        MultipleShooting,
        Reproject,
        SDEdit,
        Shooting,
        ShootingMPC,
    )

    return {
        "direct": Direct,
        "blend": Blend,
        "adaptive": Adaptive,
        "reproject": Reproject,
        "sdedit": SDEdit,
        "shooting": Shooting,
        "multiple-shooting": MultipleShooting,
        "mpc": MPC,
        "shooting-mpc": ShootingMPC,
    }


#: CLI names -> controller classes (called with no arguments: each class's defaults). The only
#: place in rfmpc that maps names to controllers.
CONTROLLERS: dict = _controllers()


def controller_from_name(name: str):
    """The controller a CLI name stands for, with its defaults."""
    if name not in CONTROLLERS:
        raise ValueError(f"unknown controller {name!r}; choose one of: {', '.join(CONTROLLERS)}")
    return CONTROLLERS[name]()


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - t0, first


def run_switch(
    pipe,
    prompt_a: str,
    prompt_b: str,
    *,
    method: str,
    steps: int,
    seed: int,
    at: int | None = None,
    cache_dir: str | None = None,
    out_png: str | None = None,
    guidance: float | None = None,
) -> dict:
    from rfmpc.cache import DiskCacheStore, ResumePolicy
    from rfmpc.control import SwitchCache, from_scratch_equal_nfe, switch
    from rfmpc.metrics import psnr, ssim

    controller = controller_from_name(method)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"--steps must be an int >= 2, got {steps!r}")
    g = pipe.default_guidance if guidance is None else guidance
    field = pipe.guided_field(g)
    key = jax.random.key(seed)
    pooled = np.asarray(pipe.text_encoder.pooled([prompt_a, prompt_b]), np.float64)
    sim = float(pooled[0] @ pooled[1] / (np.linalg.norm(pooled[0]) * np.linalg.norm(pooled[1])))
    sim = float(np.clip(sim, -1.0, 1.0))  # the same prompt twice can give 1 + 1 ulp
    policy = ResumePolicy.edit_bands()
    if at is None:
        at = policy.choose_step(sim, steps, list(range(1, steps)))
        if at is None:
            raise ValueError(
                f"similarity {sim:.3f} is below the policy's threshold "
                f"{policy.min_similarity}: generate B from scratch, or force a step with --at"
            )
    if not 1 <= at < steps:
        raise ValueError(f"--at must be in [1, {steps - 1}], got {at}")
    shape = pipe.latent_shape(1, None, None)
    from_cache = False
    state_a = None
    chash = pipe.config_hash(shape, steps)
    if cache_dir is not None:
        with DiskCacheStore(cache_dir) as store:
            hit = store.nearest(
                pooled[1].astype(np.float32), model_id=pipe.model_id, config_hash=chash
            )
        if hit is not None and hit[0].prompt == prompt_a and at in hit[0].states:
            state_a, from_cache = hit[0].states[at], True
    ra = pipe(prompt_a, num_inference_steps=steps, guidance_scale=g, key=key, return_states=(at,))
    if state_a is None:
        state_a = ra.states[at]
        if cache_dir is not None:
            with DiskCacheStore(cache_dir) as store:
                store.put(
                    prompt_a,
                    pooled[0].astype(np.float32),
                    {at: state_a},
                    model_id=pipe.model_id,
                    config_hash=chash,
                )
    cond_b = pipe.encode_prompt(prompt_b)

    def scratch():
        return pipe(
            prompt_b, num_inference_steps=steps, guidance_scale=g, key=key, output_type="latent"
        ).latents

    xb, t_scratch, _ = _timed(scratch)
    res_holder = {}

    # what a cache entry holds beside the state: A's velocity at step k (A's run computed it)
    # and A's final latent
    cached = SwitchCache(
        velocity=field(state_a.x, state_a.sigmas[at], state_a.cond), final=ra.latents
    )

    def do_switch():
        res_holder["r"] = switch(field, state_a, cond_b, controller, similarity=sim, cached=cached)
        return res_holder["r"].state.x

    xs, t_switch, t_first = _timed(do_switch)
    res = res_holder["r"]
    noise = jax.random.normal(key, shape, state_a.x.dtype)
    xe = from_scratch_equal_nfe(field, noise, cond_b, steps - at, pipe.shift).x
    img_b, img_s, img_e = (pipe.decode(x) for x in (xb, xs, xe))
    if not bool(np.all(np.isfinite(np.asarray(img_s)))):
        raise RuntimeError(f"the {method} switch produced a non-finite image")
    rec = {
        "method": method,
        "at_step": int(at),
        "steps": steps,
        "similarity": sim,
        "psnr_db": float(psnr(img_s, img_b)[0]),
        "ssim": float(ssim(img_s, img_b)[0]),
        "nfe": int(res.cost.forwards),
        "jvps": int(res.cost.jvps),
        "vjps": int(res.cost.vjps),
        "wall_s": t_switch,
        "planning_s": float(res.planning_s),
        "speedup": t_scratch / t_switch,
        "nfe_speedup": steps / max(int(res.nfe), 1),
        "equal_nfe_psnr_db": float(psnr(img_e, img_b)[0]),
        "equal_nfe_ssim": float(ssim(img_e, img_b)[0]),
        "fallback": bool(res.fallback),
        "fallback_reason": res.fallback_reason,
        "result": res.outcome,
        "first_call_s": t_first,
        "scratch_wall_s": t_scratch,
        "from": prompt_a,
        "to": prompt_b,
        "model": pipe.model_id,
        "from_cache": from_cache,
        "device": str(jax.devices()[0].device_kind),
    }
    if out_png:
        from rfmpc.viz import save_grid

        save_grid(
            out_png,
            np.concatenate(
                [np.asarray(ra.images), np.asarray(img_b), np.asarray(img_s), np.asarray(img_e)]
            ),
            [
                f"A: {prompt_a}",
                f"B from scratch: {prompt_b}",
                f"{method} at {at}: {rec['psnr_db']:.1f} dB",
                f"equal NFE ({steps - at} steps): {rec['equal_nfe_psnr_db']:.1f} dB",
            ],
            ncols=4,
            scale=6,
        )
        rec["out"] = out_png
    return rec


def add_switch_parser(sub) -> None:
    s = sub.add_parser("switch", help="finish prompt B from prompt A's cached trajectory state")
    s.add_argument("--from", dest="prompt_a", required=True, help="the cached prompt A")
    s.add_argument("--to", dest="prompt_b", required=True, help="the new prompt B")
    at = s.add_mutually_exclusive_group()
    at.add_argument("--at", type=int, default=None, help="switch step k")
    at.add_argument(
        "--auto", action="store_true", help="choose k from the prompt similarity (the default)"
    )
    s.add_argument("--method", choices=list(CONTROLLERS), default="mpc")
    s.add_argument("--steps", type=int, default=28)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--guidance", type=float, default=None)
    s.add_argument("--cache", default=None, help="trajectory cache directory")
    s.add_argument("--model", default=None, help="diffusers SD3 folder (default: embedded)")
    s.add_argument("--out", default=None, help="PNG: A, B from scratch, switch, equal-NFE")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd)


def _cmd(args) -> int:
    from rfmpc.pipeline import load_pipeline

    pipe = load_pipeline(args.model)
    rec = run_switch(
        pipe,
        args.prompt_a,
        args.prompt_b,
        method=args.method,
        steps=args.steps,
        seed=args.seed,
        at=args.at,
        cache_dir=args.cache,
        out_png=args.out,
        guidance=args.guidance,
    )
    emit(rec, args.json)
    return 0
