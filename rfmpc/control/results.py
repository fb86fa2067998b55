"""What a switch returns besides its latent: its outcome and an honest cost count.

:class:`RESULTS` is the project's one outcome enumeration, :class:`rfmpc.flow.results.RESULTS`
(re-exported here with its helpers): every controller reports its outcome as an item of it,
decided inside the compiled graph (so a single :func:`~rfmpc.control.switch` and a vmapped
:func:`~rfmpc.control.switch_batch` take the same fallbacks), and ``throw=True`` turns any
non-successful outcome into a run-time error through ``result.error_if``. Every outcome but
``successful`` is a *fallback*: the controller's output was discarded on a step (or for its whole
plan) and the plain command ran instead.

:class:`Cost` counts model evaluations by kind. A JVP or a VJP is not one forward pass: on the
models here a ``jax.jvp`` costs about 1.5-2.5 forwards and a ``jax.vjp`` 2-3 (measured by
``benchmarks/switch_quality.py``), so the counts stay separate and
:meth:`Cost.forward_equivalents` weighs them with ratios the caller measured.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from rfmpc.flow.results import OUTCOMES, RESULTS, outcome, outcome_code, outcome_from_code

__all__ = ["OUTCOMES", "RESULTS", "Cost", "outcome", "outcome_code", "outcome_from_code"]


def _as_int(v) -> Array:
    return jnp.asarray(v, jnp.int32)


class Cost(eqx.Module):
    """Model evaluations spent, by kind (int32 arrays; batched under ``vmap``).

    Attributes:
        forwards: velocity-field evaluations ``v(x, sigma, cond)`` (a CFG-guided field counts
            once: it is one batched call of the network).
        jvps: Jacobian-vector products (``jax.jvp`` / ``jax.linearize`` tangents), primal
            included.
        vjps: vector-Jacobian products (the backward passes of ``jax.grad``).
    """

    forwards: Int[Array, "*b"] = eqx.field(converter=_as_int, default=0)
    jvps: Int[Array, "*b"] = eqx.field(converter=_as_int, default=0)
    vjps: Int[Array, "*b"] = eqx.field(converter=_as_int, default=0)

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.forwards + other.forwards, self.jvps + other.jvps, self.vjps + other.vjps)

    def scale(self, n) -> Cost:
        """``n`` times this cost (``n`` may be traced, e.g. an iteration count)."""
        return Cost(self.forwards * n, self.jvps * n, self.vjps * n)

    def forward_equivalents(self, jvp: float, vjp: float) -> np.ndarray:
        """``forwards + jvp * jvps + vjp * vjps``, with ``jvp`` / ``vjp`` the *measured* cost of
        one JVP / VJP relative to one forward pass on the model at hand."""
        for name, v in (("jvp", jvp), ("vjp", vjp)):
            if not (np.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a measured cost ratio > 0, got {v!r}")
        return (
            np.asarray(self.forwards, np.float64)
            + jvp * np.asarray(self.jvps, np.float64)
            + vjp * np.asarray(self.vjps, np.float64)
        )

    def to_dict(self) -> dict:
        """Python ints (or lists for a batch): ``{"forwards", "jvps", "vjps"}``."""
        return {k: np.asarray(getattr(self, k)).tolist() for k in ("forwards", "jvps", "vjps")}
