"""Trajectory-cache lookup speed: ``SimilarityIndex.nearest`` over 100k entries vs brute force.

    python -m benchmarks.cache_lookup                      # n=100k, d in {64, 2048}
    python -m benchmarks.cache_lookup --n 100000 --dims 64,2048 --json --save

The target (issue 7): a lookup over 100k cached prompts answers in < 50 ms on CPU, for the
embedded model's pooled embeddings (d = 64) and SD3's (d = 2048). Per d and data kind this
prints the median / p90 wall time of one ``nearest`` call (top-1, exact) and, in the same run on
the same matrix, the brute-force baseline (one float32 matvec over all rows + ``argpartition``),
and checks that every answer equals the brute-force one.

Data (synthetic; no prompt corpus is available offline, so say so when quoting numbers):

* ``prompt-like``: ``v = normalize(1.2 m + F^T z) + e`` with a shared unit mean direction ``m``
  (text embeddings sit in a narrow cone), 32 unit latent factors ``F`` with
  ``z ~ N(0, I / 32)``, and isotropic noise ``e ~ N(0, 0.1 I / d)`` (~10% of the energy).
  Queries: ``near`` = a stored vector plus noise (cosine 0.95, a paraphrase) and ``fresh`` = a
  new draw (typical similarity to its nearest neighbour ~0.8).
* ``isotropic``: i.i.d. Gaussian vectors, the worst case for any pruning (all similarities
  near 0 except near-duplicates).

Each query is timed with ``min_similarity=None`` (pure top-1) and ``min_similarity=0.85`` (what
``store.lookup`` passes: the default policy's from-scratch threshold). ``--save`` writes
``benchmarks/results/<date>-<host cpu>-cache_lookup.{json,md}``. The machine may be shared:
the load average before each block is recorded beside the numbers, and "CPU ms" (process CPU
time, all threads) is reported beside wall time: on an oversubscribed machine wall time also
counts the time slices other processes took.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file: re-run as a module
    import _as_module  # noqa: F401  (execs `python -m benchmarks.<name>`, never returns)

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time

import numpy as np

from benchmarks._common import RESULTS, cpu_name, loadavg_1min, save_result, slug
from rfmpc.cache.index import SimilarityIndex


def _data(kind: str, n: int, d: int, rng: np.random.Generator):
    f32 = np.float32
    if kind == "isotropic":
        x = rng.standard_normal((n, d), dtype=f32)

        def fresh():
            return rng.standard_normal(d, dtype=f32)

        return x, fresh
    rank = min(32, d // 2)
    mean = rng.standard_normal(d, dtype=f32)
    mean /= np.linalg.norm(mean)
    mix = rng.standard_normal((rank, d), dtype=f32) / f32(np.sqrt(rank))
    mix /= np.linalg.norm(mix, axis=1, keepdims=True)  # unit factors

    def draw(m):
        z = rng.standard_normal((m, rank), dtype=f32) / f32(np.sqrt(rank))
        v = f32(1.2) * mean + z @ mix
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        return v + rng.standard_normal((m, d), dtype=f32) * f32(np.sqrt(0.1 / d))

    x = np.concatenate([draw(min(20000, n - i)) for i in range(0, n, 20000)])
    return x, lambda: draw(1)[0]


def _near(x_unit: np.ndarray, rng, sim: float = 0.95) -> np.ndarray:
    """A query with cosine ``sim`` to a random stored row."""
    base = x_unit[rng.integers(x_unit.shape[0])].astype(np.float64)
    u = rng.standard_normal(base.shape)
    u -= (u @ base) * base
    u /= np.linalg.norm(u)
    return (sim * base + np.sqrt(1 - sim**2) * u).astype(np.float32)


def _stats(ts: list[float], cpu: list[float]) -> dict:
    ms = sorted(t * 1e3 for t in ts)
    return {
        "median_ms": statistics.median(ms),
        "p90_ms": ms[min(len(ms) - 1, int(0.9 * len(ms)))],
        "min_ms": ms[0],
        "median_cpu_ms": statistics.median(c * 1e3 for c in cpu),
    }


def run(n: int, dims: list[int], queries: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    results = []
    for d in dims:
        for kind in ("prompt-like", "isotropic"):
            x, fresh = _data(kind, n, d, rng)
            ids = [f"{i:032x}" for i in range(n)]
            load_before = loadavg_1min()
            t0 = time.perf_counter()
            index = SimilarityIndex()
            index.add_many(ids, x, model_id="m", config_hash="c")
            build_s = time.perf_counter() - t0
            del x
            group = index._groups[("m", "c")]
            unit = group.vecs[: group.n]  # the index's own normalised matrix (no copy)
            row_ids = group.ids
            sketch_rank = None if group.basis is None else int(group.basis.shape[0])
            qs = {
                "near": [_near(unit, rng) for _ in range(queries)],
                "fresh": [fresh() for _ in range(queries)],
            }
            brute, brute_cpu = [], []
            for qk, qlist in qs.items():
                for q in qlist:  # baseline: full matvec + argpartition
                    t, c = time.perf_counter(), time.process_time()
                    qn = q / np.linalg.norm(q)
                    s = unit @ qn
                    best = int(np.argpartition(-s, 0)[0])
                    brute.append(time.perf_counter() - t)
                    brute_cpu.append(time.process_time() - c)
                for floor in (None, 0.85):
                    ts, cpu, wrong, best_sims = [], [], 0, []
                    for q in qlist:
                        t, c = time.perf_counter(), time.process_time()
                        got = index.nearest(
                            q, model_id="m", config_hash="c", k=1, min_similarity=floor
                        )
                        ts.append(time.perf_counter() - t)
                        cpu.append(time.process_time() - c)
                        s = unit @ (q / np.linalg.norm(q))
                        best = int(np.argmax(s))
                        best_sims.append(float(s[best]))
                        want = [] if floor is not None and s[best] < floor else [row_ids[best]]
                        wrong += [g[0] for g in got] != want
                    results.append(
                        {
                            "d": d,
                            "data": kind,
                            "query": qk,
                            "min_similarity": floor,
                            **_stats(ts, cpu),
                            "wrong_answers": wrong,
                            "median_best_similarity": statistics.median(best_sims),
                            "sketch_rank": sketch_rank,
                            "build_s": build_s,
                            "loadavg_1min_before": load_before,
                        }
                    )
            results.append(
                {
                    "d": d,
                    "data": kind,
                    "query": "baseline: brute-force matvec",
                    **_stats(brute, brute_cpu),
                }
            )
            del index, group, unit
    return {
        "benchmark": "cache_lookup",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": f"CPU: {cpu_name()} ({os.cpu_count()} logical cores visible)",
        "numpy": np.__version__,
        "n": n,
        "queries_per_cell": queries,
        "target_ms": 50.0,
        "results": results,
    }


def _table(rec: dict) -> str:
    lines = [
        f"cache lookup: n={rec['n']}, {rec['queries_per_cell']} queries per row, "
        f"device {rec['device']}, numpy {rec['numpy']}",
        "| d | data | query | min_sim | median ms | p90 ms | CPU ms | wrong | best sim | rank |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rec["results"]:
        lines.append(
            f"| {r['d']} | {r['data']} | {r['query']} | {r.get('min_similarity', '')} | "
            f"{r['median_ms']:.1f} | {r['p90_ms']:.1f} | {r['median_cpu_ms']:.1f} | "
            f"{r.get('wrong_answers', '')} | {r['median_best_similarity']:.3f} | "
            f"{r['sketch_rank']} |"
            if "wrong_answers" in r
            else f"| {r['d']} | {r['data']} | {r['query']} | | {r['median_ms']:.1f} | "
            f"{r['p90_ms']:.1f} | {r['median_cpu_ms']:.1f} | | | |"
        )
    loads = [r["loadavg_1min_before"] for r in rec["results"] if "loadavg_1min_before" in r]
    builds = {(r["d"], r["data"]): r["build_s"] for r in rec["results"] if "build_s" in r}
    lines.append("")
    build = ", ".join(f"d={d} {k}: {b:.1f}" for (d, k), b in builds.items())
    lines.append(f"build (add_many + sketch fit) s: {build}")
    if loads and all(v is not None for v in loads):
        load = ", ".join(f"{v:.1f}" for v in loads)
        lines.append(f"1-min load average before each block: {load}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dims", default="64,2048", help="comma-separated embedding sizes")
    p.add_argument("--queries", type=int, default=21)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON record")
    p.add_argument("--save", action="store_true", help="write benchmarks/results/...")
    args = p.parse_args(argv)
    dims = [int(s) for s in args.dims.split(",") if s]
    rec = run(args.n, dims, args.queries, args.seed)
    table = _table(rec)
    print(json.dumps(rec) if args.json else table)
    if args.save:
        out = RESULTS
        out.mkdir(exist_ok=True)
        host = slug(cpu_name()) or "cpu"
        stem = out / f"{_dt.date.today().isoformat()}-{host}-cache_lookup"
        stem = save_result(stem, {".json": json.dumps(rec, indent=1) + "\n", ".md": table + "\n"})
        print(f"saved {stem}.json / .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
