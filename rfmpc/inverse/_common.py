"""Shared pieces of the inverse solvers: the problem, the result, rollouts and inner optimisers.

Every solver (MPC-Flow and the baselines) is an immutable :class:`AbstractInverseSolver` whose
``__call__(field, operator, y, noise_std, key, ...)`` is a pure, jit-compiled function returning
a :class:`RestoreResult` with the estimate, the exact number of velocity-model evaluations
(``nfe``) and of backward passes through the model (``backprops``), diagnostics, and the solve's
outcome as a :class:`~rfmpc.flow.results.RESULTS` item (``result``), decided inside the compiled
graph: ``RESULTS.restoration_nonfinite`` when the final state or image is non-finite, else the
first fallback the algorithm took (MPC-Flow: ``control_nonfinite``, a sampler step that ran
unguided) or an inner loop's unsuccessful outcome, else ``successful``. ``throw=True`` (the
default, as diffrax's) ends the compiled solve in ``result.error_if(...)``: an unsuccessful
outcome raises an equinox run-time error naming the solver and the outcome, the same way for a
single call, a call under the caller's ``jit`` and a ``vmap``-ped one; ``throw=False`` returns
the result and its outcome (per solve; per element under ``vmap``).

Counting convention: ``nfe`` counts forward calls of the velocity field the algorithm makes;
``backprops`` counts vector-Jacobian products through it. With ``checkpoint=True`` each backprop
also *recomputes* its forward (``jax.checkpoint``); those recomputations are not in ``nfe``.
Calls of the decoder and the operator are not counted.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from rfmpc.flow.fields import check_field
from rfmpc.flow.optimise import make_optimiser, minimise
from rfmpc.flow.results import RESULTS, outcome_code
from rfmpc.flow.solve import integrate_grid
from rfmpc.inverse.operators import AbstractOperator
from rfmpc.sharding import BatchShardedField, replicate, shard_batch

__all__ = [
    "AbstractInverseSolver",
    "CompiledSolve",
    "InnerSolver",
    "InverseProblem",
    "RestoreResult",
    "euler_rollout",
    "minimize",
    "minimize_counted",
]


class InverseProblem(eqx.Module):
    """``y = A(decode(x)) + n``, ``n ~ N(0, noise_std^2 I)``, with a flow prior on ``x``.

    ``field(x, sigma, cond)`` is the prior's velocity (sigma convention: 1 = noise, 0 = data);
    ``decode`` maps the model's state to the image the operator sees (identity for pixel-space
    models).
    """

    field: Callable[[Array, Array, Any], Array]
    operator: AbstractOperator
    y: Array
    noise_std: Float[Array, ""]
    cond: Any = None
    decode: Callable[[Array], Array] | None = None

    def velocity(self, x, sigma):
        return self.field(x, jnp.asarray(sigma, x.dtype), self.cond).astype(x.dtype)

    def image(self, x):
        return x if self.decode is None else self.decode(x)

    def residual(self, x):
        return self.operator(self.image(x)) - self.y

    def phi(self, x) -> Float[Array, " b"]:
        """Per-image data fit ``||A(decode(x)) - y||^2 / (2 noise_std^2)``."""
        r = self.residual(x)
        return 0.5 * jnp.sum(r**2, axis=tuple(range(1, r.ndim))) / self.noise_std**2

    def sq_residual(self, x) -> Float[Array, " b"]:
        """Per-image ``||A(decode(x)) - y||^2 / 2`` (the noise-free fidelity PnP methods use)."""
        r = self.residual(x)
        return 0.5 * jnp.sum(r**2, axis=tuple(range(1, r.ndim)))


class RestoreResult(eqx.Module):
    """A solver's output.

    Attributes:
        x: the final model state (latent) ``(b, ...)``.
        image: ``decode(x)`` (equal to ``x`` for pixel-space models).
        nfe: forward evaluations of the velocity field (all images together, one batched call
            counting once).
        backprops: backward passes through the velocity field.
        diagnostics: per-image arrays, e.g. ``data_fit`` (``Phi`` at the end), ``control_energy``,
            ``nonfinite`` (the image's final state or decoded image holds NaN/inf).
        result: the solve's outcome, a :class:`~rfmpc.flow.results.RESULTS` item (one per solve,
            i.e. for all images of the batch together, as diffrax's ``Solution.result``; per
            element under ``jax.vmap``): ``successful``, ``restoration_nonfinite`` (no safe
            result), or a fallback the algorithm took (see the module docstring).
    """

    x: Array
    image: Array
    nfe: Int[Array, ""]
    backprops: Int[Array, ""]
    diagnostics: dict[str, Array]
    result: RESULTS


class InnerSolver(eqx.Module):
    """The optimiser of an inner (sub-)problem, from plain arguments.

    ``optimizer="adam"``: ``iters`` Adam steps of learning rate ``lr`` (one value-and-grad each),
    wrapped in ``optax.apply_if_finite`` (a non-finite gradient is skipped).
    ``optimizer="lbfgs"``: ``iters`` L-BFGS iterations (memory ``memory``) with a zoom line
    search of at most ``linesearch_steps`` evaluations; the evaluations it actually spends are
    counted. Note that L-BFGS couples the images of a batch (one line search for the summed
    loss), while Adam is separable, i.e. exactly per image.
    ``divergence_ratio``: the shared loop's divergence rule (:mod:`rfmpc.flow.optimise`): an
    iterate whose loss exceeds the first one's by this factor times ``|loss_0|`` is rejected like
    a non-finite one (:func:`minimize`).
    Both are built by :func:`rfmpc.flow.optimise.make_optimiser` (:meth:`optimiser`) and run by
    :func:`rfmpc.flow.optimise.minimise`.
    """

    optimizer: str = eqx.field(static=True, default="adam")
    iters: int = eqx.field(static=True, default=10)
    lr: float = eqx.field(static=True, default=0.05)
    memory: int = eqx.field(static=True, default=10)
    linesearch_steps: int = eqx.field(static=True, default=10)
    divergence_ratio: float = eqx.field(static=True, default=1e3)

    def __check_init__(self):
        if self.optimizer not in ("adam", "lbfgs"):
            raise ValueError(f"optimizer must be 'adam' or 'lbfgs', got {self.optimizer!r}")
        if self.iters < 0:
            raise ValueError(f"iters must be >= 0, got {self.iters}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.divergence_ratio > 1:
            raise ValueError(f"divergence_ratio must be > 1, got {self.divergence_ratio}")

    def optimiser(self) -> optax.GradientTransformation:
        """The optax transformation these arguments describe."""
        return make_optimiser(
            self.optimizer, self.lr, memory=self.memory, linesearch_steps=self.linesearch_steps
        )


def minimize(
    loss: Callable[[Any], Array], params: Any, inner: InnerSolver
) -> tuple[Any, Int[Array, ""], Array]:
    """Minimise a scalar ``loss(params)``; returns ``(params, evaluations, last_value)``.

    ``evaluations`` counts calls of ``value_and_grad(loss)`` (each one forward and one backward
    pass of whatever ``loss`` contains; for L-BFGS every line-search evaluation). Runs the shared
    loop :func:`rfmpc.flow.optimise.minimise` (a ``lax.while_loop`` of ``inner.iters``
    iterations; jit-able). Safeguarded by its one rule: an iteration whose value is non-finite or
    exceeds the first value by ``inner.divergence_ratio`` times its magnitude (a diverging step
    size), or whose step is non-finite, is rejected -- the parameters go back to the last
    accepted iterate, the optimiser state is not updated -- and a non-finite gradient is skipped
    by ``apply_if_finite``; if any iteration was rejected the last accepted iterate is returned,
    so a NaN in the loss never reaches the returned parameters (the returned update of a fully
    finite run is, as before, the step after the last evaluation). :func:`minimize_counted` also
    returns how many iterations were rejected.
    """
    p, n, v, _, _ = minimize_counted(loss, params, inner)
    return p, n, v


def minimize_counted(
    loss: Callable[[Any], Array], params: Any, inner: InnerSolver
) -> tuple[Any, Int[Array, ""], Array, Int[Array, ""], RESULTS]:
    """:func:`minimize`, also returning the number of rejected (non-finite or diverged)
    iterations and the loop's outcome (:class:`~rfmpc.flow.results.RESULTS`; the inverse solvers
    tolerate any number of rejections, so it is ``successful`` unless the loop's rules change)."""
    if inner.iters == 0:
        return params, jnp.int32(0), loss(params), jnp.int32(0), RESULTS.successful
    st = minimise(
        loss,
        params,
        inner.optimiser(),
        max_steps=inner.iters,
        divergence_ratio=inner.divergence_ratio,
    )
    return st.final_params(), st.num_evals, st.value, st.num_rejected, st.result


class _NoCond(eqx.Module):
    """``v(x, sigma)`` as the flow core's ``v(x, sigma, cond)``."""

    velocity: Callable[[Array, Array], Array]

    def __call__(self, x, sigma, cond):
        return self.velocity(x, sigma)


def euler_rollout(
    velocity: Callable[[Array, Array], Array],
    x: Array,
    sigmas: Float[Array, " k_plus_1"],
    controls: Array | None = None,
    *,
    v0: Array | None = None,
    checkpoint: bool = True,
) -> Array:
    """Controlled Euler steps ``x <- x + (s_{j+1} - s_j) (v(x, s_j) + u_j)`` over ``sigmas``.

    The flow core's solve (:func:`rfmpc.flow.integrate_grid`, diffrax ``Euler`` on ``StepTo``)
    for a velocity without conditioning.

    Args:
        velocity: ``v(x, sigma)``.
        x: the state at ``sigmas[0]``.
        sigmas: the (possibly traced) grid of ``K + 1`` noise levels.
        controls: ``(K, *x.shape)`` per-step controls, or None.
        v0: the velocity at ``(x, sigmas[0])`` if already known: the first step then makes no
            model call (and nothing is differentiated through it).
        checkpoint: rematerialise each step once in the backward pass (diffrax's
            ``RecursiveCheckpointAdjoint`` with a checkpoint a step), so the memory of a gradient
            through ``K`` steps is ``O(K)`` states, not ``O(K)`` networks' activations;
            ``False``: no recomputation (see :func:`rfmpc.flow.integrate_grid`).

    Returns:
        The state at ``sigmas[-1]``. It makes ``K`` model calls (``K - 1`` with ``v0``).
    """
    k = sigmas.shape[0] - 1
    if controls is not None and controls.shape != (k, *x.shape):
        raise ValueError(f"controls must have shape {(k, *x.shape)}, got {controls.shape}")
    start = 0
    if v0 is not None:
        u0 = 0.0 if controls is None else controls[0]
        x = x + (sigmas[1] - sigmas[0]).astype(x.dtype) * (v0 + u0)
        start = 1
    if start == k:
        return x
    u = None if controls is None else controls[start:]
    return integrate_grid(_NoCond(velocity), x, sigmas[start:], control=u, checkpoint=checkpoint)


def _bcast(a: Array, like: Array) -> Array:
    """Append singleton axes to ``a`` so it broadcasts against ``like`` from the left."""
    return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))


def _per_image_sum(a: Array) -> Array:
    return jnp.sum(a, axis=tuple(range(1, a.ndim)))


def first_fault(*results: RESULTS) -> RESULTS:
    """The first of these (possibly traced) outcomes that is not ``successful``, else
    ``successful`` (how a solver combines its steps' and inner loops' outcomes)."""
    out = RESULTS.successful
    for r in reversed(results):
        out = RESULTS.where(r != RESULTS.successful, r, out)
    return out


def _error_if(res: RestoreResult, solver) -> RestoreResult:
    """``res.result.error_if(res.result, res.result != successful)``, the message prefixed with
    the solver's name.

    The check is threaded through the outcome, and every other output depends on the checked
    outcome through ``where(code < 0, 0, a)`` (never true at run time; a dependency neither JAX
    nor XLA removes): whichever output a caller's ``jit`` keeps (only ``x``, say), the check
    runs. Threading the arrays through the check itself (``eqx.error_if(res, ...)``) would do
    the same but makes XLA return them replicated on a mesh; the select keeps their shardings.
    """
    name = type(solver).__name__
    r = res.result
    # equinox keeps an Enumeration's messages in a private table; without it (a future equinox),
    # the plain error_if still raises the outcome's own message, only without the solver's name
    table = getattr(RESULTS, "_index_to_message", None)
    if table is None:
        checked = r.error_if(r, r != RESULTS.successful)
    else:
        msgs = [m and f"{name}: {m}" for m in table]
        checked = eqx.branched_error_if(r, r != RESULTS.successful, outcome_code(r), msgs)
    never = outcome_code(checked) < 0
    rest = jax.tree.map(lambda a: jnp.where(never, jnp.zeros_like(a), a), res)
    return eqx.tree_at(lambda t: t.result, rest, checked)


@eqx.filter_jit
def _run(solver, problem, key, shape, throw: bool):
    if not isinstance(key, jax.Array):  # a static, trace-time check
        raise TypeError(
            f"key must be a jax PRNG key, got {type(key).__name__}; pass jax.random.key(seed)"
        )
    res = solver._solve(problem, key, shape)
    return _error_if(res, solver) if throw else res


class AbstractInverseSolver(eqx.Module):
    """Base of every inverse solver: validates inputs, infers the state shape, jit-compiles.

    Subclasses implement ``_solve(problem, key, shape) -> RestoreResult`` as a pure function and
    state their hyper-parameters as static fields.
    """

    @abc.abstractmethod
    def _solve(self, problem: InverseProblem, key: PRNGKeyArray, shape: tuple) -> RestoreResult:
        """The algorithm (traced under jit)."""

    def _problem(self, field, operator, y, noise_std, cond, decode, shape):
        if not isinstance(operator, AbstractOperator):
            raise TypeError(
                f"operator must be an rfmpc.inverse AbstractOperator, got {type(operator)}"
            )
        if not callable(field):
            raise TypeError(f"field must be a velocity field v(x, sigma, cond), got {type(field)}")
        y = jnp.asarray(y)
        if not jnp.issubdtype(y.dtype, jnp.floating):
            raise TypeError(
                f"y must be a floating-point measurement in model units ([-1, 1] images), got "
                f"dtype {y.dtype}; for uint8 images pass y.astype(jnp.float32) / 127.5 - 1"
            )
        # numpy on the concrete value: jnp ops would be staged under an outer jit's trace
        if not isinstance(y, jax.core.Tracer) and not np.isfinite(np.asarray(y)).all():
            raise ValueError(
                "y contains NaN or inf; give finite measurements (mark missing pixels with an "
                "Inpainting operator's mask, not NaN)"
            )
        if not float(noise_std) > 0:
            raise ValueError(
                f"noise_std must be > 0 (the data fit divides by it), got {noise_std}; "
                "for noiseless data pass a small value such as 1e-3"
            )
        if shape is None:
            if decode is not None:
                raise ValueError("with decode= (a latent model) pass shape= of the latent batch")
            shape = operator.input_shape(y.shape)
        shape = tuple(int(s) for s in shape)
        if shape[0] != y.shape[0]:
            raise ValueError(f"shape={shape} and y={y.shape} disagree on the number of images")
        problem = InverseProblem(
            field, operator, y, jnp.asarray(noise_std, y.dtype), cond=cond, decode=decode
        )
        try:
            jax.eval_shape(problem.phi, jax.ShapeDtypeStruct(shape, y.dtype))
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"the operator cannot measure a state of shape {shape} against y of shape "
                f"{y.shape}: {e}"
            ) from e
        check_field(
            lambda z, sigma, cond: problem.velocity(z, sigma),
            jax.ShapeDtypeStruct(shape, y.dtype),
            jax.ShapeDtypeStruct((), y.dtype),
            what=f"a state of shape {shape} (from y of shape {y.shape})",
            fix="y must match the model's image size and channels (resize it), or pass shape= "
            "for a latent model",
            name="the prior's velocity field",
        )
        return problem, shape

    @staticmethod
    def _place(problem: InverseProblem, key, mesh):
        """Put ``problem`` and ``key`` on ``mesh``: the images of ``y`` and every model call split
        over ``"data"`` (:class:`rfmpc.sharding.BatchShardedField`), the rest replicated."""
        if mesh is None:
            return problem, key
        problem = InverseProblem(
            BatchShardedField(problem.field, mesh),
            problem.operator,
            shard_batch(problem.y, mesh),
            replicate(problem.noise_std, mesh),
            cond=replicate(problem.cond, mesh),
            decode=problem.decode,
        )
        return problem, replicate(key, mesh)

    def __call__(
        self,
        field: Callable[[Array, Array, Any], Array],
        operator: AbstractOperator,
        y: Array,
        noise_std: float,
        key: PRNGKeyArray,
        *,
        cond: Any = None,
        decode: Callable[[Array], Array] | None = None,
        shape: tuple[int, ...] | None = None,
        mesh: Any = None,
        throw: bool = True,
    ) -> RestoreResult:
        """Restore ``x`` from ``y = operator(decode(x)) + noise``.

        Args:
            field: the prior's velocity ``v(x, sigma, cond)``; pass the same object each call to
                reuse the compiled program.
            operator: the forward operator (acts on decoded images).
            y: the measurement batch (leading axis = images).
            noise_std: the measurement noise std (> 0), in the image's units.
            key: PRNG key (initial noise and any stochastic step).
            cond: the field's conditioning (e.g. an unconditional prompt embedding).
            decode: latent -> image for latent models; ``None`` for pixel-space models.
            shape: the model state's batch shape; required with ``decode``, otherwise inferred
                from the operator (``operator.input_shape(y.shape)``).
            mesh: a :func:`rfmpc.sharding.make_mesh` mesh (default None: one device): the images
                are split over its ``"data"`` axis (their number must be a multiple of its size,
                else ``ValueError``); ``cond`` is replicated; the field's parameters stay where
                they are (shard them with ``rfmpc.sharding.shard_params``).
            throw: end the compiled solve in ``result.error_if(...)`` (default, as diffrax): an
                unsuccessful outcome (e.g. ``RESULTS.restoration_nonfinite``: the prior returned
                NaN) raises an equinox run-time error naming the solver and the outcome, under
                the caller's ``jit``/``vmap`` too. ``False``: return the result with its
                ``result`` outcome and ``diagnostics["nonfinite"]`` per image instead.
        """
        problem, shape = self._problem(field, operator, y, noise_std, cond, decode, shape)
        problem, key = self._place(problem, key, mesh)
        return _run(self, problem, key, shape, bool(throw))

    def compile(
        self,
        field: Callable[[Array, Array, Any], Array],
        operator: AbstractOperator,
        y: Array,
        noise_std: float,
        key: PRNGKeyArray,
        *,
        cond: Any = None,
        decode: Callable[[Array], Array] | None = None,
        shape: tuple[int, ...] | None = None,
        mesh: Any = None,
        throw: bool = True,
    ) -> CompiledSolve:
        """Compile ahead of time (same arguments as calling the solver) for timing/memory."""
        problem, shape = self._problem(field, operator, y, noise_std, cond, decode, shape)
        problem, key = self._place(problem, key, mesh)
        throw = bool(throw)
        t0 = time.perf_counter()
        compiled = _run.lower(self, problem, key, shape, throw).compile()
        compile_s = time.perf_counter() - t0
        memory = {}
        try:
            ma = compiled.compiled.memory_analysis()
            for name in ("temp", "argument", "output", "generated_code"):
                memory[f"{name}_bytes"] = int(getattr(ma, f"{name}_size_in_bytes"))
        except Exception:  # memory analysis is optional on some backends
            memory = {}
        return CompiledSolve(
            compiled, (self, problem, key, shape, throw), compile_s, memory, mesh=mesh
        )


class CompiledSolve:
    """An ahead-of-time compiled solve: call it (no arguments) to run it.

    ``compile_s``: compilation seconds; ``memory``: XLA's static memory analysis of the program
    (``temp_bytes`` = the scratch it needs at peak, plus argument/output/code sizes), when the
    backend reports it (per device when compiled for a ``mesh``); ``mesh``: the mesh it runs on
    (None: one device).
    """

    def __init__(self, compiled, args, compile_s: float, memory: dict[str, int], mesh=None):
        self._compiled, self._args = compiled, args
        self.compile_s, self.memory, self.mesh = compile_s, memory, mesh

    def __call__(self) -> RestoreResult:
        return self._compiled(*self._args)


def _nonfinite(*arrays) -> Array:
    """Per image (leading axis): whether any of ``arrays`` holds NaN/inf there."""
    bad = [~jnp.all(jnp.isfinite(a.reshape(a.shape[0], -1)), axis=1) for a in arrays]
    return jnp.any(jnp.stack(bad), axis=0)


def result(
    problem: InverseProblem,
    x,
    nfe,
    backprops,
    *,
    outcome: RESULTS = RESULTS.successful,
    **diagnostics,
) -> RestoreResult:
    """Assemble a :class:`RestoreResult` with the final data fit and the per-image ``nonfinite``
    flags as diagnostics. Its ``result`` is ``RESULTS.restoration_nonfinite`` where the final
    state or image is non-finite, else ``outcome`` (the algorithm's own: a fallback it took, an
    inner loop's outcome)."""
    image = problem.image(x)
    bad = _nonfinite(x, image)
    diagnostics = {"data_fit": problem.phi(x), "nonfinite": bad, **diagnostics}
    return RestoreResult(
        x=x,
        image=image,
        nfe=jnp.asarray(nfe, jnp.int32),
        backprops=jnp.asarray(backprops, jnp.int32),
        diagnostics=diagnostics,
        result=first_fault(
            RESULTS.where(jnp.any(bad), RESULTS.restoration_nonfinite, RESULTS.successful),
            outcome,
        ),
    )
