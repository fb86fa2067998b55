"""MPC-Flow's MMSE output (``mmse_samples``): its definition, its counts, and that it approaches
the exact posterior mean of a Gaussian-mixture prior better than a single sample does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_inverse_oracle import NOISE, EigenMixtureField

from rfmpc.flow import GaussianMixture
from rfmpc.inverse import AveragePool, InnerSolver, MPCFlow, mpc_k1, mpc_rhc

SHAPE1 = (2, 2, 2)


@pytest.fixture(scope="module")
def problem():
    """A 3-component GMM in D = 8 observed through 2x2 average pooling (m = 2) with noise 0.2:
    a multi-modal posterior, so single samples scatter around its mean."""
    op = AveragePool(2)

    @jax.jit
    def build(key):
        ks = jax.random.split(key, 5)
        means = 1.5 * jax.random.normal(ks[0], (3, 8))
        fac = 0.3 * jax.random.normal(ks[1], (3, 8, 8))
        covs = fac @ jnp.swapaxes(fac, -1, -2) + 0.05 * jnp.eye(8)[None]
        gm = GaussianMixture(jnp.array([0.3, 0.3, 0.4]), means, covs)
        A = op.as_matrix(SHAPE1)
        y1 = A @ gm.sample(ks[2], 1)[0] + NOISE * jax.random.normal(ks[3], (A.shape[0],))
        return gm, y1, gm.posterior(A, y1, NOISE).mean()

    gm, y1, post_mean = build(jax.random.key(0))
    return {"field": EigenMixtureField(gm), "op": op, "y1": y1, "mean": post_mean}


def _y(problem, b):
    return jnp.broadcast_to(problem["y1"].reshape(1, 1, 1, 2), (b, 1, 1, 2))


def test_mmse_is_the_average_of_independent_runs_and_costs_m_runs(problem):
    single = mpc_rhc(num_steps=6, inner=InnerSolver("adam", 3, 0.05))
    mmse = mpc_rhc(num_steps=6, inner=InnerSolver("adam", 3, 0.05), mmse_samples=3)
    y, key = _y(problem, 2), jax.random.key(4)
    args = (problem["field"], problem["op"], y, NOISE)
    runs = [single(*args, k) for k in jax.random.split(key, 3)]
    res = mmse(*args, key)
    want = np.mean([np.asarray(r.image) for r in runs], axis=0)
    np.testing.assert_allclose(np.asarray(res.image), want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(res.x), want, atol=1e-5)  # pixel space: x = image
    assert int(res.nfe) == 3 * int(runs[0].nfe) and int(res.backprops) == 3 * int(runs[0].backprops)
    var = np.mean([(np.asarray(r.image) - want) ** 2 for r in runs], axis=0)
    np.testing.assert_allclose(
        np.asarray(res.diagnostics["sample_variance"]), var.reshape(2, -1).mean(1), rtol=1e-4
    )
    assert res.diagnostics["data_fit"].shape == (2,)
    assert int(res.diagnostics["fallback_steps"]) == 0


def test_mmse_is_closer_to_the_posterior_mean_than_one_sample(problem):
    """64 independent restorations of the same y: the average of 8 samples is much closer to the
    exact E[x | y] than a single sample (about 1/8 of the sample spread plus the method's bias)."""
    b = 64
    y, mean = _y(problem, b), np.asarray(problem["mean"]).reshape(1, *SHAPE1)
    args = (problem["field"], problem["op"], y, NOISE, jax.random.key(5))
    one = mpc_k1(num_steps=10)(*args)
    avg = mpc_k1(num_steps=10, mmse_samples=8)(*args)
    err_one = float(np.mean((np.asarray(one.image) - mean) ** 2))
    err_avg = float(np.mean((np.asarray(avg.image) - mean) ** 2))
    assert err_avg < 0.5 * err_one, (err_avg, err_one)
    assert int(avg.nfe) == 8 * int(one.nfe)


def test_mmse_samples_must_be_a_positive_int():
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=r"mmse_samples must be an int >= 1 .* got"):
            MPCFlow(mmse_samples=bad)
