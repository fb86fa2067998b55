"""Condensed MPC quadratic programs over block-diagonal dynamics, solved by batched BoxOSQP.

Each of ``nb`` independent blocks (one per latent pixel, ``C`` channels) has the linear(ised)
dynamics over a horizon of ``Np`` steps

    x_{i+1} = (I + h_i J) x_i + h_i u_i + c_i,        i = 0 .. Np-1,

(``J`` the block's ``C x C`` Jacobian, ``h_i`` the Euler step, ``u_i`` the control in velocity
units, ``c_i`` the affine part) and the cost

    sum_{i=1..Np} q_i ||x_i - r_i||^2 + sum_{i=0..Np-1} ( r_i ||u_i||^2 + s_i ||u_i - u_{i-1}||^2 )

with ``u_{-1}`` the previously applied control, under the box ``|u| <= u_max``. Condensing
(eliminating the states, ``X = Gamma U + X_free``; Borrelli, Bemporad & Morari, "Predictive
Control for Linear and Hybrid Systems", 2017, ch. 11) gives ``min 1/2 U^T P U + g^T U`` with

    P = 2 (Gamma^T Q Gamma + R + D^T S D),   g = 2 (Gamma^T Q (X_free - r) - D^T S e),

``D`` the first-difference operator and ``e = (u_{-1}, 0, ..., 0)``. Blocks never interact, so the
whole QP separates into ``nb`` QPs of ``Np * C`` variables solved in one ``jax.vmap`` of
``jaxopt.BoxOSQP`` (Stellato et al., "OSQP", Math. Prog. Comp. 2020; Schubiger et al., GPU ADMM,
2020).

Form. ``form="matrix-free"`` (default) hands BoxOSQP ``matvec_Q``: ``P U`` is applied by the
forward recursion (``Gamma``), its transpose (``jax.linear_transpose``) and the difference
operator, ``O(Np C^2)`` per block and no ``(Np C)^2`` matrix per pixel -- for a 128x128x16 latent
with ``Np = 5`` the dense ``P`` blocks alone would be 16384 x 80 x 80 floats (420 MB), the
matrix-free state is the 16384 x 16 x 16 Jacobian blocks (17 MB). ADMM's linear systems are then
solved by conjugate gradients. ``form="dense"`` builds every block's ``P`` (by applying the same
operator to the identity) and uses BoxOSQP's LU solve: faster for tiny blocks and the form the
tests compare against the ``osqp`` package. Both forms minimise the identical QP.

Conditioning: each block's QP is divided by ``kappa = mean(r) + 2 mean(s) + max(h^2) sum(q)`` (a
cheap estimate of ``P``'s diagonal), which does not move the minimiser but makes BoxOSQP's
absolute tolerance ``tol`` mean roughly "relative to unit curvature".

Warm start: :func:`shift_warm_start` shifts a previous solution (primal ``U``, ``z`` and dual ``y``)
one step forward in time, repeating the last step, as in receding-horizon practice.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from jaxopt import BoxOSQP
    from jaxopt.base import KKTSolution

__all__ = [
    "BlockQP",
    "QPOptions",
    "QPResult",
    "block_cost",
    "dense_qp",
    "shift_warm_start",
    "solve_block_qp",
]


@dataclass(frozen=True)
class QPOptions:
    """BoxOSQP settings: iteration cap, absolute tolerance (after scaling) and the form."""

    maxiter: int = 500
    tol: float = 1e-4
    form: str = "matrix-free"

    def __post_init__(self):
        if self.form not in ("matrix-free", "dense"):
            raise ValueError(f"form must be 'matrix-free' or 'dense', got {self.form!r}")
        if self.maxiter < 1 or not self.tol > 0:
            raise ValueError("maxiter must be >= 1 and tol > 0")


class BlockQP(eqx.Module):
    """Condensed-QP data for ``nb`` independent blocks of ``C`` channels, horizon ``Np``.

    Attributes:
        jac: ``(nb, C, C)`` dynamics Jacobian per block.
        h: ``(Np,)`` Euler steps (``sigma_{i+1} - sigma_i``; 0 for padded steps).
        x0: ``(nb, C)`` initial state.
        c: ``(Np, nb, C)`` affine terms.
        ref: ``(Np, nb, C)`` references for ``x_1 .. x_Np``.
        q, r, s: ``(Np,)`` state, effort and smoothness weights.
        u_prev: ``(nb, C)`` previously applied control.
        u_max: box limit (scalar).
    """

    jac: Float[Array, "nb c c"]
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
    """Solutions of all blocks.

    Attributes:
        u: ``(nb, Np, C)`` optimal controls.
        z: ``(nb, Np, C)`` and ``y``: the ADMM split variable and dual (for warm starts).
        status: ``(nb,)`` BoxOSQP status per block (1 = solved, 0 = max-iter reached).
        iterations: ``(nb,)`` ADMM iterations per block.
        converged: all blocks solved and finite.
        objective: ``(nb,)`` the MPC cost of ``u`` per block (constant terms included).
    """

    u: Float[Array, "nb np c"]
    z: Float[Array, "nb np c"]
    y: Float[Array, "nb np c"]
    status: Int[Array, " nb"]
    iterations: Int[Array, " nb"]
    converged: Bool[Array, ""]
    objective: Float[Array, " nb"]


# ----------------------------------------------------------------------------- per-block algebra
def _forward(jac, h, z0, w):
    """``z_{i+1} = z_i + h_i J z_i + w_i``; returns ``(Np, C)`` states ``z_1 .. z_Np``."""

    def step(z, hw):
        hi, wi = hw
        z = z + hi * (jac @ z) + wi
        return z, z

    _, zs = jax.lax.scan(step, z0, (h, w))
    return zs


def _gamma(jac, h, u):
    return _forward(jac, h, jnp.zeros_like(u[0]), h[:, None] * u)


def _gamma_t(jac, h, lam):
    return jax.linear_transpose(lambda u: _gamma(jac, h, u), lam)(lam)[0]


def _diff_t(s, u):
    """``D^T S D u`` with ``(D u)_0 = u_0``, ``(D u)_i = u_i - u_{i-1}``."""
    g = s[:, None] * jnp.concatenate([u[:1], u[1:] - u[:-1]])
    return g - jnp.concatenate([g[1:], jnp.zeros_like(g[:1])])


def _hess_matvec(params, u):
    """``P U / kappa`` for one block; ``params = (jac, h, q, r, s, kappa)``."""
    jac, h, q, r, s, kappa = params
    gq = _gamma_t(jac, h, q[:, None] * _gamma(jac, h, u))
    return 2.0 * (gq + r[:, None] * u + _diff_t(s, u)) / kappa


def _linear_term(jac, h, x0, c, ref, q, s, u_prev):
    free = _forward(jac, h, x0, c)
    g = _gamma_t(jac, h, q[:, None] * (free - ref))
    g = g.at[0].add(-s[0] * u_prev)
    return 2.0 * g, free


def _kappa(qp: BlockQP) -> Array:
    return jnp.mean(qp.r) + 2.0 * jnp.mean(qp.s) + jnp.max(qp.h**2) * jnp.sum(qp.q)


def block_cost(qp: BlockQP, u: Float[Array, "nb np c"]) -> Float[Array, " nb"]:
    """The MPC cost of controls ``u`` per block, by simulating the block dynamics."""

    def one(jac, x0, c, ref, u_prev, ub):
        xs = _forward(jac, qp.h, x0, c + qp.h[:, None] * ub)
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
        params = (jac, qp.h, qp.q, qp.r, qp.s, jnp.ones((), x0.dtype))
        cols = jax.vmap(lambda e: _hess_matvec(params, e).reshape(n))(eye)  # (n, n) rows = P e_j
        g, _ = _linear_term(jac, qp.h, x0, c, ref, qp.q, qp.s, u_prev)
        return cols.T, g.reshape(n)

    c, ref = jnp.moveaxis(qp.c, 1, 0), jnp.moveaxis(qp.ref, 1, 0)
    return jax.vmap(one)(qp.jac, qp.x0, c, ref, qp.u_prev)


# ----------------------------------------------------------------------------- the solve
def _identity(params_a, u):
    return u


def shift_warm_start(prev: QPResult) -> QPResult:
    """Shift a previous solution one step forward in time (repeat the last step)."""
    sh = lambda a: jnp.concatenate([a[:, 1:], a[:, -1:]], axis=1)
    return QPResult(
        u=sh(prev.u),
        z=sh(prev.z),
        y=sh(prev.y),
        status=prev.status,
        iterations=prev.iterations,
        converged=prev.converged,
        objective=prev.objective,
    )


def solve_block_qp(
    qp: BlockQP, options: QPOptions = QPOptions(), warm: QPResult | None = None
) -> QPResult:
    """Solve every block's condensed QP with one batched (``vmap``) ``BoxOSQP`` call.

    Args:
        qp: the :class:`BlockQP` data.
        options: :class:`QPOptions` (form, iteration cap, tolerance).
        warm: a previous :class:`QPResult` to start from (already shifted if desired: see
            :func:`shift_warm_start`), or None for a cold start (zeros).

    Returns:
        A :class:`QPResult` with per-block status and the global ``converged`` flag.
    """
    dtype = qp.x0.dtype
    kappa = _kappa(qp)
    box = jnp.asarray(qp.u_max, dtype)
    n_p, ch = qp.horizon, qp.channels
    c, ref = jnp.moveaxis(qp.c, 1, 0), jnp.moveaxis(qp.ref, 1, 0)
    dense = options.form == "dense"
    # unroll=False: with implicit_diff=False jaxopt's default ("auto") unrolls maxiter masked
    # iterations, and under vmap every one of them runs; a real while_loop stops when all
    # blocks have converged.
    if dense:
        solver = BoxOSQP(
            maxiter=options.maxiter,
            tol=options.tol,
            eq_qp_solve="lu",
            check_primal_dual_infeasability=False,
            implicit_diff=False,
            unroll=False,
        )
    else:
        solver = BoxOSQP(
            matvec_Q=_hess_matvec,
            matvec_A=_identity,
            maxiter=options.maxiter,
            tol=options.tol,
            check_primal_dual_infeasability=False,
            implicit_diff=False,
            unroll=False,
        )
    lo = -box * jnp.ones((n_p, ch), dtype)
    hi = box * jnp.ones((n_p, ch), dtype)

    def one(jac, x0, cb, rb, u_prev, wu, wz, wy):
        g, _ = _linear_term(jac, qp.h, x0, cb, rb, qp.q, qp.s, u_prev)
        params = (jac, qp.h, qp.q, qp.r, qp.s, kappa)
        if dense:
            n = n_p * ch
            eye = jnp.eye(n, dtype=dtype).reshape(n, n_p, ch)
            pmat = jax.vmap(lambda e: _hess_matvec(params, e).reshape(n))(eye).T
            obj = (pmat, g.reshape(n) / kappa)
            shape = lambda a: a.reshape(n)
            ineq = (lo.reshape(n), hi.reshape(n))
            a_mat = jnp.eye(n, dtype=dtype)  # dense identity constraint matrix (LU needs A)
        else:
            obj = (params, g / kappa)
            shape = lambda a: a
            ineq = (lo, hi)
            a_mat = None
        if wu is None:
            init = solver.init_params(None, obj, a_mat, ineq)
        else:
            y = shape(wy)
            init = KKTSolution(
                primal=(shape(wu), jnp.clip(shape(wz), ineq[0], ineq[1])),
                dual_eq=y,
                dual_ineq=(jax.nn.relu(y), jax.nn.relu(-y)),
            )
        sol, state = solver.run(init, params_obj=obj, params_eq=a_mat, params_ineq=ineq)
        u, z = sol.primal
        back = lambda a: a.reshape(n_p, ch)
        return back(u), back(z), back(sol.dual_eq), state.status, state.iter_num

    w = (None, None, None) if warm is None else (warm.u, warm.z, warm.y)
    axes = (0, 0, 0, 0, 0) + ((None, None, None) if warm is None else (0, 0, 0))
    u, z, y, status, iters = jax.vmap(one, in_axes=axes)(qp.jac, qp.x0, c, ref, qp.u_prev, *w)
    finite = jnp.all(jnp.isfinite(u))
    converged = jnp.all(status == BoxOSQP.SOLVED) & finite
    return QPResult(
        u=u,
        z=z,
        y=y,
        status=status.astype(jnp.int32),
        iterations=iters.astype(jnp.int32),
        converged=converged,
        objective=block_cost(qp, u),
    )
