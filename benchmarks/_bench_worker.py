"""Worker side of ``mmdit_speed.py``'s round-robin timing, importable without rfmpc.

A worker builds one engine, warms it up, replies once, then answers each line ``<n> [<s>]`` on
stdin with ``n`` timed calls, made after untimed settling calls for ``s`` seconds (at least one
when ``s > 0``). Replies are JSON lines on stdout prefixed with :data:`REPLY` (libraries may
print too). This module imports only the standard library and numpy at the top, so the
keras-hub worker can run in an interpreter that has keras-hub but not rfmpc
(``python benchmarks/_bench_worker.py keras-hub '<json spec>'``).
"""

from __future__ import annotations

import json
import sys
import time

REPLY = "@@mmdit_speed@@ "


def reply(obj: dict) -> None:
    sys.stdout.write(REPLY + json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve(fn, sync, info: dict, out_path: str | None, build_s: float) -> int:
    """Warm up ``fn`` (timed), save its output to ``out_path`` (NHWC float32), then serve."""
    import numpy as np

    t0 = time.perf_counter()
    out = sync(fn())
    warmup_s = time.perf_counter() - t0
    sync(fn())  # a second untimed call: allocator and caches settle
    if out_path:
        o = out
        if hasattr(o, "detach"):  # torch NCHW -> NHWC
            o = o.detach().float().permute(0, 2, 3, 1).numpy()
        np.save(out_path, np.asarray(o, np.float32))
    reply({"build_s": build_s, "warmup_s": warmup_s, **info})
    for line in sys.stdin:
        n, _, settle = line.partition(" ")
        settle_s = float(settle or 0.0)
        # Untimed calls until ``settle_s`` has passed: after an idle gap (another engine's
        # turn) the first calls of a turn can be slower (XLA:CPU's parked worker threads
        # more than torch's), so every engine gets the same settling before timed calls.
        settle_times = []
        t_end = time.perf_counter() + settle_s
        while settle_s > 0 and (not settle_times or time.perf_counter() < t_end):
            t0 = time.perf_counter()
            sync(fn())
            settle_times.append(time.perf_counter() - t0)
        times = []
        for _ in range(int(n)):
            t0 = time.perf_counter()
            sync(fn())
            times.append(time.perf_counter() - t0)
        reply({"times_s": times, "settle_times_s": settle_times})
    return 0


def keras_hub_forward(spec: dict):
    """``(fn, sync, info)``: keras-hub's JAX ``MMDiT`` for ``spec`` (``mmdit_speed``'s case as
    JSON: ``config`` (diffusers keys), ``latent``, ``text_tokens``, ``batch``, ``dtype``), run
    as ``jax.jit`` of its ``stateless_call`` on random inputs (seed 0)."""
    import os

    os.environ.setdefault("KERAS_BACKEND", "jax")
    import jax
    import jax.numpy as jnp
    import keras
    import keras_hub
    import numpy as np
    from keras_hub.src.models.stable_diffusion_3.mmdit import MMDiT

    if keras.backend.backend() != "jax":
        raise RuntimeError(f"keras backend is {keras.backend.backend()!r}; set KERAS_BACKEND=jax")
    c = spec["config"]
    if c.get("pos_embed_max_size") is None:
        raise ValueError("keras-hub's MMDiT needs a position table size (pos_embed_max_size)")
    h, w = spec["latent"]
    m, b = spec["text_tokens"], spec["batch"]
    dual = tuple(c.get("dual_attention_layers") or ()) or None
    model = MMDiT(
        patch_size=c["patch_size"],
        hidden_dim=c["num_attention_heads"] * c["attention_head_dim"],
        num_layers=c["num_layers"],
        num_heads=c["num_attention_heads"],
        position_size=c["pos_embed_max_size"],
        latent_shape=(h, w, c["in_channels"]),
        context_shape=(m, c["joint_attention_dim"]),
        pooled_projection_shape=(c["pooled_projection_dim"],),
        qk_norm=c.get("qk_norm"),
        dual_attention_indices=dual,
        dtype="bfloat16" if spec["dtype"] == "bf16" else "float32",
    )
    rng = np.random.default_rng(0)
    inputs = {
        "latent": jnp.asarray(rng.standard_normal((b, h, w, c["in_channels"]), np.float32)),
        "context": jnp.asarray(rng.standard_normal((b, m, c["joint_attention_dim"]), np.float32)),
        "pooled_projection": jnp.asarray(
            rng.standard_normal((b, c["pooled_projection_dim"]), np.float32)
        ),
        "timestep": jnp.asarray(np.linspace(700.0, 300.0, b, dtype=np.float32))[:, None],
    }
    tv = [v.value for v in model.trainable_variables]
    ntv = [v.value for v in model.non_trainable_variables]
    call = jax.jit(lambda tv, ntv, x: model.stateless_call(tv, ntv, x)[0])
    info = {
        "threads": "XLA:CPU intra-op pool over the visible cores (default)",
        "versions": {"keras": keras.__version__, "keras_hub": keras_hub.__version__},
        "jax": jax.__version__,
        "params": int(sum(int(np.prod(v.shape)) for v in model.weights)),
    }
    return (lambda: call(tv, ntv, inputs)), (lambda o: o.block_until_ready()), info


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "keras-hub":
        print("usage: _bench_worker.py keras-hub '<json spec>' [out.npy]", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    fn, sync, info = keras_hub_forward(json.loads(argv[1]))
    return serve(fn, sync, info, argv[2] if len(argv) > 2 else None, time.perf_counter() - t0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
