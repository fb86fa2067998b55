"""How the MPC linearises B's velocity field: objects that say what they cost.

Every linearisation gives the Jacobian ``J_j = d v_B / d x`` at the current MPC step ``j``. Over
the horizon the MPC scales it as ``J_{j+i} = J_j sigma_j / sigma_{j+i}``: the rectified-flow
identity ``x = (1 - sigma) x0_hat + sigma eps_hat`` gives ``v = (x - x0_hat(x)) / sigma``, so
``J = (I - d x0_hat / d x) / sigma`` and, with the denoiser's Jacobian held fixed, ``J sigma`` is
constant along the horizon.

=================  =====================================================  =====================
``Analytic()``     ``J = I / sigma`` (``d x0_hat / d x`` taken as 0): the  no model call
                   identity alone. Relative error against the true JVP
                   along noise directions ~0.4-0.5 on the embedded model.
``Frozen(m)``      ``J = c / sigma`` with ``c`` per channel fitted once    ``m`` JVPs, once
                   at the switch from ``m`` Rademacher probes
                   (``c = sigma_k <w, J w> / <w, w>``, Hutchinson-style),
                   reused at every step.
``JVPBlocks(s)``   per-pixel ``C x C`` blocks from ``C s^d`` JVP probes    ``C s^d`` JVPs + 1
                   at every step (:func:`jacobian_blocks`; with ``s = 1``  forward per step
                   the blocks are *lumped row sums*, not the diagonal
                   blocks: on the embedded model worse than ``J = 0``
                   along noise directions). For research; needs
                   ``OSQP``.
=================  =====================================================  =====================
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from rfmpc.control.base import SwitchProblem
from rfmpc.control.results import Cost

__all__ = [
    "AbstractLinearisation",
    "Analytic",
    "Frozen",
    "JVPBlocks",
    "jacobian_blocks",
    "num_probes",
]


class AbstractLinearisation(eqx.Module):
    """A model of ``d v_B / d x`` for the MPC."""

    @abc.abstractmethod
    def init(self, p: SwitchProblem) -> tuple[Any, Cost]:
        """Work done once at the switch; returns ``(state, cost)``."""

    @abc.abstractmethod
    def jacobian(self, state: Any, p: SwitchProblem, j: Array, x: Array) -> tuple[Array, Cost]:
        """``(J_j, cost)`` at grid step ``j``: a diagonal broadcasting against ``x`` or, when
        :meth:`is_blocks`, ``(*x.shape[:-1], C, C)`` blocks."""

    @abc.abstractmethod
    def is_blocks(self) -> bool:
        """Whether :meth:`jacobian` returns ``C x C`` blocks."""


class Analytic(AbstractLinearisation):
    """``J = I / sigma``: the rectified-flow identity, no model call."""

    def init(self, p: SwitchProblem) -> tuple[Any, Cost]:
        return None, Cost()

    def jacobian(self, state, p: SwitchProblem, j, x) -> tuple[Array, Cost]:
        return 1.0 / p.sigmas[j], Cost()

    def is_blocks(self) -> bool:
        return False


class Frozen(AbstractLinearisation):
    """``J = c / sigma``, ``c`` fitted at the switch from ``probes`` JVPs and then reused.

    Attributes:
        probes: number of Rademacher probes ``m`` (JVPs of ``v_B`` at the cached state).
        per_channel: one coefficient per channel (last axis) instead of one in all.
        seed: the probes' PRNG seed (fixed: the fit is deterministic).
    """

    probes: int = 4
    per_channel: bool = True
    seed: int = 0

    def __check_init__(self):
        if isinstance(self.probes, bool) or not isinstance(self.probes, int) or self.probes < 1:
            raise ValueError(f"probes must be an int >= 1, got {self.probes!r}")

    def init(self, p: SwitchProblem) -> tuple[Array, Cost]:
        x, k = p.x, p.k
        f = lambda z: p.velocity(z, k, p.cond_b)
        ws = jax.random.rademacher(jax.random.key(self.seed), (self.probes, *x.shape), x.dtype)
        jws = jax.lax.map(lambda w: jax.jvp(f, (x,), (w,))[1], ws)
        axes = tuple(range(jws.ndim - 1)) if self.per_channel else None
        num = jnp.sum(ws * jws, axis=axes)
        den = jnp.sum(ws * ws, axis=axes)
        return p.sigmas[k] * num / den, Cost(jvps=self.probes)

    def jacobian(self, state, p: SwitchProblem, j, x) -> tuple[Array, Cost]:
        return state / p.sigmas[j], Cost()

    def is_blocks(self) -> bool:
        return False


class JVPBlocks(AbstractLinearisation):
    """Per-pixel ``C x C`` blocks from JVP probes at every MPC step (see
    :func:`jacobian_blocks`). Costs ``num_probes`` JVPs and one forward per step."""

    stride: int = 1
    batch_probes: bool = False

    def __check_init__(self):
        if isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride < 1:
            raise ValueError(f"stride must be an int >= 1, got {self.stride!r}")

    def init(self, p: SwitchProblem) -> tuple[Any, Cost]:
        return None, Cost()

    def jacobian(self, state, p: SwitchProblem, j, x) -> tuple[Array, Cost]:
        f = lambda z: p.velocity(z, j, p.cond_b)
        _, jac = jacobian_blocks(f, x, stride=self.stride, batch_probes=self.batch_probes)
        return jac, Cost(forwards=1, jvps=num_probes(x.shape, self.stride))

    def is_blocks(self) -> bool:
        return True


# ----------------------------------------------------------------------------- JVP probing
def _colour_axes(ndim: int) -> tuple[int, ...]:
    """Spatial axes coloured by a strided probe: all but the first (batch) and last (channel)."""
    return tuple(range(1, ndim - 1)) if ndim >= 3 else ()


def num_probes(shape: tuple[int, ...], stride: int = 1) -> int:
    """Number of JVP probes :func:`jacobian_blocks` uses for a state of this shape."""
    return shape[-1] * stride ** len(_colour_axes(len(shape)))


def jacobian_blocks(
    f: Callable[[Array], Array],
    x: Float[Array, "... c"],
    *,
    stride: int = 1,
    batch_probes: bool = False,
) -> tuple[Float[Array, "... c"], Float[Array, "... c c"]]:
    """Value and per-pixel ``C x C`` Jacobian blocks of ``f`` at ``x`` from JVP probes.

    Pixels are all positions of ``x``'s leading axes; channels its last axis. With
    ``stride = 1`` there are ``C`` probes, probe ``c`` the tangent ``e_c`` at *every* pixel, so
    the block returned for pixel ``p`` is ``sum_q dv_p / dx_q`` restricted to channels: exact when
    pixels do not interact (e.g. a batch of independent samples), otherwise the sum of the
    pixel's neighbourhood coupling (a "lumped" Jacobian: the response to a spatially uniform
    perturbation). With ``stride = s > 1`` the spatial axes (all but the first and last) are
    coloured by ``(index mod s)``; probe ``(colour, c)`` perturbs only pixels of that colour, and
    each pixel reads its block from its own colour's probe -- exact whenever ``v_p`` depends on
    no other pixel of the same colour, i.e. a receptive field narrower than ``s`` (``C s^d``
    probes).

    The probes reuse one ``jax.linearize``; ``batch_probes=True`` pushes them through the
    linearised model as one ``vmap`` batch (accelerators), ``False`` one after the other with
    ``lax.map`` (less memory).

    Returns:
        ``(f(x), J)`` with ``J[..., i, j] = d f_i / d x_j`` per pixel, shape ``(*x.shape, C)``.
    """
    v, lin = jax.linearize(f, x)
    ch = x.shape[-1]
    axes = _colour_axes(x.ndim) if stride > 1 else ()
    pix_shape = x.shape[:-1]
    if axes:
        grids = jnp.meshgrid(*[jnp.arange(n) for n in pix_shape], indexing="ij")
        colour = sum((grids[a] % stride) * stride**i for i, a in enumerate(axes))
        ncol = stride ** len(axes)
    else:
        colour = jnp.zeros(pix_shape, jnp.int32)
        ncol = 1
    eye = jnp.eye(ch, dtype=x.dtype)
    masks = (colour[None] == jnp.arange(ncol).reshape((ncol,) + (1,) * len(pix_shape))).astype(
        x.dtype
    )  # (ncol, *pix)
    tangents = masks[:, None, ..., None] * eye.reshape((1, ch) + (1,) * len(pix_shape) + (ch,))
    tangents = tangents.reshape((ncol * ch, *x.shape))
    outs = jax.vmap(lin)(tangents) if batch_probes else jax.lax.map(lin, tangents)
    outs = outs.reshape((ncol, ch, -1, ch))  # (colour, c_in, pixel, c_out)
    col = colour.reshape(-1)
    pix = jnp.arange(col.shape[0])
    blocks = outs[col, :, pix, :]  # (pixel, c_in, c_out)
    jac = jnp.swapaxes(blocks, -1, -2).reshape((*pix_shape, ch, ch))
    return v, jac
