"""Single and multiple shooting for a prompt switch, by exact gradients through the flow solve.

Setting. A trajectory of prompt A was run from seed noise ``eps`` (at sigma = 1) to grid step
``k``; prompt B must be finished from that state ``x_k``. Over a horizon of ``H`` steps we run the
*controlled* Euler dynamics (the :mod:`rfmpc.flow.solve` convention, ``h_i = sigma_{i+1} -
sigma_i < 0``)::

    x_{i+1} = x_i + h_i (v_cmd(x_i, sigma_i) + u_i),     i = k .. k+H-1,

where ``v_cmd`` is the blended command of an alpha schedule (default: the direct switch, i.e.
``v_B``) and ``u_i`` a per-step control in velocity units (same shape as ``x``).

What is optimised (there is no ground-truth trajectory for a prompt switch, so we say exactly
what the objective rewards). For a rectified flow started from ``eps``, every state on B's own
trajectory satisfies ``x ~ (1 - sigma) x0_B + sigma eps``, i.e. its *B-implied noise*
``eps_hat_B(x, sigma) = x + (1 - sigma) v_B(x, sigma)`` equals ``eps`` (exactly for straight
flows; for curved flows ``eps_hat_B`` is ``E[eps | x]`` and drifts away from ``eps`` as sigma
falls, so the objective is biased late in the trajectory). A's cached state has
``eps_hat_A ~ eps`` but ``eps_hat_B != eps``. The objective (every term is a *mean over the
elements* of ``x``, so weights do not depend on the latent size) is::

    J(u) =   sum_{i=1..H} w_i || eps_hat_B(x_{k+i}, sigma_{k+i}) - eps_target ||^2   (consistency)
           + lam  sum_i |h_i| ||u_i||^2              (control effort, a Riemann sum of int |u|^2)
           + gam  sum_{i>=1} ||u_i - u_{i-1}||^2     (smoothness)
           + beta || v_B(x_{k+H}) - v_cmd(x_{k+H}) ||^2   (terminal velocity consistency of the
                                                        write-up; zero once alpha = 1)

``w_i`` is set to 0 where ``sigma = 0`` (the implied noise is undefined there). ``eps_target`` is
the seed noise by default; :func:`rfmpc.control.switch.switch` can pass A's implied noise at the
cached state instead (``noise_target="a-implied"``), which cancels the curvature drift shared by
similar prompts. The controlled trajectory is then continued with ``v_cmd`` to the end.

Optimisation: ``jax.value_and_grad`` through :func:`rfmpc.flow.integrate_path` (diffrax Euler on
the grid, ``RecursiveCheckpointAdjoint(checkpoints=H)``: no recomputation), optax (Adam by
default), early stop when the relative improvement stays below ``rtol`` for ``patience``
iterations, warm start with ``init=`` (a previous plan's controls). The best iterate is returned.

Multiple shooting (Bock & Plitt 1984; Betts 2010, ch. 3) splits the horizon into segments whose
start states are decision variables too; continuity ``x_end(segment j-1) = s_j`` is enforced by an
augmented Lagrangian (multiplier updates ``mu += rho d``, ``rho *= growth``); the result reports
the final max continuity defect.

NFE (counted analytically): a forward evaluation of ``J`` costs the blended dynamics' model calls
(1 per step, 2 on velocity-blended steps with ``0 < alpha < 1``) plus ``H`` calls of ``v_B`` for
the consistency terms (plus the terminal term's); its gradient costs as many VJPs (a VJP costs
roughly two forward calls in FLOPs). ``nfe = nfe_forward + nfe_backward``.

Reference: A. Patel, "Shooting Method and MPC for Cross-Prompt Caching in Rectified Flow Models"
(2025), sections 3 and "What we are actually optimizing".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from rfmpc.control.schedules import BlendedField, BlendSchedule, alpha_direct, blend_nfe
from rfmpc.flow.solve import integrate_path

__all__ = [
    "SHOOTING_STATUS",
    "ShootingOptions",
    "ShootingResult",
    "implied_noise",
    "multiple_shooting",
    "noise_consistency_error",
    "shooting_objective",
    "single_shooting",
]

#: Status codes of a :class:`ShootingResult`.
SHOOTING_STATUS = {0: "converged", 1: "max-iter", 2: "non-finite", 3: "diverged"}


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


@dataclass(frozen=True)
class ShootingOptions:
    """Configuration of single / multiple shooting (hashable: static under jit).

    Attributes:
        horizon: number of controlled steps after the switch (``None``: all remaining). Short
            by default (3): the consistency objective is biased at lower sigma on curved flows
            (see the module docstring), and on the exact GMM long horizons drove the state off
            B's trajectory.
        max_iter: optimiser iterations (multiple shooting: in total over its outer iterations).
        learning_rate: optimiser step size (controls are in velocity units).
        lr_final: the step size decays (cosine) to ``lr_final * learning_rate``.
        rtol: early stop when ``(J_prev - J) / |J_prev| < rtol`` for ``patience`` iterations.
        patience: see ``rtol``.
        consistency_weight: ``w_i`` for every step, or ``consistency_weights`` per step.
        consistency_weights: optional tuple of ``horizon`` per-step weights.
        effort_weight: ``lam``; smoothness_weight: ``gam``; terminal_weight: ``beta``.
        optimizer: ``"adam"`` or ``"sgd"``.
        num_segments: multiple shooting's segment count.
        penalty, penalty_growth, outer_iters: augmented-Lagrangian ``rho``, its growth factor per
            outer iteration and the number of outer (multiplier) iterations.
        divergence_ratio: the optimisation is declared *diverged* (status 3, stopped) when an
            iterate's objective exceeds ``divergence_ratio`` times the initial guess's.
        max_control: a plan whose largest control magnitude (velocity units) exceeds this is
            treated as blown up: :func:`rfmpc.control.switch.switch` discards it and runs the
            command instead (recorded as a fallback). Velocities of the models here are O(1-10).
        remat_path: evaluate the consistency term's target field on the path states one at a
            time under ``jax.checkpoint`` (default): the gradient then keeps about one forward's
            activations instead of one per step of the horizon (measured by
            ``benchmarks/shooting_memory.py``). ``False`` batches them with ``vmap`` (faster on
            an accelerator when memory allows).
    """

    horizon: int | None = 3
    max_iter: int = 30
    learning_rate: float = 0.1
    lr_final: float = 0.01
    rtol: float = 1e-3
    patience: int = 3
    consistency_weight: float = 1.0
    consistency_weights: tuple[float, ...] | None = None
    effort_weight: float = 1e-2
    smoothness_weight: float = 1e-3
    terminal_weight: float = 0.0
    optimizer: str = "adam"
    num_segments: int = 2
    penalty: float = 100.0
    penalty_growth: float = 10.0
    outer_iters: int = 3
    divergence_ratio: float = 1e3
    max_control: float = 100.0
    remat_path: bool = True

    def __post_init__(self):
        if self.horizon is not None and (not isinstance(self.horizon, int) or self.horizon < 1):
            raise ValueError(f"horizon must be a positive int or None, got {self.horizon!r}")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.num_segments < 1 or self.outer_iters < 1:
            raise ValueError("num_segments and outer_iters must be >= 1")
        for name in ("effort_weight", "smoothness_weight", "terminal_weight", "penalty"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.divergence_ratio > 1:
            raise ValueError(f"divergence_ratio must be > 1, got {self.divergence_ratio}")
        if not self.max_control > 0:
            raise ValueError(f"max_control must be > 0, got {self.max_control}")

    def make_optimizer(self, num_iters: int) -> optax.GradientTransformation:
        """The optax optimiser; the step size decays (cosine) to ``lr_final`` times its start
        over ``num_iters`` iterations, so the iterates settle instead of hovering at Adam's
        step-size scale (which matters for the continuity constraints of multiple shooting)."""
        lr = optax.cosine_decay_schedule(self.learning_rate, max(num_iters, 1), self.lr_final)
        if self.optimizer == "adam":
            return optax.adam(lr)
        return optax.sgd(lr)


class ShootingResult(eqx.Module):
    """The plan found by shooting.

    Attributes:
        controls: ``(H, *x.shape)`` per-step controls for steps ``start .. start + H - 1``.
        path: ``(H + 1, *x.shape)`` the planned states (single shooting: the controlled rollout;
            multiple shooting: ``x_start`` then each segment's integrated states).
        objective: ``(max_iter,)`` objective at each iteration (NaN after the last); entry 0 is
            the objective of the initial guess.
        final_objective: the objective of the returned (best) controls.
        iterations: optimiser iterations run.
        defect: max absolute continuity defect between segments (0 for single shooting).
        nfe_forward, nfe_backward, nfe: model calls (forward, VJP, total).
        status: 0 converged (early stop), 1 max-iter, 2 non-finite objective or gradient, 3
            diverged (objective above ``divergence_ratio`` times the initial one); on 2 and 3
            the loop stops and the best finite iterate is kept (:func:`rfmpc.control.switch.switch`
            discards such a plan and runs the command instead).
        horizon, start: static.
    """

    controls: Array
    path: Array
    objective: Float[Array, " iters"]
    final_objective: Float[Array, ""]
    iterations: Int[Array, ""]
    defect: Float[Array, ""]
    nfe_forward: Int[Array, ""]
    nfe_backward: Int[Array, ""]
    nfe: Int[Array, ""]
    status: Int[Array, ""]
    horizon: int = eqx.field(static=True)
    start: int = eqx.field(static=True)


def resolve_horizon(horizon: int | None, start: int, num_steps: int) -> int:
    """``min(horizon, remaining)``; raises if nothing remains to control."""
    remaining = num_steps - start
    if remaining < 1:
        raise ValueError(f"the state is at step {start} of {num_steps}: no steps remain to control")
    return remaining if horizon is None else min(int(horizon), remaining)


# ----------------------------------------------------------------------------- objective
class _Problem(eqx.Module):
    """Everything the shooting objective needs (arrays traced, config static)."""

    field: Callable
    sigmas: Array
    cond_a: Any
    cond_b: Any
    alpha: Array
    target: Array
    mode: str = eqx.field(static=True)
    binary: bool = eqx.field(static=True, default=False)

    def blended(self):
        return BlendedField(self.field, self.mode, self.binary), BlendSchedule(
            self.cond_a, self.cond_b, self.alpha
        )


def _bcast(v: Array, ndim: int) -> Array:
    """``(H,)`` -> ``(H, 1, ..., 1)`` to broadcast against ``(H, *x.shape)``."""
    return v.reshape(v.shape + (1,) * ndim)


def _weights(opts: ShootingOptions, sig_next: Array, horizon: int, first: int = 0) -> Array:
    if opts.consistency_weights is not None:
        if len(opts.consistency_weights) < first + horizon:
            raise ValueError(
                f"consistency_weights has {len(opts.consistency_weights)} entries; the horizon "
                f"needs {first + horizon}"
            )
        w = jnp.asarray(opts.consistency_weights[first : first + horizon], sig_next.dtype)
    else:
        w = jnp.full((horizon,), opts.consistency_weight, sig_next.dtype)
    return jnp.where(sig_next > 0, w, 0.0)


def _field_on_path(prob: _Problem, xs: Array, sigs: Array, remat: bool) -> Array:
    """``v_B(xs[i], sigs[i])`` for every state of a path ``(H, ...)``.

    ``remat=True``: a sequential map whose body is rematerialised in the backward pass, so only
    the states (not H forwards' activations) are stored for the gradient.
    """
    one = lambda x, s: prob.field(x, s, prob.cond_b).astype(x.dtype)
    if not remat:
        return jax.vmap(one)(xs, sigs)
    return jax.lax.map(jax.checkpoint(lambda a: one(*a)), (xs, sigs))


def _path_terms(prob: _Problem, u: Array, xs_next: Array, start: int, opts: ShootingOptions):
    """Objective terms for controls ``u`` (H, ...) and the states after them ``xs_next``."""
    H = u.shape[0]
    nd = u.ndim - 1
    sig = prob.sigmas
    sig_next = sig[start + 1 : start + H + 1]
    h = sig[start + 1 : start + H + 1] - sig[start : start + H]
    vb = _field_on_path(prob, xs_next, sig_next, opts.remat_path)
    eps_hat = xs_next + _bcast(1 - sig_next, nd).astype(xs_next.dtype) * vb
    axes = tuple(range(1, u.ndim))
    resid = jnp.mean((eps_hat - prob.target[None]) ** 2, axis=axes)  # (H,)
    cons = jnp.sum(_weights(opts, sig_next, H) * resid)
    effort = opts.effort_weight * jnp.sum(jnp.abs(h) * jnp.mean(u**2, axis=axes))
    smooth = (
        opts.smoothness_weight * jnp.sum(jnp.mean((u[1:] - u[:-1]) ** 2, axis=axes))
        if H > 1
        else jnp.zeros((), u.dtype)
    )
    total = cons + effort + smooth
    if opts.terminal_weight > 0:
        bf, _ = prob.blended()
        n = prob.alpha.shape[0]
        a_end = prob.alpha[min(start + H, n - 1)]
        x_end = xs_next[-1]
        v_cmd = bf(x_end, sig_next[-1], (prob.cond_a, prob.cond_b, a_end))
        total = total + opts.terminal_weight * jnp.mean((vb[-1] - v_cmd) ** 2)
    return total, resid


def _rollout(prob: _Problem, x0: Array, u: Array, start: int) -> Array:
    """States ``x_start .. x_{start+H}`` of the controlled blended dynamics, ``(H + 1, ...)``."""
    H = u.shape[0]
    bf, sched = prob.blended()
    _, xs = integrate_path(
        bf,
        x0,
        prob.sigmas,
        sched,
        control=u,
        start=start,
        stop=start + H,
        adjoint=diffrax.RecursiveCheckpointAdjoint(checkpoints=H),
    )
    return xs


def _eval_nfe(prob: _Problem, start: int, H: int, opts: ShootingOptions) -> Array:
    """Model calls of one forward evaluation of the objective."""
    n = blend_nfe(prob.alpha, start, start + H, prob.mode) + H
    if opts.terminal_weight > 0:
        i = min(start + H, prob.alpha.shape[0] - 1)
        n = n + blend_nfe(prob.alpha, i, i + 1, prob.mode)
    return n


# ----------------------------------------------------------------------------- optimiser loop
def _optimise(loss_fn, params0, opts: ShootingOptions, max_iter: int):
    """Minimise ``loss_fn(params) -> (J, aux)`` with optax; early stop; keep the best iterate.

    Stops on a non-finite objective or gradient (status 2) and when the objective exceeds
    ``divergence_ratio`` times the first one (status 3: an unstable step size).

    Returns ``(best_params, best_J, best_aux, history (max_iter,), iterations, status)``.
    """
    opt = opts.make_optimizer(max_iter)
    vg = jax.value_and_grad(loss_fn, has_aux=True)
    (j0, aux0), _ = jax.eval_shape(vg, params0)
    dtype = j0.dtype
    zero_aux = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux0)

    def cond(c):
        it, _, _, _, _, _, _, stall, _, fault, _ = c
        return (it < max_iter) & (stall < opts.patience) & (fault == 0)

    def body(c):
        it, p, ost, best_p, best_j, best_aux, j_prev, stall, hist, _, j_first = c
        (j, aux), g = vg(p)
        finite = jnp.isfinite(j) & jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(g)])
        )
        j_first = jnp.where(it == 0, j, j_first)
        diverged = finite & (j > opts.divergence_ratio * jnp.maximum(j_first, 0.0))
        fault = jnp.where(~finite, 2, jnp.where(diverged, 3, 0)).astype(jnp.int32)
        better = finite & (j < best_j)
        pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(better, a, b), new, old)
        best_p, best_aux = pick(p, best_p), pick(aux, best_aux)
        best_j = jnp.where(better, j, best_j)
        hist = hist.at[it].set(j)
        rel = (j_prev - j) / jnp.maximum(jnp.abs(j_prev), jnp.finfo(dtype).tiny)
        stall = jnp.where(rel < opts.rtol, stall + 1, 0)
        upd, ost = opt.update(g, ost, p)
        p = optax.apply_updates(p, upd)
        return it + 1, p, ost, best_p, best_j, best_aux, j, stall, hist, fault, j_first

    init = (
        jnp.int32(0),
        params0,
        opt.init(params0),
        params0,
        jnp.asarray(jnp.inf, dtype),
        zero_aux,
        jnp.asarray(jnp.inf, dtype),
        jnp.int32(0),
        jnp.full((max_iter,), jnp.nan, dtype),
        jnp.int32(0),
        jnp.asarray(jnp.inf, dtype),
    )
    out = jax.lax.while_loop(cond, body, init)
    it, _, _, best_p, best_j, best_aux, _, stall, hist, fault, _ = out
    status = jnp.where(fault > 0, fault, jnp.where(stall >= opts.patience, 0, 1))
    status = status.astype(jnp.int32)
    return best_p, best_j, best_aux, hist, it, status


# ----------------------------------------------------------------------------- public API
def _prepare(field, x, sigmas, start, cond_a, cond_b, noise, alpha, mode, opts):
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)):
        raise TypeError(f"start must be a Python int (the switch step), got {type(start)}")
    if not isinstance(opts, ShootingOptions):
        raise TypeError(f"options must be a ShootingOptions, got {type(opts).__name__}")
    x = jnp.asarray(x)
    noise = jnp.asarray(noise, x.dtype)
    if noise.shape != x.shape:
        raise ValueError(f"noise has shape {noise.shape}; it must match x's shape {x.shape}")
    sigmas = jnp.asarray(sigmas)
    n = int(sigmas.shape[0]) - 1
    H = resolve_horizon(opts.horizon, int(start), n)
    binary = alpha is None
    alpha = alpha_direct(n, int(start)) if alpha is None else jnp.asarray(alpha)
    if alpha.shape != (n,):
        raise ValueError(
            f"alpha must have shape ({n},) (one weight per grid step), got {alpha.shape}"
        )
    prob = _Problem(field, sigmas.astype(x.dtype), cond_a, cond_b, alpha, noise, mode, binary)
    return prob, x, int(start), H


def shooting_objective(
    field: Callable[[Array, Array, Any], Array],
    x: Float[Array, "..."],
    sigmas: Float[Array, " n_plus_1"],
    start: int,
    cond_a: Any,
    cond_b: Any,
    noise: Float[Array, "..."],
    controls: Float[Array, "h ..."],
    alpha: Float[Array, " n"] | None = None,
    *,
    options: ShootingOptions = ShootingOptions(),
    mode: str = "velocity",
) -> Float[Array, ""]:
    """The single-shooting objective ``J(u)`` of the module docstring for ``controls`` (H, ...).

    Differentiable (``jax.grad`` w.r.t. ``controls`` or ``x`` is what :func:`single_shooting`
    descends); the horizon is ``controls.shape[0]``.
    """
    opts = dataclasses.replace(options, horizon=int(jnp.shape(controls)[0]))
    prob, x, start, H = _prepare(field, x, sigmas, start, cond_a, cond_b, noise, alpha, mode, opts)
    if jnp.shape(controls) != (H, *x.shape):
        raise ValueError(
            f"controls have shape {jnp.shape(controls)}; expected (H, *x.shape) with H <= the "
            f"remaining steps, i.e. {(H, *x.shape)}"
        )
    xs = _rollout(prob, x, controls, start)
    return _path_terms(prob, controls, xs[1:], start, opts)[0]


def single_shooting(
    field: Callable[[Array, Array, Any], Array],
    x: Float[Array, "..."],
    sigmas: Float[Array, " n_plus_1"],
    start: int,
    cond_a: Any,
    cond_b: Any,
    noise: Float[Array, "..."],
    alpha: Float[Array, " n"] | None = None,
    *,
    options: ShootingOptions = ShootingOptions(),
    mode: str = "velocity",
    init: Float[Array, "h ..."] | None = None,
) -> ShootingResult:
    """Optimise per-step controls over ``H`` steps after the switch (single shooting).

    Args:
        field: velocity field ``v(x, sigma, cond)``.
        x: the cached state at grid step ``start`` (any shape).
        sigmas: the trajectory's grid ``(N + 1,)``.
        start: the switch step ``k`` (Python int).
        cond_a, cond_b: conditioning of the cached prompt and of the new prompt.
        noise: the noise target ``eps_target`` (the seed noise, or A's implied noise), x's shape.
        alpha: per-step blend weights ``(N,)`` of the command (default: direct switch).
        options: :class:`ShootingOptions`.
        mode: ``"velocity"`` or ``"cond"`` blending for the command.
        init: warm start controls ``(H, *x.shape)`` (e.g. a previous plan's); default zeros.

    Returns:
        A :class:`ShootingResult` (jit-compiled; vmappable over ``x``, ``noise``, conds).
    """
    prob, x, start, H = _prepare(
        field, x, sigmas, start, cond_a, cond_b, noise, alpha, mode, options
    )
    if init is not None and jnp.shape(init) != (H, *x.shape):
        raise ValueError(
            f"init has shape {jnp.shape(init)}; expected (H, *x.shape) = {(H, *x.shape)}"
        )
    return _single(prob, x, init, start, H, options)


@eqx.filter_jit
def _single(prob, x, init, start, H, opts):
    u0 = jnp.zeros((H, *x.shape), x.dtype) if init is None else jnp.asarray(init, x.dtype)

    def loss(u):
        xs = _rollout(prob, x, u, start)
        j, _ = _path_terms(prob, u, xs[1:], start, opts)
        return j, xs

    u, j, xs, hist, it, status = _optimise(loss, u0, opts, opts.max_iter)
    f = _eval_nfe(prob, start, H, opts)
    return ShootingResult(
        controls=u,
        path=xs,
        objective=hist,
        final_objective=j,
        iterations=it,
        defect=jnp.zeros((), x.dtype),
        nfe_forward=it * f,
        nfe_backward=it * f,
        nfe=2 * it * f,
        status=status,
        horizon=H,
        start=start,
    )


def _segment_bounds(start: int, H: int, num_segments: int) -> list[int]:
    s = min(num_segments, H)
    return sorted({start + round(j * H / s) for j in range(s + 1)})


def multiple_shooting(
    field: Callable[[Array, Array, Any], Array],
    x: Float[Array, "..."],
    sigmas: Float[Array, " n_plus_1"],
    start: int,
    cond_a: Any,
    cond_b: Any,
    noise: Float[Array, "..."],
    alpha: Float[Array, " n"] | None = None,
    *,
    options: ShootingOptions = ShootingOptions(),
    mode: str = "velocity",
    init: Float[Array, "h ..."] | None = None,
) -> ShootingResult:
    """Multiple shooting: controls and segment start states, continuity by augmented Lagrangian.

    The horizon's ``H`` steps are split into ``options.num_segments`` segments; segment ``j`` is
    integrated from its own start state ``s_j`` (``s_0 = x``), and the defects
    ``d_j = x_end(segment j-1) - s_j`` are driven to zero by ``outer_iters`` rounds of
    ``mu += rho d``, ``rho *= penalty_growth`` around inner optax solves (the total iteration
    budget is ``max_iter``). The objective is the single-shooting one evaluated on the segments'
    states, plus ``mean(mu d) + rho/2 mean(d^2)`` per boundary. Returns a
    :class:`ShootingResult` whose ``defect`` is the final ``max |d|`` and whose ``path`` holds the
    segments' states (``controls`` applied from ``x`` reproduce it up to the defect).
    Arguments as :func:`single_shooting`.
    """
    prob, x, start, H = _prepare(
        field, x, sigmas, start, cond_a, cond_b, noise, alpha, mode, options
    )
    if init is not None and jnp.shape(init) != (H, *x.shape):
        raise ValueError(
            f"init has shape {jnp.shape(init)}; expected (H, *x.shape) = {(H, *x.shape)}"
        )
    return _multiple(prob, x, init, start, H, options)


@eqx.filter_jit
def _multiple(prob, x, init, start, H, opts):
    bounds = _segment_bounds(start, H, opts.num_segments)
    nseg = len(bounds) - 1
    u0 = jnp.zeros((H, *x.shape), x.dtype) if init is None else jnp.asarray(init, x.dtype)
    xs0 = _rollout(prob, x, u0, start)
    s0 = jnp.stack([xs0[b - start] for b in bounds[1:-1]]) if nseg > 1 else None
    # segment states are optimised as s = s0 + scale * delta with scale = the mean |step|, so
    # one optimiser step moves a state as much as a control step does (Adam's steps have the
    # size of the learning rate in parameter units)
    hs = prob.sigmas[start + 1 : start + H + 1] - prob.sigmas[start : start + H]
    scale = jnp.mean(jnp.abs(hs)).astype(x.dtype)

    def segments(params):
        u, delta = params
        s = None if delta is None else s0 + scale * delta
        states, defects = [], []
        for j in range(nseg):
            a, b = bounds[j], bounds[j + 1]
            x_start = x if j == 0 else s[j - 1]
            xs = _rollout(prob, x_start, u[a - start : b - start], a)
            states.append(xs[1:])
            if j < nseg - 1:
                defects.append(xs[-1] - s[j])
        d = jnp.stack(defects) if defects else jnp.zeros((0, *x.shape), x.dtype)
        return jnp.concatenate(states), d

    inner = opts.max_iter if nseg == 1 else max(1, opts.max_iter // opts.outer_iters)
    outer = 1 if nseg == 1 else opts.outer_iters
    axes = tuple(range(1, x.ndim + 1))

    def loss(p, mu, rho):
        xs_next, d = segments(p)
        j, _ = _path_terms(prob, p[0], xs_next, start, opts)
        if nseg > 1:
            j = (
                j
                + jnp.sum(jnp.mean(mu * d, axis=axes))
                + 0.5 * rho * jnp.sum(jnp.mean(d**2, axis=axes))
            )
        return j, (xs_next, d)

    def outer_step(c, _):
        params, mu, rho, its, status = c
        params, _, (xs_next, d), hist, it, st = _optimise(
            lambda p: loss(p, mu, rho), params, opts, inner
        )
        # status: diverged / non-finite anywhere wins, then max-iter over converged
        carry = (params, mu + rho * d, rho * opts.penalty_growth, its + it, jnp.maximum(status, st))
        return carry, (hist, xs_next, d)

    mu0 = jnp.zeros((max(nseg - 1, 0), *x.shape), x.dtype)
    d0 = None if s0 is None else jnp.zeros_like(s0)
    init_c = ((u0, d0), mu0, jnp.asarray(opts.penalty, x.dtype), jnp.int32(0), jnp.int32(0))
    (params, _, _, its, status), (hists, xs_all, d_all) = jax.lax.scan(
        outer_step, init_c, None, length=outer
    )
    xs_next, d = xs_all[-1], d_all[-1]
    u = params[0]
    j_final, _ = _path_terms(prob, u, xs_next, start, opts)
    defect = jnp.max(jnp.abs(d)) if nseg > 1 else jnp.zeros((), x.dtype)
    f = _eval_nfe(prob, start, H, opts)
    init_nfe = blend_nfe(prob.alpha, start, start + H, prob.mode) if nseg > 1 else 0
    return ShootingResult(
        controls=u,
        path=jnp.concatenate([x[None], xs_next]),
        objective=hists.reshape(-1),
        final_objective=j_final,
        iterations=its,
        defect=defect,
        nfe_forward=its * f + init_nfe,
        nfe_backward=its * f,
        nfe=2 * its * f + init_nfe,
        status=status,
        horizon=H,
        start=start,
    )
