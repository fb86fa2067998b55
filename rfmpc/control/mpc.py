"""Receding-horizon MPC for a prompt switch: ``jax.jvp`` linearisation + batched block QPs.

At each of the first ``control_steps`` grid steps after the switch (default 3; ``None``: every
remaining step) the controller, at step ``j`` (state ``x_j``, noise level ``sigma_j``),

1. **linearises** the command field ``v_cmd(x) = v(x, sigma_j, blend(cond_a, cond_b, alpha_j))``
   around ``x_j`` with ``jax.linearize``: the value ``v_bar`` and a *block-diagonal* Jacobian
   estimate, one ``C x C`` block per latent pixel (``C`` = the last axis), from ``C`` JVP probes
   (:func:`jacobian_blocks`). A full Jacobian of a 128x128x16 latent (262144^2) is out of reach;
   the blocks are what makes the QP separable.
2. builds the **reference** trajectory from the noise-consistency principle (see
   :mod:`rfmpc.control.shooting`): with ``x0_hat_B = x_j - sigma_j v_B(x_j)`` the current denoised
   estimate under B, ``x_ref(sigma) = (1 - sigma) x0_hat_B + sigma eps_target`` -- the straight
   path from the B-denoised estimate to the seed noise. A state on B's own straight trajectory is
   already on it (zero control); a cached A state is pulled onto it. When a shooting plan is
   given (``shooting-mpc``), the reference is the planned states and the plan's controls are a
   feed-forward term.
3. solves the condensed QP over ``Np = min(horizon, remaining)`` steps (fixed-size horizon with
   the steps past the end of the grid given ``h = 0`` and zero weights, which decouples and zeroes
   them -- same solution, one compilation) with weights ``Q`` (tracking), ``R`` (effort), ``S``
   (``Delta u``) and box ``|u| <= u_max``, all pixels at once (:mod:`rfmpc.control.qp`),
   warm-started from the previous step's solution shifted by one step;
4. applies the first control: ``x_{j+1} = x_j + h_j (v_bar + u_ff + u_0)`` (``v_bar`` is the
   command's value at ``x_j``: no extra model call). If the QP did not converge (any block at the
   iteration cap), produced non-finite values or a first control outside the box by more than
   ``BOX_SLACK`` (relative), ``u_0 = 0`` is applied instead -- the plain blend command -- and
   the step is counted in ``fallback_steps`` with its reason in ``fault_codes``
   (:data:`MPC_FAULTS`). Box violations within the slack (ADMM tolerance) are clipped.

The linear model holds the Jacobian and ``v_bar`` fixed over the horizon (a local model, as in
real-time iteration NMPC; Diehl et al. 2005); only the first control is ever applied. After the
control window the command runs unchanged.

What it optimises, honestly: closeness to the *noise-consistent* straight path, not to B's true
trajectory (unknown). On a curved flow B's own trajectory drifts off that path as sigma falls,
so MPC helps right after the switch and hurts if kept on to the end (measured on the exact GMM:
``benchmarks/switch_quality.py``); even an A -> A "switch" is moved off A's own trajectory.

NFE per MPC step (analytic): ``b (1 + n_probes) + [alpha < 1]`` where ``b`` is the number of model
calls of the command (2 on velocity-blended steps, else 1), ``n_probes = C`` (or ``C s^d`` with
strided colouring) JVPs (each counted as one call; a JVP costs about 1.5-2 forward calls), and
one extra ``v_B`` call for the reference while the command is not pure B.

References: Mayne et al., "Constrained model predictive control: stability and optimality",
Automatica 2000; A. Patel, "Shooting Method and MPC for Cross-Prompt Caching in Rectified Flow
Models" (2025), section 4.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from rfmpc.control.qp import BlockQP, QPOptions, QPResult, shift_warm_start, solve_block_qp
from rfmpc.control.schedules import BlendedField, BlendSchedule, alpha_direct, blend_nfe
from rfmpc.flow.solve import integrate

__all__ = [
    "BOX_SLACK",
    "MPC_FAULTS",
    "MPCOptions",
    "MPCPlan",
    "MPCResult",
    "jacobian_blocks",
    "mpc_switch",
    "num_probes",
]


#: Per-step outcome codes of an MPC step (``MPCResult.fault_codes``): every code but 0 means
#: the QP's control was discarded and the command (``u = 0``) ran on that step.
MPC_FAULTS = {0: "ok", 1: "qp-not-converged", 2: "non-finite", 3: "bound-violation"}

#: Relative slack on the box ``|u| <= u_max`` before a converged QP's control counts as a
#: violation (ADMM satisfies the box only to its tolerance); within it the control is clipped.
BOX_SLACK = 0.05


@dataclass(frozen=True)
class MPCOptions:
    """MPC configuration (hashable: static under jit).

    Attributes:
        horizon: prediction horizon ``Np``.
        state_weight: ``Q`` (scalar times identity, per predicted state; mean-free, per element).
        effort_weight: ``R`` on ``||u_i||^2``; smoothness_weight: ``S`` on ``||u_i - u_{i-1}||^2``.
        u_max: box limit on every control element (velocity units).
        stride: probe colouring stride ``s``; 1 = ``C`` probes (sums each pixel's neighbourhood
            coupling), ``s > 1`` = ``C s^d`` probes over the ``d`` spatial axes (exact own block for
            fields whose receptive field is narrower than ``s``).
        batch_probes: JVP probes as one vmapped batch (accelerators) or sequential (default);
            see :func:`jacobian_blocks`.
        qp: :class:`QPOptions` for BoxOSQP.
        warm_start: shift the previous QP solution as the next initial point.
        control_steps: run MPC on the first ``control_steps`` steps after the switch only, then
            the plain command (``None``: every remaining step). Default 3: the noise-consistent
            reference is only trustworthy near the switch -- on a curved flow B's own trajectory
            drifts off it as sigma falls (``eps_hat_B = E[eps | x] != eps``), and on the exact
            GMM benchmark tracking it to the end was worse than the direct switch.
    """

    horizon: int = 5
    state_weight: float = 1.0
    effort_weight: float = 1e-3
    smoothness_weight: float = 1e-3
    u_max: float = 5.0
    stride: int = 1
    batch_probes: bool = False
    qp: QPOptions = dataclasses.field(default_factory=QPOptions)
    warm_start: bool = True
    control_steps: int | None = 3

    def __post_init__(self):
        if not isinstance(self.horizon, int) or self.horizon < 1:
            raise ValueError(f"horizon must be a positive int, got {self.horizon!r}")
        if not isinstance(self.stride, int) or self.stride < 1:
            raise ValueError(f"stride must be a positive int, got {self.stride!r}")
        for name in ("state_weight", "effort_weight", "smoothness_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.effort_weight == 0 and self.smoothness_weight == 0:
            raise ValueError("effort_weight or smoothness_weight must be > 0 (strictly convex QP)")
        if not self.u_max > 0:
            raise ValueError(f"u_max must be > 0, got {self.u_max}")
        if self.control_steps is not None and self.control_steps < 1:
            raise ValueError(f"control_steps must be >= 1 or None, got {self.control_steps}")


# ----------------------------------------------------------------------------- linearisation
def _colour_axes(ndim: int) -> tuple[int, ...]:
    """Spatial axes coloured by a strided probe: all but the first (batch) and last (channel)."""
    return tuple(range(1, ndim - 1)) if ndim >= 3 else ()


def num_probes(shape: tuple[int, ...], stride: int = 1) -> int:
    """Number of JVP probes :func:`jacobian_blocks` uses for a state of this shape."""
    return shape[-1] * stride ** len(_colour_axes(len(shape)))


def jacobian_blocks(
    f: Callable[[Array], Array],
    x: Float[Array, "... c"],
    *,
    stride: int = 1,
    batch_probes: bool = False,
) -> tuple[Float[Array, "... c"], Float[Array, "... c c"]]:
    """Value and per-pixel ``C x C`` Jacobian blocks of ``f`` at ``x`` from JVP probes.

    Pixels are all positions of ``x``'s leading axes; channels its last axis. With
    ``stride = 1`` there are ``C`` probes, probe ``c`` the tangent ``e_c`` at *every* pixel, so
    the block returned for pixel ``p`` is ``sum_q dv_p / dx_q`` restricted to channels: exact when
    pixels do not interact (e.g. a batch of independent samples, a 1x1-conv field), otherwise the
    sum of the pixel's neighbourhood coupling (a "lumped" Jacobian: the response to a spatially
    uniform perturbation). With ``stride = s > 1`` the spatial axes (all but the first and last)
    are coloured by ``(index mod s)``; probe ``(colour, c)`` perturbs only pixels of that colour,
    and each pixel reads its block from its own colour's probe -- exact whenever ``v_p`` depends
    on no other pixel of the same colour, i.e. a receptive field narrower than ``s`` (``C s^d``
    probes).

    The probes reuse one ``jax.linearize``; ``batch_probes=True`` pushes them through the
    linearised model as one ``vmap`` batch (what an accelerator wants), ``False`` one after the
    other with ``lax.map`` (less memory; on CPU the batched JVP of the exact GMM field, whose
    triangular solves batch badly, was ~500x slower than sequential probes).

    Returns:
        ``(f(x), J)`` with ``J[..., i, j] = d f_i / d x_j`` per pixel, shape ``(*x.shape, C)``.
    """
    v, lin = jax.linearize(f, x)
    ch = x.shape[-1]
    axes = _colour_axes(x.ndim) if stride > 1 else ()
    pix_shape = x.shape[:-1]
    if axes:
        grids = jnp.meshgrid(*[jnp.arange(n) for n in pix_shape], indexing="ij")
        colour = sum((grids[a] % stride) * stride**i for i, a in enumerate(axes))
        ncol = stride ** len(axes)
    else:
        colour = jnp.zeros(pix_shape, jnp.int32)
        ncol = 1
    eye = jnp.eye(ch, dtype=x.dtype)
    masks = (colour[None] == jnp.arange(ncol).reshape((ncol,) + (1,) * len(pix_shape))).astype(
        x.dtype
    )  # (ncol, *pix)
    tangents = masks[:, None, ..., None] * eye.reshape((1, ch) + (1,) * len(pix_shape) + (ch,))
    tangents = tangents.reshape((ncol * ch, *x.shape))
    outs = jax.vmap(lin)(tangents) if batch_probes else jax.lax.map(lin, tangents)
    outs = outs.reshape((ncol, ch, -1, ch))  # (colour, c_in, pixel, c_out)
    col = colour.reshape(-1)
    pix = jnp.arange(col.shape[0])
    blocks = outs[col, :, pix, :]  # (pixel, c_in, c_out)
    jac = jnp.swapaxes(blocks, -1, -2).reshape((*pix_shape, ch, ch))
    return v, jac


# ----------------------------------------------------------------------------- plan + result
class MPCPlan(eqx.Module):
    """A plan on the global grid for MPC to track (``shooting-mpc``).

    Attributes:
        u: ``(N, *x.shape)`` feed-forward controls per grid step (0 outside the plan).
        x: ``(N + 1, *x.shape)`` planned states per grid index.
        mask: ``(N + 1,)`` where the planned states are valid references.
    """

    u: Array
    x: Array
    mask: Bool[Array, " n_plus_1"]

    @staticmethod
    def empty(x: Array, num_steps: int) -> MPCPlan:
        return MPCPlan(
            u=jnp.zeros((num_steps, *x.shape), x.dtype),
            x=jnp.zeros((num_steps + 1, *x.shape), x.dtype),
            mask=jnp.zeros((num_steps + 1,), bool),
        )

    @staticmethod
    def from_shooting(x: Array, num_steps: int, start: int, controls: Array, path: Array):
        """Embed a shooting plan (``controls (H, ...)``, ``path (H + 1, ...)``) at ``start``."""
        p = MPCPlan.empty(x, num_steps)
        h = controls.shape[0]
        return MPCPlan(
            u=p.u.at[start : start + h].set(controls),
            x=p.x.at[start + 1 : start + h + 1].set(path[1:]),
            mask=p.mask.at[start + 1 : start + h + 1].set(True),
        )


class MPCResult(eqx.Module):
    """Outcome of :func:`mpc_switch`.

    Attributes:
        x: the final latent (grid end).
        controls: ``(M, *x.shape)`` QP controls applied on the ``M`` MPC steps (0 on fallbacks).
        consistency: ``(M,)`` noise-consistency error ``mean((eps_hat_B - eps_target)^2)`` at
            each MPC step's state (before its control).
        qp_iterations: ``(M,)`` max ADMM iterations over blocks per step.
        qp_converged: ``(M,)`` whether each step's QP control was used (converged, finite and
            inside the box).
        fault_codes: ``(M,)`` per-step outcome, a key of :data:`MPC_FAULTS` (0 = ok).
        fallback_steps: number of steps where the blend command (u = 0) was applied instead.
        nfe: model calls (forward + JVP probes) of the whole rollout.
        mpc_steps: M (static).
    """

    x: Array
    controls: Array
    consistency: Float[Array, " m"]
    qp_iterations: Int[Array, " m"]
    qp_converged: Bool[Array, " m"]
    fault_codes: Int[Array, " m"]
    fallback_steps: Int[Array, ""]
    nfe: Int[Array, ""]
    mpc_steps: int = eqx.field(static=True)


# ----------------------------------------------------------------------------- one MPC step
class _Ctx(eqx.Module):
    field: Callable
    sigmas: Array
    cond_a: Any
    cond_b: Any
    alpha: Array
    target: Array
    plan: MPCPlan
    mode: str = eqx.field(static=True)
    binary: bool = eqx.field(static=True, default=False)


def _linearise_command(ctx: _Ctx, x, s_j, a, stride: int, batch: bool = False):
    """``(v_cmd(x), J_cmd blocks, v_B(x))`` with the branch chosen *outside* the linearisation.

    (Linearising through :class:`BlendedField`'s ``lax.cond`` is correct but needlessly slow.)
    """
    dtype = x.dtype
    f = lambda c: lambda z: ctx.field(z, s_j, c).astype(dtype)

    def single():
        c = jax.tree.map(lambda p, q: jnp.where(a >= 1, q, p), ctx.cond_a, ctx.cond_b)
        v, jac = jacobian_blocks(f(c), x, stride=stride, batch_probes=batch)
        v_b = jax.lax.cond(a >= 1, lambda: v, lambda: f(ctx.cond_b)(x))
        return v, jac, v_b

    def both():
        if ctx.mode == "cond":
            c = jax.tree.map(lambda p, q: (1 - a) * p + a * q, ctx.cond_a, ctx.cond_b)
            v, jac = jacobian_blocks(f(c), x, stride=stride, batch_probes=batch)
            return v, jac, f(ctx.cond_b)(x)
        v_a, j_a = jacobian_blocks(f(ctx.cond_a), x, stride=stride, batch_probes=batch)
        v_b, j_b = jacobian_blocks(f(ctx.cond_b), x, stride=stride, batch_probes=batch)
        return (1 - a) * v_a + a * v_b, (1 - a) * j_a + a * j_b, v_b

    if ctx.binary:
        return single()
    return jax.lax.cond((a > 0) & (a < 1), both, single)


def _mpc_step(ctx: _Ctx, opts: MPCOptions, j, x, u_prev, warm: QPResult | None):
    """One receding-horizon step at grid step ``j`` (traced). Returns (x_next, u0, info, sol)."""
    n = ctx.alpha.shape[0]
    n_p = opts.horizon
    dtype = x.dtype
    a = ctx.alpha[j]
    sig = jnp.concatenate([ctx.sigmas.astype(dtype), jnp.zeros((n_p,), dtype)])
    s_j = sig[j]
    v_bar, jac, v_b = _linearise_command(ctx, x, s_j, a, opts.stride, opts.batch_probes)
    x0_hat = x - s_j * v_b
    consistency = jnp.mean((x + (1 - s_j) * v_b - ctx.target) ** 2)
    idx = j + jnp.arange(n_p)
    s_from = jax.lax.dynamic_slice(sig, (j,), (n_p,))
    s_to = jax.lax.dynamic_slice(sig, (j + 1,), (n_p,))
    h = s_to - s_from  # 0 past the grid end
    valid = (idx < n).astype(dtype)
    nd = x.ndim
    bc = lambda v: v.reshape((n_p,) + (1,) * nd)
    pad_u = jnp.concatenate([ctx.plan.u, jnp.zeros((n_p, *x.shape), dtype)])
    pad_x = jnp.concatenate([ctx.plan.x, jnp.zeros((n_p, *x.shape), dtype)])
    pad_m = jnp.concatenate([ctx.plan.mask, jnp.zeros((n_p,), bool)])
    u_ff = jax.lax.dynamic_slice_in_dim(pad_u, j, n_p)
    plan_x = jax.lax.dynamic_slice_in_dim(pad_x, j + 1, n_p)
    plan_m = jax.lax.dynamic_slice_in_dim(pad_m, j + 1, n_p)
    straight = bc(1 - s_to) * x0_hat[None] + bc(s_to) * ctx.target[None]
    ref = jnp.where(bc(plan_m), plan_x, straight)
    # deviation coordinates z = x - x_j: z_{i+1} = z_i + h_i (J z_i + v_bar + u_ff_i + u_i)
    ch = x.shape[-1]
    blk = lambda arr: arr.reshape((n_p, -1, ch))
    qp = BlockQP(
        jac=jac.reshape((-1, ch, ch)),
        h=h,
        x0=jnp.zeros((math.prod(x.shape[:-1]), ch), dtype),
        c=blk(bc(h) * (v_bar[None] + u_ff)),
        ref=blk(ref - x[None]),
        q=opts.state_weight * valid,
        r=jnp.full((n_p,), opts.effort_weight, dtype),
        s=opts.smoothness_weight * valid,
        u_prev=u_prev.reshape((-1, ch)),
        u_max=jnp.asarray(opts.u_max, dtype),
    )
    sol = solve_block_qp(qp, opts.qp, warm)
    u0 = sol.u[:, 0, :].reshape(x.shape)
    u_max = jnp.asarray(opts.u_max, dtype)
    finite = jnp.all(jnp.isfinite(sol.u)) & jnp.all(jnp.isfinite(jac))
    inside = jnp.max(jnp.abs(u0)) <= u_max * (1 + BOX_SLACK)
    code = jnp.where(~finite, 2, jnp.where(~sol.converged, 1, jnp.where(~inside, 3, 0)))
    ok = code == 0
    u0 = jnp.where(ok, jnp.clip(u0, -u_max, u_max), 0.0)
    x_next = x + h[0] * (v_bar + u_ff[0] + u0)
    info = (consistency, jnp.max(sol.iterations), ok, code.astype(jnp.int32))
    return x_next, u0, info, sol


def _step_nfe(ctx: _Ctx, j, probes: int):
    a = ctx.alpha[j]
    b = 1 if ctx.mode == "cond" else 1 + ((a > 0) & (a < 1)).astype(jnp.int32)
    return b * (1 + probes) + (a < 1).astype(jnp.int32)


def _zero_qp(x: Array, n_p: int) -> QPResult:
    """An all-zero QP solution: as a warm start it equals BoxOSQP's cold start."""
    ch = x.shape[-1]
    nb = math.prod(x.shape[:-1])
    z = jnp.zeros((nb, n_p, ch), x.dtype)
    zi = jnp.zeros((nb,), jnp.int32)
    return QPResult(z, z, z, zi, zi, jnp.bool_(True), jnp.zeros((nb,), x.dtype))


def _mpc_scan(ctx: _Ctx, opts: MPCOptions, x, j0: int, j1: int, carry_qp=None, u_prev=None):
    """MPC on grid steps ``j0 .. j1 - 1`` (static range, ``j1 > j0``).

    Returns ``(x, (u0s, (consistency, qp_iters, ok, fault_code), nfe), last_qp, u_prev)``.
    """
    probes = num_probes(x.shape, opts.stride)
    u_prev = jnp.zeros_like(x) if u_prev is None else u_prev
    carry_qp = _zero_qp(x, opts.horizon) if carry_qp is None else carry_qp

    def body(c, j):
        x, u_prev, prev = c
        warm = shift_warm_start(prev) if opts.warm_start else None
        x1, u0, info, sol = _mpc_step(ctx, opts, j, x, u_prev, warm)
        good = jnp.all(jnp.isfinite(sol.u)) & jnp.all(jnp.isfinite(sol.z))
        good = good & jnp.all(jnp.isfinite(sol.y))
        sol = jax.tree.map(lambda new, old: jnp.where(good, new, old), sol, prev)
        return (x1, u0, sol), (u0, info, _step_nfe(ctx, j, probes))

    (x, u_prev, carry_qp), outs = jax.lax.scan(
        body, (x, u_prev, carry_qp), jnp.arange(j0, j1, dtype=jnp.int32)
    )
    return x, outs, carry_qp, u_prev


def mpc_switch(
    field: Callable[[Array, Array, Any], Array],
    x: Float[Array, "..."],
    sigmas: Float[Array, " n_plus_1"],
    start: int,
    cond_a: Any,
    cond_b: Any,
    noise: Float[Array, "..."],
    alpha: Float[Array, " n"] | None = None,
    *,
    options: MPCOptions = MPCOptions(),
    mode: str = "velocity",
    plan: MPCPlan | None = None,
) -> MPCResult:
    """Finish a prompt switch from ``x`` (at grid step ``start``) with receding-horizon MPC.

    Args:
        field: velocity field ``v(x, sigma, cond)``; x: the cached state at step ``start``.
        sigmas: the grid ``(N + 1,)``; start: the switch step (Python int).
        cond_a, cond_b: the cached and the new prompt's conditioning.
        noise: the noise target of the reference (seed noise or A's implied noise), x's shape.
        alpha: the command's per-step blend weights ``(N,)`` (default: direct switch).
        options: :class:`MPCOptions`; mode: ``"velocity"`` or ``"cond"`` blending.
        plan: optional :class:`MPCPlan` to track (reference + feed-forward).

    Returns:
        :class:`MPCResult` (jit-compiled; vmappable over arrays).
    """
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)):
        raise TypeError(f"start must be a Python int (the switch step), got {type(start)}")
    if not isinstance(options, MPCOptions):
        raise TypeError(f"options must be an MPCOptions, got {type(options).__name__}")
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError("x must have at least one axis (the channel axis is the last)")
    sigmas = jnp.asarray(sigmas)
    n = int(sigmas.shape[0]) - 1
    if not 0 <= start < n:
        raise ValueError(f"start={start} must lie in [0, {n}) (steps must remain to control)")
    noise = jnp.asarray(noise, x.dtype)
    if noise.shape != x.shape:
        raise ValueError(f"noise has shape {noise.shape}; it must match x's shape {x.shape}")
    if alpha is not None and jnp.shape(alpha) != (n,):
        raise ValueError(f"alpha must have shape ({n},), got {jnp.shape(alpha)}")
    plan = MPCPlan.empty(x, n) if plan is None else plan
    binary = alpha is None
    alpha = alpha_direct(n, int(start)) if alpha is None else jnp.asarray(alpha)
    ctx = _Ctx(field, sigmas, cond_a, cond_b, alpha, noise, plan, mode, binary)
    return _mpc_run(ctx, x, int(start), options)


@eqx.filter_jit
def _mpc_run(ctx: _Ctx, x, start: int, opts: MPCOptions) -> MPCResult:
    n = ctx.alpha.shape[0]
    stop = n if opts.control_steps is None else min(n, start + opts.control_steps)
    xm, outs, _, _ = _mpc_scan(ctx, opts, x, start, stop)
    u, (cons, iters, ok, codes), nfe = outs
    xf, tail_nfe = _plain_tail(ctx, xm, stop)
    return MPCResult(
        x=xf,
        controls=u,
        consistency=cons,
        qp_iterations=iters,
        qp_converged=ok,
        fault_codes=codes,
        fallback_steps=jnp.sum(~ok).astype(jnp.int32),
        nfe=jnp.sum(nfe).astype(jnp.int32) + tail_nfe,
        mpc_steps=stop - start,
    )


def _plain_tail(ctx: _Ctx, x, start: int):
    """Finish steps ``start .. N-1`` with the command plus the plan's feed-forward controls."""
    n = ctx.alpha.shape[0]
    if start >= n:
        return x, jnp.int32(0)
    bf = BlendedField(ctx.field, ctx.mode, ctx.binary)
    sched = BlendSchedule(ctx.cond_a, ctx.cond_b, ctx.alpha)
    out = integrate(bf, x, ctx.sigmas, sched, control=ctx.plan.u[start:], start=start)
    return out.x, blend_nfe(ctx.alpha, start, n, ctx.mode)
