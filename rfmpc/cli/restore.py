"""``rfmpc restore``: restore an image from a degraded measurement with a flow prior.

The library side lives in :mod:`rfmpc.restore` (priors, :func:`rfmpc.restore.restore`) and
:mod:`rfmpc.inverse` (operators, solvers, metrics); this module is the argparse front end and the
PNG input/output (:func:`load_png`, :func:`save_strip`, :func:`restore_files`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from rfmpc.cli._common import emit

__all__ = ["add_restore_parser", "load_png", "restore_files", "save_strip"]

RESTORE_HELP = """Restore one image with MPC-Flow or a baseline and print its metrics.

    rfmpc restore --task {inpaint-box,inpaint-random,deblur,sr2,sr4,denoise,nonlinear-deblur}
                  --method {mpc-rhc,mpc-dt,mpc-k1,pnp-flow,d-flow,flowgrad,oc-flow,flowchef}
                  [--image PNG | --prompt P] [--noise S] --seed S [--out PNG] [--json]
                  [--prior {embedded,gmm}] [--mmse M]

The ground truth is ``--image`` (resized to the model's resolution if needed), or the image
``rfmpc.data`` renders for ``--prompt``, or (neither) a held-out procedural scene drawn from the
seed. The measurement is ``y = A(truth) + noise`` with the task's operator; the JSON has at least
``task, method, psnr_db, ssim, wall_s, nfe, peak_mem_bytes``. ``wall_s`` is the solve alone
(pre-compiled; ``compile_s`` is reported apart). Inverse problems use the *unconditional* prior:
the prompt only renders the truth, it does not condition the model (that would leak the answer).

The model comes from ``rfmpc.restore.provide_prior`` (``--prior``; default: the embedded model
through ``rfmpc.pipeline.load_pipeline(None)``, adapted by ``prior_from_pipeline``).
"""

#: PIL modes ``--image`` accepts (8-bit; converted to RGB).
_IMAGE_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")


def load_png(path: str, image_shape) -> np.ndarray:
    """Read an 8-bit image as a ``(1, h, w, 3)`` float32 array in model space ``[-1, 1]``.

    ``image_shape`` is the model's ``(h, w, c)``; an image of the same aspect ratio but another
    size is resized (bicubic). Wrong aspect ratios, transparency, 16-bit or unreadable files raise
    ``ValueError`` saying how to fix the file.
    """
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


def save_strip(path: str, panels, scale: int = 4) -> None:
    """Write ``(h, w, 3)`` images in ``[0, 1]`` side by side as a PNG, upscaled ``scale`` times
    (nearest neighbour)."""
    from PIL import Image

    strip = np.concatenate([np.asarray(p) for p in panels], axis=1)
    img = Image.fromarray(np.clip(strip * 255.0 + 0.5, 0, 255).astype(np.uint8))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


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
    from rfmpc.restore import check_mmse, check_restore_args, restore

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


def cmd_restore(args) -> int:
    from rfmpc.restore import provide_prior

    out = restore_files(
        provide_prior(args.prior),
        task=args.task,
        method=args.method,
        image=args.image,
        prompt=args.prompt,
        noise=args.noise,
        seed=args.seed,
        out=args.out,
        mmse_samples=args.mmse,
    )
    emit(out, args.json)
    return 0


def add_restore_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``restore`` on an ``argparse`` sub-parser collection; returns its parser."""
    from rfmpc.inverse.operators import TASKS
    from rfmpc.inverse.registry import METHODS
    from rfmpc.restore import PRIORS

    r = subparsers.add_parser(
        "restore",
        help="restore an image from a degraded measurement with a flow prior (MPC-Flow et al.)",
        description=RESTORE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("--task", required=True, choices=TASKS)
    r.add_argument("--method", required=True, choices=list(METHODS))
    src = r.add_mutually_exclusive_group()
    src.add_argument("--image", help="ground-truth PNG (resized to the model's resolution)")
    src.add_argument("--prompt", help="render the ground truth of this grammar prompt")
    r.add_argument("--noise", type=float, default=None, help="noise std (default: per task)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", help="write a PNG strip: measurement | restored | truth")
    r.add_argument(
        "--mmse",
        type=int,
        default=1,
        metavar="M",
        help="MPC-Flow methods: average M independent samples (an MMSE estimate, M times the "
        "cost); default 1, a single sample",
    )
    r.add_argument(
        "--prior",
        choices=PRIORS,
        default="embedded",
        help="embedded: the default model; gmm: exact mixture stand-in (no trained weights)",
    )
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.set_defaults(func=cmd_restore)
    return r
