"""rfmpc.parallel: meshes, the FSDP parameter rule, batch sharding, and sharded runs of the
pipeline, switch_batch and MPC-Flow that must equal the single-device runs.

The pytest process has already initialised JAX with one CPU device, so the multi-device checks
run in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` and
``JAX_PLATFORMS=cpu`` (``tests/_parallel_worker.py``), which prints JSON; the asserts are here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rfmpc.parallel import (
    BatchShardedField,
    initialize_distributed,
    make_mesh,
    param_spec,
    shard_batch,
    shard_params,
)

WORKER = Path(__file__).with_name("_parallel_worker.py")
ROOT = WORKER.parent.parent
ATOL = 1e-4  # float32, partial sums in another order (FSDP-split matmuls); images are in [0, 1]


def _run_worker(which: str) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(WORKER), which],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_eight_devices():
    """Every 8-device check on one subprocess run (one test, so that pytest-xdist does not start
    the costly worker once per process)."""
    multi = _run_worker("fast")
    _check_errors_on_eight_devices(multi)
    _check_params_are_sharded_over_fsdp(multi)
    _check_pipeline_matches_single_device(multi)
    _check_switch_batch_matches_single_device(multi)
    _check_mpc_flow_matches_single_device(multi)


def _assert_split(rec: dict, batch: int, data: int) -> None:
    """A batch array laid out over all 8 devices with its leading axis split over "data"."""
    assert rec["spec"] == str(P("data")), rec
    assert rec["devices"] == 8 and rec["batch"] == batch and rec["data_size"] == data
    assert rec["shard_rows"] == [batch // data], rec


# ----------------------------------------------------------------------------- in-process
def test_param_spec_rule():
    assert param_spec((2432, 9728), 4) == P(None, "fsdp")  # the largest divisible axis
    assert param_spec((9728, 2432), 4) == P("fsdp", None)
    assert param_spec((512, 512), 4) == P("fsdp", None)  # ties: the leading-most
    assert param_spec((3, 3, 510, 4096), 8) == P(None, None, None, "fsdp")
    assert param_spec((1023, 1025), 4) == P()  # no divisible axis: replicated
    assert param_spec((2432,), 4) == P()  # small (biases, norms): replicated
    assert param_spec((256, 256), 4) == P("fsdp", None)  # exactly MIN_SHARD_SIZE
    assert param_spec((256, 255), 5) == P()  # just below MIN_SHARD_SIZE
    assert param_spec((256, 255), 5, min_size=10) == P(None, "fsdp")
    assert param_spec((4096, 4096), 1) == P()  # fsdp = 1: nothing to split
    assert param_spec((), 4, min_size=0) == P()  # scalars
    with pytest.raises(ValueError, match="fsdp_size"):
        param_spec((8, 8), 0)


def test_one_device_mesh_is_the_identity():
    """On the pytest process's single device: a 1x1 mesh, values unchanged, errors named."""
    mesh = make_mesh()
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1}
    x = jnp.arange(12.0).reshape(3, 4)
    params = shard_params({"w": jnp.ones((512, 256)), "b": jnp.ones(3), "step": 7}, mesh)
    assert params["step"] == 7 and params["w"].sharding.spec == P()
    (xs,) = shard_batch((x,), mesh)
    np.testing.assert_array_equal(np.asarray(xs), np.asarray(x))
    f = BatchShardedField(lambda x, s, c: x * s, mesh)
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(xs, 2.0, None)), 2 * np.asarray(x))
    with pytest.raises(ValueError, match=r"data=2 x fsdp=1 = 2 devices, but 1 device"):
        make_mesh(data=2)
    with pytest.raises(ValueError, match="leading batch axis"):
        shard_batch({"a": jnp.float32(1.0)}, mesh)
    with pytest.raises(ValueError, match=r"not \['tensor'\]"):
        shard_params({"w": x}, mesh, axis="tensor")
    with pytest.raises(TypeError, match="velocity field"):
        BatchShardedField("not a field", mesh)


def test_pipeline_shard_asks_each_component():
    """``Pipeline.shard`` (and the old ``shard_pipeline``) place each component through its own
    declared ``shard`` method: the transformer's pytree and a VAE codec's weights are placed on
    the mesh, a component without ``shard`` (the stub text encoder) is left as it is, the
    original pipeline is not modified; values are unchanged on one device."""
    from _models import tiny_mmdit_pipeline
    from flax import nnx

    from rfmpc.models.vae import AutoencoderKL, VAEConfig
    from rfmpc.parallel import shard_pipeline
    from rfmpc.pipeline import VAECodec
    from rfmpc.sharding import Shardable

    mesh = make_mesh()
    pipe = tiny_mmdit_pipeline()
    cfg = VAEConfig(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    pipe.codec = VAECodec(AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    assert isinstance(pipe.transformer, Shardable) and isinstance(pipe.codec, Shardable)
    assert not isinstance(pipe.text_encoder, Shardable)
    for sharded in (pipe.shard(mesh), shard_pipeline(pipe, mesh)):
        assert sharded.mesh is mesh and pipe.mesh is None
        assert sharded.text_encoder is pipe.text_encoder
        assert sharded.codec is not pipe.codec
        for a, b in zip(jax.tree.leaves(pipe.transformer), jax.tree.leaves(sharded.transformer)):
            assert b.sharding.mesh == mesh
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        z = jnp.zeros((1, 4, 4, 4))
        np.testing.assert_allclose(
            np.asarray(sharded.codec.decode(z)), np.asarray(pipe.codec.decode(z)), atol=1e-6
        )
    pipe.transformer = object()
    with pytest.raises(TypeError, match="must be a Transformer"):
        pipe.shard(mesh)


def test_initialize_distributed_validates_before_initialising():
    with pytest.raises(ValueError, match="together"):
        initialize_distributed("localhost:1234", num_processes=2)
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\)"):
        initialize_distributed("localhost:1234", num_processes=2, process_id=2)
    with pytest.raises(ValueError, match="num_processes"):
        initialize_distributed("localhost:1234", num_processes=0, process_id=0)


# ----------------------------------------------------------------------------- 8 devices
def _check_errors_on_eight_devices(multi):
    e = multi["errors"]
    assert multi["devices"] == 8
    assert "data=3 x fsdp=1 = 3 devices, but 8 device(s)" in e["data_not_dividing"]
    assert "data=2 x fsdp=2 = 4 devices, but 8" in e["product_mismatch"]
    assert "fsdp=3 does not divide the 8 device(s)" in e["fsdp_not_dividing"]
    assert e["bad_size"].startswith("ValueError: data must be an int >= 1")
    assert "mesh has axes ('x', 'y'), not ['data', 'fsdp']" in e["unknown_axis"]
    assert "not ['model']" in e["unknown_axis_name"]
    assert e["hand_mesh_params"].startswith("ValueError") and "['fsdp']" in e["hand_mesh_params"]
    assert e["not_a_mesh"].startswith("TypeError: mesh must be a jax.sharding.Mesh")
    assert "batch size 6" in e["batch_not_multiple"]
    assert "'data' mesh axis size 4" in e["batch_not_multiple"]
    assert "leading batch axis" in e["scalar_leaf"]
    # the public entry points raise the same clear error, before any compilation
    for where in (e["pipeline_batch"], multi["switch"]["error_batch"]):
        assert where.startswith("ValueError: batch size 3"), where
        assert "mesh axis size 4" in where
    assert multi["restore"]["error_batch"].startswith("ValueError: batch size 3")


def _check_params_are_sharded_over_fsdp(multi):
    p = multi["params"]
    assert multi["mesh_shape"] == {"data": 4, "fsdp": 2}
    assert "SingleDeviceSharding" in multi["params_single"]  # mesh=None: today's layout
    # every large parameter of the embedded MM-DiT is split in two, small ones replicated
    assert p["sharded"] >= 20 and p["sharded_shards_ok"]
    assert p["sharded_elements"] > 0.6 * p["elements"]
    assert p["largest_spec"] == str(P(None, "fsdp"))
    assert p["largest_shard_shape"] == [p["largest_shape"][0], p["largest_shape"][1] // 2]
    assert p["smallest_spec"] == str(P())


def _check_pipeline_matches_single_device(multi):
    r = multi["pipeline"]
    assert r["image_std"] > 0.1  # real images, not a constant
    assert r["maxdiff_images"] < ATOL and r["maxdiff_latents"] < ATOL, r
    _assert_split(r["latents"], batch=8, data=4)


def _check_switch_batch_matches_single_device(multi):
    r = multi["switch"]
    assert r["from_a"] > 1.0  # B's result, not A's: the comparison is not vacuous
    assert r["maxdiff"] < ATOL * max(1.0, r["x_std"]), r
    assert r["nfe_equal"]
    _assert_split(r["x"], batch=8, data=4)


def _check_mpc_flow_matches_single_device(multi):
    r = multi["restore"]
    tol = 1e-3 * r["x_std"]  # the data fit's 1/noise_std^2 = 400 amplifies rounding
    assert r["maxdiff"] < tol and r["maxdiff_compiled"] < tol, r
    assert r["nfe"][0] == r["nfe"][1] > 0 and r["backprops"][0] == r["backprops"][1] > 0
    assert abs(r["fit"][0] - r["fit"][1]) <= 1e-3 * r["fit"][0]
    _assert_split(r["x"], batch=4, data=4)
    _assert_split(r["x_compiled"], batch=4, data=4)
    assert r["compiled_mesh"] == [True, True]
    # each device runs a quarter of the batch: its program does ~1/4 of the flops
    assert r["flops"][1] < 0.35 * r["flops"][0], r["flops"]


@pytest.mark.slow
def test_slow_data_parallel_and_model_restore():
    """Pure data parallelism on 8 devices (mesh given to the call only); MPC-Flow with K = 2
    (backprop through the FSDP-sharded model); one model call's flops per device."""
    r = _run_worker("slow")
    assert r["data8"]["maxdiff_images"] < ATOL
    _assert_split(r["data8"]["latents"], batch=8, data=8)
    m = r["restore_model"]
    assert m["maxdiff"] < 1e-3 * m["x_std"] and m["maxdiff_compiled"] < 1e-3 * m["x_std"], m
    assert m["backprops"][0] == m["backprops"][1] > 0
    _assert_split(m["x"], batch=4, data=4)
    assert m["flops"][1] < 0.35 * m["flops"][0]
    f = r["field"]
    assert f["maxdiff"] < ATOL
    _assert_split(f["v"], batch=8, data=4)
    # data 4 x fsdp 2: XLA splits the matmuls over "fsdp" too (~1/8 of the work per device)
    assert f["flops_sharded"] < 0.25 * f["flops_single"]


@pytest.mark.slow
def test_slow_two_processes():
    """A real 2-process run on CPU (2 devices each, gloo collectives over localhost):
    ``initialize_distributed``, global arrays built from each process's full copy, a
    batch-sharded field with FSDP-sharded weights, an MPC-Flow restore, ``gather``."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    script = str(WORKER.with_name("_parallel_multihost.py"))
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(port), str(pid)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in (0, 1)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"{out[-2000:]}\n{err[-4000:]}"
    res = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    for pid, r in enumerate(res):
        assert r["info"] == {
            "process_index": pid,
            "process_count": 2,
            "local_devices": 2,
            "global_devices": 4,
        }
        assert r["idempotent"]
        assert r["w_spec"] == str(P("fsdp", None))
        assert r["w_local_shards"] == [[384, 768], [384, 768]]  # a 768x768 weight split in two
        assert r["x_local_rows"] == [2, 2]  # batch 4 over data = 2
        assert r["field_maxdiff"] < 1e-5
        assert r["restore_maxdiff"] < 1e-4 and not r["restore_fully_addressable"]
