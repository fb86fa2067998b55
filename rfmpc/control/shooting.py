"""``Shooting`` and ``MultipleShooting``: plan the first steps after a switch by exact gradients.

Setting. A trajectory of prompt A was run from seed noise ``eps`` to grid step ``k``; prompt B
must be finished from that state ``x_k``. Over a horizon of ``H`` steps run the *controlled*
Euler dynamics (``h_i = sigma_{i+1} - sigma_i < 0``)::

    x_{i+1} = x_i + h_i (v_cmd(x_i, sigma_i) + u_i),     i = k .. k+H-1,

with ``v_cmd`` the command (default ``v_B``) and ``u_i`` a per-step control in velocity units.

What is optimised (there is no ground-truth trajectory for a prompt switch, so we say exactly
what the objective rewards). For a rectified flow started from ``eps``, a state on B's own
trajectory satisfies ``x ~ (1 - sigma) x0_B + sigma eps``, i.e. its *B-implied noise*
``eps_hat_B(x, sigma) = x + (1 - sigma) v_B(x, sigma)`` matches the seed's (exactly for straight
flows; for curved flows ``eps_hat_B`` is ``E[eps | x]``). The objective (each term a *mean over
the elements* of ``x``) is::

    J(u) =   sum_{i=1..H} w || eps_hat_B(x_{k+i}) - eps_target ||^2      (consistency)
           + lam  sum_i |h_i| ||u_i||^2              (control effort, a Riemann sum of int |u|^2)
           + gam  sum_{i>=1} ||u_i - u_{i-1}||^2     (smoothness)
           + beta || v_B(x_{k+H}) - v_cmd(x_{k+H}) ||^2   (terminal velocity consistency;
                                                        zero once the command is pure B)

``eps_target`` is A's implied noise at the cached state (``"a-implied"``, default; free when the
cache stored ``v_A``) or the seed noise.

Evaluation reuses the rollout: the rollout already evaluates ``v_B`` at ``x_{k+1} ..
x_{k+H-1}`` (when the command is pure B), so the consistency terms cost one extra call (at
``x_{k+H}``), not ``H``: ``H + 1`` forward calls per evaluation of ``J`` instead of ``2H``. The
rollout is a ``lax.scan`` of Euler steps with each step under ``jax.checkpoint`` (``remat``), so
``jax.value_and_grad`` is exact and keeps about one step's activations; diffrax's solve cannot
hand back the vector-field evaluations this reuse needs. Each gradient is one VJP through those
``H + 1`` calls.

Optimisation: the shared loop :func:`rfmpc.flow.optimise.minimise` with optax (Adam by
default, cosine-decayed step, wrapped in ``optax.apply_if_finite``), early stop when the relative
improvement stays below ``rtol`` for ``patience`` iterations, the best iterate kept; a
non-finite objective/gradient/step or a value past the loop's divergence rule
(``J > J_0 + divergence_ratio * |J_0|``) stops it and the plan is discarded
(:class:`~rfmpc.control.results.RESULTS`).

Cost, honestly: ``iterations x (H + 1)`` forwards and as many VJPs for the plan, then the
``N - k`` steps of the rollout. On the embedded model at ``k = 10`` of 28 that is 10-20 times a
plain generation for no gain over the MPC (``docs/control.md``); it is here as the research tool
for exact-gradient control, not as a cache default.

Multiple shooting (Bock & Plitt 1984; Betts 2010, ch. 3) splits the horizon into segments whose
start states are decision variables too; continuity ``x_end(segment j-1) = s_j`` is enforced by an
augmented Lagrangian (``mu += rho d``, ``rho *= growth``); the final max continuity defect is
reported.

Reference: A. Patel, "Shooting Method and MPC for Cross-Prompt Caching in Rectified Flow Models"
(2025), sections 3 and "What we are actually optimizing".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int

from rfmpc.control.base import (
    AbstractCommand,
    AbstractController,
    PlanOut,
    Schedule,
    StepOut,
    SwitchProblem,
    command_velocities,
)
from rfmpc.control.direct import Direct
from rfmpc.control.reproject import check_target
from rfmpc.control.results import RESULTS, Cost
from rfmpc.control.schedules import alpha_direct
from rfmpc.flow.optimise import make_optimiser, minimise

__all__ = [
    "MultipleShooting",
    "Shooting",
    "ShootingPlan",
    "implied_noise",
    "noise_consistency_error",
    "shooting_objective",
]


def implied_noise(field, x: Array, sigma, cond) -> Array:
    """``eps_hat(x, sigma) = x + (1 - sigma) v(x, sigma, cond)``: the noise ``x`` implies.

    Exact on a straight rectified-flow path ``x = (1 - sigma) x0 + sigma eps``; for a learned
    (curved) flow it is the model's estimate ``E[eps | x]``.
    """
    sigma = jnp.asarray(sigma, x.dtype)
    return x + (1 - sigma) * field(x, sigma, cond).astype(x.dtype)


def noise_consistency_error(field, x: Array, sigma, cond, noise: Array) -> Float[Array, ""]:
    """Mean squared noise-consistency residual ``mean((eps_hat(x, sigma) - noise)^2)``."""
    return jnp.mean((implied_noise(field, x, sigma, cond) - noise) ** 2)


class ShootingPlan(eqx.Module):
    """The plan found by (multiple) shooting.

    Attributes:
        controls: ``(H, *x.shape)`` per-step controls for steps ``k .. k + H - 1``.
        path: ``(H + 1, *x.shape)`` the planned states.
        objective: ``(max_iter,)`` objective per iteration (NaN after the last).
        final_objective: the objective of the returned (best) controls.
        iterations: optimiser iterations run.
        defect: max absolute continuity defect between segments (0 for single shooting).
        result: the optimisation's outcome, a :class:`RESULTS` item of the shared loop:
            ``successful``, ``optimiser_nonfinite`` or ``optimiser_diverged`` (the plan's own
            outcome, ``plan_nonfinite`` / ``plan_diverged`` / ..., follows from it; for multiple
            shooting the first unsuccessful round's).
        stopped_early: the loop stopped by its early-stop rule (relative improvement below
            ``rtol`` for ``patience`` iterations; every round, for multiple shooting) rather than
            at ``max_iter`` -- a stop reason, not an outcome: either is ``successful``.
        cost: model evaluations of the planning.
    """

    controls: Array
    path: Array
    objective: Float[Array, " iters"]
    final_objective: Float[Array, ""]
    iterations: Int[Array, ""]
    defect: Float[Array, ""]
    result: RESULTS
    stopped_early: Bool[Array, ""]
    cost: Cost


# ----------------------------------------------------------------------------- the objective
class _Objective(eqx.Module):
    """The objective's weights and options (shared by both shooting controllers)."""

    consistency_weight: float
    effort_weight: float
    smoothness_weight: float
    terminal_weight: float
    remat: bool


def _rollout(p: SwitchProblem, sched: Schedule, x0: Array, u: Array, start, remat: bool):
    """Controlled Euler steps from ``x0`` at grid step ``start``: ``(xs (H+1), v_b (H), calls)``
    with ``v_b[i] = v_B(xs[i])`` (what the consistency terms reuse)."""

    def step(x, inp):
        j, ui = inp
        v_cmd, v_b, calls = command_velocities(p, sched, x, j, True)
        x1 = x + (p.sigmas[j + 1] - p.sigmas[j]) * (v_cmd + ui)
        return x1, (x1, v_b, calls)

    if remat:
        step = jax.checkpoint(step)
    steps = start + jnp.arange(u.shape[0], dtype=jnp.int32)
    _, (xs, vbs, calls) = jax.lax.scan(step, x0, (steps, u))
    return jnp.concatenate([x0[None], xs]), vbs, jnp.sum(calls)


def _terms(obj: _Objective, p: SwitchProblem, sched, u, xs, vbs, start, target):
    """``(J, consistency residuals (H,), forward calls)`` from a rollout ``xs``, ``vbs``."""
    h_steps = u.shape[0]
    sig = p.sigmas
    idx = start + 1 + jnp.arange(h_steps)
    sig_next = sig[idx]
    x_end = xs[-1]
    j_end = start + h_steps
    v_end = p.velocity(x_end, j_end, p.cond_b)  # the one extra call
    v_next = jnp.concatenate([vbs[1:], v_end[None]])  # v_B at xs[1:]
    nd = x_end.ndim
    bc = lambda a: a.reshape(a.shape + (1,) * nd)
    eps_hat = xs[1:] + bc(1 - sig_next).astype(x_end.dtype) * v_next
    axes = tuple(range(1, nd + 1))
    resid = jnp.mean((eps_hat - target[None]) ** 2, axis=axes)
    w = jnp.where(sig_next > 0, obj.consistency_weight, 0.0)
    h = sig[idx] - sig[idx - 1]
    total = jnp.sum(w * resid) + obj.effort_weight * jnp.sum(jnp.abs(h) * jnp.mean(u**2, axis=axes))
    if h_steps > 1:
        total = total + obj.smoothness_weight * jnp.sum(jnp.mean((u[1:] - u[:-1]) ** 2, axis=axes))
    calls = jnp.int32(1)
    if obj.terminal_weight > 0 and not sched.direct:
        n = p.num_steps
        j_cmd = jnp.minimum(j_end, n - 1)
        v_cmd, _, c = command_velocities(p, sched, x_end, j_cmd, False)
        total = total + obj.terminal_weight * jnp.mean((v_end - v_cmd) ** 2)
        calls = calls + c
    return total, resid, calls


def shooting_objective(
    field: Callable[[Array, Array, Any], Array],
    x: Float[Array, "..."],
    sigmas: Float[Array, " n_plus_1"],
    start: int,
    cond_b: Any,
    target: Float[Array, "..."],
    controls: Float[Array, "h ..."],
    *,
    consistency_weight: float = 1.0,
    effort_weight: float = 1e-2,
    smoothness_weight: float = 1e-3,
    remat: bool = True,
) -> Float[Array, ""]:
    """The single-shooting objective ``J(u)`` of the module docstring for the direct command.

    Differentiable in ``controls`` and ``x`` (``jax.grad`` is what :class:`Shooting` descends);
    the horizon is ``controls.shape[0]``.
    """
    x = jnp.asarray(x)
    sigmas = jnp.asarray(sigmas).astype(x.dtype)
    n = sigmas.shape[0] - 1
    h = jnp.shape(controls)[0]
    if not (isinstance(start, int) and 0 <= start and start + h <= n and h >= 1):
        raise ValueError(
            f"start={start!r} and {h} controls must fit the grid of {n} steps (start + H <= N)"
        )
    if jnp.shape(controls)[1:] != x.shape or jnp.shape(target) != x.shape:
        raise ValueError(
            f"controls must be (H, *x.shape) and target x's shape {x.shape}; got "
            f"{jnp.shape(controls)} and {jnp.shape(target)}"
        )
    p = SwitchProblem(field, x, sigmas, cond_b, cond_b, target, None, None, None, None, k=start)
    sched = Schedule(alpha_direct(n, start), None, Cost(), "velocity", True)
    obj = _Objective(consistency_weight, effort_weight, smoothness_weight, 0.0, remat)
    xs, vbs, _ = _rollout(p, sched, x, controls, start, remat)
    return _terms(obj, p, sched, controls, xs, vbs, start, target)[0]


# ----------------------------------------------------------------------------- the optimiser
class _OptimiserConfig(eqx.Module):
    max_iter: int
    learning_rate: float
    lr_final: float
    optimizer: str
    rtol: float
    patience: int
    divergence_ratio: float

    def make(self, num_iters: int) -> optax.GradientTransformation:
        """Adam or SGD, cosine-decayed over ``num_iters``, wrapped in ``apply_if_finite``."""
        return make_optimiser(
            self.optimizer, self.learning_rate, decay_steps=num_iters, decay_alpha=self.lr_final
        )


def _optimise(loss_fn, params0, cfg: _OptimiserConfig, max_iter: int):
    """Minimise ``loss_fn(params) -> (J, aux)`` with the shared loop; early stop; the best iterate.

    :func:`rfmpc.flow.optimise.minimise` with ``max_rejections=0``: the first non-finite
    objective, gradient or step (``RESULTS.optimiser_nonfinite``) or diverged objective
    (``RESULTS.optimiser_diverged``; the loop's one divergence rule) stops it, and the plan is
    discarded by the caller.

    Returns ``(best_params, best_J, best_aux, history (max_iter,), iterations, result,
    stopped_early)``.
    """
    st = minimise(
        loss_fn,
        params0,
        cfg.make(max_iter),
        max_steps=max_iter,
        divergence_ratio=cfg.divergence_ratio,
        rtol=cfg.rtol,
        patience=cfg.patience,
        max_rejections=0,
        has_aux=True,
    )
    return (
        st.best_params,
        st.best_value,
        st.best_aux,
        st.history,
        st.num_steps,
        st.result,
        st.converged(cfg.patience),
    )


def objective_of(c) -> _Objective:
    """The objective weights of a shooting controller."""
    return _Objective(
        c.consistency_weight, c.effort_weight, c.smoothness_weight, c.terminal_weight, c.remat
    )


def optimiser_of(c) -> _OptimiserConfig:
    """The optimiser settings of a shooting controller."""
    return _OptimiserConfig(
        c.max_iter, c.learning_rate, c.lr_final, c.optimizer, c.rtol, c.patience, c.divergence_ratio
    )


def plan_single(
    ctrl: Shooting, p: SwitchProblem, sched: Schedule, x: Array, start, h_steps: int, u0, target
) -> ShootingPlan:
    """Single shooting from ``x`` at grid step ``start`` over ``h_steps`` (traced)."""
    obj = objective_of(ctrl)

    def loss(u):
        xs, vbs, calls = _rollout(p, sched, x, u, start, obj.remat)
        j, _, extra = _terms(obj, p, sched, u, xs, vbs, start, target)
        return j, (xs, calls + extra)

    u, j, (xs, calls), hist, it, res, early = _optimise(loss, u0, optimiser_of(ctrl), ctrl.max_iter)
    per_eval = Cost(forwards=calls, vjps=calls)
    zero = jnp.zeros((), x.dtype)
    return ShootingPlan(u, xs, hist, j, it, zero, res, early, per_eval.scale(it))


def _plan_result(plan: ShootingPlan, max_control: float):
    """The plan's outcome: a discarded plan runs the command (:class:`RESULTS`)."""
    u = plan.controls
    peak = jnp.max(jnp.abs(u))
    res = RESULTS.where(
        plan.result == RESULTS.optimiser_nonfinite,
        RESULTS.plan_nonfinite,
        RESULTS.where(
            plan.result == RESULTS.optimiser_diverged,
            RESULTS.plan_diverged,
            RESULTS.where(
                ~jnp.all(jnp.isfinite(u)),
                RESULTS.plan_control_nonfinite,
                RESULTS.where(
                    peak > max_control, RESULTS.plan_control_too_large, RESULTS.successful
                ),
            ),
        ),
    )
    return res, peak


def _plan_diagnostics(plan: ShootingPlan, peak) -> dict:
    return {
        "objective": plan.objective,
        "final_objective": plan.final_objective,
        "iterations": plan.iterations,
        "optimiser_result": plan.result,
        "stopped_early": plan.stopped_early,
        "defect": plan.defect,
        "peak_control": peak,
        "controls": plan.controls,
    }


def _check_options(c) -> None:
    if c.horizon is not None and (
        isinstance(c.horizon, bool) or not isinstance(c.horizon, int) or c.horizon < 1
    ):
        raise ValueError(
            f"horizon must be a positive int or None (all remaining), got {c.horizon!r}"
        )
    if isinstance(c.max_iter, bool) or not isinstance(c.max_iter, int) or c.max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {c.max_iter!r}")
    if c.optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {c.optimizer!r}")
    if not c.learning_rate > 0 or not c.lr_final > 0:
        raise ValueError("learning_rate and lr_final must be > 0")
    for name in ("consistency_weight", "effort_weight", "smoothness_weight", "terminal_weight"):
        if not getattr(c, name) >= 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(c, name)}")
    if not c.divergence_ratio > 1:
        raise ValueError(f"divergence_ratio must be > 1, got {c.divergence_ratio}")
    if not c.max_control > 0:
        raise ValueError(f"max_control must be > 0, got {c.max_control}")
    if not isinstance(c.command, AbstractCommand):
        raise TypeError(f"command must be Direct(), Blend(...) or Adaptive(...), got {c.command!r}")
    check_target(c.target)


class _ShootingState(NamedTuple):
    controls: Array  # (H, *x.shape) planned controls (zeros when the plan was discarded)


class Shooting(AbstractController):
    """Single shooting over ``horizon`` steps after the switch, then the command.

    Attributes:
        horizon: controlled steps (``None``: all remaining).
        max_iter, learning_rate, lr_final, optimizer, rtol, patience: the optimiser (optax Adam
            or SGD, cosine-decayed step, early stop).
        consistency_weight, effort_weight, smoothness_weight, terminal_weight: the objective.
        target: ``"a-implied"`` (default) or ``"seed"``.
        divergence_ratio: stop (and discard the plan) when the objective rises above its initial
            value by more than this times that value (``J > J_0 + ratio |J_0|``; the shared
            loop's rule, :mod:`rfmpc.flow.optimise`).
        max_control: discard a plan whose largest control exceeds this (velocity units).
        remat: checkpoint each rollout step (memory ~ one step's activations).
        init_controls: warm start ``(H, *x.shape)`` (e.g. a previous plan); default zeros.
        command: the command the plan steers.
    """

    horizon: int | None = 3
    max_iter: int = 30
    learning_rate: float = 0.1
    lr_final: float = 0.01
    optimizer: str = "adam"
    rtol: float = 1e-3
    patience: int = 3
    consistency_weight: float = 1.0
    effort_weight: float = 1e-2
    smoothness_weight: float = 1e-3
    terminal_weight: float = 0.0
    target: str = "a-implied"
    divergence_ratio: float = 1e3
    max_control: float = 100.0
    remat: bool = True
    init_controls: Array | None = None
    command: AbstractCommand = Direct()

    def __check_init__(self):
        _check_options(self)

    def schedule(self, p: SwitchProblem) -> Schedule:
        return self.command.schedule(p)

    def init(self, p: SwitchProblem, sched: Schedule) -> PlanOut:
        h_steps = self.window(p.num_steps - p.k)
        target, cost = p.noise_target(self.target)
        u0 = _initial_controls(self.init_controls, h_steps, p.x)
        plan = plan_single(self, p, sched, p.x, p.k, h_steps, u0, target)
        res, peak = _plan_result(plan, self.max_control)
        u = jnp.where(res == RESULTS.successful, plan.controls, 0.0)
        diag = _plan_diagnostics(plan, peak)
        return PlanOut(p.x, _ShootingState(u), cost + plan.cost, res, diag)

    def window(self, remaining: int) -> int:
        return remaining if self.horizon is None else min(self.horizon, remaining)

    def uses_b_velocity(self) -> bool:
        return False

    def step(self, p, sched, state: _ShootingState, j, x, v_cmd, v_b) -> StepOut:
        return StepOut(state.controls[j - p.k], state, Cost(), RESULTS.successful, {})


def _initial_controls(init, h_steps: int, x: Array) -> Array:
    if init is None:
        return jnp.zeros((h_steps, *x.shape), x.dtype)
    if jnp.shape(init) != (h_steps, *x.shape):
        raise ValueError(
            f"init_controls has shape {jnp.shape(init)}; expected (H, *x.shape) = "
            f"{(h_steps, *x.shape)}"
        )
    return jnp.asarray(init, x.dtype)


def _segment_bounds(start: int, h_steps: int, num_segments: int) -> list[int]:
    s = min(num_segments, h_steps)
    return sorted({start + round(j * h_steps / s) for j in range(s + 1)})


class MultipleShooting(AbstractController):
    """Multiple shooting: controls and segment start states, continuity by augmented Lagrangian.

    The horizon's ``H`` steps are split into ``num_segments`` segments; segment ``j`` starts at
    its own state ``s_j`` (``s_0 = x_k``) and the defects ``d_j = x_end(segment j-1) - s_j`` are
    driven to zero by ``outer_iters`` rounds of ``mu += rho d``, ``rho *= penalty_growth`` around
    inner optax solves (``max_iter`` iterations in all). The diagnostics report the final
    ``max |d|`` (``defect``); the executed rollout replays the controls from ``x_k``. Options
    as :class:`Shooting`, plus the segment and penalty settings.
    """

    horizon: int | None = 3
    num_segments: int = 2
    penalty: float = 100.0
    penalty_growth: float = 10.0
    outer_iters: int = 3
    max_iter: int = 30
    learning_rate: float = 0.1
    lr_final: float = 0.01
    optimizer: str = "adam"
    rtol: float = 1e-3
    patience: int = 3
    consistency_weight: float = 1.0
    effort_weight: float = 1e-2
    smoothness_weight: float = 1e-3
    terminal_weight: float = 0.0
    target: str = "a-implied"
    divergence_ratio: float = 1e3
    max_control: float = 100.0
    remat: bool = True
    command: AbstractCommand = Direct()

    def __check_init__(self):
        _check_options(self)
        for name in ("num_segments", "outer_iters"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not self.penalty >= 0 or not self.penalty_growth >= 1:
            raise ValueError("penalty must be >= 0 and penalty_growth >= 1")

    def schedule(self, p: SwitchProblem) -> Schedule:
        return self.command.schedule(p)

    def init(self, p: SwitchProblem, sched: Schedule) -> PlanOut:
        h_steps = self.window(p.num_steps - p.k)
        target, cost = p.noise_target(self.target)
        plan = self._plan(p, sched, h_steps, target)
        res, peak = _plan_result(plan, self.max_control)
        u = jnp.where(res == RESULTS.successful, plan.controls, 0.0)
        return PlanOut(p.x, _ShootingState(u), cost + plan.cost, res, _plan_diagnostics(plan, peak))

    def _plan(self, p: SwitchProblem, sched: Schedule, h_steps: int, target) -> ShootingPlan:
        x, start = p.x, p.k
        obj = objective_of(self)
        cfg = optimiser_of(self)
        bounds = _segment_bounds(start, h_steps, self.num_segments)
        nseg = len(bounds) - 1
        u0 = jnp.zeros((h_steps, *x.shape), x.dtype)
        xs0, _, calls0 = _rollout(p, sched, x, u0, start, obj.remat)
        s0 = jnp.stack([xs0[b - start] for b in bounds[1:-1]]) if nseg > 1 else None
        hs = p.sigmas[start + 1 : start + h_steps + 1] - p.sigmas[start : start + h_steps]
        scale = jnp.mean(jnp.abs(hs)).astype(x.dtype)  # a state step moves like a control step
        axes = tuple(range(1, x.ndim + 1))

        def segments(params):
            u, delta = params
            s = None if delta is None else s0 + scale * delta
            states, vbs, defects, calls = [x[None]], [], [], jnp.int32(0)
            for j in range(nseg):
                a, b = bounds[j], bounds[j + 1]
                x_start = x if j == 0 else s[j - 1]
                xs, vb, c = _rollout(p, sched, x_start, u[a - start : b - start], a, obj.remat)
                # at a boundary the state is the next segment's start s_j (its velocity is the
                # one the next rollout evaluates); the defect term pulls the two together
                states.append(xs[1:] if j == nseg - 1 else jnp.concatenate([xs[1:-1], s[j][None]]))
                vbs.append(vb)
                calls = calls + c
                if j < nseg - 1:
                    defects.append(xs[-1] - s[j])
            d = jnp.stack(defects) if defects else jnp.zeros((0, *x.shape), x.dtype)
            return jnp.concatenate(states), jnp.concatenate(vbs), d, calls

        def loss(params, mu, rho):
            xs, vbs, d, calls = segments(params)
            j, _, extra = _terms(obj, p, sched, params[0], xs, vbs, start, target)
            if nseg > 1:
                j = (
                    j
                    + jnp.sum(jnp.mean(mu * d, axis=axes))
                    + 0.5 * rho * jnp.sum(jnp.mean(d**2, axis=axes))
                )
            return j, (xs, d, calls + extra)

        inner = self.max_iter if nseg == 1 else max(1, self.max_iter // self.outer_iters)
        outer = 1 if nseg == 1 else self.outer_iters

        def outer_step(c, _):
            params, mu, rho, its, res, early = c
            params, _, (xs, d, calls), hist, it, r, e = _optimise(
                lambda q: loss(q, mu, rho), params, cfg, inner
            )
            carry = (
                params,
                mu + rho * d,
                rho * self.penalty_growth,
                its + it,
                RESULTS.where(res == RESULTS.successful, r, res),  # the first round's fault
                early & e,
            )
            return carry, (hist, xs, d, calls)

        mu0 = jnp.zeros((max(nseg - 1, 0), *x.shape), x.dtype)
        d0 = None if s0 is None else jnp.zeros_like(s0)
        penalty = jnp.asarray(self.penalty, x.dtype)
        init = ((u0, d0), mu0, penalty, jnp.int32(0), RESULTS.successful, jnp.bool_(True))
        (params, _, _, its, res, early), (hists, xs_all, d_all, calls) = jax.lax.scan(
            outer_step, init, None, length=outer
        )
        u = params[0]
        defect = jnp.max(jnp.abs(d_all[-1])) if nseg > 1 else jnp.zeros((), x.dtype)
        per_eval = calls[-1]
        cost = Cost(forwards=per_eval, vjps=per_eval).scale(its) + Cost(
            forwards=calls0 if nseg > 1 else 0
        )
        hist = hists.reshape(-1)
        return ShootingPlan(u, xs_all[-1], hist, jnp.nanmin(hist), its, defect, res, early, cost)

    def window(self, remaining: int) -> int:
        return remaining if self.horizon is None else min(self.horizon, remaining)

    def uses_b_velocity(self) -> bool:
        return False

    def step(self, p, sched, state: _ShootingState, j, x, v_cmd, v_b) -> StepOut:
        return StepOut(state.controls[j - p.k], state, Cost(), RESULTS.successful, {})
