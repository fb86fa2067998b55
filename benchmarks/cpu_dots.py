"""XLA:CPU's defaults (XNNPACK "YNN" fusions) against Eigen dots
(:data:`rfmpc.models.CPU_EIGEN_DOTS`) and Eigen dots with YNN reductions
(:data:`rfmpc.models.CPU_YNN_REDUCTIONS`) on the bar MM-DiT across batch sizes and latent sizes,
timed by ``Transformer.autotune`` itself (its default candidates).

    python -m benchmarks.cpu_dots                         # the shapes of docs/performance.md
    python -m benchmarks.cpu_dots --shapes 2x32,1x64 --runs 9 --json
    python -m benchmarks.cpu_dots --save                  # benchmarks/results/ (idle only)

For each ``BATCHxLATENT`` shape it builds the inputs, runs ``model.autotune(...)`` (one
compilation per candidate, a settling spell, then ``--runs`` interleaved rounds, each candidate
two back-to-back calls, the second timed) and reports the medians, whether the outputs are
bit-identical to the default's, and the best candidate's speed-up. One process, the 1-min
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


#: column label of each candidate (its options as a sorted tuple)
LABELS = {
    (): "XLA default",
    (("xla_cpu_experimental_ynn_fusion_type", ""),): "Eigen dots",
    (("xla_cpu_experimental_ynn_fusion_type", "LIBRARY_FUSION_TYPE_REDUCE"),): (
        "Eigen dots + YNN reductions"
    ),
}


def run(shapes: list[tuple[int, int]], runs: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.mmdit_speed import CASES, _inputs, jax_inputs, rfmpc_model
    from rfmpc.models import CPU_AUTOTUNE_CANDIDATES

    base = CASES["bar"]
    if max(hw for _, hw in shapes) // base.model.patch_size > base.model.pos_embed_max_size:
        raise SystemExit(
            f"--shapes: a latent above {base.model.pos_embed_max_size * base.model.patch_size} "
            "exceeds the bar model's position table"
        )
    model = rfmpc_model(base, jnp.float32)
    record = {
        "benchmark": "cpu_dots",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": f"CPU {cpu_name()} x{os.cpu_count()}",
        "model": "mmdit_speed's bar MM-DiT (4 layers, 4x32 heads, QK-norm, dual attention 0-1)",
        "dtype": "float32",
        "text_tokens": base.text_tokens,
        "runs": runs,
        "candidates": [LABELS.get(k, str(k)) for k in map(_key, CPU_AUTOTUNE_CANDIDATES)],
        "loadavg_1min": {"start": loadavg_1min()},
        "rows": [],
    }
    for b, hw in shapes:
        case = dataclasses.replace(base, batch=b, latent=(hw, hw))
        args = jax_inputs(_inputs(case), jnp.float32, jax.devices()[0])
        r = model.autotune(*args, runs=runs)
        ref = np.asarray(model(*args))
        same = {
            LABELS.get(k, str(k)): bool(
                np.array_equal(np.asarray(model.with_compiler_options(k)(*args)), ref)
            )
            for k in r.median_s
        }
        row = {
            "batch": b,
            "latent": hw,
            "median_ms": {LABELS.get(k, str(k)): 1e3 * v for k, v in r.median_s.items()},
            "bit_identical_to_default": same,
            "best": LABELS.get(r.options, str(r.options)),
            "best_speedup": r.median_s[()] / r.median_s[r.options],
            "failed": {LABELS.get(k, str(k)): v for k, v in r.failed.items()},
        }
        record["rows"].append(row)
        print(f"[cpu_dots] {b}x{hw}: {row}", file=sys.stderr)
    record["loadavg_1min"]["end"] = loadavg_1min()
    limit = MAX_LOAD_PER_CORE * (os.cpu_count() or 1)
    record["loaded"] = max(v or 0.0 for v in record["loadavg_1min"].values()) > limit
    return record


def _key(options) -> tuple:
    return tuple(sorted((options or {}).items()))


def markdown(r: dict) -> str:
    lo = r["loadavg_1min"]
    cands = r["candidates"]
    rows = []
    for x in r["rows"]:
        t = x["median_ms"]
        rows.append(
            (
                f"{x['batch']} x {x['latent']}x{x['latent']}",
                *(f"{t[c]:.2f} ms" if c in t else "failed" for c in cands),
                f"{x['best']} ({x['best_speedup']:.2f}x)",
                "yes" if all(x["bit_identical_to_default"].values()) else "no",
            )
        )
    return "\n".join(
        [
            f"# cpu_dots on {r['device']} ({r['date']})" + (" — LOADED" if r["loaded"] else ""),
            "",
            f"{r['model']}, {r['dtype']}, {r['text_tokens']} text tokens; medians of "
            f"{r['runs']} interleaved timed calls per candidate (`Transformer.autotune`). "
            f"1-min load average {lo['start']:.2f} at start, {lo['end']:.2f} at end.",
            "",
            *md_table(
                [
                    "batch x latent",
                    *cands,
                    "fastest (speed-up vs default)",
                    "outputs bit-identical",
                ],
                rows,
            ),
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
