"""The MPC-Flow authors' 2D hexagon experiment, on their weights, through rfmpc.

    python -m benchmarks.mpcflow_hexagon --json                       # one JSON line
    python -m benchmarks.mpcflow_hexagon --ks 1,2,5,10 --global-iters 3000 --save
    python -m benchmarks.mpcflow_hexagon --x0 0.5 0.5 --corner 2 --json

Prints ``{"uncontrolled": {"terminal", "x_T"}, "global": {"terminal", "control", "x_T"},
"rhc": {"K": {"terminal", "control", "x_T"}, ...}, "dt": {...}}`` in the authors' convention:
``terminal = ||x_T - corner||^2``, ``control = sum_i ||u_i||^2 dt``, ``x_T`` the end point. The
corner index counts from the authors' ``calculate_corners()`` (angles 0, 60, ..., 300 degrees;
-1, their default, is ``(1, -sqrt(3))``). With ``--save``: a figure of the trajectories and a
plot of terminal error and control energy against K beside the global solution, and a table
(``benchmarks/results/<date>-cpu-mpcflow_hexagon.{md,json,png}``).
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file: re-run as a module
    import _as_module  # noqa: F401  (execs `python -m benchmarks.<name>`, never returns)

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks._common import loadavg_1min, save_result
from rfmpc.inverse.hexagon import (
    delta_t_horizon,
    global_control,
    hexagon_corners,
    hexagon_field,
    receding_horizon,
    uncontrolled,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _rec(run) -> dict:
    return {
        "terminal": float(run.terminal),
        "control": float(run.control),
        "x_T": [float(v) for v in np.asarray(run.x_T)],
    }


def run(x0, corner: int, ks: list[int], global_iters: int, steps: int, iters: int) -> tuple:
    field = hexagon_field()
    corners = hexagon_corners()
    if not -6 <= corner < 6:
        raise ValueError(f"--corner must index one of the 6 corners (-6..5), got {corner}")
    target = corners[corner]
    runs = {"uncontrolled": uncontrolled(field, x0, target, num_steps=steps)}
    t0 = time.perf_counter()
    runs["global"] = global_control(field, x0, target, num_steps=steps, iters=global_iters)
    times = {"global": time.perf_counter() - t0}
    for k in ks:
        t0 = time.perf_counter()
        runs[k] = receding_horizon(field, k, x0, target, num_steps=steps, iters=iters)
        times[k] = time.perf_counter() - t0
    t0 = time.perf_counter()
    runs["dt"] = delta_t_horizon(field, x0, target, num_steps=steps, iters=iters)
    times["dt"] = time.perf_counter() - t0
    out = {
        "uncontrolled": {k: v for k, v in _rec(runs["uncontrolled"]).items() if k != "control"},
        "global": _rec(runs["global"]),
        "rhc": {str(k): _rec(runs[k]) for k in ks},
        "dt": _rec(runs["dt"]),
    }
    return out, runs, times, target


def plot(runs, ks, target, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corners = hexagon_corners()
    ring = np.concatenate([corners, corners[:1]])
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 5.2))
    a.plot(ring[:, 0], ring[:, 1], c="grey", lw=3)
    a.scatter(*target, c="red", s=90, zorder=3, label="target corner")
    p = np.asarray(runs["uncontrolled"].path)[:, 0]
    a.plot(p[:, 0], p[:, 1], "--", c="grey", label="uncontrolled")
    p = np.asarray(runs["global"].path)[:, 0]
    a.plot(p[:, 0], p[:, 1], ":", c="k", lw=2, label="global (open loop)")
    cmap = plt.get_cmap("viridis")
    for i, k in enumerate(ks):
        p = np.asarray(runs[k].path)[:, 0]
        a.plot(p[:, 0], p[:, 1], c=cmap(i / max(1, len(ks) - 1)), lw=1, label=f"RHC K={k}")
    p = np.asarray(runs["dt"].path)[:, 0]
    a.plot(p[:, 0], p[:, 1], c="tab:orange", lw=1.5, label="Delta-t horizon")
    a.set_aspect("equal")
    a.set_xlim(-3, 3)
    a.set_ylim(-3, 3)
    a.legend(fontsize=7)
    a.set_title("trajectories (authors' convention, t: 0 -> 1)")
    term = [float(runs[k].terminal) for k in ks]
    ctrl = [float(runs[k].control) for k in ks]
    b.plot(ks, term, "o-", label="RHC terminal ||x_T - c||^2")
    b.plot(ks, ctrl, "s-", label="RHC control sum ||u||^2 dt")
    b.axhline(float(runs["global"].terminal), ls=":", c="tab:blue", label="global terminal")
    b.axhline(float(runs["global"].control), ls=":", c="tab:orange", label="global control")
    b.set_yscale("log")
    b.set_xlabel("K (Euler steps per receding-horizon sub-problem)")
    b.legend(fontsize=7)
    b.grid(alpha=0.3, which="both")
    b.set_title("terminal error and control energy against K")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--x0", nargs=2, type=float, default=(-0.75, -0.5), metavar=("X", "Y"))
    ap.add_argument("--corner", type=int, default=-1)
    ap.add_argument("--ks", default=",".join(str(k) for k in range(1, 20)))
    ap.add_argument("--global-iters", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--iters", type=int, default=200, help="Adam iterations per sub-problem")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args(argv)
    try:
        ks = [int(k) for k in args.ks.split(",")]
    except ValueError:
        ap.error(f"--ks must be comma-separated ints, got {args.ks!r}")
    if any(k < 1 for k in ks):
        ap.error("every K in --ks must be >= 1")
    if args.global_iters < 1 or args.steps < 1 or args.iters < 1:
        ap.error("--global-iters, --steps and --iters must be >= 1")
    if not all(np.isfinite(args.x0)):
        ap.error("--x0 must be two finite numbers")
    try:
        out, runs, times, target = run(
            tuple(args.x0), args.corner, ks, args.global_iters, args.steps, args.iters
        )
    except ValueError as e:
        ap.error(str(e))
    if args.json:
        print(json.dumps(out))
    else:
        print(json.dumps(out, indent=1))
    if args.save:
        stamp = _dt.date.today().isoformat()
        stem = RESULTS_DIR / f"{stamp}-cpu-mpcflow_hexagon"
        dev = jax.devices()[0]
        load = loadavg_1min(float("nan"))
        lines = [
            "## MPC-Flow 2D hexagon (the authors' weights), authors' convention",
            "",
            f"- device: {dev.platform}; jax {jax.__version__}; date {stamp}; load {load:.2f}",
            f"- command: `python -m benchmarks.mpcflow_hexagon {' '.join(argv or sys.argv[1:])}`",
            f"- x0 = {tuple(args.x0)}, corner {args.corner} = {np.round(target, 4).tolist()}, "
            f"{args.steps} Euler steps, objective 0.075/2 ||x_T - c||^2 + 0.001 sum ||u||^2 dt",
            "",
            "| run | terminal ||x_T - c||^2 | control sum ||u||^2 dt | x_T | wall s |",
            "|---|---|---|---|---|",
            f"| uncontrolled | {out['uncontrolled']['terminal']:.4g} | 0 | "
            f"{np.round(out['uncontrolled']['x_T'], 4).tolist()} | - |",
            f"| global (Adam, {args.global_iters} it.) | {out['global']['terminal']:.4g} | "
            f"{out['global']['control']:.4g} | {np.round(out['global']['x_T'], 4).tolist()} | "
            f"{times['global']:.1f} |",
        ]
        for k in ks:
            r = out["rhc"][str(k)]
            lines.append(
                f"| RHC K = {k} | {r['terminal']:.4g} | {r['control']:.4g} | "
                f"{np.round(r['x_T'], 4).tolist()} | {times[k]:.1f} |"
            )
        r = out["dt"]
        lines.append(
            f"| Delta-t horizon | {r['terminal']:.4g} | {r['control']:.4g} | "
            f"{np.round(r['x_T'], 4).tolist()} | {times['dt']:.1f} |"
        )
        stem = save_result(stem, {".md": "\n".join(lines) + "\n", ".json": json.dumps(out)})
        plot(runs, ks, target, stem.with_suffix(".png"))
        print(f"wrote {stem}.{{md,json,png}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
