"""One entry point for finishing prompt B from a cached state of prompt A's trajectory.

``switch(field, state_a, cond_b, method=...)`` takes a :class:`~rfmpc.flow.TrajectoryState` of
prompt A at grid step ``k`` (cached after ``k`` of ``N`` steps from seed noise ``eps``) and runs
the remaining ``N - k`` steps for prompt B. The goal is B's own trajectory from the same seed;
what each method does to get there (and what it costs):

=====================  =========================================================================
``direct``             switch the conditioning to B at step ``k`` (``N - k`` calls).
``blend``              linear velocity blend A -> B over ``transition_steps`` steps.
``adaptive``           the write-up's sigmoid blend, length from similarity (given, or the
                       cosine of ``v_A``/``v_B`` at the cached state: 2 extra calls).
``reproject``          noise-consistent re-projection at the switch, ``reproject_iters`` times
                       ``x <- (1 - sigma_k) x0_hat_B(x) + sigma_k eps_target`` with
                       ``x0_hat_B(x) = x - sigma_k v_B(x)``, then B. This is the closed-form
                       minimiser of the noise-consistency objective at the switch state (see
                       :mod:`rfmpc.control.shooting`) and a strong, cheap baseline.
``sdedit``             re-noise A's *final* image ``x0_A`` to ``sigma_k`` with *fresh* noise
                       (``key``), ``(1 - sigma_k) x0_A + sigma_k eps'``, then B (Meng et al.,
                       "SDEdit", ICLR 2022). Costs ``N - k`` extra calls unless ``final_a`` is
                       given (A's final latent cached too).
``shooting``           single shooting plan over ``shooting.horizon`` steps, then B.
``multiple-shooting``  multiple shooting plan (continuity defect reported), then B.
``mpc``                receding-horizon MPC on the first ``mpc.control_steps`` steps (default 3),
                       then B (:mod:`rfmpc.control.mpc`).
``shooting-mpc``       the write-up's combined algorithm: a shooting plan at the switch, MPC
                       tracking it (plan states as reference, plan controls as feed-forward),
                       and a re-plan (warm-started from the old plan) when the error grows,
                       checked every ``replan_every`` steps, at most ``max_replans`` times and
                       only where a full re-plan horizon still fits. The error
                       (``replan_on``) is the tracking error ``mean((x - x_plan)^2) >
                       replan_tol`` (default; free) or the noise-consistency error growing past
                       ``replan_ratio`` times its value at the last plan (one call per check).
                       The latter is the write-up's rule, but on curved flows the consistency
                       error grows by itself as sigma falls (see below), so it triggers
                       re-plans at low sigma that pull the state off B's trajectory -- on the
                       exact GMM this made results much worse, hence the default.
=====================  =========================================================================

``eps_target`` is the seed noise (``noise_target="seed"``, default) or A's implied noise at the
cached state ``eps_hat_A = x_k + (1 - sigma_k) v_A(x_k)`` (``"a-implied"``, one extra call): on
a curved flow ``eps_hat`` drifts from ``eps`` as sigma falls (it is ``E[eps | x]``), and for
similar prompts A's drift approximates B's, so matching A's implied noise removes the shared
bias. Which target is better is an empirical question; ``benchmarks/switch_quality.py`` measures.
On the exact GMM (N = 28, switches at k = 7 and 14, mean shifts 0.1 - 1) ``"a-implied"`` beat
``"seed"`` in most settings but lost when the prompts were dissimilar (velocity cosine ~0.6)
at the later switch; ``reproject`` with it beat the direct switch in every setting, while the
gradient methods (shooting, multiple shooting, shooting-mpc) cost ~15x the NFE of finishing
from scratch for no better quality. The default stays ``"seed"`` (the principled target); read
the benchmark before choosing.

The control methods (shooting, MPC) steer a *command* velocity chosen by ``command``
(``"direct"``: pure B; ``"blend"``/``"adaptive"``: the blends above).

NFE counts every model evaluation (forward calls, JVP probes, and for shooting the VJPs of the
backward passes), planning included. ``planning_s`` is the wall time of the planning stage
(similarity, re-projection, A's finish for SDEdit, shooting); MPC computes its controls inside
the rollout, so its cost shows in ``wall_s``. Timings include compilation on a first call.

Numerical faults never return silently. A shooting plan whose optimisation hit a non-finite
objective or gradient, diverged (objective above ``divergence_ratio`` times the initial one) or
whose controls are non-finite or larger than ``shooting.max_control`` is discarded and the
command runs instead (``u = 0``); an MPC step whose QP did not converge, was non-finite or whose
control left the box ``|u| <= u_max`` applies the command on that step (per-step codes in
``diagnostics["fault_codes"]``, counts in ``diagnostics["fallback_counts"]``). If a controlled
rollout still ends non-finite, the plain command is re-run from the cached state and returned.
Each of these sets ``SwitchResult.fallback`` and says why in ``fallback_reason``. If the plain
command itself is non-finite (the field returns NaN/inf for B), no safe result exists and
:func:`switch` raises ``FloatingPointError`` naming the first bad grid step.

All methods are jit-compiled and can run batched over several prompt pairs with
:func:`switch_batch` (``jax.vmap``; with ``vmap`` the data-dependent branches of
``shooting-mpc`` -- re-plan or not -- run both sides).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from rfmpc.control.mpc import (
    MPC_FAULTS,
    MPCOptions,
    MPCPlan,
    _Ctx,
    _mpc_run,
    _mpc_step,
    _step_nfe,
    _zero_qp,
    num_probes,
)
from rfmpc.control.qp import shift_warm_start
from rfmpc.control.schedules import (
    BlendedField,
    BlendSchedule,
    alpha_adaptive,
    alpha_direct,
    alpha_linear,
    blend_nfe,
    velocity_similarity,
)
from rfmpc.control.shooting import (
    SHOOTING_STATUS,
    ShootingOptions,
    _multiple,
    _Problem,
    _single,
    resolve_horizon,
)
from rfmpc.flow.schedule import flowmatch_sigmas
from rfmpc.flow.solve import integrate, integrate_path
from rfmpc.flow.state import TrajectoryState

__all__ = [
    "METHODS",
    "BatchSwitchResult",
    "SwitchConfig",
    "SwitchResult",
    "from_scratch_equal_nfe",
    "stack_states",
    "switch",
    "switch_batch",
]

METHODS = (
    "direct",
    "blend",
    "adaptive",
    "reproject",
    "sdedit",
    "shooting",
    "multiple-shooting",
    "mpc",
    "shooting-mpc",
)
_COMMANDS = ("direct", "blend", "adaptive")
_TARGETS = ("seed", "a-implied")


@dataclass(frozen=True)
class SwitchConfig:
    """Options of :func:`switch` (hashable: static under jit). See the module docstring."""

    transition_steps: int = 5
    blend_mode: str = "velocity"
    sigmoid_slope: float = 10.0
    command: str = "direct"
    noise_target: str = "seed"
    reproject_iters: int = 3
    shooting: ShootingOptions = dataclasses.field(default_factory=ShootingOptions)
    mpc: MPCOptions = dataclasses.field(default_factory=MPCOptions)
    replan_every: int = 1
    replan_on: str = "tracking"
    replan_tol: float = 1e-3
    replan_ratio: float = 2.0
    max_replans: int = 2

    def __post_init__(self):
        if self.blend_mode not in ("velocity", "cond"):
            raise ValueError(f"blend_mode must be 'velocity' or 'cond', got {self.blend_mode!r}")
        if self.command not in _COMMANDS:
            raise ValueError(f"command must be one of {_COMMANDS}, got {self.command!r}")
        if self.noise_target not in _TARGETS:
            raise ValueError(f"noise_target must be one of {_TARGETS}, got {self.noise_target!r}")
        if self.replan_on not in ("tracking", "consistency"):
            raise ValueError(
                f"replan_on must be 'tracking' or 'consistency', got {self.replan_on!r}"
            )
        if self.transition_steps < 1 or self.reproject_iters < 1 or self.replan_every < 1:
            raise ValueError(
                "transition_steps, reproject_iters and replan_every must be >= 1, got "
                f"{self.transition_steps}, {self.reproject_iters} and {self.replan_every}"
            )
        if not isinstance(self.shooting, ShootingOptions):
            raise TypeError("shooting must be a ShootingOptions")
        if not isinstance(self.mpc, MPCOptions):
            raise TypeError("mpc must be an MPCOptions")


@dataclass(frozen=True)
class SwitchResult:
    """Outcome of :func:`switch` (a plain record, not a pytree).

    Attributes:
        state: the final :class:`TrajectoryState` (step N, cond = cond_b, A's key and grid).
        method: the method name.
        nfe: model evaluations in total (planning included).
        planning_s: wall time of the planning stage (see the module docstring).
        wall_s: wall time of the whole switch (planning + rollout).
        fallback: whether a controller fell back to the (blend) command somewhere: a discarded
            shooting plan, MPC steps without a usable QP control, or a non-finite controlled
            rollout replaced by the command's (see the module docstring).
        fallback_reason: why, in words (None when no fallback).
        diagnostics: method-specific arrays and numbers (objective history, defect, QP stats...).
    """

    state: TrajectoryState
    method: str
    nfe: int
    planning_s: float
    wall_s: float
    fallback: bool
    fallback_reason: str | None
    diagnostics: dict


@dataclass(frozen=True)
class BatchSwitchResult:
    """Outcome of :func:`switch_batch`: per-pair arrays stacked on a leading axis."""

    x: Array
    nfe: Array
    fallback: Array
    planning_s: float
    wall_s: float
    method: str
    diagnostics: dict


# ----------------------------------------------------------------------------- helpers
def _alpha(cfg: SwitchConfig, kind: str, n: int, k: int, field, x, sig_k, cond_a, cond_b, sim):
    """Per-step alpha for a command kind; returns (alpha, similarity or None, nfe)."""
    if kind == "direct":
        return alpha_direct(n, k), None, 0
    if kind == "blend":
        return alpha_linear(n, k, cfg.transition_steps), None, 0
    nfe = 0
    if sim is None:
        sim = velocity_similarity(field(x, sig_k, cond_a), field(x, sig_k, cond_b))
        nfe = 2
    return alpha_adaptive(n, k, sim, cfg.sigmoid_slope), jnp.asarray(sim), nfe


def _target(cfg: SwitchConfig, field, x, eps, sig_k, cond_a):
    if cfg.noise_target == "seed":
        return eps, 0
    v_a = field(x, sig_k, cond_a).astype(x.dtype)
    return x + (1 - sig_k) * v_a, 1


def _command(method: str, cfg: SwitchConfig) -> str:
    if method in ("direct", "reproject", "sdedit"):
        return "direct"
    if method == "blend":
        return "blend"
    if method == "adaptive":
        return "adaptive"
    return cfg.command


# ----------------------------------------------------------------------------- planning stage
@eqx.filter_jit
def _plan(method, cfg, field, x, eps, sigmas, cond_a, cond_b, k, key, sim, final_a, init):
    n = sigmas.shape[0] - 1
    sig = sigmas.astype(x.dtype)
    sig_k = sig[k]
    out: dict[str, Any] = {}
    binary = _command(method, cfg) == "direct"
    alpha, sim, nfe = _alpha(cfg, _command(method, cfg), n, k, field, x, sig_k, cond_a, cond_b, sim)
    out["alpha"] = alpha
    if sim is not None:
        out["similarity"] = sim
    x_start = x
    if method in ("reproject", "shooting", "multiple-shooting", "mpc", "shooting-mpc"):
        target, t_nfe = _target(cfg, field, x, eps, sig_k, cond_a)
        nfe += t_nfe
        out["target"] = target
    if method == "reproject":
        resid = []
        for _ in range(cfg.reproject_iters):
            v_b = field(x_start, sig_k, cond_b).astype(x.dtype)
            resid.append(jnp.mean((x_start + (1 - sig_k) * v_b - target) ** 2))
            x_start = (1 - sig_k) * (x_start - sig_k * v_b) + sig_k * target
        out["consistency"] = jnp.stack(resid)  # before each iteration
        nfe += cfg.reproject_iters
    elif method == "sdedit":
        if final_a is None:
            final_a = integrate(field, x, sig, cond_a, start=k).x
            nfe += n - k
        fresh = jax.random.normal(key, x.shape, x.dtype)
        x_start = (1 - sig_k) * final_a + sig_k * fresh
    elif method in ("shooting", "multiple-shooting", "shooting-mpc"):
        opts = cfg.shooting
        H = resolve_horizon(opts.horizon, k, n)
        prob = _Problem(field, sig, cond_a, cond_b, alpha, target, cfg.blend_mode, binary)
        run = _multiple if method == "multiple-shooting" else _single
        res = run(prob, x, init, k, H, opts)
        out["shooting"] = res
        nfe += res.nfe
    out["x_start"] = x_start
    return out, jnp.asarray(nfe, jnp.int32)


# ----------------------------------------------------------------------------- execution stage
@eqx.filter_jit
def _execute(method, cfg, field, plan, x, sigmas, cond_a, cond_b, k):
    n = sigmas.shape[0] - 1
    sig = sigmas.astype(x.dtype)
    alpha = plan["alpha"]
    binary = _command(method, cfg) == "direct"
    bf = BlendedField(field, cfg.blend_mode, binary)
    sched = BlendSchedule(cond_a, cond_b, alpha)
    diag: dict[str, Any] = {}
    fallback = jnp.bool_(False)
    if method in ("direct", "reproject", "sdedit"):
        xf = integrate(field, plan["x_start"], sig, cond_b, start=k).x
        nfe = jnp.int32(n - k)
    elif method in ("blend", "adaptive"):
        xf = integrate(bf, x, sig, sched, start=k).x
        nfe = blend_nfe(alpha, k, n, cfg.blend_mode)
    elif method in ("shooting", "multiple-shooting"):
        res = plan["shooting"]
        fault, peak = _plan_fault(res, cfg.shooting.max_control)
        bad = fault > 0
        u = jnp.zeros((n - k, *x.shape), x.dtype).at[: res.horizon].set(res.controls)
        u = jnp.where(bad, 0.0, u)
        xf = integrate(bf, x, sig, sched, control=u, start=k).x
        nfe = blend_nfe(alpha, k, n, cfg.blend_mode)
        fallback = bad
        diag.update(shooting_fault=fault, shooting_peak_control=peak)
    elif method == "mpc":
        empty = MPCPlan.empty(x, n)
        ctx = _Ctx(field, sig, cond_a, cond_b, alpha, plan["target"], empty, cfg.blend_mode, binary)
        res = _mpc_run(ctx, x, k, cfg.mpc)
        xf, nfe = res.x, res.nfe
        fallback = res.fallback_steps > 0
        diag.update(
            fallback_steps=res.fallback_steps,
            fault_codes=res.fault_codes,
            qp_iterations=res.qp_iterations,
            consistency=res.consistency,
            control_rms=jnp.sqrt(jnp.mean(res.controls**2, axis=tuple(range(1, x.ndim + 1)))),
        )
    elif method == "shooting-mpc":
        xf, nfe, d = _shooting_mpc(cfg, field, plan, x, sig, cond_a, cond_b, k, binary)
        fallback = (
            (d["fallback_steps"] > 0) | (d["shooting_fault"] > 0) | (d["rejected_replans"] > 0)
        )
        diag.update(d)
    else:  # pragma: no cover - guarded by switch()
        raise ValueError(method)
    return xf, nfe, fallback, diag


#: Why a shooting plan was discarded (``diagnostics["shooting_fault"]``); 2 and 3 are the
#: optimiser's own statuses (:data:`rfmpc.control.shooting.SHOOTING_STATUS`).
PLAN_FAULTS = {
    0: "ok",
    2: "the shooting objective or its gradient became non-finite",
    3: "the shooting objective diverged (rose above divergence_ratio times its initial value)",
    4: "the planned controls exceeded max_control",
    5: "the planned controls were non-finite",
}


def _plan_fault(res, max_control: float):
    """``(fault code, peak |u|)`` of a shooting plan: nonzero = discard it (:data:`PLAN_FAULTS`)."""
    u = res.controls
    peak = jnp.max(jnp.abs(u))
    fault = jnp.where(
        res.status >= 2,
        res.status,
        jnp.where(~jnp.all(jnp.isfinite(u)), 5, jnp.where(peak > max_control, 4, 0)),
    )
    return fault.astype(jnp.int32), peak


def _shooting_mpc(cfg, field, plan, x, sig, cond_a, cond_b, k, binary):
    """MPC tracking the shooting plan, with error-triggered re-plans (one ``lax.scan``).

    MPC runs on the steps a plan covers and on the first ``mpc.control_steps`` steps after the
    switch; elsewhere the command plus the plan's feed-forward (zero outside a plan) is applied.
    """
    n = sig.shape[0] - 1
    opts, sopts = cfg.mpc, cfg.shooting
    alpha, target = plan["alpha"], plan["target"]
    res0 = plan["shooting"]
    fault0, _ = _plan_fault(res0, sopts.max_control)
    mplan = MPCPlan.from_shooting(x, n, k, res0.controls, res0.path)
    # a discarded plan: track nothing (MPC on its window, the command elsewhere)
    mplan = jax.tree.map(lambda e, p: jnp.where(fault0 > 0, e, p), MPCPlan.empty(x, n), mplan)
    h_r = min(res0.horizon, n - k)  # re-plan horizon (static): re-plans only where it fits
    probes = num_probes(x.shape, opts.stride)
    window = n - k if opts.control_steps is None else opts.control_steps
    bf = BlendedField(field, cfg.blend_mode, binary)

    def consistency(z, j):
        v_b = field(z, sig[j], cond_b).astype(z.dtype)
        return jnp.mean((z + (1 - sig[j]) * v_b - target) ** 2)

    def error(z, j, p: MPCPlan):
        if cfg.replan_on == "consistency":
            return consistency(z, j)
        # tracking: how far the executed state is from the plan (0 where no plan covers j)
        return jnp.where(p.mask[j], jnp.mean((z - p.x[j]) ** 2), 0.0)

    def replan(z, j, p: MPCPlan):
        sig_w = jax.lax.dynamic_slice(sig, (j,), (h_r + 1,))
        alpha_w = jax.lax.dynamic_slice(alpha, (j,), (h_r,))
        init = jax.lax.dynamic_slice_in_dim(p.u, j, h_r)
        prob = _Problem(field, sig_w, cond_a, cond_b, alpha_w, target, cfg.blend_mode, binary)
        r = _single(prob, z, init, 0, h_r, dataclasses.replace(sopts, horizon=h_r))
        idx = jnp.arange(n + 1)
        keep = idx <= j
        u = jnp.where(keep[:n].reshape((n,) + (1,) * x.ndim), p.u, 0.0)
        u = jax.lax.dynamic_update_slice_in_dim(u, r.controls, j, 0)
        xs = jax.lax.dynamic_update_slice_in_dim(p.x, r.path[1:], j + 1, 0)
        mask = keep | ((idx > j) & (idx <= j + h_r))
        new = MPCPlan(u=u, x=xs, mask=mask)
        bad = _plan_fault(r, sopts.max_control)[0] > 0  # keep the old plan, count the rejection
        return jax.tree.map(lambda o, q: jnp.where(bad, o, q), p, new), r.nfe, bad

    err0 = consistency(x, k) if cfg.replan_on == "consistency" else jnp.zeros((), x.dtype)

    def body(c, j):
        z, u_prev, prev, p, e0, replans, extra, rejected = c
        check = ((j - k) % cfg.replan_every == 0) & (j > k) & (j + h_r <= n)
        check = check & (replans < cfg.max_replans)
        err = jax.lax.cond(check, lambda: error(z, j, p), lambda: jnp.zeros((), z.dtype))
        if cfg.replan_on == "consistency":
            do = check & (err > cfg.replan_ratio * e0)
            extra = extra + check.astype(jnp.int32)
        else:
            do = check & (err > cfg.replan_tol)
        p, r_nfe, bad = jax.lax.cond(
            do, lambda: replan(z, j, p), lambda: (p, jnp.int32(0), jnp.bool_(False))
        )
        rejected = rejected + bad.astype(jnp.int32)
        e0 = jnp.where(do, err, e0)
        extra = extra + r_nfe
        ctx = _Ctx(field, sig, cond_a, cond_b, alpha, target, p, cfg.blend_mode, binary)

        def mpc_branch():
            warm = shift_warm_start(prev) if opts.warm_start else None
            z1, u0, info, sol = _mpc_step(ctx, opts, j, z, u_prev, warm)
            good = jnp.all(jnp.isfinite(sol.u)) & jnp.all(jnp.isfinite(sol.y))
            sol = jax.tree.map(lambda a, b: jnp.where(good, a, b), sol, prev)
            return z1, u0, info, sol, _step_nfe(ctx, j, probes)

        def plain_branch():  # outside the control window and the plan: command + feed-forward
            v = bf(z, sig[j], (cond_a, cond_b, alpha[j]))
            z1 = z + (sig[j + 1] - sig[j]) * (v + p.u[j])
            info = (jnp.full((), jnp.nan, z.dtype), jnp.int32(0), jnp.bool_(True), jnp.int32(0))
            one = jnp.where((alpha[j] > 0) & (alpha[j] < 1) & (cfg.blend_mode == "velocity"), 2, 1)
            return z1, jnp.zeros_like(z), info, prev, one.astype(jnp.int32)

        active = (j < k + window) | p.mask[j + 1]
        z1, u0, info, sol, step_nfe = jax.lax.cond(active, mpc_branch, plain_branch)
        carry = (z1, u0, sol, p, e0, replans + do.astype(jnp.int32), extra, rejected)
        return carry, (info, step_nfe, do)

    first = 1 if cfg.replan_on == "consistency" else 0  # err0's model call
    init = (
        x,
        jnp.zeros_like(x),
        _zero_qp(x, opts.horizon),
        mplan,
        err0,
        jnp.int32(0),
        jnp.int32(first),
        jnp.int32(0),
    )
    (xf, _, _, _, _, replans, extra, rejected), outs = jax.lax.scan(
        body, init, jnp.arange(k, n, dtype=jnp.int32)
    )
    (cons, iters, ok, codes), nfe_steps, did = outs
    diag = dict(
        fallback_steps=jnp.sum(~ok).astype(jnp.int32),
        fault_codes=codes,
        shooting_fault=fault0,
        rejected_replans=rejected,
        qp_iterations=iters,
        consistency=cons,
        replans=replans,
        replan_steps=did,
    )
    return xf, jnp.sum(nfe_steps).astype(jnp.int32) + extra, diag


# ----------------------------------------------------------------------------- public API
def _noise_for(state: TrajectoryState, noise):
    if noise is not None:
        noise = jnp.asarray(noise, state.x.dtype)
        if noise.shape != state.x.shape:
            raise ValueError(
                f"noise has shape {noise.shape}; it must be the seed noise of A's run, with the "
                f"state's shape {state.x.shape}"
            )
        return noise
    if state.key is None:
        raise ValueError(
            "state_a has no PRNG key, so its seed noise cannot be regenerated: pass noise= "
            "(the N(0, I) draw A's run started from)"
        )
    return jax.random.normal(state.key, state.x.shape, state.x.dtype)


def _check_method(method: str):
    if method not in METHODS:
        raise ValueError(
            f"unknown switch method {method!r}; valid methods are: {', '.join(METHODS)}"
        )


def _config(config: SwitchConfig | None, options: dict) -> SwitchConfig:
    cfg = SwitchConfig() if config is None else config
    if not isinstance(cfg, SwitchConfig):
        raise TypeError(f"config must be a SwitchConfig, got {type(cfg).__name__}")
    valid = {f.name for f in dataclasses.fields(SwitchConfig)}
    unknown = set(options) - valid
    if unknown:
        raise TypeError(f"unknown switch option(s) {sorted(unknown)}; valid: {sorted(valid)}")
    return dataclasses.replace(cfg, **options) if options else cfg


def _validate_inputs(field, state_a: TrajectoryState, k: int, cond_b, final_a, similarity):
    """Entry-point checks of :func:`switch` (static shapes and concrete values only)."""
    x = state_a.x
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"state_a.x must be a floating-point latent, got dtype {x.dtype}")
    if not isinstance(x, jax.core.Tracer) and not np.isfinite(np.asarray(x)).all():
        raise ValueError(
            "state_a.x contains NaN or inf: the cached state is damaged; regenerate prompt A's "
            "trajectory (or drop the entry with `rfmpc cache verify --repair`)"
        )
    if similarity is not None and not isinstance(similarity, jax.core.Tracer):
        s = np.asarray(similarity, np.float64)
        if not (np.all(np.isfinite(s)) and np.all(np.abs(s) <= 1.0)):
            raise ValueError(
                f"similarity must be a cosine similarity in [-1, 1], got {similarity!r}; omit it "
                "to measure the velocity cosine at the cached state"
            )
    if final_a is not None and tuple(jnp.shape(final_a)) != tuple(x.shape):
        raise ValueError(
            f"final_a has shape {tuple(jnp.shape(final_a))}; it must be A's final latent, with "
            f"the state's shape {tuple(x.shape)}"
        )
    if state_a.cond is not None:
        ta, tb = jax.tree.structure(state_a.cond), jax.tree.structure(cond_b)
        la, lb = jax.tree.leaves(state_a.cond), jax.tree.leaves(cond_b)
        if ta != tb or any(jnp.shape(a) != jnp.shape(b) for a, b in zip(la, lb)):
            raise ValueError(
                f"cond_b {_tree_shapes(cond_b)} does not match state_a.cond "
                f"{_tree_shapes(state_a.cond)}: encode prompt B with the model (and batch size) "
                "that produced A's state, e.g. pipe.encode_prompt(prompt_b)"
            )
    sig_k = state_a.sigmas[k]
    try:
        out = jax.eval_shape(lambda x_, s_, c_: field(x_, s_, c_), x, sig_k, cond_b)
    except Exception as e:
        raise ValueError(
            f"the velocity field cannot take state_a.x of shape {tuple(x.shape)} "
            f"({type(e).__name__}: {e}); the cached state comes from another model or "
            "resolution: regenerate prompt A with this model"
        ) from e
    if getattr(out, "shape", None) != x.shape:
        raise ValueError(
            f"the velocity field returned shape {getattr(out, 'shape', None)} for state_a.x of "
            f"shape {tuple(x.shape)}: the cached state comes from another model or resolution; "
            "regenerate prompt A with this model"
        )


def _tree_shapes(tree) -> str:
    return str(jax.tree.map(lambda a: tuple(jnp.shape(a)), tree))


def _check_batch(name: str, tree, b: int) -> None:
    """Every leaf of a stacked argument of :func:`switch_batch` has leading axis ``b``."""
    for leaf in jax.tree.leaves(tree):
        shape = tuple(jnp.shape(leaf))
        if not shape or shape[0] != b:
            raise ValueError(
                f"{name} must be stacked with a leading axis of {b} (one per state in states_a), "
                f"got a leaf of shape {shape}; stack per-pair values with jnp.stack"
            )


def _step_of(state: TrajectoryState) -> int:
    try:
        return int(np.asarray(state.step).reshape(-1)[0])
    except jax.errors.ConcretizationTypeError as e:
        raise ValueError("state.step is traced; call switch outside jit") from e


def _fallback_counts(diag: dict) -> dict[str, int]:
    """Per-reason counts of MPC steps that applied the command (:data:`MPC_FAULTS`)."""
    codes = np.asarray(diag["fault_codes"]).reshape(-1)
    return {name: int(np.sum(codes == c)) for c, name in MPC_FAULTS.items() if c != 0}


def _reasons(method: str, cfg: SwitchConfig, diag: dict) -> str | None:
    """The fallbacks of one switch, in words (None when there were none)."""
    out = []
    fault = int(diag.get("shooting_fault", 0))
    if fault:
        out.append(
            f"{PLAN_FAULTS[fault]} (shooting status {diag.get('shooting_status')}, peak |u| "
            f"{float(diag.get('shooting_peak_control', np.nan)):.3g}, max_control "
            f"{cfg.shooting.max_control}); the plan was discarded and the {cfg.command} command "
            "(u = 0) ran instead"
        )
    if int(diag.get("rejected_replans", 0)):
        out.append(
            f"{int(diag['rejected_replans'])} re-plan(s) failed (non-finite, diverged or "
            "controls above max_control) and were discarded; the previous plan was kept"
        )
    if method in ("mpc", "shooting-mpc") and int(diag["fallback_steps"]):
        counts = diag["fallback_counts"]
        total = len(diag["qp_iterations"])
        what = {
            "qp-not-converged": f"the MPC QP did not converge (qp maxiter={cfg.mpc.qp.maxiter}, "
            f"tol={cfg.mpc.qp.tol})",
            "non-finite": "the MPC QP or linearisation was non-finite",
            "bound-violation": f"the MPC control left the box |u| <= u_max={cfg.mpc.u_max}",
        }
        parts = [f"{what[name]} on {c} of {total} steps" for name, c in counts.items() if c]
        out.append(
            "; ".join(parts) + f"; the {cfg.command} command (u = 0) was applied on those steps"
        )
    if diag.get("nonfinite_rollout"):
        out.append(
            f"the {method} rollout ended non-finite; the plain {diag['nonfinite_rollout']} "
            "command was re-run from the cached state and its result returned"
        )
    return "; ".join(out) if out else None


def _safe_method(method: str, cfg: SwitchConfig) -> str | None:
    """The uncontrolled method a non-finite result falls back to (None: it is already that)."""
    if method in ("direct", "blend", "adaptive"):
        return None
    if method in ("reproject", "sdedit"):
        return "direct"
    return _command(method, cfg)


def _first_nonfinite_step(field, cfg, cmd, alpha, x, sigmas, cond_a, cond_b, k) -> int | None:
    """The first grid step whose end state is non-finite under the plain command ``cmd`` from
    ``x`` (``k - 1``: ``x`` itself; None: the path is finite)."""
    sig = sigmas.astype(x.dtype)
    bf = BlendedField(field, cfg.blend_mode, cmd == "direct")
    _, xs = integrate_path(bf, x, sig, BlendSchedule(cond_a, cond_b, alpha), start=k)
    bad = ~np.isfinite(np.asarray(xs)).reshape(xs.shape[0], -1).all(axis=1)
    return k + int(np.argmax(bad)) - 1 if bad.any() else None


def _raise_nonfinite(method, cmd, field, cfg, plan, x, sigmas, cond_a, cond_b, k):
    j = _first_nonfinite_step(field, cfg, cmd, plan["alpha"], x, sigmas, cond_a, cond_b, k)
    sig = np.asarray(sigmas)
    if j is None:
        where = f"the {method!r} result was non-finite"
    elif j < k:
        where = "the cached state x is non-finite"
    else:
        where = (
            f"grid step {j} (sigma {sig[j]:.4g} -> {sig[j + 1]:.4g}) of {len(sig) - 1} "
            "produced non-finite values"
        )
    raise FloatingPointError(
        f"switch(method={method!r}): {where} under the plain {cmd!r} command, so there is no "
        "safe result to fall back to; the velocity field returns NaN/inf for this state or "
        "conditioning (check cond_b and the model at that noise level)"
    )


def switch(
    field: Callable[[Array, Array, Any], Array],
    state_a: TrajectoryState,
    cond_b: Any,
    *,
    method: str,
    similarity: float | None = None,
    noise: Float[Array, "..."] | None = None,
    key: Any = None,
    final_a: Float[Array, "..."] | None = None,
    init: Float[Array, "h ..."] | None = None,
    config: SwitchConfig | None = None,
    **options,
) -> SwitchResult:
    """Finish prompt B from prompt A's cached state with the chosen method.

    Args:
        field: velocity field ``v(x, sigma, cond)``.
        state_a: A's :class:`TrajectoryState` at the switch step ``k`` (its ``cond`` is A's).
        cond_b: B's conditioning.
        method: one of :data:`METHODS`.
        similarity: prompt similarity for the adaptive schedule (default: velocity cosine).
        noise: A's seed noise (default: regenerated from ``state_a.key``; error without a key).
        key: fresh-noise key for ``sdedit`` (default: ``fold_in(state_a.key, 1)``).
        final_a: A's final latent for ``sdedit`` if cached (saves ``N - k`` calls).
        init: warm-start controls for the shooting plan (``(H, *x.shape)``).
        config: a :class:`SwitchConfig`; ``**options`` override its fields.

    Returns:
        :class:`SwitchResult`.
    """
    _check_method(method)
    cfg = _config(config, options)
    if not isinstance(state_a, TrajectoryState):
        raise TypeError(f"state_a must be a TrajectoryState, got {type(state_a).__name__}")
    k = _step_of(state_a)
    n = state_a.num_steps
    if k >= n:
        raise ValueError(f"state_a is at step {k} of {n}: the trajectory is already finished")
    if state_a.cond is None and method != "direct":
        raise ValueError(
            f"state_a.cond is None, but method {method!r} needs prompt A's conditioning: store "
            "it in the cached state (TrajectoryState(..., cond=cond_a))"
        )
    _validate_inputs(field, state_a, k, cond_b, final_a, similarity)
    eps = _noise_for(state_a, noise)
    if method == "sdedit" and key is None:
        if state_a.key is None:
            raise ValueError("sdedit needs key= (fresh noise) when state_a has no key")
        key = jax.random.fold_in(state_a.key, 1)
    x = state_a.x
    sim = None if similarity is None else jnp.asarray(similarity, jnp.float32)
    args = (field, x, eps, state_a.sigmas, state_a.cond, cond_b, k, key, sim, final_a, init)
    t0 = time.perf_counter()
    plan, nfe_plan = _plan(method, cfg, *args)
    jax.block_until_ready((plan, nfe_plan))
    t1 = time.perf_counter()
    xf, nfe_exec, fallback, diag = _execute(
        method, cfg, field, plan, x, state_a.sigmas, state_a.cond, cond_b, k
    )
    jax.block_until_ready(xf)
    diag = dict(diag)
    if not bool(jnp.all(jnp.isfinite(xf))):
        safe = _safe_method(method, cfg)
        cmd = safe or _command(method, cfg)
        if safe is not None:
            safe_plan = dict(plan, x_start=x)  # from the cached state, not a planned start
            xf, nfe_safe, _, _ = _execute(
                safe, cfg, field, safe_plan, x, state_a.sigmas, state_a.cond, cond_b, k
            )
            nfe_exec = nfe_exec + nfe_safe
            diag["nonfinite_rollout"] = safe
        if safe is None or not bool(jnp.all(jnp.isfinite(xf))):
            _raise_nonfinite(
                method, cmd, field, cfg, plan, x, state_a.sigmas, state_a.cond, cond_b, k
            )
        fallback = True
    t2 = time.perf_counter()
    status = None
    if "shooting" in plan:
        r = plan["shooting"]
        status = int(r.status)
        diag.update(
            shooting_objective=r.objective,
            shooting_final_objective=float(r.final_objective),
            shooting_iterations=int(r.iterations),
            shooting_status=SHOOTING_STATUS[status],
            shooting_defect=float(r.defect),
            shooting_nfe=int(r.nfe),
        )
    for name in ("similarity", "consistency"):
        if name in plan:
            diag[name] = plan[name]
    diag["noise_target"] = cfg.noise_target
    diag["planning_nfe"] = int(nfe_plan)
    if "fault_codes" in diag:
        diag["fallback_counts"] = _fallback_counts(diag)
    final = TrajectoryState(
        x=xf, step=n, sigmas=state_a.sigmas, key=state_a.key, cond=cond_b, meta=state_a.meta
    )
    return SwitchResult(
        state=final,
        method=method,
        nfe=int(nfe_plan) + int(nfe_exec),
        planning_s=t1 - t0,
        wall_s=t2 - t0,
        fallback=bool(fallback),
        fallback_reason=_reasons(method, cfg, diag) if bool(fallback) else None,
        diagnostics=diag,
    )


def stack_states(states: list[TrajectoryState]) -> TrajectoryState:
    """Stack states (same step, grid and shapes) on a new leading axis, for :func:`switch_batch`."""
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
    return jax.tree.map(lambda *a: jnp.stack(a), *states)


def switch_batch(
    field: Callable[[Array, Array, Any], Array],
    states_a: TrajectoryState,
    conds_b: Any,
    *,
    method: str,
    similarity: Array | None = None,
    noise: Array | None = None,
    key: Any = None,
    final_a: Array | None = None,
    config: SwitchConfig | None = None,
    mesh: Any = None,
    **options,
) -> BatchSwitchResult:
    """:func:`switch` over ``B`` prompt pairs at once with ``jax.vmap``.

    ``states_a`` is a stacked :class:`TrajectoryState` (:func:`stack_states`): every leaf has a
    leading axis ``B``; all pairs must share the switch step and the grid. ``conds_b``,
    ``similarity``, ``noise``, ``key`` (a batch of keys) and ``final_a`` are stacked likewise.
    Returns per-pair final latents, NFE and fallback flags.

    ``mesh`` (a :func:`rfmpc.parallel.make_mesh` mesh; default None = one device): the pairs are
    split over its ``"data"`` axis (``B`` must be a multiple of its size, else ``ValueError``);
    the field's parameters stay where they are (shard them with ``rfmpc.parallel``).
    """
    _check_method(method)
    cfg = _config(config, options)
    if not isinstance(states_a, TrajectoryState):
        raise TypeError(
            f"states_a must be a stacked TrajectoryState (stack_states), got "
            f"{type(states_a).__name__}"
        )
    steps = np.asarray(states_a.step).reshape(-1)
    if steps.size < 1 or not np.all(steps == steps[0]):
        raise ValueError(f"all states must be at the same step to batch them, got {steps}")
    sig = np.asarray(states_a.sigmas)
    if sig.ndim != 2 or not np.all(sig == sig[:1]):
        raise ValueError("all states must share one sigma grid (stack them with stack_states)")
    k = int(steps[0])
    sigmas = jnp.asarray(sig[0])
    n = sig.shape[1] - 1
    if k >= n:
        raise ValueError(f"the states are at step {k} of {n}: nothing remains to run")
    x = states_a.x
    b = int(steps.size)
    for name, arg in (("conds_b", conds_b), ("similarity", similarity), ("noise", noise)):
        _check_batch(name, arg, b)
    for name, arg in (("key", key), ("final_a", final_a)):
        _check_batch(name, arg, b)
    if noise is None:
        if states_a.key is None:
            raise ValueError("states_a have no keys: pass noise= (the stacked seed noises)")
        noise = jax.vmap(lambda kk, xx: jax.random.normal(kk, xx.shape, xx.dtype))(states_a.key, x)
    if method == "sdedit" and key is None:
        if states_a.key is None:
            raise ValueError("sdedit needs key= (a batch of fresh-noise keys)")
        key = jax.vmap(lambda kk: jax.random.fold_in(kk, 1))(states_a.key)
    sim = None if similarity is None else jnp.asarray(similarity, jnp.float32)
    cond_a = states_a.cond
    if mesh is not None:
        from rfmpc.parallel import shard_batch

        x, noise, cond_a, conds_b, key, sim, final_a = shard_batch(
            (x, noise, cond_a, conds_b, key, sim, final_a), mesh
        )

    def plan_one(x, eps, ca, cb, kk, s, fa):
        return _plan(method, cfg, field, x, eps, sigmas, ca, cb, k, kk, s, fa, None)

    def exec_one(p, x, ca, cb):
        return _execute(method, cfg, field, p, x, sigmas, ca, cb, k)

    t0 = time.perf_counter()
    plan, nfe_plan = eqx.filter_jit(eqx.filter_vmap(plan_one))(
        x, noise, cond_a, conds_b, key, sim, final_a
    )
    jax.block_until_ready((plan, nfe_plan))
    t1 = time.perf_counter()
    xf, nfe_exec, fallback, diag = eqx.filter_jit(eqx.filter_vmap(exec_one))(
        plan, x, cond_a, conds_b
    )
    jax.block_until_ready(xf)
    t2 = time.perf_counter()
    diag = dict(diag)
    if "shooting" in plan:
        diag.update(
            shooting_status=plan["shooting"].status, shooting_defect=plan["shooting"].defect
        )
    return BatchSwitchResult(
        x=xf,
        nfe=nfe_plan + nfe_exec,
        fallback=fallback,
        planning_s=t1 - t0,
        wall_s=t2 - t0,
        method=method,
        diagnostics=diag,
    )


def from_scratch_equal_nfe(
    field: Callable[[Array, Array, Any], Array],
    noise: Float[Array, "..."],
    cond_b: Any,
    num_steps_remaining: int,
    shift: float = 3.0,
) -> TrajectoryState:
    """The equal-NFE baseline: B from the seed noise with only ``N - k`` steps.

    Runs a fresh FlowMatch grid of ``num_steps_remaining`` steps (same ``shift``), i.e. the
    same number of model calls a direct switch spends, from ``noise`` with ``cond_b``.
    """
    if isinstance(num_steps_remaining, bool) or not isinstance(num_steps_remaining, int):
        raise TypeError("num_steps_remaining must be a Python int")
    if num_steps_remaining < 1:
        raise ValueError(f"num_steps_remaining must be >= 1, got {num_steps_remaining}")
    sig = flowmatch_sigmas(num_steps_remaining, shift)
    noise = jnp.asarray(noise)
    return integrate(field, noise, jnp.asarray(sig, noise.dtype), cond_b)
