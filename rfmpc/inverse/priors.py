"""An exact, cheap stand-in prior on images: an isotropic Gaussian mixture over procedural images.

:class:`IsotropicMixtureField` is the exact rectified-flow velocity of
``p0 = sum_k w_k N(mu_k, tau^2 I)`` on NHWC images (the isotropic special case of
:class:`rfmpc.flow.GaussianMixture`, evaluated in ``O(K D)`` instead of ``O(K D^3)``), so the
inverse solvers and the benchmark can run end to end on 32x32 images without a trained network.
It knows nothing of :mod:`rfmpc.data`: :func:`rfmpc.restore.procedural_prior` centres the
components on rendered training-split scenes and :func:`rfmpc.restore.heldout_images` renders
held-out scenes as ground truth (the layer above, which may import the data package).

With ``a = 1 - sigma`` and ``c = a^2 tau^2 + sigma^2``: responsibilities
``r_k ∝ w_k exp(-||x - a mu_k||^2 / (2 c))`` and
``v = ((sigma - a tau^2) / c) (x - a m) - m`` with ``m = sum_k r_k mu_k``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

__all__ = ["IsotropicMixtureField"]


class IsotropicMixtureField(eqx.Module):
    """Exact velocity of an isotropic Gaussian mixture over images (a :class:`VelocityField`).

    ``means``: ``(K, h, w, c)`` component means (model space, e.g. ``[-1, 1]``); ``tau``: the
    common std; ``log_weights``: ``(K,)`` (uniform by default). ``cond`` is ignored.
    """

    means: Float[Array, "k h w c"]
    log_weights: Float[Array, " k"]
    tau: float = eqx.field(static=True)

    def __init__(self, means, tau: float, weights=None):
        means = jnp.asarray(means, jnp.float32)
        if means.ndim != 4:
            raise ValueError(f"means must have shape (K, h, w, c), got {means.shape}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        k = means.shape[0]
        w = jnp.full((k,), 1.0 / k) if weights is None else jnp.asarray(weights, jnp.float32)
        if w.shape != (k,):
            raise ValueError(f"weights must have shape ({k},), got {w.shape}")
        lw = jnp.log(w)
        self.log_weights = lw - jax.scipy.special.logsumexp(lw)
        self.means = means
        self.tau = float(tau)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.means.shape[1:])

    def _flat_means(self, dtype):
        return self.means.reshape(self.means.shape[0], -1).astype(dtype)

    def responsibilities(self, x: Float[Array, "b h w c"], sigma) -> Float[Array, "b k"]:
        mu = self._flat_means(x.dtype)
        xf = x.reshape(x.shape[0], -1)
        sigma = jnp.asarray(sigma, x.dtype)
        a = 1.0 - sigma
        c = a**2 * self.tau**2 + sigma**2
        d2 = (
            jnp.sum(xf**2, -1, keepdims=True)
            - 2.0 * a * xf @ mu.T
            + a**2 * jnp.sum(mu**2, -1)[None]
        )
        return jax.nn.softmax(self.log_weights[None].astype(x.dtype) - 0.5 * d2 / c, axis=-1)

    def __call__(self, x: Float[Array, "b h w c"], sigma, cond=None) -> Float[Array, "b h w c"]:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"x must have shape (b, *{self.image_shape}), got {x.shape}")
        sigma = jnp.asarray(sigma, x.dtype)
        a = 1.0 - sigma
        c = a**2 * self.tau**2 + sigma**2
        m = (self.responsibilities(x, sigma) @ self._flat_means(x.dtype)).reshape(x.shape)
        return (sigma - a * self.tau**2) / c * (x - a * m) - m

    def sample(self, key, n: int) -> Float[Array, "n h w c"]:
        """``n`` exact samples of the mixture."""
        kc, kz = jax.random.split(key)
        comp = jax.random.categorical(kc, self.log_weights, shape=(n,))
        return self.means[comp] + self.tau * jax.random.normal(kz, (n, *self.image_shape))
