"""Peak host memory while loading a real-size SD3 transformer checkpoint (random weights).

Writes a diffusers-format ``SD3Transformer2DModel`` folder with SD3-medium's released config
(2.03B parameters) and random bf16 weights (streamed to disk tensor by tensor, ~4 GB), then, in a
fresh subprocess, loads it with ``rfmpc.convert.load_transformer`` and reports the process's
resident memory before and after and its peak (``ru_maxrss``), beside the size of the weights.
The loader memory-maps the file and converts one tensor at a time into device arrays, so the
peak should be about one copy of the weights (in the target dtype) plus one tensor, not two
copies. On CPU, "device" arrays live in host memory, so that one copy is host memory too.

Usage: python -m benchmarks.load_memory [--config sd3-medium|sd35-medium|sd35-large]
       [--dtype bfloat16|float32] [--dir DIR] [--json] [--save]
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file: re-run as a module
    import _as_module  # noqa: F401  (execs `python -m benchmarks.<name>`, never returns)

import argparse
import datetime as _dt
import json
import os
import struct
import subprocess
import tempfile
from pathlib import Path

from benchmarks._common import RESULTS, child_env, current_rss, module_cmd, save_result


def write_random_checkpoint(folder: Path, config_name: str) -> int:
    import ml_dtypes
    import numpy as np
    from flax import nnx

    from rfmpc.models import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM, MMDiT
    from weights_conversion.mmdit import diffusers_key_map
    from weights_conversion.torch_layout import _ConstantRngs

    cfg = {"sd3-medium": SD3_MEDIUM, "sd35-medium": SD35_MEDIUM, "sd35-large": SD35_LARGE}[
        config_name
    ]
    model = nnx.eval_shape(lambda: MMDiT(cfg, rngs=_ConstantRngs()))
    entries = sorted((key, shape) for key, shape, _ in diffusers_key_map(model).values())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps({"_class_name": "SD3Transformer2DModel", **cfg.to_diffusers()})
    )
    header, offset = {}, 0
    for key, shape in entries:
        n = int(np.prod(shape)) * 2
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    hb = json.dumps(header).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    rng = np.random.default_rng(0)
    with open(folder / "diffusion_pytorch_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        for _, shape in entries:
            a = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(ml_dtypes.bfloat16)
            f.write(a.tobytes())
    return offset


def _child(folder: str, dtype: str) -> dict:
    import resource

    import jax
    import jax.numpy as jnp

    from rfmpc.convert import load_transformer

    jax.numpy.zeros(1).block_until_ready()
    before = current_rss()
    tr = load_transformer(folder, dtype={"bfloat16": jnp.bfloat16, "float32": jnp.float32}[dtype])
    jax.block_until_ready(tr.params)
    leaves = jax.tree.leaves((tr.params, tr.buffers))
    model_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
    return {
        "rss_before": before,
        "rss_after": current_rss(),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "model_bytes_in_memory": int(model_bytes),
        "params": int(sum(x.size for x in jax.tree.leaves(tr.params))),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--config", default="sd3-medium", choices=["sd3-medium", "sd35-medium", "sd35-large"]
    )
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--dir", default=None, help="where to write the checkpoint (default: tmp)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--save", action="store_true")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        print(json.dumps(_child(args._child, args.dtype)))
        return 0
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp) / "transformer"
        file_bytes = write_random_checkpoint(folder, args.config)
        out = subprocess.run(
            module_cmd("load_memory", "--dtype", args.dtype, "--_child", str(folder)),
            env=child_env(),
            capture_output=True,
            text=True,
            check=True,
        )
        rec = json.loads(out.stdout.strip().splitlines()[-1])
    gib = 2**30
    extra = rec["peak_rss"] - rec["rss_before"]
    result = {
        "benchmark": "load_memory",
        "date": _dt.date.today().isoformat(),
        "config": args.config,
        "dtype": args.dtype,
        "checkpoint_bytes": file_bytes,
        **rec,
        "peak_minus_baseline": extra,
        "peak_over_model_bytes": extra / rec["model_bytes_in_memory"],
        "cpus": os.cpu_count(),
    }
    md = (
        f"# load_memory ({result['date']}, {args.config}, load dtype {args.dtype}, CPU)\n\n"
        f"- checkpoint: {file_bytes / gib:.2f} GiB bf16, {rec['params'] / 1e9:.2f}B params\n"
        f"- weights in memory after load: {rec['model_bytes_in_memory'] / gib:.2f} GiB\n"
        f"- RSS before load {rec['rss_before'] / gib:.2f} GiB, after {rec['rss_after'] / gib:.2f}"
        f" GiB, peak {rec['peak_rss'] / gib:.2f} GiB\n"
        f"- peak minus baseline = {extra / gib:.2f} GiB = "
        f"{result['peak_over_model_bytes']:.2f}x the loaded weights\n"
    )
    if args.save:
        stem = RESULTS / f"{result['date']}-cpu-load_memory-{args.config}"
        save_result(stem, {".json": json.dumps(result, indent=2), ".md": md})
    print(json.dumps(result) if args.json else md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
