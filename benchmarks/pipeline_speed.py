"""End-to-end text-to-image time and peak memory: rfmpc vs diffusers, same config, same device.

Both pipelines are loaded from one locally built random-weight diffusers SD3 folder and generate
from the same latents, prompt, steps and guidance; the script checks the images agree, then times
warm-up (incl. compilation) and steady state separately. Each engine runs in its own subprocess so
its peak memory is its own (peak RSS on CPU; peak device bytes on GPU).

Configs:
  small       (default, CPU) a 4-layer width-128 MM-DiT, 256 image tokens, tiny VAE/text encoders.
  sd3-medium  (GPU) SD3-medium's transformer config (24 layers, width 1536) at 128x128 latents
              with random weights; VAE and text encoders are the tiny fixture ones, so the time is
              the transformer's 28 CFG steps plus a small decode (say so when you cite it).

Usage: python -m benchmarks.pipeline_speed [--config small] [--steps 28] [--runs 3] [--json]
       [--save]
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file: re-run as a module
    import _as_module  # noqa: F401  (execs `python -m benchmarks.<name>`, never returns)

import argparse
import datetime as _dt
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks._common import (
    PROMPT,
    RESULTS,
    child_env,
    ensure_torchvision_importable,
    module_cmd,
    peak_memory,
    save_result,
    slug,
    time_calls,
    torch_fixtures,
)

CONFIGS = {
    "small": {
        "overrides": {
            "num_layers": 4,
            "num_attention_heads": 4,
            "attention_head_dim": 32,
            "caption_projection_dim": 128,
            "sample_size": 32,
        },
        "size": 128,
    },
    "sd3-medium": {
        "overrides": {
            "num_layers": 24,
            "num_attention_heads": 24,
            "attention_head_dim": 64,
            "caption_projection_dim": 1536,
            "pos_embed_max_size": 192,
            "sample_size": 128,
        },
        "size": 512,
        "max_sequence_length": 256,  # 77 CLIP + 256 T5 tokens, as the released pipelines
    },
    # (GPU) SD3.5-large's transformer (38 layers, width 2432, RMS QK-norm) at 128x128 latents,
    # random weights, tiny VAE/text encoders. Building the folder writes ~32 GB of fp32 weights.
    "sd35-large": {
        "overrides": {
            "num_layers": 38,
            "num_attention_heads": 38,
            "attention_head_dim": 64,
            "caption_projection_dim": 2432,
            "pos_embed_max_size": 192,
            "sample_size": 128,
            "qk_norm": "rms_norm",
        },
        "size": 512,
        "max_sequence_length": 256,  # 77 CLIP + 256 T5 tokens, as the released pipelines
    },
}
#: Engines :func:`_engine` runs; ``diffusers-compile`` wraps the transformer in ``torch.compile``.
ENGINES = ("rfmpc", "diffusers", "diffusers-compile")


def make_generator(
    engine: str,
    folder: str,
    size: int,
    steps: int,
    dtype: str = "float32",
    max_sequence_length: int = 16,
    transformer_overrides: dict | None = None,
):
    """Load ``engine``'s pipeline from ``folder``; returns ``(gen, load_s, device)`` where
    ``gen()`` generates one image (numpy, NHWC) from fixed latents, :data:`PROMPT`, CFG 7.0.

    ``transformer_overrides``: replace the folder's transformer by a randomly initialised one
    of its config with these entries changed, built directly on the device in ``dtype`` (a
    released-size MM-DiT behind the tiny fixture text encoders and VAE, without writing
    gigabytes of weights to disk; the two engines then have different weights).
    """
    import numpy as np

    def big_config():
        from rfmpc.models import MMDiTConfig

        cfg = json.loads((Path(folder) / "transformer" / "config.json").read_text())
        return MMDiTConfig.from_diffusers({**cfg, **transformer_overrides})

    rng = np.random.default_rng(0)
    lat_nhwc = rng.standard_normal((1, size // 4, size // 4, 16)).astype(np.float32)
    if engine == "rfmpc":
        import jax

        from rfmpc.pipeline import load_pipeline

        t0 = time.perf_counter()
        import jax.numpy as jnp

        jdtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
        pipe = load_pipeline(folder, dtype=jdtype)
        if transformer_overrides:
            import dataclasses

            from flax import nnx

            from rfmpc.models import MMDiT, Transformer

            cfg = big_config()
            module = nnx.jit(
                lambda: MMDiT(cfg, dtype=jdtype, param_dtype=jdtype, rngs=nnx.Rngs(0))
            )()
            pipe = dataclasses.replace(pipe, transformer=Transformer.from_module(module))
        load_s = time.perf_counter() - t0

        def gen():
            out = pipe(
                PROMPT,
                num_inference_steps=steps,
                guidance_scale=7.0,
                latents=lat_nhwc,
                height=size,
                width=size,
                max_sequence_length=max_sequence_length,
            )
            return np.asarray(out.images)

        device = str(jax.devices()[0].device_kind)
    else:
        import torch

        ensure_torchvision_importable()  # transformers imports torchvision
        from diffusers import StableDiffusion3Pipeline

        t0 = time.perf_counter()
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        pipe = StableDiffusion3Pipeline.from_pretrained(
            folder, local_files_only=True, torch_dtype=tdtype
        ).to(dev)
        if transformer_overrides:
            from diffusers import SD3Transformer2DModel

            torch.manual_seed(0)
            with torch.device(dev):
                big = SD3Transformer2DModel(**big_config().to_diffusers()).eval()
            pipe.transformer = big.to(dev, tdtype)
        if engine == "diffusers-compile":
            pipe.transformer = torch.compile(pipe.transformer)
        load_s = time.perf_counter() - t0
        lat = torch.from_numpy(lat_nhwc.transpose(0, 3, 1, 2).copy()).to(dev, tdtype)

        def gen():
            with torch.no_grad():
                out = pipe(
                    PROMPT,
                    num_inference_steps=steps,
                    guidance_scale=7.0,
                    latents=lat,
                    height=size,
                    width=size,
                    max_sequence_length=max_sequence_length,
                    output_type="np",
                )
            return out.images

        device = torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu"
    return gen, load_s, device


def _engine(
    engine: str,
    folder: str,
    size: int,
    steps: int,
    runs: int,
    dtype: str = "float32",
    max_sequence_length: int = 16,
) -> dict:
    """Load ``engine``'s pipeline from ``folder`` in ``dtype`` ("float32" | "bfloat16") and time
    warm-up and ``runs`` generations; the image is saved as ``<folder>/../<engine>.npy``."""
    import numpy as np

    gen, load_s, device = make_generator(engine, folder, size, steps, dtype, max_sequence_length)
    st, img = time_calls(gen, runs, lambda o: o)
    mem = peak_memory()
    np.save(Path(folder).parent / f"{engine}.npy", np.asarray(img, np.float32))
    return {
        "engine": engine,
        "device": device,
        "load_s": load_s,
        "warmup_s": st["warmup_s"],
        "median_s": st["median_s"],
        "min_s": st["min_s"],
        "times_s": st["times_s"],
        "peak_bytes": mem["bytes"],
        "peak_kind": mem["kind"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="small")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--save", action="store_true")
    p.add_argument("--_engine", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_folder", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cfg = CONFIGS[args.config]
    if args._engine:  # child process
        msl = cfg.get("max_sequence_length", 16)
        rec = _engine(
            args._engine, args._folder, cfg["size"], args.steps, args.runs, "float32", msl
        )
        print(json.dumps(rec))
        return 0
    import numpy as np

    build_tiny_sd3_pipeline = torch_fixtures().build_tiny_sd3_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "sd3"
        build_tiny_sd3_pipeline(folder, seed=0, transformer_overrides=cfg["overrides"])
        recs = {}
        for engine in ("rfmpc", "diffusers"):
            out = subprocess.run(
                module_cmd(
                    "pipeline_speed",
                    "--config",
                    args.config,
                    "--steps",
                    str(args.steps),
                    "--runs",
                    str(args.runs),
                    "--_engine",
                    engine,
                    "--_folder",
                    str(folder),
                ),
                env=child_env(),
                capture_output=True,
                text=True,
                check=True,
            )
            recs[engine] = json.loads(out.stdout.strip().splitlines()[-1])
        diff = float(
            np.abs(np.load(Path(tmp) / "rfmpc.npy") - np.load(Path(tmp) / "diffusers.npy")).max()
        )
    r, d = recs["rfmpc"], recs["diffusers"]
    result = {
        "benchmark": "pipeline_speed",
        "date": _dt.date.today().isoformat(),
        "config": args.config,
        "steps": args.steps,
        "guidance": 7.0,
        "image_size": cfg["size"],
        "device": r["device"],
        "rfmpc": r,
        "diffusers": d,
        "speedup_median": d["median_s"] / r["median_s"],
        "speedup_min": d["min_s"] / r["min_s"],
        "max_abs_image_diff": diff,
    }
    md = (
        f"# pipeline_speed ({result['date']}, {args.config}, device: {r['device']})\n\n"
        f"{args.steps} steps, CFG 7.0, {cfg['size']}x{cfg['size']}, batch 1; images agree to "
        f"{diff:.1e} max abs.\n\n"
        "| engine | load s | warm-up s (incl. compile) | median s/image | min s/image "
        "| peak memory |\n"
        "|---|---|---|---|---|---|\n"
        + "".join(
            f"| {e['engine']} | {e['load_s']:.2f} | {e['warmup_s']:.2f} | {e['median_s']:.3f} | "
            f"{e['min_s']:.3f} | {e['peak_bytes'] / 2**20:.0f} MiB ({e['peak_kind']}) |\n"
            for e in (r, d)
        )
        + f"\nspeed-up rfmpc vs diffusers: {result['speedup_median']:.2f}x (median), "
        f"{result['speedup_min']:.2f}x (min)\n"
    )
    if args.save:
        stem = RESULTS / f"{result['date']}-{slug(r['device'])}-pipeline_speed-{args.config}"
        save_result(stem, {".json": json.dumps(result, indent=2), ".md": md})
    print(json.dumps(result) if args.json else md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
