"""Closed-form finite-horizon LQR for the element-separable MPC problem, and the QP data it shares
with the iterative solver.

The MPC of :mod:`rfmpc.control.mpc` works in deviation coordinates ``e = x - x_bar`` around a
nominal path. With a *diagonal* linearisation (one coefficient per element, or one shared by
all, as the rectified-flow identity gives) every element of the latent is its own scalar
system over the horizon ``i = 0 .. Np-1``::

    e_{i+1} = a_i e_i + b_i u_i + w_i,        a_i = 1 + g_i J,   b_i = h_i,

with the cost

    sum_i  q_i (e_{i+1} - ref_i)^2  +  r_i u_i^2  +  s_i (u_i - u_{i-1})^2,   u_{-1} = u_prev.

That is a linear-quadratic tracking problem; dynamic programming solves it exactly. Carry the
previous control as a second state ``p_i = u_{i-1}``; the cost-to-go is quadratic,
``V_i(e, p) = P11 e^2 + 2 P12 e p + P22 p^2 + 2 (eta1 e + eta2 p) + const``, and one backward step
(``A11 = P11' + q_i``, ``beta1 = eta1' - q_i ref_i``, primes: step ``i + 1``) is::

    H     = r_i + s_i + A11 b^2 + 2 P12' b + P22'
    alpha = (A11 b + P12') a,   gamma = -s_i,   g0 = (A11 b + P12') w + beta1 b + eta2'
    u_i   = -(alpha e + gamma p + g0) / H
    P11   = A11 a^2 - alpha^2 / H,   P12 = -alpha gamma / H,   P22 = s_i - gamma^2 / H
    eta1  = A11 a w + beta1 a - alpha g0 / H,   eta2 = -gamma g0 / H

(Anderson & Moore, "Optimal Control: Linear Quadratic Methods", 1990, ch. 2 and 4, for tracking
and the augmented input-rate state.) The feedback gains ``alpha / H``, ``gamma / H`` depend only
on the sigma grid and the weights; the references enter through ``g0``. Everything is
elementwise: ``O(Np x latent size)`` arithmetic and no model call.

The box ``|u| <= u_max`` is handled by clipping the unconstrained optimum. That is exact when the
box does not bind; when it does, clipping need not be optimal, so :func:`kkt_residual` measures
the scaled projected-gradient residual of the box-constrained QP at the clipped point (zero iff
it satisfies the KKT conditions); the MPC reports it per step. ``OSQP`` solves the constrained QP
exactly (:mod:`rfmpc.control.qp`).
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from rfmpc.control.results import RESULTS

__all__ = ["LQR", "AbstractQPSolver", "LinearQP", "kkt_residual", "lqr_controls", "qp_cost"]


class LinearQP(NamedTuple):
    """One MPC step's QP (see the module docstring); leading axis ``Np`` = horizon.

    Attributes:
        jac: the Jacobian of the velocity at the current step: a diagonal (an array that
            broadcasts against ``x``: a scalar, per channel ``(C,)``, or ``x``'s shape) or, with
            ``blocks=True``, per-pixel ``(*x.shape[:-1], C, C)`` blocks.
        g: ``(Np,)`` weight of the Jacobian in each step's transition (``a_i = 1 + g_i J``).
        h: ``(Np,)`` Euler steps (the control's gain ``b_i``; 0 past the grid's end).
        q, r, s: ``(Np,)`` tracking, effort and smoothness weights.
        ref: ``(Np, *x.shape)`` references for ``e_1 .. e_Np``.
        w: ``(Np, *x.shape)`` affine terms, or None.
        e0: ``x.shape`` current deviation.
        u_prev: ``x.shape`` control applied on the previous step.
        u_max: box on every control element.
        blocks: whether ``jac`` holds ``C x C`` blocks (static).
    """

    jac: Array
    g: Float[Array, " np"]
    h: Float[Array, " np"]
    q: Float[Array, " np"]
    r: Float[Array, " np"]
    s: Float[Array, " np"]
    ref: Array
    w: Array | None
    e0: Array
    u_prev: Array
    u_max: Any
    blocks: bool = False


def _bc(v: Array, nd: int) -> Array:
    return v.reshape(v.shape + (1,) * nd)


def _coefficients(qp: LinearQP):
    if qp.blocks:
        raise ValueError(
            "the LQR closed form needs a diagonal linearisation (Analytic or Frozen); JVPBlocks "
            "couples the channels of a pixel: use solver=OSQP()"
        )
    jac = _diagonal(qp)
    return 1.0 + _bc(qp.g, jac.ndim) * jac[None]  # (Np, *coefficient shape)


def _diagonal(qp: LinearQP) -> Array:
    """The diagonal Jacobian with ``x``'s rank (leading axes of size 1 where it is shared)."""
    jac = jnp.asarray(qp.jac, qp.e0.dtype)
    return jac.reshape((1,) * (qp.e0.ndim - jac.ndim) + jac.shape)


def lqr_controls(qp: LinearQP) -> Float[Array, "np ..."]:
    """The unconstrained optimal controls ``u_0 .. u_{Np-1}`` (``(Np, *x.shape)``), exactly."""
    a = _coefficients(qp)
    dtype = qp.e0.dtype
    w = jnp.zeros_like(qp.ref) if qp.w is None else qp.w
    zc = jnp.zeros(a.shape[1:], dtype)
    zx = jnp.zeros_like(qp.e0)

    def back(carry, inp):
        p11, p12, p22, eta1, eta2 = carry
        ai, bi, qi, ri, si, refi, wi = inp
        a11 = p11 + qi
        beta1 = eta1 - qi * refi
        hh = ri + si + a11 * bi**2 + 2 * p12 * bi + p22
        m = a11 * bi + p12
        alpha = m * ai
        gamma = -si
        g0 = m * wi + beta1 * bi + eta2
        inv = 1.0 / hh
        new = (
            a11 * ai**2 - alpha**2 * inv,
            -alpha * gamma * inv,
            si - gamma**2 * inv,
            a11 * ai * wi + beta1 * ai - alpha * g0 * inv,
            -gamma * g0 * inv,
        )
        return new, (alpha * inv, gamma * inv, g0 * inv)

    inputs = (a, qp.h, qp.q, qp.r, qp.s, qp.ref, w)
    # P12, P22 take the coefficient shape; they broadcast with eta (x's shape) where mixed
    init = (zc, zc, zc, zx, zx)
    _, (ka, kg, k0) = jax.lax.scan(back, init, inputs, reverse=True)

    def fwd(carry, inp):
        e, p = carry
        kai, kgi, k0i, ai, bi, wi = inp
        u = -(kai * e + kgi * p + k0i)
        return (ai * e + bi * u + wi, u), u

    _, us = jax.lax.scan(fwd, (qp.e0, qp.u_prev), (ka, kg, k0, a, qp.h, w))
    return us


def qp_cost(qp: LinearQP, us: Array) -> Array:
    """The MPC cost of controls ``us`` (summed over elements), by simulating the dynamics."""
    if qp.blocks:
        jac = qp.jac

        def trans(gi, e):
            return e + gi * jnp.einsum("...ij,...j->...i", jac, e)
    else:
        jac = _diagonal(qp)

        def trans(gi, e):
            return e + gi * jac * e

    w = jnp.zeros_like(qp.ref) if qp.w is None else qp.w

    def step(carry, inp):
        e, p = carry
        gi, hi, qi, ri, si, refi, wi, ui = inp
        e1 = trans(gi, e) + hi * ui + wi
        c = qi * jnp.sum((e1 - refi) ** 2) + ri * jnp.sum(ui**2) + si * jnp.sum((ui - p) ** 2)
        return (e1, ui), c

    _, cs = jax.lax.scan(step, (qp.e0, qp.u_prev), (qp.g, qp.h, qp.q, qp.r, qp.s, qp.ref, w, us))
    return jnp.sum(cs)


def kkt_residual(qp: LinearQP, us: Array) -> Array:
    """Scaled projected-gradient residual of the box-constrained QP at ``us`` (``u_max`` units).

    ``max |u - clip(u - grad / d, -u_max, u_max)| / u_max`` with ``d`` the Hessian's diagonal
    scale per step; zero iff ``us`` satisfies the KKT conditions of ``min cost s.t. |u| <= u_max``.
    """
    grad = jax.grad(lambda u: qp_cost(qp, u))(us)
    if qp.blocks:
        jn = jnp.max(jnp.abs(qp.jac))
    else:
        jn = jnp.max(jnp.abs(_diagonal(qp)))
    # a cheap upper scale of the Hessian's diagonal per step (never below the effort weight)
    growth = 1.0 + jnp.max(jnp.abs(qp.g)) * jn
    d = 2.0 * (qp.r + 2.0 * qp.s + jnp.sum(qp.q) * (jnp.abs(qp.h) * growth) ** 2)
    d = _bc(jnp.maximum(d, jnp.finfo(us.dtype).tiny), us.ndim - 1)
    proj = jnp.clip(us - grad / d, -qp.u_max, qp.u_max)
    return jnp.max(jnp.abs(us - proj)) / qp.u_max


class AbstractQPSolver(eqx.Module):
    """Solves one MPC step's :class:`LinearQP`; may carry state (warm starts) across steps."""

    @abc.abstractmethod
    def init(self, x: Array, horizon: int) -> Any:
        """The state before the first MPC step."""

    @abc.abstractmethod
    def solve(self, state: Any, qp: LinearQP) -> tuple[Array, Any, RESULTS, dict]:
        """``(u0, new state, result, info)``: the first control (inside the box), the solve's
        outcome (non-successful: the MPC applies the command on this step) and per-step
        scalars to report."""

    @abc.abstractmethod
    def handles_blocks(self) -> bool:
        """Whether the solver accepts ``C x C`` Jacobian blocks (``LinearQP.blocks``)."""


class LQRState(NamedTuple):
    """The LQR keeps no state between steps (its gains are recomputed in closed form)."""


class LQR(AbstractQPSolver):
    """Closed-form solve of the element-separable MPC QP (Riccati recursion + box clipping).

    Attributes:
        kkt_tol: a step whose clipped control has a KKT residual above this (in units of
            ``u_max``) is counted in ``diagnostics["kkt_violations"]`` (the clipped control is
            still applied; use ``OSQP()`` when the box binds and exactness matters).
    """

    kkt_tol: float = 1e-3

    def __check_init__(self):
        if not self.kkt_tol > 0:
            raise ValueError(f"kkt_tol must be > 0, got {self.kkt_tol}")

    def init(self, x: Array, horizon: int) -> LQRState:
        return LQRState()

    def solve(self, state: LQRState, qp: LinearQP):
        """``(u0, state, result, info)``: ``u0`` clipped to the box."""
        us = lqr_controls(qp)
        clipped = jnp.clip(us, -qp.u_max, qp.u_max)
        binds = jnp.any(jnp.abs(us) > qp.u_max)
        resid = jax.lax.cond(
            binds, lambda: kkt_residual(qp, clipped), lambda: jnp.zeros((), us.dtype)
        )
        info = {"kkt_residual": resid, "kkt_violation": resid > self.kkt_tol}
        ok = jnp.all(jnp.isfinite(us))
        return (
            clipped[0],
            state,
            RESULTS.where(ok, RESULTS.successful, RESULTS.control_nonfinite),
            info,
        )

    def handles_blocks(self) -> bool:
        return False
