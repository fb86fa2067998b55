"""One report: every benchmark this device allows, each beside its reference, measured in one run.

    python -m benchmarks.report                       # auto: CPU profile here, GPU profile on GPU
    python -m benchmarks.report --quick               # smaller/fewer cases (a smoke run)
    python -m benchmarks.report --config tiny-gpu-path  # the GPU code path (bf16) at toy size
    python -m benchmarks.report --only mmdit --only vae --json --out /tmp/r
    python -m benchmarks.report --render benchmarks/results/<file>.json  # markdown again

Sections (``--only``; default all): ``peak`` (device info and the FLOP/s peak MFU is taken
against), ``mmdit`` (rfmpc vs diffusers eager and ``torch.compile``), ``generation`` (28 steps +
CFG, rfmpc vs the diffusers pipeline, eager and with a compiled transformer), ``vae`` (decode,
same weights), ``switch`` (wall time / NFE per :func:`rfmpc.control.switch` method against plain
denoising), ``inverse`` (time per image / NFE of every method in
:data:`rfmpc.inverse.METHODS` on one task), and the optional ``precision`` and
``shooting_memory`` sections (``benchmarks/precision.py`` / ``benchmarks/shooting_memory.py``
when they exist and expose ``run(quick) -> dict``).

Every measurement runs in its own subprocess, one after the other, so each gets its own peak
memory: the device's ``peak_bytes_in_use`` on a GPU, the process's peak RSS (``ru_maxrss``,
everything the child ever held: interpreter, libraries, model, compilation) on CPU; where rfmpc
compiles ahead of time the executable's ``memory_analysis()`` (temp + argument + output bytes) is
reported beside it. Compile time is reported apart from steady-state time everywhere and each
figure says how it was obtained: ``aot`` (``jit(f).lower(...).compile()`` timed) or
``first-steady`` (first call minus the steady-state median). A failure (say ``torch.compile``
without a working C compiler) is recorded as its reason in the table, never as a number.

Writes ``<out>/<date>-<device>[-<config>][-quick].md`` and ``.json`` (default out:
``benchmarks/results``). See ``docs/benchmarks.md`` for how to read the report.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file: re-run as a module
    import _as_module  # noqa: F401  (execs `python -m benchmarks.<name>`, never returns)

import argparse
import dataclasses
import datetime as _dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import (
    RESULTS,
    child_env,
    loadavg_1min,
    module_cmd,
    peak_memory,
    save_result,
)
from benchmarks.report_markdown import ALL_SECTIONS, OPTIONAL, _device_name, markdown
from rfmpc.cli.switch import CONTROLLERS

HERE = Path(__file__).resolve().parent

#: Every registered controller (``rfmpc.cli.switch.CONTROLLERS``, the one name -> class map).
SWITCH_METHODS = tuple(CONTROLLERS)
#: The quick profiles' subset, in the registry's order (tests check the names are registered).
QUICK_SWITCH_METHODS = tuple(
    m for m in SWITCH_METHODS if m in {"direct", "blend", "reproject", "mpc", "shooting"}
)


@dataclasses.dataclass(frozen=True)
class VAECase:
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int
    latent_hw: tuple[int, int]
    batch: int
    dtype: str  # "float32" | "bfloat16"


_SD3_VAE = (128, 256, 512, 512)


@dataclasses.dataclass(frozen=True)
class Profile:
    """What one device class measures (sizes chosen so the CPU report fits in ~15 minutes)."""

    name: str
    description: str
    mmdit_cases: tuple[str, ...]  # keys of mmdit_speed.CASES
    mmdit_runs: int
    generation: tuple[tuple[str, int, str], ...]  # (pipeline_speed config, steps, dtype)
    generation_runs: int
    vae: VAECase
    vae_runs: int
    switch_field: str  # "embedded" or an mmdit_speed case (random weights, CFG)
    switch_samples: int
    switch_steps: int
    switch_k: int
    switch_methods: tuple[str, ...]
    switch_runs: int
    inverse_prior: str  # benchmarks/_priors.py BENCH_PRIORS
    inverse_task: str
    inverse_images: int
    inverse_methods: tuple[str, ...] | None  # None: every registered method
    timeout_s: int  # per child process


PROFILES = {
    "cpu": Profile(
        "cpu",
        "CPU: small configs (fp32), the embedded model for switch and MPC-Flow",
        ("small",),
        5,
        (("small", 28, "float32"),),
        1,
        VAECase((32, 64, 128, 128), 1, 32, (32, 32), 1, "float32"),
        3,
        "embedded",
        4,
        28,
        10,
        SWITCH_METHODS,
        2,
        "embedded",
        "deblur",
        1,
        None,
        1500,
    ),
    "cpu-quick": Profile(
        "cpu-quick",
        "CPU smoke run: fewer runs, 8-step generation, random 1-layer MM-DiT for MPC-Flow",
        ("small",),
        2,
        (("small", 8, "float32"),),
        1,
        VAECase((32, 64, 64), 1, 32, (16, 16), 1, "float32"),
        2,
        "embedded",
        2,
        28,
        10,
        QUICK_SWITCH_METHODS,
        1,
        "tiny-mmdit",
        "deblur",
        1,
        ("mpc-rhc", "mpc-k1", "pnp-flow", "d-flow"),
        900,
    ),
    "tiny-gpu-path": Profile(
        "tiny-gpu-path",
        "the GPU code path (bf16 weights/activations, random-weight MM-DiT field) at toy size",
        ("tiny-gpu-path",),
        3,
        (("small", 4, "bfloat16"),),
        1,
        VAECase((32, 64, 64), 1, 32, (16, 16), 1, "bfloat16"),
        2,
        "tiny-gpu-path",
        1,
        6,
        2,
        QUICK_SWITCH_METHODS,
        1,
        "tiny-mmdit",
        "deblur",
        1,
        ("mpc-rhc", "mpc-k1", "pnp-flow"),
        900,
    ),
    "gpu": Profile(
        "gpu",
        "GPU: released sizes with random weights (bf16), SD3 VAE at 1024^2 (fp32, as pipelines "
        "upcast it), the embedded model for MPC-Flow",
        ("sd3-medium", "sd35-large"),
        10,
        (("sd3-medium", 28, "bfloat16"), ("sd35-large", 50, "bfloat16")),
        3,
        VAECase(_SD3_VAE, 2, 32, (128, 128), 1, "float32"),
        5,
        "sd3-medium",
        1,
        28,
        10,
        SWITCH_METHODS,
        3,
        "embedded",
        "deblur",
        4,
        None,
        3000,
    ),
    "gpu-quick": Profile(
        "gpu-quick",
        "GPU smoke run: SD3-medium only, fewer runs and switch methods",
        ("sd3-medium",),
        3,
        (("sd3-medium", 28, "bfloat16"),),
        1,
        VAECase(_SD3_VAE, 2, 32, (128, 128), 1, "float32"),
        2,
        "sd3-medium",
        1,
        28,
        10,
        QUICK_SWITCH_METHODS,
        1,
        "embedded",
        "deblur",
        1,
        ("mpc-rhc", "mpc-k1", "pnp-flow"),
        1200,
    ),
}

#: The project's speed goals (issue 9). ``kind``/``key`` select the measured row.
GOALS = (
    {
        "goal": "SD3-medium 1024^2, 28 steps + CFG, bf16 (rfmpc generation)",
        "target": "<= 1.0 s on H100",
        "device": "H100",
        "kind": "generation",
        "key": ("sd3-medium", 28, "rfmpc"),
        "limit_s": 1.0,
    },
    {
        "goal": "SD3.5-large 1024^2, 50 steps + CFG, bf16 (rfmpc generation)",
        "target": "<= 6.0 s on H100 (public torch.compile figure: 7.47 s)",
        "device": "H100",
        "kind": "generation",
        "key": ("sd35-large", 50, "rfmpc"),
        "limit_s": 6.0,
    },
    {
        "goal": "MPC switch overhead per MPC-controlled step",
        "target": "<= 5% of a denoising step on H100",
        "device": "H100",
        "kind": "switch",
        "key": ("mpc", "overhead_per_controlled_step_pct"),
        "limit_pct": 5.0,
    },
    {
        "goal": "shooting switch overhead",
        "target": "<= 3% of a generation on H100",
        "device": "H100",
        "kind": "switch",
        "key": ("shooting", "overhead_of_generation_pct"),
        "limit_pct": 3.0,
    },
)


def _child_main(args) -> int:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from benchmarks.report_measure import CHILDREN, _reason

    p = PROFILES[args.config]
    params = json.loads(args._params)
    t0 = time.perf_counter()
    try:
        rec = CHILDREN[args._child](p, args.quick, Path(args._tmp), *params)
    except Exception as e:
        import traceback

        traceback.print_exc()
        rec = {"error": _reason(e)}
    if "memory_process" not in rec:
        try:
            rec["memory_process"] = peak_memory()
        except Exception as e:  # no jax in this child: report why
            rec["memory_process"] = {"error": _reason(e)}
    rec["child_wall_s"] = time.perf_counter() - t0
    Path(args._result).write_text(json.dumps(rec, default=_json_default))
    return 0


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    if hasattr(o, "tolist"):
        try:
            return o.tolist()
        except Exception:
            pass
    return str(o)


# ============================================================================ orchestration
def run_child(args, tmp: Path, child: str, *params, timeout: int) -> dict:
    """Run one child measurement in a fresh interpreter; its JSON record (or why it failed)."""
    result = tmp / f"result-{time.monotonic_ns()}.json"
    cmd = module_cmd(
        "report",
        "--config",
        args.config,
        "--_child",
        child,
        "--_params",
        json.dumps(list(params)),
        "--_tmp",
        str(tmp),
        "--_result",
        str(result),
    ) + (["--quick"] if args.quick else [])
    label = " ".join([child, *map(str, params)])
    print(f"[report] {time.strftime('%H:%M:%S')} {label} ...", file=sys.stderr, flush=True)
    load0, t0 = loadavg_1min(), time.perf_counter()
    log = result.with_suffix(".log")  # the child's stdout + stderr (progress; the error tail)
    # a fresh inductor cache per child: torch.compile times are cold, like JAX's
    env = child_env(dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(result.with_suffix(".inductor"))))
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    partial = result.with_suffix(".partial.json")  # rows a long child saved so far
    env["REPORT_PARTIAL"] = str(partial)
    for var in ("JAX_COMPILATION_CACHE_DIR", "RFMPC_COMPILATION_CACHE"):  # cold XLA compiles too
        env.pop(var, None)
    with open(log, "w") as fh:
        if args.verbose:
            print(f"[report]   log: {log}", file=sys.stderr, flush=True)
        try:
            rc = subprocess.run(
                cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, cwd=HERE.parent, env=env
            ).returncode
        except subprocess.TimeoutExpired:
            rc = None
    if result.is_file():
        rec = json.loads(result.read_text())
    elif rc is None and partial.is_file():
        rec = json.loads(partial.read_text())
        rec["incomplete"] = f"timed out after {timeout} s (child killed); rows so far kept"
    elif rc is None:
        rec = {"error": f"timed out after {timeout} s (child killed)"}
    else:
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-5:])
        rec = {"error": f"child exited with rc={rc} and no result: {tail[-600:]}"}
    rec["loadavg_1min"] = [load0, loadavg_1min()]
    took = time.perf_counter() - t0
    status = "FAILED: " + rec["error"][:200] if "error" in rec else "ok"
    print(f"[report]   {took:.0f} s, {status}", file=sys.stderr, flush=True)
    return rec


def collect(args, sections: list[str]) -> dict:
    p = PROFILES[args.config]
    to = args.timeout or p.timeout_s
    record: dict = {
        "benchmark": "report",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": p.name,
        "config_description": p.description,
        "quick": bool(args.quick),
        "profile": _json_safe(dataclasses.asdict(p)),
        "git": _git(),
        "loadavg_1min_start": loadavg_1min(),
        "cpus": os.cpu_count(),
        "sections": {},
    }
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rfmpc-report-") as tmpname:
        tmp = Path(tmpname)
        record["peak"] = run_child(args, tmp, "peak", timeout=to)
        sec = record["sections"]
        if "mmdit" in sections:
            sec["mmdit"] = [
                run_child(args, tmp, "mmdit", case, engine, timeout=to)
                for case in p.mmdit_cases
                for engine in ("diffusers", "diffusers-compile", "rfmpc")
            ]
        if "generation" in sections:
            rows = []
            for config, steps, dtype in p.generation:
                build = run_child(args, tmp, "generation-build", config, timeout=to)
                for engine in ("rfmpc", "diffusers", "diffusers-compile"):
                    if "error" in build:
                        rows.append(
                            {
                                "config": config,
                                "steps": steps,
                                "engine": engine,
                                "dtype": dtype,
                                "error": "build: " + build["error"],
                            }
                        )
                        continue
                    rows.append(
                        run_child(args, tmp, "generation", config, steps, dtype, engine, timeout=to)
                    )
                    rows[-1].setdefault("config", config)
                    rows[-1].setdefault("steps", steps)
                    rows[-1].setdefault("engine", engine)
                    rows[-1].setdefault("dtype", dtype)
                _image_agreement(rows, tmp / f"gen-{config}", config)
                shutil_rmtree(tmp / f"gen-{config}")
            sec["generation"] = rows
        if "vae" in sections:
            sec["vae"] = [
                run_child(args, tmp, "vae", engine, timeout=to) for engine in ("diffusers", "rfmpc")
            ]
        if "switch" in sections:
            sec["switch"] = run_child(args, tmp, "switch", timeout=to)
        if "inverse" in sections:
            sec["inverse"] = run_child(args, tmp, "inverse", timeout=to)
        for name in OPTIONAL:
            if name in sections:
                sec[name] = run_child(args, tmp, "optional", name, OPTIONAL[name], timeout=to)
    record["total_s"] = time.perf_counter() - t_all
    record["loadavg_1min_end"] = loadavg_1min()
    return record


def shutil_rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _image_agreement(rows: list[dict], folder: Path, config: str) -> None:
    """Max |image difference| of each diffusers engine against rfmpc (same latents)."""
    import numpy as np

    ours = folder / "rfmpc.npy"
    for r in rows:
        if r.get("config") != config or r.get("engine") == "rfmpc" or "error" in r:
            continue
        theirs = folder / f"{r['engine']}.npy"
        if ours.is_file() and theirs.is_file():
            r["max_abs_image_diff_vs_rfmpc"] = float(np.abs(np.load(ours) - np.load(theirs)).max())


def _git() -> dict:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=HERE,
        ).stdout.strip()
        return {"commit": head, "dirty_tracked_files": bool(dirty)}
    except OSError:
        return {}


def _json_safe(o):
    return json.loads(json.dumps(o, default=_json_default))


# ============================================================================ derived numbers
def peak_for(record: dict, dtype: str) -> tuple[float | None, str]:
    """The FLOP/s peak MFU is measured against for ``dtype`` and how it was obtained."""
    pk = record.get("peak") or {}
    dt = {"bf16": "bfloat16", "fp32": "float32"}.get(dtype, dtype)
    if pk.get("platform") == "gpu":
        if dt == "bfloat16" and pk.get("datasheet_bf16_flops"):
            return pk["datasheet_bf16_flops"], "datasheet dense bf16 peak"
        return None, "no datasheet peak for this dtype/device"
    g = (pk.get("gemm") or {}).get(dt)
    if g:
        return g["flops_per_s"], f"measured jnp.dot {g['n']}x{g['n']} {dt} on this CPU (best run)"
    return None, "no peak measured"


def derive(record: dict) -> dict:
    """Add FLOP/s, MFU and ratios against rfmpc to the rows (in place); returns ``record``."""
    sec = record.get("sections", {})
    for name in ("mmdit", "generation", "vae"):
        rows = sec.get(name) or []
        group = "case" if name == "mmdit" else ("config" if name == "generation" else None)
        for r in rows:
            if "error" in r or "median_s" not in r:
                continue
            if r.get("flops"):
                r["tflops_per_s"] = r["flops"] / r["median_s"] / 1e12
                peak, how = peak_for(record, r.get("dtype", "fp32"))
                r["mfu"] = None if peak is None else r["flops"] / r["median_s"] / peak
                r["peak_flops"], r["peak_source"] = peak, how
            ours = next(
                (
                    o
                    for o in rows
                    if o.get("engine") == "rfmpc"
                    and "median_s" in o
                    and (group is None or o.get(group) == r.get(group))
                ),
                None,
            )
            if ours is not None:
                r["time_ratio_vs_rfmpc"] = r["median_s"] / ours["median_s"]
    record["goals"] = evaluate_goals(record)
    return record


def evaluate_goals(record: dict) -> list[dict]:
    """Each goal with the measured value on this device and whether it is met (or why not
    measured). A goal stated for H100 is only judged on an H100."""
    dev = _device_name(record)
    on_target = "H100" in dev
    sec = record.get("sections", {})
    out = []
    for g in GOALS:
        row = {"goal": g["goal"], "target": g["target"], "device": dev}
        val, unit = None, ""
        if g["kind"] == "generation":
            config, steps, engine = g["key"]
            for r in sec.get("generation") or []:
                if (r.get("config"), r.get("steps"), r.get("engine")) == (config, steps, engine):
                    val, unit = r.get("median_s"), "s"
                    if "error" in r:
                        row["measured"] = "failed: " + r["error"][:120]
        else:
            method, field = g["key"]
            for r in (sec.get("switch") or {}).get("methods", []):
                if r.get("method") == method:
                    val, unit = r.get(field), "%"
        if val is not None:
            row["measured"] = f"{val:.3g} {unit}".strip()
        else:
            row.setdefault("measured", "not measured in this run")
        if not on_target:
            row["verdict"] = f"not measured on this device (goal is for {g['device']})"
        elif val is None:
            row["verdict"] = "not measured"
        else:
            lim = g.get("limit_s", g.get("limit_pct"))
            row["verdict"] = "met" if val <= lim else "NOT met"
        out.append(row)
    return out


# ============================================================================ files and CLI
def device_slug(record: dict) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", _device_name(record)).strip("-").lower()


def output_stem(record: dict, out_dir: Path) -> Path:
    date = str(record.get("date", _dt.date.today().isoformat()))[:10]
    name = f"{date}-{device_slug(record)}"
    default = "gpu" if (record.get("peak") or {}).get("platform") == "gpu" else "cpu"
    if record.get("config") not in (default, f"{default}-quick"):
        name += f"-{record.get('config')}"
    if record.get("quick"):
        name += "-quick"
    return out_dir / name


def write(record: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.json``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(record, out_dir)
    stem = save_result(
        stem,
        {
            ".md": markdown(record),
            ".json": json.dumps(record, indent=1, default=_json_default) + "\n",
        },
    )
    return stem.with_suffix(".md"), stem.with_suffix(".json")


def _auto_config(quick: bool) -> str:
    """gpu if JAX sees one (checked in a child, so this process never holds the device)."""
    code = "import jax; print(jax.default_backend())"
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    try:
        be = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        be = "cpu"
    base = "gpu" if be.endswith("gpu") else "cpu"
    return f"{base}-quick" if quick else base


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=["auto", *PROFILES], default="auto")
    ap.add_argument("--quick", action="store_true", help="smaller/fewer cases (smoke run)")
    ap.add_argument(
        "--only",
        action="append",
        choices=list(ALL_SECTIONS),
        help="run only this section (repeatable); peak always runs",
    )
    ap.add_argument("--json", action="store_true", help="print the JSON record, not markdown")
    ap.add_argument("--out", default=str(RESULTS), help="where to write the .md/.json")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--timeout", type=int, default=None, help="seconds per child process")
    ap.add_argument("--verbose", action="store_true", help="print each child's log path")
    ap.add_argument("--render", default=None, help="re-render a saved .json record as markdown")
    for hidden in ("_child", "_params", "_tmp", "_result"):
        ap.add_argument(f"--{hidden}", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args._child:
        return _child_main(args)
    if args.render:  # presentation only: the numbers are the saved ones
        record = json.loads(Path(args.render).read_text())
        text = markdown(record)
        if not args.no_write:
            Path(args.render).with_suffix(".md").write_text(text)
        print(text)
        return 0
    if args.config == "auto":
        args.config = _auto_config(args.quick)
    elif args.quick and f"{args.config}-quick" in PROFILES:
        args.config = f"{args.config}-quick"
    sections = list(args.only or ALL_SECTIONS)
    record = derive(collect(args, sections))
    if not args.no_write:
        md, js = write(record, Path(args.out))
        print(f"[report] wrote {md} and {js}", file=sys.stderr)
    print(json.dumps(record, indent=1, default=_json_default) if args.json else markdown(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
