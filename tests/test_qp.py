"""Block-diagonal condensed MPC QPs: batched BoxOSQP against the ``osqp`` package; algebra."""

import jax
import jax.numpy as jnp
import numpy as np
import osqp
import pytest
import scipy.sparse as sp

from rfmpc.control import (
    OSQP,
    BlockQP,
    QPResult,
    block_cost,
    dense_qp,
    shift_warm_start,
    solve_block_qp,
)


def _random_qp(key, nb=5, n_p=3, ch=2, u_max=2.0, dtype=jnp.float64):
    k = jax.random.split(key, 6)
    h = -jnp.linspace(0.08, 0.04, n_p, dtype=dtype)
    return BlockQP(
        jac=0.7 * jax.random.normal(k[0], (nb, ch, ch), dtype),
        g=1.3 * h,  # J's weight per step differs from the control's (h)
        h=h,
        x0=jax.random.normal(k[1], (nb, ch), dtype),
        c=0.05 * jax.random.normal(k[2], (n_p, nb, ch), dtype),
        ref=jax.random.normal(k[3], (n_p, nb, ch), dtype),
        q=jnp.linspace(1.0, 2.0, n_p, dtype=dtype),
        r=jnp.full((n_p,), 2e-3, dtype),
        s=jnp.full((n_p,), 1e-3, dtype),
        u_prev=jax.random.normal(k[4], (nb, ch), dtype),
        u_max=jnp.asarray(u_max, dtype),
    )


def _osqp_solve(P, g, u_max):
    n = P.shape[0]
    m = osqp.OSQP()
    m.setup(
        P=sp.csc_matrix(np.triu(P)),
        q=g,
        A=sp.identity(n, format="csc"),
        l=-u_max * np.ones(n),
        u=u_max * np.ones(n),
        eps_abs=1e-10,
        eps_rel=1e-10,
        max_iter=200_000,
        polishing=True,
        verbose=False,
    )
    res = m.solve(raise_error=True)
    return np.asarray(res.x)


@pytest.mark.parametrize("form", ["matrix-free", "dense"])
def test_batched_boxosqp_matches_osqp(getkey, form):
    """Random block QPs, some with active box constraints: same minimiser and objective."""
    with jax.enable_x64(True):
        qp = _random_qp(getkey(), u_max=2.0)
        solve = jax.jit(lambda q: solve_block_qp(q, OSQP(maxiter=4000, tol=1e-8, form=form)))
        res = solve(qp)
        assert bool(res.converged)
        assert np.all(np.asarray(res.status) == 1)
        P, g = (np.asarray(a) for a in dense_qp(qp))
        u = np.asarray(res.u).reshape(qp.num_blocks, -1)
        n_active = 0
        for b in range(qp.num_blocks):
            ref = _osqp_solve(P[b], g[b], 2.0)
            n_active += int(np.sum(np.abs(ref) > 2.0 - 1e-6))
            np.testing.assert_allclose(u[b], ref, atol=2e-5)
            f_ours = 0.5 * u[b] @ P[b] @ u[b] + g[b] @ u[b]
            f_ref = 0.5 * ref @ P[b] @ ref + g[b] @ ref
            assert abs(f_ours - f_ref) <= 1e-7 * max(1.0, abs(f_ref)), (f_ours, f_ref)
        assert n_active > 0  # the test exercises the box constraints


def test_condensed_qp_equals_simulated_cost(getkey):
    """``1/2 U'PU + g'U`` differs from the simulated MPC cost by a U-independent constant."""
    with jax.enable_x64(True):
        qp = _random_qp(getkey())
        P, g = dense_qp(qp)
        np.testing.assert_allclose(np.asarray(P), np.asarray(jnp.swapaxes(P, 1, 2)), atol=1e-12)
        assert float(jnp.min(jnp.linalg.eigvalsh(P))) > 0  # strictly convex (r > 0)
        us = [
            jax.random.normal(getkey(), (qp.num_blocks, qp.horizon, qp.channels), jnp.float64)
            for _ in range(3)
        ]
        consts = []
        for u in us:
            uf = u.reshape(qp.num_blocks, -1)
            quad = 0.5 * jnp.einsum("bi,bij,bj->b", uf, P, uf) + jnp.einsum("bi,bi->b", g, uf)
            consts.append(np.asarray(block_cost(qp, u) - quad))
        np.testing.assert_allclose(consts[0], consts[1], rtol=1e-10, atol=1e-9)
        np.testing.assert_allclose(consts[0], consts[2], rtol=1e-10, atol=1e-9)


def test_shift_warm_start_semantics(getkey):
    k = jax.random.split(getkey(), 3)
    prev = QPResult(
        u=jax.random.normal(k[0], (4, 3, 2)),
        z=jax.random.normal(k[1], (4, 3, 2)),
        y=jax.random.normal(k[2], (4, 3, 2)),
        rho=jnp.linspace(0.1, 1.0, 4),
        status=jnp.ones((4,), jnp.int32),
        iterations=jnp.ones((4,), jnp.int32),
        converged=jnp.bool_(True),
        objective=jnp.zeros((4,)),
    )
    sh = shift_warm_start(prev)  # step i + 1 moves to step i; the last step repeats
    for a, b in ((sh.u, prev.u), (sh.z, prev.z), (sh.y, prev.y)):
        np.testing.assert_array_equal(np.asarray(a[:, :-1]), np.asarray(b[:, 1:]))
        np.testing.assert_array_equal(np.asarray(a[:, -1]), np.asarray(b[:, -1]))
    np.testing.assert_array_equal(np.asarray(sh.rho), np.asarray(prev.rho))  # rho carries over


@pytest.mark.slow
def test_warm_start_and_iteration_cap(getkey):
    """(slow: three BoxOSQP compilations; the cap is also covered by the MPC fallback test.)"""
    qp = _random_qp(getkey(), dtype=jnp.float32, u_max=50.0)
    opts = OSQP(maxiter=2000, tol=1e-4)

    @jax.jit
    def run(q):  # one compilation for the three solves
        cold = solve_block_qp(q, opts)
        again = solve_block_qp(q, opts, cold)
        capped = solve_block_qp(q, OSQP(maxiter=1))
        return cold, again, capped

    cold, again, capped = run(qp)
    assert bool(cold.converged)
    # the same problem warm-started from its own solution converges at the first check
    assert bool(again.converged)
    assert int(again.iterations.max()) < int(cold.iterations.max())
    np.testing.assert_allclose(np.asarray(again.u), np.asarray(cold.u), atol=1e-3)
    # an iteration cap of 1 is reported, not hidden
    assert not bool(capped.converged)
    assert np.all(np.asarray(capped.status) == 0)
    assert np.all(np.isfinite(np.asarray(capped.u)))


def test_bad_options():
    with pytest.raises(ValueError, match="form must be"):
        OSQP(form="sparse")
    with pytest.raises(ValueError, match="maxiter"):
        OSQP(maxiter=0)
    with pytest.raises(ValueError, match="cg_tol"):
        OSQP(cg_tol=0.0)
