"""The shared optimisation loop (rfmpc.flow.optimise) and the one outcome enumeration.

Quadratics with known minimisers; faults provoked on purpose: a step size that makes the
objective diverge, a region where the objective is NaN, a gradient that is NaN at a finite value
(skipped by ``optax.apply_if_finite``), an optimiser whose step overflows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rfmpc.control
from rfmpc.flow import OUTCOMES, RESULTS, make_optimiser, minimise
from rfmpc.flow.results import outcome_code


def quad(p):
    return jnp.sum(jnp.arange(1.0, 5.0) * (p - 2.0) ** 2)


def test_converges_and_counts_one_evaluation_an_iteration():
    st = jax.jit(lambda p: minimise(quad, p, make_optimiser("adam", 0.1), max_steps=200))(
        jnp.zeros(4)
    )
    assert int(st.num_steps) == int(st.num_evals) == 200
    assert int(st.num_rejected) == 0 and st.result == RESULTS.successful
    np.testing.assert_allclose(np.asarray(st.final_params()), 2.0, atol=2e-2)
    assert np.all(np.isfinite(np.asarray(st.history)))
    assert float(st.best_value) <= float(np.min(np.asarray(st.history))) + 1e-6


def test_counts_line_search_evaluations_as_they_execute():
    calls = []

    def loss(p):
        jax.debug.callback(lambda v: calls.append(1), p[0])
        return quad(p)

    st = jax.jit(lambda p: minimise(loss, p, make_optimiser("lbfgs"), max_steps=10))(jnp.zeros(4))
    jax.block_until_ready(st.params)
    assert int(st.num_evals) == len(calls) and int(st.num_steps) <= int(st.num_evals)
    np.testing.assert_allclose(np.asarray(st.params), 2.0, atol=2e-3)


def test_early_stop_by_patience():
    st = minimise(
        quad, jnp.zeros(4), make_optimiser("adam", 0.5), max_steps=500, rtol=1e-3, patience=3
    )
    assert int(st.num_steps) < 500 and bool(st.converged(3))
    assert st.result == RESULTS.successful


def test_the_divergence_rule():
    """SGD with a step that overshoots: f_1 = 12 * 19^2 > f_0 + 10 |f_0| with f_0 = 12 (rule:
    f > f_0 + ratio * |f_0|), so iteration 1 is rejected and, with max_rejections=0, stops."""
    f = lambda p: jnp.sum((p - 2.0) ** 2)
    opt = make_optimiser("sgd", 10.0)
    st = minimise(f, jnp.zeros(3), opt, max_steps=10, divergence_ratio=10.0, max_rejections=0)
    hist = np.asarray(st.history)
    assert int(st.num_steps) == 2 and hist[1] > hist[0] + 10.0 * abs(hist[0])
    assert st.result == RESULTS.optimiser_diverged
    np.testing.assert_array_equal(np.asarray(st.accepted), 0.0)  # the start: last accepted
    # just below the bound it is accepted: ratio 400 > 19^2 - 1
    ok = minimise(f, jnp.zeros(3), opt, max_steps=2, divergence_ratio=400.0, max_rejections=0)
    assert ok.result == RESULTS.successful and int(ok.num_rejected) == 0
    # tolerated (max_rejections=None): counted, iterate back to the last accepted one, which
    # SGD (no state) steps away from again: every other iteration is rejected
    tol = minimise(f, jnp.zeros(3), opt, max_steps=6, divergence_ratio=10.0)
    assert tol.result == RESULTS.successful and int(tol.num_rejected) == 3
    np.testing.assert_array_equal(np.asarray(tol.history), [12.0, 4332.0] * 3)
    np.testing.assert_array_equal(np.asarray(tol.final_params()), 0.0)


def test_nonfinite_value_is_rejected_and_never_returned():
    """NaN beyond |p| > 5: Adam with step 10 jumps there, the iterate goes back."""
    f = lambda p: jnp.where(jnp.max(jnp.abs(p)) > 5.0, jnp.nan, quad(p))
    st = minimise(f, jnp.zeros(4), make_optimiser("adam", 10.0), max_steps=6)
    assert int(st.num_rejected) >= 1 and st.result == RESULTS.successful
    assert np.all(np.isfinite(np.asarray(st.final_params())))
    stop = minimise(f, jnp.zeros(4), make_optimiser("adam", 10.0), max_steps=6, max_rejections=0)
    assert stop.result == RESULTS.optimiser_nonfinite and int(stop.num_steps) == 2


def test_nonfinite_gradient_is_skipped_by_apply_if_finite():
    """A finite value with a NaN gradient: ``apply_if_finite`` skips the update (the iterate
    stays finite), unwrapped Adam steps to NaN and the loop rejects the step."""
    f = lambda p: quad(p) + 0.0 * jnp.sum(jnp.sqrt(p - p))  # value finite, gradient NaN
    wrapped = optax.apply_if_finite(optax.adam(0.1), max_consecutive_errors=100)
    st = minimise(f, jnp.ones(4), wrapped, max_steps=4)
    np.testing.assert_array_equal(np.asarray(st.params), 1.0)  # never moved, never NaN
    assert int(st.num_rejected) == 4 and int(st.opt_state.total_notfinite) == 4
    raw = minimise(f, jnp.ones(4), optax.adam(0.1), max_steps=4)
    np.testing.assert_array_equal(np.asarray(raw.final_params()), 1.0)
    assert int(raw.num_rejected) == 4


def test_overflowing_step_is_rejected():
    """An optimiser whose step is inf: the step is rejected, the optimiser state kept."""
    st = minimise(quad, jnp.zeros(4), optax.scale(jnp.inf), max_steps=3, max_rejections=0)
    assert st.result == RESULTS.optimiser_nonfinite
    np.testing.assert_array_equal(np.asarray(st.params), 0.0)


def test_vmap_runs_each_problem_by_its_own_rules():
    """A batch of step sizes: the diverging one stops with its fault, the others converge."""

    def run(lr):
        f = lambda p: jnp.sum((p - 2.0) ** 2)
        opt = optax.apply_if_finite(optax.sgd(lr), 3)
        return minimise(f, jnp.zeros(3), opt, max_steps=40, max_rejections=0)

    lrs = jnp.array([0.1, 10.0, 0.3])
    st = jax.jit(jax.vmap(run))(lrs)
    codes = np.asarray(outcome_code(st.result))
    assert [OUTCOMES[c] for c in codes] == ["successful", "optimiser_diverged", "successful"]
    np.testing.assert_array_equal(np.asarray(st.num_steps), [40, 3, 40])
    for i in (0, 2):  # each batch member equals its own unbatched run
        one = run(lrs[i])
        np.testing.assert_allclose(np.asarray(st.params[i]), np.asarray(one.params), rtol=1e-6)


def test_throw_raises_in_jit_with_the_outcome_message():
    f = lambda p: jnp.sum((p - 2.0) ** 2)
    opt = make_optimiser("sgd", 10.0)
    run = jax.jit(
        lambda p: (
            minimise(
                f, p, opt, max_steps=10, divergence_ratio=10.0, max_rejections=0, throw=True
            ).params
        )
    )
    # an equinox run-time error (JaxRuntimeError on CPU) carrying the outcome's message
    with pytest.raises(Exception, match="rose above its first value"):
        jax.block_until_ready(run(jnp.zeros(3)))
    fine = jax.jit(
        lambda p: minimise(f, p, make_optimiser("adam", 0.1), max_steps=5, throw=True).params
    )
    assert np.all(np.isfinite(np.asarray(fine(jnp.zeros(3)))))


def test_outcomes_combine_in_graph_and_are_one_enumeration():
    """``RESULTS.where`` picks per problem inside jit and vmap; control re-exports the same
    class, with the codes the switch reports unchanged."""
    assert rfmpc.control.RESULTS is RESULTS and rfmpc.control.OUTCOMES == OUTCOMES
    assert OUTCOMES[:4] == (
        "successful",
        "plan_nonfinite",
        "plan_diverged",
        "plan_control_too_large",
    )
    assert {"optimiser_nonfinite", "optimiser_diverged"} <= set(OUTCOMES)

    @jax.jit
    @jax.vmap
    def combine(a, b):
        r = RESULTS.where(a, RESULTS.optimiser_nonfinite, RESULTS.successful)
        return RESULTS.where(b & (r == RESULTS.successful), RESULTS.bound_violation, r)

    r = combine(jnp.array([True, False, False]), jnp.array([True, True, False]))
    names = [OUTCOMES[int(c)] for c in np.asarray(outcome_code(r))]
    assert names == ["optimiser_nonfinite", "bound_violation", "successful"]


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match=r"optimiser must be one of \('adam', 'sgd', 'lbfgs'\)"):
        make_optimiser("rmsprop")
    with pytest.raises(ValueError, match="max_steps must be an int >= 1"):
        minimise(quad, jnp.zeros(4), make_optimiser(), max_steps=0)
    with pytest.raises(TypeError, match="has_aux=True needs a first-order optimiser"):
        minimise(
            lambda p: (quad(p), p), jnp.zeros(4), make_optimiser("lbfgs"), max_steps=2, has_aux=True
        )
