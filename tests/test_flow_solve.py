"""The controlled ODE solve: diffusers-style Euler path, exact resume, gradients, bad input."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rfmpc.flow import (
    GaussianMixture,
    StateFileError,
    TrajectoryState,
    euler_reference,
    flowmatch_sigmas,
    init_state,
    integrate,
    integrate_path,
)


def _nhwc_field(key, c=4):
    """A small nonlinear conditional field on NHWC latents (stands in for a network)."""
    k1, k2 = jax.random.split(key)
    w = jax.random.normal(k1, (c, c)) / np.sqrt(c)
    b = jax.random.normal(k2, (c,))

    def field(x, sigma, cond):
        h = jnp.einsum("bhwc,cd->bhwd", x, w) + cond["emb"][:, None, None, :] * (1.0 - sigma)
        return jnp.tanh(h) + sigma * b[None, None, None] - x

    return field


@pytest.fixture
def setup(getkey):
    field = _nhwc_field(getkey())
    x = jax.random.normal(getkey(), (2, 4, 3, 4))
    cond = {"emb": jax.random.normal(getkey(), (2, 4)), "extra": [jnp.arange(3.0)]}
    return field, x, cond


def test_matches_hand_written_loop(setup):
    field, x, cond = setup
    sig = flowmatch_sigmas(10)
    ours = integrate(field, x, sig, cond).x
    # The hand loop is unrolled (XLA may fuse across steps) or eager: equal up to float rounding.
    jitted_ref = jax.jit(lambda x: euler_reference(field, x, sig, cond))(x)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(jitted_ref), rtol=2e-6, atol=2e-6)
    eager_ref = euler_reference(field, x, sig, cond)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(eager_ref), rtol=2e-6, atol=2e-6)


def test_control_and_cond_schedule_match_loop(setup, getkey):
    field, x, cond = setup
    sig = flowmatch_sigmas(6)
    u = 0.3 * jax.random.normal(getkey(), (4, *x.shape))
    other = {"emb": -cond["emb"], "extra": cond["extra"]}

    def schedule(sigma, step):
        a = jnp.clip((step - 2) / 3.0, 0.0, 1.0)
        return jax.tree.map(lambda p, q: (1 - a) * p + a * q, cond, other)

    ours = integrate(field, x, sig, schedule, control=u, start=1, stop=5).x
    ref = jax.jit(lambda x: euler_reference(field, x, sig, schedule, start=1, stop=5, control=u))(x)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=2e-6, atol=2e-6)
    # a control that is not applied (zeros) must not change the path at all
    none = integrate(field, x, sig, schedule, start=1, stop=5).x
    zero = integrate(field, x, sig, schedule, control=jnp.zeros_like(u), start=1, stop=5).x
    np.testing.assert_array_equal(np.asarray(none), np.asarray(zero))
    assert float(jnp.abs(ours - none).max()) > 1e-3  # and a real one does
    feedback = lambda x, sigma, step: -0.5 * x * sigma
    ours_fb = integrate(field, x, sig, cond, control=feedback).x
    ref_fb = jax.jit(lambda x: euler_reference(field, x, sig, cond, control=feedback))(x)
    np.testing.assert_allclose(np.asarray(ours_fb), np.asarray(ref_fb), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("n", [1, 8])
def test_resume_bit_exact_at_every_step(setup, tmp_path, getkey, n):
    field, x, cond = setup
    sig = flowmatch_sigmas(n)
    key = getkey()
    full = integrate(field, x, sig, cond, key=key)
    for k in range(n + 1):
        part = integrate(field, x, sig, cond, stop=k, key=key)
        assert int(part.step) == k
        path = tmp_path / f"state_{k}.safetensors"
        part.save(path)
        loaded = TrajectoryState.load(path)
        assert int(loaded.step) == k
        np.testing.assert_array_equal(np.asarray(loaded.x), np.asarray(part.x))
        resumed = integrate(field, loaded)
        assert int(resumed.step) == n and resumed.done
        np.testing.assert_array_equal(np.asarray(resumed.x), np.asarray(full.x))
        np.testing.assert_array_equal(
            np.asarray(jax.random.key_data(resumed.key)), np.asarray(jax.random.key_data(key))
        )


def test_resume_with_control_bit_exact(setup, getkey):
    field, x, cond = setup
    sig = flowmatch_sigmas(8)
    u = 0.2 * jax.random.normal(getkey(), (8, *x.shape))
    full = integrate(field, x, sig, cond, control=u).x
    mid = integrate(field, x, sig, cond, control=u[:3], stop=3)
    rest = integrate(field, mid, control=u[3:]).x
    np.testing.assert_array_equal(np.asarray(rest), np.asarray(full))


def test_path_is_consistent(setup):
    field, x, cond = setup
    sig = flowmatch_sigmas(7)
    st, xs = integrate_path(field, x, sig, cond, start=2, stop=6)
    assert xs.shape == (5, *x.shape)
    np.testing.assert_array_equal(np.asarray(xs[0]), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(xs[-1]), np.asarray(st.x))
    mid = integrate(field, x, sig, cond, start=2, stop=4).x
    np.testing.assert_array_equal(np.asarray(xs[2]), np.asarray(mid))


def test_gradients_match_finite_differences(getkey):
    with jax.enable_x64(True):
        k = [getkey() for _ in range(6)]
        gm = GaussianMixture(
            jnp.array([0.4, 0.6]),
            jax.random.normal(k[0], (2, 3)),
            jnp.stack([0.3 * jnp.eye(3), 0.5 * jnp.eye(3)]),
        )
        field = lambda x, s, c: gm.velocity(x, s)
        sig = jnp.asarray(flowmatch_sigmas(6), jnp.float64)
        x1 = jax.random.normal(k[1], (2, 3), jnp.float64)
        target = jax.random.normal(k[2], (2, 3), jnp.float64)
        u0 = 0.1 * jax.random.normal(k[3], (6, 2, 3), jnp.float64)

        def loss(u, x):
            xf = integrate(field, x, sig, control=u).x
            return jnp.sum((xf - target) ** 2) + 0.1 * jnp.sum(u**2)

        gu, gx = jax.grad(loss, argnums=(0, 1))(u0, x1)
        for g, arg, d in (
            (gu, 0, jax.random.normal(k[4], u0.shape, jnp.float64)),
            (gx, 1, jax.random.normal(k[5], x1.shape, jnp.float64)),
        ):
            eps = 1e-6
            args_p = [u0, x1]
            args_m = [u0, x1]
            args_p[arg] = args_p[arg] + eps * d
            args_m[arg] = args_m[arg] - eps * d
            fd = (loss(*args_p) - loss(*args_m)) / (2 * eps)
            ad = jnp.sum(g * d)
            assert abs(float(fd - ad)) <= 1e-7 * max(1.0, abs(float(ad))), (float(fd), float(ad))


def test_init_state_and_metadata(tmp_path, getkey):
    sig = flowmatch_sigmas(4)
    cond = {"a": jnp.ones((1, 3)), "b": (jnp.zeros(2), None, [jnp.arange(4)])}
    st = init_state(getkey(), (1, 2, 2, 3), sig, cond, meta={"prompt": "a red circle", "k": 3})
    st.save(tmp_path / "s.safetensors")
    back = TrajectoryState.load(tmp_path / "s.safetensors")
    assert back.metadata == {"prompt": "a red circle", "k": 3}
    assert isinstance(back.cond["b"], tuple) and back.cond["b"][1] is None
    np.testing.assert_array_equal(np.asarray(back.cond["b"][2][0]), np.arange(4))
    np.testing.assert_array_equal(np.asarray(back.x), np.asarray(st.x))
    assert float(back.sigma) == 1.0


# ------------------------------------------------------------------------------ bad input
def test_step_out_of_range(setup):
    field, x, cond = setup
    sig = flowmatch_sigmas(5)
    with pytest.raises(ValueError, match=r"start=7 is out of range.*0\.\.5"):
        integrate(field, x, sig, cond, start=7)
    with pytest.raises(ValueError, match="stop=2 is out of range"):
        integrate(field, x, sig, cond, start=3, stop=2)
    with pytest.raises(ValueError, match="stop=6 is out of range"):
        integrate(field, x, sig, cond, stop=6)
    with pytest.raises(TypeError, match="start must be a Python int"):
        integrate(field, x, sig, cond, start=1.5)


def test_non_decreasing_grid(setup):
    field, x, cond = setup
    with pytest.raises(ValueError, match="strictly decreasing"):
        integrate(field, x, jnp.array([1.0, 0.6, 0.7, 0.0]), cond)


def test_shape_mismatch_between_state_and_field(setup):
    field, x, cond = setup
    sig = flowmatch_sigmas(3)
    wrong = jnp.zeros((2, 4, 3, 5))  # 5 channels for a 4-channel field
    with pytest.raises(ValueError, match="velocity field"):
        integrate(field, wrong, sig, cond)
    squeeze = lambda x, s, c: x[..., :2]
    with pytest.raises(ValueError, match=r"returned shape \(2, 4, 3, 2\).*do not match"):
        integrate(squeeze, x, sig, cond)


def test_state_grid_and_control_mismatch(setup):
    field, x, cond = setup
    st = integrate(field, x, flowmatch_sigmas(4), cond, stop=2)
    with pytest.raises(ValueError, match="differs from the state's own grid"):
        integrate(field, st, flowmatch_sigmas(5))
    with pytest.raises(ValueError, match="start=1 but the state is at step 2"):
        integrate(field, st, start=1)
    with pytest.raises(ValueError, match=r"control array has shape.*expected"):
        integrate(field, st, control=jnp.zeros((5, *x.shape)))


def test_truncated_and_tampered_state_files(setup, tmp_path):
    field, x, cond = setup
    st = integrate(field, x, flowmatch_sigmas(4), cond, stop=2)
    p = tmp_path / "s.safetensors"
    st.save(p)
    raw = p.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) - 7])
    with pytest.raises(StateFileError, match="truncated or corrupted"):
        TrajectoryState.load(tmp_path / "trunc.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(raw[:5])
    with pytest.raises(StateFileError, match="truncated"):
        TrajectoryState.load(tmp_path / "tiny.safetensors")
    tampered = bytearray(raw)
    tampered[-3] ^= 0xFF
    (tmp_path / "tampered.safetensors").write_bytes(bytes(tampered))
    with pytest.raises(StateFileError, match="checksum mismatch"):
        TrajectoryState.load(tmp_path / "tampered.safetensors")
    with pytest.raises(StateFileError, match="no such file"):
        TrajectoryState.load(tmp_path / "missing.safetensors")
    from rfmpc.io import save_safetensors

    save_safetensors(
        tmp_path / "other.safetensors", {"x": np.zeros(2, np.float32)}, {"format": "something-else"}
    )
    with pytest.raises(StateFileError, match="not an rfmpc trajectory state"):
        TrajectoryState.load(tmp_path / "other.safetensors")


def test_interrupted_save_keeps_old_file(setup, tmp_path, monkeypatch):
    field, x, cond = setup
    sig = flowmatch_sigmas(4)
    p = tmp_path / "s.safetensors"
    first = integrate(field, x, sig, cond, stop=1)
    first.save(p)
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        integrate(field, x, sig, cond, stop=3).save(p)
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["s.safetensors"]  # no temp file left behind
    assert int(TrajectoryState.load(p).step) == 1


def test_integrate_inside_jit_with_module_field(getkey):
    """A pytree field whose arrays are traced (integrate called under an outer jit)."""
    import equinox as eqx

    class Lin(eqx.Module):
        w: jax.Array

        def __call__(self, x, sigma, cond):
            return x @ self.w

    sig = flowmatch_sigmas(3)
    x = jax.random.normal(getkey(), (2, 3))

    @jax.jit
    def run(w, x):
        return integrate(Lin(w), x, sig, start=0, stop=3).x

    w = 0.1 * jax.random.normal(getkey(), (3, 3))
    np.testing.assert_allclose(
        np.asarray(run(w, x)), np.asarray(integrate(Lin(w), x, sig).x), rtol=1e-6, atol=1e-6
    )
