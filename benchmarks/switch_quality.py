"""Prompt-switch quality vs cost: every ``rfmpc.control.switch`` method against B from scratch.

    python benchmarks/switch_quality.py                 # GMM provider, N = 28, k in {7, 14}
    python benchmarks/switch_quality.py --ks 7,14,20 --samples 256 --save --json

Setting (issue 7). Prompt A runs ``k`` of ``N`` steps from seed noise ``eps`` and is cached;
prompt B is finished from that state. The reference is **B from scratch with the same seed**
(``N`` steps); the score is the RMSE of the final latents against it,
``sqrt(mean_samples ||x - x_B||^2)``. Per method we report RMSE, NFE (model evaluations,
planning, JVP probes and VJPs included), wall and planning time (a second, compiled call; CPU),
and ``speedup = N / NFE`` (from scratch costs N calls; for a method with no extra calls this is
the brief's ``N / (N - k + planning NFE)``). Beside them, in the same run:

* ``equal-NFE``: B from scratch with only ``N - k`` steps (a fresh ``N - k`` grid), the
  baseline a cache hit must beat to be worth it;
* ``sdedit``: A's final image re-noised to ``sigma_k`` with fresh noise, then B (counted with
  A's ``N - k`` finishing calls; a cache that also stores A's final image saves them).

Field providers. A provider yields the velocity field, the seed noise and the prompt pairs with
a similarity label; the GMM provider below is exact and cheap. The embedded model's provider
plugs into the same loop (``PROVIDERS``; to be added with the model).

GMM provider. ``ConditionalGaussianMixture`` in 2-D, 3 components per prompt; prompt A and three
B prompts whose component means are moved by ``delta`` in {0.1, 0.3, 1.0} along fixed random
unit directions (same weights and covariances). Two families: ``wide`` (component std 0.3-0.45,
means ~3 apart) and ``tight`` (std 0.22-0.45, more curved flow). Similarity proxy: the cosine of
``v_A`` and ``v_B`` over all samples at the cached state (what ``adaptive`` measures), and
``delta`` itself. Each sample is an independent trajectory; ``--samples`` of them form one
state, so the MPC's per-pixel Jacobian blocks (one per sample) are exact here.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rfmpc.control import from_scratch_equal_nfe, switch, velocity_similarity
from rfmpc.flow import (
    ConditionalGaussianMixture,
    TrajectoryState,
    flowmatch_sigmas,
    integrate_path,
)

RESULTS = Path(__file__).resolve().parent / "results"

#: (row label, switch method, extra switch options)
METHOD_ROWS: list[tuple[str, str, dict]] = [
    ("direct", "direct", {}),
    ("blend", "blend", {}),
    ("adaptive", "adaptive", {}),
    ("reproject", "reproject", {}),
    ("reproject[a-implied]", "reproject", {"noise_target": "a-implied"}),
    ("sdedit", "sdedit", {}),
    ("shooting", "shooting", {}),
    ("multiple-shooting", "multiple-shooting", {}),
    ("mpc", "mpc", {}),
    ("mpc[a-implied]", "mpc", {"noise_target": "a-implied"}),
    ("shooting-mpc", "shooting-mpc", {}),
]


# ----------------------------------------------------------------------------- providers
@dataclass
class Pair:
    label: str  # e.g. "wide d=0.3"
    family: str
    delta: float
    cond_a: Any
    cond_b: Any


class FieldProvider:
    """Interface: a velocity field, a sigma shift, seed noise, and prompt pairs."""

    name: str = "abstract"
    field: Callable
    shift: float = 3.0

    def noise(self) -> jax.Array:  # the seed noise (one state)
        raise NotImplementedError

    def pairs(self) -> Iterator[Pair]:
        raise NotImplementedError


class GMMProvider(FieldProvider):
    name = "gmm"

    def __init__(self, samples: int = 256, deltas=(0.1, 0.3, 1.0), seed: int = 0):
        self.samples = samples
        self.deltas = tuple(deltas)
        key = jax.random.key(seed)
        k_dir, self._k_noise = jax.random.split(key)
        dirs = jax.random.normal(k_dir, (3, 2))
        dirs = dirs / jnp.linalg.norm(dirs, axis=-1, keepdims=True)
        families = {
            "wide": ([[-1.5, 0.0], [1.5, 0.5], [0.0, -2.5]], [0.1, 0.2, 0.15]),
            "tight": ([[-2.0, 0.0], [1.5, 1.5], [1.0, -2.0]], [0.05, 0.1, 0.2]),
        }
        means, covs, self._index = [], [], {}
        for fam, (m, v) in families.items():
            m = jnp.asarray(m)
            cov = jnp.asarray(v)[:, None, None] * jnp.eye(2)[None]
            self._index[fam, None] = len(means)
            means.append(m)
            covs.append(cov)
            for d in self.deltas:
                self._index[fam, d] = len(means)
                means.append(m + d * dirs)
                covs.append(cov)
        p = len(means)
        self.field = ConditionalGaussianMixture(
            jnp.ones((p, 3)) / 3, jnp.stack(means), jnp.stack(covs)
        )
        self.families = tuple(families)

    def noise(self) -> jax.Array:
        return jax.random.normal(self._k_noise, (self.samples, 2))

    def pairs(self) -> Iterator[Pair]:
        for fam in self.families:
            for d in self.deltas:
                yield Pair(
                    f"{fam} d={d}",
                    fam,
                    d,
                    jnp.int32(self._index[fam, None]),
                    jnp.int32(self._index[fam, d]),
                )


BANDS = (
    (0.95, 1.01, ">0.95"),
    (0.90, 0.95, "0.90-0.95"),
    (0.85, 0.90, "0.85-0.90"),
    (-1.0, 0.85, "<0.85"),
)


class EmbeddedProvider(FieldProvider):
    """The embedded default model: prompt pairs in pooled-similarity bands (the cache's metric).

    Pairs are drawn from the procedural grammar (an anchor scene and a mutation of one or more
    attributes), binned by the cosine similarity of the text encoder's pooled embeddings into
    the bands >0.95, 0.90-0.95, 0.85-0.90 and <0.85, ``per_band`` pairs each. A state holds
    ``samples`` images (seeds) of the same prompt. The field is the CFG-guided model (guidance
    as the pipeline's default), so conditions are ``(cond, uncond)`` pairs. Quality is also
    reported as PSNR / SSIM of the decoded images against B from scratch (same seeds).
    """

    name = "embedded"

    def __init__(self, samples: int = 4, per_band: int = 2, seed: int = 0):
        from rfmpc.data.grammar import sample_scene, to_prompt
        from rfmpc.data.scene import DEFAULT_SHAPES
        from rfmpc.data.train_text import mutate_scene
        from rfmpc.pipeline import load_pipeline

        self.pipe = load_pipeline(None)
        self.field = self.pipe.guided_field(self.pipe.default_guidance)
        self.shift = self.pipe.shift
        self.samples = samples
        self._k_noise = jax.random.key(seed)
        rng = np.random.default_rng(seed)
        found: dict[str, list] = {b[2]: [] for b in BANDS}
        for _ in range(4000):
            if all(len(v) >= per_band for v in found.values()):
                break
            a = sample_scene(rng, n_objects=int(rng.integers(1, 3)))
            b = mutate_scene(a, rng, int(rng.integers(1, 4)), shapes=DEFAULT_SHAPES)
            pa, pb = to_prompt(a), to_prompt(b)
            pooled = np.asarray(self.pipe.text_encoder.pooled([pa, pb]), np.float64)
            sim = float(pooled[0] @ pooled[1] / np.prod(np.linalg.norm(pooled, axis=1)))
            for lo, hi, name in BANDS:
                if lo <= sim < hi and len(found[name]) < per_band:
                    found[name].append((pa, pb, sim))
        self._pairs = found

    def noise(self) -> jax.Array:
        shape = self.pipe.latent_shape(self.samples, None, None)
        return jax.random.normal(self._k_noise, shape)

    def _cond(self, prompt: str):
        c, u = self.pipe.encode_prompt([prompt] * self.samples)
        return (c, u)

    def decode(self, x):
        return self.pipe.decode(x)

    def fidelity(self, label: str, images) -> float:
        """Fraction of images with every attribute of prompt B right (exact analyzer)."""
        from rfmpc.data import attribute_accuracy, parse_prompt

        scene = parse_prompt(self._prompt_b[label])
        return float(np.mean([attribute_accuracy(im, scene)["all"] for im in np.asarray(images)]))

    def pairs(self) -> Iterator[Pair]:
        self._prompt_b = {}
        for band, items in self._pairs.items():
            for i, (pa, pb, sim) in enumerate(items):
                self._prompt_b[f"sim {band} #{i}"] = pb
                yield Pair(f"sim {band} #{i}", band, round(sim, 3), self._cond(pa), self._cond(pb))


PROVIDERS: dict[str, Callable[..., FieldProvider]] = {
    "gmm": GMMProvider,
    "embedded": EmbeddedProvider,
}


# ----------------------------------------------------------------------------- measurement
def _rmse(x, ref) -> float:
    return float(jnp.sqrt(jnp.mean(jnp.sum((x - ref) ** 2, axis=-1))))


def _image_scores(provider, x, ref, label: str) -> dict:
    """PSNR (dB) and SSIM of decoded images vs the decoded reference, and prompt fidelity
    (fraction of images with every attribute of B right) for providers that decode."""
    if not hasattr(provider, "decode"):
        return {}
    from rfmpc.inverse.metrics import psnr, ssim

    a, b = provider.decode(x), provider.decode(ref)
    return {
        "psnr_db": float(jnp.mean(psnr(a, b))),
        "ssim": float(jnp.mean(ssim(a, b))),
        "fidelity": provider.fidelity(label, a),
    }


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    jax.block_until_ready(jax.tree.leaves(out))
    return out, time.perf_counter() - t


def run(provider: FieldProvider, num_steps: int, ks: list[int]) -> list[dict]:
    """All (pair, k, method) rows for one provider."""
    field, n = provider.field, num_steps
    sig = flowmatch_sigmas(n, provider.shift)
    eps = provider.noise()
    key = jax.random.key(1234)
    rows: list[dict] = []
    pairs = list(provider.pairs())
    traj = {}  # per pair: A's path and B's reference
    for pr in pairs:
        _, xs_a = integrate_path(field, eps, sig, pr.cond_a)
        _, xs_b = integrate_path(field, eps, sig, pr.cond_b)
        traj[pr.label] = (xs_a, xs_b[-1])
    for k in ks:
        for pi, pr in enumerate(pairs):
            xs_a, ref = traj[pr.label]
            st = TrajectoryState(xs_a[k], k, sig, key=key, cond=pr.cond_a)
            sim = float(
                velocity_similarity(
                    field(xs_a[k], sig[k], pr.cond_a), field(xs_a[k], sig[k], pr.cond_b)
                )
            )
            base = dict(
                provider=provider.name,
                family=pr.family,
                delta=pr.delta,
                pair=pr.label,
                k=k,
                sigma_k=float(sig[k]),
                similarity=sim,
                N=n,
            )
            if hasattr(provider, "decode"):
                rows.append(
                    dict(
                        base,
                        method="B from scratch (target)",
                        rmse=0.0,
                        nfe=n,
                        wall_s=float("nan"),
                        planning_s=0.0,
                        psnr_db=float("inf"),
                        ssim=1.0,
                        fidelity=provider.fidelity(pr.label, provider.decode(ref)),
                    )
                )
            # baselines: A's own result (no switch) and B from scratch with N - k steps
            rows.append(
                dict(
                    base,
                    method="no-switch (A's image)",
                    rmse=_rmse(xs_a[-1], ref),
                    nfe=n - k,
                    wall_s=float("nan"),
                    planning_s=0.0,
                )
            )
            eq_fn = lambda cb=pr.cond_b, m=n - k: (
                from_scratch_equal_nfe(field, eps, cb, m, provider.shift).x
            )
            if pi == 0:
                _timed(eq_fn)
            x_eq, t_eq = _timed(eq_fn)
            rows.append(
                dict(
                    base,
                    **_image_scores(provider, x_eq, ref, pr.label),
                    method="equal-NFE (N-k steps)",
                    rmse=_rmse(x_eq, ref),
                    nfe=n - k,
                    wall_s=t_eq,
                    planning_s=0.0,
                )
            )
            for label, method, opts in METHOD_ROWS:
                call = lambda m=method, o=opts, st=st, cb=pr.cond_b: switch(
                    field, st, cb, method=m, noise=eps, **o
                )
                if pi == 0:  # compile (and warm up) once per (method, k): shapes are shared
                    call()
                res = call()
                rows.append(
                    dict(
                        base,
                        **_image_scores(provider, res.state.x, ref, pr.label),
                        method=label,
                        rmse=_rmse(res.state.x, ref),
                        nfe=res.nfe,
                        wall_s=res.wall_s,
                        planning_s=res.planning_s,
                        fallback=res.fallback,
                    )
                )
            print(f"  k={k} {pr.label}: done", file=sys.stderr, flush=True)
    for r in rows:
        r["speedup"] = r["N"] / r["nfe"] if r["nfe"] else float("nan")
    return rows


# ----------------------------------------------------------------------------- reporting
def _method_order(rows):
    seen = []
    for r in rows:
        if r["method"] not in seen:
            seen.append(r["method"])
    return seen


def markdown(rows: list[dict], header: str) -> str:
    all_methods = _method_order(rows)
    methods = [m for m in all_methods if not m.startswith("B from scratch")]
    cols = sorted(
        {(r["family"], r["delta"], r["k"]) for r in rows}, key=lambda c: (c[2], c[0], c[1])
    )
    ks = sorted({r["k"] for r in rows})
    get = {(r["method"], r["family"], r["delta"], r["k"]): r for r in rows}
    out = [header, "", "### RMSE vs B from scratch (same seed, N steps); lower is better", ""]
    out.append("| method | " + " | ".join(f"{f} d={d} k={k}" for f, d, k in cols) + " |")
    out.append("|---|" + "---|" * len(cols))
    sims = " | ".join(f"{get['direct', f, d, k]['similarity']:.3f}" for f, d, k in cols)
    out.append(f"| *(velocity cosine at x_k)* | {sims} |")
    for m in methods:
        cells = []
        for f, d, k in cols:
            r = get.get((m, f, d, k))
            best = min(
                get[mm, f, d, k]["rmse"]
                for mm in methods
                if (mm, f, d, k) in get and not mm.startswith("no-switch")
            )
            txt = f"{r['rmse']:.4f}" if r else "-"
            cells.append(f"**{txt}**" if r and r["rmse"] == best else txt)
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    if any("psnr_db" in r for r in rows):
        out += [
            "",
            "### PSNR dB / SSIM vs B from scratch (same seeds) / prompt fidelity "
            "(share of images with every attribute of B right, exact analyzer)",
            "",
        ]
        out.append("| method | " + " | ".join(f"{f} ({d}) k={k}" for f, d, k in cols) + " |")
        out.append("|---|" + "---|" * len(cols))
        for m in all_methods:
            if m.startswith("no-switch") or "psnr_db" not in get.get((m, *cols[0]), {}):
                continue
            cells = [
                f"{get[m, f, d, k]['psnr_db']:.1f} / {get[m, f, d, k]['ssim']:.3f} / "
                f"{get[m, f, d, k]['fidelity']:.2f}"
                if (m, f, d, k) in get
                else "-"
                for f, d, k in cols
            ]
            out.append(f"| {m} | " + " | ".join(cells) + " |")
    out += ["", "### Cost (NFE, speedup = N / NFE; times: median over pairs, compiled, CPU)", ""]
    out.append(
        "| method | "
        + " | ".join(f"NFE k={k} | speedup k={k}" for k in ks)
        + " | wall ms | planning ms | helps vs direct (of "
        + str(len(cols))
        + ") |"
    )
    out.append("|---|" + "---|" * (2 * len(ks) + 3))
    for m in methods:
        cells = []
        for k in ks:
            rs = [r for r in rows if r["method"] == m and r["k"] == k]
            nfes = sorted({r["nfe"] for r in rs})
            nfe = f"{nfes[0]}" if len(nfes) == 1 else f"{nfes[0]}-{nfes[-1]}"
            sp = statistics.median(r["speedup"] for r in rs)
            cells += [nfe, f"{sp:.2f}x"]
        rs = [r for r in rows if r["method"] == m]
        wall = statistics.median(r["wall_s"] for r in rs) * 1e3
        plan = statistics.median(r["planning_s"] for r in rs) * 1e3
        wins = sum(r["rmse"] < get["direct", r["family"], r["delta"], r["k"]]["rmse"] for r in rs)
        out.append(f"| {m} | " + " | ".join(cells) + f" | {wall:.1f} | {plan:.1f} | {wins} |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = _method_order(rows)
    fams = sorted({r["family"] for r in rows})
    fig, axes = plt.subplots(1, len(fams), figsize=(6.5 * len(fams), 5), sharey=True)
    axes = np.atleast_1d(axes)
    cmap = plt.get_cmap("tab20")
    for ax, fam in zip(axes, fams):
        ks = sorted({r["k"] for r in rows})
        marks = "os^Dv"
        for i, m in enumerate(methods):
            for j, k in enumerate(ks):
                rs = [r for r in rows if r["method"] == m and r["family"] == fam and r["k"] == k]
                use_psnr = all("psnr_db" in r and np.isfinite(r["psnr_db"]) for r in rs)
                if not rs or (any("psnr_db" in r for r in rows) and not use_psnr):
                    continue
                ax.scatter(
                    [r["speedup"] for r in rs],
                    [r["psnr_db"] if use_psnr else r["rmse"] for r in rs],
                    s=[18 + 40 * r["delta"] for r in rs],
                    color=cmap(i % 20),
                    marker=marks[j % len(marks)],
                    label=m if j == 0 else None,
                    alpha=0.8,
                )
        ax.set_xscale("log")
        if not any("psnr_db" in r for r in rows):
            ax.set_yscale("log")
        ax.axvline(1.0, color="gray", lw=0.8, ls=":")
        ax.set_xlabel("speedup vs B from scratch (N / NFE)")
        ax.set_title(f"{rows[0]['provider']} '{fam}': marker o/s/^ = k in {ks}")
        ax.grid(alpha=0.3, which="both")
    has_psnr = any("psnr_db" in r for r in rows)
    axes[0].set_ylabel(
        "PSNR dB vs B from scratch (same seeds)"
        if has_psnr
        else "RMSE vs B from scratch (same seed)"
    )
    axes[-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--provider", default="gmm", choices=sorted(PROVIDERS))
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--ks", default="7,14", help="switch steps, comma separated")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--save", action="store_true", help="write results/<date>-cpu-...{md,png,json}")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    args = ap.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    if any(not 0 < k < args.steps for k in ks):
        ap.error(f"every k must lie in (0, {args.steps})")
    provider = PROVIDERS[args.provider](samples=args.samples)
    if args.provider == "embedded" and args.samples > 16:
        ap.error("--samples is the number of seeds per state for the embedded model (<= 16)")
    dev = jax.devices()[0]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t0 = time.perf_counter()
    rows = run(provider, args.steps, ks)
    total = time.perf_counter() - t0
    header = (
        f"## switch_quality ({provider.name}): N={args.steps}, k in {ks}, "
        f"{args.samples} samples per state\n\n"
        f"device: {dev.platform} ({dev.device_kind}); jax {jax.__version__}; load average at "
        f"start {load:.1f}; total {total:.0f} s incl. compilation; date "
        f"{_dt.date.today().isoformat()}"
    )
    md = markdown(rows, header)
    print(md)
    if args.json:
        print(json.dumps(rows, indent=1, default=float))
    if args.save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = RESULTS / f"{_dt.date.today().isoformat()}-cpu-switch_quality_{provider.name}"
        stem.with_suffix(".md").write_text(md)
        stem.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=float))
        plot(rows, stem.with_suffix(".png"))
        print(f"wrote {stem}.{{md,json,png}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
