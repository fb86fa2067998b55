"""``switch`` / ``switch_batch``: finish prompt B from prompt A's cached state with a controller.

``switch(field, state_a, cond_b, controller=MPC())`` takes a :class:`~rfmpc.flow.TrajectoryState`
of prompt A at grid step ``k`` and runs the remaining ``N - k`` steps for prompt B, steered by a
controller object (:mod:`rfmpc.control.base`): its planning stage once, then its feedback law
on the first ``window`` steps inside one ``lax.scan``, then the plain command through the flow
core (diffrax Euler on the grid). :func:`switch_batch` runs the same two compiled stages under
``jax.vmap``: the same validation, the same in-graph fallbacks, the same results.

What the cache can hand over for free (:class:`SwitchCache`): ``v_A(x_k)`` (A's own run evaluated
it at step ``k``; every ``"a-implied"`` target needs it), A's final latent (SDEdit) and the seed
noise (otherwise regenerated from the state's key).

Fallbacks are decided inside the compiled graph and reported with one enumeration,
:class:`~rfmpc.control.results.RESULTS`:

* a plan the controller rejects (non-finite or diverged shooting, controls above
  ``max_control``) runs the command instead (``u = 0`` on the window);
* a non-finite start state (re-projection, re-noising) is replaced by the cached state;
* a step whose control is rejected (QP not converged, box violated, non-finite) applies ``u = 0``
  on that step; a controlled step whose next state is non-finite takes the command's own step.

The overall result is the first non-successful outcome (plan first, then steps in order); every
per-step outcome is in ``diagnostics["step_results"]``. ``throw=True`` raises instead (an
``equinox`` run-time error naming the outcome). One last safety net runs outside the graph: if the
final latent is still non-finite, the plain command is re-run from the cached state
(``RESULTS.rollout_nonfinite``); if that is non-finite too, no safe result exists and a
``FloatingPointError`` names the first bad grid step.

Costs (:class:`~rfmpc.control.results.Cost`) count forwards, JVPs and VJPs separately. Wall times
are measured around the compiled stages (``planning_s``: schedule + plan; ``wall_s``: the whole
switch); a first call includes compilation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from rfmpc.control.base import (
    AbstractCommand,
    AbstractController,
    PlanOut,
    Schedule,
    SwitchProblem,
    command_velocities,
)
from rfmpc.control.direct import Direct
from rfmpc.control.results import (
    OUTCOMES,
    RESULTS,
    Cost,
    outcome,
    outcome_code,
    outcome_from_code,
)
from rfmpc.control.schedules import BlendedField, BlendSchedule, blend_nfe
from rfmpc.flow.fields import check_field
from rfmpc.flow.schedule import flowmatch_sigmas
from rfmpc.flow.solve import integrate, integrate_path
from rfmpc.flow.state import TrajectoryState
from rfmpc.sharding import shard_batch

__all__ = [
    "BatchSwitchResult",
    "SwitchCache",
    "SwitchResult",
    "from_scratch_equal_nfe",
    "stack_states",
    "switch",
    "switch_batch",
]


class SwitchCache(eqx.Module):
    """What a cache entry stores beside A's state, so a controller need not recompute it.

    Attributes:
        velocity: ``v_A(x_k, sigma_k)``, A's (guided) velocity at the cached state: A's own run
            computed it at step ``k``. Makes every ``"a-implied"`` noise target free.
        final: A's final latent (SDEdit re-noises it).
        noise: A's seed noise (default: regenerated from the state's key).
    """

    velocity: Array | None = None
    final: Array | None = None
    noise: Array | None = None


@dataclass(frozen=True)
class SwitchResult:
    """Outcome of :func:`switch` (a plain record, not a pytree).

    Attributes:
        state: the final :class:`TrajectoryState` (step N, ``cond = cond_b``, A's key and grid).
        controller: the controller object that ran.
        cost: model evaluations by kind (:class:`Cost` of Python ints).
        result: the :class:`RESULTS` item (``RESULTS.successful`` unless something fell back).
        fallback: ``result != RESULTS.successful``.
        fallback_reason: what fell back and what ran instead, in words (None when nothing did).
        planning_s: wall time of the schedule + planning stage.
        wall_s: wall time of the whole switch.
        diagnostics: per-step outcomes and the controller's own arrays (objective history,
            consistency residuals, QP iterations...).
    """

    state: TrajectoryState
    controller: AbstractController
    cost: Cost
    result: Any
    fallback: bool
    fallback_reason: str | None
    planning_s: float
    wall_s: float
    diagnostics: dict

    @property
    def nfe(self) -> int:
        """Forward model calls (JVPs and VJPs are in ``cost``, not here)."""
        return int(self.cost.forwards)

    @property
    def outcome(self) -> str:
        """The result's name (``"successful"``, ``"qp_not_converged"``...)."""
        return OUTCOMES[int(outcome_code(self.result))]


@dataclass(frozen=True)
class BatchSwitchResult:
    """Outcome of :func:`switch_batch`: per-pair arrays on a leading axis.

    ``results`` holds one :class:`RESULTS` item per pair; ``fallback_reasons`` one string or
    None per pair.
    """

    x: Array
    controller: AbstractController
    cost: Cost
    results: list
    fallback: np.ndarray
    fallback_reasons: list
    planning_s: float
    wall_s: float
    diagnostics: dict


# ----------------------------------------------------------------------------- the engine
def _all_finite(x) -> Array:
    return jnp.all(jnp.isfinite(x))


def _plan_impl(controller: AbstractController, p: SwitchProblem):
    sched = controller.schedule(p)
    out = controller.init(p, sched)
    ok = _all_finite(out.x_start)
    x_start = jnp.where(ok, out.x_start, p.x)
    keep = ok | (out.result != RESULTS.successful)
    result = RESULTS.where(keep, out.result, RESULTS.start_nonfinite)
    return sched, PlanOut(x_start, out.state, sched.cost + out.cost, result, out.diagnostics)


def _tail(p: SwitchProblem, sched: Schedule, x, start: int):
    """The plain command on steps ``start .. N - 1`` through the flow core."""
    n = p.num_steps
    if start >= n:
        return x, jnp.int32(0)
    if sched.direct:
        return integrate(p.field, x, p.sigmas, p.cond_b, start=start).x, jnp.int32(n - start)
    bf = BlendedField(p.field, sched.mode, False)
    out = integrate(bf, x, p.sigmas, BlendSchedule(p.cond_a, p.cond_b, sched.alpha), start=start)
    return out.x, blend_nfe(sched.alpha, start, n, sched.mode)


def _execute_impl(controller: AbstractController, p: SwitchProblem, sched: Schedule, plan, throw):
    n, k = p.num_steps, p.k
    width = controller.window(n - k)
    if not (isinstance(width, int) and 0 <= width <= n - k):
        raise ValueError(f"{type(controller).__name__}.window returned {width!r}; need 0..{n - k}")
    sig = p.sigmas
    need_b = controller.uses_b_velocity()
    x, cost = plan.x_start, plan.cost
    infos: dict = {}
    codes = jnp.zeros((0,), jnp.int32)
    if width:

        def body(carry, j):
            x, state = carry
            v_cmd, v_b, calls = command_velocities(p, sched, x, j, need_b)
            out = controller.step(p, sched, state, j, x, v_cmd, v_b)
            ok = out.result == RESULTS.successful
            finite_u = _all_finite(out.u)
            res = RESULTS.where(ok & ~finite_u, RESULTS.control_nonfinite, out.result)
            use = ok & finite_u
            h = sig[j + 1] - sig[j]
            x_cmd = x + h * v_cmd
            x_new = jnp.where(use, x + h * (v_cmd + jnp.where(use, out.u, 0.0)), x_cmd)
            fin = _all_finite(x_new)
            res = RESULTS.where(use & ~fin, RESULTS.step_nonfinite, res)
            x_new = jnp.where(fin, x_new, x_cmd)
            return (x_new, out.state), (
                outcome_code(res),
                Cost(forwards=calls) + out.cost,
                out.info,
            )

        steps = jnp.arange(k, k + width, dtype=jnp.int32)
        (x, _), (codes, costs, infos) = jax.lax.scan(body, (x, plan.state), steps)
        cost = cost + jax.tree.map(lambda a: jnp.sum(a, axis=0), costs)
    x, tail_calls = _tail(p, sched, x, k + width)
    cost = cost + Cost(forwards=tail_calls)
    # overall outcome: the plan's, else the first failed step's
    plan_code = outcome_code(plan.result)
    if width:
        first = jnp.argmax(codes != 0)
        step_code = jnp.where(jnp.any(codes != 0), codes[first], 0)
    else:
        step_code = jnp.int32(0)
    code = jnp.where(plan_code != 0, plan_code, step_code)
    result = outcome_from_code(code)
    if throw:
        x = result.error_if(x, result != RESULTS.successful)
    return x, cost, result, {"step_results": codes, **infos}


@eqx.filter_jit
def _plan(controller, field, sigmas, k: int, args, batched: bool):
    def one(a):
        return _plan_impl(controller, SwitchProblem(field, *a[:1], sigmas, *a[1:], k=k))

    return jax.vmap(one)(args) if batched else one(args)


@eqx.filter_jit
def _execute(controller, field, sigmas, k: int, args, sched, plan, throw: bool, batched: bool):
    def one(a, s, pl):
        p = SwitchProblem(field, *a[:1], sigmas, *a[1:], k=k)
        return _execute_impl(controller, p, s, pl, throw)

    return jax.vmap(one)(args, sched, plan) if batched else one(args, sched, plan)


class _CommandOnly(AbstractCommand):
    """The controller's command with no control: the safe rollout of the last-resort fallback."""

    inner: AbstractController

    def schedule(self, p: SwitchProblem) -> Schedule:
        return self.inner.schedule(p)


# ----------------------------------------------------------------------------- validation
def _check_controller(controller) -> None:
    if not isinstance(controller, AbstractController):
        raise TypeError(
            f"controller must be a controller object such as rfmpc.control.Direct() or MPC(), "
            f"got {type(controller).__name__} {controller!r}; the CLI names map to classes in "
            "rfmpc.cli.switch.CONTROLLERS"
        )


def _check_similarity(similarity):
    if similarity is None or isinstance(similarity, jax.core.Tracer):
        return similarity
    s = np.asarray(similarity, np.float64)
    # cosines computed in floating point may exceed 1 by an ulp (same prompt twice)
    if not (np.all(np.isfinite(s)) and np.all(np.abs(s) <= 1.0 + 1e-6)):
        raise ValueError(
            f"similarity must be a cosine similarity in [-1, 1], got {similarity!r}; omit it to "
            "let the controller measure the velocity cosine at the cached state"
        )
    return jnp.asarray(np.clip(s, -1.0, 1.0), jnp.float32)


def _tree_shapes(tree) -> str:
    return str(jax.tree.map(lambda a: tuple(jnp.shape(a)), tree))


def _validate(field, x, sigmas, k: int, cond_a, cond_b, cached: SwitchCache) -> None:
    """Entry-point checks (static shapes and concrete values only); ``x`` is one state."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"state_a.x must be a floating-point latent, got dtype {x.dtype}")
    if not isinstance(x, jax.core.Tracer) and not np.isfinite(np.asarray(x)).all():
        raise ValueError(
            "state_a.x contains NaN or inf: the cached state is damaged; regenerate prompt A's "
            "trajectory (or drop the entry with `rfmpc cache verify --repair`)"
        )
    for name in ("velocity", "final", "noise"):
        v = getattr(cached, name)
        if v is not None and tuple(jnp.shape(v)) != tuple(x.shape):
            what = {
                "velocity": "v_A at the cached state",
                "final": "A's final latent",
                "noise": "A's seed noise",
            }[name]
            raise ValueError(
                f"cached.{name} has shape {tuple(jnp.shape(v))}; it must be {what}, with the "
                f"state's shape {tuple(x.shape)}"
            )
        if v is not None and not isinstance(v, jax.core.Tracer):
            if not np.isfinite(np.asarray(v)).all():
                raise ValueError(
                    f"cached.{name} contains NaN or inf: the cache entry is damaged; regenerate "
                    "prompt A (or drop the entry with `rfmpc cache verify --repair`)"
                )
    if cond_a is not None:
        ta, tb = jax.tree.structure(cond_a), jax.tree.structure(cond_b)
        la, lb = jax.tree.leaves(cond_a), jax.tree.leaves(cond_b)
        if ta != tb or any(jnp.shape(a) != jnp.shape(b) for a, b in zip(la, lb)):
            raise ValueError(
                f"cond_b {_tree_shapes(cond_b)} does not match state_a.cond "
                f"{_tree_shapes(cond_a)}: encode prompt B with the model (and batch size) that "
                "produced A's state, e.g. pipe.encode_prompt(prompt_b)"
            )
    check_field(
        field,
        x,
        sigmas[k],
        cond_b,
        what=f"state_a.x of shape {tuple(x.shape)}",
        fix="the cached state comes from another model or resolution: regenerate prompt A with "
        "this model",
    )


def _step_of(state: TrajectoryState) -> int:
    try:
        return int(np.asarray(state.step).reshape(-1)[0])
    except jax.errors.ConcretizationTypeError as e:
        raise ValueError("state.step is traced; call switch outside jit") from e


def _check_cache(cached) -> SwitchCache:
    if cached is None:
        return SwitchCache()
    if not isinstance(cached, SwitchCache):
        raise TypeError(
            f"cached must be a rfmpc.control.SwitchCache, got {type(cached).__name__}; build "
            "it with SwitchCache(velocity=v_A, final=x_final_A, noise=eps)"
        )
    return cached


# ----------------------------------------------------------------------------- reporting
def _reason(code: int, step_codes: np.ndarray) -> str | None:
    """The fallbacks of one switch in words (None when there were none)."""
    if code == 0:
        return None
    parts = []
    step_set = {int(c) for c in step_codes if c}
    if code not in step_set:  # a plan-level outcome
        parts.append(RESULTS[outcome(code)])
    total = len(step_codes)
    for c in sorted(step_set):
        count = int(np.sum(step_codes == c))
        parts.append(f"{RESULTS[outcome(c)]} ({OUTCOMES[c]} on {count} of {total} steps)")
    return "; ".join(parts)


def _counts(step_codes: np.ndarray) -> dict[str, int]:
    return {name: int(np.sum(step_codes == c)) for c, name in enumerate(OUTCOMES) if c != 0}


def _first_nonfinite_step(field, sched, x, sigmas, cond_a, cond_b, k) -> int | None:
    """The first grid step whose end state is non-finite under the plain command from ``x``
    (``k - 1``: ``x`` itself; None: the path is finite). ``x`` is one (unbatched) state."""
    if sched.direct:
        _, xs = integrate_path(field, x, sigmas, cond_b, start=k)
    else:
        bf = BlendedField(field, sched.mode, False)
        _, xs = integrate_path(bf, x, sigmas, BlendSchedule(cond_a, cond_b, sched.alpha), start=k)
    bad = ~np.isfinite(np.asarray(xs)).reshape(xs.shape[0], -1).all(axis=1)
    return k + int(np.argmax(bad)) - 1 if bad.any() else None


def _raise_nonfinite(controller, field, sched, x, sigmas, cond_a, cond_b, k):
    j = _first_nonfinite_step(field, sched, x, sigmas, cond_a, cond_b, k)
    sig = np.asarray(sigmas)
    if j is None:
        where = "the result was non-finite"
    elif j < k:
        where = "the cached state x is non-finite"
    else:
        where = (
            f"grid step {j} (sigma {sig[j]:.4g} -> {sig[j + 1]:.4g}) of {len(sig) - 1} "
            "produced non-finite values"
        )
    raise FloatingPointError(
        f"switch({type(controller).__name__}): {where} under the plain command, so there is no "
        "safe result to fall back to; the velocity field returns NaN/inf for this state or "
        "conditioning (check cond_b and the model at that noise level)"
    )


def _to_numpy(tree) -> dict:
    return jax.tree.map(np.asarray, tree)


# ----------------------------------------------------------------------------- public API
def _run(controller, field, sigmas, k, args, throw, batched):
    t0 = time.perf_counter()
    sched, plan = _plan(controller, field, sigmas, k, args, batched)
    jax.block_until_ready((sched, plan))
    t1 = time.perf_counter()
    xf, cost, result, diag = _execute(
        controller, field, sigmas, k, args, sched, plan, throw, batched
    )
    jax.block_until_ready(xf)
    # last-resort safety net (outside the graph): re-run the plain command where non-finite
    xs = np.asarray(xf)
    rows = xs.reshape((xs.shape[0], -1)) if batched else xs.reshape((1, -1))
    bad = ~np.isfinite(rows).all(axis=1)
    if bad.any():
        safe_plan = PlanOut(args[0], None, Cost(), RESULTS.successful, {})
        if batched:
            safe_plan = PlanOut(
                args[0],
                None,
                jax.tree.map(lambda c: jnp.zeros_like(c), cost),
                jax.tree.map(lambda r: jnp.zeros_like(r), result),
                {},
            )
        safe = _CommandOnly(controller)
        x2, c2, _, _ = _execute(safe, field, sigmas, k, args, sched, safe_plan, False, batched)
        x2 = np.asarray(x2)
        rows2 = x2.reshape(rows.shape)
        if not np.isfinite(rows2[bad]).all():
            i = int(np.argmax(bad & ~np.isfinite(rows2).all(axis=1)))
            one = jax.tree.map(lambda a: a[i], args) if batched else args
            s1 = jax.tree.map(lambda a: a[i], sched) if batched else sched
            _raise_nonfinite(controller, field, s1, one[0], sigmas, one[1], one[2], k)
        sel = bad.reshape((-1,) + (1,) * (xs.ndim - 1)) if batched else bad[0]
        xf = jnp.asarray(np.where(sel, x2, xs))
        cost = cost + Cost(
            forwards=np.where(bad, np.asarray(c2.forwards), 0)
            if batched
            else np.asarray(c2.forwards) * int(bad[0])
        )
        fell = int(outcome_code(RESULTS.rollout_nonfinite))
        code = np.where(bad, fell, np.asarray(outcome_code(result)).reshape(-1))
        result = outcome_from_code(code if batched else code[0])
    t2 = time.perf_counter()
    return xf, cost, result, sched, _to_numpy(plan.diagnostics), _to_numpy(diag), t1 - t0, t2 - t0


def _args(x, cond_a, cond_b, noise, cached: SwitchCache, key, similarity):
    return (x, cond_a, cond_b, noise, cached.velocity, cached.final, key, similarity)


def switch(
    field: Callable[[Array, Array, Any], Array],
    state_a: TrajectoryState,
    cond_b: Any,
    controller: AbstractController | None = None,
    *,
    similarity: float | None = None,
    cached: SwitchCache | None = None,
    throw: bool = False,
) -> SwitchResult:
    """Finish prompt B from prompt A's cached state with ``controller``.

    Args:
        field: velocity field ``v(x, sigma, cond)``.
        state_a: A's :class:`TrajectoryState` at the switch step ``k`` (its ``cond`` is A's).
        cond_b: B's conditioning (same structure and shapes as A's).
        controller: a controller object (default ``MPC()``): ``Direct``, ``Blend``,
            ``Adaptive``, ``Reproject``, ``SDEdit``, ``Shooting``, ``MultipleShooting``,
            ``MPC``, ``ShootingMPC``.
        similarity: the pooled text similarity of A and B (what a cache lookup measured), for
            controllers that use one (``Adaptive``); otherwise they measure the velocity cosine.
        cached: a :class:`SwitchCache` with what the cache stored beside the state.
        throw: raise (an equinox run-time error naming the outcome) instead of falling back.

    Returns:
        :class:`SwitchResult`.
    """
    if controller is None:
        from rfmpc.control.mpc import MPC

        controller = MPC()
    _check_controller(controller)
    cached = _check_cache(cached)
    if not isinstance(state_a, TrajectoryState):
        raise TypeError(f"state_a must be a TrajectoryState, got {type(state_a).__name__}")
    k = _step_of(state_a)
    n = state_a.num_steps
    if k >= n:
        raise ValueError(
            f"state_a is at step {k} of {n}: the trajectory is already finished; decode "
            "state_a.x directly (there is nothing to switch)"
        )
    if state_a.cond is None and not isinstance(controller, _DIRECT_ONLY):
        raise ValueError(
            f"state_a.cond is None, but {type(controller).__name__} needs prompt A's "
            "conditioning: store it in the cached state (TrajectoryState(..., cond=cond_a))"
        )
    x = state_a.x
    sigmas = jnp.asarray(state_a.sigmas).astype(x.dtype)
    _validate(field, x, sigmas, k, state_a.cond, cond_b, cached)
    noise = _noise_for(state_a, cached.noise)
    cond_a = state_a.cond if state_a.cond is not None else cond_b
    sim = _check_similarity(similarity)
    args = _args(x, cond_a, cond_b, noise, cached, state_a.key, sim)
    xf, cost, result, sched, plan_diag, diag, t_plan, t_all = _run(
        controller, field, sigmas, k, args, throw, False
    )
    steps = np.asarray(diag.pop("step_results"))
    code = int(np.asarray(outcome_code(result)))
    diag.update(plan_diag)
    diag["step_results"] = [OUTCOMES[int(c)] for c in steps]
    diag["fallback_counts"] = _counts(steps)
    if sched.similarity is not None:
        diag["similarity"] = float(np.asarray(sched.similarity))
    final = TrajectoryState(
        x=xf, step=n, sigmas=state_a.sigmas, key=state_a.key, cond=cond_b, meta=state_a.meta
    )
    return SwitchResult(
        state=final,
        controller=controller,
        cost=Cost(**{k_: int(v) for k_, v in cost.to_dict().items()}),
        result=outcome(code),
        fallback=code != 0,
        fallback_reason=_reason(code, steps),
        planning_s=t_plan,
        wall_s=t_all,
        diagnostics=diag,
    )


def stack_states(states: list[TrajectoryState]) -> TrajectoryState:
    """Stack states (same step, grid and shapes) on a new leading axis, for :func:`switch_batch`.

    Metadata is kept only when every state has the same (it is static, not an array)."""
    if not states:
        raise ValueError("stack_states needs at least one state")
    ref = states[0]
    for i, s in enumerate(states):
        if not isinstance(s, TrajectoryState):
            raise TypeError(f"states[{i}] must be a TrajectoryState, got {type(s).__name__}")
        if s.x.shape != ref.x.shape or s.x.dtype != ref.x.dtype:
            raise ValueError(
                f"states[{i}].x is {s.x.shape} {s.x.dtype} but states[0].x is {ref.x.shape} "
                f"{ref.x.dtype}: batch states of one model and resolution only"
            )
    # per-state metadata (prompt, seed...) is static: keep it only where every state agrees
    meta = ref.meta if all(s.meta == ref.meta for s in states) else ()
    same = [TrajectoryState(s.x, s.step, s.sigmas, s.key, s.cond, meta) for s in states]
    return jax.tree.map(lambda *a: jnp.stack(a), *same)


def _check_batch(name: str, tree, b: int) -> None:
    """Every leaf of a stacked argument of :func:`switch_batch` has leading axis ``b``."""
    for leaf in jax.tree.leaves(tree):
        shape = tuple(jnp.shape(leaf))
        if not shape or shape[0] != b:
            raise ValueError(
                f"{name} must be stacked with a leading axis of {b} (one per state in states_a), "
                f"got a leaf of shape {shape}; stack per-pair values with jnp.stack"
            )


def switch_batch(
    field: Callable[[Array, Array, Any], Array],
    states_a: TrajectoryState,
    conds_b: Any,
    controller: AbstractController | None = None,
    *,
    similarity: Array | None = None,
    cached: SwitchCache | None = None,
    throw: bool = False,
    mesh: Any = None,
) -> BatchSwitchResult:
    """:func:`switch` over ``B`` prompt pairs at once (one ``jax.vmap`` of the same stages).

    ``states_a`` is a stacked :class:`TrajectoryState` (:func:`stack_states`): every leaf has a
    leading axis ``B``; all pairs must share the switch step and the grid. ``conds_b``,
    ``similarity`` ``(B,)`` and the arrays of ``cached`` are stacked likewise.

    ``mesh`` (a :func:`rfmpc.sharding.make_mesh` mesh; default None = one device): the pairs are
    split over its ``"data"`` axis (``B`` must be a multiple of its size, else ``ValueError``).
    """
    if controller is None:
        from rfmpc.control.mpc import MPC

        controller = MPC()
    _check_controller(controller)
    cached = _check_cache(cached)
    if not isinstance(states_a, TrajectoryState):
        raise TypeError(
            f"states_a must be a stacked TrajectoryState (stack_states), got "
            f"{type(states_a).__name__}"
        )
    steps = np.asarray(states_a.step).reshape(-1)
    if steps.size < 1 or not np.all(steps == steps[0]):
        raise ValueError(
            f"all states must be at the same step to batch them, got {steps}; group the pairs "
            "by resume step and call switch_batch once per group"
        )
    sig = np.asarray(states_a.sigmas)
    if sig.ndim != 2 or not np.all(sig == sig[:1]):
        raise ValueError("all states must share one sigma grid (stack them with stack_states)")
    k = int(steps[0])
    x = states_a.x
    sigmas = jnp.asarray(sig[0]).astype(x.dtype)
    n = sig.shape[1] - 1
    if k >= n:
        raise ValueError(f"the states are at step {k} of {n}: nothing remains to run")
    b = int(steps.size)
    if states_a.cond is None and not isinstance(controller, _DIRECT_ONLY):
        raise ValueError(
            f"states_a.cond is None, but {type(controller).__name__} needs prompt A's "
            "conditioning: store it in the cached states"
        )
    for name, arg in (("conds_b", conds_b), ("similarity", similarity)):
        _check_batch(name, arg, b)
    for name in ("velocity", "final", "noise"):
        _check_batch(f"cached.{name}", getattr(cached, name), b)
    one_cond_a = None if states_a.cond is None else jax.tree.map(lambda a: a[0], states_a.cond)
    _validate(
        field,
        x[0],
        sigmas,
        k,
        one_cond_a,
        jax.tree.map(lambda a: a[0], conds_b),
        SwitchCache(
            *(None if v is None else v[0] for v in (cached.velocity, cached.final, cached.noise))
        ),
    )
    if not isinstance(x, jax.core.Tracer) and not np.isfinite(np.asarray(x)).all():
        raise ValueError("states_a.x contains NaN or inf: a cached state is damaged")
    noise = cached.noise
    if noise is None:
        if states_a.key is None:
            raise ValueError("states_a have no keys: pass cached=SwitchCache(noise=...)")
        noise = jax.vmap(lambda kk, xx: jax.random.normal(kk, xx.shape, xx.dtype))(states_a.key, x)
    sim = None
    if similarity is not None:
        sim = _check_similarity(similarity)
    cond_a = states_a.cond if states_a.cond is not None else conds_b
    key = states_a.key
    velocity, final = cached.velocity, cached.final
    if mesh is not None:
        x, noise, cond_a, conds_b, key, sim, velocity, final = shard_batch(
            (x, noise, cond_a, conds_b, key, sim, velocity, final), mesh
        )
    args = (x, cond_a, conds_b, noise, velocity, final, key, sim)
    xf, cost, result, _, plan_diag, diag, t_plan, t_all = _run(
        controller, field, sigmas, k, args, throw, True
    )
    steps_res = np.asarray(diag.pop("step_results")).reshape(b, -1)
    codes = np.asarray(outcome_code(result)).reshape(b)
    diag.update(plan_diag)
    diag["step_results"] = steps_res
    return BatchSwitchResult(
        x=xf,
        controller=controller,
        cost=cost,
        results=[outcome(int(c)) for c in codes],
        fallback=codes != 0,
        fallback_reasons=[_reason(int(c), steps_res[i]) for i, c in enumerate(codes)],
        planning_s=t_plan,
        wall_s=t_all,
        diagnostics=diag,
    )


def _noise_for(state: TrajectoryState, noise):
    if noise is not None:
        return jnp.asarray(noise, state.x.dtype)
    if state.key is None:
        raise ValueError(
            "state_a has no PRNG key, so its seed noise cannot be regenerated: pass "
            "cached=SwitchCache(noise=...) (the N(0, I) draw A's run started from)"
        )
    return jax.random.normal(state.key, state.x.shape, state.x.dtype)


def from_scratch_equal_nfe(
    field: Callable[[Array, Array, Any], Array],
    noise: Float[Array, "..."],
    cond_b: Any,
    num_steps: int,
    shift: float = 3.0,
) -> TrajectoryState:
    """The equal-cost baseline: B from the seed noise on a fresh ``num_steps``-step grid.

    Give it the controller's forward-equivalent budget (``N - k`` for the direct switch): the
    quality a cache hit must beat to be worth it.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int):
        raise TypeError("num_steps must be a Python int")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sig = flowmatch_sigmas(num_steps, shift)
    noise = jnp.asarray(noise)
    return integrate(field, noise, jnp.asarray(sig, noise.dtype), cond_b)


_DIRECT_ONLY = (Direct,)
