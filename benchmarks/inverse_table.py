"""The MPC-Flow paper's restoration table on our prior: every task x every method.

For each task (box inpainting, 70% random inpainting, Gaussian deblur, SR x2, denoising,
non-linear deblur; SR x4 on request) the same held-out procedural ground truths are measured with
the same noise, and every method restores them from the same prior. Reported per method: PSNR and
SSIM on [0, 1] (mean over images), seconds per image (one batched, pre-compiled run divided by
the number of images; compile time reported apart), XLA's compiled scratch memory (``temp``),
NFE and backprops through the model. Writes a markdown table and a PNG grid
(measurement, each method, truth) with ``--save``.

Priors (``--field``, see ``rfmpc.restore.provide_prior`` and ``benchmarks/_priors.py``):
  gmm         the exact isotropic Gaussian mixture over rendered training-split scenes
              (``rfmpc.inverse.priors.procedural_prior``): runs anywhere, no trained weights.
  embedded    the project's embedded default model (``rfmpc.pipeline.load_pipeline(None)``).
  tiny-mmdit  a random 1-layer MM-DiT in a real Pipeline: timing/memory plumbing only.

Usage: python benchmarks/inverse_table.py --field gmm --n-images 4 [--save]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _priors import BENCH_PRIORS, bench_prior

from rfmpc.inverse import METHODS, make_solver
from rfmpc.inverse.metrics import peak_memory, psnr, ssim, ssim_skimage, timed, to_unit
from rfmpc.inverse.operators import TASKS, add_noise, make_operator
from rfmpc.inverse.priors import heldout_images
from rfmpc.restore import DEFAULT_NOISE

PAPER_TASKS = ("inpaint-box", "inpaint-random", "deblur", "sr2", "denoise", "nonlinear-deblur")
RESULTS = Path(__file__).resolve().parent / "results"


def run_task(prior, task, methods, truth, noise, seed):
    key = jax.random.key(seed)
    k_op, k_noise, k_solve = jax.random.split(key, 3)
    op = make_operator(task, prior.image_shape, k_op)
    y = add_noise(k_noise, op(truth), noise)
    rows, images = [], {}
    for name in methods:
        solver = make_solver(name)
        compiled = solver.compile(
            prior.field,
            op,
            y,
            noise,
            k_solve,
            cond=prior.cond_for(truth.shape[0]),
            decode=prior.decode,
            shape=None if prior.decode is None else (truth.shape[0], *prior.latent_shape),
        )
        res, run_s, _ = timed(compiled, warmup=False)
        est, ref = to_unit(res.image), to_unit(truth)
        p = np.asarray(psnr(est, ref))
        s = np.asarray(ssim(est, ref))
        rows.append(
            {
                "task": task,
                "method": name,
                "psnr_db": float(p.mean()),
                "psnr_std": float(p.std()),
                "ssim": float(s.mean()),
                "ssim_skimage": float(ssim_skimage(est, ref).mean()),
                "s_per_image": run_s / truth.shape[0],
                "compile_s": compiled.compile_s,
                "temp_bytes": compiled.memory.get("temp_bytes"),
                "nfe": int(res.nfe),
                "backprops": int(res.backprops),
            }
        )
        images[name] = np.asarray(est[0])
        print(
            f"  {task:17s} {name:10s} PSNR {p.mean():6.2f} SSIM {s.mean():.3f} "
            f"{run_s / truth.shape[0]:7.3f} s/img  nfe {int(res.nfe):5d} "
            f"bp {int(res.backprops):5d}",
            flush=True,
        )
    images["y"] = np.asarray(to_unit(op.display(y))[0])
    images["truth"] = np.asarray(to_unit(truth)[0])
    return rows, images


def markdown(rows, tasks, methods, header):
    out = [header, ""]
    out.append("| method | " + " | ".join(tasks) + " | NFE | backprops |")
    out.append("|---|" + "---|" * (len(tasks) + 2))
    by = {(r["task"], r["method"]): r for r in rows}
    for m in methods:
        cells = []
        for t in tasks:
            r = by[(t, m)]
            best = max(by[(t, mm)]["psnr_db"] for mm in methods)
            txt = f"{r['psnr_db']:.2f} / {r['ssim']:.3f} / {r['s_per_image']:.3f}s"
            cells.append(f"**{txt}**" if r["psnr_db"] == best else txt)
        r0 = by[(tasks[0], m)]
        out.append(f"| {m} | " + " | ".join(cells) + f" | {r0['nfe']} | {r0['backprops']} |")
    out.append("")
    out.append("Cells: PSNR dB / SSIM / seconds per image (bold: best PSNR of the task).")
    out.append("")
    out.append("| task | method | compiled scratch memory (MiB) | compile s |")
    out.append("|---|---|---|---|")
    for r in rows:
        mem = "n/a" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**20:.2f}"
        out.append(f"| {r['task']} | {r['method']} | {mem} | {r['compile_s']:.1f} |")
    return "\n".join(out) + "\n"


def grid_png(path, all_images, tasks, methods):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["y", *methods, "truth"]
    fig, axes = plt.subplots(
        len(tasks), len(cols), figsize=(1.3 * len(cols), 1.4 * len(tasks)), squeeze=False
    )
    for i, t in enumerate(tasks):
        for j, c in enumerate(cols):
            ax = axes[i, j]
            ax.imshow(np.clip(all_images[t][c], 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(c, fontsize=7)
            if j == 0:
                ax.set_ylabel(t, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--field", choices=BENCH_PRIORS, default="gmm")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(PAPER_TASKS))
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--n-images", type=int, default=4)
    p.add_argument("--noise", type=float, default=None, help="default: per task (cli table)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", action="store_true", help=f"write markdown/PNG/JSON to {RESULTS}")
    args = p.parse_args(argv)

    prior = bench_prior(args.field)
    h, w, _ = prior.image_shape
    truth = heldout_images(args.n_images, resolution=h, seed=1000 + args.seed)
    dev = jax.devices()[0]
    print(
        f"device: {dev.platform} ({dev.device_kind}); prior: {prior.name}; "
        f"{args.n_images} held-out images {prior.image_shape}",
        flush=True,
    )
    rows, all_images = [], {}
    for task in args.tasks:
        noise = DEFAULT_NOISE[task] if args.noise is None else args.noise
        r, ims = run_task(prior, task, args.methods, truth, noise, args.seed)
        rows += r
        all_images[task] = ims
    mem, mem_src = peak_memory()
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H%M")
    header = (
        f"# Inverse-problem table ({stamp})\n\nprior: {prior.name}; device: {dev.platform} "
        f"({dev.device_kind}), {platform.processor() or platform.machine()}; "
        f"{args.n_images} held-out procedural images {h}x{w}; seed {args.seed}; noise std "
        + ", ".join(
            f"{t} {DEFAULT_NOISE[t] if args.noise is None else args.noise}" for t in args.tasks
        )
        + f" (model units, [-1, 1]); peak memory of the whole run {mem / 2**20:.0f} MiB "
        f"({mem_src})."
    )
    md = markdown(rows, args.tasks, args.methods, header)
    print(md)
    if args.save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        base = RESULTS / f"inverse_table_{args.field}_{stamp}"
        base.with_suffix(".md").write_text(md)
        base.with_suffix(".json").write_text(json.dumps(rows, indent=1))
        grid_png(base.with_suffix(".png"), all_images, args.tasks, args.methods)
        print(f"wrote {base}.md/.json/.png")
    return 0


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing anything
    sys.exit(main())
