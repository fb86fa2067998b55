"""``ShootingMPC``: the write-up's combined algorithm -- a shooting plan, MPC tracking it, and
re-plans when the tracking error grows.

At the switch a :class:`~rfmpc.control.shooting.Shooting` plan (controls ``u_plan`` and states
``x_plan`` over its horizon) is computed. On each step of the window the
:class:`~rfmpc.control.mpc.MPC` QP tracks the planned states (the straight noise-consistent
reference where no plan covers a step) with the plan's controls as feed-forward, and applies
``u_plan + u_mpc``. Every ``replan_every`` steps the tracking error ``mean((x - x_plan)^2)`` is
checked; above ``replan_tol`` the plan is re-optimised from the current state (warm-started from
the old plan, at most ``max_replans`` times, only where a full horizon still fits). A re-plan
that fails its own checks is discarded and the old plan kept (counted in the diagnostics).

Cost: the shooting plan's (``iterations x (H + 1)`` forwards and VJPs, per plan) plus the MPC's.
Under ``vmap`` (``switch_batch``) both sides of the re-plan branch run.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array

from rfmpc.control.base import AbstractController, PlanOut, Schedule, StepOut, SwitchProblem
from rfmpc.control.mpc import MPC, MPCState, mpc_qp
from rfmpc.control.results import RESULTS, Cost
from rfmpc.control.shooting import Shooting, _initial_controls, _plan_result, plan_single

__all__ = ["ShootingMPC"]


class _State(NamedTuple):
    u: Array  # (N, *x.shape) feed-forward controls per grid step (0 outside a plan)
    x: Array  # (N + 1, *x.shape) planned states per grid index
    mask: Array  # (N + 1,) where the planned states are valid references
    mpc: MPCState
    replans: Array
    rejected: Array


class ShootingMPC(AbstractController):
    """A shooting plan tracked by MPC, with error-triggered re-plans (see the module docstring).

    Attributes:
        shooting: the planner (its ``horizon`` is also the re-plan horizon).
        mpc: the tracking MPC (its ``control_steps``: the window beyond the plan; ``None``: all
            remaining steps).
        replan_tol: re-plan when ``mean((x - x_plan)^2)`` exceeds this.
        replan_every: check every this many steps.
        max_replans: at most this many re-plans.
    """

    shooting: Shooting = Shooting()
    mpc: MPC = MPC()
    replan_tol: float = 1e-3
    replan_every: int = 1
    max_replans: int = 2

    def __check_init__(self):
        if not isinstance(self.shooting, Shooting) or not isinstance(self.mpc, MPC):
            raise TypeError("shooting must be a Shooting() and mpc an MPC()")
        if not self.replan_tol > 0:
            raise ValueError(f"replan_tol must be > 0, got {self.replan_tol}")
        for name, lo in (("replan_every", 1), ("max_replans", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")

    def schedule(self, p: SwitchProblem) -> Schedule:
        return self.shooting.command.schedule(p)

    def _horizon(self, remaining: int) -> int:
        h = self.shooting.horizon
        return remaining if h is None else min(h, remaining)

    def window(self, remaining: int) -> int:
        steps = self.mpc.control_steps
        return min(remaining, max(self._horizon(remaining), remaining if steps is None else steps))

    def uses_b_velocity(self) -> bool:
        return True

    def init(self, p: SwitchProblem, sched: Schedule) -> PlanOut:
        n, k, x = p.num_steps, p.k, p.x
        h_steps = self._horizon(n - k)
        target, cost = p.noise_target(self.shooting.target)
        u0 = _initial_controls(self.shooting.init_controls, h_steps, x)
        plan = plan_single(self.shooting, p, sched, x, k, h_steps, u0, target)
        res, peak = _plan_result(plan, self.shooting.max_control)
        good = res == RESULTS.successful
        u = jnp.zeros((n, *x.shape), x.dtype).at[k : k + h_steps].set(plan.controls)
        xs = jnp.zeros((n + 1, *x.shape), x.dtype).at[k + 1 : k + h_steps + 1].set(plan.path[1:])
        mask = jnp.zeros((n + 1,), bool).at[k + 1 : k + h_steps + 1].set(True)
        u, xs, mask = (jnp.where(good, a, jnp.zeros_like(a)) for a in (u, xs, mask))
        lin, lin_cost = self.mpc.linearisation.init(p)
        mstate = MPCState(target, lin, self.mpc.solver.init(x, self.mpc.horizon), jnp.zeros_like(x))
        state = _State(u, xs, mask, mstate, jnp.int32(0), jnp.int32(0))
        diag = {
            "plan_optimiser_result": plan.result,
            "plan_stopped_early": plan.stopped_early,
            "plan_iterations": plan.iterations,
            "peak_control": peak,
        }
        return PlanOut(x, state, cost + lin_cost + plan.cost, res, diag)

    def _replan(self, p, sched, st: _State, j, x) -> tuple[_State, Cost, Array]:
        n = p.num_steps
        h_r = self._horizon(n - p.k)
        init = jax.lax.dynamic_slice_in_dim(st.u, j, h_r)
        plan = plan_single(self.shooting, p, sched, x, j, h_r, init, st.mpc.target)
        bad = _plan_result(plan, self.shooting.max_control)[0] != RESULTS.successful
        idx = jnp.arange(n + 1)
        keep = idx <= j
        u = jnp.where(keep[:n].reshape((n,) + (1,) * x.ndim), st.u, 0.0)
        u = jax.lax.dynamic_update_slice_in_dim(u, plan.controls, j, 0)
        xs = jax.lax.dynamic_update_slice_in_dim(st.x, plan.path[1:], j + 1, 0)
        mask = keep | ((idx > j) & (idx <= j + h_r))
        new = st._replace(u=u, x=xs, mask=mask)
        new = jax.tree.map(lambda o, q: jnp.where(bad, o, q), st, new)
        return new, plan.cost, bad

    def step(self, p, sched, state: _State, j, x, v_cmd, v_b) -> StepOut:
        n, k = p.num_steps, p.k
        h_r = self._horizon(n - k)
        check = ((j - k) % self.replan_every == 0) & (j > k) & (j + h_r <= n)
        check = check & (state.replans < self.max_replans)
        err = jnp.where(state.mask[j], jnp.mean((x - state.x[j]) ** 2), 0.0)
        do = check & (err > self.replan_tol)

        def keep():
            return state, Cost(), jnp.bool_(False)

        st, replan_cost, bad = jax.lax.cond(do, lambda: self._replan(p, sched, state, j, x), keep)
        st = st._replace(
            replans=st.replans + do.astype(jnp.int32), rejected=st.rejected + bad.astype(jnp.int32)
        )
        mpc = self.mpc
        n_p = mpc.horizon
        pad = lambda a: jnp.concatenate([a, jnp.zeros((n_p, *a.shape[1:]), a.dtype)])
        u_ff = jax.lax.dynamic_slice_in_dim(pad(st.u), j, n_p)
        plan_x = jax.lax.dynamic_slice_in_dim(pad(st.x), j + 1, n_p)
        plan_m = jax.lax.dynamic_slice_in_dim(pad(st.mask), j + 1, n_p)
        straight = mpc_qp(mpc, p, j, x, v_b, st.mpc.target, 0.0, st.mpc.u_prev)
        sig_to = jax.lax.dynamic_slice(
            jnp.concatenate([p.sigmas, jnp.zeros((n_p,))]), (j + 1,), (n_p,)
        )
        x0_b = x - p.sigmas[j] * v_b
        eps_b = x + (1 - p.sigmas[j]) * v_b
        bc = lambda a: a.reshape((n_p,) + (1,) * x.ndim)
        nominal = bc(1 - sig_to) * x0_b[None] + bc(sig_to) * eps_b[None]
        ref_path = jnp.where(bc(plan_m), plan_x, nominal + straight.ref)
        jac, lin_cost = mpc.linearisation.jacobian(st.mpc.lin, p, j, x)
        qp = mpc_qp(
            mpc, p, j, x, v_b, st.mpc.target, jac, st.mpc.u_prev, ref_path, bc(straight.h) * u_ff
        )
        u_mpc, solver_state, result, info = mpc.solver.solve(st.mpc.solver, qp)
        ok = result == RESULTS.successful
        mstate = st.mpc._replace(solver=solver_state, u_prev=jnp.where(ok, u_mpc, 0.0))
        info = dict(info, tracking_error=err, replanned=do, rejected_replan=bad)
        # a failed QP makes the engine run the plain command on this step (u = 0)
        cost = replan_cost + lin_cost
        return StepOut(u_ff[0] + u_mpc, st._replace(mpc=mstate), cost, result, info)
