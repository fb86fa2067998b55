"""The measurements of ``benchmarks/report.py``: one function per child process.

Each ``child_*(profile, quick, tmp, *params) -> dict`` runs in a fresh interpreter started by
``report.py`` (so its peak memory is its own) and returns a JSON-ready record; ``tmp`` is the
run's scratch folder, shared between children of one benchmark (weights written by the
diffusers child are read by the rfmpc child, outputs are compared). Nothing here prints a
verdict: ``report.py`` derives ratios, MFU and goals and renders the markdown.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from benchmarks._common import (
    cpu_name,
    memory_analysis,
    peak_memory,
    prompt_pair,
    time_calls,
    torch_fixtures,
)

HERE = Path(__file__).resolve().parent


# ============================================================================ child helpers
def _bench_module(name: str):
    """``benchmarks.<name>``."""
    import importlib

    return importlib.import_module(f"benchmarks.{name}")


def _steady(fn, sync, runs: int) -> dict:
    """First call (compile + run) timed apart from ``runs`` steady calls (median, min)."""
    st, out = time_calls(fn, runs, sync)
    first = st.pop("warmup_s")
    return {
        "first_s": first,
        **st,
        "compile_s": max(first - st["median_s"], 0.0),
        "compile_method": "first-steady",
        "_out": out,
    }


def _pop_out(rec: dict):
    return rec.pop("_out", None)


def child_peak(p, quick: bool, tmp: Path) -> dict:
    """Device info, the datasheet peak (GPU) and a measured large-GEMM FLOP/s per dtype."""
    import jax
    import jax.numpy as jnp

    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    ms = _bench_module("mmdit_speed")
    out = {
        "platform": dev.platform,
        "device_kind": str(dev.device_kind),
        "cpu_model": cpu_name(),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "datasheet_bf16_flops": ms._peak(str(dev.device_kind), "bf16"),
        "gemm": {},
    }
    from importlib import metadata

    for pkg in ("torch", "diffusers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    for dtype in ("float32", "bfloat16"):
        n = 8192 if on_gpu else (2048 if dtype == "float32" else 1024)
        ka, kb = jax.random.split(jax.random.key(0))
        a = jax.random.normal(ka, (n, n), dtype)
        b = jax.random.normal(kb, (n, n), dtype)
        f = jax.jit(jnp.dot).lower(a, b).compile()
        r = _steady(
            lambda f=f, a=a, b=b: f(a, b), lambda o: o.block_until_ready(), 3 if quick else 5
        )
        _pop_out(r)
        out["gemm"][dtype] = {"n": n, "best_s": r["min_s"], "flops_per_s": 2.0 * n**3 / r["min_s"]}
    return out


def child_mmdit(p, quick: bool, tmp: Path, case_name: str, engine: str) -> dict:
    """One engine on one mmdit_speed case; diffusers eager runs first and leaves the weights
    (same-weights cases) and its output in ``tmp`` for the others."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    ms = _bench_module("mmdit_speed")
    case = ms.CASES[case_name]
    folder = tmp / f"mmdit-{case_name}"
    folder.mkdir(exist_ok=True)
    inp = ms._inputs(case)
    flops = ms.mmdit_forward_flops(case.model, case.batch, *case.latent, case.text_tokens)
    rec = {"case": case_name, "engine": engine, "dtype": case.dtype, "flops": flops["total"]}
    rec["shape"] = (
        f"batch {case.batch}, latent {case.latent[0]}x{case.latent[1]}, "
        f"{(case.latent[0] // 2) * (case.latent[1] // 2)}+{case.text_tokens} tokens"
    )
    runs = p.mmdit_runs
    if engine.startswith("diffusers"):
        import torch

        on_gpu = torch.cuda.is_available() and jax.default_backend() == "gpu"
        tdev = torch.device("cuda" if on_gpu else "cpu")
        tdtype = torch.bfloat16 if case.dtype == "bf16" else torch.float32
        if engine == "diffusers":
            model = ms.diffusers_model(case, tdev, tdtype, folder if case.same_weights else None)
        elif case.same_weights:
            from diffusers import SD3Transformer2DModel

            model = SD3Transformer2DModel.from_pretrained(folder).to(tdev, tdtype).eval()
        else:
            model = ms.diffusers_model(case, tdev, tdtype)
        rec["params"] = int(sum(x.numel() for x in model.parameters()))
        if engine == "diffusers-compile":
            model = torch.compile(model)
        args = ms.torch_inputs(inp, tdev, tdtype)

        def fwd():
            with torch.inference_mode():
                return model(**args, return_dict=False)[0]

        def sync(o):
            if on_gpu:
                torch.cuda.synchronize()
            return o

        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        rec.update(_steady(fwd, sync, runs))
        out = _pop_out(rec)
        if engine == "diffusers":
            np.save(folder / "diffusers.npy", out.float().permute(0, 2, 3, 1).cpu().numpy())
        if on_gpu:
            rec["memory"] = {
                "bytes": int(torch.cuda.max_memory_allocated()),
                "kind": "torch.cuda.max_memory_allocated",
            }
        return rec
    jdtype = jnp.bfloat16 if case.dtype == "bf16" else jnp.float32
    model = ms.rfmpc_model(case, jdtype, str(folder) if case.same_weights else None)
    rec["params"] = int(sum(x.size for x in jax.tree.leaves(model.params)))
    jargs = ms.jax_inputs(inp, jdtype, jax.devices()[0])
    f = jax.jit(lambda pr, bu, h, t, e, q: model.apply(pr, h, t, e, q, buffers=bu))
    t0 = time.perf_counter()
    compiled = f.lower(model.params, model.buffers, *jargs).compile()
    compile_s = time.perf_counter() - t0
    rec.update(
        _steady(
            lambda: compiled(model.params, model.buffers, *jargs),
            lambda o: o.block_until_ready(),
            runs,
        )
    )
    out = _pop_out(rec)
    rec["compile_s"], rec["compile_method"] = compile_s, "aot"
    rec["memory"] = memory_analysis(compiled)
    ref = folder / "diffusers.npy"
    if case.same_weights and ref.is_file():
        r = np.load(ref)
        rec["rel_max_err_vs_diffusers"] = float(
            np.max(np.abs(np.asarray(out, np.float32) - r)) / (np.std(r) or 1.0)
        )
    return rec


def child_generation_build(p, quick: bool, tmp: Path, config: str) -> dict:
    build_tiny_sd3_pipeline = torch_fixtures().build_tiny_sd3_pipeline

    ps = _bench_module("pipeline_speed")
    folder = tmp / f"gen-{config}" / "sd3"
    t0 = time.perf_counter()
    build_tiny_sd3_pipeline(folder, seed=0, transformer_overrides=ps.CONFIGS[config]["overrides"])
    return {"folder": str(folder), "build_s": time.perf_counter() - t0}


def child_generation(
    p, quick: bool, tmp: Path, config: str, steps: int, dtype: str, engine: str
) -> dict:
    from rfmpc.models import MMDiTConfig

    ps = _bench_module("pipeline_speed")
    folder = tmp / f"gen-{config}" / "sd3"
    size = ps.CONFIGS[config]["size"]
    msl = ps.CONFIGS[config].get("max_sequence_length", 16)
    rec = ps._engine(engine, str(folder), size, steps, p.generation_runs, dtype, msl)
    rec["compile_s"] = max(rec["warmup_s"] - rec["median_s"], 0.0)
    rec["compile_method"] = "first-steady"
    rec["memory"] = {"bytes": rec.pop("peak_bytes"), "kind": rec.pop("peak_kind")}
    ms = _bench_module("mmdit_speed")
    cfg = MMDiTConfig.from_diffusers(
        json.loads((folder / "transformer" / "config.json").read_text())
    )
    lat = size // 4  # the fixture VAE downsamples by 4
    text = 77 + msl  # CLIP tokens + T5 tokens
    fwd = ms.mmdit_forward_flops(cfg, 2, lat, lat, text)["total"]  # CFG: batch 2 per step
    rec.update(config=config, steps=steps, dtype=dtype, flops=steps * fwd)
    rec["shape"] = f"{size}x{size} image, latent {lat}x{lat}x16, {steps} steps, CFG batch 2"
    return rec


def _vae_config(v) -> dict:
    n = len(v.block_out_channels)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=v.block_out_channels,
        layers_per_block=v.layers_per_block,
        norm_num_groups=v.norm_num_groups,
        latent_channels=16,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def child_vae(p, quick: bool, tmp: Path, engine: str) -> dict:
    import jax
    import numpy as np

    v = p.vae
    folder = tmp / "vae"
    h, w = v.latent_hw
    f = 2 ** (len(v.block_out_channels) - 1)
    rec = {
        "engine": engine,
        "dtype": v.dtype,
        "shape": f"batch {v.batch}, latent {h}x{w}x16 -> {h * f}x{w * f} image, "
        f"channels {list(v.block_out_channels)}, {v.layers_per_block} resnet/level",
    }
    if engine == "diffusers":
        import torch
        from diffusers import AutoencoderKL

        randomize_ = torch_fixtures().randomize_

        on_gpu = torch.cuda.is_available()
        tdev = torch.device("cuda" if on_gpu else "cpu")
        tdtype = torch.bfloat16 if v.dtype == "bfloat16" else torch.float32
        with torch.random.fork_rng(devices=[]):
            vae = AutoencoderKL(**_vae_config(v))
        randomize_(vae, 0).eval()
        vae.save_pretrained(folder)
        vae = vae.to(tdev, tdtype)
        rec["params"] = int(sum(x.numel() for x in vae.parameters()))
        z = np.random.default_rng(0).standard_normal((v.batch, h, w, 16)).astype(np.float32)
        np.save(tmp / "vae_z.npy", z)
        zt = torch.from_numpy(z.transpose(0, 3, 1, 2).copy()).to(tdev, tdtype)

        def dec():
            with torch.inference_mode():
                return vae.decode(zt).sample

        def sync(o):
            if on_gpu:
                torch.cuda.synchronize()
            return o

        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        rec.update(_steady(dec, sync, p.vae_runs))
        out = _pop_out(rec)
        np.save(tmp / "vae_diffusers.npy", out.float().permute(0, 2, 3, 1).cpu().numpy())
        if on_gpu:
            rec["memory"] = {
                "bytes": int(torch.cuda.max_memory_allocated()),
                "kind": "torch.cuda.max_memory_allocated",
            }
        return rec
    import jax.numpy as jnp
    from flax import nnx

    from rfmpc.convert import load_component

    jdtype = jnp.bfloat16 if v.dtype == "bfloat16" else jnp.float32
    vae = load_component(folder, "vae", jdtype)
    graphdef, state = nnx.split(vae)
    rec["params"] = int(sum(x.size for x in jax.tree.leaves(state)))
    z = jnp.asarray(np.load(tmp / "vae_z.npy"), jdtype)
    t0 = time.perf_counter()
    compiled = jax.jit(lambda s, zz: nnx.merge(graphdef, s).decode(zz)).lower(state, z).compile()
    compile_s = time.perf_counter() - t0
    rec.update(_steady(lambda: compiled(state, z), lambda o: o.block_until_ready(), p.vae_runs))
    out = np.asarray(_pop_out(rec), np.float32)
    rec["compile_s"], rec["compile_method"] = compile_s, "aot"
    rec["memory"] = memory_analysis(compiled)
    ref = np.load(tmp / "vae_diffusers.npy")
    rec["rel_max_err_vs_diffusers"] = float(np.max(np.abs(out - ref)) / (np.std(ref) or 1.0))
    return rec


def _switch_setup(p):
    """(field, shift, eps, cond_a, cond_b, label) for the profile's switch field."""
    import jax
    import jax.numpy as jnp

    if p.switch_field == "embedded":
        from rfmpc.pipeline import load_pipeline

        pipe = load_pipeline(None)
        pa, pb = prompt_pair(0)
        eps = jax.random.normal(jax.random.key(0), pipe.latent_shape(p.switch_samples, None, None))
        ca = pipe.encode_prompt([pa] * p.switch_samples)
        cb = pipe.encode_prompt([pb] * p.switch_samples)
        label = (
            f"embedded model (CFG {pipe.default_guidance}), {p.switch_samples} seeds, "
            f"A={pa!r} -> B={pb!r}"
        )
        return pipe.guided_field(pipe.default_guidance), pipe.shift, eps, ca, cb, label
    from rfmpc.flow import classifier_free_guidance
    from rfmpc.pipeline import ModelField

    ms = _bench_module("mmdit_speed")
    case = ms.CASES[p.switch_field]
    jdtype = jnp.bfloat16 if case.dtype == "bf16" else jnp.float32
    tr = ms.rfmpc_model(case, jdtype, None)
    cfg = case.model
    keys = jax.random.split(jax.random.key(0), 7)
    n, m = p.switch_samples, case.text_tokens

    def cond(k1, k2):
        return {
            "embeds": jax.random.normal(k1, (n, m, cfg.joint_attention_dim), jdtype),
            "pooled": jax.random.normal(k2, (n, cfg.pooled_projection_dim), jdtype),
        }

    unc = cond(keys[0], keys[1])
    ca, cb = (cond(keys[2], keys[3]), unc), (cond(keys[4], keys[5]), unc)
    eps = jax.random.normal(keys[6], (n, *case.latent, cfg.in_channels), jnp.float32)
    label = (
        f"random-weight MM-DiT '{p.switch_field}' ({case.dtype}, CFG 7.0), batch {n}, "
        f"latent {case.latent[0]}x{case.latent[1]}"
    )
    return classifier_free_guidance(ModelField(tr), 7.0), 3.0, eps, ca, cb, label


def child_switch(p, quick: bool, tmp: Path) -> dict:
    import equinox as eqx
    import jax

    from rfmpc.cli.switch import controller_from_name
    from rfmpc.control import SwitchCache, switch
    from rfmpc.flow import TrajectoryState, flowmatch_sigmas, integrate

    field, shift, eps, ca, cb, label = _switch_setup(p)
    n, k = p.switch_steps, p.switch_k
    sig = flowmatch_sigmas(n, shift)

    def block(o):
        jax.block_until_ready(jax.tree.leaves(o))
        return o

    # Baselines jitted whole, as switch's stages are: a bare top-level ``integrate`` call also
    # re-traces the field (its shape check) on every call, which is Python overhead, not steps.
    plain = eqx.filter_jit(lambda f, x, c, start: integrate(f, x, sig, c, start=start).x)
    gen = _steady(lambda: plain(field, eps, cb, 0), block, p.switch_runs)
    _pop_out(gen)
    x_k = block(integrate(field, eps, sig, ca, stop=k).x)
    fin = _steady(lambda: plain(field, x_k, cb, k), block, p.switch_runs)
    _pop_out(fin)
    state = TrajectoryState(x_k, k, sig, key=jax.random.key(1), cond=ca)
    step_s = gen["median_s"] / n
    rec = {
        "field": label,
        "N": n,
        "k": k,
        "generation": {**gen, "nfe": n},
        "finish": {**fin, "nfe": n - k},
        "step_s": step_s,
        "methods": [],
    }
    v_a = field(x_k, sig[k], ca)  # what a cache stores beside the state (A's run computed it)
    cached = SwitchCache(velocity=v_a, noise=eps)
    for method in p.switch_methods:
        print(f"switch: {method}", file=sys.stderr, flush=True)
        row: dict = {"method": method}
        try:
            ctrl = controller_from_name(method)
            t0 = time.perf_counter()
            first = switch(field, state, cb, ctrl, cached=cached)
            row["first_s"] = time.perf_counter() - t0
            walls, plans = [], []
            for _ in range(p.switch_runs):
                res = switch(field, state, cb, ctrl, cached=cached)
                walls.append(res.wall_s)
                plans.append(res.planning_s)
            import statistics

            wall = statistics.median(walls)
            extra = wall - fin["median_s"]
            row.update(
                wall_s=wall,
                min_s=min(walls),
                planning_s=statistics.median(plans),
                compile_s=max(row["first_s"] - wall, 0.0),
                compile_method="first-steady",
                nfe=res.nfe,
                jvps=res.cost.jvps,
                vjps=res.cost.vjps,
                extra_nfe=res.nfe - (n - k),
                overhead_s=extra,
                overhead_of_generation_pct=100.0 * extra / gen["median_s"],
                overhead_per_remaining_step_pct=100.0 * extra / (n - k) / step_s,
                fallback=bool(first.fallback or res.fallback),
            )
            window = ctrl.window(n - k)
            if window:
                row["controlled_steps"] = window
                row["overhead_per_controlled_step_pct"] = 100.0 * extra / window / step_s
        except Exception as e:  # one method failing must not hide the others
            row["error"] = _reason(e)
        row["memory_running_peak"] = peak_memory()
        rec["methods"].append(row)
        _partial(rec)
    return rec


def _partial(rec: dict) -> None:
    """Save the rows so far where report.py looks if this child times out or dies."""
    path = os.environ.get("REPORT_PARTIAL")
    if path:
        Path(path).write_text(json.dumps(rec, default=str))


def child_inverse(p, quick: bool, tmp: Path) -> dict:
    from rfmpc.inverse import METHODS
    from rfmpc.restore import DEFAULT_NOISE, heldout_images

    it = _bench_module("inverse_table")
    prior = _bench_module("_priors").bench_prior(p.inverse_prior)
    h = prior.image_shape[0]
    truth = heldout_images(p.inverse_images, resolution=h, seed=1000)
    methods = list(p.inverse_methods or METHODS)
    rows = []
    for name in methods:
        print(f"inverse: {name}", file=sys.stderr, flush=True)
        try:
            r, _ = it.run_task(
                prior, p.inverse_task, [name], truth, DEFAULT_NOISE[p.inverse_task], 0
            )
            row = r[0]
            row["compile_method"] = "aot"
        except Exception as e:
            row = {"task": p.inverse_task, "method": name, "error": _reason(e)}
        row["memory_running_peak"] = peak_memory()
        rows.append(row)
    return {
        "prior": prior.name,
        "task": p.inverse_task,
        "images": p.inverse_images,
        "image_shape": list(prior.image_shape),
        "rows": rows,
    }


def child_optional(p, quick: bool, tmp: Path, section: str, filename: str) -> dict:
    """The hook for optional benchmarks: ``benchmarks/<filename>``'s ``run(quick) -> dict``
    (and its ``markdown(record)`` / ``table(record)`` renderer when it has one)."""
    path = HERE / filename
    if not path.is_file():
        return {"missing": f"benchmarks/{filename} does not exist yet (hook for '{section}')"}
    mod = _bench_module(path.stem)
    if not callable(getattr(mod, "run", None)):
        return {"missing": f"benchmarks/{filename} has no run(quick) -> dict (hook)"}
    rec = mod.run(quick)
    for name in ("markdown", "table", "_table"):
        fn = getattr(mod, name, None)
        if callable(fn):
            try:
                rec = {"record": rec, "markdown": fn(rec)}
                break
            except Exception:
                continue
    else:
        rec = {"record": rec}
    return rec


def _reason(e: BaseException) -> str:
    """A one-paragraph failure reason (type, first lines of the message)."""
    msg = " ".join(str(e).strip().splitlines()[:6])
    return f"{type(e).__name__}: {msg[:600]}"


CHILDREN = {
    "peak": child_peak,
    "mmdit": child_mmdit,
    "generation-build": child_generation_build,
    "generation": child_generation,
    "vae": child_vae,
    "switch": child_switch,
    "inverse": child_inverse,
    "optional": child_optional,
}
