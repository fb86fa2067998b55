"""``Reproject``: put the cached state on B's straight path before running B.

For a rectified flow every state factors as ``x = (1 - sigma) x0_hat(x) + sigma eps_hat(x)`` with
``x0_hat = x - sigma v`` and ``eps_hat = x + (1 - sigma) v``. A state on B's own trajectory from
the seed implies (about) the seed's noise under B; A's cached state does not. ``iters`` times,

    x <- (1 - sigma_k) x0_hat_B(x) + sigma_k eps_target,

then B's steps. This is the closed-form minimiser of the noise-consistency objective at the
switch state (:mod:`rfmpc.control.shooting`), one model call per iteration.
"""

from __future__ import annotations

import jax

from rfmpc.control.base import AbstractController, PlanOut, Schedule, StepOut, SwitchProblem
from rfmpc.control.direct import Direct
from rfmpc.control.results import RESULTS, Cost

__all__ = ["Reproject"]

TARGETS = ("a-implied", "seed")


def check_target(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")


class Reproject(AbstractController):
    """Noise-consistent re-projection at the switch (``iters`` model calls), then ``Direct``.

    ``target``: ``"a-implied"`` (A's implied noise at the cached state; free when the cache
    stored ``v_A``) or ``"seed"`` (the seed noise).
    """

    iters: int = 1
    target: str = "a-implied"

    def __check_init__(self):
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"iters must be an int >= 1, got {self.iters!r}")
        check_target(self.target)

    def schedule(self, p: SwitchProblem) -> Schedule:
        return Direct().schedule(p)

    def init(self, p: SwitchProblem, sched: Schedule) -> PlanOut:
        target, cost = p.noise_target(self.target)
        s = p.sigmas[p.k]

        def body(x, _):
            v = p.velocity(x, p.k, p.cond_b)
            resid = ((x + (1 - s) * v - target) ** 2).mean()
            return (1 - s) * (x - s * v) + s * target, resid

        x, resid = jax.lax.scan(body, p.x, None, length=self.iters)
        diag = {"consistency": resid}  # mean squared (eps_hat_B - target) before each iteration
        return PlanOut(x, None, cost + Cost(forwards=self.iters), RESULTS.successful, diag)

    def window(self, remaining: int) -> int:
        return 0

    def uses_b_velocity(self) -> bool:
        return False

    def step(self, p, sched, state, j, x, v_cmd, v_b) -> StepOut:
        raise AssertionError("Reproject has no control window")  # pragma: no cover
