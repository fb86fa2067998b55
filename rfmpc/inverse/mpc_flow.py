"""MPC-Flow: inverse problems with a flow prior as a sequence of short optimal-control problems.

Webber, Denker, Barbano, Reader, "Solving Inverse Problems with Flow-based Models via Model
Predictive Control" (ICML 2026, arXiv:2601.23231).

The global problem (written in our sigma convention, sigma = 1 - t, integrating from sigma = 1 to
0) is::

    min_u  ∫_0^1 ||u(sigma)||^2 dsigma + lam * Phi(x(0)),   Phi(x) = ||A(x) - y||^2 / (2 s^2),
    dx/dsigma = v(x, sigma) + u(sigma),   x(1) = noise.

MPC-Flow never solves it at once. At each grid node ``sigma_i`` of the sampler's N-step grid it
solves a *sub-problem* from the current state, applies the first control for one Euler step and
re-plans (receding horizon). Two horizons (:class:`MPCFlow` ``horizon=``):

* ``"receding"`` (RHC, H = remaining time): the sub-problem covers ``[sigma_i, 0]`` with ``K``
  coarse Euler steps and controls ``u_0 .. u_{K-1}``; cost ``sum_j ||u_j||^2 dtau_j +
  lam Phi(x_K)``. The coarse grid (:func:`horizon_grid`) is either ``"uniform"`` (K equal steps)
  or ``"aligned"`` (default): the first coarse step *is* the sampler's step ``[sigma_i,
  sigma_{i+1}]`` and the other ``K - 1`` split ``[sigma_{i+1}, 0]`` evenly, so the control that
  is applied is exactly the one that was planned (as the principle of optimality behind
  receding-horizon control requires); the sampler's last step is then a K = 1 problem over
  exactly the remaining horizon. (With the uniform grid the first control, planned for
  ``sigma_i / K``, is applied over the shorter step; on our mixture priors this under-steers:
  the coarse prediction contracts early controls away and the plan defers them.) The first
  velocity ``v(x_i, sigma_i)`` does not depend
  on the controls, so it is computed once and every inner gradient backpropagates through only
  ``K - 1`` model calls (each rematerialised with ``jax.checkpoint``: memory grows like ``K``
  states, not ``K`` networks' activations). The control sequence is warm-started by shifting the
  previous solution in time (piecewise-constant resampling onto the new, shorter horizon).
  **K = 1** is the special case whose prediction ``x_final = x - sigma (v(x) + u)`` is linear in
  ``u``: no backpropagation through the model at all (one model call per step).
* ``"dt"`` (Δt-horizon): the sub-problem covers one step ``[sigma_i, sigma_{i+1}]`` with a value
  approximation as terminal cost, ``lam Phi(D(x_{i+1}))`` with ``D(z) = z - sigma_{i+1} v(z,
  sigma_{i+1})`` the Tweedie/denoised estimate of the next state (exact at the last step, where
  ``D`` is the identity); each inner gradient backpropagates through one model call.

Inner problems are solved with optax (Adam by default, or L-BFGS; :class:`InnerSolver`). The
optimiser works on the *displacement* ``w = dtau * u`` the control causes over its step (the cost
is unchanged; only the coordinates differ), so Adam's learning rate is in image units whatever
the step size.

Numerical safety: inner iterations whose value or gradient is non-finite are rejected (the
last finite iterate is kept; :func:`rfmpc.inverse.minimize`), and a sub-problem whose applied
control is still non-finite falls back to the unguided step ``u = 0`` (the prior's own Euler
step). Both are recorded: ``diagnostics["rejected_steps"]`` (inner iterations rejected, over the
whole solve) and ``diagnostics["fallback_steps"]`` (sampler steps that ran unguided); a fallback
makes the outcome ``RESULTS.control_nonfinite`` (``RestoreResult.result``; the first fallback or
unsuccessful inner loop, in step order). A restoration that is non-finite anyway (the prior
itself returns NaN) has the outcome ``RESULTS.restoration_nonfinite``: with ``throw=True`` (the
default) the compiled solve raises instead of returning a NaN image.

MMSE output (``mmse_samples = m > 1``): one MPC-Flow run returns one sample ``x^(j)`` whose law
approximates the posterior ``p(x | y)``. Against the truth, a posterior sample's expected squared
error is twice the MMSE's, ``E||x^(j) - x||^2 = E||E[x|y] - x||^2 + tr Cov[x|y]`` with
``tr Cov[x|y] = E||E[x|y] - x||^2`` (about 3 dB of PSNR). With ``m`` independent runs (keys
``jax.random.split(key, m)``, batched by ``jax.vmap``) the returned image is the average
``x_bar = (1/m) sum_j decode(x^(j))``, a Monte-Carlo estimate of the posterior mean ``E[x|y]``
whose error is ``(1 + 1/m)`` times the MMSE for exact posterior samples; the state ``x`` is the
average of the final states. Everything costs ``m`` times as much: ``nfe`` and ``backprops`` are
``m`` times a single run's (forward-equivalents per image, as PnP-Flow's ``n_avg`` counts), and
memory holds ``m`` runs at once. ``diagnostics["data_fit"]`` is ``Phi`` of the averaged state,
``control_energy`` the runs' mean, ``rejected_steps``/``fallback_steps`` their sums, and
``diagnostics["sample_variance"]`` is the per-image mean over
pixels of the samples' variance about ``x_bar`` (an estimate of ``tr Cov[x|y] / D``).

Counts (Adam, exact; L-BFGS counts its line-search evaluations): RHC per step ``1 + iters (K-1)``
model calls and ``iters (K-1)`` backprops, Δt per step ``1 + iters`` calls and ``iters``
backprops; for both the last step makes 1 call and no backprop. With the defaults (N = 20, K = 2,
5 Adam iterations): 115 calls and 95 backprops; K = 1 (10 iterations): 20 calls, 0 backprops.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from rfmpc.flow.results import RESULTS, outcome_code, outcome_from_code
from rfmpc.flow.schedule import flowmatch_sigmas
from rfmpc.inverse._common import (
    AbstractInverseSolver,
    InnerSolver,
    InverseProblem,
    RestoreResult,
    _bcast,
    _nonfinite,
    _per_image_sum,
    euler_rollout,
    first_fault,
    minimize_counted,
    result,
)

__all__ = ["MPCFlow", "horizon_grid", "mpc_dt", "mpc_k1", "mpc_rhc"]


def horizon_grid(sigma_now, sigma_next, k: int, aligned: bool):
    """The ``K + 1`` nodes of a receding-horizon sub-problem from ``sigma_now`` down to 0.

    ``aligned=False``: ``K`` uniform steps. ``aligned=True`` (``K >= 2``): the first step is the
    sampler's own step ``[sigma_now, sigma_next]`` (so the control that is applied is exactly the
    planned one), followed by ``K - 1`` uniform steps from ``sigma_next`` to 0.
    """
    j = jnp.arange(k + 1, dtype=sigma_now.dtype)
    if not aligned or k == 1:
        return sigma_now * (1.0 - j / k)
    rest = sigma_next * (1.0 - (j - 1) / (k - 1))
    return jnp.where(j == 0, sigma_now, rest)


def _shift_controls(u, tau_old, tau_new):
    """Resample piecewise-constant controls ``(K, ...)`` from grid ``tau_old`` onto ``tau_new``.

    New piece ``j`` takes the value of the old piece containing its midpoint (the warm start by
    shifting the previous solution in time); pieces past the old grid keep its last value.
    """
    k = u.shape[0]
    mid = 0.5 * (tau_new[:-1] + tau_new[1:])
    idx = jnp.sum(tau_old[None, 1:] > mid[:, None], axis=1)
    return u[jnp.clip(idx, 0, k - 1)]


class MPCFlow(AbstractInverseSolver):
    """MPC-Flow (Webber, Denker et al., ICML 2026); see the module docstring for the algorithm.

    Hyper-parameters:
        horizon: ``"receding"`` (H = remaining time, ``K`` coarse steps) or ``"dt"``.
        num_steps: N, the sampler's Euler steps (one sub-problem each). Default 20.
        horizon_steps: K, coarse Euler steps of a receding-horizon sub-problem (>= 1). Default 2.
        grid: ``"aligned"`` (default) or ``"uniform"`` coarse grid, see :func:`horizon_grid`.
        lam: weight of the data fit ``Phi`` against the control energy. Default 1.
        inner: the inner optimiser (default Adam, 5 iterations, lr 0.05 in image units).
        shift: the FlowMatch grid shift (1 = uniform). Default 1.
        checkpoint: rematerialise rollout steps in the backward pass. Default True.
        mmse_samples: m; 1 (default) returns one sample, m > 1 the average of m independent
            runs, an MMSE estimate (see the module docstring; costs m runs).
    """

    horizon: str = eqx.field(static=True, default="receding")
    num_steps: int = eqx.field(static=True, default=20)
    horizon_steps: int = eqx.field(static=True, default=2)
    grid: str = eqx.field(static=True, default="aligned")
    lam: float = eqx.field(static=True, default=1.0)
    inner: InnerSolver = InnerSolver("adam", 5, 0.05)
    shift: float = eqx.field(static=True, default=1.0)
    checkpoint: bool = eqx.field(static=True, default=True)
    mmse_samples: int = eqx.field(static=True, default=1)

    def __check_init__(self):
        if self.horizon not in ("receding", "dt"):
            raise ValueError(f"horizon must be 'receding' or 'dt', got {self.horizon!r}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.grid not in ("aligned", "uniform"):
            raise ValueError(f"grid must be 'aligned' or 'uniform', got {self.grid!r}")
        if self.horizon_steps < 1:
            raise ValueError(f"horizon_steps (K) must be >= 1, got {self.horizon_steps}")
        if not self.lam > 0:
            raise ValueError(f"lam must be > 0, got {self.lam}")
        m = self.mmse_samples
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(
                f"mmse_samples must be an int >= 1 (1: one sample; m > 1: the average of m "
                f"runs), got {m!r}"
            )

    def _solve(self, problem: InverseProblem, key: PRNGKeyArray, shape) -> RestoreResult:
        m = self.mmse_samples
        if m == 1:
            return self._sample(problem, key, shape)
        runs = jax.vmap(lambda k: self._sample(problem, k, shape))(jax.random.split(key, m))
        return _average(problem, runs, m)

    def _sample(self, problem: InverseProblem, key: PRNGKeyArray, shape) -> RestoreResult:
        x = jax.random.normal(key, shape, problem.y.dtype)
        sig = flowmatch_sigmas(self.num_steps, self.shift).astype(x.dtype)
        if self.horizon == "receding":
            return self._receding(problem, x, sig)
        return self._delta_t(problem, x, sig)

    # ----------------------------------------------------------------------------- receding

    def _receding(self, problem, x, sig):
        k = self.horizon_steps
        lam = self.lam
        aligned = self.grid == "aligned"

        def plan(x, u_warm, s_now, s_next, k):
            """Solve the sub-problem from (x, s_now); return (x_next, u, tau, evals)."""
            v0 = jax.lax.stop_gradient(problem.velocity(x, s_now))
            tau = horizon_grid(s_now, s_next, k, aligned)
            dtau = _bcast(tau[:-1] - tau[1:], u_warm)

            def loss(w):
                u = w / dtau
                xf = euler_rollout(problem.velocity, x, tau, u, v0=v0, checkpoint=self.checkpoint)
                return jnp.sum(u**2 * dtau) + lam * jnp.sum(problem.phi(xf))

            w, evals, _, rejected, res = minimize_counted(loss, u_warm * dtau, self.inner)
            u, fell = _safe_controls(w / dtau)
            x_next = x + (s_next - s_now) * (v0 + u[0])
            return x_next, u, tau, evals, _fault(rejected, fell, res)

        def outer(carry, s):
            x, u_warm, nfe, bp, energy, faults = carry
            s_now, s_next, s_after = s
            x_next, u, tau, evals, fault = plan(x, u_warm, s_now, s_next, k)
            energy = energy + _per_image_sum(u[0] ** 2) * (s_now - s_next)
            u_next = _shift_controls(u, tau, horizon_grid(s_next, s_after, k, aligned))
            nfe, bp = nfe + 1 + evals * (k - 1), bp + evals * (k - 1)
            return (x_next, u_next, nfe, bp, energy, _add_faults(faults, fault)), None

        u0 = jnp.zeros((k, *x.shape), x.dtype)
        e0 = jnp.zeros(x.shape[:1], x.dtype)
        init = (x, u0, jnp.int32(0), jnp.int32(0), e0, _no_fault())
        # all but the last step; the last one has a single step left: K = 1 (exact horizon)
        steps = (sig[:-2], sig[1:-1], sig[2:])
        (x, u_warm, nfe, bp, energy, faults), _ = jax.lax.scan(outer, init, steps)
        s_last = sig[-2]
        x, u, _, _, fault = plan(x, u_warm[:1], s_last, sig[-1], 1)
        energy = energy + _per_image_sum(u[0] ** 2) * s_last
        return _finish(problem, x, nfe + 1, bp, energy, _add_faults(faults, fault))

    # ----------------------------------------------------------------------------- delta-t

    def _delta_t(self, problem, x, sig):
        lam = self.lam

        def one_step(x, w, s_now, s_next, value_model: bool):
            v0 = jax.lax.stop_gradient(problem.velocity(x, s_now))
            h = s_now - s_next

            def loss(w):
                u = w / h
                z = x - h * (v0 + u)
                if value_model:
                    z = z - s_next * problem.velocity(z, s_next)  # Tweedie estimate of x_0
                return jnp.sum(u**2) * h + lam * jnp.sum(problem.phi(z))

            w, evals, _, rejected, res = minimize_counted(loss, w, self.inner)
            u, fell = _safe_controls(w / h)
            return x - h * (v0 + u), u, evals, _fault(rejected, fell, res)

        def outer(carry, s):
            x, u_prev, nfe, bp, energy, faults = carry
            s_now, s_next = s
            h = s_now - s_next
            x, u, evals, fault = one_step(x, u_prev * h, s_now, s_next, True)
            energy = energy + _per_image_sum(u**2) * h
            carry = (x, u, nfe + 1 + evals, bp + evals, energy, _add_faults(faults, fault))
            return carry, None

        e0 = jnp.zeros(x.shape[:1], x.dtype)
        init = (x, jnp.zeros_like(x), jnp.int32(0), jnp.int32(0), e0, _no_fault())
        (x, u_prev, nfe, bp, energy, faults), _ = jax.lax.scan(outer, init, (sig[:-2], sig[1:-1]))
        h_last = sig[-2] - sig[-1]
        x, u, _, fault = one_step(x, u_prev * h_last, sig[-2], sig[-1], False)
        energy = energy + _per_image_sum(u**2) * h_last
        return _finish(problem, x, nfe + 1, bp, energy, _add_faults(faults, fault))


def _finish(problem, x, nfe, bp, energy, faults):
    """The :class:`RestoreResult` of a run, with its fault counts and outcome."""
    rejected, fell, res = faults
    return result(
        problem,
        x,
        nfe,
        bp,
        outcome=res,
        control_energy=energy,
        rejected_steps=rejected,
        fallback_steps=fell,
    )


def _average(problem, runs: RestoreResult, m: int) -> RestoreResult:
    """The MMSE estimate from ``m`` vmapped runs (leading axis ``m``): mean image and state,
    ``m`` times the counts, summed fault counts, mean control energy, the samples' variance.
    Its outcome is ``restoration_nonfinite`` where the average is non-finite, else the first
    run's (in key order) that is not ``successful``."""
    image = jnp.mean(runs.image, axis=0)
    x = jnp.mean(runs.x, axis=0)
    var = jnp.mean((runs.image - image[None]) ** 2, axis=0)
    d = runs.diagnostics
    bad = _nonfinite(x, image)
    codes = outcome_code(runs.result)  # (m,)
    runs_result = outcome_from_code(
        jnp.where(jnp.any(codes != 0), codes[jnp.argmax(codes != 0)], 0)
    )
    return RestoreResult(
        x=x,
        image=image,
        nfe=m * runs.nfe[0],
        backprops=m * runs.backprops[0],
        diagnostics={
            "data_fit": problem.phi(x),
            "nonfinite": bad,
            "control_energy": jnp.mean(d["control_energy"], axis=0),
            "rejected_steps": jnp.sum(d["rejected_steps"]),
            "fallback_steps": jnp.sum(d["fallback_steps"]),
            "sample_variance": jnp.mean(var.reshape(var.shape[0], -1), axis=1),
        },
        result=first_fault(
            RESULTS.where(jnp.any(bad), RESULTS.restoration_nonfinite, RESULTS.successful),
            runs_result,
        ),
    )


def _safe_controls(u):
    """``(u, 0)`` if ``u`` is finite, else ``(0, 1)``: the unguided step is the safe fallback."""
    ok = jnp.all(jnp.isfinite(u))
    return jnp.where(ok, u, 0.0), (~ok).astype(jnp.int32)


def _no_fault():
    """``(rejected inner iterations, unguided steps, first unsuccessful outcome)`` of no step."""
    return jnp.int32(0), jnp.int32(0), RESULTS.successful


def _fault(rejected, fell, inner_result):
    """One sub-problem's faults: its rejections, whether it fell back to the unguided step
    (``RESULTS.control_nonfinite``) and its outcome (the inner loop's first)."""
    fallback = RESULTS.where(fell > 0, RESULTS.control_nonfinite, RESULTS.successful)
    return rejected, fell, first_fault(inner_result, fallback)


def _add_faults(a, b):
    return a[0] + b[0], a[1] + b[1], first_fault(a[2], b[2])


def mpc_rhc(horizon_steps: int = 2, **kw) -> MPCFlow:
    """Receding-horizon MPC-Flow with ``K = horizon_steps`` coarse steps (backprop K-1 calls)."""
    return MPCFlow(horizon="receding", horizon_steps=horizon_steps, **kw)


def mpc_k1(**kw) -> MPCFlow:
    """Receding-horizon MPC-Flow with K = 1: no backpropagation through the model."""
    kw.setdefault("inner", InnerSolver("adam", 10, 0.05))
    return MPCFlow(horizon="receding", horizon_steps=1, **kw)


def mpc_dt(**kw) -> MPCFlow:
    """Δt-horizon MPC-Flow with the Tweedie value approximation."""
    return MPCFlow(horizon="dt", **kw)
