"""``MPC``: receding-horizon control of the first steps after a prompt switch.

At each of the first ``control_steps`` grid steps ``j`` after the switch (state ``x_j``, noise
level ``sigma_j``), with ``v_B(x_j)`` the velocity the step evaluates anyway:

1. **Nominal path.** B's straight path through ``x_j``: with ``x0_B = x_j - sigma_j v_B`` and
   ``eps_B = x_j + (1 - sigma_j) v_B``, ``x_bar(sigma) = (1 - sigma) x0_B + sigma eps_B``.
2. **Reference.** The same path with the *target* noise: ``x_ref(sigma) = (1 - sigma) x0_B +
   sigma eps_ref``, ``eps_ref = eps_B + d^(i) (eps_target - eps_B)`` on the ``i``-th step after the
   switch (``d = decay``: the pull fades, so B's own trajectory takes over). ``eps_target`` is A's
   implied noise at the cached state (``"a-implied"``: free when the cache stored ``v_A``) or the
   seed noise. A state on B's own trajectory from the same seed implies about the same noise as
   A's state did; A's state under B does not (``eps_B != eps_A``), and that mismatch is what the
   controller removes.
3. **Model.** In deviations ``e = x - x_bar`` (``e_0 = 0``) the Euler dynamics with the
   linearisation ``J`` (:mod:`rfmpc.control.linearisation`) are ``e_{i+1} = (I + h_i J_i) e_i +
   h_i u_i``, and the reference is ``ref_i = sigma_{j+i+1} d^(j-k+i) (eps_target - eps_B)``. With
   the analytic ``J = I / sigma`` the nominal path is exactly a trajectory of the model, so the
   problem is pure regulation with ``a_i = sigma_{j+i+1} / sigma_{j+i}``.
4. **QP.** ``min sum_i q ||e_{i+1} - ref_i||^2 + r ||h_i u_i||^2 + s ||u_i - u_{i-1}||^2`` over
   ``Np = horizon`` steps (steps past the grid's end get ``h = 0`` and zero weights), box
   ``|u| <= u_max``. With a diagonal linearisation it separates per element and the
   :class:`~rfmpc.control.lqr.LQR` solves it in closed form (Riccati gains from the sigma grid
   and the weights; no model call); ``C x C`` blocks need :class:`~rfmpc.control.qp.OSQP`.
5. **Apply** the first control: ``x_{j+1} = x_j + h_j (v_cmd + u_0)``.

With the defaults (``Analytic``, ``LQR``) an MPC step costs the step's own model call plus
``O(horizon x latent size)`` arithmetic, and the whole switch at most one model call more than
``Direct`` (``v_A(x_k)``; none when cached). In closed form the applied control is
``u_0 = kappa_j (eps_target - eps_B(x_j)) + mu_j u_{j-1}`` with scalars ``kappa_j``, ``mu_j`` from
the grid: a damped, receding-horizon version of the noise-consistent re-projection.

The defaults are the best configuration on the dev split of ``benchmarks/switch_quality.py``
(embedded model, 28 steps; see ``docs/control.md`` for the measurements).

References: Mayne et al., "Constrained model predictive control: stability and optimality",
Automatica 2000; Diehl et al., real-time iteration NMPC, 2005; A. Patel, "Shooting Method and
MPC for Cross-Prompt Caching in Rectified Flow Models" (2025), section 4.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array

from rfmpc.control.base import (
    AbstractCommand,
    AbstractController,
    PlanOut,
    Schedule,
    StepOut,
    SwitchProblem,
)
from rfmpc.control.direct import Direct
from rfmpc.control.linearisation import AbstractLinearisation, Analytic
from rfmpc.control.lqr import LQR, AbstractQPSolver, LinearQP
from rfmpc.control.reproject import check_target
from rfmpc.control.results import RESULTS

__all__ = ["MPC", "MPCState", "mpc_qp"]


class MPCState(NamedTuple):
    """What the MPC carries from step to step."""

    target: Array  #: eps_target
    lin: Any  #: the linearisation's state (e.g. Frozen's coefficients)
    solver: Any  #: the QP solver's state (e.g. OSQP's warm start)
    u_prev: Array  #: the control applied on the previous step (smoothness term)


def _check_int(name: str, v, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")


def mpc_qp(
    mpc: MPC,
    p: SwitchProblem,
    j: Array,
    x: Array,
    v_b: Array,
    target: Array,
    jac: Array,
    u_prev: Array,
    ref_path: Array | None = None,
    w: Array | None = None,
) -> LinearQP:
    """The MPC's QP at grid step ``j`` (see the module docstring).

    ``ref_path`` (``(Np, *x.shape)`` states) replaces the straight reference by given states
    (``ShootingMPC`` tracks a plan); ``w`` (``(Np, *x.shape)``) adds affine terms (a plan's
    feed-forward controls times ``h``).
    """
    n, n_p, dt = p.num_steps, mpc.horizon, x.dtype
    sig = p.sigmas
    pad = jnp.concatenate([sig, jnp.zeros((n_p,), dt)])
    s_from = jax.lax.dynamic_slice(pad, (j,), (n_p,))
    s_to = jax.lax.dynamic_slice(pad, (j + 1,), (n_p,))
    idx = j + jnp.arange(n_p)
    valid = idx < n
    h = jnp.where(valid, s_to - s_from, 0.0)
    s_j = sig[j]
    x0_b = x - s_j * v_b
    eps_b = x + (1 - s_j) * v_b
    bc = lambda a: a.reshape((n_p,) + (1,) * x.ndim)
    nominal = bc(1 - s_to) * x0_b[None] + bc(s_to) * eps_b[None]
    if ref_path is None:
        pull = jnp.where(valid, jnp.asarray(mpc.decay, dt) ** (idx - p.k).astype(dt), 0.0)
        ref = bc(s_to * pull) * (target - eps_b)[None]
    else:
        ref = jnp.where(bc(valid), ref_path - nominal, 0.0)
    g = jnp.where(valid, h * s_j / jnp.where(valid, s_from, 1.0), 0.0)
    return LinearQP(
        jac=jac,
        g=g,
        h=h,
        q=jnp.where(valid, mpc.tracking_weight, 0.0).astype(dt),
        # effort on the state increment h u (not on u): the same weight means the same
        # correction per step on any grid
        r=mpc.effort_weight * jnp.where(valid, h, s_j) ** 2,
        s=jnp.where(valid, mpc.smoothness_weight, 0.0).astype(dt),
        ref=ref,
        w=w,
        e0=jnp.zeros_like(x),
        u_prev=u_prev,
        u_max=jnp.asarray(mpc.u_max, dt),
        blocks=mpc.linearisation.is_blocks(),
    )


class MPC(AbstractController):
    """Receding-horizon MPC on the first steps after the switch (see the module docstring).

    Attributes:
        linearisation: ``Analytic()`` (default, free), ``Frozen(m)`` or ``JVPBlocks(s)``.
        solver: ``LQR()`` (closed form; diagonal linearisations) or ``OSQP(...)``.
        horizon: prediction horizon ``Np``.
        control_steps: MPC runs on this many steps after the switch, then the plain command.
        tracking_weight, effort_weight, smoothness_weight: ``q``, ``r`` (> 0; it weighs the
            state increment ``h u`` of a control, so a weight means the same on any grid) and
            ``s``.
        decay: the reference's pull on the ``i``-th step after the switch is ``decay ** i``.
        target: ``"a-implied"`` or ``"seed"`` (the noise the reference path ends in).
        u_max: box on every control element (velocity units; a safety limit by default).
        command: the command the MPC steers (default ``Direct()``).
    """

    linearisation: AbstractLinearisation = Analytic()
    solver: AbstractQPSolver = LQR()
    horizon: int = 5
    control_steps: int | None = 3
    tracking_weight: float = 1.0
    effort_weight: float = 0.73
    smoothness_weight: float = 0.0
    decay: float = 0.7
    target: str = "a-implied"
    u_max: float = 50.0
    command: AbstractCommand = Direct()

    def __check_init__(self):
        if not isinstance(self.linearisation, AbstractLinearisation):
            raise TypeError(
                "linearisation must be Analytic(), Frozen(...) or JVPBlocks(...), got "
                f"{self.linearisation!r}"
            )
        if not isinstance(self.solver, AbstractQPSolver):
            raise TypeError(f"solver must be LQR() or OSQP(...), got {self.solver!r}")
        if self.linearisation.is_blocks() and not self.solver.handles_blocks():
            raise ValueError(
                f"{type(self.linearisation).__name__} gives coupled C x C Jacobian blocks, which "
                f"the {type(self.solver).__name__} closed form cannot solve: use solver=OSQP()"
            )
        if not isinstance(self.command, AbstractCommand):
            raise TypeError(
                f"command must be Direct(), Blend(...) or Adaptive(...), got {self.command!r}"
            )
        _check_int("horizon", self.horizon, 1)
        if self.control_steps is not None:
            _check_int("control_steps", self.control_steps, 1)
        for name in ("tracking_weight", "smoothness_weight"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        if not (isinstance(self.effort_weight, (int, float)) and self.effort_weight > 0):
            raise ValueError(
                f"effort_weight must be > 0 (it keeps the QP strictly convex), got "
                f"{self.effort_weight!r}; use a small value such as 1e-6 for near dead-beat "
                "control"
            )
        if not (isinstance(self.decay, (int, float)) and 0.0 <= self.decay <= 1.0):
            raise ValueError(f"decay must lie in [0, 1], got {self.decay!r}")
        check_target(self.target)
        if not (isinstance(self.u_max, (int, float)) and self.u_max > 0):
            raise ValueError(f"u_max must be > 0, got {self.u_max!r}")

    def schedule(self, p: SwitchProblem) -> Schedule:
        return self.command.schedule(p)

    def init(self, p: SwitchProblem, sched: Schedule) -> PlanOut:
        target, cost = p.noise_target(self.target)
        lin, lin_cost = self.linearisation.init(p)
        state = MPCState(target, lin, self.solver.init(p.x, self.horizon), jnp.zeros_like(p.x))
        return PlanOut(p.x, state, cost + lin_cost, RESULTS.successful, {})

    def window(self, remaining: int) -> int:
        return remaining if self.control_steps is None else min(self.control_steps, remaining)

    def uses_b_velocity(self) -> bool:
        return True

    def step(self, p, sched, state: MPCState, j, x, v_cmd, v_b) -> StepOut:
        jac, cost = self.linearisation.jacobian(state.lin, p, j, x)
        qp = mpc_qp(self, p, j, x, v_b, state.target, jac, state.u_prev)
        u0, solver_state, result, info = self.solver.solve(state.solver, qp)
        ok = result == RESULTS.successful
        eps_b = x + (1 - p.sigmas[j]) * v_b
        info = dict(
            info,
            consistency=jnp.mean((eps_b - state.target) ** 2),
            control_rms=jnp.sqrt(jnp.mean(jnp.where(ok, u0, 0.0) ** 2)),
        )
        new = MPCState(state.target, state.lin, solver_state, jnp.where(ok, u0, 0.0))
        return StepOut(u0, new, cost, result, info)
