"""The baselines at their papers' settings (``rfmpc.inverse.paper``), D-Flow's midpoint sampler
and blended start, and the table's statistics (bootstrap CI, forward-equivalents)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rfmpc.flow.schedule import flowmatch_sigmas
from rfmpc.inverse import (
    PNP_FLOW_TASKS,
    DFlow,
    InnerSolver,
    IsotropicMixtureField,
    PnPFlow,
    add_noise,
    bootstrap_ci,
    forward_equivalents,
    paper_solver,
    task_preset,
)
from rfmpc.inverse.baselines import midpoint_rollout
from rfmpc.inverse.paper import DFLOW_OUTER_ITERS, PNP_FLOW_ALPHA

SHAPE = (8, 8, 3)


@pytest.fixture(scope="module")
def prior():
    means = jax.random.uniform(jax.random.key(0), (6, *SHAPE), minval=-1.0, maxval=1.0)
    return IsotropicMixtureField(means, 0.1)


def _measure(prior, task):
    preset = task_preset(task, SHAPE, jax.random.key(3))
    truth = prior.sample(jax.random.key(1), 2)
    y = add_noise(jax.random.key(2), preset.operator(truth), preset.noise_std)
    return preset, y


@pytest.mark.parametrize("task", PNP_FLOW_TASKS)
def test_pnp_flow_paper_setting(task):
    solver, rec = paper_solver("pnp-flow", task, 0.05)
    assert isinstance(solver, PnPFlow)
    assert (solver.num_steps, solver.lr, solver.n_avg) == (100, 1.0, 5)
    assert solver.alpha == PNP_FLOW_ALPHA[task] == rec["alpha"]
    assert rec["published"]


def test_pnp_flow_paper_counts(prior):
    preset, y = _measure(prior, "sr2")
    solver, _ = paper_solver("pnp-flow", "sr2", preset.noise_std)
    res = solver(prior, preset.operator, y, preset.noise_std, jax.random.key(4))
    assert (int(res.nfe), int(res.backprops)) == (500, 0)
    assert np.isfinite(np.asarray(res.image)).all()


@pytest.mark.parametrize("task", PNP_FLOW_TASKS)
def test_d_flow_paper_setting(task):
    solver, rec = paper_solver("d-flow", task, 0.05)
    assert isinstance(solver, DFlow)
    assert solver.blend == 0.1 and solver.reg == 0.001 and solver.integrator == "midpoint"
    assert solver.num_steps == 5
    assert solver.lam == pytest.approx(2 * 0.05**2)  # lam * Phi = ||A x - y||^2
    assert solver.inner.optimizer == "lbfgs" and solver.inner.memory == 100
    assert solver.inner.iters == 20 * DFLOW_OUTER_ITERS[task] == rec["lbfgs_iters"]


def test_other_baselines_say_unpublished():
    for m in ("flowchef", "flowgrad", "oc-flow"):
        _, rec = paper_solver(m, "denoise", 0.2)
        assert rec["published"] is False


def test_paper_solver_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown baseline"):
        paper_solver("mpc-rhc", "denoise", 0.2)
    with pytest.raises(ValueError, match="unknown task"):
        paper_solver("pnp-flow", "sr4", 0.05)
    with pytest.raises(ValueError, match="noise_std"):
        paper_solver("d-flow", "denoise", 0.0)


def test_midpoint_rollout_matches_hand_loop_and_is_second_order():
    """On dx/dsigma = x (exact x(0) = x(1) / e) the midpoint rule's error falls ~4x per halving."""

    def velocity(x, s):
        return x

    x1 = jnp.ones((1, 2, 2, 1))
    errs = []
    for n in (4, 8, 16):
        sig = jnp.linspace(1.0, 0.0, n + 1)
        got = midpoint_rollout(velocity, x1, sig)
        want = 1.0
        for s0, s1 in zip(np.asarray(sig[:-1]), np.asarray(sig[1:])):
            h = float(s1 - s0)
            want = want + h * (want + 0.5 * h * want)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
        errs.append(abs(float(got[0, 0, 0, 0]) - np.exp(-1.0)))
    assert 3.5 < errs[0] / errs[1] < 4.5 and 3.5 < errs[1] / errs[2] < 4.5


def test_d_flow_blended_start(prior):
    """With no optimisation, D-Flow returns the solve of its documented starting noise
    ``sqrt(b) ODE^{-1}(A^T y) + sqrt(1 - b) eps`` (eps from the key), and counts 2 solves."""
    preset, y = _measure(prior, "deblur")
    op, s = preset.operator, preset.noise_std
    b, key = 0.1, jax.random.key(5)
    solver = DFlow(num_steps=3, integrator="midpoint", blend=b, inner=InnerSolver("lbfgs", 0))
    res = solver(prior, op, y, s, key)
    sig = flowmatch_sigmas(3, 1.0)
    v = lambda x, t: prior(x, t)
    eps = jax.random.normal(key, y.shape)
    z0 = np.sqrt(b) * midpoint_rollout(v, op.adjoint(y), sig[::-1]) + np.sqrt(1 - b) * eps
    np.testing.assert_allclose(
        np.asarray(res.x), np.asarray(midpoint_rollout(v, z0, sig)), rtol=1e-4, atol=1e-5
    )
    assert (int(res.nfe), int(res.backprops)) == (12, 0)


def test_d_flow_paper_runs_and_counts(prior):
    preset, y = _measure(prior, "denoise")
    solver, _ = paper_solver("d-flow", "denoise", preset.noise_std)
    res = solver(prior, preset.operator, y, preset.noise_std, jax.random.key(6))
    evals = int(res.backprops) // 10
    assert evals >= 60  # at least one evaluation per L-BFGS iteration
    assert int(res.nfe) == 10 + 10 * evals + 10 and int(res.backprops) == 10 * evals
    # the optimisation fits the data better than the blended start alone
    start = DFlow(**{**_fields(solver), "inner": InnerSolver("lbfgs", 0)})
    res0 = start(prior, preset.operator, y, preset.noise_std, jax.random.key(6))
    assert np.all(
        np.asarray(res.diagnostics["data_fit"]) < np.asarray(res0.diagnostics["data_fit"])
    )


def _fields(solver):
    import dataclasses

    return {f.name: getattr(solver, f.name) for f in dataclasses.fields(solver)}


def test_d_flow_rejects_bad_integrator_and_blend():
    with pytest.raises(ValueError, match="integrator"):
        DFlow(integrator="rk4")
    with pytest.raises(ValueError, match="blend"):
        DFlow(blend=1.0)


def test_bootstrap_ci():
    m, lo, hi = bootstrap_ci([3.0] * 5)
    assert m == lo == hi == 3.0
    v = np.random.default_rng(1).normal(10.0, 2.0, 400)
    m, lo, hi = bootstrap_ci(v)
    assert lo < m < hi and m == pytest.approx(v.mean())
    half = 1.96 * v.std(ddof=1) / np.sqrt(v.size)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)
    assert bootstrap_ci(v) == (m, lo, hi)  # reproducible
    with pytest.raises(ValueError, match="at least 2"):
        bootstrap_ci([1.0])
    with pytest.raises(ValueError, match="non-finite"):
        bootstrap_ci([1.0, np.inf])


def test_forward_equivalents():
    assert forward_equivalents(115, 95, 3.0) == 115 + 2 * 95
    assert forward_equivalents(500, 0, 2.7) == 500
    with pytest.raises(ValueError, match="vjp_ratio"):
        forward_equivalents(10, 5, 0.5)
    with pytest.raises(ValueError, match="backprops"):
        forward_equivalents(5, 10, 2.0)
