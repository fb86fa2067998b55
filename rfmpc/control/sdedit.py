"""``SDEdit``: re-noise A's final image to the switch's noise level with fresh noise, then B.

Meng et al., "SDEdit: Guided Image Synthesis and Editing with Stochastic Differential
Equations", ICLR 2022: ``x_k = (1 - sigma_k) x0_A + sigma_k eps'`` with ``eps'`` fresh, then B's
steps. ``x0_A`` is A's final latent: free when the cache stored it, else A's remaining ``N - k``
steps are run first (counted).
"""

from __future__ import annotations

import jax

from rfmpc.control.base import AbstractController, PlanOut, Schedule, StepOut, SwitchProblem
from rfmpc.control.direct import Direct
from rfmpc.control.results import RESULTS, Cost
from rfmpc.flow.solve import integrate

__all__ = ["SDEdit"]


class SDEdit(AbstractController):
    """Fresh noise: ``jax.random.fold_in(A's key, noise_seed)`` (A's key must be stored)."""

    noise_seed: int = 1

    def __check_init__(self):
        if isinstance(self.noise_seed, bool) or not isinstance(self.noise_seed, int):
            raise TypeError(f"noise_seed must be an int, got {self.noise_seed!r}")

    def schedule(self, p: SwitchProblem) -> Schedule:
        return Direct().schedule(p)

    def init(self, p: SwitchProblem, sched: Schedule) -> PlanOut:
        if p.key is None:
            raise ValueError(
                "SDEdit needs fresh noise but the state has no PRNG key: store A's key in the "
                "TrajectoryState (or pass SwitchCache(noise=...) and a state with key=)"
            )
        if p.final_a is not None:
            final, cost = p.final_a.astype(p.x.dtype), Cost()
        else:
            final = integrate(p.field, p.x, p.sigmas, p.cond_a, start=p.k).x
            cost = Cost(forwards=p.num_steps - p.k)
        key = jax.random.fold_in(p.key, self.noise_seed)
        fresh = jax.random.normal(key, p.x.shape, p.x.dtype)
        s = p.sigmas[p.k]
        return PlanOut((1 - s) * final + s * fresh, None, cost, RESULTS.successful, {})

    def window(self, remaining: int) -> int:
        return 0

    def uses_b_velocity(self) -> bool:
        return False

    def step(self, p, sched, state, j, x, v_cmd, v_b) -> StepOut:
        raise AssertionError("SDEdit has no control window")  # pragma: no cover
