"""Switch controllers: schedules, Jacobian probes, LQR vs QP vs Riccati, shooting, GMM truth."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rfmpc.control import (
    LQR,
    MPC,
    OSQP,
    RESULTS,
    Adaptive,
    Analytic,
    Blend,
    Cost,
    Direct,
    Frozen,
    JVPBlocks,
    LinearQP,
    MultipleShooting,
    Reproject,
    SDEdit,
    Shooting,
    ShootingMPC,
    SwitchCache,
    alpha_direct,
    alpha_linear,
    alpha_sigmoid,
    blend_nfe,
    blended_cond_field,
    from_scratch_equal_nfe,
    jacobian_blocks,
    kkt_residual,
    lqr_controls,
    qp_cost,
    shooting_objective,
    stack_states,
    switch,
    switch_batch,
)
from rfmpc.flow import (
    ConditionalGaussianMixture,
    TrajectoryState,
    euler_reference,
    flowmatch_sigmas,
    init_state,
    integrate,
    integrate_path,
)


def _pixel_field(key, ch):
    """A nonlinear field acting on each pixel's channels only (block-diagonal Jacobian)."""
    k1, k2 = jax.random.split(key)
    w = jax.random.normal(k1, (ch, ch)) / np.sqrt(ch)
    b = jax.random.normal(k2, (ch,))

    def field(x, sigma, cond):
        bias = b.astype(x.dtype).reshape((1,) * (x.ndim - 1) + (ch,))
        return jnp.tanh(x @ w.astype(x.dtype) + cond * bias) - 0.5 * sigma * x

    return field


# ------------------------------------------------------------------------------ schedules
def test_alpha_schedules():
    np.testing.assert_array_equal(np.asarray(alpha_direct(6, 2)), [0, 0, 1, 1, 1, 1])
    np.testing.assert_allclose(
        np.asarray(alpha_linear(8, 2, 3)), [0, 0, 1 / 3, 2 / 3, 1, 1, 1, 1], rtol=1e-6
    )
    np.testing.assert_array_equal(np.asarray(alpha_linear(6, 2, 1)), np.asarray(alpha_direct(6, 2)))
    sig = lambda z: 1 / (1 + np.exp(-z))
    want = [0, 0] + [sig(10 * (j / 4 - 0.5)) for j in range(4)] + [1, 1, 1, 1]
    np.testing.assert_allclose(np.asarray(alpha_sigmoid(10, 2, 4)), want, rtol=1e-5)
    assert int(blend_nfe(alpha_linear(8, 2, 3), 2, 8, "velocity")) == 6 + 2
    assert int(blend_nfe(alpha_linear(8, 2, 3), 2, 8, "cond")) == 6
    with pytest.raises(ValueError, match="switch_step"):
        alpha_direct(5, 6)
    with pytest.raises(ValueError, match="transition_steps"):
        alpha_linear(5, 1, 0)


def test_blended_field_and_integration(getkey):
    f = _pixel_field(getkey(), 3)
    x = jax.random.normal(getkey(), (2, 4, 3))
    sig = flowmatch_sigmas(8)
    alpha = alpha_linear(8, 2, 3)
    bf, sched = blended_cond_field(f, 0.3, -1.0, alpha)
    for a in (0.0, 0.4, 1.0):
        want = (1 - a) * f(x, 0.5, 0.3) + a * f(x, 0.5, -1.0)
        np.testing.assert_allclose(np.asarray(bf(x, 0.5, (0.3, -1.0, a))), want, atol=1e-6)
    cf, _ = blended_cond_field(f, 0.3, -1.0, alpha, mode="cond")
    np.testing.assert_allclose(
        np.asarray(cf(x, 0.5, (0.3, -1.0, 0.4))), np.asarray(f(x, 0.5, 0.6 * 0.3 - 0.4)), atol=1e-6
    )
    ours = integrate(bf, x, sig, sched, start=2).x

    def hand_field(z, s, c):
        a = alpha[c]
        return (1 - a) * f(z, s, 0.3) + a * f(z, s, -1.0)

    ref = euler_reference(hand_field, x, sig, lambda s, i: i, start=2)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=2e-6)


# ------------------------------------------------------------------------------ Jacobian probes
def test_jacobian_blocks_exact_for_per_pixel_field(getkey):
    f = _pixel_field(getkey(), 4)
    x = jax.random.normal(getkey(), (2, 3, 3, 4))
    v, jac = jax.jit(lambda x: jacobian_blocks(lambda z: f(z, 0.4, 0.7), x))(x)
    assert jac.shape == (2, 3, 3, 4, 4)
    np.testing.assert_allclose(np.asarray(v), np.asarray(f(x, 0.4, 0.7)), atol=1e-6)
    per_pixel = jax.jit(jax.vmap(jax.jacfwd(lambda p: f(p, 0.4, 0.7))))(x.reshape(-1, 4))
    np.testing.assert_allclose(np.asarray(jac).reshape(-1, 4, 4), np.asarray(per_pixel), atol=1e-5)


def test_jacobian_blocks_strided_colouring_on_a_conv_field(getkey):
    """3x3 convolution: stride 3 isolates each pixel's own block; stride 1 sums the 3x3 blocks."""
    ch = 2
    kern = jax.random.normal(getkey(), (3, 3, ch, ch)) * 0.3

    def f(z):
        y = jax.lax.conv_general_dilated(
            z, kern, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.tanh(y)

    x = jax.random.normal(getkey(), (1, 6, 5, ch))
    full = jax.jit(jax.jacfwd(f))(x).reshape(30, ch, 30, ch)  # (pix_out, c_out, pix_in, c_in)
    own = full[jnp.arange(30), :, jnp.arange(30), :]
    jac3, jac1 = jax.jit(
        lambda x: (jacobian_blocks(f, x, stride=3)[1], jacobian_blocks(f, x, stride=1)[1])
    )(x)
    np.testing.assert_allclose(np.asarray(jac3).reshape(30, ch, ch), np.asarray(own), atol=1e-5)
    lumped = jnp.sum(full, axis=2)
    np.testing.assert_allclose(np.asarray(jac1).reshape(30, ch, ch), np.asarray(lumped), atol=1e-5)
    assert not np.allclose(np.asarray(jac1), np.asarray(jac3), atol=1e-3)


# ------------------------------------------------------------------------------ LQR
def _random_qp(key, shape, n_p, *, jac_shape=(), u_max=1e4, smooth=0.3, affine=True):
    ks = jax.random.split(key, 6)
    sig = jnp.linspace(0.9, 0.3, n_p + 1)
    h = sig[1:] - sig[:-1]
    return LinearQP(
        jac=1.0 + 0.5 * jax.random.uniform(ks[0], jac_shape),
        g=h / sig[:-1],
        h=h,
        q=jnp.linspace(1.0, 2.0, n_p),
        r=jnp.full((n_p,), 2e-3),
        s=jnp.full((n_p,), smooth),
        ref=jax.random.normal(ks[1], (n_p, *shape)),
        w=0.1 * jax.random.normal(ks[2], (n_p, *shape)) if affine else None,
        e0=jax.random.normal(ks[3], shape),
        u_prev=jax.random.normal(ks[4], shape),
        u_max=jnp.asarray(u_max),
    )


def _dense_solve(qp: LinearQP):
    """The same QP solved densely per element: stationarity of the (Np x Np) condensed cost."""
    n_p = qp.h.shape[0]
    flat = lambda u: qp_cost(qp, u.reshape((n_p, *qp.e0.shape)))
    u0 = jnp.zeros((n_p * qp.e0.size,))
    grad0 = jax.grad(flat)(u0)
    hess = jax.hessian(flat)(u0)
    return jnp.linalg.solve(hess, -grad0).reshape((n_p, *qp.e0.shape))


@pytest.mark.parametrize("jac_shape", [(), (3,)])
def test_lqr_equals_the_condensed_qp_and_osqp(getkey, jac_shape):
    """Riccati closed form == the dense condensed QP's minimiser == OSQP's (box inactive),
    with tracking, an affine term, a previous control and smoothness."""
    with jax.enable_x64(True):
        qp = _random_qp(getkey(), (2, 3), 4, jac_shape=jac_shape)
        qp = qp._replace(
            **{
                k: jnp.asarray(v, jnp.float64)
                for k, v in qp._asdict().items()
                if isinstance(v, jax.Array)
            }
        )
        ours = lqr_controls(qp)
        dense = _dense_solve(qp)
        np.testing.assert_allclose(np.asarray(ours), np.asarray(dense), rtol=1e-8, atol=1e-9)
        osqp = OSQP(maxiter=20000, tol=1e-10, form="dense")
        u0, _, result, _ = osqp.solve(osqp.init(qp.e0, 4), qp)
        assert result == RESULTS.successful
        np.testing.assert_allclose(np.asarray(u0), np.asarray(ours[0]), atol=1e-5)


def test_lqr_box_clip_and_kkt_check(getkey):
    """A binding box: the clipped closed form is flagged by its KKT residual, OSQP's exact
    constrained solution is not, and costs at least as little."""
    with jax.enable_x64(True):
        qp = _random_qp(getkey(), (4, 3), 4, smooth=0.0, affine=False)
        qp = qp._replace(
            **{
                k: jnp.asarray(v, jnp.float64)
                for k, v in qp._asdict().items()
                if isinstance(v, jax.Array)
            }
        )
        free = lqr_controls(qp)
        assert float(kkt_residual(qp, free)) < 1e-6  # box inactive at u_max = 1e4
        tight = qp._replace(u_max=jnp.asarray(0.5 * float(jnp.max(jnp.abs(free)))))
        u0, _, result, info = LQR().solve(None, tight)
        assert result == RESULTS.successful and float(jnp.max(jnp.abs(u0))) <= float(tight.u_max)
        assert float(info["kkt_residual"]) > 1e-3 and bool(info["kkt_violation"])
        osqp = OSQP(maxiter=20000, tol=1e-9, form="dense")
        state = osqp.init(qp.e0, 4)
        _v0, state, res, _ = osqp.solve(state, tight)
        assert res == RESULTS.successful
        exact = jnp.moveaxis(state.last.u, 1, 0)  # (blocks, Np, C) -> (Np, *x.shape)
        assert float(kkt_residual(tight, exact)) < 1e-3
        clipped = jnp.clip(free, -tight.u_max, tight.u_max)
        assert float(qp_cost(tight, exact)) <= float(qp_cost(tight, clipped)) + 1e-9


def test_osqp_warm_start_carries_rho_and_saves_iterations(getkey):
    """Receding horizon: the next step's QP is the previous one shifted; the warm start (primal,
    dual and rho) needs fewer ADMM iterations than a cold start."""
    qp1 = _random_qp(getkey(), (6, 3), 5, jac_shape=(3,), u_max=3.0)
    shifted = qp1._replace(
        ref=jnp.concatenate([qp1.ref[1:], qp1.ref[-1:]]), e0=qp1.e0 + 0.01, w=None
    )
    osqp = OSQP(maxiter=500, tol=1e-5)
    state = osqp.init(qp1.e0, 5)
    _, state, r1, _i1 = osqp.solve(state, qp1._replace(w=None))
    assert r1 == RESULTS.successful
    assert not np.allclose(np.asarray(state.last.rho), osqp.rho_start)  # rho adapted and kept
    _, _, _, warm = osqp.solve(state, shifted)
    _, _, _, cold = OSQP(maxiter=500, tol=1e-5, warm_start=False).solve(
        osqp.init(qp1.e0, 5), shifted
    )
    assert int(warm["qp_iterations"]) < int(cold["qp_iterations"])


# ------------------------------------------------------------------------------ shooting
def test_shooting_gradient_matches_finite_differences(getkey):
    with jax.enable_x64(True):
        f = _pixel_field(getkey(), 3)
        sig = jnp.asarray(flowmatch_sigmas(10), jnp.float64)
        x = jax.random.normal(getkey(), (2, 2, 3), jnp.float64)
        eps = jax.random.normal(getkey(), (2, 2, 3), jnp.float64)
        u0 = 0.3 * jax.random.normal(getkey(), (3, 2, 2, 3), jnp.float64)
        J = jax.jit(lambda u: shooting_objective(f, x, sig, 3, -0.5, eps, u, smoothness_weight=0.1))
        g = jax.jit(jax.grad(J))(u0)
        d = jax.random.normal(getkey(), u0.shape, jnp.float64)
        h = 1e-6
        fd = (J(u0 + h * d) - J(u0 - h * d)) / (2 * h)
        ad = jnp.sum(g * d)
        assert abs(float(fd - ad)) <= 1e-7 * max(1.0, abs(float(ad))), (float(fd), float(ad))


def test_shooting_objective_reuses_the_rollout_velocities(getkey):
    """The objective with reused velocities equals the naive one (every v_B re-evaluated)."""
    f = _pixel_field(getkey(), 3)
    sig = flowmatch_sigmas(10)
    x = jax.random.normal(getkey(), (2, 2, 3))
    eps = jax.random.normal(getkey(), (2, 2, 3))
    u = 0.3 * jax.random.normal(getkey(), (4, 2, 2, 3))
    ours = shooting_objective(f, x, sig, 3, -0.5, eps, u, effort_weight=0.0, smoothness_weight=0.0)
    xs = [x]
    for i in range(4):
        xs.append(xs[-1] + (sig[4 + i] - sig[3 + i]) * (f(xs[-1], sig[3 + i], -0.5) + u[i]))
    naive = sum(
        jnp.mean((z + (1 - sig[4 + i]) * f(z, sig[4 + i], -0.5) - eps) ** 2)
        for i, z in enumerate(xs[1:])
    )
    np.testing.assert_allclose(float(ours), float(naive), rtol=1e-5)


# ------------------------------------------------------------------------------ the GMM truth
N_STEPS = 20


def _gmm(means_a, shift, variances):
    means_a = jnp.asarray(means_a)
    cov = jnp.asarray(variances)[:, None, None] * jnp.eye(2)[None]
    k = means_a.shape[0]
    means = jnp.stack([means_a, means_a + jnp.asarray(shift)])
    return ConditionalGaussianMixture(jnp.ones((2, k)) / k, means, jnp.stack([cov, cov]))


def _trajectory(gm, st0, cond):
    """One solve of prompt ``cond``'s whole trajectory: ``(state_at(k), final latent)``."""
    c = jnp.int32(cond)
    _, xs = integrate_path(gm, st0.replace(cond=c))
    state_at = lambda k: TrajectoryState(xs[k], k, st0.sigmas, key=st0.key, cond=c)
    return state_at, xs[-1]


@pytest.fixture(scope="module")
def gmm():
    """An exact 2-D conditional GMM (B's means shifted) and A's state at k = 6 of 20."""
    sig = flowmatch_sigmas(N_STEPS)
    st0 = init_state(jax.random.key(3), (300, 2), sig, jnp.int32(0))
    gm = _gmm(
        [[-1.5, 0.0], [1.5, 0.5], [0.0, -2.5]],
        [[0.4, 0.3], [0.3, -0.4], [0.0, 0.3]],
        [0.1, 0.2, 0.15],
    )
    state_at, _ = _trajectory(gm, st0, 0)
    _, ref = _trajectory(gm, st0, 1)
    st = state_at(6)
    v_a = gm(st.x, st.sigmas[6], st.cond)
    return gm, st, ref, SwitchCache(velocity=v_a), st0


def _msd(x, ref) -> float:
    return float(jnp.mean(jnp.sum((x - ref) ** 2, -1)))


def test_gmm_controllers_beat_the_direct_switch_at_their_stated_cost(gmm):
    gm, st, ref, cached, _ = gmm
    b = jnp.int32(1)
    runs = {
        name: switch(gm, st, b, c, cached=cached)
        for name, c in {
            "direct": Direct(),
            "reproject": Reproject(),
            "mpc": MPC(),
            "shooting": Shooting(),
        }.items()
    }
    err = {k: _msd(r.state.x, ref) for k, r in runs.items()}
    assert err["mpc"] < err["direct"] / 10, err  # measured ~18x
    assert err["reproject"] < err["direct"] / 10, err  # measured ~100x
    assert err["shooting"] < err["direct"] / 2, err  # measured ~5x
    for r in runs.values():
        assert not r.fallback and r.result == RESULTS.successful
    # costs: forwards only where only forwards run
    assert runs["direct"].cost.to_dict() == {"forwards": 14, "jvps": 0, "vjps": 0}
    assert runs["mpc"].cost.to_dict() == {"forwards": 14, "jvps": 0, "vjps": 0}  # v_A cached
    assert switch(gm, st, b, MPC()).nfe == 15  # ... one call more when v_A is not cached
    assert runs["reproject"].nfe == 14 + 1
    it = int(runs["shooting"].diagnostics["iterations"])
    assert runs["shooting"].cost.to_dict() == {
        "forwards": 14 + it * (3 + 1),
        "jvps": 0,
        "vjps": it * (3 + 1),
    }


def test_gmm_analytic_mpc_against_the_exact_jacobian_lqr(gmm):
    """Samples are independent, so per-sample 2x2 JVP blocks are the exact Jacobian: the
    analytic J = I / sigma costs nothing and lands within 5% of the exact-Jacobian MPC."""
    gm, st, ref, cached, _ = gmm
    b = jnp.int32(1)
    analytic = switch(gm, st, b, MPC(), cached=cached)
    exact = switch(gm, st, b, MPC(linearisation=JVPBlocks(), solver=OSQP(tol=1e-6)), cached=cached)
    assert not exact.fallback
    frozen = switch(gm, st, b, MPC(linearisation=Frozen(probes=8)), cached=cached)
    e_a, e_x, e_f = (_msd(r.state.x, ref) for r in (analytic, exact, frozen))
    assert abs(e_a - e_x) < 0.05 * e_x, (e_a, e_x)
    assert abs(e_f - e_x) < 0.05 * e_x, (e_f, e_x)
    assert exact.cost.jvps == 3 * 2 and exact.cost.forwards == 14 + 3
    assert frozen.cost.jvps == 8 and analytic.cost.jvps == 0


def test_mpc_lqr_equals_mpc_osqp_on_the_diagonal_model(gmm):
    gm, st, _, cached, _ = gmm
    b = jnp.int32(1)
    lqr = switch(gm, st, b, MPC(), cached=cached)
    for form in ("dense", "matrix-free"):
        qp = switch(gm, st, b, MPC(solver=OSQP(tol=1e-6, form=form)), cached=cached)
        assert not qp.fallback
        np.testing.assert_allclose(np.asarray(lqr.state.x), np.asarray(qp.state.x), atol=1e-5)


def test_equal_nfe_and_sdedit_baselines(gmm):
    gm, st, _, _, st0 = gmm
    base = from_scratch_equal_nfe(gm, st0.x, jnp.int32(1), N_STEPS - 6)
    assert int(base.step) == N_STEPS - 6 and base.sigmas.shape == (N_STEPS - 6 + 1,)
    ref = integrate(gm, st0.x, flowmatch_sigmas(N_STEPS - 6), jnp.int32(1)).x
    np.testing.assert_array_equal(np.asarray(base.x), np.asarray(ref))
    final_a = _trajectory(gm, st0, 0)[1]
    r1 = switch(gm, st, jnp.int32(1), SDEdit())
    r2 = switch(gm, st, jnp.int32(1), SDEdit(), cached=SwitchCache(final=final_a))
    assert r1.nfe == 2 * (N_STEPS - 6) and r2.nfe == N_STEPS - 6
    np.testing.assert_allclose(np.asarray(r1.state.x), np.asarray(r2.state.x), atol=1e-4)


def test_blend_commands_and_adaptive_similarity(gmm):
    gm, st, _, cached, _ = gmm
    b = jnp.int32(1)
    blend = switch(gm, st, b, Blend(transition_steps=3))
    assert blend.nfe == 14 + 2  # two blended steps call both prompts
    assert switch(gm, st, b, Blend(transition_steps=1)).nfe == 14
    # a text similarity picks the text thresholds; without one the velocity cosine (2 calls)
    fast = switch(gm, st, b, Adaptive(), similarity=0.99)
    slow = switch(gm, st, b, Adaptive(), similarity=0.5)
    measured = switch(gm, st, b, Adaptive(), cached=cached)
    assert fast.nfe < slow.nfe  # 3-step vs 8-step ramp (blended steps cost two calls)
    assert "similarity" in measured.diagnostics and measured.nfe >= 14 + 1
    # the same prompt twice: a cosine of 1 + 1 ulp is accepted (clipped)
    assert not switch(gm, st, b, Adaptive(), similarity=1.0000000000000002).fallback


def test_mpc_with_a_blend_command_and_multiple_shooting(gmm):
    gm, st, ref, cached, _ = gmm
    b = jnp.int32(1)
    r = switch(gm, st, b, MPC(command=Blend(transition_steps=3)), cached=cached)
    assert not r.fallback and np.isfinite(np.asarray(r.state.x)).all()
    m = switch(gm, st, b, MultipleShooting(max_iter=60), cached=cached)
    assert float(m.diagnostics["defect"]) < 0.05
    assert _msd(m.state.x, ref) < _msd(switch(gm, st, b, Direct()).state.x, ref)
    sm = switch(gm, st, b, ShootingMPC(), cached=cached)
    assert not sm.fallback and sm.cost.vjps > 0


def test_batched_switch_equals_per_pair_loop(gmm):
    """vmap over three prompt pairs (A->B, B->A, A->A) equals switching each pair alone."""
    gm, _, _, _, st0 = gmm
    pairs = [(0, 1), (1, 0), (0, 0)]
    states = [_trajectory(gm, st0, a)[0](6) for a, _ in pairs]
    conds_b = jnp.array([b for _, b in pairs], jnp.int32)
    for ctrl in (MPC(), Reproject()):
        batch = switch_batch(gm, stack_states(states), conds_b, ctrl)
        for i, (st, (_, b)) in enumerate(zip(states, pairs)):
            one = switch(gm, st, jnp.int32(b), ctrl)
            np.testing.assert_allclose(np.asarray(batch.x[i]), np.asarray(one.state.x), atol=1e-5)
            assert int(batch.cost.forwards[i]) == one.nfe
            assert batch.results[i] == one.result
    # A -> A is not a no-op for MPC on this curved flow (A's own trajectory is not exactly
    # noise-consistent), but the drift stays far below a real switch's error
    same = _trajectory(gm, st0, 0)[1]
    drift = _msd(batch.x[2], same)
    assert drift < 0.05 * _msd(states[0].x, states[1].x)


def test_throw_raises_on_a_fallback(gmm):
    gm, st, _, cached, _ = gmm
    bad = MPC(linearisation=JVPBlocks(), solver=OSQP(maxiter=1))
    r = switch(gm, st, jnp.int32(1), bad, cached=cached)
    assert r.fallback and r.outcome == "qp_not_converged"
    with pytest.raises(Exception, match="did not converge"):
        switch(gm, st, jnp.int32(1), bad, cached=cached, throw=True)


def test_cost_arithmetic():
    c = Cost(forwards=3, jvps=2) + Cost(vjps=4).scale(2)
    assert c.to_dict() == {"forwards": 3, "jvps": 2, "vjps": 8}
    assert float(c.forward_equivalents(jvp=1.5, vjp=2.5)) == 3 + 3 + 20
    with pytest.raises(ValueError, match="measured cost ratio"):
        c.forward_equivalents(jvp=0.0, vjp=1.0)


# ------------------------------------------------------------------------------ bad input
def test_bad_input(getkey):
    f = _pixel_field(getkey(), 3)
    sig = flowmatch_sigmas(6)
    st = integrate(f, init_state(getkey(), (2, 3), sig, 0.5), stop=2)
    with pytest.raises(TypeError, match=r"controller must be a controller object"):
        switch(f, st, -0.5, "mpc")
    with pytest.raises(ValueError, match=r"no PRNG key.*SwitchCache\(noise="):
        switch(f, st.replace(key=None), -0.5, Direct())
    with pytest.raises(ValueError, match="seed noise"):
        switch(f, st, -0.5, Direct(), cached=SwitchCache(noise=jnp.zeros((3, 3))))
    with pytest.raises(ValueError, match="already finished"):
        switch(f, integrate(f, st), -0.5, Direct())
    with pytest.raises(ValueError, match="needs prompt A's conditioning"):
        switch(f, st.replace(cond=None), -0.5, MPC())
    with pytest.raises(ValueError, match="target must be one of"):
        Reproject(target="fresh")
    with pytest.raises(ValueError, match="effort_weight must be > 0"):
        MPC(effort_weight=0.0)
    with pytest.raises(ValueError, match="decay must lie in"):
        MPC(decay=1.5)
    with pytest.raises(ValueError, match="horizon must be an int >= 1"):
        MPC(horizon=0)
    with pytest.raises(ValueError, match="use solver=OSQP"):
        MPC(linearisation=JVPBlocks())
    with pytest.raises(ValueError, match="similarity must be a cosine"):
        switch(f, st, -0.5, Adaptive(), similarity=1.5)
    assert isinstance(Analytic(), object)
