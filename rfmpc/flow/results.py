"""One outcome enumeration for everything that can fall back: controllers, the optimiser loop,
the inverse solvers.

:class:`RESULTS` plays the part of diffrax's ``RESULTS``: an outcome is an item of this one
``equinox.Enumeration``, decided inside the compiled graph (so a single call and a vmapped batch
take the same fallbacks and report the same codes), and ``throw=True`` ends in
``result.error_if(token, result != RESULTS.successful)``, a run-time error carrying the item's
message. Every outcome but ``successful`` is a *fallback* (the messages say what ran instead) but
``restoration_nonfinite``, an inverse solve that has no safe result to return.

Codes are stable: items are only ever appended. ``OUTCOMES[code]`` is an item's name.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array

__all__ = ["OUTCOMES", "RESULTS", "outcome", "outcome_code", "outcome_from_code"]


class RESULTS(eqx.Enumeration):
    """Outcome of a switch, a controlled step, an optimisation or an inverse solve. Messages say
    what ran instead (or, for ``restoration_nonfinite``, that nothing safe could)."""

    successful = ""
    # ---- prompt-switch controllers (rfmpc.control)
    plan_nonfinite = (
        "the shooting objective or its gradient became non-finite; the plan was discarded and "
        "the command (u = 0) ran instead"
    )
    plan_diverged = (
        "the shooting objective diverged (rose above divergence_ratio times its initial value); "
        "the plan was discarded and the command (u = 0) ran instead"
    )
    plan_control_too_large = (
        "the planned controls exceeded max_control; the plan was discarded and the command "
        "(u = 0) ran instead"
    )
    plan_control_nonfinite = (
        "the planned controls were non-finite; the plan was discarded and the command (u = 0) "
        "ran instead"
    )
    start_nonfinite = (
        "the controller's start state (re-projected or re-noised) was non-finite; the switch "
        "started from the cached state instead"
    )
    qp_not_converged = (
        "the MPC QP did not converge within its iteration cap; the command (u = 0) ran on that "
        "step (raise the solver's maxiter or loosen tol)"
    )
    control_nonfinite = (
        "the controller's control or linearisation was non-finite; the command (u = 0) ran on "
        "that step"
    )
    bound_violation = (
        "the MPC control left the box |u| <= u_max; the command (u = 0) ran on that step"
    )
    step_nonfinite = "a controlled step produced NaN/inf; the command's own step was taken instead"
    rollout_nonfinite = (
        "the controlled rollout ended non-finite; the plain command was re-run from the cached "
        "state and its result returned"
    )
    # ---- the shared optimisation loop (rfmpc.flow.optimise)
    optimiser_nonfinite = (
        "the objective, its gradient or an optimiser step became non-finite more often in a row "
        "than max_rejections allows; the optimisation stopped and its last accepted iterate "
        "(and its best one) were kept (wrap the optimiser in optax.apply_if_finite, lower the "
        "learning rate, or raise max_rejections)"
    )
    optimiser_diverged = (
        "the objective rose above its first value by more than divergence_ratio times that "
        "value's magnitude, more often in a row than max_rejections allows; the optimisation "
        "stopped and its last accepted iterate (and its best one) were kept (lower the learning "
        "rate)"
    )
    # ---- the inverse solvers (rfmpc.inverse)
    restoration_nonfinite = (
        "the restoration's final state or decoded image is non-finite: the prior's velocity "
        "field, the decoder or the operator returned NaN/inf (the inner optimiser's own "
        "non-finite steps are rejected and never reach the result), so there is no safe result; "
        "check the model at the noise levels the solver visits, or pass throw=False and read "
        "diagnostics['nonfinite'] for the images concerned"
    )


#: Outcome names in code order (``OUTCOMES[code]``).
OUTCOMES: tuple[str, ...] = tuple(RESULTS._name_to_item)


def outcome_code(item) -> Array:
    """The int32 code of a (possibly traced or stacked) :class:`RESULTS` item."""
    return jnp.asarray(item._value, jnp.int32)


def outcome_from_code(code) -> RESULTS:
    """The :class:`RESULTS` item (traced or stacked) with these int codes."""
    return eqx.tree_at(lambda r: r._value, RESULTS.successful, jnp.asarray(code, jnp.int32))


def outcome(code: int) -> RESULTS:
    """The concrete :class:`RESULTS` item of a Python int code."""
    return getattr(RESULTS, OUTCOMES[int(code)])
