"""``Blend`` and ``Adaptive``: move the command from A to B over a few steps instead of at once.

The command on grid step ``i`` is ``(1 - alpha_i) v_A + alpha_i v_B`` (``mode="velocity"``, two
model calls while ``0 < alpha < 1``) or ``v(x, (1 - alpha_i) c_A + alpha_i c_B)`` (``mode="cond"``,
one call; only for continuous conditioning such as text embeddings); see
:mod:`rfmpc.control.schedules` for the schedules.
"""

from __future__ import annotations

import jax.numpy as jnp

from rfmpc.control.base import AbstractCommand, Schedule, SwitchProblem
from rfmpc.control.results import Cost
from rfmpc.control.schedules import alpha_linear, alpha_sigmoid, velocity_similarity

__all__ = ["Adaptive", "Blend"]

_MODES = ("velocity", "cond")


def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")


def _check_thresholds(name: str, th: tuple[float, float]) -> None:
    if len(th) != 2 or not (-1.0 <= th[1] < th[0] <= 1.0):
        raise ValueError(
            f"{name} must be two decreasing similarities in [-1, 1] (fast ramp above the first, "
            f"medium above the second), got {th!r}"
        )


class Blend(AbstractCommand):
    """Linear ramp of B's weight over ``transition_steps`` steps: ``alpha = min(1, (j+1)/L)``.

    ``transition_steps=1`` is the direct switch.
    """

    transition_steps: int = 5
    mode: str = "velocity"

    def __check_init__(self):
        if isinstance(self.transition_steps, bool) or not isinstance(self.transition_steps, int):
            raise TypeError(f"transition_steps must be an int, got {self.transition_steps!r}")
        if self.transition_steps < 1:
            raise ValueError(
                f"transition_steps must be >= 1 (1 = the direct switch), got "
                f"{self.transition_steps}"
            )
        _check_mode(self.mode)

    def schedule(self, p: SwitchProblem) -> Schedule:
        alpha = alpha_linear(p.num_steps, p.k, self.transition_steps)
        return Schedule(alpha, None, Cost(), self.mode, self.transition_steps == 1)


class Adaptive(AbstractCommand):
    """The write-up's sigmoid blend whose length depends on how similar the prompts are.

    ``L = lengths[0]`` steps if the similarity is at or above the first threshold, ``lengths[1]``
    above the second, else ``lengths[2]``; ``alpha = sigmoid(slope (j / L - 1/2))`` for
    ``j < L``, then exactly 1.

    Which similarity: the pooled *text* similarity when the switch is given one
    (``switch(..., similarity=)``: what a cache lookup measures), compared with
    ``text_thresholds``; otherwise the cosine of ``v_A`` and ``v_B`` at the cached state (one
    call for ``v_B``, one for ``v_A`` unless cached), compared with ``velocity_thresholds``. The
    two live on different scales -- on the embedded model paraphrases have a text similarity
    of ~0.98 while velocity cosines at k = 10 of 28 range over ~0.3-0.9 -- so each has its own
    thresholds (the velocity ones are the dev-split terciles measured by
    ``benchmarks/switch_quality.py``).
    """

    text_thresholds: tuple[float, float] = (0.95, 0.90)
    velocity_thresholds: tuple[float, float] = (0.87, 0.62)
    lengths: tuple[int, int, int] = (3, 5, 8)
    slope: float = 10.0
    mode: str = "velocity"

    def __check_init__(self):
        _check_thresholds("text_thresholds", tuple(self.text_thresholds))
        _check_thresholds("velocity_thresholds", tuple(self.velocity_thresholds))
        ls = tuple(self.lengths)
        if len(ls) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in ls):
            raise ValueError(f"lengths must be three ints >= 1, got {self.lengths!r}")
        if not self.slope > 0:
            raise ValueError(f"slope must be > 0, got {self.slope}")
        _check_mode(self.mode)

    def schedule(self, p: SwitchProblem) -> Schedule:
        if p.similarity is not None:
            sim = jnp.asarray(p.similarity, jnp.float32)
            hi, lo = self.text_thresholds
            cost = Cost()
        else:
            v_a, cost = p.velocity_a_at_switch()
            v_b = p.velocity(p.x, p.k, p.cond_b)
            sim = velocity_similarity(v_a, v_b)
            hi, lo = self.velocity_thresholds
            cost = cost + Cost(forwards=1)
        a, b, c = self.lengths
        length = jnp.where(sim >= hi, a, jnp.where(sim >= lo, b, c))
        alpha = alpha_sigmoid(p.num_steps, p.k, length, self.slope)
        return Schedule(alpha, sim, cost, self.mode, False)
