"""The inverse solvers report one outcome, a ``RESULTS`` item decided in the compiled graph, and
``throw=True`` (the default, as diffrax's) raises it from inside the graph: a single call, a call
under the caller's ``jax.jit`` and a ``jax.vmap``-ped one alike.

The prior is the 2-D Gaussian mixture on every pixel; a NaN is provoked on purpose below a noise
level for the conditionings that ask for it (``cond > 0``), so one vmapped batch holds a sound
and a broken solve.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rfmpc.flow import GaussianMixture
from rfmpc.flow.results import OUTCOMES, RESULTS, outcome_code
from rfmpc.inverse import (
    DFlow,
    FlowChef,
    FlowGrad,
    Identity,
    InnerSolver,
    MPCFlow,
    OCFlow,
    PnPFlow,
)

Y = jnp.full((2, 4, 4, 2), 0.3)
#: equinox raises EquinoxRuntimeError through its own filter_jit; under a plain jax.jit the same
#: message comes as a JaxRuntimeError
RAISED = (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError)


class PixelPrior(eqx.Module):
    """The mixture's velocity on every pixel of an NHWC image with 2 channels; NaN below sigma
    ``level`` when ``cond > 0`` (``cond=None``: never)."""

    gm: GaussianMixture
    level: float = eqx.field(static=True, default=0.3)

    def __call__(self, x, sigma, cond):
        v = self.gm.velocity(x.reshape(-1, 2), sigma).reshape(x.shape)
        if cond is None:
            return v
        return jnp.where((cond > 0) & (sigma < self.level), jnp.nan, v)


@pytest.fixture(scope="module")
def prior():
    means = jnp.array([[0.5, -0.5], [-0.5, 0.5]])
    cov = 0.05 * jnp.broadcast_to(jnp.eye(2), (2, 2, 2))
    return PixelPrior(GaussianMixture(jnp.ones(2) / 2, means, cov))


SOLVERS = [
    MPCFlow(num_steps=4),
    MPCFlow(horizon="dt", num_steps=3, inner=InnerSolver("adam", 2, 0.05)),
    PnPFlow(num_steps=4),
    DFlow(num_steps=3, inner=InnerSolver("lbfgs", 2, 1.0)),
    FlowGrad(num_steps=3, inner=InnerSolver("adam", 2, 0.05)),
    OCFlow(num_steps=3, iters=2),
    FlowChef(num_steps=4),
]
IDS = ["mpc-rhc", "mpc-dt", "pnp", "d-flow", "flowgrad", "oc-flow", "flowchef"]


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_every_solver_reports_its_outcome(prior, solver):
    """Sound: ``successful``, nothing flagged. NaN prior with ``throw=False``: the result is
    returned with ``restoration_nonfinite`` and both images flagged; by default it raises,
    naming the solver and the outcome."""
    ok = solver(prior, Identity(), Y, 0.1, jax.random.key(0))
    assert ok.result == RESULTS.successful
    assert not np.asarray(ok.diagnostics["nonfinite"]).any()
    assert np.isfinite(np.asarray(ok.image)).all()

    bad = solver(prior, Identity(), Y, 0.1, jax.random.key(0), cond=1.0, throw=False)
    assert bad.result == RESULTS.restoration_nonfinite
    assert np.asarray(bad.diagnostics["nonfinite"]).tolist() == [True, True]
    name = type(solver).__name__
    with pytest.raises(eqx.EquinoxRuntimeError, match=rf"{name}: the restoration's final state"):
        solver(prior, Identity(), Y, 0.1, jax.random.key(0), cond=1.0)


def test_throw_raises_inside_jit_and_vmap_alike(prior):
    solver = MPCFlow(num_steps=4)
    key = jax.random.key(0)

    def one(cond, throw):
        return solver(prior, Identity(), Y, 0.1, key, cond=cond, throw=throw)

    # inside the caller's jit
    with pytest.raises(RAISED, match="MPCFlow: the restoration's final state or decoded image"):
        jax.block_until_ready(jax.jit(lambda c: one(c, True).x)(jnp.float32(1.0)))
    fine = jax.jit(lambda c: one(c, True).x)(jnp.float32(-1.0))
    assert np.isfinite(np.asarray(fine)).all()

    # vmapped over conditionings: one outcome per element, the same as the single calls
    conds = jnp.array([-1.0, 1.0])
    batched = jax.jit(jax.vmap(lambda c: one(c, False)))(conds)
    names = [OUTCOMES[int(c)] for c in np.asarray(outcome_code(batched.result))]
    assert names == ["successful", "restoration_nonfinite"]
    single = one(1.0, False)
    np.testing.assert_array_equal(
        np.asarray(batched.diagnostics["nonfinite"][1]), np.asarray(single.diagnostics["nonfinite"])
    )
    np.testing.assert_allclose(
        np.asarray(batched.x[0]), np.asarray(one(-1.0, False).x), rtol=1e-5, atol=1e-6
    )
    # ... and with throw=True one broken element raises for the batch, jitted or not
    with pytest.raises(RAISED, match="MPCFlow: the restoration's final state"):
        jax.block_until_ready(jax.jit(jax.vmap(lambda c: one(c, True).x))(conds))
    with pytest.raises(RAISED, match="MPCFlow: the restoration's final state"):
        jax.block_until_ready(jax.vmap(lambda c: one(c, True).x)(conds))


def test_mmse_average_and_compiled_solve_report_the_outcome(prior):
    solver = MPCFlow(num_steps=3, mmse_samples=2)
    ok = solver(prior, Identity(), Y, 0.1, jax.random.key(0))
    assert ok.result == RESULTS.successful and not np.asarray(ok.diagnostics["nonfinite"]).any()
    bad = solver(prior, Identity(), Y, 0.1, jax.random.key(0), cond=1.0, throw=False)
    assert bad.result == RESULTS.restoration_nonfinite
    assert np.asarray(bad.diagnostics["nonfinite"]).tolist() == [True, True]

    compiled = MPCFlow(num_steps=3).compile(
        prior, Identity(), Y, 0.1, jax.random.key(0), cond=1.0, throw=False
    )
    assert compiled().result == RESULTS.restoration_nonfinite
    raising = MPCFlow(num_steps=3).compile(prior, Identity(), Y, 0.1, jax.random.key(0), cond=1.0)
    with pytest.raises(RAISED, match="MPCFlow: the restoration"):  # ahead of time: JaxRuntimeError
        jax.block_until_ready(raising())


def test_an_unguided_step_is_reported_as_a_fallback(prior):
    """MPC-Flow's sub-problem fallback (a non-finite applied control runs the unguided step)
    makes the outcome ``control_nonfinite``; a NaN warm start is the one way to provoke it, as
    the inner loop never returns a rejected iterate."""
    from rfmpc.inverse import mpc_flow

    ok = jnp.int32(0)
    fault = mpc_flow._fault(ok, jnp.int32(1), RESULTS.successful)
    assert fault[2] == RESULTS.control_nonfinite
    total = mpc_flow._add_faults(mpc_flow._no_fault(), fault)
    assert int(total[1]) == 1 and total[2] == RESULTS.control_nonfinite
    # the inner loop's own outcome comes first
    first = mpc_flow._add_faults(mpc_flow._fault(ok, ok, RESULTS.optimiser_diverged), total)
    assert first[2] == RESULTS.optimiser_diverged


class NaNBelow(eqx.Module):
    """A field that is NaN below sigma ``level`` (no safe restoration exists)."""

    field: object
    level: float = eqx.field(static=True, default=0.3)

    def __call__(self, x, sigma, cond):
        return jnp.where(sigma < self.level, jnp.nan, self.field(x, sigma, cond))


def test_restore_and_the_cli_surface_the_outcome(monkeypatch, capsys):
    """``rfmpc.restore.restore`` reports the outcome's name in its record (it solves with
    throw=False); ``rfmpc restore --json`` prints it and exits 1 naming it and what it means."""
    import json

    import rfmpc.restore as restore_mod
    from rfmpc.cli import main
    from rfmpc.inverse import IsotropicMixtureField
    from rfmpc.restore import Prior, outcome_message, restore

    means = np.zeros((2, 16, 16, 3), np.float32)
    sound = Prior("mixture", IsotropicMixtureField(means, 0.1), (16, 16, 3))
    broken = Prior("nan mixture", NaNBelow(IsotropicMixtureField(means, 0.1)), (16, 16, 3))
    ok = restore(sound, task="denoise", method="flowchef", seed=0)
    assert ok.result == ok.record["result"] == "successful"
    bad = restore(broken, task="denoise", method="flowchef", seed=0)
    assert bad.result == "restoration_nonfinite"
    assert "no safe result" in outcome_message(bad.result) and outcome_message("successful") == ""

    monkeypatch.setattr(restore_mod, "provide_prior", lambda name="embedded": broken)
    code = main("restore --task denoise --method flowchef --seed 0 --json".split())
    out, err = capsys.readouterr()
    assert code == 1
    assert json.loads(out.strip().splitlines()[-1])["result"] == "restoration_nonfinite"
    assert "flowchef solve ended with outcome 'restoration_nonfinite'" in err
    assert "no safe result" in err
    monkeypatch.setattr(restore_mod, "provide_prior", lambda name="embedded": sound)
    assert main("restore --task denoise --method flowchef --seed 0 --json".split()) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["result"] == "successful"
