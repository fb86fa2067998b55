"""Image restoration with a model as the prior: the pipeline layer between a model and the
inverse solvers of :mod:`rfmpc.inverse`.

:class:`Prior` is what a solver needs from a model (velocity field, unconditional conditioning,
image shape, latent decoder); :func:`prior_from_pipeline` adapts an :class:`rfmpc.pipeline.Pipeline`
to it and :func:`provide_prior` names the priors the command line and the benchmarks offer.
:func:`restore` measures one ground truth ``y = A(truth) + noise`` with a task's operator, restores
it with a registered method and scores it; :func:`restore_files` does the same with the truth read
from a PNG and a result strip written to one (PNG files through :mod:`rfmpc.viz`).
:func:`procedural_prior`, :func:`heldout_images` and :func:`render_prompt` render :mod:`rfmpc.data`
scenes for it: they live here, not in ``rfmpc.inverse.priors``, so that :mod:`rfmpc.inverse` imports
neither the data package, nor this module, the models or the pipeline. The argparse front end is
:mod:`rfmpc.cli.restore`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from jaxtyping import Array, Float

if TYPE_CHECKING:
    from rfmpc.inverse.priors import IsotropicMixtureField

__all__ = [
    "DEFAULT_NOISE",
    "PRIORS",
    "Prior",
    "Restoration",
    "check_mmse",
    "check_restore_args",
    "heldout_images",
    "outcome_message",
    "prior_from_pipeline",
    "procedural_prior",
    "provide_prior",
    "render_prompt",
    "restore",
    "restore_files",
]

#: Measurement noise std per task, in model units ([-1, 1] images).
DEFAULT_NOISE = {
    "inpaint-box": 0.05,
    "inpaint-random": 0.05,
    "deblur": 0.05,
    "sr2": 0.05,
    "sr4": 0.05,
    "denoise": 0.2,
    "nonlinear-deblur": 0.05,
}


@dataclasses.dataclass(frozen=True)
class Prior:
    """What a solver needs from a model.

    ``field(x, sigma, cond)``: the velocity; ``cond``: the unconditional conditioning for one
    image (:meth:`cond_for` broadcasts it to a batch); ``image_shape``: ``(h, w, c)`` of images in
    model space ``[-1, 1]``; ``decode``/``latent_shape``: latent -> model-space image for latent
    models (``None`` for pixel-space ones).
    """

    name: str
    field: Callable[[Any, Any, Any], Any]
    image_shape: tuple[int, int, int]
    cond: Any = None
    decode: Callable[[Any], Any] | None = None
    latent_shape: tuple[int, ...] | None = None

    def cond_for(self, batch: int) -> Any:
        """``cond`` with its leading (batch) axis broadcast to ``batch``."""
        import jax
        import jax.numpy as jnp

        if self.cond is None:
            return None
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (batch, *a.shape[1:])), self.cond)

    def state_shape(self, batch: int) -> tuple[int, ...] | None:
        """The solver's ``shape=`` argument: the latent batch shape, or None (pixel space)."""
        return None if self.latent_shape is None else (batch, *self.latent_shape)


def prior_from_pipeline(pipe, name: str | None = None) -> Prior:
    """Adapt an :class:`rfmpc.pipeline.Pipeline` to a :class:`Prior` (unconditional).

    Uses ``pipe.field``, the empty prompt's conditioning ``pipe.encode_prompt("")[0]``,
    ``pipe.default_size``, ``pipe.latent_shape`` and ``pipe.decode`` (which returns ``[0, 1]``
    images; mapped to model space ``[-1, 1]`` here). Pixel-space pipelines (latent = image) get
    ``decode=None``.
    """
    h, w = (int(s) for s in pipe.default_size)
    cond, _ = pipe.encode_prompt("")
    latent = tuple(int(s) for s in pipe.latent_shape(1, h, w)[1:])
    pixel = latent == (h, w, 3)
    decode = None if pixel else (lambda z: 2.0 * pipe.decode(z) - 1.0)
    return Prior(
        name=name or f"{pipe.model_id} (unconditional)",
        field=pipe.field,
        image_shape=(h, w, 3),
        cond=cond,
        decode=decode,
        latent_shape=None if pixel else latent,
    )


# ----------------------------------------------------------------------------- procedural images
def _to_model(img01: np.ndarray) -> np.ndarray:
    return (2.0 * np.asarray(img01, np.float32) - 1.0).astype(np.float32)


def procedural_prior(
    num_components: int = 256, resolution: int = 32, tau: float = 0.1, seed: int = 0
) -> IsotropicMixtureField:
    """A mixture over ``num_components`` rendered *training-split* scenes (model space [-1, 1]):
    the exact :class:`rfmpc.inverse.IsotropicMixtureField` the ``gmm`` prior uses."""
    from rfmpc.data import render, sample_split_scene
    from rfmpc.inverse.priors import IsotropicMixtureField

    rng = np.random.default_rng(seed)
    imgs = [
        render(sample_split_scene(rng, "train"), resolution=resolution)
        for _ in range(num_components)
    ]
    return IsotropicMixtureField(_to_model(np.stack(imgs)), tau)


def heldout_images(n: int, resolution: int = 32, seed: int = 1) -> Float[Array, "n h w 3"]:
    """``n`` rendered *held-out-split* scenes in model space ``[-1, 1]`` (ground truths)."""
    import jax.numpy as jnp

    from rfmpc.data import render, sample_split_scene

    rng = np.random.default_rng(seed)
    imgs = [render(sample_split_scene(rng, "heldout"), resolution=resolution) for _ in range(n)]
    return jnp.asarray(_to_model(np.stack(imgs)))


def render_prompt(prompt: str, resolution: int = 32) -> Float[Array, "1 h w 3"]:
    """The ground-truth image of a grammar prompt (``rfmpc.data``), model space, batch of 1."""
    import jax.numpy as jnp

    from rfmpc.data.grammar import parse_prompt
    from rfmpc.data.render import render

    return jnp.asarray(_to_model(render(parse_prompt(prompt), resolution=resolution))[None])


#: Priors :func:`provide_prior` knows.
PRIORS = ("embedded", "gmm")


def provide_prior(name: str = "embedded") -> Prior:
    """The prior called ``name`` (see :data:`PRIORS`).

    ``"embedded"``: the embedded default model, ``rfmpc.pipeline.load_pipeline(None)``.
    ``"gmm"``: the exact isotropic Gaussian mixture over 256 rendered training-split scenes at
    32x32 (:func:`procedural_prior`); needs no trained weights.
    Any other model: build its pipeline and adapt it with :func:`prior_from_pipeline`.
    """
    if name == "gmm":
        f = procedural_prior()
        return Prior(
            name="gmm (isotropic mixture of 256 procedural scenes, tau 0.1)",
            field=f,
            image_shape=f.image_shape,
        )
    if name == "embedded":
        from rfmpc.pipeline import load_pipeline

        return prior_from_pipeline(load_pipeline(None))
    raise ValueError(
        f"unknown prior {name!r}; choose one of {list(PRIORS)}, or adapt your own pipeline "
        "with rfmpc.restore.prior_from_pipeline"
    )


@dataclasses.dataclass(frozen=True)
class Restoration:
    """The outcome of :func:`restore`.

    ``record``: the JSON-ready metrics (task, method, psnr_db, ssim, wall_s, nfe, backprops,
    peak_mem_bytes, ..., and ``result``, the solve's outcome as a
    :class:`~rfmpc.flow.results.RESULTS` name); ``measurement``, ``estimate``, ``truth``:
    ``(h, w, 3)`` images in ``[0, 1]`` (the measurement as the operator displays it at full
    size).
    """

    record: dict
    measurement: np.ndarray
    estimate: np.ndarray
    truth: np.ndarray

    @property
    def panels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(measurement, estimate, truth)``, the order of the command line's PNG strip."""
        return self.measurement, self.estimate, self.truth

    @property
    def result(self) -> str:
        """The solve's outcome, a :class:`~rfmpc.flow.results.RESULTS` name (``"successful"``)."""
        return self.record["result"]


def check_restore_args(task: str, method: str, noise: float | None) -> None:
    """Raise ``ValueError`` naming the problem if ``task``, ``method`` or ``noise`` is invalid."""
    from rfmpc.inverse.operators import TASKS
    from rfmpc.inverse.registry import METHODS

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if noise is not None and not noise > 0:
        raise ValueError(f"--noise must be > 0, got {noise}")


def check_mmse(method: str, mmse_samples: int) -> None:
    """Raise ``ValueError`` if ``mmse_samples`` is not an int >= 1, or is > 1 for a method that
    has no MMSE output (only the MPC-Flow methods average samples)."""
    if isinstance(mmse_samples, bool) or not isinstance(mmse_samples, int) or mmse_samples < 1:
        raise ValueError(
            f"mmse_samples (--mmse) must be an int >= 1 (1: one sample), got {mmse_samples!r}"
        )
    if mmse_samples > 1 and not method.startswith("mpc-"):
        raise ValueError(
            f"mmse_samples (--mmse) = {mmse_samples} applies to the MPC-Flow methods (mpc-k1, "
            f"mpc-rhc, mpc-dt), not to {method!r}: drop --mmse or pick an mpc-* method"
        )


def restore(
    prior: Prior,
    *,
    task: str,
    method: str,
    truth=None,
    prompt: str | None = None,
    noise: float | None = None,
    seed: int = 0,
    source: str | None = None,
    mmse_samples: int = 1,
) -> Restoration:
    """Restore one ground truth with ``method`` on ``task`` and score it.

    The truth is ``truth`` (a ``(1, h, w, 3)`` array in model space ``[-1, 1]`` at the prior's
    resolution), or the scene :mod:`rfmpc.data` renders for ``prompt``, or (neither) a held-out
    procedural scene drawn from ``seed``; ``source`` names it in the record. The measurement is
    ``y = A(truth) + noise`` with the task's operator (noise std ``noise``, default
    :data:`DEFAULT_NOISE`). Inverse problems use the *unconditional* prior: the prompt only
    renders the truth, it does not condition the model (that would leak the answer).
    ``wall_s`` is the solve alone (pre-compiled; ``compile_s`` is reported apart).
    ``mmse_samples = m > 1`` (MPC-Flow methods only) returns the average of ``m`` independent
    MPC-Flow samples, an estimate of the posterior mean (``m`` times the cost of one).
    The solve runs with ``throw=False``: an unsuccessful outcome (e.g.
    ``restoration_nonfinite``) does not raise here but is reported as ``record["result"]``
    (:func:`outcome_message` explains it); the command line exits non-zero on it.
    """
    import jax
    import jax.numpy as jnp

    from rfmpc.flow.results import OUTCOMES, outcome_code
    from rfmpc.inverse.operators import add_noise, make_operator
    from rfmpc.inverse.registry import make_solver
    from rfmpc.metrics import peak_memory, psnr, ssim, to_unit

    check_restore_args(task, method, noise)
    check_mmse(method, mmse_samples)
    if truth is not None and prompt is not None:
        raise ValueError("give the ground truth as truth= or as prompt=, not both")
    h = prior.image_shape[0]
    if truth is not None:
        truth = jnp.asarray(truth, jnp.float32)
        if truth.shape != (1, *prior.image_shape):
            raise ValueError(
                f"truth has shape {truth.shape}; the prior works on {(1, *prior.image_shape)} "
                "(one NHWC image in [-1, 1]): resize or crop it first"
            )
        source = source or "given image"
    elif prompt is not None:
        truth, source = render_prompt(prompt, resolution=h), source or f"prompt: {prompt}"
    else:
        truth, source = heldout_images(1, resolution=h, seed=seed), source or "held-out scene"
    noise = DEFAULT_NOISE[task] if noise is None else float(noise)
    k_op, k_noise, k_solve = jax.random.split(jax.random.key(seed), 3)
    op = make_operator(task, prior.image_shape, k_op)
    y = add_noise(k_noise, op(truth), noise)
    options = {} if mmse_samples == 1 else {"mmse_samples": mmse_samples}
    compiled = make_solver(method, **options).compile(
        prior.field,
        op,
        y,
        noise,
        k_solve,
        cond=prior.cond_for(1),
        decode=prior.decode,
        shape=prior.state_shape(1),
        throw=False,
    )
    t0 = time.perf_counter()
    res = jax.block_until_ready(compiled())
    wall = time.perf_counter() - t0
    est, ref = to_unit(res.image), to_unit(truth)
    mem, mem_src = peak_memory()
    record = {
        "task": task,
        "method": method,
        "psnr_db": float(psnr(est, ref)[0]),
        "ssim": float(ssim(est, ref)[0]),
        "wall_s": wall,
        "compile_s": compiled.compile_s,
        "nfe": int(res.nfe),
        "backprops": int(res.backprops),
        "peak_mem_bytes": mem,
        "peak_mem_source": mem_src,
        "compiled_temp_bytes": compiled.memory.get("temp_bytes"),
        "noise": noise,
        "seed": seed,
        "mmse_samples": mmse_samples,
        "prior": prior.name,
        "truth": source,
        "device": str(jax.devices()[0]),
        "result": OUTCOMES[int(outcome_code(res.result))],
    }
    return Restoration(
        record=record,
        measurement=np.asarray(to_unit(op.display(y))[0]),
        estimate=np.asarray(est[0]),
        truth=np.asarray(ref[0]),
    )


def outcome_message(name: str) -> str:
    """What the outcome called ``name`` (a ``record["result"]``) means: its
    :class:`~rfmpc.flow.results.RESULTS` message (empty for ``"successful"``)."""
    from rfmpc.flow.results import OUTCOMES, RESULTS, outcome

    if name not in OUTCOMES:
        raise ValueError(f"unknown outcome {name!r}; one of {list(OUTCOMES)}")
    return RESULTS[outcome(OUTCOMES.index(name))]


def restore_files(
    prior,
    *,
    task: str,
    method: str,
    image: str | None = None,
    prompt: str | None = None,
    noise: float | None = None,
    seed: int = 0,
    out: str | None = None,
    mmse_samples: int = 1,
) -> dict:
    """:func:`rfmpc.restore.restore` with the truth read from the PNG ``image`` (if given) and a
    (measurement, estimate, truth) strip written to ``out`` (if given); returns the record."""
    from rfmpc.viz import load_png, save_strip

    check_restore_args(task, method, noise)  # before reading the file
    check_mmse(method, mmse_samples)
    truth = None if image is None else load_png(image, prior.image_shape)
    res = restore(
        prior,
        task=task,
        method=method,
        truth=truth,
        prompt=prompt,
        noise=noise,
        seed=seed,
        source=image,
        mmse_samples=mmse_samples,
    )
    record = dict(res.record)
    if out:
        save_strip(out, res.panels)
        record["out"] = str(out)
    return record
