"""Memory of exact shooting gradients through a 28-step solve, in forward activations.

    python -m benchmarks.shooting_memory            # embedded-size and a wider MM-DiT, CPU
    python -m benchmarks.shooting_memory --json --save

The issue's bar: ``jax.grad`` of the single-shooting objective through the whole remaining solve
must fit in the memory of ~3 forward activations, by checkpointing. Measured here from XLA's own
buffer assignment of the compiled programs (``compiled.memory_analysis()``: ``temp_size_in_bytes``
is the peak of the scratch buffers a program needs beyond its inputs and outputs; it is the same
figure on CPU and GPU, before allocator fragmentation), for:

* ``forward``: one model evaluation ``v(x, sigma, cond)`` (inference);
* ``grad_1``: ``jax.grad`` of a scalar of one model evaluation w.r.t. ``x`` -- the activations of
  one forward kept for its backward: **the unit** ("one forward's activations");
* ``grad_shooting``: ``jax.grad`` of :func:`rfmpc.control.shooting_objective` w.r.t. the
  per-step controls over ``H = N - k`` steps (the rollout is a ``lax.scan`` with every step under
  ``jax.checkpoint``, storing one state per step; the consistency terms reuse the rollout's
  velocities, plus one evaluation at the end);
* ``grad_shooting`` with ``remat=False``: the same scan without per-step checkpointing;
* ``grad_unrolled``: the same objective differentiated through a plain Python loop without any
  checkpointing (what a naive implementation stores): H forwards' activations.

On a GPU the same programs also run once and report ``peak_bytes_in_use`` from the device.
``run(quick)`` returns the record (used by ``benchmarks/report.py``).
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file: re-run as a module
    import _as_module  # noqa: F401  (execs `python -m benchmarks.<name>`, never returns)

import argparse
import dataclasses
import datetime as _dt
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks._common import save_result

RESULTS = Path(__file__).resolve().parent / "results"


def _device() -> str:
    d = jax.devices()[0]
    return "cpu" if d.platform == "cpu" else d.device_kind


def _temp_bytes(fn, *args) -> int:
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    return int(mem.temp_size_in_bytes)


def _model(config, batch: int, latent: int, text_tokens: int, key):
    """A random-weight MM-DiT field and its inputs (speed/memory do not depend on the values)."""
    from rfmpc.models import MMDiT
    from rfmpc.models.transformer import Transformer
    from rfmpc.pipeline import ModelField

    module = MMDiT(config, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    field = ModelField(Transformer.from_module(module))
    k1, k2, k3, k4 = jax.random.split(key, 4)
    x = jax.random.normal(k1, (batch, latent, latent, config.in_channels))
    cond_a = {
        "embeds": jax.random.normal(k2, (batch, text_tokens, config.joint_attention_dim)),
        "pooled": jax.random.normal(k3, (batch, config.pooled_projection_dim)),
    }
    cond_b = jax.tree.map(lambda a: a + 0.1, cond_a)
    noise = jax.random.normal(k4, x.shape)
    return field, x, cond_a, cond_b, noise


def measure(config, *, batch: int, latent: int, text_tokens: int, steps: int, start: int) -> dict:
    from rfmpc.control import shooting_objective
    from rfmpc.flow import flowmatch_sigmas

    field, x, _ca, cb, noise = _model(config, batch, latent, text_tokens, jax.random.key(0))
    sig = flowmatch_sigmas(steps, 3.0)
    H = steps - start
    u = jnp.zeros((H, *x.shape))

    def fwd(f, xx):
        return f(xx, sig[start], cb)

    def grad_1(f, xx):
        return jax.grad(lambda y: jnp.sum(f(y, sig[start], cb) ** 2))(xx)

    def grad_shoot(f, uu, remat=True):
        return jax.grad(lambda v: shooting_objective(f, x, sig, start, cb, noise, v, remat=remat))(
            uu
        )

    def unrolled(f, uu):
        # the same objective (consistency term only, effort/smoothness are negligible) through a
        # plain loop: every step's activations stay alive for the backward pass
        def loss(v):
            y, total = x, 0.0
            sig_np = np.asarray(sig)
            for i in range(H):
                s, s1 = sig[start + i], sig[start + i + 1]
                y = y + (s1 - s) * (f(y, s, cb) + v[i])
                if sig_np[start + i + 1] > 0:
                    eps_hat = y + (1 - s1) * f(y, s1, cb)
                    total = total + jnp.mean((eps_hat - noise) ** 2)
            return total

        return jax.grad(loss)(uu)

    rec = {
        "config": {
            "layers": config.num_layers,
            "width": config.num_attention_heads * config.attention_head_dim,
            "patch": config.patch_size,
            "tokens": (latent // config.patch_size) ** 2 + text_tokens,
            "batch": batch,
        },
        "steps": steps,
        "start": start,
        "horizon": H,
        "latent_bytes": int(x.size * x.dtype.itemsize),
        "forward_temp_bytes": _temp_bytes(fwd, field, x),
        "grad_1_temp_bytes": _temp_bytes(grad_1, field, x),
        "grad_shooting_temp_bytes": _temp_bytes(grad_shoot, field, u),
        "grad_shooting_vmap_path_temp_bytes": _temp_bytes(
            lambda f, uu: grad_shoot(f, uu, False), field, u
        ),
        "grad_unrolled_temp_bytes": _temp_bytes(unrolled, field, u),
    }
    unit = rec["grad_1_temp_bytes"]
    rec["shooting_in_forward_activations"] = rec["grad_shooting_temp_bytes"] / unit
    rec["unrolled_in_forward_activations"] = rec["grad_unrolled_temp_bytes"] / unit
    rec["vmap_path_in_forward_activations"] = rec["grad_shooting_vmap_path_temp_bytes"] / unit
    if jax.devices()[0].platform == "gpu":  # pragma: no cover - GPU only
        dev = jax.devices()[0]
        jax.block_until_ready(jax.jit(grad_shoot)(field, u))
        rec["gpu_peak_bytes_in_use"] = int(dev.memory_stats().get("peak_bytes_in_use", 0))
    return rec


def _configs(quick: bool):
    from rfmpc.models import MMDiTConfig

    emb = MMDiTConfig(
        sample_size=8,
        patch_size=4,
        in_channels=3,
        out_channels=3,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=128,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
    )
    wide = dataclasses.replace(
        emb,
        sample_size=32,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=4,
        attention_head_dim=64,
        num_attention_heads=4,
        joint_attention_dim=256,
        caption_projection_dim=256,
        pooled_projection_dim=128,
        pos_embed_max_size=48,
    )
    cases = [("embedded-size (32x32 px, 64 image tokens)", emb, 8, 32, 16)]
    if not quick:
        cases.append(("SD3-like block, 32x32x16 latent (256 image tokens)", wide, 2, 32, 77))
    return cases


def run(quick: bool = False) -> dict:
    steps, start = 28, 10
    out = {
        "benchmark": "shooting_memory",
        "device": _device(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "method": "XLA buffer assignment (compiled.memory_analysis().temp_size_in_bytes)",
        "goal": "grad through the solve <= ~3 forward activations (grad_1)",
        "cases": {},
    }
    for name, cfg, batch, latent, tokens in _configs(quick):
        out["cases"][name] = measure(
            cfg, batch=batch, latent=latent, text_tokens=tokens, steps=steps, start=start
        )
    return out


def _table(rec: dict) -> str:
    lines = [
        f"# Shooting-gradient memory ({rec['device']}, {rec['date']})",
        "",
        f"Method: {rec['method']}. Goal: {rec['goal']}.",
        "",
        "| case | H | forward | grad of 1 forward (unit) | shooting grad (checkpointed) | "
        "x unit | shooting grad, remat=False | x unit | unrolled, no checkpointing | x unit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    mib = lambda b: f"{b / 2**20:.2f} MiB"
    for name, c in rec["cases"].items():
        lines.append(
            f"| {name} | {c['horizon']} | {mib(c['forward_temp_bytes'])} | "
            f"{mib(c['grad_1_temp_bytes'])} | {mib(c['grad_shooting_temp_bytes'])} | "
            f"{c['shooting_in_forward_activations']:.2f} | "
            f"{mib(c['grad_shooting_vmap_path_temp_bytes'])} | "
            f"{c['vmap_path_in_forward_activations']:.2f} | {mib(c['grad_unrolled_temp_bytes'])} | "
            f"{c['unrolled_in_forward_activations']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args(argv)
    rec = run(args.quick)
    print(json.dumps(rec) if args.json else _table(rec))
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        stem = f"{_dt.date.today().isoformat()}-{rec['device'].lower().replace(' ', '-')}"
        save_result(
            RESULTS / f"{stem}-shooting_memory",
            {".json": json.dumps(rec, indent=1), ".md": _table(rec)},
        )
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
