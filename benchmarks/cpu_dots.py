"""XLA:CPU's default dots (XNNPACK) against Eigen dots (:data:`rfmpc.models.CPU_EIGEN_DOTS`) on
the bar MM-DiT across batch sizes and latent sizes, timed by ``Transformer.autotune`` itself.

    python -m benchmarks.cpu_dots                         # the shapes of docs/performance.md
    python -m benchmarks.cpu_dots --shapes 2x32,1x64 --runs 9 --json
    python -m benchmarks.cpu_dots --save                  # benchmarks/results/ (idle only)

For each ``BATCHxLATENT`` shape it builds the inputs, runs ``model.autotune(...)`` (both
compilations; then ``--runs`` interleaved rounds, each candidate two back-to-back calls, the
second timed) and reports the medians and the speed-up of Eigen dots. One process, the 1-min
load average recorded at start and end; ``--save`` refuses above 1.5 per core.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file: re-run as a module
    import _as_module  # noqa: F401  (execs `python -m benchmarks.<name>`, never returns)

import argparse
import dataclasses
import datetime as _dt
import json
import os
import sys

from benchmarks._common import RESULTS, cpu_name, loadavg_1min, md_table, save_result, slug

MAX_LOAD_PER_CORE = 1.5
DEFAULT_SHAPES = "1x16,1x32,2x32,4x32,1x64,2x64,2x96"


def _shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        try:
            b, hw = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise SystemExit(
                f"--shapes: {part!r} is not BATCHxLATENT (e.g. 2x32: batch 2, 32x32 latent)"
            ) from None
        if b < 1 or hw < 2 or hw % 2:
            raise SystemExit(f"--shapes: {part!r}: batch >= 1 and an even latent size >= 2")
        out.append((b, hw))
    return out


def run(shapes: list[tuple[int, int]], runs: int) -> dict:
    import jax
    import jax.numpy as jnp

    from benchmarks.mmdit_speed import CASES, _inputs, jax_inputs, rfmpc_model
    from rfmpc.models import CPU_EIGEN_DOTS

    base = CASES["bar"]
    if max(hw for _, hw in shapes) // base.model.patch_size > base.model.pos_embed_max_size:
        raise SystemExit(
            f"--shapes: a latent above {base.model.pos_embed_max_size * base.model.patch_size} "
            "exceeds the bar model's position table"
        )
    model = rfmpc_model(base, jnp.float32)
    eigen = tuple(sorted(CPU_EIGEN_DOTS.items()))
    record = {
        "benchmark": "cpu_dots",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": f"CPU {cpu_name()} x{os.cpu_count()}",
        "model": "mmdit_speed's bar MM-DiT (4 layers, 4x32 heads, QK-norm, dual attention 0-1)",
        "dtype": "float32",
        "text_tokens": base.text_tokens,
        "runs": runs,
        "loadavg_1min": {"start": loadavg_1min()},
        "rows": [],
    }
    for b, hw in shapes:
        case = dataclasses.replace(base, batch=b, latent=(hw, hw))
        args = jax_inputs(_inputs(case), jnp.float32, jax.devices()[0])
        r = model.autotune(*args, candidates=(None, CPU_EIGEN_DOTS), runs=runs)
        row = {
            "batch": b,
            "latent": hw,
            "default_ms": 1e3 * r.median_s[()],
            "eigen_ms": 1e3 * r.median_s[eigen] if eigen in r.median_s else None,
            "failed": {str(dict(k)): v for k, v in r.failed.items()},
        }
        if row["eigen_ms"]:
            row["eigen_speedup"] = row["default_ms"] / row["eigen_ms"]
        record["rows"].append(row)
        print(f"[cpu_dots] {b}x{hw}: {row}", file=sys.stderr)
    record["loadavg_1min"]["end"] = loadavg_1min()
    limit = MAX_LOAD_PER_CORE * (os.cpu_count() or 1)
    record["loaded"] = max(v or 0.0 for v in record["loadavg_1min"].values()) > limit
    return record


def markdown(r: dict) -> str:
    lo = r["loadavg_1min"]
    rows = [
        (
            f"{x['batch']} x {x['latent']}x{x['latent']}",
            f"{x['default_ms']:.2f} ms",
            f"{x['eigen_ms']:.2f} ms" if x["eigen_ms"] else "failed",
            f"{x['eigen_speedup']:.2f}x" if x.get("eigen_speedup") else "n/a",
        )
        for x in r["rows"]
    ]
    return "\n".join(
        [
            f"# cpu_dots on {r['device']} ({r['date']})" + (" — LOADED" if r["loaded"] else ""),
            "",
            f"{r['model']}, {r['dtype']}, {r['text_tokens']} text tokens; medians of "
            f"{r['runs']} interleaved timed calls per candidate (`Transformer.autotune`). "
            f"1-min load average {lo['start']:.2f} at start, {lo['end']:.2f} at end.",
            "",
            *md_table(["batch x latent", "XLA default", "Eigen dots", "Eigen speed-up"], rows),
        ]
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="BATCHxLATENT,... (e.g. 2x32)")
    ap.add_argument("--runs", type=int, default=7, help="timed calls per candidate and shape")
    ap.add_argument("--json", action="store_true", help="print the JSON record")
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/...")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    shapes = _shapes(args.shapes)
    load = loadavg_1min() or 0.0
    limit = MAX_LOAD_PER_CORE * (os.cpu_count() or 1)
    if args.save and load > limit:
        ap.error(f"1-min load average {load:.2f} is above {limit:.1f}: wait for an idle machine")
    record = run(shapes, args.runs)
    md = markdown(record)
    print(json.dumps(record, indent=2) if args.json else md)
    if args.save:
        if record["loaded"]:
            print("not saved: the machine was loaded during the run", file=sys.stderr)
            return 1
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = f"{_dt.date.today().isoformat()}-{slug(record['device'])}-cpu_dots"
        path = save_result(
            RESULTS / stem, {".json": json.dumps(record, indent=2) + "\n", ".md": md + "\n"}
        )
        print(f"saved {path}.json / .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
