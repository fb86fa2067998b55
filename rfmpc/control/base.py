"""The controller abstraction: a switch problem, a command schedule, a plan and a feedback step.

A prompt switch finishes prompt B from prompt A's cached state ``x_k`` (grid step ``k`` of ``N``).
Every controller is an immutable ``equinox.Module`` -- its options are its fields -- that answers
four questions, each a method declared here (the engine in :mod:`rfmpc.control.switch` calls
nothing else, so adding a controller touches no other file):

``schedule(p)``
    the *command*: per-step weights ``alpha (N,)`` of B in the velocity (or conditioning) blend
    that runs when no control is applied (``alpha = 1`` from ``k`` on: the direct switch).
``init(p, sched)``
    the planning stage, once at the switch: a start state (the cached one, or a re-projected /
    re-noised one), the controller's state for the rollout (a shooting plan, a target noise, QP
    warm starts...), its cost and its outcome.
``window(remaining)``
    how many steps after ``k`` run through ``step`` (static); the rest run the plain command.
``step(p, sched, state, j, x, v_cmd, v_b)``
    the feedback law on grid step ``j`` of the window: a control ``u`` in velocity units, so the
    engine takes ``x_{j+1} = x_j + h_j (v_cmd + u)`` with ``h_j = sigma_{j+1} - sigma_j`` and
    ``v_cmd`` the command's velocity at ``x_j`` (already computed by the engine: a controller
    that only needs ``v_cmd`` and ``v_B`` adds no model call).

Following equinox's abstract/final pattern, the abstract classes here declare those methods and
the concrete controllers (``Direct``, ``Blend``, ``Adaptive``, ``Reproject``, ``SDEdit``,
``Shooting``, ``MultipleShooting``, ``MPC``, ``ShootingMPC``) implement each exactly once and are
not subclassed. :class:`AbstractCommand` is a controller that applies no control (its
``init``/``window``/``step`` are the trivial ones); the control methods take one as their
``command``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from rfmpc.control.results import RESULTS, Cost

__all__ = [
    "AbstractCommand",
    "AbstractController",
    "PlanOut",
    "Schedule",
    "StepOut",
    "SwitchProblem",
    "command_velocities",
]


class SwitchProblem(eqx.Module):
    """Everything a controller may use (arrays traced; the switch step ``k`` static).

    Attributes:
        field: the velocity field ``v(x, sigma, cond)`` (pure; closed over parameters).
        x: A's cached state at grid step ``k``.
        sigmas: the grid ``(N + 1,)``, in ``x``'s dtype.
        cond_a, cond_b: the cached and the new prompt's conditioning.
        noise: A's seed noise (the ``N(0, I)`` draw A started from).
        velocity_a: ``v_A(x_k, sigma_k)`` if the cache stored it (A's own run computed it), else
            None (a controller that needs it then spends one model call).
        final_a: A's final latent if cached, else None.
        key: A's PRNG key (fresh noise for SDEdit), or None.
        similarity: the pooled text similarity of the two prompts, or None.
        k: the switch step (static).
    """

    field: Callable[[Array, Array, Any], Array]
    x: Float[Array, "..."]
    sigmas: Float[Array, " n_plus_1"]
    cond_a: Any
    cond_b: Any
    noise: Float[Array, "..."]
    velocity_a: Array | None
    final_a: Array | None
    key: Any
    similarity: Array | None
    k: int = eqx.field(static=True)

    @property
    def num_steps(self) -> int:
        return self.sigmas.shape[0] - 1

    def velocity(self, x: Array, j, cond) -> Array:
        """One model call: ``v(x, sigma_j, cond)`` in ``x``'s dtype."""
        return self.field(x, self.sigmas[j], cond).astype(x.dtype)

    def velocity_a_at_switch(self) -> tuple[Array, Cost]:
        """``v_A(x_k)``: free when cached, else one model call."""
        if self.velocity_a is not None:
            return self.velocity_a.astype(self.x.dtype), Cost()
        return self.velocity(self.x, self.k, self.cond_a), Cost(forwards=1)

    def noise_target(self, kind: str) -> tuple[Array, Cost]:
        """The noise a state on B's trajectory should imply (see :func:`implied_noise`).

        ``"a-implied"``: A's implied noise at the cached state, ``eps_A = x_k + (1 - sigma_k)
        v_A(x_k)`` (``E[eps | x_k]`` under A: on a curved flow it drifts from the seed noise as
        sigma falls, and similar prompts drift alike, so matching it removes the shared bias);
        ``"seed"``: the seed noise itself.
        """
        if kind == "seed":
            return self.noise, Cost()
        v_a, cost = self.velocity_a_at_switch()
        return implied_noise_from(self.x, self.sigmas[self.k], v_a), cost


def implied_noise_from(x: Array, sigma, v: Array) -> Array:
    """``eps_hat = x + (1 - sigma) v``: the noise a state implies, given its velocity."""
    return x + (1 - jnp.asarray(sigma, x.dtype)) * v


class Schedule(eqx.Module):
    """A command: the blend weights of B per grid step and how they blend.

    Attributes:
        alpha: ``(N,)`` weight of B on each grid step (0 before ``k``).
        similarity: the similarity the schedule was chosen from (or None).
        cost: model calls spent choosing it (e.g. measuring a velocity cosine).
        mode: ``"velocity"`` (blend the two velocities) or ``"cond"`` (blend the conditioning).
        direct: ``alpha = 1`` on every step from ``k`` on (pure B: one model call per step).
    """

    alpha: Float[Array, " n"]
    similarity: Array | None
    cost: Cost
    mode: str = eqx.field(static=True, default="velocity")
    direct: bool = eqx.field(static=True, default=True)


class PlanOut(NamedTuple):
    """What :meth:`AbstractController.init` returns."""

    x_start: Array  #: the state the rollout starts from at step ``k``
    state: Any  #: the controller's state carried through its window (any pytree)
    cost: Cost
    result: RESULTS
    diagnostics: dict  #: arrays worth reporting (objective history, residuals...)


class StepOut(NamedTuple):
    """What :meth:`AbstractController.step` returns."""

    u: Array  #: control in velocity units, ``x``'s shape
    state: Any
    cost: Cost  #: model calls beyond the engine's ``v_cmd`` / ``v_b``
    result: RESULTS  #: non-successful: the engine applies ``u = 0`` on this step
    info: dict  #: scalars per step (stacked over the window by the engine)


class AbstractController(eqx.Module):
    """A prompt-switch controller (see the module docstring for the contract)."""

    @abc.abstractmethod
    def schedule(self, p: SwitchProblem) -> Schedule:
        """The command (blend schedule) the controller steers."""

    @abc.abstractmethod
    def init(self, p: SwitchProblem, sched: Schedule) -> PlanOut:
        """The planning stage at the switch (traced, once)."""

    @abc.abstractmethod
    def window(self, remaining: int) -> int:
        """Number of steps after ``k`` that call :meth:`step` (0 .. ``remaining``; static)."""

    @abc.abstractmethod
    def uses_b_velocity(self) -> bool:
        """Whether :meth:`step` needs ``v_B(x_j)`` (the engine computes it when the command is
        not pure B on that step; otherwise ``v_b`` is ``v_cmd``)."""

    @abc.abstractmethod
    def step(
        self,
        p: SwitchProblem,
        sched: Schedule,
        state: Any,
        j: Array,
        x: Array,
        v_cmd: Array,
        v_b: Array,
    ) -> StepOut:
        """The control on grid step ``j`` of the window (traced inside a ``lax.scan``)."""


class AbstractCommand(AbstractController):
    """A controller that applies no control: only its blend schedule differs."""

    def init(self, p: SwitchProblem, sched: Schedule) -> PlanOut:
        return PlanOut(p.x, None, Cost(), RESULTS.successful, {})

    def window(self, remaining: int) -> int:
        return 0

    def uses_b_velocity(self) -> bool:
        return False

    def step(self, p, sched, state, j, x, v_cmd, v_b) -> StepOut:
        return StepOut(jnp.zeros_like(x), state, Cost(), RESULTS.successful, {})


def command_velocities(p: SwitchProblem, sched: Schedule, x, j, need_b: bool):
    """``(v_cmd, v_b, forward calls)`` on grid step ``j`` (``v_b`` is ``v_cmd`` when unused)."""
    if sched.direct:
        v = p.velocity(x, j, p.cond_b)
        return v, v, jnp.int32(1)
    a = sched.alpha[j].astype(x.dtype)
    if sched.mode == "cond":
        c = jax.tree.map(lambda u, w: (1 - a) * u + a * w, p.cond_a, p.cond_b)
        v = p.velocity(x, j, c)
        if not need_b:
            return v, v, jnp.int32(1)
        v_b = jax.lax.cond(a >= 1, lambda: v, lambda: p.velocity(x, j, p.cond_b))
        return v, v_b, 1 + (a < 1).astype(jnp.int32)

    def both():
        cs = jax.tree.map(lambda u, w: jnp.stack([u, w]), p.cond_a, p.cond_b)
        vs = jax.vmap(lambda c: p.velocity(x, j, c))(cs)
        return (1 - a) * vs[0] + a * vs[1], vs[1], jnp.int32(2)

    def single():
        c = jax.tree.map(lambda u, w: jnp.where(a >= 1, w, u), p.cond_a, p.cond_b)
        v = p.velocity(x, j, c)
        if not need_b:
            return v, v, jnp.int32(1)
        v_b = jax.lax.cond(a >= 1, lambda: v, lambda: p.velocity(x, j, p.cond_b))
        return v, v_b, 1 + (a < 1).astype(jnp.int32)

    return jax.lax.cond((a > 0) & (a < 1), both, single)


def zero_like_tree(tree):
    """Zeros with the structure, shapes and dtypes of ``tree`` (works on abstract values)."""
    return jax.tree.map(lambda a: jnp.zeros(jnp.shape(a), jnp.result_type(a)), tree)
