"""One process of a 2-process CPU run for tests/test_parallel.py (multi-host paths).

Usage: ``XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu python
tests/_parallel_multihost.py PORT PROCESS_ID``. Joins the run with
:func:`rfmpc.parallel.initialize_distributed`, builds a ``data=2 x fsdp=2`` mesh over the 4
global devices (2 per process), places a batch and parameters from each process's full copy,
runs a batch-sharded field and an MPC-Flow restore, gathers the results and prints JSON with
the max abs difference from the same computation done locally without a mesh.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from rfmpc.parallel import (
    BatchShardedField,
    gather,
    initialize_distributed,
    make_mesh,
    shard_batch,
    shard_params,
)


def _field(x, sigma, cond):
    b = x.shape[0]
    return (jnp.tanh(x.reshape(b, -1) @ cond["w"]) * sigma).reshape(x.shape)


def main(port: int, pid: int) -> dict:
    info = initialize_distributed(f"localhost:{port}", num_processes=2, process_id=pid)
    again = initialize_distributed(f"localhost:{port}", num_processes=2, process_id=pid)
    mesh = make_mesh(data=2, fsdp=2)
    rng = np.random.default_rng(0)  # every process holds the same full inputs
    x = rng.standard_normal((4, 16, 16, 3)).astype(np.float32)
    w = (0.02 * rng.standard_normal((768, 768))).astype(np.float32)
    params = shard_params({"w": w}, mesh)
    xs = shard_batch(x, mesh)
    field = BatchShardedField(_field, mesh)
    v = jax.jit(field)(xs, jnp.float32(0.5), params)
    ref = _field(jnp.asarray(x), jnp.float32(0.5), {"w": jnp.asarray(w)})
    out = {
        "info": info,
        "idempotent": again == info,
        "w_spec": str(params["w"].sharding.spec),
        "w_local_shards": [list(s.data.shape) for s in params["w"].addressable_shards],
        "x_local_rows": [int(s.data.shape[0]) for s in xs.addressable_shards],
        "field_maxdiff": float(np.max(np.abs(np.asarray(gather(v)) - np.asarray(ref)))),
    }
    from rfmpc.inverse import IsotropicMixtureField, box_inpainting, mpc_k1

    prior = IsotropicMixtureField(rng.uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32), tau=0.2)
    truth = np.asarray(prior.sample(jax.random.key(1), 4))
    op = box_inpainting(truth.shape[1:], box=(2, 2, 4, 4))
    y = np.asarray(op(jnp.asarray(truth)))
    solver = mpc_k1(num_steps=3)
    r1 = solver(prior, op, jnp.asarray(y), 0.05, jax.random.key(2))
    r2 = solver(prior, op, y, 0.05, jax.random.key(2), mesh=mesh)
    out["restore_maxdiff"] = float(np.max(np.abs(np.asarray(gather(r2.x)) - np.asarray(r1.x))))
    out["restore_fully_addressable"] = bool(r2.x.is_fully_addressable)
    return out


if __name__ == "__main__":
    res = main(int(sys.argv[1]), int(sys.argv[2]))
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()
