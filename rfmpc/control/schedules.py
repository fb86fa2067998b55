"""Prompt-switch alpha schedules and blended velocity fields.

A prompt switch at grid step ``k`` runs steps ``k .. N-1`` with a *command* velocity that moves
from prompt A to prompt B. ``alpha[i]`` in ``[0, 1]`` is the weight of B on grid step ``i``
(``alpha[i] = 0`` for ``i < k``), and the command is either

* **velocity blending** ``v = (1 - alpha) v(x, sigma, cond_a) + alpha v(x, sigma, cond_b)``
  (two model calls on steps with ``0 < alpha < 1``, one otherwise), or
* **conditioning blending** ``v = v(x, sigma, (1 - alpha) cond_a + alpha cond_b)`` (one call;
  only meaningful for continuous conditioning such as text embeddings, not prompt indices).

Schedules (arrays of shape ``(N,)``, one weight per grid step; ``j = i - k`` counts steps after
the switch):

* :func:`alpha_direct`: ``alpha = 1`` from step ``k`` on (a hard switch);
* :func:`alpha_linear`: ``alpha = min(1, (j + 1) / L)`` (``L = 1`` is the direct switch);
* :func:`alpha_sigmoid`: ``alpha = sigmoid(slope (j / L - 1/2))`` for ``j < L`` and exactly 1
  afterwards (the reference write-up's schedule, slope 10; we snap to 1 after the transition so
  the tail is pure B, where the write-up's sigmoid keeps ``alpha`` at 0.993..1). The
  :class:`~rfmpc.control.Adaptive` controller picks ``L`` from a prompt similarity.

:func:`velocity_similarity` is the cosine between ``v_A`` and ``v_B`` at the cached state (the
write-up's angle diagnostic).

Reference: A. Patel, "Shooting Method and MPC for Cross-Prompt Caching in Rectified Flow
Models" (2025), section 6 (adaptive blending schedule).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

__all__ = [
    "BlendSchedule",
    "BlendedField",
    "alpha_direct",
    "alpha_linear",
    "alpha_sigmoid",
    "blend_nfe",
    "blended_cond_field",
    "velocity_similarity",
]

_MODES = ("velocity", "cond")


def _check_ints(num_steps, switch_step):
    for name, v in (("num_steps", num_steps), ("switch_step", switch_step)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be a Python int, got {type(v).__name__}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 <= switch_step <= num_steps:
        raise ValueError(f"switch_step={switch_step} must lie in [0, num_steps={num_steps}]")


def _steps_after(num_steps: int, switch_step: int) -> Int[Array, " n"]:
    return jnp.arange(num_steps, dtype=jnp.int32) - switch_step


def alpha_direct(num_steps: int, switch_step: int) -> Float[Array, " n"]:
    """Hard switch: ``alpha[i] = 1`` for ``i >= switch_step``, else 0. Shape ``(num_steps,)``."""
    _check_ints(num_steps, switch_step)
    return (_steps_after(num_steps, switch_step) >= 0).astype(jnp.float32)


def alpha_linear(num_steps: int, switch_step: int, transition_steps) -> Float[Array, " n"]:
    """Linear ramp over ``L = transition_steps`` steps: ``alpha = clip((j + 1) / L, 0, 1)``.

    ``L`` may be a traced scalar (>= 1); ``L = 1`` equals :func:`alpha_direct`.
    """
    _check_ints(num_steps, switch_step)
    if isinstance(transition_steps, (int, float)) and transition_steps < 1:
        raise ValueError(f"transition_steps must be >= 1, got {transition_steps}")
    j = _steps_after(num_steps, switch_step).astype(jnp.float32)
    a = jnp.clip((j + 1.0) / jnp.asarray(transition_steps, jnp.float32), 0.0, 1.0)
    return jnp.where(j >= 0, a, 0.0)


def alpha_sigmoid(
    num_steps: int, switch_step: int, transition_steps, slope: float = 10.0
) -> Float[Array, " n"]:
    """The write-up's sigmoid ``alpha = 1 / (1 + exp(-slope (j / L - 0.5)))`` for ``0 <= j < L``.

    ``alpha = 0`` before the switch and exactly 1 from ``j = L`` on. ``L`` may be traced.
    """
    _check_ints(num_steps, switch_step)
    if isinstance(transition_steps, (int, float)) and transition_steps < 1:
        raise ValueError(f"transition_steps must be >= 1, got {transition_steps}")
    L = jnp.asarray(transition_steps, jnp.float32)
    j = _steps_after(num_steps, switch_step).astype(jnp.float32)
    a = jax.nn.sigmoid(slope * (j / L - 0.5))
    return jnp.where(j < 0, 0.0, jnp.where(j >= L, 1.0, a))


def velocity_similarity(v_a: Array, v_b: Array) -> Float[Array, ""]:
    """Cosine similarity of two velocity arrays over all their elements (a similarity proxy)."""
    a = v_a.reshape(-1).astype(jnp.float32)
    b = v_b.reshape(-1).astype(jnp.float32)
    den = jnp.maximum(jnp.linalg.norm(a) * jnp.linalg.norm(b), 1e-30)
    return jnp.dot(a, b) / den


class BlendedField(eqx.Module):
    """A velocity field whose ``cond`` is ``(cond_a, cond_b, alpha)``.

    ``mode="velocity"``: ``(1 - alpha) v(x, s, cond_a) + alpha v(x, s, cond_b)``, evaluating only
    the branch needed when ``alpha`` is exactly 0 or 1 (``lax.cond``; the two prompts run as one
    ``vmap``-batched call otherwise, so ``cond_a`` and ``cond_b`` must have equal structure and
    shapes; under an outer ``vmap`` with a batched ``alpha`` both branches run, same result).
    ``mode="cond"``: ``v(x, s, (1 - alpha) cond_a + alpha cond_b)`` on every pytree leaf.
    ``binary=True`` promises ``alpha`` is always exactly 0 or 1 (a direct switch) and compiles
    only the one-call branch.
    """

    field: Callable[[Array, Array, Any], Array]
    mode: str = eqx.field(static=True, default="velocity")
    binary: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {self.mode!r}")

    def __call__(self, x: Array, sigma: Array, cond) -> Array:
        cond_a, cond_b, alpha = cond
        a = jnp.asarray(alpha, x.dtype)
        if self.mode == "cond":
            c = jax.tree.map(lambda p, q: (1 - a) * p + a * q, cond_a, cond_b)
            return self.field(x, sigma, c)

        def single():  # alpha is exactly 0 or 1: one model call
            c = jax.tree.map(lambda p, q: jnp.where(a >= 1, q, p), cond_a, cond_b)
            return self.field(x, sigma, c).astype(x.dtype)

        def both():  # one batched call over the two conditionings
            cs = jax.tree.map(lambda p, q: jnp.stack([p, q]), cond_a, cond_b)
            v = jax.vmap(lambda c: self.field(x, sigma, c))(cs).astype(x.dtype)
            return (1 - a) * v[0] + a * v[1]

        if self.binary:  # the schedule is known to be 0/1 (a direct switch): one branch
            return single()
        return jax.lax.cond((a > 0) & (a < 1), both, single)


class BlendSchedule(eqx.Module):
    """A conditioning schedule ``(sigma, step) -> (cond_a, cond_b, alpha[step])`` for
    :func:`rfmpc.flow.integrate` with a :class:`BlendedField` (a pytree: no recompiles)."""

    cond_a: Any
    cond_b: Any
    alpha: Float[Array, " n"]

    def __call__(self, sigma: Array, step: Int[Array, ""]):
        return self.cond_a, self.cond_b, self.alpha[step]


def blended_cond_field(
    field: Callable[[Array, Array, Any], Array],
    cond_a: Any,
    cond_b: Any,
    alpha: Float[Array, " n"],
    *,
    mode: str = "velocity",
) -> tuple[BlendedField, BlendSchedule]:
    """The blended command field and its conditioning schedule, ready for ``integrate``.

    Example::

        bf, sched = blended_cond_field(field, cond_a, cond_b, alpha_linear(N, k, 5))
        out = integrate(bf, state_a.x, sigmas, sched, start=k)

    Args:
        field: the model's velocity field ``v(x, sigma, cond)``.
        cond_a, cond_b: the two prompts' conditioning pytrees.
        alpha: per-grid-step weight of B, shape ``(N,)``.
        mode: ``"velocity"`` (blend velocities) or ``"cond"`` (blend conditioning leaves).
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    alpha = jnp.asarray(alpha)
    if alpha.ndim != 1:
        raise ValueError(f"alpha must be a 1-D per-step schedule of shape (N,), got {alpha.shape}")
    return BlendedField(field, mode), BlendSchedule(cond_a, cond_b, alpha)


def blend_nfe(alpha: Float[Array, " n"], start: int, stop: int, mode: str) -> Int[Array, ""]:
    """Model calls to run steps ``start .. stop - 1`` of a blended command (analytic count)."""
    a = alpha[start:stop]
    if mode == "cond":
        return jnp.asarray(stop - start, jnp.int32)
    return jnp.sum(1 + ((a > 0) & (a < 1)).astype(jnp.int32)).astype(jnp.int32)
