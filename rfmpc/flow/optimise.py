"""One safeguarded optimisation loop, shared by the controllers and the inverse solvers.

:func:`minimise` runs any ``optax`` gradient transformation on a scalar objective inside one
``jax.lax.while_loop`` (jit-compatible and vmappable: a vmapped call runs each problem's own
stopping rule) and keeps everything it knows in the :class:`OptimiseState` ``NamedTuple``: the
next iterate, the last *accepted* one, the best one (with the objective's auxiliary output),
what it spent and the outcome as a :class:`~rfmpc.flow.results.RESULTS` item.

The safeguard, one rule with one meaning. Iteration ``i`` evaluates ``f(x_i)`` and ``g(x_i)``:

* the evaluation is **rejected** when ``f(x_i)`` is non-finite or has **diverged**::

      f(x_i) > f(x_0) + divergence_ratio * max(|f(x_0)|, tiny)

  (``x_0`` the starting point: the objective rose above its start by more than
  ``divergence_ratio`` times the start's magnitude; the offset form also means something for
  objectives that start at or below zero);
* an accepted evaluation's gradient goes to the optimiser; its **step is rejected** when the new
  iterate is non-finite (a line search that stepped into NaN, an overflowing update);
* a rejection puts the iterate back to the last accepted one and leaves the optimiser state as it
  was. A non-finite *gradient* at a finite value is the optimiser's business: wrap it in
  ``optax.apply_if_finite`` (what :func:`make_optimiser` does for first-order methods) and the
  update is skipped; unwrapped, it becomes a non-finite step, which is rejected.

Every iteration that made no progress for one of these reasons (a rejected evaluation, a
non-finite gradient, a rejected step) counts in ``num_rejected``. ``max_rejections`` says how
many of them *in a row* the caller tolerates: ``None`` (the inverse solvers) never stops for
them, ``0`` (shooting, whose plan is discarded on any fault) stops at the first, with the
outcome ``optimiser_nonfinite`` or ``optimiser_diverged`` by the last one's cause.

Early stop: with ``patience`` set, the loop stops (``converged``) once the relative improvement of
the accepted value, ``(f_prev - f) / max(|f_prev|, tiny)``, stayed below ``rtol`` for ``patience``
iterations in a row.

Counting (what callers turn into NFE/backprop counts): ``num_steps`` is the iterations run, each
one ``value_and_grad`` of the objective; ``num_evals`` the value-and-gradient evaluations
actually made. They are equal for first-order optimisers; for an optimiser with a line search
(its state carries ``value``/``grad``, e.g. ``optax.lbfgs``) the value and gradient at the
accepted point are reused from the line search (``optax.value_and_grad_from_state``), so
``num_evals`` is the first evaluation plus every line-search evaluation
(``num_linesearch_steps`` after each update).

References: optax's ``apply_if_finite`` and ``value_and_grad_from_state``; Nocedal & Wright,
*Numerical Optimization* (2006), ch. 3 (safeguarded steps).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int

from rfmpc.flow.results import RESULTS

__all__ = ["OPTIMISERS", "OptimiseState", "make_optimiser", "minimise"]

#: The optimiser names :func:`make_optimiser` builds.
OPTIMISERS = ("adam", "sgd", "lbfgs")


class OptimiseState(NamedTuple):
    """Everything :func:`minimise` keeps (batched under ``vmap``).

    Attributes:
        num_steps: iterations run (each one evaluation of ``value_and_grad``).
        params: the next iterate (after the last accepted step).
        opt_state: the optimiser's state.
        value: the objective at the last accepted evaluation (NaN before any).
        accepted: the last iterate whose evaluation was accepted (the start before any).
        best_params, best_value, best_aux: the accepted iterate with the lowest value, its value
            (``inf`` before any) and the objective's auxiliary output there (zeros before any;
            ``None`` without ``has_aux``).
        first_value: ``f(x_0)``, the reference of the divergence rule.
        num_evals: value-and-gradient evaluations made (line-search ones included).
        num_rejected: iterations that made no progress: a rejected evaluation (non-finite or
            diverged value), a non-finite gradient, or a rejected (non-finite) step.
        consecutive_rejected: the same, counted since the last clean iteration.
        stall: iterations in a row whose relative improvement was below ``rtol``.
        history: ``(max_steps,)`` the value of every evaluation, rejected ones included (NaN
            after the last).
        result: ``RESULTS.successful``, ``optimiser_nonfinite`` or ``optimiser_diverged``.
    """

    num_steps: Int[Array, ""]
    params: Any
    opt_state: Any
    value: Float[Array, ""]
    accepted: Any
    best_params: Any
    best_value: Float[Array, ""]
    best_aux: Any
    first_value: Float[Array, ""]
    num_evals: Int[Array, ""]
    num_rejected: Int[Array, ""]
    consecutive_rejected: Int[Array, ""]
    stall: Int[Array, ""]
    history: Float[Array, " max_steps"]
    result: RESULTS

    def converged(self, patience: int | None) -> Bool[Array, ""]:
        """Whether the loop stopped by its early-stop rule (``patience`` as passed)."""
        if patience is None:
            return jnp.zeros((), bool)
        return self.stall >= patience

    def final_params(self) -> Any:
        """The next iterate of a clean run, else the last accepted one: never a rejected point
        (what the inverse solvers return)."""
        bad = self.num_rejected > 0
        return jax.tree.map(lambda a, b: jnp.where(bad, a, b), self.accepted, self.params)


def make_optimiser(
    name: str = "adam",
    learning_rate: float = 1e-2,
    *,
    decay_steps: int | None = None,
    decay_alpha: float = 0.0,
    memory: int = 10,
    linesearch_steps: int = 10,
    max_consecutive_errors: int = 5,
) -> optax.GradientTransformationExtraArgs:
    """The default optimisers from plain arguments (the one place a name picks an optimiser).

    Args:
        name: ``"adam"``, ``"sgd"`` or ``"lbfgs"``.
        learning_rate: the (initial) step size of Adam / SGD; unused by L-BFGS, whose step is
            its zoom line search's.
        decay_steps: cosine-decay the learning rate over this many steps
            (``optax.cosine_decay_schedule(learning_rate, decay_steps, decay_alpha)``, i.e. down
            to ``decay_alpha * learning_rate``); ``None``: constant.
        decay_alpha: the final fraction of the decayed learning rate.
        memory, linesearch_steps: L-BFGS's memory and the most evaluations of one line search.
        max_consecutive_errors: Adam and SGD come wrapped in
            ``optax.apply_if_finite(..., max_consecutive_errors)`` (a non-finite gradient is
            skipped). L-BFGS is left unwrapped: a non-finite gradient gives a non-finite step,
            which :func:`minimise` rejects, and its line-search evaluations stay counted.
    """
    if name not in OPTIMISERS:
        raise ValueError(f"optimiser must be one of {OPTIMISERS}, got {name!r}")
    if name == "lbfgs":
        return optax.lbfgs(
            memory_size=memory,
            linesearch=optax.scale_by_zoom_linesearch(max_linesearch_steps=linesearch_steps),
        )
    lr = learning_rate
    if decay_steps is not None:
        lr = optax.cosine_decay_schedule(learning_rate, max(int(decay_steps), 1), decay_alpha)
    inner = optax.adam(lr) if name == "adam" else optax.sgd(lr)
    return optax.apply_if_finite(inner, max_consecutive_errors)


def _all_finite(tree) -> Bool[Array, ""]:
    leaves = [jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _select(pred, new, old):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def minimise(
    fn: Callable[[Any], Any],
    params: Any,
    optimiser: optax.GradientTransformation,
    *,
    max_steps: int,
    divergence_ratio: float = 1e3,
    rtol: float = 0.0,
    patience: int | None = None,
    max_rejections: int | None = None,
    has_aux: bool = False,
    throw: bool = False,
) -> OptimiseState:
    """Minimise the scalar ``fn(params)`` (``(value, aux)`` with ``has_aux``) with ``optimiser``.

    See the module docstring for the safeguard (one divergence rule), the early stop and the
    counts. Runs under ``jax.lax.while_loop``; no Python-side state, so it jits and vmaps.

    Args:
        fn: the objective; differentiable in ``params``.
        params: the start ``x_0`` (any pytree of float arrays).
        optimiser: an ``optax`` transformation (e.g. :func:`make_optimiser`, or any transformation
            wrapped in ``optax.apply_if_finite``). One with a line search (its state stores
            ``value`` and ``grad``) gets ``value=``, ``grad=`` and ``value_fn=`` in ``update``.
        max_steps: the most iterations (static int >= 1).
        divergence_ratio: the divergence rule's ratio (> 0).
        rtol, patience: early stop (``patience=None``: run to ``max_steps``).
        max_rejections: rejected iterations tolerated in a row (``None``: any number).
        has_aux: ``fn`` returns ``(value, aux)``; not with a line-search optimiser.
        throw: end in ``result.error_if(...)``: an unsuccessful outcome raises at run time.

    Returns:
        The final :class:`OptimiseState`.
    """
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}")
    if not divergence_ratio > 0:
        raise ValueError(f"divergence_ratio must be > 0, got {divergence_ratio}")
    for name, v in (("patience", patience), ("max_rejections", max_rejections)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"{name} must be None or an int >= 0, got {v!r}")
    opt = optax.with_extra_args_support(optimiser)
    opt_state0 = opt.init(params)
    line_search = optax.tree.get(opt_state0, "value") is not None
    if line_search and has_aux:
        raise TypeError(
            "has_aux=True needs a first-order optimiser: a line search (optax.lbfgs) evaluates "
            "the objective itself; drop the auxiliary output or use make_optimiser('adam', ...)"
        )

    value_fn = fn if not has_aux else (lambda p: fn(p)[0])
    if line_search:
        from_state = optax.value_and_grad_from_state(fn)

        def evaluate(p, st):
            v, g = from_state(p, state=st)
            return v, None, g

    else:
        vg = jax.value_and_grad(fn, has_aux=has_aux)

        def evaluate(p, st):
            out, g = vg(p)
            v, aux = out if has_aux else (out, None)
            return v, aux, g

    v_shape, aux_shape, _ = jax.eval_shape(evaluate, params, opt_state0)
    dtype = v_shape.dtype
    tiny = jnp.finfo(dtype).tiny
    zero_aux = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)

    def cond(s: OptimiseState):
        go = s.num_steps < max_steps
        if patience is not None:
            go = go & (s.stall < patience)
        if max_rejections is not None:
            go = go & (s.consecutive_rejected <= max_rejections)
        return go

    def body(s: OptimiseState):
        i = s.num_steps
        p, st = s.params, s.opt_state
        v, aux, g = evaluate(p, st)
        v_first = jnp.where(i == 0, v, s.first_value).astype(dtype)
        finite = jnp.isfinite(v)
        diverged = finite & (v > v_first + divergence_ratio * jnp.maximum(jnp.abs(v_first), tiny))
        ok = finite & ~diverged
        grad_ok = _all_finite(g)
        upd, st_new = opt.update(g, st, p, value=v, grad=g, value_fn=value_fn)
        p_new = optax.apply_updates(p, upd)
        step_ok = _all_finite(p_new)
        take = ok & step_ok
        accepted = _select(ok, p, s.accepted)
        clean = ok & grad_ok & step_ok
        # first evaluation plus each update's line search, or one evaluation an iteration
        if line_search:
            evals = s.num_evals + (i == 0) + optax.tree.get(st_new, "num_linesearch_steps")
        else:
            evals = s.num_evals + 1
        better = ok & (v < s.best_value)
        rel = (s.value - v) / jnp.maximum(jnp.abs(s.value), tiny)
        fault = RESULTS.where(diverged, RESULTS.optimiser_diverged, RESULTS.optimiser_nonfinite)
        result = RESULTS.where(clean, RESULTS.successful, fault)  # this iteration's
        return OptimiseState(
            num_steps=i + 1,
            params=_select(take, p_new, accepted),
            opt_state=_select(take, st_new, st),
            value=jnp.where(ok, v, s.value).astype(dtype),
            accepted=accepted,
            best_params=_select(better, p, s.best_params),
            best_value=jnp.where(better, v, s.best_value).astype(dtype),
            best_aux=_select(better, aux, s.best_aux),
            first_value=v_first,
            num_evals=jnp.asarray(evals, jnp.int32),
            num_rejected=s.num_rejected + (~clean).astype(jnp.int32),
            consecutive_rejected=jnp.where(clean, 0, s.consecutive_rejected + 1).astype(jnp.int32),
            stall=jnp.where(ok & (rel < rtol), s.stall + 1, 0).astype(jnp.int32),
            history=s.history.at[i].set(v.astype(dtype)),
            result=result,
        )

    nan = jnp.full((), jnp.nan, dtype)
    init = OptimiseState(
        num_steps=jnp.int32(0),
        params=params,
        opt_state=opt_state0,
        value=nan,
        accepted=params,
        best_params=params,
        best_value=jnp.full((), jnp.inf, dtype),
        best_aux=zero_aux,
        first_value=nan,
        num_evals=jnp.int32(0),
        num_rejected=jnp.int32(0),
        consecutive_rejected=jnp.int32(0),
        stall=jnp.int32(0),
        history=jnp.full((max_steps,), jnp.nan, dtype),
        result=RESULTS.successful,
    )
    out = jax.lax.while_loop(cond, body, init)
    # an outcome is a fault only when the loop stopped for it: tolerated rejections are counted
    # (num_rejected), not reported
    stopped = (
        jnp.zeros((), bool) if max_rejections is None else out.consecutive_rejected > max_rejections
    )
    result = RESULTS.where(stopped, out.result, RESULTS.successful)
    out = out._replace(result=result)
    if throw:
        out = result.error_if(out, result != RESULTS.successful)
    return out
