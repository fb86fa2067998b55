"""The analytic Gaussian-mixture field: exact sampling, velocity, density, posterior; CFG."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rfmpc.flow import (
    ConditionalGaussianMixture,
    GaussianMixture,
    classifier_free_guidance,
    flowmatch_sigmas,
    integrate,
)


def _random_gmm(key, k=3, d=2, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(key, 3)
    means = 2.0 * jax.random.normal(k1, (k, d), dtype)
    fac = 0.4 * jax.random.normal(k2, (k, d, d), dtype)
    covs = fac @ jnp.swapaxes(fac, -1, -2) + 0.05 * jnp.eye(d, dtype=dtype)[None]
    w = jax.random.uniform(k3, (k,), dtype, 0.2, 1.0)
    return GaussianMixture(w / w.sum(), means, covs)


def test_samples_match_mixture(getkey):
    gm = _random_gmm(getkey())
    n = 200_000
    xs = gm.sample(getkey(), n)
    # component weights: classify each sample by its generating component is not observable, so
    # compare responsibilities-averaged weights (exact identity: E_x[r_k(x)] = w_k).
    r = gm.responsibilities(xs, 0.0).mean(0)
    se_w = np.sqrt(np.asarray(gm.weights) * (1 - np.asarray(gm.weights)) / n)
    np.testing.assert_allclose(np.asarray(r), np.asarray(gm.weights), atol=5 * se_w.max() + 1e-3)
    mean, cov = np.asarray(gm.mean()), np.asarray(gm.covariance())
    se_m = np.sqrt(np.diag(cov) / n)
    np.testing.assert_allclose(np.asarray(xs.mean(0)), mean, atol=5 * se_m.max())
    np.testing.assert_allclose(np.cov(np.asarray(xs).T), cov, atol=0.05 * np.abs(cov).max())


def test_velocity_equals_tweedie_from_score(getkey):
    """v = (x - E[x0|x]) / sigma with E[x0|x] = (x + sigma^2 grad log p_sigma(x)) / (1 - sigma)."""
    with jax.enable_x64(True):
        gm = _random_gmm(getkey(), k=4, d=3, dtype=jnp.float64)
        x = jax.random.normal(getkey(), (5, 3), jnp.float64)
        for sigma in [0.05, 0.3, 0.7, 0.95]:
            score = jax.vmap(jax.grad(lambda z, s=sigma: gm.log_prob(z, s)))(x)
            x0 = (x + sigma**2 * score) / (1 - sigma)
            v_ref = (x - x0) / sigma
            np.testing.assert_allclose(
                np.asarray(gm.velocity(x, sigma)), np.asarray(v_ref), rtol=1e-9, atol=1e-9
            )


def test_velocity_finite_at_sigma_zero_and_one(getkey):
    gm = _random_gmm(getkey())
    x = jax.random.normal(getkey(), (4, 2))
    np.testing.assert_allclose(np.asarray(gm.velocity(x, 0.0)), -np.asarray(x), atol=1e-5)
    # at sigma = 1, x is pure noise and E[x0 | x] = mean of the data
    np.testing.assert_allclose(
        np.asarray(gm.velocity(x, 1.0)), np.asarray(x - gm.mean()[None]), atol=1e-5
    )


def test_log_prob_is_normalised(getkey):
    gm = _random_gmm(getkey(), k=2, d=2)
    g = np.linspace(-10, 10, 401)
    xx, yy = np.meshgrid(g, g)
    pts = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], -1), jnp.float32)
    for sigma in [0.0, 0.5]:
        mass = float(jnp.exp(gm.log_prob(pts, sigma)).sum()) * (g[1] - g[0]) ** 2
        assert abs(mass - 1.0) < 1e-3


def test_exact_flow_transports_noise_to_mixture(getkey):
    """Integrating the exact velocity from N(0, I) reproduces the mixture (fine grid)."""
    gm = _random_gmm(getkey(), k=2, d=2)
    sig = flowmatch_sigmas(200, shift=1.0)
    x1 = jax.random.normal(getkey(), (20_000, 2))
    x0 = integrate(lambda x, s, c: gm.velocity(x, s), x1, sig).x
    mean, cov = np.asarray(gm.mean()), np.asarray(gm.covariance())
    np.testing.assert_allclose(np.asarray(x0.mean(0)), mean, atol=0.05 * (1 + np.abs(mean).max()))
    np.testing.assert_allclose(np.cov(np.asarray(x0).T), cov, atol=0.08 * np.abs(cov).max())
    r = np.asarray(gm.responsibilities(x0, 0.0).mean(0))
    np.testing.assert_allclose(r, np.asarray(gm.weights), atol=0.02)


def test_posterior_matches_bayes_rule(getkey):
    """log p(x|y) - log p(x) - log p(y|x) is the same constant everywhere (exact check)."""
    with jax.enable_x64(True):
        gm = _random_gmm(getkey(), k=3, d=3, dtype=jnp.float64)
        A = jax.random.normal(getkey(), (2, 3), jnp.float64)
        s = 0.3
        y = A @ gm.sample(getkey(), 1)[0] + s * jax.random.normal(getkey(), (2,), jnp.float64)
        post = gm.posterior(A, y, s)
        x = 2.0 * jax.random.normal(getkey(), (50, 3), jnp.float64)
        loglik = -0.5 * jnp.sum((y[None] - x @ A.T) ** 2, -1) / s**2 - jnp.log(2 * jnp.pi * s**2)
        diff = post.log_prob(x) - gm.log_prob(x) - loglik
        assert float(jnp.std(diff)) < 1e-8
        assert abs(float(post.weights.sum()) - 1.0) < 1e-12


def test_posterior_flow_samples_posterior(getkey):
    """The posterior mixture's own velocity transports noise to the exact posterior."""
    gm = _random_gmm(getkey(), k=3, d=2)
    A = jnp.array([[1.0, 0.5]])
    y = jnp.array([0.7])
    post = gm.posterior(A, y, 0.2)
    sig = flowmatch_sigmas(200, shift=1.0)
    x0 = integrate(
        lambda x, s, c: post.velocity(x, s), jax.random.normal(getkey(), (20_000, 2)), sig
    ).x
    np.testing.assert_allclose(np.asarray(x0.mean(0)), np.asarray(post.mean()), atol=0.05)
    np.testing.assert_allclose(
        np.cov(np.asarray(x0).T),
        np.asarray(post.covariance()),
        atol=0.05 * float(jnp.abs(post.covariance()).max()) + 0.01,
    )


def test_posterior_validates_inputs(getkey):
    gm = _random_gmm(getkey(), d=2)
    with pytest.raises(ValueError, match="A must have shape"):
        gm.posterior(jnp.ones((2, 3)), jnp.ones(2), 0.1)
    with pytest.raises(ValueError, match="y must have shape"):
        gm.posterior(jnp.ones((2, 2)), jnp.ones(3), 0.1)
    with pytest.raises(ValueError, match="noise_std must be > 0"):
        gm.posterior(jnp.ones((2, 2)), jnp.ones(2), 0.0)
    with pytest.raises(ValueError, match="last axis"):
        gm.velocity(jnp.ones((4, 5)), 0.5)


def test_conditional_mixture_index_and_weights(getkey):
    a, b = _random_gmm(getkey()), _random_gmm(getkey())
    cg = ConditionalGaussianMixture(
        jnp.stack([a.weights, b.weights]),
        jnp.stack([a.means, b.means]),
        jnp.stack([a.covariances, b.covariances]),
    )
    x = jax.random.normal(getkey(), (6, 2))
    np.testing.assert_allclose(
        np.asarray(cg(x, 0.4, jnp.int32(1))), np.asarray(b.velocity(x, 0.4)), rtol=1e-5, atol=1e-6
    )
    w = jnp.array([0.25, 0.75])
    np.testing.assert_allclose(
        np.asarray(cg(x, 0.4, w)),
        np.asarray(0.25 * a.velocity(x, 0.4) + 0.75 * b.velocity(x, 0.4)),
        rtol=1e-5,
        atol=1e-6,
    )
    per_sample = jnp.array([0, 1, 0, 1, 1, 0])
    v = cg(x, 0.4, per_sample)
    np.testing.assert_allclose(np.asarray(v[1]), np.asarray(b.velocity(x[1], 0.4)), atol=1e-5)
    with pytest.raises(ValueError, match="weight vector over 2 prompts"):
        cg(x, 0.4, jnp.ones(3))


@pytest.mark.parametrize("batched", [True, False])
def test_classifier_free_guidance(getkey, batched):
    a, b = _random_gmm(getkey()), _random_gmm(getkey())
    cg = ConditionalGaussianMixture(
        jnp.stack([a.weights, b.weights]),
        jnp.stack([a.means, b.means]),
        jnp.stack([a.covariances, b.covariances]),
    )
    x = jax.random.normal(getkey(), (3, 2))
    guided = classifier_free_guidance(cg, 4.0, batched=batched)
    cond, uncond = jnp.ones(3, jnp.int32), jnp.zeros(3, jnp.int32)
    v_u, v_c = a.velocity(x, 0.5), b.velocity(x, 0.5)
    np.testing.assert_allclose(
        np.asarray(guided(x, 0.5, (cond, uncond))),
        np.asarray(v_u + 4.0 * (v_c - v_u)),
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        np.asarray(classifier_free_guidance(cg, 1.0)(x, 0.5, (cond, uncond))),
        np.asarray(v_c),
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        classifier_free_guidance(cg, -1.0)
    with pytest.raises(TypeError, match=r"cond=\(cond, uncond\)"):
        guided(x, 0.5, cond)
