"""bf16 vs fp32: what bfloat16 inference costs in quality, and why the control code keeps fp32.

    python -m benchmarks.precision             # embedded model, full run (CPU: ~5 min)
    python -m benchmarks.precision --quick     # fewer prompts
    python -m benchmarks.precision --json --save

Measured on the shipped embedded model (real trained weights; the only ones a fresh machine has),
in one process, three variants of the same network:

* ``fp32``: float32 weights and matmuls (the reference);
* ``bf16``: ``load_pipeline(None, dtype=bfloat16)`` -- bf16 weights and matmuls, float32
  accumulation (``preferred_element_type``), float32 residual streams, norms, softmax, timestep
  embedding and adaLN modulation (see ``rfmpc/models/mmdit.py``);
* ``bf16w-fp32c``: the bf16-rounded weights upcast exactly to float32 (``Transformer.astype``),
  float32 matmuls: what the controllers run on when the pipeline was loaded in bf16.

Four measurements, each against ``fp32``:

1. velocity: ``max |v - v_fp32| / std(v_fp32)`` over a batch of noisy latents at several sigmas;
2. generation: 28 steps + CFG on held-out prompts, same seeds: PSNR (dB) of the image against the
   fp32 image, and prompt fidelity (exact attribute analyzer, all-attributes-right rate) of both;
3. shooting gradient: ``jax.grad`` of the single-shooting objective w.r.t. the per-step controls
   over a 14-step horizon: cosine similarity and relative L2 error against the fp32 gradient;
4. MPC linearisation: the per-pixel ``C x C`` Jacobian blocks from JVP probes
   (:func:`rfmpc.control.mpc.jacobian_blocks`): relative Frobenius error against fp32.

``run(quick)`` returns the record (used by ``benchmarks/report.py``).
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file: re-run as a module
    import _as_module  # noqa: F401  (execs `python -m benchmarks.<name>`, never returns)

import argparse
import datetime as _dt
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._common import save_result
from rfmpc.metrics import cosine, rel_l2_err, rel_max_err

RESULTS = Path(__file__).resolve().parent / "results"


def _device() -> str:
    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"cpu ({platform.processor() or platform.machine()}, {len(jax.devices())} device)"
    return d.device_kind


def _variants():
    import dataclasses

    from rfmpc import load_pipeline

    p32 = load_pipeline(None)
    p16 = load_pipeline(None, dtype=jnp.bfloat16)
    p16c = dataclasses.replace(p16, transformer=p16.transformer.astype(jnp.float32))
    return {"fp32": p32, "bf16": p16, "bf16w-fp32c": p16c}


def _velocity(pipes, key) -> dict:
    p32 = pipes["fp32"]
    prompts = [
        "a red circle at the top left on a blue background",
        "a green triangle at the bottom right on a white background",
        "a yellow square in the center and a blue circle at the top right on a black background",
        "a purple circle at the bottom left on a yellow background",
    ]
    cond, _ = p32.encode_prompt(prompts)
    shape = p32.latent_shape(len(prompts), None, None)
    k1, k2 = jax.random.split(key)
    x0 = jax.random.uniform(k1, shape, minval=-1.0, maxval=1.0)
    eps = jax.random.normal(k2, shape)
    out = {}
    for sigma in (0.95, 0.6, 0.3, 0.05):
        x = (1 - sigma) * x0 + sigma * eps
        vs = {name: p.field(x, jnp.float32(sigma), cond) for name, p in pipes.items()}
        out[f"sigma={sigma}"] = {
            n: rel_max_err(v, vs["fp32"]) for n, v in vs.items() if n != "fp32"
        }
    return out


def _generation(pipes, n: int, steps: int) -> dict:
    from rfmpc.data import attribute_accuracy, heldout_prompts
    from rfmpc.inverse.metrics import psnr

    prompts, scenes = heldout_prompts(n, seed=7)
    images = {}
    seconds = {}
    for name, p in pipes.items():
        t0 = time.perf_counter()
        images[name] = np.asarray(p(prompts, num_inference_steps=steps, seed=11).images)
        seconds[name] = time.perf_counter() - t0
    rec = {"n_prompts": n, "steps": steps, "guidance": pipes["fp32"].default_guidance}
    for name, im in images.items():
        acc = [attribute_accuracy(a, s)["all"] == 1.0 for a, s in zip(im, scenes)]
        entry = {
            "fidelity_all_attributes": float(np.mean(acc)),
            "wall_s_incl_compile": seconds[name],
        }
        if name != "fp32":
            db = np.asarray(psnr(jnp.asarray(im), jnp.asarray(images["fp32"])))
            entry["psnr_vs_fp32_db"] = {
                "median": float(np.median(db)),
                "min": float(np.min(db)),
                "mean": float(np.mean(db[np.isfinite(db)])),
            }
            entry["max_abs_pixel_diff"] = float(np.max(np.abs(im - images["fp32"])))
        rec[name] = entry
    return rec


def _gradients(pipes, key, start: int = 10, steps: int = 28, horizon: int = 14) -> dict:
    from rfmpc.control import jacobian_blocks, shooting_objective
    from rfmpc.flow import integrate

    p32 = pipes["fp32"]
    ca, _ = p32.encode_prompt(["a red circle at the top left on a blue background"])
    cb, _ = p32.encode_prompt(["a red circle at the top left on a green background"])
    sig = p32.sigmas(steps)
    k1, k2 = jax.random.split(key)
    noise = jax.random.normal(k1, p32.latent_shape(1, None, None))
    x_k = integrate(p32.field, noise, sig, ca, stop=start).x
    u = 0.05 * jax.random.normal(k2, (horizon, *x_k.shape))
    grads, blocks = {}, {}
    for name, p in pipes.items():
        f = p.field
        loss = lambda uu, f=f: shooting_objective(f, x_k, sig, start, cb, noise, uu)
        grads[name] = jax.jit(jax.grad(loss))(u)
        vf = lambda xx, f=f: f(xx, sig[start], cb)
        blocks[name] = jax.jit(lambda xx, vf=vf: jacobian_blocks(vf, xx)[1])(x_k)
    out = {"start": start, "horizon": horizon, "steps": steps}
    for name in pipes:
        if name == "fp32":
            continue
        out[name] = {
            "shooting_grad_cosine": cosine(grads[name], grads["fp32"]),
            "shooting_grad_rel_l2": rel_l2_err(grads[name], grads["fp32"]),
            "mpc_jacobian_rel_fro": rel_l2_err(blocks[name], blocks["fp32"]),
        }
    # the compute precision alone: bf16 matmuls vs fp32 matmuls on the *same* (bf16) weights
    out["bf16-vs-bf16w-fp32c"] = {
        "shooting_grad_cosine": cosine(grads["bf16"], grads["bf16w-fp32c"]),
        "shooting_grad_rel_l2": rel_l2_err(grads["bf16"], grads["bf16w-fp32c"]),
        "mpc_jacobian_rel_fro": rel_l2_err(blocks["bf16"], blocks["bf16w-fp32c"]),
    }
    return out


def _speed(pipes, runs: int = 10) -> dict:
    p32 = pipes["fp32"]
    cond, _ = p32.encode_prompt(["a red circle at the top left on a blue background"] * 8)
    x = jax.random.normal(jax.random.key(3), p32.latent_shape(8, None, None))
    t = jnp.full((8,), 500.0)
    out = {}
    for name, p in pipes.items():
        tr = p.transformer
        tr(x, t, cond["embeds"], cond["pooled"]).block_until_ready()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            tr(x, t, cond["embeds"], cond["pooled"]).block_until_ready()
            times.append(time.perf_counter() - t0)
        out[name] = {"forward_batch8_ms_min": 1e3 * min(times)}
    return out


def run(quick: bool = False) -> dict:
    """Run every measurement; returns a JSON-ready record."""
    key = jax.random.key(0)
    pipes = _variants()
    t0 = time.perf_counter()
    rec = {
        "benchmark": "precision",
        "model": "rfmpc embedded default model (4-layer pixel MM-DiT, trained weights)",
        "device": _device(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "reference": "fp32 weights and compute, same inputs/seeds, same process",
        "velocity_rel_max_err": _velocity(pipes, key),
        "generation": _generation(pipes, 8 if quick else 48, 28),
        "gradients": _gradients(pipes, jax.random.fold_in(key, 1)),
        "speed": _speed(pipes, 3 if quick else 10),
    }
    rec["seconds"] = time.perf_counter() - t0
    return rec


def _table(rec: dict) -> str:
    g, gr = rec["generation"], rec["gradients"]
    lines = [
        f"# bf16 vs fp32 ({rec['device']}, {rec['date']})",
        "",
        f"Model: {rec['model']}. Reference: {rec['reference']}.",
        "",
        "| variant | velocity rel. max err (sigma 0.95 / 0.6 / 0.3 / 0.05) | image PSNR vs fp32 "
        "(median / min dB) | fidelity (all attrs) | shooting grad cos / rel L2 | MPC Jacobian "
        "rel err | forward (batch 8, min ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    fid32 = g["fp32"]["fidelity_all_attributes"]
    ms32 = rec["speed"]["fp32"]["forward_batch8_ms_min"]
    lines.append(f"| fp32 | 0 | inf | {fid32:.3f} | 1 / 0 | 0 | {ms32:.2f} |")
    for name in ("bf16", "bf16w-fp32c"):
        v = " / ".join(
            f"{rec['velocity_rel_max_err'][s][name]:.2e}" for s in rec["velocity_rel_max_err"]
        )
        ps = g[name]["psnr_vs_fp32_db"]
        d = gr[name]
        lines.append(
            f"| {name} | {v} | {ps['median']:.1f} / {ps['min']:.1f} | "
            f"{g[name]['fidelity_all_attributes']:.3f} | {d['shooting_grad_cosine']:.5f} / "
            f"{d['shooting_grad_rel_l2']:.2e} | {d['mpc_jacobian_rel_fro']:.2e} | "
            f"{rec['speed'][name]['forward_batch8_ms_min']:.2f} |"
        )
    d = gr["bf16-vs-bf16w-fp32c"]
    lines += [
        "",
        "Compute precision alone (bf16 vs fp32 matmuls on the same bf16 weights): shooting "
        f"gradient cosine {d['shooting_grad_cosine']:.5f}, rel L2 {d['shooting_grad_rel_l2']:.2e}; "
        f"MPC Jacobian rel err {d['mpc_jacobian_rel_fro']:.2e}.",
    ]
    lines += [
        "",
        f"{g['n_prompts']} held-out prompts, {g['steps']} steps, CFG {g['guidance']}; "
        f"gradients: horizon {gr['horizon']} from step {gr['start']} of {gr['steps']}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/<date>-...")
    args = ap.parse_args(argv)
    rec = run(args.quick)
    print(json.dumps(rec) if args.json else _table(rec))
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        dev = "cpu" if jax.devices()[0].platform == "cpu" else jax.devices()[0].device_kind
        stem = f"{_dt.date.today().isoformat()}-{dev.lower().replace(' ', '-')}-precision"
        save_result(RESULTS / stem, {".json": json.dumps(rec, indent=1), ".md": _table(rec)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
