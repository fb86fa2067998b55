"""The public API's jaxtyping annotations are true: checked at run time with beartype.

Each public entry point is wrapped here with ``jaxtyping.jaxtyped(typechecker=beartype)`` (the
library itself never pays for run-time checks) and called with correctly shaped inputs on tiny
models and analytic fields: every argument and return annotation must hold, shape names bound
consistently within a call. A few calls with a wrong shape or dtype must then raise the
type checker's error (``jaxtyping.TypeCheckError``), before the function's own validation.
"""

from __future__ import annotations

import beartype
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
from _models import tiny_mmdit_pipeline

import rfmpc.control as C
import rfmpc.inverse as I
from rfmpc import sharding
from rfmpc.flow import (
    ConditionalGaussianMixture,
    TrajectoryState,
    flowmatch_sigmas,
    init_state,
    integrate,
    integrate_path,
    shift_sigmas,
    timesteps_from_sigmas,
)
from rfmpc.pipeline import ModelField, Pipeline, PipelineOutput
from rfmpc.restore import Prior, Restoration, restore

TypeCheckError = jaxtyping.TypeCheckError


def checked(fn):
    """``fn`` with its annotations enforced (arguments and return value)."""
    return jaxtyping.jaxtyped(typechecker=beartype.beartype)(fn)


@pytest.fixture(scope="module")
def tiny():
    return tiny_mmdit_pipeline(16)


@pytest.fixture(scope="module")
def gmm():
    """A 2-D conditional Gaussian mixture (prompt B's means shifted) and A's state at k = 2."""
    means = jnp.array([[[-1.5, 0.0], [1.5, 0.5]], [[-1.1, 0.3], [1.8, 0.1]]])
    cov = jnp.broadcast_to(0.1 * jnp.eye(2), (2, 2, 2, 2))
    field = ConditionalGaussianMixture(jnp.ones((2, 2)) / 2, means, cov)
    sig = flowmatch_sigmas(6)
    st0 = checked(init_state)(jax.random.key(3), (16, 2), sig, jnp.int32(0))
    return field, checked(integrate)(field, st0, stop=2)


def test_flow_core(getkey):
    sig = checked(flowmatch_sigmas)(5, shift=3.0)
    checked(shift_sigmas)(sig, 2.0)
    checked(timesteps_from_sigmas)(sig)
    field = lambda x, s, c: jnp.tanh(x * c) + s - x
    x = jax.random.normal(getkey(), (2, 4, 4, 3))
    st = checked(integrate)(field, x, sig, 0.5, stop=3)
    assert isinstance(st, TrajectoryState)
    st2, xs = checked(integrate_path)(field, st)
    assert xs.shape == (3, *x.shape) and int(st2.step) == 5
    with pytest.raises(TypeCheckError):  # a 2-D grid is not Float[Array, " n_plus_1"]
        checked(integrate)(field, x, sig[None], 0.5)


def test_models_and_pipeline(tiny):
    tr = tiny.transformer
    h, ctx, pooled = jnp.zeros((2, 16, 16, 3)), jnp.zeros((2, 4, 8)), jnp.zeros((2, 8))
    t = jnp.full((2,), 500.0)
    call, apply = checked(type(tr).__call__), checked(type(tr).apply)
    assert call(tr, h, t, ctx, pooled).shape == h.shape
    assert call(tr, h, 500.0, ctx, pooled).shape == h.shape  # a scalar timestep
    assert apply(tr, tr.params, h, t, ctx, pooled).shape == h.shape
    cond = {"embeds": ctx[:1], "pooled": pooled[:1]}
    checked(ModelField.__call__)(tiny.field, h[:1], jnp.float32(0.5), cond)
    checked(Pipeline.sigmas)(tiny, 3)
    checked(Pipeline.decode)(tiny, h)
    out = checked(Pipeline.__call__)(tiny, ["a"], seed=0, num_inference_steps=1)
    assert isinstance(out, PipelineOutput)

    with pytest.raises(TypeCheckError):  # NHWC needs rank 4
        call(tr, h[0], t, ctx, pooled)
    with pytest.raises(TypeCheckError):  # batch 2 images, 3 pooled vectors: "b" disagrees
        call(tr, h, t, ctx, jnp.zeros((3, 8)))
    with pytest.raises(TypeCheckError):  # integer images are not Float
        apply(tr, tr.params, h.astype(jnp.int32), t, ctx, pooled)


@pytest.mark.parametrize(
    "controller", [C.Direct(), C.MPC(), C.Shooting()], ids=lambda c: type(c).__name__
)
def test_controllers(gmm, controller, monkeypatch):
    field, st = gmm
    cls = type(controller)
    for name in ("schedule", "init", "step"):  # the controller protocol, where defined
        if name in vars(cls):
            monkeypatch.setattr(cls, name, checked(vars(cls)[name]))
    res = checked(C.switch)(field, st, jnp.int32(1), controller)
    assert isinstance(res, C.SwitchResult)


def test_switch_batch_and_baseline(gmm):
    field, st = gmm
    states = checked(C.stack_states)([st, st])
    res = checked(C.switch_batch)(field, states, jnp.array([1, 1], jnp.int32), C.Direct())
    assert isinstance(res, C.BatchSwitchResult)
    noise = jax.random.normal(jax.random.key(0), st.x.shape)
    assert isinstance(
        checked(C.from_scratch_equal_nfe)(field, noise, jnp.int32(1), 4), TrajectoryState
    )


SHAPE = (8, 8, 3)


@pytest.fixture(scope="module")
def mixture():
    means = jax.random.uniform(jax.random.key(0), (4, *SHAPE), minval=-1.0, maxval=1.0)
    return I.IsotropicMixtureField(means, 0.1)


def test_inverse_solvers_and_restore(mixture):
    preset = checked(I.task_preset)("sr2", SHAPE, jax.random.key(3))
    truth = mixture.sample(jax.random.key(1), 2)
    op = preset.operator
    y = checked(I.add_noise)(jax.random.key(2), checked(type(op).__call__)(op, truth), 0.05)
    for method in ("mpc-k1", "pnp-flow"):
        solver = checked(I.make_solver)(method)
        res = checked(type(solver).__call__)(solver, mixture, op, y, 0.05, jax.random.key(4))
        assert isinstance(res, I.RestoreResult) and res.x.shape == truth.shape
    prior = Prior(name="mixture", field=mixture, image_shape=SHAPE)
    rec = checked(restore)(prior, task="sr2", method="mpc-k1", truth=truth[:1])
    assert isinstance(rec, Restoration)


def test_metrics():
    x = jax.random.uniform(jax.random.key(0), (2, *SHAPE))
    ref = jnp.clip(x + 0.05, 0.0, 1.0)
    assert checked(I.psnr)(x, ref).shape == (2,)
    assert checked(I.ssim)(x, ref).shape == (2,)
    assert checked(I.to_unit)(2 * x - 1).shape == x.shape
    assert checked(I.ssim_skimage)(np.asarray(x), np.asarray(ref)).shape == (2,)
    checked(I.bootstrap_ci)(np.arange(10.0))
    checked(I.forward_equivalents)(10, 5, 2.0)
    checked(I.peak_memory)()
    checked(I.timed)(lambda a: a + 1, x)
    with pytest.raises(TypeCheckError):  # 2 images against 3 references: "b" disagrees
        checked(I.psnr)(x, jnp.concatenate([ref, ref[:1]]))
    with pytest.raises(TypeCheckError):  # integer images are not Float
        checked(I.ssim)(x.astype(jnp.int32), ref)


def test_sharding_helpers():
    mesh = checked(sharding.make_mesh)()
    checked(sharding.check_mesh)(mesh, sharding.DATA)
    checked(sharding.batch_sharding)(mesh)
    tree = {"a": jnp.ones((len(jax.devices()) * 2, 3))}
    checked(sharding.shard_batch)(tree, mesh)
    checked(sharding.replicate)(tree, mesh)
    checked(sharding.param_spec)((64, 64), 1)
    checked(sharding.shard_params)(tree, mesh)
    checked(sharding.gather)(tree["a"])
    with pytest.raises(TypeCheckError):  # data must be an int (or None)
        checked(sharding.make_mesh)(data="1")
