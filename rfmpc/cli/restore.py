"""``rfmpc restore``: restore an image from a degraded measurement with a flow prior.

The library side lives in :mod:`rfmpc.restore` (priors, :func:`rfmpc.restore.restore`,
:func:`~rfmpc.restore.restore_files`), :mod:`rfmpc.viz` (PNG input/output: :func:`load_png`,
:func:`save_strip`) and :mod:`rfmpc.inverse` (operators, solvers, metrics); this module is the
argparse front end and re-exports those three names.
"""

from __future__ import annotations

import argparse
import sys

from rfmpc.cli._common import emit
from rfmpc.restore import restore_files
from rfmpc.viz import load_png, save_strip

__all__ = ["add_restore_parser", "load_png", "restore_files", "save_strip"]

RESTORE_HELP = """Restore one image with MPC-Flow or a baseline and print its metrics.

    rfmpc restore --task {inpaint-box,inpaint-random,deblur,sr2,sr4,denoise,nonlinear-deblur}
                  --method {mpc-rhc,mpc-dt,mpc-k1,pnp-flow,d-flow,flowgrad,oc-flow,flowchef}
                  [--image PNG | --prompt P] [--noise S] --seed S [--out PNG] [--json]
                  [--prior {embedded,gmm}] [--mmse M]

The ground truth is ``--image`` (resized to the model's resolution if needed), or the image
``rfmpc.data`` renders for ``--prompt``, or (neither) a held-out procedural scene drawn from the
seed. The measurement is ``y = A(truth) + noise`` with the task's operator; the JSON has at least
``task, method, psnr_db, ssim, wall_s, nfe, peak_mem_bytes, result`` (``result``: the solve's
outcome, ``successful`` or a ``rfmpc.flow.RESULTS`` name; any other exits 1, naming it).
``wall_s`` is the solve alone (pre-compiled; ``compile_s`` is reported apart). Inverse problems
use the *unconditional* prior: the prompt only renders the truth, it does not condition the model
(that would leak the answer).

The model comes from ``rfmpc.restore.provide_prior`` (``--prior``; default: the embedded model
through ``rfmpc.pipeline.load_pipeline(None)``, adapted by ``prior_from_pipeline``).
"""


def cmd_restore(args) -> int:
    from rfmpc.restore import outcome_message, provide_prior

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
    if out["result"] != "successful":
        print(
            f"rfmpc restore: error: the {args.method} solve ended with outcome "
            f"{out['result']!r}: {outcome_message(out['result'])}",
            file=sys.stderr,
        )
        return 1
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
