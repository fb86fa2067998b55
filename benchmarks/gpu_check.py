"""The prepared GPU check (``benchmarks/gpu_check.sh``): every figure issue 18 asks of a lent
H100/H200, inside an 8-minute window, written to ``$OUT/<date>-<device>.{md,json}``.

    bash benchmarks/gpu_check.sh               # on the GPU machine (no network)
    bash benchmarks/gpu_check.sh --rehearse    # CPU, tiny sizes: the same code paths in ~1 min

Sections, each in its own child process with a time budget (a section that runs out is killed;
what it measured so far is kept, the rest is marked skipped, and the next section starts):

1. ``fwd-sd3-medium``, ``fwd-sd35-large``: MM-DiT forward at the released sizes (random
   weights, bf16, batch 2 = one CFG step, 1024^2 = 128x128x16 latent, 77 + 256 text tokens):
   rfmpc (jitted call) vs diffusers eager vs ``torch.compile`` (when its compile fits the
   budget), timed round-robin in one process; MFU against the datasheet dense bf16 peak
   (989 TFLOP/s for H100 and H200); peak device memory of each framework.
2. ``generation``: a 1024^2-size SD3-medium generation, 28 steps with CFG, end to end (text
   encoding, denoising, decoding): SD3-medium's transformer (random weights, bf16) behind the
   tiny fixture text encoders and VAE (``tests/_torch_fixtures.py``, VAE factor 4, so the
   512^2 decode is the fixture's), rfmpc vs diffusers, round-robin.
3. ``parity``: float32 parity with diffusers at SD3-medium size (same random weights converted
   in memory; matmuls at full float32 precision in both: no TF32), relative errors.
4. ``switch``: per-step overhead of the switch controllers ``Direct`` and ``MPC()`` at SD3-medium
   size (``report_measure.child_switch``: CFG field, 28 steps, switch at k = 10).

``--rehearse`` runs every section on the CPU at toy sizes (``torch.compile`` with the
``eager`` backend, 2-step generation, one run each) in one child process; ``tests/test_gpu_check
.py`` runs it so that the script cannot rot.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file: re-run as a module
    import _as_module  # noqa: F401  (execs `python -m benchmarks.<name>`, never returns)

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

from benchmarks._common import (
    ROOT,
    child_env,
    ensure_torchvision_importable,
    md_table,
    module_cmd,
    peak_memory,
    save_result,
    slug,
    summary,
    torch_fixtures,
    torch_peak_memory,
)

HERE = Path(__file__).resolve().parent
#: Whole-run deadline (s): gpu_check.sh kills at 470 s; leave time to write the report.
DEADLINE_S = 440.0

#: (section, budget in seconds on the GPU). Order = priority: what runs first survives overruns.
SECTIONS = (
    ("env", 30),
    ("fwd-sd3-medium", 95),
    ("generation", 95),
    ("parity", 55),
    ("switch", 70),
    ("fwd-sd35-large", 95),
)


@dataclasses.dataclass(frozen=True)
class Sizes:
    fwd: dict  # section -> mmdit_speed case
    runs: int
    compile_backend: str
    compile_reserve_s: float  # torch.compile is tried only with this much section time left
    gen_overrides: dict | None
    gen_size: int
    gen_steps: int
    gen_msl: int
    gen_runs: int
    parity_case: str
    switch_case: str
    switch_steps: int
    switch_k: int
    switch_runs: int


_SD3_MEDIUM_TRANSFORMER = {
    "num_layers": 24,
    "num_attention_heads": 24,
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "pos_embed_max_size": 192,
    "sample_size": 128,
}

REAL = Sizes(
    fwd={"fwd-sd3-medium": "sd3-medium", "fwd-sd35-large": "sd35-large"},
    runs=10,
    compile_backend="inductor",
    compile_reserve_s=45.0,
    gen_overrides=_SD3_MEDIUM_TRANSFORMER,
    gen_size=512,  # fixture VAE factor 4: 128x128 latent, the transformer work of 1024^2
    gen_steps=28,
    gen_msl=256,
    gen_runs=3,
    parity_case="sd3-medium",
    switch_case="sd3-medium",
    switch_steps=28,
    switch_k=10,
    switch_runs=2,
)
REHEARSE = Sizes(
    fwd={"fwd-sd3-medium": "tiny-gpu-path", "fwd-sd35-large": "tiny-gpu-path"},
    runs=1,
    compile_backend="eager",
    compile_reserve_s=0.0,
    gen_overrides={"num_layers": 1},
    gen_size=32,
    gen_steps=2,
    gen_msl=8,
    gen_runs=1,
    parity_case="tiny-gpu-path",
    switch_case="tiny-gpu-path",
    switch_steps=4,
    switch_k=1,
    switch_runs=1,
)


# ============================================================================ child helpers
def _bench(name: str):
    import importlib

    return importlib.import_module(f"benchmarks.{name}")


def _on_gpu() -> bool:
    import jax

    return jax.default_backend() == "gpu"


def _jax_peak_bytes() -> dict:
    return peak_memory(rss_kind="process peak RSS (jax and torch together)")


def _round_robin(engines: dict, runs: int, deadline: float, save) -> None:
    """Time each engine ``runs`` times, interleaved; stops early (marked) at ``deadline``."""
    for r in range(runs):
        for name, (fn, sync) in engines.items():
            if time.monotonic() > deadline:
                for rec in save.rows.values():
                    rec.setdefault("note", f"stopped after {r} round(s): section budget")
                return
            t0 = time.perf_counter()
            sync(fn())
            save.rows[name].setdefault("times_s", []).append(time.perf_counter() - t0)
        for name in engines:
            save.rows[name].update(summary(save.rows[name]["times_s"]))
        save()


class _Saver:
    """A section's record, written to disk after every step (kept if the section is killed)."""

    def __init__(self, path: Path, rec: dict):
        self.path, self.rec = path, rec
        self.rows = rec.setdefault("engines", {})

    def __call__(self):
        self.path.write_text(json.dumps(self.rec, default=str))


def _warm(save: _Saver, name: str, fn, sync, **info) -> bool:
    t0 = time.perf_counter()
    try:
        sync(fn())
    except Exception as e:
        save.rows[name] = {"error": f"{type(e).__name__}: {e}"[:500], **info}
        save()
        return False
    save.rows[name] = {"warmup_s": time.perf_counter() - t0, **info}
    save()
    return True


# ============================================================================ sections
def section_env(sizes: Sizes, save: _Saver, deadline: float) -> None:
    import jax

    rec = save.rec
    dev = jax.devices()[0]
    rec.update(
        jax=jax.__version__,
        backend=jax.default_backend(),
        device_kind=str(dev.device_kind),
        python=sys.version.split()[0],
        cpu=platform.processor() or platform.machine(),
    )
    from importlib import metadata

    for pkg in ("torch", "diffusers", "flax", "jaxopt", "transformers", "equinox", "diffrax"):
        try:
            rec[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            rec[pkg] = "not installed"
    import torch

    rec["torch_cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    save()


def section_fwd(sizes: Sizes, save: _Saver, deadline: float, section: str) -> None:
    import jax
    import jax.numpy as jnp
    import torch

    ms = _bench("mmdit_speed")
    case_name = sizes.fwd[section]
    case = ms.CASES[case_name]
    on_gpu = _on_gpu() and torch.cuda.is_available()
    tdev = torch.device("cuda" if on_gpu else "cpu")
    tdtype = torch.bfloat16 if case.dtype == "bf16" else torch.float32
    jdtype = jnp.bfloat16 if case.dtype == "bf16" else jnp.float32
    device = torch.cuda.get_device_name(0) if on_gpu else f"CPU {platform.machine()}"
    flops = ms.mmdit_forward_flops(case.model, case.batch, *case.latent, case.text_tokens)["total"]
    peak = ms._peak(device, case.dtype)
    save.rec.update(
        case=case_name,
        device=device,
        shape=f"batch {case.batch}, latent {case.latent[0]}x{case.latent[1]}, "
        f"{(case.latent[0] // 2) * (case.latent[1] // 2)}+{case.text_tokens} tokens, {case.dtype}",
        flops=flops,
        peak_flops=peak,
        peak_how="datasheet dense bf16" if peak else None,
    )
    inp = ms._inputs(case)
    engines = {}
    tr = ms.rfmpc_model(case, jdtype, None)
    jargs = ms.jax_inputs(inp, jdtype, jax.devices()[0])
    block = lambda o: o.block_until_ready()
    if _warm(save, "rfmpc", lambda: tr(*jargs), block):
        engines["rfmpc"] = (lambda: tr(*jargs), block)
    save.rec["memory_rfmpc"] = _jax_peak_bytes()
    tmodel = ms.diffusers_model(case, tdev, tdtype)
    targs = ms.torch_inputs(inp, tdev, tdtype)
    sync_t = (lambda o: torch.cuda.synchronize()) if on_gpu else (lambda o: o)

    def eager():
        with torch.inference_mode():
            return tmodel(**targs, return_dict=False)[0]

    if _warm(save, "diffusers", eager, sync_t):
        engines["diffusers"] = (eager, sync_t)
    left = deadline - time.monotonic()
    if left > sizes.compile_reserve_s:
        compiled = torch.compile(tmodel, backend=sizes.compile_backend)

        def comp():
            with torch.inference_mode():
                return compiled(**targs, return_dict=False)[0]

        name = "diffusers-compile"
        if _warm(save, name, comp, sync_t, backend=sizes.compile_backend):
            engines[name] = (comp, sync_t)
    else:
        save.rows["diffusers-compile"] = {
            "skipped": f"{left:.0f} s left in the section, under the {sizes.compile_reserve_s:.0f} "
            "s reserved for torch.compile's compilation"
        }
    save.rec["memory_torch"] = torch_peak_memory()
    _round_robin(engines, sizes.runs, deadline, save)
    for name in engines:
        r = save.rows[name]
        if "median_s" in r:
            r["tflops_per_s"] = flops / r["median_s"] / 1e12
            r["mfu"] = flops / r["median_s"] / peak if peak else None
    save()


def section_generation(sizes: Sizes, save: _Saver, deadline: float, tmp: Path) -> None:
    import torch

    build_tiny_sd3_pipeline = torch_fixtures().build_tiny_sd3_pipeline

    ps = _bench("pipeline_speed")
    on_gpu = _on_gpu() and torch.cuda.is_available()
    dtype = "bfloat16" if on_gpu else "float32"
    folder = tmp / "sd3"
    t0 = time.perf_counter()
    build_tiny_sd3_pipeline(folder, seed=0)
    save.rec.update(
        what=f"{sizes.gen_size}^2 image through the fixture VAE (factor 4): latent "
        f"{sizes.gen_size // 4}^2x16, {sizes.gen_steps} steps, CFG 7.0 (batch 2), 77 + "
        f"{sizes.gen_msl} text tokens, transformer overrides {sizes.gen_overrides} (random "
        f"weights, {dtype}), tiny fixture text encoders and VAE",
        build_s=time.perf_counter() - t0,
        dtype=dtype,
    )
    save()
    engines = {}
    for name in ("rfmpc", "diffusers"):
        gen, load_s, device = ps.make_generator(
            name,
            str(folder),
            sizes.gen_size,
            sizes.gen_steps,
            dtype,
            sizes.gen_msl,
            transformer_overrides=sizes.gen_overrides,
        )
        if _warm(save, name, gen, lambda o: o, load_s=load_s, device=device):
            engines[name] = (gen, lambda o: o)
    save.rec["memory_rfmpc"] = _jax_peak_bytes()
    save.rec["memory_torch"] = torch_peak_memory()
    _round_robin(engines, sizes.gen_runs, deadline, save)


class _DictSource:
    """An in-memory stand-in for ``safetensors_io.TensorSource`` (``take`` + consumed check)."""

    description = "in-memory diffusers state_dict"

    def __init__(self, tensors: dict):
        self.tensors, self.consumed = tensors, set()

    def take(self, key, shape=None):
        from weights_conversion import WeightLoadError

        if key not in self.tensors:
            raise WeightLoadError(f"missing key {key!r} in the diffusers state_dict")
        arr = self.tensors[key]
        if shape is not None and tuple(arr.shape) != tuple(shape):
            raise WeightLoadError(f"{key!r}: shape {arr.shape}, expected {shape}")
        self.consumed.add(key)
        return arr

    def assert_all_consumed(self, ignore=None):
        from weights_conversion import WeightLoadError

        left = sorted(set(self.tensors) - self.consumed)
        if left:
            raise WeightLoadError(f"unmapped diffusers keys: {left[:10]}")


def section_parity(sizes: Sizes, save: _Saver, deadline: float) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from diffusers import SD3Transformer2DModel
    from flax import nnx

    from rfmpc.metrics import rel_l2_err, rel_max_err
    from rfmpc.models import MMDiT, Transformer
    from rfmpc.models.mmdit import Buffer
    from weights_conversion.mmdit import convert_mmdit
    from weights_conversion.safetensors_io import load_into_model

    ms = _bench("mmdit_speed")
    case = ms.CASES[sizes.parity_case]
    cfg = case.model
    on_gpu = _on_gpu() and torch.cuda.is_available()
    tdev = torch.device("cuda" if on_gpu else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    with torch.device(tdev):
        tmodel = ms.redraw_weights_(SD3Transformer2DModel(**cfg.to_diffusers()).eval())
    state = {k: v.detach().float().cpu().numpy() for k, v in tmodel.state_dict().items()}
    abstract = nnx.eval_shape(
        lambda: MMDiT(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    )
    source = _DictSource(state)
    params = convert_mmdit(source, abstract)
    load_into_model(abstract, params, source=source.description, variables=(nnx.Param, Buffer))
    del state, params
    tr = Transformer.from_module(abstract)
    inp = ms._inputs(case)
    targs = ms.torch_inputs(inp, tdev, torch.float32)
    with torch.inference_mode():
        ref = tmodel(**targs, return_dict=False)[0].float().permute(0, 2, 3, 1).cpu().numpy()
    del tmodel
    if on_gpu:
        torch.cuda.empty_cache()
    with jax.default_matmul_precision("highest"):
        jargs = ms.jax_inputs(inp, jnp.float32, jax.devices()[0])
        ours = np.asarray(tr(*jargs), np.float32)
    save.rec.update(
        case=sizes.parity_case,
        precision="float32; torch TF32 off; jax_default_matmul_precision=highest",
        shape=f"batch {case.batch}, latent {case.latent[0]}x{case.latent[1]}, "
        f"{case.text_tokens} text tokens",
        rel_max_err=rel_max_err(ours, ref),
        rel_l2_err=rel_l2_err(ours, ref),
        memory_rfmpc=_jax_peak_bytes(),
        memory_torch=torch_peak_memory(),
    )
    save()


def section_switch(sizes: Sizes, save: _Saver, deadline: float, tmp: Path) -> None:
    rm = _bench("report_measure")
    p = types.SimpleNamespace(
        switch_field=sizes.switch_case,
        switch_samples=1,
        switch_steps=sizes.switch_steps,
        switch_k=sizes.switch_k,
        switch_methods=("direct", "mpc"),
        switch_runs=sizes.switch_runs,
    )
    os.environ["REPORT_PARTIAL"] = str(tmp / "switch-partial.json")
    rec = rm.child_switch(p, False, tmp)
    save.rec.update(rec)
    save.rec["controllers"] = "direct = rfmpc.control.Direct(), mpc = rfmpc.control.MPC()"
    save()


def _child(args) -> int:
    ensure_torchvision_importable()  # before diffusers imports transformers
    sizes = REHEARSE if args.rehearse else REAL
    names = args._section.split(",")
    for name in names:
        path = Path(args._result_dir) / f"{name}.json"
        budget = dict(SECTIONS)[name] if not args.rehearse else 600
        deadline = time.monotonic() + budget - 5
        save = _Saver(path, {"section": name})
        t0 = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                if name == "env":
                    section_env(sizes, save, deadline)
                elif name.startswith("fwd-"):
                    section_fwd(sizes, save, deadline, name)
                elif name == "generation":
                    section_generation(sizes, save, deadline, Path(tmp))
                elif name == "parity":
                    section_parity(sizes, save, deadline)
                elif name == "switch":
                    section_switch(sizes, save, deadline, Path(tmp))
        except Exception as e:
            import traceback

            traceback.print_exc()
            save.rec["error"] = f"{type(e).__name__}: {e}"[:800]
        save.rec["wall_s"] = time.perf_counter() - t0
        save()
    return 0


# ============================================================================ orchestration
def _run_sections(args, out_dir: Path, t_start: float) -> dict:
    results = {}
    groups = [",".join(n for n, _ in SECTIONS)] if args.rehearse else [n for n, _ in SECTIONS]
    for group in groups:
        first = group.split(",")[0]
        left = DEADLINE_S - (time.monotonic() - t_start)
        budget = 900.0 if args.rehearse else min(dict(SECTIONS)[first], left - 10)
        if budget < 15:
            for n in group.split(","):
                results[n] = {"skipped": f"whole-run deadline ({DEADLINE_S:.0f} s) reached"}
            continue
        cmd = module_cmd("gpu_check", "--_section", group)
        cmd += ["--_result_dir", str(out_dir)] + (["--rehearse"] if args.rehearse else [])
        print(f"[gpu_check] {time.strftime('%H:%M:%S')} {group} (<= {budget:.0f} s)", flush=True)
        t0 = time.monotonic()
        try:
            subprocess.run(cmd, timeout=budget, cwd=ROOT, env=child_env(), check=False)
            status = None
        except subprocess.TimeoutExpired:
            status = f"killed at its {budget:.0f} s budget; rows so far kept"
        for n in group.split(","):
            path = out_dir / f"{n}.json"
            rec = json.loads(path.read_text()) if path.is_file() else {"error": "no record"}
            if status:
                rec["incomplete"] = status
            results[n] = rec
        print(f"[gpu_check]   {time.monotonic() - t0:.0f} s", flush=True)
    return results


def _fmt_bytes(m) -> str:
    return f"{m['bytes'] / 2**30:.2f} GiB ({m['kind']})" if m else "n/a"


def _memory_line(section: dict) -> str:
    return (
        f"peak memory: rfmpc {_fmt_bytes(section.get('memory_rfmpc'))}; diffusers "
        f"{_fmt_bytes(section.get('memory_torch'))}"
    )


def _markdown(rec: dict) -> str:
    s = rec["sections"]
    env = s.get("env", {})
    title = f"# gpu_check: {rec['device']} ({rec['date']})"
    lines = [
        title + (" — REHEARSAL (CPU, toy sizes)" if rec["rehearse"] else ""),
        "",
        f"jax {env.get('jax')} ({env.get('backend')}), torch {env.get('torch')}, diffusers "
        f"{env.get('diffusers')}, flax {env.get('flax')}, jaxopt {env.get('jaxopt')}; total "
        f"{rec['total_s']:.0f} s. Every ratio compares two figures of this run on this device.",
    ]
    for key in ("fwd-sd3-medium", "fwd-sd35-large"):
        f = s.get(key, {})
        lines += ["", f"## MM-DiT forward: {f.get('case', key)}", ""]
        if "shape" in f:
            lines += [
                f"{f['shape']}; {f['flops'] / 1e12:.2f} TFLOP/forward (matmuls); MFU vs "
                f"{f.get('peak_how') or 'no known peak'}"
                + (f" {f['peak_flops'] / 1e12:.0f} TFLOP/s" if f.get("peak_flops") else ""),
                "",
            ]
            base = f.get("engines", {}).get("rfmpc", {}).get("median_s")
            rows = []
            for name, r in f.get("engines", {}).items():
                if "median_s" not in r:
                    rows.append([name, r.get("error") or r.get("skipped") or "not timed"])
                    continue
                mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
                ratio = f"{r['median_s'] / base:.2f}x" if base else "n/a"
                rows.append(
                    [
                        name,
                        f"{r['warmup_s']:.1f}",
                        f"{1e3 * r['median_s']:.2f}",
                        f"{1e3 * r['min_s']:.2f}",
                        r["n"],
                        f"{r['tflops_per_s']:.1f}",
                        mfu,
                        ratio,
                    ]
                )
            head = (
                "engine",
                "warm-up s",
                "median ms",
                "min ms",
                "n",
                "TFLOP/s",
                "MFU",
                "time / rfmpc",
            )
            lines += md_table(head, rows)
            lines += ["", _memory_line(f)]
        lines += _problems(f)
    g = s.get("generation", {})
    lines += ["", "## Generation (end to end)", ""]
    if "what" in g:
        rows = [
            [
                name,
                f"{r['load_s']:.1f}",
                f"{r['warmup_s']:.1f}",
                f"{r['median_s']:.3f}",
                f"{r['min_s']:.3f}",
                r["n"],
            ]
            if "median_s" in r
            else [name, r.get("error", "not timed")]
            for name, r in g.get("engines", {}).items()
        ]
        head = ("engine", "load s", "warm-up s", "median s", "min s", "n")
        lines += [g["what"], "", *md_table(head, rows)]
        lines += ["", _memory_line(g)]
    lines += _problems(g)
    p = s.get("parity", {})
    lines += ["", "## float32 parity with diffusers", ""]
    if "rel_max_err" in p:
        lines += [
            f"{p['case']}: {p['shape']}; {p['precision']}: max |rfmpc - diffusers| / std = "
            f"{p['rel_max_err']:.2e}, ||rfmpc - diffusers|| / ||diffusers|| = "
            f"{p['rel_l2_err']:.2e}"
        ]
    lines += _problems(p)
    w = s.get("switch", {})
    lines += ["", "## Switch controllers: per-step overhead", ""]
    if "methods" in w:
        lines += [
            f"{w.get('field')}; N = {w.get('N')}, switch at k = {w.get('k')}; one denoising "
            f"step {1e3 * w.get('step_s', 0):.1f} ms; {w['controllers']}",
            "",
        ]
        rows = []
        for m in w["methods"]:
            if "error" in m:
                rows.append([m["method"], m["error"]])
                continue
            per_ctrl = m.get("overhead_per_controlled_step_pct")
            rows.append(
                [
                    m["method"],
                    f"{m['wall_s']:.3f}",
                    f"{m['overhead_s']:.3f}",
                    f"{m['overhead_per_remaining_step_pct']:.2f}%",
                    "n/a" if per_ctrl is None else f"{per_ctrl:.2f}%",
                    m["fallback"],
                ]
            )
        head = (
            "controller",
            "wall s",
            "overhead s",
            "% of a step per remaining step",
            "% of a step per controlled step",
            "fallback",
        )
        lines += md_table(head, rows)
    lines += _problems(w)
    return "\n".join(lines) + "\n"


def _problems(r: dict) -> list[str]:
    out = []
    for key in ("skipped", "incomplete", "error"):
        if key in r:
            out.append(f"\n**{key}:** {r[key]}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rehearse", action="store_true", help="CPU, toy sizes, every section")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "results"))
    ap.add_argument("--_section", help=argparse.SUPPRESS)
    ap.add_argument("--_result_dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._section:
        return _child(args)
    t_start = time.monotonic()
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        sections = _run_sections(args, Path(tmp), t_start)
    env = sections.get("env", {})
    device = env.get("torch_cuda") or env.get("device_kind") or "unknown"
    if args.rehearse or env.get("backend") != "gpu":
        device = f"cpu-{env.get('cpu') or 'unknown'}"
    rec = {
        "benchmark": "gpu_check",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "rehearse": bool(args.rehearse),
        "deadline_s": DEADLINE_S,
        "budgets_s": dict(SECTIONS),
        "total_s": time.monotonic() - t_start,
        "sections": sections,
    }
    md = _markdown(rec)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{_dt.date.today().isoformat()}-{slug(device)}" + (
        "-rehearsal" if args.rehearse else ""
    )
    save_result(out / stem, {".json": json.dumps(rec, indent=2, default=str) + "\n", ".md": md})
    print(md)
    print(f"[gpu_check] wrote {out / stem}.md and .json", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
