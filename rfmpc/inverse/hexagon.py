"""The MPC-Flow authors' 2D experiment on their own trained field: steer a flow to a hexagon corner.

The field (``rfmpc/assets/mpcflow_hexagon``, Apache-2.0, the authors' weights unchanged) is a
small MLP trained by the MPC-Flow authors on the boundary of the regular hexagon of radius 2. In
their convention ``t`` runs from 0 (noise) to 1 (data) and ``dx/dt = v(x, t)``; in rfmpc's,
``sigma = 1 - t`` and ``v_rfmpc(x, sigma) = -v(x, 1 - sigma)`` (:func:`hexagon_field`).

The experiment (Webber, Denker et al., arXiv:2601.23231, their ``2DHexagon`` scripts): start at
``x_0`` at ``t = 0``, take ``N = 100`` uniform Euler steps with controls, and reach a corner
``c``. Cost ``terminal_weight / 2 ||x_T - c||^2 + control_weight sum_i ||u_i||^2 dt_i`` (defaults
0.075 and 0.001). In rfmpc's convention a control ``u`` of theirs is ``-u`` of ours (same energy);
every number reported here is in *their* convention, as their scripts print it.

* :func:`global_control`: the open-loop problem over all 100 steps at once, Adam (lr 1e-2,
  3000 iterations, from ``u = 0``) on exact gradients through the diffrax solve.
* :func:`receding_horizon`: at each true step ``t_i`` a sub-problem over ``K`` uniform Euler
  steps on ``linspace(t_i, 1, K + 1)``, Adam (lr 0.1, 200 iterations), warm-started by shifting
  the last plan one step and appending a zero (``K = 1``: from zero); the first control is
  applied over the true step. ``K = 1`` predicts the end point with one straight step.
* :func:`delta_t_horizon`: the one-step (``Delta t``) sub-problem of MPC-Flow: control the next
  true step only and charge the terminal cost at the one-step prediction ``D(x_{i+1}) = x_{i+1} +
  (1 - t_{i+1}) v(x_{i+1}, t_{i+1})`` of the end point (the identity on the last step); Adam as
  above, warm-started from the previous step's control.

All three are pure JAX (jit-compiled ``lax.scan`` / ``fori_loop``); the receding horizon's
Euler rollouts go through :func:`rfmpc.flow.integrate` on each sub-problem's grid.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float

from rfmpc.flow.solve import integrate, integrate_path
from rfmpc.io import load_safetensors

__all__ = [
    "HEXAGON_WEIGHTS",
    "HexagonMLP",
    "HexagonRun",
    "delta_t_horizon",
    "global_control",
    "hexagon_corners",
    "hexagon_field",
    "load_hexagon_mlp",
    "receding_horizon",
    "uncontrolled",
]

HEXAGON_WEIGHTS = (
    Path(__file__).resolve().parent.parent
    / "assets"
    / "mpcflow_hexagon"
    / "mlp_hexagon.safetensors"
)
_LAYERS = ("main.0", "main.2", "main.4", "main.6", "main.8")


class HexagonMLP(eqx.Module):
    """The authors' ``MLP(input_dim=2, time_dim=1, hidden_dim=128)``: ``v(x, t)``, their
    convention. ``weights[i]`` is ``(out, in)`` (PyTorch layout), Swish between layers."""

    weights: tuple[Array, ...]
    biases: tuple[Array, ...]

    def __call__(self, x: Float[Array, "*b 2"], t) -> Float[Array, "*b 2"]:
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (*x.shape[:-1], 1))
        h = jnp.concatenate([x, t], axis=-1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            bias = b.astype(x.dtype).reshape((1,) * (h.ndim - 1) + b.shape)
            h = h @ w.T.astype(x.dtype) + bias
            if i < len(self.weights) - 1:
                h = h * jax.nn.sigmoid(h)
        return h


def load_hexagon_mlp(path: str | Path | None = None) -> HexagonMLP:
    """The authors' trained MLP from ``path`` (default: the copy shipped with rfmpc)."""
    tensors, _ = load_safetensors(HEXAGON_WEIGHTS if path is None else path)
    missing = [f"{n}.{p}" for n in _LAYERS for p in ("weight", "bias") if f"{n}.{p}" not in tensors]
    extra = sorted(set(tensors) - {f"{n}.{p}" for n in _LAYERS for p in ("weight", "bias")})
    if missing or extra:
        raise ValueError(
            f"{path or HEXAGON_WEIGHTS} is not the hexagon MLP: missing {missing}, unexpected "
            f"{extra}"
        )
    ws = tuple(jnp.asarray(tensors[f"{n}.weight"], jnp.float32) for n in _LAYERS)
    bs = tuple(jnp.asarray(tensors[f"{n}.bias"], jnp.float32) for n in _LAYERS)
    shapes = [w.shape for w in ws]
    want = [(128, 3), (128, 128), (128, 128), (128, 128), (2, 128)]
    if shapes != want:
        raise ValueError(f"hexagon MLP weight shapes {shapes} differ from {want}")
    return HexagonMLP(ws, bs)


class _RfmpcField(eqx.Module):
    mlp: HexagonMLP

    def __call__(self, x, sigma, cond=None):
        return -self.mlp(x, 1.0 - jnp.asarray(sigma, x.dtype))


def hexagon_field(mlp: HexagonMLP | None = None):
    """The field in rfmpc's convention: ``v_rfmpc(x, sigma, cond) = -v(x, 1 - sigma)``."""
    return _RfmpcField(load_hexagon_mlp() if mlp is None else mlp)


def hexagon_corners(radius: float = 2.0, center=(0.0, 0.0)) -> np.ndarray:
    """The six corners in the authors' order (angles 0, 60, ..., 300 degrees); ``[-1]`` is
    their default target ``(1, -sqrt(3))``."""
    a = np.deg2rad(60.0 * np.arange(6))
    return np.stack([center[0] + radius * np.cos(a), center[1] + radius * np.sin(a)], axis=-1)


class HexagonRun(NamedTuple):
    """One controlled run, in the authors' convention.

    Attributes:
        path: ``(N + 1, 1, 2)`` states from ``t = 0`` to 1.
        controls: ``(N, 1, 2)`` applied controls (their sign).
        terminal: ``||x_T - c||^2``.
        control: ``sum_i ||u_i||^2 dt``.
    """

    path: Array
    controls: Array
    terminal: Array
    control: Array

    @property
    def x_T(self) -> Array:
        return self.path[-1, 0]


def _grid(n: int) -> Array:
    return jnp.linspace(1.0, 0.0, n + 1)  # sigma = 1 - t, uniform


def _run(field, x0, controls_rfmpc, n: int, target) -> HexagonRun:
    sig = _grid(n)
    _, xs = integrate_path(field, x0, sig, None, control=controls_rfmpc)
    dt = 1.0 / n
    u = -controls_rfmpc
    return HexagonRun(
        path=xs,
        controls=u,
        terminal=jnp.sum((xs[-1] - target) ** 2),
        control=jnp.sum(u**2) * dt,
    )


def _check(x0, target, n: int):
    x0, target = np.asarray(x0, np.float64), np.asarray(target, np.float64)
    if x0.size != 2 or target.size != 2:
        raise ValueError(
            f"x0 and target must be 2-D points, got shapes {x0.shape} and {target.shape}"
        )
    x0 = jnp.asarray(x0, jnp.float32).reshape(1, 2)
    target = jnp.asarray(target, jnp.float32).reshape(1, 2)
    if not (bool(jnp.all(jnp.isfinite(x0))) and bool(jnp.all(jnp.isfinite(target)))):
        raise ValueError("x0 and target must be finite 2-D points")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {n!r}")
    return x0, target


def uncontrolled(field, x0=(-0.75, -0.5), target=None, num_steps: int = 100) -> HexagonRun:
    """The field's own trajectory from ``x0`` (no control)."""
    target = hexagon_corners()[-1] if target is None else target
    x0, target = _check(x0, target, num_steps)
    return _run(field, x0, jnp.zeros((num_steps, 1, 2)), num_steps, target)


@eqx.filter_jit
def _global(field, x0, target, n, iters, lr, tw, cw):
    sig = _grid(n)
    dt = 1.0 / n
    opt = optax.adam(lr)

    def loss(u_theirs):
        xf = integrate(field, x0, sig, None, control=-u_theirs).x
        return tw * 0.5 * jnp.sum((xf - target) ** 2) + cw * jnp.sum(u_theirs**2) * dt

    def body(_, c):
        u, st = c
        g = jax.grad(loss)(u)
        upd, st = opt.update(g, st, u)
        return optax.apply_updates(u, upd), st

    u0 = jnp.zeros((n, 1, 2), x0.dtype)
    u, _ = jax.lax.fori_loop(0, iters, body, (u0, opt.init(u0)))
    return u


def global_control(
    field,
    x0=(-0.75, -0.5),
    target=None,
    *,
    num_steps: int = 100,
    iters: int = 3000,
    lr: float = 1e-2,
    terminal_weight: float = 0.075,
    control_weight: float = 1e-3,
) -> HexagonRun:
    """Open-loop optimal control over the whole horizon (module docstring)."""
    target = hexagon_corners()[-1] if target is None else target
    x0, target = _check(x0, target, num_steps)
    u = _global(field, x0, target, num_steps, iters, lr, terminal_weight, control_weight)
    return _run(field, x0, -u, num_steps, target)


@eqx.filter_jit
def _receding(field, x0, target, n, k, iters, lr, tw, cw):
    t_true = jnp.linspace(0.0, 1.0, n + 1)
    opt = optax.adam(lr)

    def plan(x, t_i, u_init):
        sub = 1.0 - jnp.linspace(t_i, 1.0, k + 1)  # sigma grid of the sub-problem
        dts = sub[:-1] - sub[1:]

        def loss(u):
            xf = integrate(field, x, sub, None, control=-u).x
            return tw * 0.5 * jnp.sum((xf - target) ** 2) + cw * jnp.sum(
                jnp.sum(u**2, axis=(1, 2)) * dts
            )

        def body(_, c):
            u, st = c
            g = jax.grad(loss)(u)
            upd, st = opt.update(g, st, u)
            return optax.apply_updates(u, upd), st

        u, _ = jax.lax.fori_loop(0, iters, body, (u_init, opt.init(u_init)))
        return u

    def step(c, i):
        x, u_prev = c
        shifted = jnp.concatenate([u_prev[1:], jnp.zeros_like(u_prev[:1])])
        u_init = jnp.zeros_like(u_prev) if k == 1 else jnp.where(i > 0, shifted, u_prev)
        u = plan(x, t_true[i], u_init)
        dt = t_true[i + 1] - t_true[i]
        x = x + dt * (-field(x, 1.0 - t_true[i]) + u[0])  # their step, their sign of u
        return (x, u), (x, u[0])

    u0 = jnp.zeros((k, 1, 2), x0.dtype)
    _, (xs, us) = jax.lax.scan(step, (x0, u0), jnp.arange(n))
    return jnp.concatenate([x0[None], xs]), us


def receding_horizon(
    field,
    k: int,
    x0=(-0.75, -0.5),
    target=None,
    *,
    num_steps: int = 100,
    iters: int = 200,
    lr: float = 0.1,
    terminal_weight: float = 0.075,
    control_weight: float = 1e-3,
) -> HexagonRun:
    """Receding-horizon control with ``K = k`` coarse steps per sub-problem (module docstring)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (the horizon's Euler steps) must be an int >= 1, got {k!r}")
    target = hexagon_corners()[-1] if target is None else target
    x0, target = _check(x0, target, num_steps)
    xs, us = _receding(field, x0, target, num_steps, k, iters, lr, terminal_weight, control_weight)
    dt = 1.0 / num_steps
    return HexagonRun(xs, us, jnp.sum((xs[-1] - target) ** 2), jnp.sum(us**2) * dt)


@eqx.filter_jit
def _delta_t(field, x0, target, n, iters, lr, tw, cw):
    t_true = jnp.linspace(0.0, 1.0, n + 1)
    opt = optax.adam(lr)

    def step(c, i):
        x, u_prev = c
        t, t1 = t_true[i], t_true[i + 1]
        dt = t1 - t
        v0 = -field(x, 1.0 - t)

        def loss(u):
            z = x + dt * (v0 + u)
            z = jnp.where(i < n - 1, z + (1.0 - t1) * (-field(z, 1.0 - t1)), z)
            return tw * 0.5 * jnp.sum((z - target) ** 2) + cw * jnp.sum(u**2) * dt

        def body(_, c):
            u, st = c
            g = jax.grad(loss)(u)
            upd, st = opt.update(g, st, u)
            return optax.apply_updates(u, upd), st

        u, _ = jax.lax.fori_loop(0, iters, body, (u_prev, opt.init(u_prev)))
        x = x + dt * (v0 + u)
        return (x, u), (x, u)

    _, (xs, us) = jax.lax.scan(step, (x0, jnp.zeros_like(x0)), jnp.arange(n))
    return jnp.concatenate([x0[None], xs]), us


def delta_t_horizon(
    field,
    x0=(-0.75, -0.5),
    target=None,
    *,
    num_steps: int = 100,
    iters: int = 200,
    lr: float = 0.1,
    terminal_weight: float = 0.075,
    control_weight: float = 1e-3,
) -> HexagonRun:
    """The one-step (``Delta t``) horizon with the one-step end-point prediction (docstring)."""
    target = hexagon_corners()[-1] if target is None else target
    x0, target = _check(x0, target, num_steps)
    xs, us = _delta_t(field, x0, target, num_steps, iters, lr, terminal_weight, control_weight)
    dt = 1.0 / num_steps
    return HexagonRun(xs, us, jnp.sum((xs[-1] - target) ** 2), jnp.sum(us**2) * dt)
