"""MM-DiT forward and full small generation: rfmpc vs diffusers (eager, ``torch.compile``) and
keras-hub's JAX ``MMDiT``, in one run, interleaved.

    python -m benchmarks.mmdit_speed                      # the bar case (below), every engine
    python -m benchmarks.mmdit_speed --save               # write benchmarks/results/ (idle only)
    python -m benchmarks.mmdit_speed --baseline-rfmpc ../main --engines rfmpc --no-generation

The bar case (``--case bar``, issue 18): SD3.5-style small MM-DiT, 4 layers, 4 heads x 32, RMS
QK-norm, dual attention in blocks 0-1, 32x32x16 latent, 32 text tokens, batch 2, float32.

How it measures (see :func:`run_all`): every engine runs in its own worker process, built and
warmed up once (warm-up = first call: XLA / inductor compilation included), then all are timed
round-robin, ``--per-turn`` calls per turn, until each has ``--runs`` calls (median and min
reported). Each turn opens with untimed calls for ``--settle`` seconds (at least one, same for
every engine): after an idle gap of >= ~0.15 s, XLA:CPU's first call or two run ~1.4x slower
(same CPU time, more involuntary context switches; torch shows no such effect; the cause inside
XLA's thread pool is not pinned down), which timed would measure the turn-taking, not the
forward; each turn's first call is still reported apart. rfmpc and
diffusers share random weights (saved by diffusers, loaded by rfmpc) and their outputs are
compared; keras-hub (optional: the ``peers`` extra, or ``--peers-python``
pointing at an interpreter that has it) builds the same config with its own random weights.
Thread counts and the 1-min load average (start, end) are recorded; ``--save`` refuses to write
a result while the load is above 1.5 per core, unless ``--force``, which marks the file LOADED.
CPU MFU is computed only against a peak measured in the same run (a 2048^2 float32 ``jnp.dot``
timed right after the engines, the same way), never a vendor figure.

The older single-engine helpers (:func:`diffusers_model`, :func:`rfmpc_model`,
:func:`mmdit_forward_flops`, :data:`CASES`) are shared with ``report_measure.py`` and
``gpu_check.py``.
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
import tempfile
import time
from pathlib import Path

# Both frameworks share the GPU: JAX must not pre-allocate 75% of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _bench_worker
from benchmarks._common import (
    RESULTS,
    child_env,
    cpu_name,
    ensure_torchvision_importable,
    loadavg_1min,
    module_cmd,
    save_result,
    slug,
    summary,
    torch_fixtures,
)
from rfmpc.metrics import rel_max_err
from rfmpc.models import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM, MMDiTConfig

HERE = Path(__file__).resolve().parent

#: Dense bf16 tensor-core peak, FLOP/s (NVIDIA datasheets; H200 has H100's compute).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}


@dataclasses.dataclass(frozen=True)
class Case:
    model: MMDiTConfig
    latent: tuple[int, int]  # latent height, width
    text_tokens: int
    batch: int
    dtype: str  # "fp32" | "bf16"
    same_weights: bool


_SMALL = MMDiTConfig(
    sample_size=32,
    patch_size=2,
    in_channels=16,
    num_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=256,
    caption_projection_dim=128,
    pooled_projection_dim=128,
    out_channels=16,
    pos_embed_max_size=48,
    dual_attention_layers=(0, 1),
    qk_norm="rms_norm",
)
_TINY = dataclasses.replace(_SMALL, num_layers=2, sample_size=16, joint_attention_dim=64)

CASES = {
    # Issue 18's bar: SD3.5-style small config, 32 text tokens, batch 2, fp32 (CPU).
    "bar": Case(_SMALL, (32, 32), 32, 2, "fp32", True),
    # CPU default: SD3.5-medium structure (dual attention, RMS QK-norm, last block context
    # pre-only) at width 128, 256 image + 64 text tokens.
    "small": Case(_SMALL, (32, 32), 64, 2, "fp32", True),
    # Exactly the GPU code path (bf16 weights and activations in both frameworks, MFU
    # bookkeeping) at a size the CPU runs in seconds.
    "tiny-gpu-path": Case(_TINY, (16, 16), 16, 2, "bf16", True),
    # Released configs at 1024x1024 (128x128x16 latent, 4096 image tokens, 77 + 256 text).
    "sd3-medium": Case(SD3_MEDIUM, (128, 128), 333, 2, "bf16", False),
    "sd35-medium": Case(SD35_MEDIUM, (128, 128), 333, 2, "bf16", False),
    "sd35-large": Case(SD35_LARGE, (128, 128), 333, 2, "bf16", False),
}


def mmdit_forward_flops(
    cfg: MMDiTConfig, batch: int, height: int, width: int, text_tokens: int
) -> dict[str, float]:
    """Matmul FLOPs of one MM-DiT forward (a multiply-add counts 2), by component.

    Counts every dense layer (patch embedding, timestep/text MLPs, context embedder, adaLN
    modulation, Q/K/V/output projections of both streams, MLPs, final projection) and the two
    attention products ``Q K^T`` and ``P V`` over the joint sequence (image + text queries
    attend to image + text keys; the second attention of dual blocks is image-only). It does
    not count softmax, norms, activations and other elementwise work (a few percent). This is
    the work diffusers and rfmpc both execute, including the text queries of the last
    (context-pre-only) block whose outputs are discarded.
    """
    p, d, hd = cfg.patch_size, cfg.inner_dim, cfg.attention_head_dim
    n = (height // p) * (width // p)
    m, b = text_tokens, batch
    t = n + m

    def mm(rows, k, out):
        return 2.0 * rows * k * out

    del hd  # attention cost depends on the total width only: 2 * t^2 * (heads * head_dim)
    out = {
        "embed": mm(b * n, p * p * cfg.in_channels, d)
        + mm(b * m, cfg.joint_attention_dim, d)
        + mm(b, 256, d)
        + mm(b, d, d)
        + mm(b, cfg.pooled_projection_dim, d)
        + mm(b, d, d),
        "modulation": 0.0,
        "projections": 0.0,
        "attention": 0.0,
        "mlp": 0.0,
        "final": mm(b, d, 2 * d) + mm(b * n, d, p * p * cfg.out_dim),
    }
    for i in range(cfg.num_layers):
        pre_only, dual = i == cfg.num_layers - 1, cfg.is_dual(i)
        out["modulation"] += mm(b, d, (9 if dual else 6) * d) + mm(b, d, (2 if pre_only else 6) * d)
        out["projections"] += 3 * mm(b * t, d, d) + mm(b * n, d, d)  # q, k, v; image out
        out["projections"] += 0 if pre_only else mm(b * m, d, d)  # text out
        out["attention"] += 2 * mm(b * t, d, t)  # QK^T and PV, all heads
        out["mlp"] += 2 * mm(b * n, d, 4 * d) + (0 if pre_only else 2 * mm(b * m, d, 4 * d))
        if dual:
            out["projections"] += 4 * mm(b * n, d, d)
            out["attention"] += 2 * mm(b * n, d, n)
    out["total"] = sum(out.values())
    return out


def _peak(device_name: str, dtype: str) -> float | None:
    if dtype != "bf16":
        return None
    for key, peak in PEAK_FLOPS.items():
        if key in device_name:
            return peak
    return None


def _inputs(case: Case, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = case.model
    h, w = case.latent
    return {
        "hidden_states": rng.standard_normal((case.batch, h, w, c.in_channels), np.float32),
        "encoder_hidden_states": rng.standard_normal(
            (case.batch, case.text_tokens, c.joint_attention_dim), np.float32
        ),
        "pooled_projections": rng.standard_normal(
            (case.batch, c.pooled_projection_dim), np.float32
        ),
        "timestep": np.linspace(700.0, 300.0, case.batch).astype(np.float32),
    }


def diffusers_model(case: Case, tdev, tdtype, save_to: str | None = None):
    """diffusers' ``SD3Transformer2DModel`` of ``case`` on ``tdev`` in ``tdtype``, in eval mode.

    Real-size configs on a GPU are built directly on the device in ``tdtype`` with diffusers'
    own initialisation; otherwise every weight is redrawn (seed 0) so nothing is trivially zero,
    and with ``save_to`` the weights are saved there (safetensors) for rfmpc to load.
    """
    import torch

    ensure_torchvision_importable()  # before diffusers imports transformers
    from diffusers import SD3Transformer2DModel

    cfg = case.model
    torch.manual_seed(0)
    if tdev.type == "cuda" and not case.same_weights:
        with torch.device(tdev):
            prev = torch.get_default_dtype()
            torch.set_default_dtype(tdtype)
            tmodel = SD3Transformer2DModel(**cfg.to_diffusers()).eval()
            torch.set_default_dtype(prev)
        return tmodel
    tmodel = redraw_weights_(SD3Transformer2DModel(**cfg.to_diffusers()).eval())
    tmodel = tmodel.to(tdev, tdtype)
    if save_to is not None:
        tmodel.save_pretrained(save_to, safe_serialization=True)
    return tmodel


def redraw_weights_(tmodel):
    """Redraw every parameter of a torch module in place (seeded by the caller): matrices
    ``N(0, 1/fan_in)``, norm weights ``N(1, 0.1)``, other vectors ``N(0, 0.1)``, so nothing is
    trivially zero (diffusers zero-inits some layers). Returns the module."""
    import torch

    with torch.no_grad():
        for name, p in tmodel.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, float(np.prod(p.shape[1:])) ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
    return tmodel


def torch_inputs(inp: dict[str, np.ndarray], tdev, tdtype) -> dict:
    """:func:`_inputs` as diffusers' keyword arguments (NCHW latents) on ``tdev``."""
    import torch

    return {
        "hidden_states": torch.from_numpy(inp["hidden_states"])
        .permute(0, 3, 1, 2)
        .to(tdev, tdtype),
        "encoder_hidden_states": torch.from_numpy(inp["encoder_hidden_states"]).to(tdev, tdtype),
        "pooled_projections": torch.from_numpy(inp["pooled_projections"]).to(tdev, tdtype),
        "timestep": torch.from_numpy(inp["timestep"]).to(tdev),
    }


def rfmpc_model(case: Case, jdtype, folder: str | None = None):
    """rfmpc's :class:`~rfmpc.models.Transformer` of ``case``: loaded from ``folder`` (the
    weights :func:`diffusers_model` saved) or, without one, randomly initialised on device."""
    try:
        from rfmpc.convert import load_transformer
    except ImportError:  # a --baseline-rfmpc checkout from before the loader moved up a layer
        from rfmpc.models import load_transformer
    from rfmpc.models import MMDiT, Transformer

    if folder is not None:
        return load_transformer(folder, dtype=jdtype)
    from flax import nnx

    module = nnx.jit(
        lambda: MMDiT(case.model, dtype=jdtype, param_dtype=jdtype, rngs=nnx.Rngs(0))
    )()
    return Transformer.from_module(module)


def jax_inputs(inp: dict[str, np.ndarray], jdtype, jdev) -> list:
    """:func:`_inputs` as rfmpc's positional arguments (NHWC latents) on ``jdev``."""
    return [
        jax.device_put(jnp.asarray(inp["hidden_states"], jdtype), jdev),
        jax.device_put(jnp.asarray(inp["timestep"]), jdev),
        jax.device_put(jnp.asarray(inp["encoder_hidden_states"], jdtype), jdev),
        jax.device_put(jnp.asarray(inp["pooled_projections"], jdtype), jdev),
    ]


# ==============================================================================================
# One run, every engine: worker processes timed round-robin
# ==============================================================================================
#
# Each engine lives in its own worker process (this file with ``--_worker``), built and warmed up
# once, then asked for a few timed calls at a time in turn (round-robin), so slow drifts of the
# machine (other jobs, thermal state) hit every engine alike. A worker waits on a pipe between
# its turns: it holds no CPU while the others run. The orchestrator runs no JAX or torch
# computation (no thread pools of its own).

#: Forward engines. ``rfmpc``: ``load_transformer``'s jitted call; ``rfmpc-apply``: the pure
#: ``Transformer.apply(params, ...)`` under ``jax.jit`` (the path gradients take);
#: ``rfmpc-autotune``: the jitted call with the compiler options ``Transformer.autotune`` picks
#: for these inputs when the worker starts (its choice is recorded); ``diffusers``: eager
#: PyTorch; ``diffusers-compile``: ``torch.compile`` of the same model; ``keras-hub``:
#: keras-hub's JAX ``MMDiT`` (``peers`` extra), same config, its own random weights.
FORWARD_ENGINES = (
    "rfmpc",
    "rfmpc-apply",
    "rfmpc-autotune",
    "diffusers",
    "diffusers-compile",
    "keras-hub",
)
#: Full-generation engines (``pipeline_speed.make_generator``), prefixed ``gen:`` in records.
GENERATION_ENGINES = ("rfmpc", "diffusers", "diffusers-compile")
#: Refuse ``--save`` above this 1-min load average per core (``--force`` marks the file LOADED).
MAX_LOAD_PER_CORE = 1.5
#: Side of the float32 GEMM whose best time defines the CPU peak (measured in the same run).
PEAK_GEMM_N = 2048


def _device_label() -> str:
    return f"CPU {cpu_name()} x{os.cpu_count()}"


def _threads_jax() -> str:
    # XLA:CPU sizes its intra-op pool to the cores this process may use (no public knob).
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"XLA:CPU intra-op pool over {n} cores (default)"


def _forward_worker(engine: str, case: Case, folder: str):
    """``(fn, sync, info)`` of one forward engine; ``fn()`` runs one forward."""
    inp = _inputs(case)
    info: dict = {}
    if engine.startswith("rfmpc"):
        import rfmpc

        jdtype = jnp.bfloat16 if case.dtype == "bf16" else jnp.float32
        model = rfmpc_model(case, jdtype, folder if case.same_weights else None)
        args = jax_inputs(inp, jdtype, jax.devices()[0])
        if engine == "rfmpc-apply":
            apply = jax.jit(lambda p, b, *a: model.apply(p, *a, buffers=b))
            fn = lambda: apply(model.params, model.buffers, *args)
        elif engine == "rfmpc-autotune":
            tuned = model.autotune(*args)
            info["autotune"] = {
                "options": dict(tuned.options),
                "median_ms": {str(dict(k)): 1e3 * v for k, v in tuned.median_s.items()},
                "failed": {str(dict(k)): v for k, v in tuned.failed.items()},
            }
            fn = lambda: tuned.model(*args)
        else:
            fn = lambda: model(*args)
        info["threads"] = _threads_jax()
        info["rfmpc_from"] = str(Path(rfmpc.__file__).resolve().parents[1])
        return fn, lambda o: o.block_until_ready(), info
    if engine.startswith("diffusers"):
        import torch

        tdtype = torch.bfloat16 if case.dtype == "bf16" else torch.float32
        if case.same_weights:
            ensure_torchvision_importable()
            from diffusers import SD3Transformer2DModel

            model = SD3Transformer2DModel.from_pretrained(folder).to(tdtype).eval()
        else:
            model = diffusers_model(case, torch.device("cpu"), tdtype)
        if engine == "diffusers-compile":
            model = torch.compile(model)
        targs = torch_inputs(inp, torch.device("cpu"), tdtype)

        def fn():
            with torch.inference_mode():
                return model(**targs, return_dict=False)[0]

        info["threads"] = (
            f"torch intra-op {torch.get_num_threads()}, inter-op {torch.get_num_interop_threads()}"
        )
        info["torch"] = torch.__version__
        return fn, lambda o: o, info
    if engine == "gemm-peak":
        n = PEAK_GEMM_N
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        f = jax.jit(jnp.dot)
        info["flops"] = 2.0 * n**3
        info["threads"] = _threads_jax()
        return (lambda: f(a, b)), lambda o: o.block_until_ready(), info
    raise ValueError(f"unknown engine {engine!r}")


def _generation_worker(engine: str, folder: str, steps: int):
    from benchmarks import pipeline_speed as ps

    gen, load_s, device = ps.make_generator(engine, folder, GEN_SIZE, steps, "float32", GEN_MSL)
    info = {"load_s": load_s, "device": device}
    if engine.startswith("diffusers"):
        import torch

        info["threads"] = f"torch intra-op {torch.get_num_threads()}"
    else:
        info["threads"] = _threads_jax()
    return gen, lambda o: o, info


#: Full small generation: 128x128 image (32x32x16 latent), the bar MM-DiT config, tiny VAE and
#: text encoders of ``tests/_torch_fixtures.py``, 77 CLIP + GEN_MSL T5 tokens.
GEN_SIZE, GEN_MSL = 128, 16


def _worker_main(args) -> int:
    """Worker: build one engine, then serve timed calls (``_bench_worker.serve``)."""
    kind, engine = args._worker.split(":", 1)
    t0 = time.perf_counter()
    if kind == "gen":
        fn, sync, info = _generation_worker(engine, args._folder, args.steps)
    else:
        fn, sync, info = _forward_worker(engine, CASES[args.case], args._folder)
    return _bench_worker.serve(fn, sync, info, args._out, time.perf_counter() - t0)


class _Worker:
    def __init__(self, label: str, cmd: list[str], env: dict, out: str | None):
        import subprocess

        self.label = label
        self.out = out
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(_bench_worker.REPLY):
                return json.loads(line[len(_bench_worker.REPLY) :])
        code = self.proc.wait()
        raise RuntimeError(f"worker {self.label} exited with status {code} (see its stderr)")

    def ask(self, n: int, settle_s: float = 0.0) -> dict:
        """``n`` timed calls after ``settle_s`` seconds of untimed ones: the worker's reply."""
        self.proc.stdin.write(f"{n} {settle_s}\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        for f in (self.proc.stdin, self.proc.stdout):
            if not f.closed:
                f.close()


def _importable(python: str, module: str, env: dict) -> str | None:
    """None if ``module`` imports under ``python``, else the reason."""
    import subprocess

    r = subprocess.run(
        [python, "-c", f"import {module}"], capture_output=True, text=True, env=env, timeout=600
    )
    if r.returncode == 0:
        return None
    last = (r.stderr.strip().splitlines() or ["?"])[-1]
    return f"`import {module}` failed under {python}: {last}"


def _round_robin(
    workers: dict, rounds: int, per_turn: int, pause_s: float, settle_s: float
) -> tuple[dict, dict]:
    """Timed calls ``{label: [s, ...]}`` and each turn's first (settling) call's time."""
    times = {k: [] for k in workers}
    first = {k: [] for k in workers}
    for _ in range(rounds):
        for k, w in workers.items():
            r = w.ask(per_turn, settle_s)
            times[k] += r["times_s"]
            first[k] += r.get("settle_times_s", [])[:1]
            time.sleep(pause_s)  # let the last engine's spinning threads go idle
    return times, first


def run_all(args) -> dict:
    """Build every engine's worker, time them round-robin, return the JSON record."""
    import numpy as np

    case = CASES[args.case]
    cores = os.cpu_count() or 1
    record: dict = {
        "benchmark": "mmdit_speed",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": _device_label(),
        "cores": cores,
        "case": args.case,
        "dtype": case.dtype,
        "batch": case.batch,
        "latent_hw": list(case.latent),
        "image_tokens": (case.latent[0] // case.model.patch_size)
        * (case.latent[1] // case.model.patch_size),
        "text_tokens": case.text_tokens,
        "mmdit_config": case.model.to_diffusers(),
        "same_weights": case.same_weights,
        "runs": args.runs,
        "loadavg_1min": {"start": loadavg_1min()},
        "python": sys.version.split()[0],
        "method": (
            "each engine in its own worker process, built and warmed up once, then timed "
            f"round-robin {args.per_turn} call(s) per turn until {args.runs} calls each, "
            f"each turn opened by untimed calls for {args.settle} s (at least one); "
            "medians and minima of the per-call wall times"
        ),
        "skipped": {},
    }
    base_env = child_env(
        dict(os.environ, KERAS_BACKEND="jax", PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "weights"
        engines = [e for e in args.engines.split(",") if e]
        specs = []  # (label, worker arg, python, env)
        for e in engines:
            if e not in FORWARD_ENGINES:
                raise SystemExit(f"--engines: unknown engine {e!r}; choose from {FORWARD_ENGINES}")
            python, env = sys.executable, base_env
            if e == "keras-hub":
                python = args.peers_python or sys.executable
                why = _importable(python, "keras_hub", env)
                if why:
                    record["skipped"][e] = why + " (pip install -e '.[peers]' or --peers-python)"
                    continue
            specs.append((e, "keras-hub" if e == "keras-hub" else f"fwd:{e}", python, env))
        for path in args.baseline_rfmpc or []:
            # the old checkout's rfmpc first; benchmarks.* from this one (a checkout from before
            # benchmarks/ was a package has no regular `benchmarks` package to shadow it)
            env = child_env({**base_env, "PYTHONPATH": ""}, first=[str(Path(path).resolve())])
            specs.append((f"rfmpc@{path}", "fwd:rfmpc", sys.executable, env))
        # Shared weights: diffusers saves them, rfmpc loads them (same-weights cases).
        import subprocess

        subprocess.run(
            module_cmd("mmdit_speed", "--_build", str(folder), "--case", args.case),
            check=True,
            env=base_env,
        )
        record["forward"] = _run_section(args, specs, folder, tmp, "fwd", args.runs)
        peak = None
        if args.mfu:
            # Timed on its own, after the engines: interleaved with them, the 2048^2 GEMM's
            # turns slowed every engine's next turn (all medians up ~25-50% in one run).
            gemm = [("gemm-peak", "fwd:gemm-peak", sys.executable, base_env)]
            peak = _run_section(args, gemm, folder, tmp, "fwd", args.runs).get("gemm-peak")
        outs = {k: v.pop("_out") for k, v in record["forward"].items() if "_out" in v}
        ref = outs.get("diffusers")
        if ref is not None and case.same_weights:
            ref_a = np.load(ref)
            for k, path in outs.items():
                if k.startswith("rfmpc") or k == "diffusers-compile":
                    err = rel_max_err(np.load(path), ref_a)
                    record["forward"][k]["rel_max_err_vs_diffusers"] = err
        flops = mmdit_forward_flops(case.model, case.batch, *case.latent, case.text_tokens)
        record["flops_per_forward"] = flops
        if peak is not None:
            record["peak"] = {
                "how": f"best time of a {PEAK_GEMM_N}^2 float32 jnp.dot, timed in this run "
                "right after the engines, with the same turns",
                "flops_per_s": peak["flops"] / peak["min_s"],
                "median_flops_per_s": peak["flops"] / peak["median_s"],
            }
        for r in record["forward"].values():
            r["gflops_per_s"] = flops["total"] / r["median_s"] / 1e9
            if peak is not None:
                r["mfu_vs_measured_peak"] = (
                    flops["total"] / r["median_s"] / (record["peak"]["flops_per_s"])
                )

        if args.generation:
            gfolder = tmp / "pipeline"
            subprocess.run(
                module_cmd("mmdit_speed", "--_build_pipeline", str(gfolder), "--case", args.case),
                check=True,
                env=base_env,
            )
            gspecs = []
            for e in args.gen_engines.split(","):
                if e not in GENERATION_ENGINES:
                    raise SystemExit(f"--gen-engines: unknown {e!r}; choose {GENERATION_ENGINES}")
                gspecs.append((e, f"gen:{e}", sys.executable, base_env))
            gen = _run_section(args, gspecs, gfolder, tmp, "gen", args.gen_runs)
            outs = {k: v.pop("_out") for k, v in gen.items() if "_out" in v}
            if "rfmpc" in outs:
                ref_img = np.load(outs["rfmpc"])
                for k, path in outs.items():
                    gen[k]["max_abs_image_diff_vs_rfmpc"] = float(
                        np.max(np.abs(np.load(path) - ref_img))
                    )
            record["generation"] = {
                "what": f"{GEN_SIZE}x{GEN_SIZE} image, {args.steps} steps, CFG 7.0 (batch 2), "
                f"77 + {GEN_MSL} text tokens, transformer = the case's config, tiny fixture "
                "VAE and text encoders; text encoding + denoising + decoding",
                "engines": gen,
            }
            if "keras-hub" in engines:
                record["skipped"]["gen:keras-hub"] = (
                    "not measured: keras-hub's pipeline needs its own CLIP/T5 backbones, which "
                    "have no tiny offline fixture here"
                )
    record["loadavg_1min"]["end"] = loadavg_1min()
    limit = MAX_LOAD_PER_CORE * cores
    record["loaded"] = max(v or 0.0 for v in record["loadavg_1min"].values()) > limit
    record["load_limit"] = limit
    return record


def paired_ratio(times: list[float], ref: list[float], per_turn: int, seed: int = 0) -> dict:
    """``times`` over ``ref`` (seconds per call, same round-robin), paired by round.

    Round ``i`` holds calls ``[i * per_turn, (i + 1) * per_turn)`` of each list; its ratio is
    the ratio of the two medians in that round, so a slow spell of the machine that hits both
    engines in one round cancels out. Returns the median ratio over the rounds and a 95%
    percentile-bootstrap interval of that median (10000 resamples of the rounds, ``seed``).
    """
    n = min(len(times), len(ref)) // per_turn
    if n < 2:
        raise ValueError(f"paired_ratio needs >= 2 rounds of {per_turn} calls, got {n}")
    ratios = np.array(
        [
            np.median(times[i * per_turn : (i + 1) * per_turn])
            / np.median(ref[i * per_turn : (i + 1) * per_turn])
            for i in range(n)
        ]
    )
    rng = np.random.default_rng(seed)
    boots = np.median(ratios[rng.integers(0, n, size=(10_000, n))], axis=1)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return {"median": float(np.median(ratios)), "ci95": [float(lo), float(hi)], "rounds": n}


def _run_section(args, specs, folder: Path, tmp: Path, kind: str, runs: int) -> dict:
    workers, out = {}, {}
    try:
        for label, warg, python, env in specs:  # build + warm up one at a time
            npy = str(tmp / f"{kind}-{len(workers)}.npy") if label != "gemm-peak" else None
            if warg == "keras-hub":
                case = CASES[args.case]
                spec = {
                    "config": case.model.to_diffusers(),
                    "latent": list(case.latent),
                    "text_tokens": case.text_tokens,
                    "batch": case.batch,
                    "dtype": case.dtype,
                }
                cmd = [python, str(HERE / "_bench_worker.py"), "keras-hub", json.dumps(spec), npy]
            else:
                cmd = module_cmd(
                    "mmdit_speed", "--_worker", warg, "--_folder", str(folder), python=python
                )
                cmd += ["--case", args.case, "--steps", str(args.steps)]
                if npy:
                    cmd += ["--_out", npy]
            w = _Worker(label, cmd, env, npy)
            try:
                info = w.read()
            except RuntimeError as e:
                out[label] = {"error": str(e)}
                continue
            workers[label] = w
            out[label] = {**info, "_out": npy} if npy else info
            print(f"[{kind}] {label}: ready (warm-up {info['warmup_s']:.2f} s)", file=sys.stderr)
        rounds = max(1, -(-runs // args.per_turn))
        times, first = _round_robin(workers, rounds, args.per_turn, args.pause, args.settle)
        refs = [k for k in ("rfmpc", "rfmpc-autotune") if k in times] if rounds >= 2 else []
        for label, t in times.items():
            out[label].update(summary(t))
            if first[label]:
                out[label]["first_call_of_turn_median_s"] = float(np.median(first[label]))
            if refs:
                out[label]["paired_ratio_vs"] = {
                    r: paired_ratio(t, times[r], args.per_turn) for r in refs if r != label
                }
    finally:
        for w in workers.values():
            w.close()
    return {k: v for k, v in out.items() if "error" not in v or print(k, v, file=sys.stderr)}


def _build(folder: str, case_name: str) -> None:
    import torch

    case = CASES[case_name]
    tdtype = torch.bfloat16 if case.dtype == "bf16" else torch.float32
    diffusers_model(case, torch.device("cpu"), tdtype, save_to=folder)


def _build_pipeline(folder: str, case_name: str) -> None:
    build_tiny_sd3_pipeline = torch_fixtures().build_tiny_sd3_pipeline

    c = CASES[case_name].model.to_diffusers()
    keep = (
        "num_layers",
        "num_attention_heads",
        "attention_head_dim",
        "caption_projection_dim",
        "sample_size",
        "pos_embed_max_size",
        "dual_attention_layers",
        "qk_norm",
    )
    build_tiny_sd3_pipeline(folder, seed=0, transformer_overrides={k: c[k] for k in keep})


def _ci(p: dict) -> str:
    return f"{p['median']:.2f}x [{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}]"


def _markdown(r: dict) -> str:
    def ms(x):
        return f"{1e3 * x:.2f}"

    def table(rows: dict, ref: str | None, unit: float, fmt) -> list[str]:
        head = (
            "| engine | threads | warm-up s | median | min | n | time / rfmpc (median) "
            "| paired by round, 95% CI | first call of a turn (untimed, median) |"
        )
        lines = [head, "|---|---|---|---|---|---|---|---|---|"]
        base = rows.get(ref, {}).get("median_s")
        for k, x in rows.items():
            ratio = f"{x['median_s'] / base:.2f}x" if base else "n/a"
            p = x.get("paired_ratio_vs", {}).get(ref) if k != ref else None
            paired = _ci(p) if p else ("1.00x" if k == ref else "n/a")
            first = x.get("first_call_of_turn_median_s")
            lines.append(
                f"| {k} | {x.get('threads', '')} | {x['warmup_s']:.2f} | "
                f"{fmt(x['median_s'])} | {fmt(x['min_s'])} | {x['n']} | {ratio} | {paired} | "
                f"{fmt(first) if first is not None else 'n/a'} |"
            )
        return lines

    lo = r["loadavg_1min"]
    lines = [
        f"# mmdit_speed: {r['case']} on {r['device']} ({r['date']})"
        + (" — LOADED (not a result)" if r["loaded"] else ""),
        "",
        f"1-min load average: {lo['start']:.2f} at start, {lo['end']:.2f} at end, on "
        f"{r['cores']} cores (limit for a result file: {r['load_limit']:.1f})."
        + (
            " **The machine was loaded: these numbers are indicative only.**" if r["loaded"] else ""
        ),
        "",
        f"Method: {r['method']}.",
        "",
        "## MM-DiT forward",
        "",
        f"batch {r['batch']}, latent {r['latent_hw'][0]}x{r['latent_hw'][1]}, "
        f"{r['image_tokens']} image + {r['text_tokens']} text tokens, {r['dtype']}, "
        f"{r['flops_per_forward']['total'] / 1e9:.3f} GFLOP/forward (matmuls), "
        f"same weights for rfmpc and diffusers: {r['same_weights']}; keras-hub has its own "
        "random weights (same config).",
        "",
        *table(r["forward"], "rfmpc", 1e3, lambda s: ms(s) + " ms"),
    ]
    fwd = r["forward"]
    peers = [k for k in ("diffusers", "diffusers-compile", "keras-hub") if k in fwd]
    if "rfmpc-autotune" in fwd and peers:
        lines += [
            "",
            "Each peer's time over `rfmpc-autotune`'s, paired by round (95% CI): "
            + ", ".join(
                f"{k} {_ci(fwd[k]['paired_ratio_vs']['rfmpc-autotune'])}"
                for k in peers
                if "rfmpc-autotune" in fwd[k].get("paired_ratio_vs", {})
            )
            + ".",
        ]
    for k, x in r["forward"].items():
        if "autotune" in x:
            a = x["autotune"]
            timed = ", ".join(f"{o}: {t:.2f} ms" for o, t in a["median_ms"].items())
            lines += [
                "",
                f"{k}: `Transformer.autotune` chose compiler options {a['options'] or '{}'} "
                f"(its own timing at start-up, medians: {timed})"
                + (f"; failed to compile: {a['failed']}" if a["failed"] else "")
                + ".",
            ]
    if "peak" in r:
        p = r["peak"]
        lines += [
            "",
            f"Measured peak: {p['flops_per_s'] / 1e9:.1f} GFLOP/s ({p['how']}). MFU below is "
            "against this measured figure, not a vendor peak.",
            "",
            "| engine | GFLOP/s (median) | MFU vs measured peak |",
            "|---|---|---|",
        ]
        for k, x in r["forward"].items():
            lines.append(
                f"| {k} | {x['gflops_per_s']:.1f} | {100 * x['mfu_vs_measured_peak']:.0f}% |"
            )
    errs = {
        k: x["rel_max_err_vs_diffusers"]
        for k, x in r["forward"].items()
        if "rel_max_err_vs_diffusers" in x
    }
    if errs:
        lines += [
            "",
            "Output agreement (max |x - diffusers| / std): "
            + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()),
        ]
    if "generation" in r:
        g = r["generation"]
        lines += ["", "## Full small generation", "", g["what"] + ".", ""]
        lines += table(g["engines"], "rfmpc", 1.0, lambda s: f"{s:.3f} s")
        diffs = {
            k: x["max_abs_image_diff_vs_rfmpc"]
            for k, x in g["engines"].items()
            if k != "rfmpc" and "max_abs_image_diff_vs_rfmpc" in x
        }
        if diffs:
            lines += [
                "",
                "Image agreement (max abs diff vs rfmpc): "
                + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()),
            ]
    if r["skipped"]:
        lines += ["", "## Not measured", ""] + [f"- {k}: {v}" for k, v in r["skipped"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", "--config", choices=sorted(CASES), default="bar")
    ap.add_argument("--runs", type=int, default=15, help="timed forwards per engine (>= 15)")
    ap.add_argument("--per-turn", type=int, default=3, help="timed calls per round-robin turn")
    ap.add_argument("--pause", type=float, default=0.05, help="seconds between turns")
    ap.add_argument(
        "--settle",
        type=float,
        default=0.1,
        help="seconds of untimed calls (at least one) that open each turn; 0 for none",
    )
    ap.add_argument("--engines", default=",".join(FORWARD_ENGINES))
    ap.add_argument(
        "--baseline-rfmpc",
        action="append",
        metavar="PATH",
        help="also time the rfmpc found at PATH (another checkout), e.g. for an A/B",
    )
    ap.add_argument("--peers-python", help="interpreter with keras-hub (default: this one)")
    ap.add_argument("--no-mfu", dest="mfu", action="store_false", help="skip the peak GEMM")
    ap.add_argument("--generation", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--gen-engines", default=",".join(GENERATION_ENGINES))
    ap.add_argument("--gen-runs", type=int, default=15)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--json", action="store_true", help="print the JSON record")
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/...")
    ap.add_argument("--force", action="store_true", help="--save even when loaded (marked LOADED)")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_folder", help=argparse.SUPPRESS)
    ap.add_argument("--_out", help=argparse.SUPPRESS)
    ap.add_argument("--_build", help=argparse.SUPPRESS)
    ap.add_argument("--_build_pipeline", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        return _worker_main(args)
    if args._build:
        _build(args._build, args.case)
        return 0
    if args._build_pipeline:
        _build_pipeline(args._build_pipeline, args.case)
        return 0
    if args.runs < 1 or args.gen_runs < 1 or args.per_turn < 1:
        ap.error("--runs, --gen-runs and --per-turn must be >= 1")
    if args.settle < 0 or args.pause < 0:
        ap.error("--settle and --pause must be >= 0 seconds")
    cores = os.cpu_count() or 1
    load = loadavg_1min() or 0.0
    if args.save and load > MAX_LOAD_PER_CORE * cores and not args.force:
        ap.error(
            f"1-min load average {load:.2f} is above {MAX_LOAD_PER_CORE} per core "
            f"({MAX_LOAD_PER_CORE * cores:.1f} on {cores} cores): the timings would not be a "
            "result. Wait for an idle machine, or pass --force to save a file marked LOADED."
        )
    record = run_all(args)
    md = _markdown(record)
    print(json.dumps(record, indent=2) if args.json else md)
    if args.save:
        if record["loaded"] and not args.force:
            print(
                f"not saved: the load rose above {record['load_limit']:.1f} during the run "
                f"({record['loadavg_1min']}); rerun on an idle machine or pass --force",
                file=sys.stderr,
            )
            return 1
        RESULTS.mkdir(parents=True, exist_ok=True)
        dev = slug(record["device"])
        stem = f"{_dt.date.today().isoformat()}-{dev}-mmdit_speed-{args.case}"
        if record["loaded"]:
            stem += "-LOADED"
        path = save_result(
            RESULTS / stem, {".json": json.dumps(record, indent=2) + "\n", ".md": md}
        )
        print(f"saved {path}.json / .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
