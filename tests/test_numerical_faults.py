"""Numerical faults are detected, fall back to the safe controller and are recorded, never silent.

Every fault is provoked on purpose on the exact Gaussian-mixture field: a QP that cannot converge
(iteration cap 1) or converges to garbage (tolerance 1e3) that leaves the box, a field whose
*Jacobian* is NaN while its value is finite (the linearisation / gradient fails, the command does
not), a shooting step size so large the objective diverges, a warm start with exploding controls,
a field that is NaN in a far region (a controlled rollout ends NaN, the command's does not), and
a field that is NaN below some sigma (no safe result exists: a clear error). Then: the latent is
finite, ``fallback`` is set with a reason saying what happened, per-step counts are in the
diagnostics, and the result equals what the safe controller (the command alone) gives.
"""

from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rfmpc.control import MPC, OSQP, RESULTS, Blend, Direct, Frozen, JVPBlocks, Shooting, switch
from rfmpc.flow import (
    ConditionalGaussianMixture,
    GaussianMixture,
    TrajectoryState,
    flowmatch_sigmas,
    init_state,
    integrate,
    integrate_path,
)
from rfmpc.inverse import Identity, InnerSolver, MPCFlow, PnPFlow
from rfmpc.pipeline import Pipeline, PixelCodec

N, K = 8, 3  # grid steps, switch step


class NaNJacobian(eqx.Module):
    """The field's value, but a NaN derivative: ``0 * sqrt(x - x)`` is 0 with an infinite slope."""

    field: ConditionalGaussianMixture

    def __call__(self, x, sigma, cond):
        return self.field(x, sigma, cond) + 0.0 * jnp.sqrt(x - x)


class NaNBelow(eqx.Module):
    """NaN wherever ``sigma < level`` and ``max |x| > radius`` (radius 0: everywhere below)."""

    field: ConditionalGaussianMixture
    level: float = eqx.field(static=True)
    radius: float = eqx.field(static=True, default=0.0)

    def __call__(self, x, sigma, cond):
        v = self.field(x, sigma, cond)
        far = jnp.max(jnp.abs(x)) > self.radius
        return jnp.where((sigma < self.level) & far, jnp.nan, v)


@pytest.fixture(scope="module")
def case():
    means = jnp.array([[-1.5, 0.0], [1.5, 0.5]])
    cov = 0.1 * jnp.broadcast_to(jnp.eye(2), (2, 2, 2))
    gm = ConditionalGaussianMixture(
        jnp.ones((2, 2)) / 2, jnp.stack([means, means + 0.3]), jnp.stack([cov, cov])
    )
    sig = flowmatch_sigmas(N)
    st0 = init_state(jax.random.key(1), (16, 2), sig, jnp.int32(0))
    _, xs = integrate_path(gm, st0)
    state = TrajectoryState(xs[K], K, sig, key=st0.key, cond=jnp.int32(0))
    direct = switch(gm, state, jnp.int32(1), Direct())
    assert not direct.fallback
    return gm, state, direct.state.x


def _same_as(r, ref, atol=0.0):
    x = np.asarray(r.state.x)
    assert np.isfinite(x).all()
    np.testing.assert_allclose(x, np.asarray(ref), rtol=0, atol=atol)


# ------------------------------------------------------------------------------ MPC
def test_mpc_qp_not_converged_runs_the_blend_command(case):
    gm, st, _ = case
    ctrl = MPC(
        linearisation=JVPBlocks(),
        solver=OSQP(maxiter=1),
        control_steps=None,
        command=Blend(transition_steps=3),
    )
    r = switch(gm, st, jnp.int32(1), ctrl)
    assert r.fallback and r.outcome == "qp_not_converged"
    assert "did not converge" in r.fallback_reason and f"on {N - K} of {N - K} steps" in (
        r.fallback_reason
    )
    assert r.diagnostics["fallback_counts"]["qp_not_converged"] == N - K
    assert r.diagnostics["step_results"] == ["qp_not_converged"] * (N - K)
    blend = switch(gm, st, jnp.int32(1), Blend(transition_steps=3))
    _same_as(r, blend.state.x, atol=2e-5)


def test_mpc_bound_violation_is_rejected(case):
    """A tolerance of 1e3 'converges' at once; with a tiny ADMM step (rho) the first iterate is
    the unconstrained minimiser, far outside |u| <= 0.01."""
    gm, st, direct = case
    ctrl = MPC(linearisation=JVPBlocks(), solver=OSQP(tol=1e3, rho_start=1e-6), u_max=0.01)
    r = switch(gm, st, jnp.int32(1), ctrl)
    assert r.fallback and "left the box |u| <= u_max" in r.fallback_reason
    assert "bound_violation on 3 of 3 steps" in r.fallback_reason
    assert r.diagnostics["fallback_counts"]["bound_violation"] == 3
    _same_as(r, direct, atol=1e-6)
    # the closed form clips into the box instead, and its KKT check reports the clipping
    ok = switch(gm, st, jnp.int32(1), MPC(u_max=0.05))
    assert not ok.fallback and ok.fallback_reason is None
    assert float(np.max(ok.diagnostics["control_rms"])) <= 0.05 * (1 + 1e-6)
    assert np.all(np.asarray(ok.diagnostics["kkt_residual"]) >= 0)


def test_mpc_nan_jacobian_falls_back_per_step(case):
    gm, st, direct = case
    r = switch(NaNJacobian(gm), st, jnp.int32(1), MPC(linearisation=Frozen()))
    assert r.fallback and r.outcome == "control_nonfinite"
    assert "control_nonfinite on 3 of 3 steps" in r.fallback_reason
    assert r.diagnostics["step_results"] == ["control_nonfinite"] * 3
    _same_as(r, direct, atol=1e-6)


# ------------------------------------------------------------------------------ shooting
def test_shooting_nan_gradient_discards_the_plan(case):
    gm, st, direct = case
    r = switch(NaNJacobian(gm), st, jnp.int32(1), Shooting())
    assert r.outcome == "plan_nonfinite"
    assert r.diagnostics["optimiser_result"] == RESULTS.optimiser_nonfinite
    assert r.fallback and "gradient became non-finite" in r.fallback_reason
    assert "plan was discarded" in r.fallback_reason
    _same_as(r, direct)


def test_shooting_divergence_is_detected(case):
    """SGD with step 1e6: the objective grows by 1e20 (before: status 'converged', by stall)."""
    gm, st, direct = case
    r = switch(gm, st, jnp.int32(1), Shooting(learning_rate=1e6, optimizer="sgd", max_iter=6))
    assert r.outcome == "plan_diverged"
    hist = np.asarray(r.diagnostics["objective"])
    assert hist[int(r.diagnostics["iterations"]) - 1] > 1e3 * hist[0]
    assert r.fallback and "diverged" in r.fallback_reason
    _same_as(r, direct)


def test_exploding_warm_start_control_is_rejected(case):
    """A warm start of 1e6 (before: applied as is, the latent ended at |x| ~ 7e4)."""
    gm, st, direct = case
    init = jnp.full((3, *st.x.shape), 1e6)
    r = switch(gm, st, jnp.int32(1), Shooting(max_iter=1, init_controls=init))
    assert r.fallback and "exceeded max_control" in r.fallback_reason
    assert float(r.diagnostics["peak_control"]) == pytest.approx(1e6)
    _same_as(r, direct)


def test_nonfinite_controlled_rollout_reruns_the_command(case):
    """Finite plan (|u| = 50 < max_control), but the state it reaches is NaN for the field
    once sigma drops below the plan's horizon: the direct command is re-run and returned."""
    gm, st, direct = case
    level = float(st.sigmas[K + 3])  # the horizon ends here: the plan itself stays finite
    field = NaNBelow(gm, level=level, radius=6.0)
    init = jnp.full((3, *st.x.shape), 50.0)
    r = switch(field, st, jnp.int32(1), Shooting(max_iter=1, init_controls=init))
    # the optimiser ran to max_iter without a fault: the plan passed its own checks
    assert r.diagnostics["optimiser_result"] == RESULTS.successful
    assert not bool(r.diagnostics["stopped_early"]) and int(r.diagnostics["iterations"]) == 1
    assert r.fallback and r.outcome == "rollout_nonfinite"
    assert "rollout ended non-finite" in r.fallback_reason
    _same_as(r, direct)


def test_field_nan_for_b_raises_naming_the_step(case):
    gm, st, _ = case
    sig = np.asarray(st.sigmas)
    field = NaNBelow(gm, level=float(sig[6]) + 1e-4)  # NaN from grid step 6 on
    for ctrl in (Direct(), MPC()):
        with pytest.raises(FloatingPointError, match=r"grid step 6 \(sigma .*\) of 8 produced"):
            switch(field, st, jnp.int32(1), ctrl)


# ------------------------------------------------------------------------------ inverse
def _gmm_prior():
    means = jnp.array([[0.5, -0.5], [-0.5, 0.5]])
    return GaussianMixture(jnp.ones(2) / 2, means, 0.05 * jnp.broadcast_to(jnp.eye(2), (2, 2, 2)))


class PixelPrior(eqx.Module):
    """The 2-D mixture applied to every pixel of an NHWC image with 2 channels, NaN far away."""

    gm: object
    radius: float = eqx.field(static=True, default=jnp.inf)
    level: float = eqx.field(static=True, default=-1.0)

    def __call__(self, x, sigma, cond):
        v = self.gm.velocity(x.reshape(-1, 2), sigma).reshape(x.shape)
        far = jnp.max(jnp.abs(x)) > self.radius
        return jnp.where(far | (sigma < self.level), jnp.nan, v)


def test_mpc_flow_rejects_nan_inner_steps_and_records_them():
    """Adam with step 1e3 jumps into the prior's NaN region on every step: each such iteration
    is rejected, the last finite iterate (no control) is kept, so the restoration is exactly
    the unguided prior sample, and the rejections are counted. Before: a NaN image."""
    prior = PixelPrior(_gmm_prior(), radius=20.0)
    y = jnp.full((2, 4, 4, 2), 0.3)
    solver = MPCFlow(num_steps=6, inner=InnerSolver("adam", 4, 1e3))
    res = solver(prior, Identity(), y, 0.1, jax.random.key(0))
    assert np.isfinite(np.asarray(res.x)).all()
    rejected = int(res.diagnostics["rejected_steps"])
    assert rejected >= 6  # at least one per sampler step (measured: every other iteration)
    assert int(res.diagnostics["fallback_steps"]) == 0
    x0 = jax.random.normal(jax.random.key(0), y.shape, y.dtype)
    unguided = integrate(prior, x0, flowmatch_sigmas(6, 1.0), None).x
    np.testing.assert_allclose(np.asarray(res.x), np.asarray(unguided), atol=1e-5)
    # a sane step size on the same problem: nothing rejected, and it does fit the data better
    # tolerated rejections are counted, not an outcome: the solve itself succeeded
    assert res.result == RESULTS.successful
    ok = MPCFlow(num_steps=6)(prior, Identity(), y, 0.1, jax.random.key(0))
    assert int(ok.diagnostics["rejected_steps"]) == 0
    assert float(jnp.sum(ok.diagnostics["data_fit"])) < float(jnp.sum(res.diagnostics["data_fit"]))


@pytest.mark.parametrize("solver", [MPCFlow(num_steps=4), PnPFlow(num_steps=4)], ids=["mpc", "pnp"])
def test_inverse_solver_raises_on_a_nan_prior(solver):
    """No safe result: the compiled solve raises its outcome, naming the solver (throw=True, the
    default); with throw=False the outcome and the images concerned ([0, 1]) are reported."""
    prior = PixelPrior(_gmm_prior(), level=0.3)  # the prior itself is NaN below sigma 0.3
    y = jnp.full((2, 4, 4, 2), 0.3)
    name = type(solver).__name__
    with pytest.raises(eqx.EquinoxRuntimeError, match=rf"{name}: the restoration's .* non-finite"):
        solver(prior, Identity(), y, 0.1, jax.random.key(0))
    res = solver(prior, Identity(), y, 0.1, jax.random.key(0), throw=False)
    assert res.result == RESULTS.restoration_nonfinite
    assert np.flatnonzero(np.asarray(res.diagnostics["nonfinite"])).tolist() == [0, 1]


# ------------------------------------------------------------------------------ pipeline
@dataclass(frozen=True)
class _Config:
    patch_size: int = 1


class _NaNTransformer(eqx.Module):
    """A stand-in MM-DiT: ``v = params * x``, NaN below sigma 0.5 for prompts mentioning "nan"."""

    params: jax.Array
    buffers: None = None
    config: _Config = eqx.field(static=True, default=_Config())

    def apply(self, params, x, t, embeds, pooled, buffers=None):
        bad = (pooled[:, 0] > 0) & (t < 500.0)
        return jnp.where(bad[:, None, None, None], jnp.nan, params * x)


def _text_encoder(prompts, max_sequence_length=None):
    flag = jnp.array([float("nan" in p) for p in prompts])
    n = len(prompts)
    return {"embeds": jnp.zeros((n, 2, 4)), "pooled": jnp.broadcast_to(flag[:, None], (n, 4))}


def test_pipeline_nan_raises_naming_step_and_prompt():
    pipe = Pipeline(
        transformer=_NaNTransformer(jnp.float32(0.5)),
        text_encoder=_text_encoder,
        codec=PixelCodec(),
        shift=1.0,
        default_size=(4, 4),
        default_steps=4,
        default_guidance=1.0,
    )
    sig = np.asarray(flowmatch_sigmas(4, 1.0))  # 1, 0.667, 0.334, 0.001, 0: NaN from step 2
    msg = rf"denoising step 2 of 4 \(sigma {sig[2]:.4g} -> {sig[3]:.4g}\).* 1: 'a nan'"
    with pytest.raises(FloatingPointError, match=msg):
        pipe(["fine", "a nan"], seed=0)
    good = pipe(["fine", "also fine"], seed=0)  # the same model is finite for other prompts
    assert np.isfinite(good.images).all() and good.images.shape == (2, 4, 4, 3)
