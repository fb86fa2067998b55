"""Integrate the controlled flow ODE ``dx/dsigma = v(x, sigma, cond(sigma)) + u(sigma)``.

The solve is diffrax's ``Euler`` with ``StepTo`` on the (decreasing) FlowMatch sigma grid, so the
path is exactly diffusers' scheduler loop ``x <- x + (sigma_next - sigma) * (v + u)``; gradients
flow through it with diffrax's ``RecursiveCheckpointAdjoint`` (memory ~ sqrt(steps) states).

Pluggable pieces:

* ``cond``: a conditioning pytree, or a *schedule* ``cond(sigma, step) -> pytree`` (e.g. a blend
  of two prompts' embeddings with a weight that depends on the step).
* ``control``: ``None``; an array of per-step controls of shape ``(stop - start, *x.shape)`` held
  constant on each step (what shooting optimises); or a feedback law ``u(x, sigma, step)`` such as
  an MPC policy. Controls are added to the velocity in units of ``dx/dsigma``.
* ``progress_meter``: a ``diffrax.AbstractProgressMeter`` (``TqdmProgressMeter()``,
  ``TextProgressMeter()``; default ``NoProgressMeter()``) handed to ``diffrax.diffeqsolve``. Its
  state lives in the solve (host callbacks keyed by a per-solve index), so concurrent solves
  with their own meters never share a bar, and the path is bit-identical with or without one.
  Its progress is the fraction of the sigma interval ``sigmas[start] .. sigmas[stop]`` done.

Steps are indices into the grid: step ``i`` goes from ``sigmas[i]`` to ``sigmas[i + 1]``.
``start``/``stop`` are Python ints (static: one compilation per (start, stop, shape)).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from rfmpc.flow.fields import check_field
from rfmpc.flow.schedule import validate_sigmas
from rfmpc.flow.state import TrajectoryState

__all__ = [
    "PiecewiseConstantControl",
    "euler_reference",
    "integrate",
    "integrate_grid",
    "integrate_path",
]


class PiecewiseConstantControl(eqx.Module):
    """Controls ``values[i - first_step]`` held constant over step ``i`` (``first_step`` static)."""

    values: Array
    first_step: int = eqx.field(static=True, default=0)

    def __call__(self, x: Array, sigma: Array, step: Int[Array, ""]) -> Array:
        idx = jnp.clip(step - self.first_step, 0, self.values.shape[0] - 1)
        return self.values[idx]


def _step_index(sigmas: Array, t: Array) -> Array:
    """Index ``i`` with ``sigmas[i] == t`` (the step that starts at ``t``)."""
    return jnp.argmin(jnp.abs(sigmas[:-1] - t)).astype(jnp.int32)


def _resolve(state_or_x, sigmas, cond, start, stop, key):
    if isinstance(state_or_x, TrajectoryState):
        st = state_or_x
        if sigmas is not None and not np.array_equal(np.asarray(sigmas), np.asarray(st.sigmas)):
            raise ValueError(
                "sigmas differs from the state's own grid; a state can only be resumed on the grid "
                "it was started on (omit sigmas=)"
            )
        sigmas = st.sigmas
        if start is None:
            try:
                start = int(st.step)
            except jax.errors.ConcretizationTypeError as e:
                raise ValueError(
                    "state.step is traced (integrate was called under jit); pass start= as a "
                    "Python int"
                ) from e
        elif start != int(st.step):
            raise ValueError(f"start={start} but the state is at step {int(st.step)}")
        x = st.x
        cond = st.cond if cond is None else cond
        key = st.key if key is None else key
        meta = st.meta
    else:
        if sigmas is None:
            raise ValueError("integrate(field, x, sigmas, ...) needs sigmas when given an array")
        x = jnp.asarray(state_or_x)
        start = 0 if start is None else start
        meta = ()
    _validate_x(x)
    sig = validate_sigmas(sigmas) if not isinstance(sigmas, jax.core.Tracer) else sigmas
    n = int(np.shape(sig)[0]) - 1
    stop = n if stop is None else stop
    for name, v in (("start", start), ("stop", stop)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be a Python int, got {type(v).__name__}")
    if not 0 <= start <= n:
        raise ValueError(f"start={start} is out of range: the grid has steps 0..{n}")
    if not start <= stop <= n:
        raise ValueError(
            f"stop={stop} is out of range: it must satisfy start={start} <= stop <= {n}"
        )
    return x, jnp.asarray(sigmas), cond, int(start), int(stop), key, meta


def _validate_x(x) -> None:
    """A float latent, finite when concrete (a traced ``x`` under an outer jit is not checked)."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"x must be a floating-point latent, got dtype {x.dtype}; convert it with "
            "x.astype(jnp.float32)"
        )
    # numpy on the concrete value: jnp ops here would be staged when an outer jit is tracing
    if not isinstance(x, jax.core.Tracer) and not np.isfinite(np.asarray(x)).all():
        raise ValueError(
            f"x (shape {x.shape}) contains NaN or inf; start from finite noise, e.g. "
            "jax.random.normal(key, shape)"
        )


def _make_control(control, start, stop, x):
    if control is None or callable(control):
        return control
    values = jnp.asarray(control)
    want = (stop - start, *x.shape)
    if values.shape != want:
        raise ValueError(
            f"control array has shape {values.shape}; expected (stop - start, *x.shape) = {want}"
        )
    return PiecewiseConstantControl(values, first_step=start)


def _check_field(field, x, sigmas, cond, start):
    c = cond(sigmas[start], jnp.int32(start)) if callable(cond) else cond
    check_field(
        field,
        x,
        sigmas[start],
        c,
        what=f"x of shape {tuple(x.shape)}",
        fix="the state and the field do not match (wrong latent size/channels for this model?)",
    )


def _check_meter(progress_meter) -> diffrax.AbstractProgressMeter:
    if not isinstance(progress_meter, diffrax.AbstractProgressMeter):
        raise TypeError(
            "progress_meter must be a diffrax.AbstractProgressMeter, got "
            f"{type(progress_meter).__name__}; pass diffrax.TqdmProgressMeter(), "
            "diffrax.TextProgressMeter() or diffrax.NoProgressMeter()"
        )
    return progress_meter


def _term(field, sigmas, cond, control) -> diffrax.ODETerm:
    """The controlled vector field ``v(x, sigma, cond(sigma, step)) + u(x, sigma, step)``."""

    def vf(t, y, args):
        i = _step_index(sigmas, t)
        c = cond(t, i) if callable(cond) else cond
        v = field(y, t, c)
        if control is not None:
            v = v + control(y, t, i)
        return v.astype(y.dtype)

    return diffrax.ODETerm(vf)


@eqx.filter_jit
def _solve(
    field, x, sigmas, cond, control, start, stop, save_path, adjoint, progress_meter, solver=None
):
    # checked while tracing, i.e. once per compiled program, not on every call (an eager
    # eval_shape here cost a re-trace of the whole model per integrate call)
    _check_field(field, x, sigmas, cond, start)
    ts = sigmas[start : stop + 1]
    saveat = diffrax.SaveAt(t0=True, steps=True) if save_path else diffrax.SaveAt(t1=True)
    sol = diffrax.diffeqsolve(
        _term(field, sigmas, cond, control),
        diffrax.Euler() if solver is None else solver,
        t0=ts[0],
        t1=ts[-1],
        dt0=None,
        y0=x,
        stepsize_controller=diffrax.StepTo(ts=ts),
        saveat=saveat,
        adjoint=adjoint,
        max_steps=stop - start,
        progress_meter=progress_meter,
    )
    return sol.ys


def _scan_solve(field, x, sigmas, cond, control, solver):
    """The same term and solver step as :func:`_solve`, driven by a ``lax.scan`` over the grid:
    reverse-mode differentiation keeps every step's residuals and re-runs nothing (diffrax's own
    loops re-run steps in the backward pass)."""
    _check_field(field, x, sigmas, cond, 0)
    term = _term(field, sigmas, cond, control)

    def step(carry, t):
        y, state = carry
        y, _, _, state, _ = solver.step(term, t[0], t[1], y, None, state, False)
        return (y, state), None

    state = solver.init(term, sigmas[0], sigmas[1], x, None)
    (y, _), _ = jax.lax.scan(step, (x, state), (sigmas[:-1], sigmas[1:]))
    return y


def _run(field, state_or_x, sigmas, cond, control, start, stop, key, adjoint, meter, save_path):
    """Shared body of :func:`integrate` / :func:`integrate_path`: ``(final_state, xs | None)``."""
    meter = _check_meter(meter)
    x, sig, cond, start, stop, key, meta = _resolve(state_or_x, sigmas, cond, start, stop, key)
    ctrl = _make_control(control, start, stop, x)
    state_cond = cond if not callable(cond) else getattr(state_or_x, "cond", None)
    if stop == start:
        st = TrajectoryState(x=x, step=stop, sigmas=sig, key=key, cond=state_cond, meta=meta)
        return st, x[None]
    adjoint = diffrax.RecursiveCheckpointAdjoint() if adjoint is None else adjoint
    ys = _solve(field, x, sig, cond, ctrl, start, stop, save_path, adjoint, meter)
    st = TrajectoryState(x=ys[-1], step=stop, sigmas=sig, key=key, cond=state_cond, meta=meta)
    return st, ys


def integrate(
    field: Callable[[Array, Array, Any], Array],
    state_or_x: TrajectoryState | Array,
    sigmas: Float[Array, " n_plus_1"] | None = None,
    cond: Any = None,
    *,
    control: Any = None,
    start: int | None = None,
    stop: int | None = None,
    key: Any = None,
    adjoint: diffrax.AbstractAdjoint | None = None,
    progress_meter: diffrax.AbstractProgressMeter = diffrax.NoProgressMeter(),
) -> TrajectoryState:
    """Run Euler steps ``start .. stop - 1`` of the controlled ODE and return the new state.

    Args:
        field: a velocity field ``v(x, sigma, cond)``. Pass a stable object (a function defined
            once, or an ``equinox.Module``) to avoid recompiling on every call.
        state_or_x: a :class:`TrajectoryState` to resume (its grid, step, key and cond are used), or
            a latent ``x`` at ``sigmas[start]``.
        sigmas: the grid (required with an array; must equal the state's grid otherwise).
        cond: conditioning pytree or schedule ``cond(sigma, step)``; default: the state's cond.
        control: None, a per-step array ``(stop - start, *x.shape)``, or ``u(x, sigma, step)``.
        start: first step (default: the state's step, or 0). Python int.
        stop: one past the last step (default: the end of the grid). Python int.
        key: PRNG key stored in the returned state (default: the state's key).
        adjoint: diffrax adjoint (default ``RecursiveCheckpointAdjoint()``; exact gradients).
        progress_meter: a ``diffrax.AbstractProgressMeter`` shown over this solve's steps
            (default ``diffrax.NoProgressMeter()``; ``diffrax.TqdmProgressMeter(refresh_steps=1)``
            for a tqdm bar). Each solve opens and closes its own meter; the latents do not
            depend on it. Works under ``jit``/``vmap`` (diffrax drives it with host callbacks).

    Returns:
        The :class:`TrajectoryState` at step ``stop`` (if ``cond`` was a schedule, the returned
        state keeps the input state's cond).
    """
    return _run(
        field, state_or_x, sigmas, cond, control, start, stop, key, adjoint, progress_meter, False
    )[0]


def integrate_path(
    field: Callable[[Array, Array, Any], Array],
    state_or_x: TrajectoryState | Array,
    sigmas: Float[Array, " n_plus_1"] | None = None,
    cond: Any = None,
    *,
    control: Any = None,
    start: int | None = None,
    stop: int | None = None,
    key: Any = None,
    adjoint: diffrax.AbstractAdjoint | None = None,
    progress_meter: diffrax.AbstractProgressMeter = diffrax.NoProgressMeter(),
) -> tuple[TrajectoryState, Array]:
    """Like :func:`integrate` (same arguments), also returning every state ``x_start .. x_stop``.

    Returns:
        ``(final_state, xs)`` with ``xs`` of shape ``(stop - start + 1, *x.shape)``;
        ``xs[j]`` is the latent at step ``start + j`` (``xs[-1]`` is bit-identical to the final
        state's ``x``).
    """
    return _run(
        field, state_or_x, sigmas, cond, control, start, stop, key, adjoint, progress_meter, True
    )


def integrate_grid(
    field: Callable[[Array, Array, Any], Array],
    x: Array,
    sigmas: Float[Array, " k_plus_1"],
    cond: Any = None,
    *,
    control: Array | None = None,
    checkpoint: bool = True,
    solver: diffrax.AbstractSolver = diffrax.Euler(),
) -> Array:
    """The solve of :func:`integrate` on a bare grid: ``x`` at ``sigmas[0]`` to ``sigmas[-1]``.

    For solvers that own no :class:`TrajectoryState`: the grid may be traced (built inside the
    caller's ``jit``, e.g. a receding-horizon sub-problem's) and may run either way (an
    increasing grid integrates towards noise, the inversion of the ODE); it is not validated.
    The same controlled term as :func:`integrate`. With the default ``diffrax.Euler()`` it is
    the scheduler's ``x <- x + (s_next - s) (v + u)``, one field call a step; another fixed-step
    diffrax solver takes its own number of calls a step (``diffrax.Midpoint()``: two,
    ``x <- x + h v(x + (h/2) v(x, s), s + h/2)``).

    Args:
        field: ``v(x, sigma, cond)``.
        x: the state at ``sigmas[0]``.
        sigmas: the ``K + 1`` grid nodes (``K >= 1``).
        cond: the field's conditioning pytree.
        control: ``(K, *x.shape)`` per-step controls or None (constant over each step, so also
            at a solver's inner stages).
        checkpoint: ``True``: ``diffeqsolve`` with ``RecursiveCheckpointAdjoint`` and a
            checkpoint a step (a gradient keeps ``K`` states and re-runs each step once);
            ``False``: the steps under a ``lax.scan`` (a gradient keeps every step's
            residuals and re-runs none).
        solver: a fixed-step diffrax solver (the steps are the grid's, no error control).

    Returns:
        The state at ``sigmas[-1]``.
    """
    if not isinstance(solver, diffrax.AbstractSolver):
        raise TypeError(
            f"solver must be a diffrax.AbstractSolver, got {type(solver).__name__}; pass e.g. "
            "diffrax.Euler() or diffrax.Midpoint()"
        )
    k = int(np.shape(sigmas)[0]) - 1
    if k < 1:
        raise ValueError(f"sigmas must have at least 2 nodes, got shape {np.shape(sigmas)}")
    ctrl = _make_control(control, 0, k, x)
    sigmas = jnp.asarray(sigmas)
    if not checkpoint:
        return _scan_solve(field, x, sigmas, cond, ctrl, solver)
    adjoint = diffrax.RecursiveCheckpointAdjoint(checkpoints=k)
    meter = diffrax.NoProgressMeter()
    return _solve(field, x, sigmas, cond, ctrl, 0, k, False, adjoint, meter, solver)[-1]


def euler_reference(
    field, x, sigmas, cond=None, *, start: int = 0, stop: int | None = None, control=None
) -> Array:
    """A plain Python loop ``x <- x + (sigma_next - sigma) * (v + u)``: the diffusers scheduler.

    Not jitted and not fast: it is the oracle the diffrax path is tested against.
    """
    stop = int(np.shape(sigmas)[0]) - 1 if stop is None else stop
    for i in range(start, stop):
        s, s_next = sigmas[i], sigmas[i + 1]
        c = cond(s, jnp.int32(i)) if callable(cond) else cond
        v = field(x, s, c)
        if control is not None:
            v = v + (control(x, s, jnp.int32(i)) if callable(control) else control[i - start])
        x = x + (s_next - s) * v.astype(x.dtype)
    return x
