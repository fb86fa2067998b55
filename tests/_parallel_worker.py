"""Multi-device checks for tests/test_parallel.py, run in a subprocess with 8 CPU devices.

Usage: ``XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python
tests/_parallel_worker.py``. Prints one JSON object (last line of stdout): for each check the
max abs difference between the single-device run (``mesh=None``, today's path) and the sharded
run, the shardings seen, and the messages of the expected errors. The parent asserts on it.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rfmpc.control import Direct, SwitchCache, stack_states, switch_batch
from rfmpc.flow import TrajectoryState
from rfmpc.inverse import InnerSolver, IsotropicMixtureField, box_inpainting, mpc_rhc
from rfmpc.parallel import (
    DATA,
    FSDP,
    BatchShardedField,
    check_mesh,
    make_mesh,
    shard_batch,
    shard_params,
)
from rfmpc.pipeline import load_pipeline

PROMPTS = [
    "a red circle on a blue background",
    "a small green square",
    "a large yellow triangle on the left",
    "a blue circle at the top",
    "a purple square on a white background",
    "a small red triangle at the bottom",
    "a large orange circle",
    "a green triangle on the right",
]
PROMPTS_B = PROMPTS[1:] + PROMPTS[:1]
STEPS = 2


def _maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _error(fn) -> str | None:
    try:
        fn()
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _batch_split(x, mesh) -> dict:
    """How a batch array is laid out: its spec and the batch rows of each device's shard."""
    rows = sorted({int(s.data.shape[0]) for s in x.addressable_shards})
    return {
        "spec": str(x.sharding.spec),
        "devices": len(x.sharding.device_set),
        "shard_rows": rows,
        "batch": int(x.shape[0]),
        "data_size": int(mesh.shape[DATA]),
    }


def _param_report(tree, fsdp: int) -> dict:
    leaves = jax.tree.leaves(tree)
    sharded = [a for a in leaves if any(p is not None for p in a.sharding.spec)]
    big = max(leaves, key=lambda a: a.size)
    shard = big.addressable_shards[0].data
    return {
        "leaves": len(leaves),
        "sharded": len(sharded),
        "sharded_elements": int(sum(a.size for a in sharded)),
        "elements": int(sum(a.size for a in leaves)),
        "largest_shape": list(big.shape),
        "largest_spec": str(big.sharding.spec),
        "largest_shard_shape": list(shard.shape),
        "sharded_shards_ok": all(
            s.data.size * fsdp == a.size for a in sharded for s in a.addressable_shards
        ),
        "smallest_spec": str(min(leaves, key=lambda a: a.size).sharding.spec),
    }


def _flops(compiled_solve) -> float:
    """XLA's flop count for one device of a :class:`CompiledSolve`'s program."""
    cost = compiled_solve._compiled.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def _compiled(fn, *args):
    """``(compiled, flops)``: ``fn`` compiled for ``args`` and XLA's flop count per device."""
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return compiled, float(cost["flops"])


def fast() -> dict:
    out: dict = {"devices": jax.device_count()}
    t0 = time.perf_counter()
    mesh = make_mesh(data=4, fsdp=2)
    out["mesh_shape"] = dict(mesh.shape)

    # ------------------------------------------------------------------ errors
    p1 = load_pipeline(None)
    p8 = load_pipeline(None, mesh=mesh)
    hand = Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y"))
    out["errors"] = {
        "data_not_dividing": _error(lambda: make_mesh(data=3)),
        "product_mismatch": _error(lambda: make_mesh(data=2, fsdp=2)),
        "fsdp_not_dividing": _error(lambda: make_mesh(fsdp=3)),
        "bad_size": _error(lambda: make_mesh(data=0)),
        "unknown_axis": _error(lambda: check_mesh(hand, DATA, FSDP)),
        "unknown_axis_name": _error(lambda: shard_batch(jnp.zeros((4, 2)), mesh, axis="model")),
        "not_a_mesh": _error(lambda: check_mesh("mesh")),
        "batch_not_multiple": _error(lambda: shard_batch({"y": jnp.zeros((6, 2))}, mesh)),
        "scalar_leaf": _error(lambda: shard_batch(jnp.float32(1.0), mesh)),
        "pipeline_batch": _error(lambda: p8(PROMPTS[:3], num_inference_steps=1, seed=0)),
        "hand_mesh_params": _error(lambda: shard_params({"w": jnp.zeros((8, 8))}, hand)),
    }
    out["params"] = _param_report(p8.transformer.params, mesh.shape[FSDP])
    out["params_single"] = str(jax.tree.leaves(p1.transformer.params)[0].sharding)

    # ------------------------------------------------------------------ pipeline
    t = time.perf_counter()
    r1 = p1(PROMPTS, num_inference_steps=STEPS, seed=0, return_states=(0,))
    r8 = p8(PROMPTS, num_inference_steps=STEPS, seed=0)
    out["pipeline"] = {
        "maxdiff_images": _maxdiff(r1.images, r8.images),
        "maxdiff_latents": _maxdiff(r1.latents, r8.latents),
        "image_std": float(np.std(r1.images)),
        "latents": _batch_split(r8.latents, mesh),
        "seconds": time.perf_counter() - t,
        "cpu_s": time.process_time(),
    }

    # ------------------------------------------------------------------ switch_batch
    t = time.perf_counter()
    st = r1.states[0]  # the seed noise, step 0: B from A's start with a blended command
    per = [
        TrajectoryState(
            x=st.x[i : i + 1],
            step=0,
            sigmas=st.sigmas,
            key=jax.random.fold_in(st.key, i),
            cond=jax.tree.map(lambda a, i=i: a[i : i + 1], st.cond),
            meta=st.meta,
        )
        for i in range(len(PROMPTS))
    ]
    states = stack_states(per)
    conds_b = jax.tree.map(lambda a: a[:, None], p1.encode_prompt(PROMPTS_B))
    kw = dict(controller=Direct(), cached=SwitchCache(noise=st.x[:, None]))
    s1 = switch_batch(p1.guided_field(p1.default_guidance), states, conds_b, **kw)
    s8 = switch_batch(p8.guided_field(p8.default_guidance), states, conds_b, mesh=mesh, **kw)
    out["switch"] = {
        "maxdiff": _maxdiff(s1.x, s8.x),
        "x_std": float(np.std(np.asarray(s1.x))),
        "from_a": _maxdiff(s1.x[:, 0], r1.latents),  # B differs from A's own result
        "nfe_equal": bool(
            np.array_equal(np.asarray(s1.cost.forwards), np.asarray(s8.cost.forwards))
        ),
        "x": _batch_split(s8.x, mesh),
        "error_batch": _error(
            lambda: switch_batch(
                p1.guided_field(2.0),
                jax.tree.map(lambda a: a[:3], states),
                jax.tree.map(lambda a: a[:3], conds_b),
                Direct(),
                cached=SwitchCache(noise=st.x[:3, None]),
                mesh=mesh,
            )
        ),
        "seconds": time.perf_counter() - t,
        "cpu_s": time.process_time(),
    }

    # ------------------------------------------------------------------ MPC-Flow restore
    t = time.perf_counter()
    out["restore"] = _restore_gmm(mesh)
    out["restore"]["seconds"] = time.perf_counter() - t
    out["seconds"] = time.perf_counter() - t0
    return out


def _restore(field1, field8, truth, cond, mesh, solver) -> dict:
    """MPC-Flow box inpainting of the images ``truth``: ``field1`` on one device (through
    ``solver.compile``, i.e. :class:`CompiledSolve`) vs ``field8`` (e.g. with sharded parameters)
    on ``mesh``, through ``solver(..., mesh=)`` and ``solver.compile(..., mesh=)``; the two
    compiled programs' flops per device are compared too."""
    h = truth.shape[1]
    op = box_inpainting(truth.shape[1:], box=(h // 4, h // 4, h // 2, h // 2))
    y = op(truth) + 0.05 * jax.random.normal(jax.random.key(1), op(truth).shape)
    key = jax.random.key(2)
    c1 = solver.compile(field1, op, y, 0.05, key, cond=cond)
    c8 = solver.compile(field8, op, y, 0.05, key, cond=cond, mesh=mesh)
    i1, ic = c1(), c8()
    i8 = solver(field8, op, y, 0.05, key, cond=cond, mesh=mesh)
    c3 = None if cond is None else jax.tree.map(lambda a: a[:3], cond)
    return {
        "maxdiff": _maxdiff(i1.x, i8.x),
        "maxdiff_compiled": _maxdiff(i1.x, ic.x),
        "x_std": float(np.std(np.asarray(i1.x))),
        "fit": [float(np.mean(r.diagnostics["data_fit"])) for r in (i1, i8)],
        "nfe": [int(i1.nfe), int(i8.nfe)],
        "backprops": [int(i1.backprops), int(i8.backprops)],
        "x": _batch_split(i8.x, mesh),
        "x_compiled": _batch_split(ic.x, mesh),
        "compiled_mesh": [c1.mesh is None, c8.mesh is mesh],
        "flops": [_flops(c1), _flops(c8)],
        "error_batch": _error(lambda: solver(field1, op, y[:3], 0.05, key, cond=c3, mesh=mesh)),
    }


def _restore_gmm(mesh) -> dict:
    """A cheap, exact prior: an isotropic Gaussian mixture over 8x8 RGB images, 4 images."""
    means = jax.random.uniform(jax.random.key(5), (6, 8, 8, 3), minval=-1.0, maxval=1.0)
    field = IsotropicMixtureField(means, tau=0.2)
    truth = field.sample(jax.random.key(6), 4)
    solver = mpc_rhc(num_steps=3, horizon_steps=2, inner=InnerSolver("adam", 2, 0.05))
    return _restore(field, field, truth, None, mesh, solver)


def slow() -> dict:
    """Longer checks: pure data parallelism over 8 devices (mesh given to the call only), a
    receding-horizon restore (K = 2: backprop through the sharded model) through ``solver(...,
    mesh=)``, and one sharded model call's flops per device."""
    t0 = time.perf_counter()
    p1 = load_pipeline(None)
    r1 = p1(PROMPTS, num_inference_steps=STEPS, seed=0)
    m8 = make_mesh()
    r8 = p1(PROMPTS, num_inference_steps=STEPS, seed=0, mesh=m8)
    out = {
        "data8": {
            "maxdiff_images": _maxdiff(r1.images, r8.images),
            "latents": _batch_split(r8.latents, m8),
        }
    }
    mesh = make_mesh(data=4, fsdp=2)
    p8 = load_pipeline(None, mesh=mesh)
    solver = mpc_rhc(num_steps=STEPS, horizon_steps=2, inner=InnerSolver("adam", 2, 0.05))
    truth = p1.codec.encode(r1.images[:4])
    uncond, _ = p1.encode_prompt([""] * 4)
    out["restore_model"] = _restore(p1.field, p8.field, truth, uncond, mesh, solver)
    t = time.perf_counter()
    # ------------------------------------------------------------------ work per device
    cond, _ = p1.encode_prompt(PROMPTS)
    x = jax.random.normal(jax.random.key(3), (len(PROMPTS), 32, 32, 3))
    x8, cond8 = shard_batch((x, cond), mesh)
    f8 = BatchShardedField(p8.field, mesh)
    c1, flops1 = _compiled(lambda f, x, c: f(x, jnp.float32(0.5), c), p1.field, x, cond)
    c8, flops8 = _compiled(lambda f, x, c: f(x, jnp.float32(0.5), c), f8, x8, cond8)
    v8 = c8(f8, x8, cond8)
    out["field"] = {
        "maxdiff": _maxdiff(c1(p1.field, x, cond), v8),
        "flops_single": flops1,
        "flops_sharded": flops8,
        "v": _batch_split(v8, mesh),
        "seconds": time.perf_counter() - t,
        "cpu_s": time.process_time(),
    }
    out["seconds"] = time.perf_counter() - t0
    return out


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "fast"
    result = {"fast": fast, "slow": slow}[which]()
    sys.stdout.write(json.dumps(result) + "\n")
