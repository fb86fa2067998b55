"""``Direct``: switch the conditioning to B at the cached step and run B's own steps."""

from __future__ import annotations

from rfmpc.control.base import AbstractCommand, Schedule, SwitchProblem
from rfmpc.control.results import Cost
from rfmpc.control.schedules import alpha_direct

__all__ = ["Direct"]


class Direct(AbstractCommand):
    """The direct switch: ``alpha = 1`` from step ``k`` on, no control.

    Costs ``N - k`` model calls and no more: the cheapest thing a cache hit can do, and the
    reference every other controller is measured against. It is also the command the control
    methods steer by default (``MPC(command=Direct())``).
    """

    def schedule(self, p: SwitchProblem) -> Schedule:
        return Schedule(alpha_direct(p.num_steps, p.k), None, Cost(), "velocity", True)
