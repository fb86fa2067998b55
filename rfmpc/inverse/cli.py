"""Restore one image with MPC-Flow or a baseline and measure it (the library behind ``rfmpc
restore``; its argparse front end is :mod:`rfmpc.cli.restore`).

    rfmpc restore --task {inpaint-box,inpaint-random,deblur,sr2,sr4,denoise,nonlinear-deblur}
                  --method {mpc-rhc,mpc-dt,mpc-k1,pnp-flow,d-flow,flowgrad,oc-flow,flowchef}
                  [--image PNG | --prompt P] [--noise S] --seed S [--out PNG] [--json]
                  [--prior {embedded,gmm,tiny-mmdit}]

The ground truth is ``--image`` (resized to the model's resolution if needed), or the image
``rfmpc.data`` renders for ``--prompt``, or (neither) a held-out procedural scene drawn from the
seed. The measurement is ``y = A(truth) + noise`` with the task's operator; the JSON has at least
``task, method, psnr_db, ssim, wall_s, nfe, peak_mem_bytes``. ``wall_s`` is the solve alone
(pre-compiled; ``compile_s`` is reported apart). Inverse problems use the *unconditional* prior:
the prompt only renders the truth, it does not condition the model (that would leak the answer).

The model comes from :func:`provide_prior` (``--prior``; default: the embedded model through
``rfmpc.pipeline.load_pipeline(None)``, adapted by :func:`prior_from_pipeline`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_NOISE",
    "PRIORS",
    "Prior",
    "prior_from_pipeline",
    "provide_prior",
    "tiny_mmdit_pipeline",
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


def tiny_mmdit_pipeline(resolution: int = 16, seed: int = 0):
    """A randomly initialised 1-layer pixel-space MM-DiT in a real :class:`Pipeline` (stand-in
    for plumbing, timing and memory checks; its restorations mean nothing)."""
    import jax.numpy as jnp
    from flax import nnx

    from rfmpc.models.configs import MMDiTConfig
    from rfmpc.models.mmdit import MMDiT
    from rfmpc.models.transformer import Transformer
    from rfmpc.pipeline import Pipeline, PixelCodec

    cfg = MMDiTConfig(
        sample_size=resolution,
        patch_size=4,
        in_channels=3,
        out_channels=3,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=8,
        caption_projection_dim=32,
        pooled_projection_dim=8,
        pos_embed_max_size=resolution // 4,
    )
    transformer = Transformer.from_module(MMDiT(cfg, rngs=nnx.Rngs(seed)))

    def text_encoder(prompts, max_sequence_length=None):
        n = len(prompts)
        return {"embeds": jnp.zeros((n, 4, 8)), "pooled": jnp.zeros((n, 8))}

    return Pipeline(
        transformer=transformer,
        text_encoder=text_encoder,
        codec=PixelCodec(),
        shift=1.0,
        model_id="tiny-random-mmdit",
        default_size=(resolution, resolution),
    )


#: Priors :func:`provide_prior` knows.
PRIORS = ("embedded", "gmm", "tiny-mmdit")


def provide_prior(name: str = "embedded") -> Prior:
    """The prior called ``name`` (see :data:`PRIORS`).

    ``"embedded"``: the embedded default model, ``rfmpc.pipeline.load_pipeline(None)``.
    ``"gmm"``: the exact isotropic Gaussian mixture over 256 rendered training-split scenes at
    32x32 (``rfmpc.inverse.priors.procedural_prior``); needs no trained weights.
    ``"tiny-mmdit"``: :func:`tiny_mmdit_pipeline` (random weights; plumbing/timing only).
    """
    if name == "gmm":
        from rfmpc.inverse.priors import procedural_prior

        f = procedural_prior()
        return Prior(
            name="gmm (isotropic mixture of 256 procedural scenes, tau 0.1)",
            field=f,
            image_shape=f.image_shape,
        )
    if name == "tiny-mmdit":
        return prior_from_pipeline(tiny_mmdit_pipeline(), name="tiny random MM-DiT (16x16)")
    if name == "embedded":
        from rfmpc.pipeline import load_pipeline

        return prior_from_pipeline(load_pipeline(None))
    raise ValueError(f"unknown prior {name!r}; choose one of {list(PRIORS)}")


#: PIL modes ``--image`` accepts (8-bit; converted to RGB).
_IMAGE_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")


def _load_png(path: str, image_shape) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--image {path}: no such file")
    h, w, c = image_shape
    try:
        img = Image.open(p)
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"--image {path} is not a readable image ({e}); pass a PNG file") from e
    if img.mode not in _IMAGE_MODES:
        raise ValueError(
            f"--image {path} has mode {img.mode!r}, expected 8-bit RGB, grey or palette "
            f"({', '.join(_IMAGE_MODES)}); save it as an 8-bit RGB PNG first"
        )
    if "A" in img.mode and img.getchannel("A").getextrema()[0] < 255:
        raise ValueError(
            f"--image {path} has transparent pixels (mode {img.mode}); flatten it onto a "
            "background and save it as RGB first"
        )
    if img.width * h != img.height * w:
        raise ValueError(
            f"--image {path} is {img.width}x{img.height} (width x height) but the model works on "
            f"{w}x{h} images; resizing would distort it: crop it to a {w}:{h} aspect ratio first"
        )
    img = img.convert("RGB")
    if img.size != (w, h):
        img = img.resize((w, h), Image.BICUBIC)
    arr = np.asarray(img, np.float32) / 255.0
    if c != 3:
        raise ValueError(f"the model works on {c}-channel images; --image gives RGB")
    return (2.0 * arr - 1.0)[None]


def _save_strip(path: str, panels, scale: int = 4) -> None:
    from PIL import Image

    strip = np.concatenate([np.asarray(p) for p in panels], axis=1)
    img = Image.fromarray(np.clip(strip * 255.0 + 0.5, 0, 255).astype(np.uint8))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def restore(
    prior: Prior,
    *,
    task: str,
    method: str,
    image: str | None = None,
    prompt: str | None = None,
    noise: float | None = None,
    seed: int = 0,
    out: str | None = None,
) -> dict:
    """Restore one image (a PNG, a rendered prompt, or a held-out scene) and score it.

    Returns the CLI's JSON record (task, method, psnr_db, ssim, wall_s, nfe, peak_mem_bytes,
    ...); writes a (measurement, estimate, truth) strip to ``out`` if given.
    """
    import types

    import jax

    from rfmpc.inverse.metrics import peak_memory, psnr, ssim, to_unit
    from rfmpc.inverse.operators import add_noise, make_operator
    from rfmpc.inverse.priors import heldout_images, render_prompt
    from rfmpc.inverse.registry import make_solver

    args = types.SimpleNamespace(
        task=task, method=method, image=image, prompt=prompt, noise=noise, seed=seed, out=out
    )
    from rfmpc.inverse.operators import TASKS
    from rfmpc.inverse.registry import METHODS

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if args.noise is not None and not args.noise > 0:
        raise ValueError(f"--noise must be > 0, got {args.noise}")
    h = prior.image_shape[0]
    if args.image:
        truth, source = jax.numpy.asarray(_load_png(args.image, prior.image_shape)), args.image
    elif args.prompt:
        truth, source = render_prompt(args.prompt, resolution=h), f"prompt: {args.prompt}"
    else:
        truth, source = heldout_images(1, resolution=h, seed=args.seed), "held-out scene"
    noise = DEFAULT_NOISE[args.task] if args.noise is None else float(args.noise)
    k_op, k_noise, k_solve = jax.random.split(jax.random.key(args.seed), 3)
    op = make_operator(args.task, prior.image_shape, k_op)
    y = add_noise(k_noise, op(truth), noise)
    solver = make_solver(args.method)
    compiled = solver.compile(
        prior.field,
        op,
        y,
        noise,
        k_solve,
        cond=prior.cond_for(1),
        decode=prior.decode,
        shape=prior.state_shape(1),
    )
    t0 = time.perf_counter()
    res = jax.block_until_ready(compiled())
    wall = time.perf_counter() - t0
    est, ref = to_unit(res.image), to_unit(truth)
    mem, mem_src = peak_memory()
    out = {
        "task": args.task,
        "method": args.method,
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
        "seed": args.seed,
        "prior": prior.name,
        "truth": source,
        "device": str(jax.devices()[0]),
    }
    if args.out:
        disp = to_unit(op.display(y))[0]
        _save_strip(args.out, [disp, est[0], ref[0]])
        out["out"] = str(args.out)
    return out
