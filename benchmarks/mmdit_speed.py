"""rfmpc MM-DiT forward vs diffusers' ``SD3Transformer2DModel`` forward, same config, same device.

    python benchmarks/mmdit_speed.py                        # CPU, small config, fp32
    python benchmarks/mmdit_speed.py --config tiny-gpu-path # the GPU code path (bf16) at toy size
    python benchmarks/mmdit_speed.py --config sd3-medium    # GPU: 1024^2 (128x128x16 latent), bf16
    python benchmarks/mmdit_speed.py --config sd35-large --json --save

Both models run in one process, one after the other, on the same inputs: diffusers in eager
PyTorch (``torch.inference_mode``, SDPA attention), rfmpc through ``load_transformer``'s jitted
forward. Warm-up (rfmpc: trace + XLA compile + first run; diffusers: first run) is reported
separately from the steady state (median of ``--runs`` timed calls, each synchronised with
``block_until_ready`` / ``torch.cuda.synchronize``). On the small configs both share the same
random weights (saved by diffusers, loaded by rfmpc) and the output agreement is printed; the
real configs use independent random weights (speed does not depend on the values, and an 8B
checkpoint round trip through disk would dominate the run).

MFU = analytic matmul FLOPs (:func:`mmdit_forward_flops`) / steady-state time / device peak
(:data:`PEAK_FLOPS`, dense bf16). Results go to stdout, ``--json`` prints a JSON record, and
``--save`` writes ``benchmarks/results/<date>-<device>-mmdit_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Both frameworks share the GPU: JAX must not pre-allocate 75% of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np

from rfmpc.models import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM, MMDiTConfig

RESULTS = Path(__file__).resolve().parent / "results"

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


def _timed(fn, sync, runs: int) -> dict:
    t0 = time.perf_counter()
    out = fn()
    sync(out)
    warmup = time.perf_counter() - t0
    sync(fn())  # a second untimed call: allocator / autotuning settle
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        sync(out)
        times.append(time.perf_counter() - t0)
    stats = {"warmup_s": warmup, "median_s": statistics.median(times), "min_s": min(times)}
    return {**stats, "times_s": times}, out


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
    tmodel = SD3Transformer2DModel(**cfg.to_diffusers()).eval()
    with torch.no_grad():  # non-trivial weights everywhere (diffusers zero-inits some)
        for name, p in tmodel.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, float(np.prod(p.shape[1:])) ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
    tmodel = tmodel.to(tdev, tdtype)
    if save_to is not None:
        tmodel.save_pretrained(save_to, safe_serialization=True)
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
    from rfmpc.models import MMDiT, Transformer, load_transformer

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


def run(case_name: str, runs: int, *, skip_diffusers: bool = False) -> dict:
    import torch

    case = CASES[case_name]
    cfg = case.model
    on_gpu = torch.cuda.is_available() and jax.default_backend() == "gpu"
    tdev = torch.device("cuda" if on_gpu else "cpu")
    tdtype = torch.bfloat16 if case.dtype == "bf16" else torch.float32
    jdtype = jnp.bfloat16 if case.dtype == "bf16" else jnp.float32
    jdev = jax.devices()[0]
    device_name = (
        torch.cuda.get_device_name(0)
        if on_gpu
        else (f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}")
    )
    inp = _inputs(case)
    record: dict = {
        "benchmark": "mmdit_speed",
        "config": case_name,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": device_name,
        "jax_device": str(jdev.device_kind),
        "dtype": case.dtype,
        "batch": case.batch,
        "latent_hw": list(case.latent),
        "image_tokens": (case.latent[0] // cfg.patch_size) * (case.latent[1] // cfg.patch_size),
        "text_tokens": case.text_tokens,
        "mmdit_config": cfg.to_diffusers(),
        "same_weights": case.same_weights,
        "loadavg_1min": [os.getloadavg()[0]],  # start (end appended): the CPU may be shared
        "versions": {"jax": jax.__version__, "torch": torch.__version__},
    }
    sync_t = (lambda _: torch.cuda.synchronize()) if on_gpu else (lambda _: None)

    # ---- diffusers (PyTorch, eager) -----------------------------------------------------
    ref_out = None
    with tempfile.TemporaryDirectory() as tmp:
        tmodel = diffusers_model(case, tdev, tdtype, save_to=tmp if case.same_weights else None)
        n_params = sum(p.numel() for p in tmodel.parameters())
        targs = torch_inputs(inp, tdev, tdtype)

        held = {"model": tmodel, "args": targs}  # dropped before JAX runs (GPU memory)
        del tmodel, targs

        def torch_fwd():
            with torch.inference_mode():
                return held["model"](**held["args"], return_dict=False)[0]

        if not skip_diffusers:
            record["diffusers"], ref_out = _timed(torch_fwd, sync_t, runs)
            ref_out = ref_out.float().permute(0, 2, 3, 1).cpu().numpy()
        held.clear()
        if on_gpu:
            torch.cuda.empty_cache()

        # ---- rfmpc (JAX, jit) -------------------------------------------------------------
        model = rfmpc_model(case, jdtype, tmp if case.same_weights else None)
    jargs = jax_inputs(inp, jdtype, jdev)
    record["rfmpc"], out = _timed(lambda: model(*jargs), lambda o: o.block_until_ready(), runs)
    record["params"] = int(n_params)

    flops = mmdit_forward_flops(cfg, case.batch, *case.latent, case.text_tokens)
    record["flops"] = flops
    peak = _peak(device_name, case.dtype)
    record["peak_flops"] = peak
    for who in ("rfmpc", "diffusers"):
        if who in record:
            r = record[who]
            r["tflops_per_s"] = flops["total"] / r["median_s"] / 1e12
            r["mfu"] = None if peak is None else flops["total"] / r["median_s"] / peak
    if "diffusers" in record:
        _speedups(record)
    record["loadavg_1min"] = [record["loadavg_1min"][0], os.getloadavg()[0]]
    if ref_out is not None and case.same_weights:
        ours = np.asarray(out, np.float32)
        record["rel_max_err_vs_diffusers"] = float(
            np.max(np.abs(ours - ref_out)) / (np.std(ref_out) or 1.0)
        )
    return record


def _speedups(record: dict) -> None:
    """Ratios of diffusers' to rfmpc's median and minimum times. On a shared machine the
    minimum is the robust one: interference only ever adds time (and eager PyTorch's
    OpenMP threads suffer far more from CPU oversubscription than XLA's)."""
    d, r = record["diffusers"], record["rfmpc"]
    record["speedup_vs_diffusers"] = d["median_s"] / r["median_s"]
    record["speedup_vs_diffusers_min"] = d["min_s"] / r["min_s"]


def _markdown(r: dict) -> str:
    def row(who):
        x = r[who]
        mfu = "n/a" if x.get("mfu") is None else f"{100 * x['mfu']:.1f}%"
        return (
            f"| {who} | {1e3 * x['warmup_s']:.1f} | {1e3 * x['median_s']:.2f} | "
            f"{1e3 * x['min_s']:.2f} | {x['tflops_per_s']:.3f} | {mfu} |"
        )

    lines = [
        f"# mmdit_speed: {r['config']} on {r['device']} ({r['date']})",
        "",
        f"batch {r['batch']}, latent {r['latent_hw'][0]}x{r['latent_hw'][1]}, "
        f"{r['image_tokens']} image + {r['text_tokens']} text tokens, {r['dtype']}, "
        f"{r['params'] / 1e6:.2f}M params, {r['flops']['total'] / 1e9:.2f} GFLOP/forward "
        f"(matmuls), same weights: {r['same_weights']}",
        "",
        "| impl | warm-up ms | median ms | min ms | TFLOP/s (median) | MFU (median) |",
        "|---|---|---|---|---|---|",
        row("rfmpc"),
    ]
    if "diffusers" in r:
        lines.append(row("diffusers"))
        lines += [
            "",
            f"speed-up diffusers / rfmpc: {r['speedup_vs_diffusers']:.2f}x (median), "
            f"{r['speedup_vs_diffusers_min']:.2f}x (min)",
        ]
    lines.append(f"1-min load average at start, end: {r['loadavg_1min']} ({os.cpu_count()} CPUs)")
    if "rel_max_err_vs_diffusers" in r:
        lines.append(f"output agreement: rel max err {r['rel_max_err_vs_diffusers']:.2e}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=sorted(CASES), default="small")
    ap.add_argument("--runs", type=int, default=10, help="timed runs (median reported)")
    ap.add_argument("--json", action="store_true", help="print the JSON record")
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/...")
    ap.add_argument("--no-diffusers", action="store_true", help="time rfmpc only")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    record = run(args.config, args.runs, skip_diffusers=args.no_diffusers)
    md = _markdown(record)
    print(json.dumps(record, indent=2) if args.json else md)
    if args.save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        dev = re.sub(r"[^A-Za-z0-9]+", "-", record["device"]).strip("-").lower()
        stem = f"{_dt.date.today().isoformat()}-{dev}-mmdit_speed"
        (RESULTS / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
        (RESULTS / f"{stem}.md").write_text(md)
        print(f"saved {RESULTS / stem}.json / .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
