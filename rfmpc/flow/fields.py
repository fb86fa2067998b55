"""Velocity fields: the protocol every solver and controller consumes, CFG, and analytic GMMs.

A :class:`VelocityField` is any pure function ``v(x, sigma, cond) -> array`` with the shape of
``x``: the network's prediction of ``noise - x_data`` at noise level ``sigma`` (diffusers/SD3
convention, ``x_sigma = (1 - sigma) x_data + sigma noise``). No Flax module is visible here,
which is what lets the control code be tested on the exact Gaussian-mixture fields below.

The Gaussian-mixture formulas (with ``a = 1 - sigma``):

* marginal of ``x_sigma``: ``sum_k w_k N(a mu_k, C_k)``, ``C_k = a^2 Sigma_k + sigma^2 I``;
* denoiser ``E[x0 | x] = sum_k r_k(x) [mu_k + a Sigma_k C_k^{-1} (x - a mu_k)]`` with
  responsibilities ``r_k`` from log-sum-exp of the component log-densities;
* velocity ``v = (x - E[x0|x]) / sigma``, evaluated per component in the division-free form
  ``v_k = (sigma I - a Sigma_k) C_k^{-1} (x - a mu_k) - mu_k`` so it is finite at sigma = 0;
* posterior of ``y = A x + n``, ``n ~ N(0, s^2 I)``:
  ``Sigma'_k = (Sigma_k^{-1} + A^T A / s^2)^{-1}``,
  ``mu'_k = Sigma'_k (Sigma_k^{-1} mu_k + A^T y / s^2)``,
  ``log w'_k = log w_k + log N(y; A mu_k, s^2 I + A Sigma_k A^T)`` (normalised).

References: Liu et al., "Flow Straight and Fast" (ICLR 2023); Lipman et al., "Flow Matching for
Generative Modeling" (ICLR 2023); Esser et al., "Scaling Rectified Flow Transformers" (SD3, 2024).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

__all__ = [
    "ClassifierFreeGuidance",
    "ConditionalGaussianMixture",
    "GaussianMixture",
    "VelocityField",
    "check_field",
    "classifier_free_guidance",
]


def check_field(
    field: Callable[..., Any],
    x: Any,
    sigma: Any,
    cond: Any = None,
    *,
    what: str,
    fix: str,
    name: str = "the velocity field",
) -> None:
    """The one field/shape check: ``field(x, sigma, cond)`` traces and returns ``x``'s shape.

    Runs ``jax.eval_shape`` (no model evaluation; ``x`` and ``sigma`` may be arrays or
    ``jax.ShapeDtypeStruct``), so it is free at trace time; the flow core, the controllers and
    the inverse solvers all call it and differ only in how they name the input and the fix.

    Raises:
        ValueError: ``"{name} cannot take {what} ({error}); {fix}"`` when the field fails on
            ``x``, and ``"{name} returned shape {got} for {what}: {fix}"`` when its output is
            not ``x``'s shape. ``what`` names the input with its shape (e.g. ``"state_a.x of
            shape (1, 64, 64, 16)"``); ``fix`` says what to do.
    """
    shape = tuple(x.shape)
    try:
        # a fresh closure: eval_shape keys its cache on the callable, and comparing an
        # equinox-Module field holding tracers (called under an outer jit) would fail
        out = jax.eval_shape(lambda x_, s_, c_: field(x_, s_, c_), x, sigma, cond)
    except Exception as e:  # surface the field's own error with context
        raise ValueError(f"{name} cannot take {what} ({type(e).__name__}: {e}); {fix}") from e
    got = getattr(out, "shape", None)
    if got is None or tuple(got) != shape:
        got = type(out).__name__ if got is None else tuple(got)
        raise ValueError(f"{name} returned shape {got} for {what}: {fix}")


@runtime_checkable
class VelocityField(Protocol):
    """``v(x, sigma, cond) -> array`` of ``x``'s shape; pure (no side effects, no state)."""

    def __call__(self, x: Array, sigma: Array, cond: Any) -> Array: ...


class ClassifierFreeGuidance(eqx.Module):
    """A velocity field with classifier-free guidance (Ho & Salimans, 2022).

    Takes ``cond = (cond, uncond)`` (two pytrees with the same structure) and returns
    ``v_u + g (v_c - v_u)``, as diffusers' SD3 pipeline does. With ``batched=True`` both branches
    run as one call on the batch concatenation ``[uncond; cond]`` along axis 0 (so ``x`` needs a
    leading batch axis), which is how the SD3 pipeline amortises CFG. ``guidance_scale <= 1``
    evaluates the conditional branch only (diffusers skips CFG there).

    It is an ``equinox.Module``: a wrapped model's parameters stay pytree leaves, so jitted
    solvers trace them as arguments instead of baking them into the program as constants. The
    scale itself is a (weakly typed) array leaf too, so a new guidance value reuses the compiled
    program; only whether CFG is on (``guidance_scale > 1``, fixed at construction) is static.
    """

    field: Callable[[Array, Array, Any], Array]
    guidance_scale: Array
    batched: bool = eqx.field(static=True)
    guided: bool = eqx.field(static=True)

    def __init__(self, field, guidance_scale, batched: bool = True):
        try:
            g = float(guidance_scale)
        except (TypeError, jax.errors.ConcretizationTypeError) as e:
            raise TypeError(
                "guidance_scale must be a concrete number (build the guided field outside jit; "
                f"the scale is still traced inside), got {type(guidance_scale).__name__}"
            ) from e
        if not (np.isfinite(g) and g >= 0):
            raise ValueError(
                f"guidance_scale must be >= 0 and finite, got {guidance_scale}; pass e.g. 4.0 "
                "(values <= 1 disable CFG)"
            )
        self.field = field
        self.guidance_scale = jnp.asarray(g)  # weakly typed: follows the velocity's dtype
        self.batched = bool(batched)
        self.guided = g > 1.0

    def __call__(self, x, sigma, cond):
        if not (isinstance(cond, (tuple, list)) and len(cond) == 2):
            raise TypeError("a guided field takes cond=(cond, uncond); got " + type(cond).__name__)
        c, u = cond
        if not self.guided:
            return self.field(x, sigma, c)
        if self.batched:
            both = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), u, c)
            xx = jnp.concatenate([x, x], axis=0)
            v = self.field(xx, sigma, both)
            v_u, v_c = jnp.split(v, 2, axis=0)
        else:
            v_u, v_c = self.field(x, sigma, u), self.field(x, sigma, c)
        return v_u + self.guidance_scale * (v_c - v_u)


def classifier_free_guidance(
    field: Callable[[Array, Array, Any], Array],
    guidance_scale: float,
    *,
    batched: bool = True,
) -> ClassifierFreeGuidance:
    """Wrap ``field`` with classifier-free guidance; see :class:`ClassifierFreeGuidance`."""
    return ClassifierFreeGuidance(field, float(guidance_scale), batched)


def _lead(w, like):
    """Reshape a ``(K,)`` vector to broadcast against ``like`` of shape ``(..., K)``."""
    return w.reshape((1,) * (like.ndim - 1) + w.shape)


def _check_gmm(log_weights, means, covariances):
    if means.ndim != 2:
        raise ValueError(f"means must have shape (K, D), got {means.shape}")
    k, d = means.shape
    if log_weights.shape != (k,):
        raise ValueError(f"weights must have shape ({k},) to match means, got {log_weights.shape}")
    if covariances.shape != (k, d, d):
        raise ValueError(f"covariances must have shape ({k}, {d}, {d}), got {covariances.shape}")


class GaussianMixture(eqx.Module):
    """A Gaussian mixture data distribution with its exact rectified-flow velocity field.

    Data points live on the last axis (``D``); any leading batch shape is allowed.
    Construct with *weights* (normalised internally); ``log_weights`` is stored.
    """

    log_weights: Float[Array, " k"]
    means: Float[Array, "k d"]
    covariances: Float[Array, "k d d"]

    def __init__(self, weights, means, covariances, *, log_space: bool = False):
        means = jnp.asarray(means)
        covariances = jnp.asarray(covariances, means.dtype)
        w = jnp.asarray(weights, means.dtype)
        lw = w if log_space else jnp.log(w)
        _check_gmm(lw, means, covariances)
        self.log_weights = lw - jax.scipy.special.logsumexp(lw)
        self.means = means
        self.covariances = covariances

    @property
    def weights(self) -> Float[Array, " k"]:
        return jnp.exp(self.log_weights)

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    def _check_x(self, x):
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"x has last axis {x.shape[-1]} but the mixture lives in D={self.dim}; "
                "flatten your state to (..., D) first"
            )

    def _component_terms(self, x, sigma):
        """Per-component log N(x; a mu_k, C_k) and velocity v_k(x). Shapes (..., K), (..., K, D)."""
        self._check_x(x)
        sigma = jnp.asarray(sigma, x.dtype)
        a = 1.0 - sigma
        eye = jnp.eye(self.dim, dtype=x.dtype)
        cov = a**2 * self.covariances + sigma**2 * eye[None]  # (K, D, D)
        chol = jnp.linalg.cholesky(cov)
        batch = x.shape[:-1]
        xf = x.reshape(-1, self.dim)  # (M, D)
        diff = xf[:, None, :] - a * self.means[None]  # (M, K, D)
        rhs = jnp.transpose(diff, (1, 2, 0))  # (K, D, M): cho_solve batches over K
        sol = jnp.transpose(jax.scipy.linalg.cho_solve((chol, True), rhs), (2, 0, 1))
        diff = diff.reshape(*batch, *diff.shape[1:])  # (..., K, D)
        sol = sol.reshape(diff.shape)  # C_k^{-1} (x - a mu_k)
        logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
        maha = jnp.sum(diff * sol, axis=-1)
        logn = -0.5 * (maha + _lead(logdet, maha) + self.dim * jnp.log(2.0 * jnp.pi))
        proj = sigma * eye[None] - a * self.covariances  # (K, D, D)
        v_k = jnp.einsum("kij,...kj->...ki", proj, sol)
        v_k = v_k - self.means.reshape((1,) * (v_k.ndim - 2) + self.means.shape)
        return logn, v_k

    def responsibilities(self, x: Float[Array, "... d"], sigma) -> Float[Array, "... k"]:
        """Posterior component probabilities ``p(k | x_sigma)``."""
        logn, _ = self._component_terms(x, sigma)
        return jax.nn.softmax(_lead(self.log_weights, logn) + logn, axis=-1)

    def velocity(self, x: Float[Array, "... d"], sigma) -> Float[Array, "... d"]:
        """The exact flow velocity ``E[noise - x0 | x_sigma = x]``."""
        logn, v_k = self._component_terms(x, sigma)
        r = jax.nn.softmax(_lead(self.log_weights, logn) + logn, axis=-1)
        return jnp.einsum("...k,...kd->...d", r, v_k)

    def denoise(self, x: Float[Array, "... d"], sigma) -> Float[Array, "... d"]:
        """Tweedie's denoiser ``E[x0 | x_sigma = x] = x - sigma v``."""
        return x - jnp.asarray(sigma, x.dtype) * self.velocity(x, sigma)

    def log_prob(self, x: Float[Array, "... d"], sigma=0.0) -> Float[Array, "..."]:
        """Exact log-density of ``x_sigma`` (``sigma = 0``: the data distribution)."""
        logn, _ = self._component_terms(x, sigma)
        return jax.scipy.special.logsumexp(_lead(self.log_weights, logn) + logn, axis=-1)

    def marginal(self, sigma) -> GaussianMixture:
        """The mixture of ``x_sigma = (1 - sigma) x0 + sigma noise``."""
        a = 1.0 - sigma
        eye = jnp.eye(self.dim, dtype=self.means.dtype)
        cov = a**2 * self.covariances + sigma**2 * eye[None]
        return GaussianMixture(self.log_weights, a * self.means, cov, log_space=True)

    def sample(self, key: PRNGKeyArray, n: int) -> Float[Array, "n d"]:
        """``n`` exact samples from the mixture."""
        kc, kz = jax.random.split(key)
        comp = jax.random.categorical(kc, self.log_weights, shape=(n,))
        chol = jnp.linalg.cholesky(self.covariances)
        z = jax.random.normal(kz, (n, self.dim), self.means.dtype)
        return self.means[comp] + jnp.einsum("nij,nj->ni", chol[comp], z)

    def mean(self) -> Float[Array, " d"]:
        return self.weights @ self.means

    def covariance(self) -> Float[Array, "d d"]:
        m = self.mean()
        dm = self.means - m[None]
        outer = dm[:, :, None] * dm[:, None]
        return jnp.einsum("k,kij->ij", self.weights, self.covariances + outer)

    def posterior(
        self, A: Float[Array, "m d"], y: Float[Array, " m"], noise_std
    ) -> GaussianMixture:
        """The exact posterior mixture of ``x`` given ``y = A x + n``, ``n ~ N(0, s^2 I)``."""
        A = jnp.asarray(A, self.means.dtype)
        y = jnp.asarray(y, self.means.dtype)
        if A.ndim != 2 or A.shape[1] != self.dim:
            raise ValueError(f"A must have shape (m, {self.dim}), got {A.shape}")
        if y.shape != (A.shape[0],):
            raise ValueError(f"y must have shape ({A.shape[0]},) to match A, got {y.shape}")
        if not noise_std > 0:
            raise ValueError(f"noise_std must be > 0, got {noise_std}")
        s2 = jnp.asarray(noise_std, self.means.dtype) ** 2
        prec = jnp.linalg.inv(self.covariances) + (A.T @ A / s2)[None]
        cov_post = jnp.linalg.inv(prec)
        cov_post = 0.5 * (cov_post + jnp.swapaxes(cov_post, -1, -2))
        prior_term = jnp.linalg.solve(self.covariances, self.means[..., None])[..., 0]
        rhs = prior_term + (A.T @ y / s2)[None]
        mean_post = jnp.einsum("kij,kj->ki", cov_post, rhs)
        ycov = s2 * jnp.eye(A.shape[0], dtype=A.dtype)[None] + jnp.einsum(
            "mi,kij,nj->kmn", A, self.covariances, A
        )
        r = y[None] - self.means @ A.T
        chol = jnp.linalg.cholesky(ycov)
        sol = jax.scipy.linalg.cho_solve((chol, True), r[..., None])[..., 0]
        logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
        logn = -0.5 * (jnp.sum(r * sol, -1) + logdet + A.shape[0] * jnp.log(2.0 * jnp.pi))
        return GaussianMixture(self.log_weights + logn, mean_post, cov_post, log_space=True)

    def as_field(self) -> Callable[[Array, Array, Any], Array]:
        """This mixture's velocity as a :class:`VelocityField` (``cond`` is ignored)."""
        return lambda x, sigma, cond=None: self.velocity(x, sigma)


class ConditionalGaussianMixture(eqx.Module):
    """One Gaussian mixture per "prompt": an exactly solvable text-to-image stand-in.

    ``cond`` is either an integer prompt index (array of shape ``()`` or ``(batch,)``) or a vector
    of prompt weights of shape ``(P,)`` / ``(batch, P)``; weights give the velocity
    ``sum_p c_p v_p(x)``, i.e. blending conditions blends velocities, which makes prompt
    switching and blending controllers checkable in closed form.
    """

    log_weights: Float[Array, "p k"]
    means: Float[Array, "p k d"]
    covariances: Float[Array, "p k d d"]

    def __init__(self, weights, means, covariances, *, log_space: bool = False):
        means = jnp.asarray(means)
        covariances = jnp.asarray(covariances, means.dtype)
        w = jnp.asarray(weights, means.dtype)
        lw = w if log_space else jnp.log(w)
        if means.ndim != 3:
            raise ValueError(f"means must have shape (P, K, D), got {means.shape}")
        for p in range(means.shape[0]):
            _check_gmm(lw[p], means[p], covariances[p])
        self.log_weights = lw - jax.scipy.special.logsumexp(lw, axis=-1, keepdims=True)
        self.means = means
        self.covariances = covariances

    @property
    def num_prompts(self) -> int:
        return self.means.shape[0]

    def mixture(self, p: int) -> GaussianMixture:
        return GaussianMixture(
            self.log_weights[p], self.means[p], self.covariances[p], log_space=True
        )

    def _all_velocities(self, x, sigma):
        def one(lw, m, c):
            return GaussianMixture(lw, m, c, log_space=True).velocity(x, sigma)

        return jax.vmap(one)(self.log_weights, self.means, self.covariances)  # (P, ..., D)

    def one_hot(self, index: Int[Array, "..."]) -> Float[Array, "... p"]:
        return jax.nn.one_hot(index, self.num_prompts, dtype=self.means.dtype)

    def velocity(self, x: Float[Array, "... d"], sigma, cond) -> Float[Array, "... d"]:
        cond = jnp.asarray(cond)
        if jnp.issubdtype(cond.dtype, jnp.integer):
            cond = self.one_hot(cond)
        if cond.shape[-1] != self.num_prompts:
            raise ValueError(
                f"cond must be a prompt index or a weight vector over {self.num_prompts} prompts, "
                f"got shape {cond.shape}"
            )
        vs = self._all_velocities(x, sigma)  # (P, ..., D)
        vs = jnp.moveaxis(vs, 0, -2)  # (..., P, D)
        return jnp.einsum("...p,...pd->...d", cond, vs)

    def __call__(self, x, sigma, cond):
        return self.velocity(x, sigma, cond)
