"""Condensed MPC QPs over block dynamics, solved by batched, warm-started BoxOSQP (``OSQP``).

Each of ``nb`` independent blocks (one per latent pixel, ``C`` channels) has the linear(ised)
dynamics over a horizon of ``Np`` steps

    x_{i+1} = x_i + g_i J x_i + h_i u_i + c_i,        i = 0 .. Np-1,

(``J`` the block's ``C x C`` Jacobian, ``g_i`` its weight on step ``i``, ``h_i`` the Euler step,
``u_i`` the control in velocity units, ``c_i`` the affine part) and the cost

    sum_{i=1..Np} q_i ||x_i - r_i||^2 + sum_{i=0..Np-1} ( r_i ||u_i||^2 + s_i ||u_i - u_{i-1}||^2 )

with ``u_{-1}`` the previously applied control, under the box ``|u| <= u_max``. Condensing
(eliminating the states, ``X = Gamma U + X_free``; Borrelli, Bemporad & Morari, "Predictive
Control for Linear and Hybrid Systems", 2017, ch. 11) gives ``min 1/2 U^T P U + g^T U`` with

    P = 2 (Gamma^T Q Gamma + R + D^T S D),   g = 2 (Gamma^T Q (X_free - r) - D^T S e),

``D`` the first-difference operator and ``e = (u_{-1}, 0, ..., 0)``. Blocks never interact, so the
QP separates into ``nb`` QPs of ``Np * C`` variables solved in one ``jax.vmap`` of
``jaxopt.BoxOSQP`` (Stellato et al., "OSQP", Math. Prog. Comp. 2020).

This is the solver for what the closed form (:class:`~rfmpc.control.lqr.LQR`) does not cover:
coupled ``C x C`` Jacobian blocks (``JVPBlocks``) and boxes that bind. Where both apply they
agree (tested).

Form. ``form="matrix-free"`` (default) hands BoxOSQP ``matvec_Q`` (the forward recursion, its
transpose and the difference operator; ``O(Np C^2)`` per block, no ``(Np C)^2`` matrix); ADMM's
linear systems are then solved by conjugate gradients to the relative tolerance ``cg_tol``.
``form="dense"`` builds every block's ``P`` and uses an LU solve (tiny blocks; the form the
tests compare against the ``osqp`` package).

Conditioning: each block's QP is divided by ``kappa = mean(r) + 2 mean(s) + max(h^2) sum(q)``,
which does not move the minimiser but makes the absolute tolerance ``tol`` mean roughly
"relative to unit curvature".

Warm start (receding horizon): the previous step's primal ``U``, split variable ``z``, dual
``y`` -- shifted one step forward in time, the last step repeated -- *and* its ADMM step size
``rho`` carry over to the next solve. (jaxopt's ``run`` restarts ``rho`` from ``rho_start`` on
every call, which is why a primal/dual warm start alone changed nothing; the loop here drives
BoxOSQP's own ``init_state``/``update`` and puts the carried ``rho`` back.)
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from rfmpc.control.lqr import AbstractQPSolver, LinearQP
from rfmpc.control.results import RESULTS

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from jaxopt import BoxOSQP
    from jaxopt.base import KKTSolution

__all__ = [
    "OSQP",
    "BlockQP",
    "QPResult",
    "block_cost",
    "dense_qp",
    "shift_warm_start",
    "solve_block_qp",
]


class BlockQP(eqx.Module):
    """Condensed-QP data for ``nb`` independent blocks of ``C`` channels, horizon ``Np``.

    Attributes:
        jac: ``(nb, C, C)`` dynamics Jacobian per block.
        g: ``(Np,)`` weight of ``J`` on each step.
        h: ``(Np,)`` Euler steps (``sigma_{i+1} - sigma_i``; 0 for padded steps).
        x0: ``(nb, C)`` initial state.
        c: ``(Np, nb, C)`` affine terms.
        ref: ``(Np, nb, C)`` references for ``x_1 .. x_Np``.
        q, r, s: ``(Np,)`` state, effort and smoothness weights.
        u_prev: ``(nb, C)`` previously applied control.
        u_max: box limit (scalar).
    """

    jac: Float[Array, "nb c c"]
    g: Float[Array, " np"]
    h: Float[Array, " np"]
    x0: Float[Array, "nb c"]
    c: Float[Array, "np nb c"]
    ref: Float[Array, "np nb c"]
    q: Float[Array, " np"]
    r: Float[Array, " np"]
    s: Float[Array, " np"]
    u_prev: Float[Array, "nb c"]
    u_max: Float[Array, ""]

    @property
    def horizon(self) -> int:
        return self.h.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.jac.shape[0]

    @property
    def channels(self) -> int:
        return self.jac.shape[-1]


class QPResult(eqx.Module):
    """Solutions of all blocks (also the warm start of the next solve).

    Attributes:
        u: ``(nb, Np, C)`` optimal controls.
        z: ``(nb, Np, C)`` and ``y``: the ADMM split variable and dual.
        rho: ``(nb,)`` the ADMM step size each block ended with.
        status: ``(nb,)`` BoxOSQP status per block (1 = solved, 0 = max-iter reached).
        iterations: ``(nb,)`` ADMM iterations per block.
        converged: all blocks solved and finite.
        objective: ``(nb,)`` the MPC cost of ``u`` per block (constant terms included).
    """

    u: Float[Array, "nb np c"]
    z: Float[Array, "nb np c"]
    y: Float[Array, "nb np c"]
    rho: Float[Array, " nb"]
    status: Int[Array, " nb"]
    iterations: Int[Array, " nb"]
    converged: Bool[Array, ""]
    objective: Float[Array, " nb"]


# ----------------------------------------------------------------------------- per-block algebra
def _forward(jac, g, z0, w):
    """``z_{i+1} = z_i + g_i J z_i + w_i``; returns ``(Np, C)`` states ``z_1 .. z_Np``."""

    def step(z, gw):
        gi, wi = gw
        z = z + gi * (jac @ z) + wi
        return z, z

    _, zs = jax.lax.scan(step, z0, (g, w))
    return zs


def _gamma(jac, g, h, u):
    return _forward(jac, g, jnp.zeros_like(u[0]), h[:, None] * u)


def _gamma_t(jac, g, h, lam):
    return jax.linear_transpose(lambda u: _gamma(jac, g, h, u), lam)(lam)[0]


def _diff_t(s, u):
    """``D^T S D u`` with ``(D u)_0 = u_0``, ``(D u)_i = u_i - u_{i-1}``."""
    d = s[:, None] * jnp.concatenate([u[:1], u[1:] - u[:-1]])
    return d - jnp.concatenate([d[1:], jnp.zeros_like(d[:1])])


def _hess_matvec(params, u):
    """``P U / kappa`` for one block; ``params = (jac, g, h, q, r, s, kappa)``."""
    jac, g, h, q, r, s, kappa = params
    gq = _gamma_t(jac, g, h, q[:, None] * _gamma(jac, g, h, u))
    return 2.0 * (gq + r[:, None] * u + _diff_t(s, u)) / kappa


def _linear_term(jac, g, h, x0, c, ref, q, s, u_prev):
    free = _forward(jac, g, x0, c)
    lin = _gamma_t(jac, g, h, q[:, None] * (free - ref))
    lin = lin.at[0].add(-s[0] * u_prev)
    return 2.0 * lin, free


def _kappa(qp: BlockQP) -> Array:
    return jnp.mean(qp.r) + 2.0 * jnp.mean(qp.s) + jnp.max(qp.h**2) * jnp.sum(qp.q)


def block_cost(qp: BlockQP, u: Float[Array, "nb np c"]) -> Float[Array, " nb"]:
    """The MPC cost of controls ``u`` per block, by simulating the block dynamics."""

    def one(jac, x0, c, ref, u_prev, ub):
        xs = _forward(jac, qp.g, x0, c + qp.h[:, None] * ub)
        du = ub - jnp.concatenate([u_prev[None], ub[:-1]])
        return (
            jnp.sum(qp.q[:, None] * (xs - ref) ** 2)
            + jnp.sum(qp.r[:, None] * ub**2)
            + jnp.sum(qp.s[:, None] * du**2)
        )

    c, ref = jnp.moveaxis(qp.c, 1, 0), jnp.moveaxis(qp.ref, 1, 0)
    return jax.vmap(one)(qp.jac, qp.x0, c, ref, qp.u_prev, u)


def dense_qp(qp: BlockQP) -> tuple[Float[Array, "nb n n"], Float[Array, "nb n"]]:
    """Each block's dense ``(P, g)`` (``n = Np * C``, ``U`` flattened step-major), unscaled.

    The QP objective ``1/2 U^T P U + g^T U`` equals the MPC cost minus a constant.
    """
    n_p, ch = qp.horizon, qp.channels
    n = n_p * ch
    eye = jnp.eye(n, dtype=qp.x0.dtype).reshape(n, n_p, ch)

    def one(jac, x0, c, ref, u_prev):
        params = (jac, qp.g, qp.h, qp.q, qp.r, qp.s, jnp.ones((), x0.dtype))
        cols = jax.vmap(lambda e: _hess_matvec(params, e).reshape(n))(eye)
        lin, _ = _linear_term(jac, qp.g, qp.h, x0, c, ref, qp.q, qp.s, u_prev)
        return cols.T, lin.reshape(n)

    c, ref = jnp.moveaxis(qp.c, 1, 0), jnp.moveaxis(qp.ref, 1, 0)
    return jax.vmap(one)(qp.jac, qp.x0, c, ref, qp.u_prev)


# ----------------------------------------------------------------------------- the solve
def _identity(params_a, u):
    return u


def shift_warm_start(prev: QPResult) -> QPResult:
    """Shift a previous solution one step forward in time (repeat the last step); keep ``rho``."""
    sh = lambda a: jnp.concatenate([a[:, 1:], a[:, -1:]], axis=1)
    return QPResult(
        u=sh(prev.u),
        z=sh(prev.z),
        y=sh(prev.y),
        rho=prev.rho,
        status=prev.status,
        iterations=prev.iterations,
        converged=prev.converged,
        objective=prev.objective,
    )


def _solver(options: OSQP, dense: bool) -> BoxOSQP:
    common = dict(
        maxiter=options.maxiter,
        tol=options.tol,
        rho_start=options.rho_start,
        check_primal_dual_infeasability=False,
        implicit_diff=False,
        unroll=False,
    )
    if dense:
        return BoxOSQP(eq_qp_solve="lu", **common)
    solver = BoxOSQP(matvec_Q=_hess_matvec, matvec_A=_identity, **common)
    # jaxopt's indirect solver defaults to a relative CG tolerance of 1e-7 on top of an
    # absolute one that shrinks with the ADMM residuals; ADMM needs far less
    cg_tol = min(options.tol * 1e-2, 1e-3) if options.cg_tol is None else options.cg_tol
    impl = dataclasses.replace(solver._eq_qp_solve_impl, tol=cg_tol)
    object.__setattr__(solver, "_eq_qp_solve_impl", impl)
    return solver


def _admm(solver: BoxOSQP, init: KKTSolution, obj, a_mat, ineq, rho, maxiter: int):
    """BoxOSQP's own iterations from ``init`` with the ADMM step size ``rho`` carried over."""
    state = solver.init_state(init, obj, a_mat, ineq)
    state = state._replace(
        rho_bar=rho, solver_state=solver._eq_qp_solve_impl.update_stepsize(state.solver_state, rho)
    )

    def cond(c):
        _, st = c
        return (st.iter_num < maxiter) & (st.status == BoxOSQP.UNSOLVED)

    def body(c):
        params, st = c
        out = solver.update(params, st, obj, a_mat, ineq)
        return out.params, out.state

    return jax.lax.while_loop(cond, body, (init, state))


def solve_block_qp(
    qp: BlockQP, options: OSQP | None = None, warm: QPResult | None = None
) -> QPResult:
    """Solve every block's condensed QP with one batched (``vmap``) BoxOSQP solve.

    Args:
        qp: the :class:`BlockQP` data.
        options: an :class:`OSQP` (form, iteration cap, tolerances, initial ``rho``).
        warm: a previous :class:`QPResult` to start from (already shifted: see
            :func:`shift_warm_start`), or None for a cold start (zeros, ``rho_start``).
    """
    options = OSQP() if options is None else options
    dtype = qp.x0.dtype
    kappa = _kappa(qp)
    box = jnp.asarray(qp.u_max, dtype)
    n_p, ch = qp.horizon, qp.channels
    c, ref = jnp.moveaxis(qp.c, 1, 0), jnp.moveaxis(qp.ref, 1, 0)
    dense = options.form == "dense"
    solver = _solver(options, dense)
    lo = -box * jnp.ones((n_p, ch), dtype)
    hi = box * jnp.ones((n_p, ch), dtype)

    def one(jac, x0, cb, rb, u_prev, wu, wz, wy, rho):
        lin, _ = _linear_term(jac, qp.g, qp.h, x0, cb, rb, qp.q, qp.s, u_prev)
        params = (jac, qp.g, qp.h, qp.q, qp.r, qp.s, kappa)
        if dense:
            n = n_p * ch
            eye = jnp.eye(n, dtype=dtype).reshape(n, n_p, ch)
            pmat = jax.vmap(lambda e: _hess_matvec(params, e).reshape(n))(eye).T
            obj = (pmat, lin.reshape(n) / kappa)
            shape = lambda a: a.reshape(n)
            ineq = (lo.reshape(n), hi.reshape(n))
            a_mat = jnp.eye(n, dtype=dtype)
        else:
            obj = (params, lin / kappa)
            shape = lambda a: a
            ineq = (lo, hi)
            a_mat = None
        y = shape(wy)
        init = KKTSolution(
            primal=(shape(wu), jnp.clip(shape(wz), ineq[0], ineq[1])),
            dual_eq=y,
            dual_ineq=(jax.nn.relu(y), jax.nn.relu(-y)),
        )
        sol, state = _admm(solver, init, obj, a_mat, ineq, rho, options.maxiter)
        u, z = sol.primal
        back = lambda a: a.reshape(n_p, ch)
        return back(u), back(z), back(sol.dual_eq), state.rho_bar, state.status, state.iter_num

    nb = qp.num_blocks
    if warm is None:
        zero = jnp.zeros((nb, n_p, ch), dtype)
        w = (zero, zero, zero, jnp.full((nb,), options.rho_start, dtype))
    else:
        w = (warm.u, warm.z, warm.y, warm.rho.astype(dtype))
    u, z, y, rho, status, iters = jax.vmap(one)(qp.jac, qp.x0, c, ref, qp.u_prev, *w)
    # jaxopt's step-size rule divides residual norms and can return NaN/inf (e.g. when a
    # block's constraint residual is exactly 0 after one iteration): restart those from rho_start
    rho = jnp.where(jnp.isfinite(rho), rho, options.rho_start)
    finite = jnp.all(jnp.isfinite(u))
    converged = jnp.all(status == BoxOSQP.SOLVED) & finite
    return QPResult(
        u=u,
        z=z,
        y=y,
        rho=jnp.asarray(rho, dtype),
        status=status.astype(jnp.int32),
        iterations=iters.astype(jnp.int32),
        converged=converged,
        objective=block_cost(qp, u),
    )


def _zero_result(nb: int, n_p: int, ch: int, dtype, rho: float) -> QPResult:
    z = jnp.zeros((nb, n_p, ch), dtype)
    zi = jnp.zeros((nb,), jnp.int32)
    return QPResult(
        z, z, z, jnp.full((nb,), rho, dtype), zi, zi, jnp.bool_(True), jnp.zeros((nb,), dtype)
    )


#: Relative slack on the box ``|u| <= u_max`` before a converged QP's first control counts as a
#: violation (ADMM meets the box only to its tolerance); within it the control is clipped.
BOX_SLACK = 0.05


class OSQPState(NamedTuple):
    """The previous solution (the next solve's warm start) of :class:`OSQP`."""

    last: QPResult


class OSQP(AbstractQPSolver):
    """Batched BoxOSQP (jaxopt) over per-pixel blocks, warm-started across MPC steps.

    Attributes:
        maxiter: ADMM iteration cap per solve.
        tol: absolute tolerance after the QP's scaling by ``kappa``.
        form: ``"matrix-free"`` (CG) or ``"dense"`` (LU).
        cg_tol: relative tolerance of the CG solves (matrix-free form); default
            ``min(tol / 100, 1e-3)``.
            Inexact linear solves stall ADMM: measured, a CG tolerance of only ``tol / 10``
            left blocks unconverged at the iteration cap where ``tol / 100`` solved them in
            20-40 iterations.
        rho_start: the first solve's ADMM step size (later solves continue from the last one).
        warm_start: carry the shifted solution and ``rho`` to the next step.
    """

    maxiter: int = 200
    tol: float = 1e-4
    form: str = "matrix-free"
    cg_tol: float | None = None
    rho_start: float = 0.1
    warm_start: bool = True

    def __check_init__(self):
        if self.form not in ("matrix-free", "dense"):
            raise ValueError(f"form must be 'matrix-free' or 'dense', got {self.form!r}")
        if isinstance(self.maxiter, bool) or not isinstance(self.maxiter, int) or self.maxiter < 1:
            raise ValueError(f"maxiter must be an int >= 1, got {self.maxiter!r}")
        for name in ("tol", "rho_start"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.cg_tol is not None and not self.cg_tol > 0:
            raise ValueError(f"cg_tol must be > 0 or None (tol / 100), got {self.cg_tol}")

    def handles_blocks(self) -> bool:
        return True

    def init(self, x: Array, horizon: int) -> OSQPState:
        ch = x.shape[-1] if x.ndim else 1
        nb = x.size // ch
        return OSQPState(_zero_result(nb, horizon, ch, x.dtype, self.rho_start))

    def solve(self, state: OSQPState, qp: LinearQP):
        """``(u0, state, converged, info)`` for one MPC step's QP."""
        x = qp.e0
        ch = x.shape[-1] if x.ndim else 1
        nb = x.size // ch
        n_p = qp.h.shape[0]
        if qp.blocks:
            jac = qp.jac.reshape(nb, ch, ch)
        else:  # a diagonal linearisation as diagonal blocks
            diag = jnp.broadcast_to(jnp.asarray(qp.jac, x.dtype), x.shape).reshape(nb, ch)
            jac = diag[:, :, None] * jnp.eye(ch, dtype=x.dtype)[None]
        blk = lambda a: a.reshape(n_p, nb, ch)
        w = jnp.zeros_like(qp.ref) if qp.w is None else qp.w
        bqp = BlockQP(
            jac=jac,
            g=qp.g,
            h=qp.h,
            x0=qp.e0.reshape(nb, ch),
            c=blk(w),
            ref=blk(qp.ref),
            q=qp.q,
            r=qp.r,
            s=qp.s,
            u_prev=qp.u_prev.reshape(nb, ch),
            u_max=jnp.asarray(qp.u_max, x.dtype),
        )
        warm = shift_warm_start(state.last) if self.warm_start else None
        sol = solve_block_qp(bqp, self, warm)
        finite = jnp.all(jnp.isfinite(sol.u)) & jnp.all(jnp.isfinite(sol.y))
        keep = jax.tree.map(lambda a, b: jnp.where(finite, a, b), sol, state.last)
        u0 = sol.u[:, 0, :].reshape(x.shape)
        inside = jnp.max(jnp.abs(u0)) <= qp.u_max * (1 + BOX_SLACK)
        info = {
            "qp_iterations": jnp.max(sol.iterations),
            "box_violation": ~inside,
        }
        u0 = jnp.clip(u0, -qp.u_max, qp.u_max)
        result = RESULTS.where(
            ~finite,
            RESULTS.control_nonfinite,
            RESULTS.where(
                ~sol.converged,
                RESULTS.qp_not_converged,
                RESULTS.where(inside, RESULTS.successful, RESULTS.bound_violation),
            ),
        )
        return u0, OSQPState(keep), result, info
