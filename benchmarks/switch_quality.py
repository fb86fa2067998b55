"""Prompt-switch quality against cost, on held-out prompt pairs, with equal-cost baselines.

    python -m benchmarks.switch_quality --save                 # held-out split, the table + PNG
    python -m benchmarks.switch_quality --tune --save          # dev split: fit MPC() / Adaptive
    python -m benchmarks.switch_quality --provider gmm --save  # exact GMM: analytic vs exact J
    python -m benchmarks.switch_quality --quick                # a smoke run (2 pairs, 1 seed)

Setting. Prompt A runs ``k`` of ``N = 28`` steps from seed noise ``eps`` (the embedded model,
CFG 4, its own grid) and is cached with what a cache stores beside the state: ``v_A(x_k)``, A's
final latent and the seed. Prompt B is finished from that state by each controller.

Pairs (:mod:`rfmpc.data.edits`). A-scenes are the embedded model's held-out scenes (never
trained on); a scene goes to the *dev* split of this benchmark if ``sha256(scene.key())`` is even
and to the *held-out* split if odd (a fixed rule: tuning never sees a held-out pair). Per split,
``--per-kind`` pairs of each edit kind (paraphrase, colour, shape, position, size, background,
second object, several attributes), then pairs of any kind until every pooled-similarity band
(>= 0.95, 0.90-0.95, 0.85-0.90, < 0.85) holds at least two. ``--seeds`` seeds per pair.

References, both from B's own seed: **B-28** (what the uncached call returns) and **B-112** (a
fine grid: a method that merely shares B-28's 28-step discretisation error does not look good
against it). Scores per image in [0, 1]: PSNR (dB, data range 1) and prompt fidelity (the exact
analyzer: every attribute of B right).

Cost. Forward calls, JVPs and VJPs are counted separately; forward-equivalents weigh JVPs and
VJPs by their cost relative to one forward pass *measured in this run* on this model (jitted,
medians). Wall time: the batched switch over all pairs of a ``k`` (compiled, one call) and a
single pair's switch (compiled, median of repeats, methods interleaved), with ``Direct`` as the
ratio's reference.

Baselines. **Equal cost**: B from scratch on a fresh grid of ``round(forward-equivalents)``
steps: what the same budget buys without a cache (every controller gets its own). The
equal-cost *curve* (B from scratch at 4..28 steps) is drawn on the Pareto plots.

Statistics: medians over all images, with 95% CIs from a cluster bootstrap over pairs (2000
resamples: seeds of one pair are not independent); paired differences (method - reference on
the same image) likewise. Controllers that use a similarity get the pooled text similarity.
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
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._common import loadavg_1min, save_result
from rfmpc.control import (
    MPC,
    OSQP,
    Direct,
    Frozen,
    JVPBlocks,
    Reproject,
    SwitchCache,
    stack_states,
    switch,
    switch_batch,
)
from rfmpc.control.results import OUTCOMES
from rfmpc.flow import TrajectoryState, flowmatch_sigmas, integrate, integrate_path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BANDS = (
    (0.95, 1.01, ">=0.95"),
    (0.90, 0.95, "0.90-0.95"),
    (0.85, 0.90, "0.85-0.90"),
    (-1.0, 0.85, "<0.85"),
)
SPLIT_SEEDS = {"dev": 1000, "heldout": 2000}


#: The MPC's other linearisations and targets, and a seed-target reproject, listed after the
#: registry entry they vary.
VARIANTS = {
    "reproject": (("reproject[seed,3]", lambda: Reproject(iters=3, target="seed")),),
    "mpc": (
        ("mpc[seed]", lambda: MPC(target="seed")),
        ("mpc[frozen-4]", lambda: MPC(linearisation=Frozen(probes=4))),
        ("mpc[jvp-blocks,osqp]", lambda: MPC(linearisation=JVPBlocks(), solver=OSQP())),
    ),
}


def controllers() -> list[tuple[str, object]]:
    """The rows of the table: (label, controller) -- every registered controller
    (``rfmpc.cli.switch.CONTROLLERS``) with its defaults, each followed by its :data:`VARIANTS`."""
    from rfmpc.cli.switch import CONTROLLERS

    rows = []
    for name, cls in CONTROLLERS.items():
        rows.append((name, cls()))
        rows += [(label, make()) for label, make in VARIANTS.get(name, ())]
    return rows


QUICK = ("direct", "reproject", "mpc", "shooting")

#: Run pair by pair with ``switch`` instead of one ``switch_batch``: under ``vmap`` the re-plan
#: branch of ShootingMPC runs on every step for every pair (``lax.cond`` becomes a select), which
#: made the batched run ~20x slower than the per-pair loop; the results are the same.
SEQUENTIAL = ("shooting-mpc",)


# ----------------------------------------------------------------------------- pairs
@dataclass(frozen=True)
class Pair:
    kind: str
    prompt_a: str
    prompt_b: str
    similarity: float
    band: str


def _band(sim: float) -> str:
    for lo, hi, name in BANDS:
        if lo <= sim < hi:
            return name
    raise AssertionError(sim)  # pragma: no cover


def make_pairs(pipe, split: str, per_kind: int, min_per_band: int = 2) -> list[Pair]:
    """The split's pairs by the fixed rule of the module docstring."""
    from rfmpc.data import EDIT_KINDS, benchmark_split, edit_prompt, sample_split_scene

    rng = np.random.default_rng(SPLIT_SEEDS[split])

    def draw(kind):
        for _ in range(10_000):
            n_obj = 1 if kind == "second-object" else int(rng.integers(1, 3))
            scene = sample_split_scene(rng, "heldout", n_objects=n_obj)
            if benchmark_split(scene) != split:
                continue
            pr = edit_prompt(scene, kind, rng)
            if pr is not None:
                return pr
        raise RuntimeError(f"no {kind} edit found")  # pragma: no cover

    def pooled_sim(pa, pb) -> float:
        v = np.asarray(pipe.text_encoder.pooled([pa, pb]), np.float64)
        return float(np.clip(v[0] @ v[1] / np.prod(np.linalg.norm(v, axis=1)), -1.0, 1.0))

    pairs = []
    for kind in EDIT_KINDS:
        for _ in range(per_kind):
            pa, pb = draw(kind)
            s = pooled_sim(pa, pb)
            pairs.append(Pair(kind, pa, pb, s, _band(s)))
    for _ in range(2000):  # fill the bands
        counts = {name: sum(p.band == name for p in pairs) for *_, name in BANDS}
        if min(counts.values()) >= min_per_band:
            break
        kind = EDIT_KINDS[int(rng.integers(len(EDIT_KINDS)))]
        pa, pb = draw(kind)
        s = pooled_sim(pa, pb)
        if counts[_band(s)] < min_per_band:
            pairs.append(Pair(kind, pa, pb, s, _band(s)))
    return pairs


# ----------------------------------------------------------------------------- measurement
def _block(o):
    jax.block_until_ready(jax.tree.leaves(o))
    return o


def measure_ratios(field, x, sigma, cond, runs: int = 15) -> dict:
    """Cost of one JVP and one VJP relative to one forward pass (jitted, interleaved medians)."""
    f = jax.jit(lambda z: field(z, sigma, cond))
    t = jnp.ones_like(x)
    jvp = jax.jit(lambda z: jax.jvp(lambda y: field(y, sigma, cond), (z,), (t,)))
    vjp = jax.jit(lambda z: jax.vjp(lambda y: field(y, sigma, cond), z)[1](t))
    for fn in (f, jvp, vjp):
        _block(fn(x))
    times = {"forward": [], "jvp": [], "vjp": []}
    for _ in range(runs):
        for name, fn in (("forward", f), ("jvp", jvp), ("vjp", vjp)):
            s = time.perf_counter()
            _block(fn(x))
            times[name].append(time.perf_counter() - s)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "forward_ms": 1e3 * med["forward"],
        "jvp": med["jvp"] / med["forward"],
        "vjp": med["vjp"] / med["forward"],
    }


class Setup:
    """Trajectories of one split: A's path, B-28, B-112, and the images and scores."""

    def __init__(self, pipe, pairs: list[Pair], seeds: int, steps: int):
        from rfmpc.data import attribute_accuracy, parse_prompt

        self.pipe, self.pairs, self.seeds, self.steps = pipe, pairs, seeds, steps
        self.field = pipe.guided_field(pipe.default_guidance)
        p, s = len(pairs), seeds
        shape = pipe.latent_shape(s, None, None)
        eps1 = jax.random.normal(jax.random.key(7), shape)
        self.eps = jnp.tile(eps1, (p, 1, 1, 1))  # the same seeds for every pair
        flat = lambda prompts: [q for q in prompts for _ in range(s)]
        self.cond_a = pipe.encode_prompt(flat([q.prompt_a for q in pairs]))
        self.cond_b = pipe.encode_prompt(flat([q.prompt_b for q in pairs]))
        self.sigmas = pipe.sigmas(steps)
        _, self.xa = integrate_path(self.field, self.eps, self.sigmas, self.cond_a)
        self.b28 = integrate(self.field, self.eps, self.sigmas, self.cond_b).x
        self.b112 = integrate(self.field, self.eps, pipe.sigmas(4 * steps), self.cond_b).x
        self.img28 = pipe.decode(self.b28)
        self.img112 = pipe.decode(self.b112)
        self.scenes_b = [parse_prompt(q.prompt_b) for q in pairs for _ in range(s)]
        self._acc = attribute_accuracy
        self._scratch: dict[int, dict] = {}

    def per_pair(self, a):
        """``(P * S, ...)`` -> ``(P, S, ...)``."""
        return jax.tree.map(lambda t: t.reshape((len(self.pairs), self.seeds, *t.shape[1:])), a)

    def flat(self, a):
        return jax.tree.map(lambda t: t.reshape((-1, *t.shape[2:])), a)

    def score(self, x) -> dict:
        from rfmpc.metrics import psnr

        img = self.pipe.decode(x)
        return {
            "psnr28": np.asarray(psnr(img, self.img28), np.float64),
            "psnr112": np.asarray(psnr(img, self.img112), np.float64),
            "fidelity": np.array(
                [self._acc(np.asarray(im), sc)["all"] for im, sc in zip(img, self.scenes_b)],
                np.float64,
            ),
        }

    def scratch(self, n: int) -> dict:
        """B from scratch on an ``n``-step grid (the equal-cost baseline), scored."""
        n = max(1, int(n))
        if n not in self._scratch:
            x = integrate(self.field, self.eps, self.pipe.sigmas(n), self.cond_b).x
            self._scratch[n] = self.score(x)
        return self._scratch[n]

    def state(self, k: int):
        """A's stacked per-pair states at ``k`` and what the cache stores beside them."""
        sig = self.sigmas
        xk = self.xa[k]
        v_a = self.field(xk, sig[k], self.cond_a)
        keys = jax.random.split(jax.random.key(11), len(self.pairs))
        xs, conds = self.per_pair(xk), self.per_pair(self.cond_a)
        states = stack_states(
            [
                TrajectoryState(
                    xs[i], k, sig, key=keys[i], cond=jax.tree.map(lambda a, i=i: a[i], conds)
                )
                for i in range(len(self.pairs))
            ]
        )
        cached = SwitchCache(
            velocity=self.per_pair(v_a),
            final=self.per_pair(self.xa[-1]),
            noise=self.per_pair(self.eps),
        )
        return states, cached


def run_k(setup: Setup, k: int, rows: list, ratios: dict, timing: bool, timing_runs: int):
    """Every controller at switch step ``k``: per-image records and per-method summaries."""
    states, cached = setup.state(k)
    conds_b = setup.per_pair(setup.cond_b)
    sims = jnp.asarray([p.similarity for p in setup.pairs], jnp.float32)
    out = []
    single = {}
    for label, ctrl in rows:
        print(f"  k={k} {label}", file=sys.stderr, flush=True)
        if label in SEQUENTIAL:
            call = lambda c=ctrl: _per_pair(setup, states, conds_b, c, sims, cached)
        else:
            call = lambda c=ctrl: switch_batch(
                setup.field, states, conds_b, c, similarity=sims, cached=cached
            )
        _block(call().x)  # compile
        t0 = time.perf_counter()
        res = call()
        _block(res.x)
        wall = time.perf_counter() - t0
        sc = setup.score(setup.flat(res.x))
        fwd = np.asarray(res.cost.forwards, np.float64)
        jv, vj = np.asarray(res.cost.jvps, np.float64), np.asarray(res.cost.vjps, np.float64)
        fe = fwd + ratios["jvp"] * jv + ratios["vjp"] * vj
        out.append(
            {
                "k": k,
                "method": label,
                "wall_batched_s": wall,
                "forwards": fwd,
                "jvps": jv,
                "vjps": vj,
                "fe": fe,
                "outcomes": [OUTCOMES[int(np.asarray(r._value))] for r in res.results],
                **sc,
            }
        )
        if timing:
            one = jax.tree.map(lambda a: a[0], states)
            one_c = jax.tree.map(lambda a: a[0], cached)
            one_b = jax.tree.map(lambda a: a[0], conds_b)
            single[label] = lambda c=ctrl, st=one, cb=one_b, ca=one_c: (
                switch(setup.field, st, cb, c, similarity=float(sims[0]), cached=ca).state.x
            )
            _block(single[label]())
    if timing:  # interleaved repeats of a single pair's switch
        walls = {label: [] for label in single}
        for _ in range(timing_runs):
            for label, fn in single.items():
                t0 = time.perf_counter()
                _block(fn())
                walls[label].append(time.perf_counter() - t0)
        for rec in out:
            rec["wall_single_s"] = statistics.median(walls[rec["method"]])
    # equal-cost baselines (per pair budget, rounded)
    s = setup.seeds
    for rec in out:
        eq = {"psnr28": [], "psnr112": [], "fidelity": []}
        for i, budget in enumerate(rec["fe"]):
            sc = setup.scratch(round(float(budget)))
            for key_ in eq:
                eq[key_].append(sc[key_][i * s : (i + 1) * s])
        rec.update({f"eq_{key_}": np.concatenate(v) for key_, v in eq.items()})
    return out


@dataclass(frozen=True)
class _Stacked:
    """What ``run_k`` reads of a ``BatchSwitchResult``, from a loop of single switches."""

    x: jax.Array
    cost: object
    results: list


def _per_pair(setup, states, conds_b, ctrl, sims, cached) -> _Stacked:
    from rfmpc.control import Cost

    xs, costs, results = [], [], []
    for i in range(len(setup.pairs)):
        take = lambda a, i=i: a[i]
        r = switch(
            setup.field,
            jax.tree.map(take, states),
            jax.tree.map(take, conds_b),
            ctrl,
            similarity=float(sims[i]),
            cached=jax.tree.map(take, cached),
        )
        xs.append(r.state.x)
        costs.append(r.cost)
        results.append(r.result)
    cost = Cost(
        forwards=jnp.asarray([c.forwards for c in costs]),
        jvps=jnp.asarray([c.jvps for c in costs]),
        vjps=jnp.asarray([c.vjps for c in costs]),
    )
    return _Stacked(jnp.stack(xs), cost, results)


def time_controllers(setup: Setup, ks: list[int], rows: list, runs: int) -> list[dict]:
    """Wall time of one pair's switch (its seeds as one batch) per controller and ``k``:
    compiled, median of ``runs`` repeats with the controllers interleaved, beside the plain
    denoising step measured the same way (a 28-step generation / 28)."""
    out = []
    for k in ks:
        states, cached = setup.state(k)
        one = jax.tree.map(lambda a: a[0], states)
        one_c = jax.tree.map(lambda a: a[0], cached)
        one_b = jax.tree.map(lambda a: a[0], setup.per_pair(setup.cond_b))
        sim = float(setup.pairs[0].similarity)
        fns = {}
        for label, ctrl in rows:
            print(f"  timing k={k} {label}", file=sys.stderr, flush=True)
            fns[label] = lambda c=ctrl, a=one, b=one_b, m=sim, ca=one_c: (
                switch(setup.field, a, b, c, similarity=m, cached=ca).state.x
            )
            _block(fns[label]())  # compile
        x0 = one_c.noise
        gen = eqx_filter_jit_generate(setup)
        _block(gen(x0, one_b))
        fns["(a 28-step generation)"] = lambda g=gen, a=x0, b=one_b: g(a, b)
        walls = {label: [] for label in fns}
        for _ in range(runs):
            for label, fn in fns.items():
                t0 = time.perf_counter()
                _block(fn())
                walls[label].append(time.perf_counter() - t0)
        med = {label: statistics.median(v) for label, v in walls.items()}
        step = med.pop("(a 28-step generation)") / setup.steps
        for label, ctrl in rows:
            window = ctrl.window(setup.steps - k)
            extra = med[label] - med["direct"]
            out.append(
                {
                    "k": k,
                    "method": label,
                    "wall_s": med[label],
                    "min_s": min(walls[label]),
                    "x_direct": med[label] / med["direct"],
                    "step_s": step,
                    "controlled_steps": window,
                    "overhead_per_controlled_step_pct": (
                        100.0 * extra / window / step if window else None
                    ),
                }
            )
    return out


def eqx_filter_jit_generate(setup: Setup):
    """B from the seed noise over the whole grid, jitted whole (the plain step's cost)."""
    import equinox as eqx

    sig = setup.sigmas

    @eqx.filter_jit
    def gen(x, cond):
        return integrate(setup.field, x, sig, cond).x

    return gen


def timing_markdown(recs: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| k | method | wall (1 pair, 4 images) | min | x direct | controlled steps | "
        "overhead per controlled step (% of a plain step) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        ov = r["overhead_per_controlled_step_pct"]
        lines.append(
            f"| {r['k']} | {r['method']} | {1e3 * r['wall_s']:.1f} ms | "
            f"{1e3 * r['min_s']:.1f} ms | "
            f"{r['x_direct']:.3f} | {r['controlled_steps']} | "
            f"{'-' if ov is None else f'{ov:.1f}%'} |"
        )
    step = {r["k"]: r["step_s"] for r in recs}
    lines += [
        "",
        "plain step (a jitted 28-step generation / 28): "
        + ", ".join(f"k={k}: {1e3 * v:.2f} ms" for k, v in step.items()),
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- statistics
def _cluster_boot(values: np.ndarray, clusters: int, fn=np.median, n: int = 2000, seed: int = 0):
    """``fn`` over all values and its 95% CI by resampling clusters (rows of ``values``)."""
    v = np.asarray(values, np.float64).reshape(clusters, -1)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, clusters, size=(n, clusters))
    stats = np.array([fn(v[i].reshape(-1)) for i in idx])
    return (
        float(fn(v.reshape(-1))),
        float(np.percentile(stats, 2.5)),
        float(np.percentile(stats, 97.5)),
    )


def _cap(x):
    return np.minimum(np.asarray(x, np.float64), 100.0)  # identical images: inf -> 100 dB


def summarise(recs: list[dict], pairs: list[Pair]) -> list[dict]:
    p = len(pairs)
    by = {(r["k"], r["method"]): r for r in recs}
    out = []
    for r in recs:
        d = by[r["k"], "direct"]
        row = {"k": r["k"], "method": r["method"]}
        for name in ("psnr28", "psnr112"):
            row[name] = _cluster_boot(_cap(r[name]), p)
            row[f"{name}_vs_direct"] = _cluster_boot(_cap(r[name]) - _cap(d[name]), p)
            row[f"{name}_vs_equal"] = _cluster_boot(_cap(r[name]) - _cap(r[f"eq_{name}"]), p)
            row[f"eq_{name}"] = _cluster_boot(_cap(r[f"eq_{name}"]), p)
        row["fidelity"] = _cluster_boot(r["fidelity"], p, np.mean)
        row["eq_fidelity"] = _cluster_boot(r["eq_fidelity"], p, np.mean)
        row["forwards"] = float(np.median(r["forwards"]))
        row["jvps"] = float(np.median(r["jvps"]))
        row["vjps"] = float(np.median(r["vjps"]))
        row["fe"] = float(np.median(r["fe"]))
        row["wall_batched_s"] = r["wall_batched_s"]
        if "wall_single_s" in r:
            row["wall_single_s"] = r["wall_single_s"]
            row["wall_vs_direct"] = r["wall_single_s"] / d["wall_single_s"]
        row["fallbacks"] = sum(o != "successful" for o in r["outcomes"])
        kinds = sorted({q.kind for q in pairs})
        per_kind = {}
        for kind in kinds:
            rows_ = [i for i, q in enumerate(pairs) if q.kind == kind]
            vals = _cap(r["psnr28"]).reshape(p, -1)[rows_]
            dv = _cap(d["psnr28"]).reshape(p, -1)[rows_]
            per_kind[kind] = (float(np.median(vals)), float(np.median(vals - dv)))
        row["per_kind"] = per_kind
        out.append(row)
    return out


def _ci(t) -> str:
    return f"{t[0]:.1f} [{t[1]:.1f}, {t[2]:.1f}]"


def markdown(summary: list[dict], header: str, pairs: list[Pair], ratios: dict) -> str:
    ks = sorted({r["k"] for r in summary})
    lines = [header, ""]
    bands = {name: sum(q.band == name for q in pairs) for *_, name in BANDS}
    kinds = {}
    for q in pairs:
        kinds[q.kind] = kinds.get(q.kind, 0) + 1
    lines += [
        f"- pairs: {len(pairs)} ({', '.join(f'{k} {v}' for k, v in kinds.items())}); "
        f"bands: {', '.join(f'{k} {v}' for k, v in bands.items())}",
        f"- measured cost of one JVP / VJP in forward passes: {ratios['jvp']:.2f} / "
        f"{ratios['vjp']:.2f} (forward {ratios['forward_ms']:.2f} ms, one pair's batch)",
        "- PSNR in dB (data range 1, per image), medians with 95% cluster-bootstrap CIs; "
        "'vs' columns are medians of paired per-image differences; identical images count as "
        "100 dB",
        "",
    ]
    for k in ks:
        rows = [r for r in summary if r["k"] == k]
        lines += [
            f"### k = {k} of 28",
            "",
            "| method | fwd | jvp | vjp | fwd-eq | wall (1 pair) | x direct | PSNR vs B-28 | "
            "vs direct | vs equal-cost | PSNR vs B-112 | vs direct | fidelity | equal-cost "
            "fidelity | fallbacks |",
            "|---|" + "---|" * 14,
        ]
        for r in rows:
            wall = f"{1e3 * r['wall_single_s']:.1f} ms" if "wall_single_s" in r else "-"
            ratio = f"{r['wall_vs_direct']:.2f}" if "wall_vs_direct" in r else "-"
            lines.append(
                f"| {r['method']} | {r['forwards']:.0f} | {r['jvps']:.0f} | {r['vjps']:.0f} | "
                f"{r['fe']:.1f} | {wall} | {ratio} | {_ci(r['psnr28'])} | "
                f"{_ci(r['psnr28_vs_direct'])} | {_ci(r['psnr28_vs_equal'])} | "
                f"{_ci(r['psnr112'])} | {_ci(r['psnr112_vs_direct'])} | "
                f"{r['fidelity'][0]:.2f} | {r['eq_fidelity'][0]:.2f} | {r['fallbacks']} |"
            )
        lines.append("")
        kinds_ = list(rows[0]["per_kind"])
        lines += [
            f"PSNR vs B-28 by edit kind at k = {k} (median; in brackets: median paired gain "
            "over direct)",
            "",
            "| method | " + " | ".join(kinds_) + " |",
            "|---|" + "---|" * len(kinds_),
        ]
        for r in rows:
            cells = [f"{v[0]:.1f} ({v[1]:+.1f})" for v in r["per_kind"].values()]
            lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], curve: dict, path: Path) -> None:
    """Per k: PSNR vs cost for every controller (95% CIs), the equal-cost curve, the front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r["k"] for r in summary})
    fig, axes = plt.subplots(2, len(ks), figsize=(4.6 * len(ks), 8.5), squeeze=False)
    cmap = plt.get_cmap("tab20")
    methods = list(dict.fromkeys(r["method"] for r in summary))
    for col, k in enumerate(ks):
        rows = [r for r in summary if r["k"] == k]
        for row, (key, ref) in enumerate((("psnr28", "B-28"), ("psnr112", "B-112"))):
            ax = axes[row, col]
            ns = sorted(curve)
            ax.plot(ns, [curve[n][key] for n in ns], "k--", lw=1, label="B from scratch (n steps)")
            pts = []
            for r in rows:
                i = methods.index(r["method"])
                m, lo, hi = r[key]
                ax.errorbar(
                    r["fe"],
                    m,
                    yerr=[[m - lo], [hi - m]],
                    fmt="o",
                    color=cmap(i % 20),
                    label=r["method"] if (row, col) == (0, 0) else None,
                    ms=5,
                )
                pts.append((r["fe"], m))
            front = sorted(pts)
            best, fr = -np.inf, []
            for x, y in front:
                if y > best:
                    fr.append((x, y))
                    best = y
            ax.plot(*zip(*fr), color="tab:red", lw=1, alpha=0.6)
            ax.set_xscale("log")
            ax.set_title(f"k = {k}: PSNR vs {ref}")
            ax.set_xlabel("forward-equivalents per pair (measured JVP/VJP cost)")
            ax.set_ylabel(f"median PSNR vs {ref} (dB)")
            ax.grid(alpha=0.3, which="both")
    fig.legend(loc="lower center", ncol=6, fontsize=7)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- tuning
TUNE_GRID = {  # effort on the state increment h u (MPC's units); h = 0.037 on the embedded grid
    "effort_weight": (0.22, 0.73, 2.2),
    "control_steps": (2, 3, 4, 6),
    "decay": (0.5, 0.7, 0.85),
}


def tune(setup: Setup, ks: list[int], ratios: dict) -> dict:
    """Grid search of the MPC's weights on the dev split; velocity-cosine terciles for
    ``Adaptive``."""
    import itertools

    results = []
    base = {}
    for k in ks:
        base[k] = run_k(setup, k, [("direct", Direct())], ratios, False, 0)[0]
    for r, m, d in itertools.product(*TUNE_GRID.values()):
        label = f"mpc r={r:g} m={m} d={d:g}"
        gains28, gains112 = [], []
        for k in ks:
            rec = run_k(
                setup,
                k,
                [(label, MPC(effort_weight=r, control_steps=m, decay=d))],
                ratios,
                False,
                0,
            )[0]
            gains28.append(float(np.median(_cap(rec["psnr28"]) - _cap(base[k]["psnr28"]))))
            gains112.append(float(np.median(_cap(rec["psnr112"]) - _cap(base[k]["psnr112"]))))
        results.append(
            {
                "effort_weight": r,
                "control_steps": m,
                "decay": d,
                "gain28": gains28,
                "gain112": gains112,
                "score": float(np.mean(gains28)),
            }
        )
        print(f"  {label}: {gains28} / {gains112}", file=sys.stderr, flush=True)
    results.sort(key=lambda z: (-z["score"], -float(np.mean(z["gain112"]))))
    # velocity cosines at the cached state, per pair, at each k
    cos = {}
    for k in ks:
        xk = setup.xa[k]
        va = setup.per_pair(setup.field(xk, setup.sigmas[k], setup.cond_a))
        vb = setup.per_pair(setup.field(xk, setup.sigmas[k], setup.cond_b))
        num = jnp.sum(va * vb, axis=(1, 2, 3, 4))
        den = jnp.linalg.norm(va.reshape(va.shape[0], -1), axis=1) * jnp.linalg.norm(
            vb.reshape(vb.shape[0], -1), axis=1
        )
        cos[k] = np.asarray(num / den).tolist()
    allc = np.concatenate([np.asarray(v) for v in cos.values()])
    return {
        "ks": ks,
        "grid": TUNE_GRID,
        "results": results,
        "best": results[0],
        "velocity_cosines": cos,
        "velocity_terciles": [float(np.percentile(allc, 66.7)), float(np.percentile(allc, 33.3))],
    }


# ----------------------------------------------------------------------------- GMM
def gmm_report(samples: int = 512) -> tuple[str, list[dict]]:
    """Exact conditional GMM: analytic-linearisation MPC vs the exact-Jacobian MPC (per-sample
    2x2 JVP blocks are the exact Jacobian; OSQP to 1e-6 solves its QP) vs the direct switch."""
    from rfmpc.flow import ConditionalGaussianMixture

    key = jax.random.key(0)
    k_dir, k_noise = jax.random.split(key)
    dirs = jax.random.normal(k_dir, (3, 2))
    dirs = dirs / jnp.linalg.norm(dirs, axis=-1, keepdims=True)
    fams = {
        "wide": ([[-1.5, 0.0], [1.5, 0.5], [0.0, -2.5]], [0.1, 0.2, 0.15]),
        "tight": ([[-2.0, 0.0], [1.5, 1.5], [1.0, -2.0]], [0.05, 0.1, 0.2]),
    }
    deltas = (0.1, 0.3, 1.0)
    n = 28
    sig = flowmatch_sigmas(n, 3.0)
    eps = jax.random.normal(k_noise, (samples, 2))
    ctrls = {
        "direct": Direct(),
        "mpc (analytic J, LQR)": MPC(),
        "mpc (exact J, OSQP)": MPC(linearisation=JVPBlocks(), solver=OSQP(tol=1e-6)),
        "mpc (frozen 8, LQR)": MPC(linearisation=Frozen(probes=8)),
    }
    rows = []
    for fam, (m, v) in fams.items():
        m = jnp.asarray(m)
        cov = jnp.asarray(v)[:, None, None] * jnp.eye(2)[None]
        for d in deltas:
            gm = ConditionalGaussianMixture(
                jnp.ones((2, 3)) / 3, jnp.stack([m, m + d * dirs]), jnp.stack([cov, cov])
            )
            _, xa = integrate_path(gm, eps, sig, jnp.int32(0))
            xb = integrate(gm, eps, sig, jnp.int32(1)).x
            for k in (7, 14):
                st = TrajectoryState(xa[k], k, sig, key=jax.random.key(1), cond=jnp.int32(0))
                cached = SwitchCache(velocity=gm(xa[k], sig[k], jnp.int32(0)), noise=eps)
                for name, c in ctrls.items():
                    r = switch(gm, st, jnp.int32(1), c, cached=cached)
                    rmse = float(jnp.sqrt(jnp.mean(jnp.sum((r.state.x - xb) ** 2, -1))))
                    rows.append(
                        {
                            "family": fam,
                            "delta": d,
                            "k": k,
                            "method": name,
                            "rmse": rmse,
                            "outcome": r.outcome,
                            **r.cost.to_dict(),
                        }
                    )
    lines = [
        "| family | delta | k | direct | MPC analytic J | MPC exact J | MPC frozen | "
        "gap analytic vs exact |",
        "|---|---|---|---|---|---|---|---|",
    ]
    get = {(r["family"], r["delta"], r["k"], r["method"]): r for r in rows}
    for fam in fams:
        for d in deltas:
            for k in (7, 14):
                e = [get[fam, d, k, name]["rmse"] for name in ctrls]
                gap = (e[1] - e[2]) / e[2]
                lines.append(
                    f"| {fam} | {d} | {k} | {e[0]:.4f} | {e[1]:.4f} | {e[2]:.4f} | {e[3]:.4f} | "
                    f"{100 * gap:+.1f}% |"
                )
    return "\n".join(lines) + "\n", rows


# ----------------------------------------------------------------------------- main
def _load() -> float:
    return loadavg_1min(float("nan"))


def _header(title: str, args, extra: str = "") -> str:
    dev = jax.devices()[0]
    return (
        f"## {title}\n\n- device: {dev.platform} ({dev.device_kind}), {os.cpu_count()} cores; "
        f"jax {jax.__version__}; date {_dt.date.today().isoformat()}; load average (1 min) at "
        f"start {args.load_start:.2f}, end {_load():.2f}\n"
        f"- command: `python -m benchmarks.switch_quality {' '.join(args.argv)}`{extra}"
    )


def _jsonable(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--provider", default="embedded", choices=("embedded", "gmm"))
    ap.add_argument(
        "--split",
        default=None,
        choices=("dev", "heldout"),
        help="default: heldout (dev with --tune)",
    )
    ap.add_argument("--per-kind", type=int, default=3, help="pairs per edit kind")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--ks", default="5,10,14,18")
    ap.add_argument("--methods", default=None, help="comma-separated row labels")
    ap.add_argument("--timing-runs", type=int, default=7)
    ap.add_argument("--no-timing", action="store_true", help="quality only (a loaded machine)")
    ap.add_argument(
        "--timing-only",
        action="store_true",
        help="only the single-pair wall times (run on an idle machine)",
    )
    ap.add_argument(
        "--force",
        action="store_true",
        help="write a timing file although the load is above 1.5 per core",
    )
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 pair per kind, 1 seed")
    ap.add_argument("--save", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.load_start = _load()
    if args.seeds < 1 or args.per_kind < 1:
        ap.error("--seeds and --per-kind must be >= 1")
    ks = [int(k) for k in args.ks.split(",")]
    if any(not 0 < k < 28 for k in ks):
        ap.error("every k must lie in (0, 28)")
    stamp = _dt.date.today().isoformat()
    if args.provider == "gmm":
        table, rows = gmm_report()
        md = _header("switch_quality (exact conditional GMM, N = 28, 512 samples)", args) + (
            "\n\nRMSE of the final latents against B from scratch (same seed). The exact "
            "Jacobian: per-sample 2x2 JVP blocks (samples are independent).\n\n" + table
        )
        print(md)
        if args.json:
            print(json.dumps(rows))
        if args.save:
            save_result(
                RESULTS_DIR / f"{stamp}-cpu-switch_quality_gmm",
                {".md": md, ".json": json.dumps(rows)},
            )
        return 0
    from rfmpc.pipeline import load_pipeline

    pipe = load_pipeline(None)
    split = args.split or ("dev" if args.tune else "heldout")
    per_kind, seeds = (1, 1) if args.quick else (args.per_kind, args.seeds)
    t0 = time.perf_counter()
    pairs = make_pairs(pipe, split, per_kind, min_per_band=1 if args.quick else 2)
    setup = Setup(pipe, pairs, seeds, 28)
    one = setup.per_pair(setup.xa[10])[0]
    ratios = measure_ratios(
        setup.field, one, setup.sigmas[10], jax.tree.map(lambda a: a[:seeds], setup.cond_b)
    )
    if args.tune:
        res = tune(setup, [k for k in ks if k in (10, 14)] or ks, ratios)
        res.update(ratios=ratios, pairs=[p.__dict__ for p in pairs])
        res["wall_s"] = time.perf_counter() - t0
        best = res["best"]
        md = _header(f"switch tuning (dev split, {len(pairs)} pairs x {seeds} seeds)", args) + (
            f"\n\nbest MPC: effort_weight={best['effort_weight']}, control_steps="
            f"{best['control_steps']}, decay={best['decay']} (median paired gain over direct "
            f"vs B-28 at k={res['ks']}: {best['gain28']}, vs B-112: {best['gain112']})\n"
            f"velocity-cosine terciles (Adaptive.velocity_thresholds): "
            f"{res['velocity_terciles']}\n\n| effort | steps | decay | gain vs B-28 | "
            "gain vs B-112 |\n|---|---|---|---|---|\n"
            + "\n".join(
                f"| {r['effort_weight']:g} | {r['control_steps']} | {r['decay']:g} | "
                f"{', '.join(f'{g:+.2f}' for g in r['gain28'])} | "
                f"{', '.join(f'{g:+.2f}' for g in r['gain112'])} |"
                for r in res["results"]
            )
            + "\n"
        )
        print(md)
        if args.save:
            save_result(
                RESULTS_DIR / f"{stamp}-cpu-switch_tuning",
                {".md": md, ".json": json.dumps(res, default=_jsonable)},
            )
        return 0
    rows = controllers()
    if args.quick:
        rows = [r for r in rows if r[0] in QUICK]
    if args.methods:
        want = args.methods.split(",")
        rows = [r for r in rows if r[0] in want]
        if not any(r[0] == "direct" for r in rows):
            rows.insert(0, ("direct", Direct()))
    if args.timing_only:
        load = _load()
        loaded = load > 1.5 * (os.cpu_count() or 1)
        if loaded and not args.force:
            ap.error(
                f"load average {load:.2f} is above 1.5 per core: the timings would not be a "
                "result; wait for an idle machine or pass --force (the file is marked)"
            )
        trecs = time_controllers(setup, ks, rows, args.timing_runs)
        header = _header(
            f"switch timing ({split} split, pair 0 x {seeds} seeds, N = 28)"
            + (" -- LOADED MACHINE" if loaded else ""),
            args,
        )
        md = timing_markdown(trecs, header)
        print(md)
        if args.save:
            stem = RESULTS_DIR / f"{stamp}-cpu-switch_timing"
            save_result(stem, {".md": md, ".json": json.dumps(trecs, default=_jsonable)})
        return 0
    recs = []
    for k in ks:
        recs += run_k(setup, k, rows, ratios, timing=False, timing_runs=0)
    summary = summarise(recs, pairs)
    curve = {}
    for n in (4, 6, 8, 10, 14, 18, 23, 28):
        sc = setup.scratch(n)
        curve[n] = {key: float(np.median(_cap(sc[key]))) for key in ("psnr28", "psnr112")}
    header = _header(
        f"switch_quality ({split} split, {len(pairs)} pairs x {seeds} seeds, N = 28)",
        args,
        f"\n- total wall {time.perf_counter() - t0:.0f} s (compilation included)",
    )
    md = markdown(summary, header, pairs, ratios)
    md += (
        "\nB from scratch at n steps (the equal-cost curve), median PSNR vs B-28 / B-112: "
        + (", ".join(f"{n}: {c['psnr28']:.1f} / {c['psnr112']:.1f}" for n, c in curve.items()))
        + "\n"
    )
    print(md)
    payload = {
        "summary": summary,
        "curve": curve,
        "ratios": ratios,
        "pairs": [p.__dict__ for p in pairs],
    }
    if args.json:
        print(json.dumps(payload, default=_jsonable))
    if args.save:
        stem = RESULTS_DIR / f"{stamp}-cpu-switch_quality{'_quick' if args.quick else ''}"
        stem = save_result(stem, {".md": md, ".json": json.dumps(payload, default=_jsonable)})
        plot(summary, curve, stem.with_suffix(".png"))
        print(f"wrote {stem}.{{md,json,png}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
