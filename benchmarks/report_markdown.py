"""Markdown rendering of a ``benchmarks/report.py`` record (pure functions of the record)."""

from __future__ import annotations

import json

from benchmarks._common import fmt, md_escape

OPTIONAL = {"precision": "precision.py", "shooting_memory": "shooting_memory.py"}
ALL_SECTIONS = ("peak", "mmdit", "generation", "vae", "switch", "inverse", *OPTIONAL)


def _device_name(record: dict) -> str:
    pk = record.get("peak") or {}
    if pk.get("platform") == "gpu":
        return pk.get("device_kind", "gpu")
    if pk.get("platform") == "cpu":
        return f"CPU {pk.get('cpu_model', '?')} x{pk.get('cpus', '?')}"
    return "unknown device"


# ============================================================================ markdown
def _mem(m: dict | None) -> str:
    if not m:
        return "n/a"
    if "error" in m:
        return "n/a"
    return f"{m['bytes'] / 2**20:.0f} MiB ({m['kind']})"


def _load(r: dict) -> str:
    la = r.get("loadavg_1min") or [None, None]
    return "/".join(fmt(x, "{:.1f}") for x in la)


def _ms(x) -> str:
    return fmt(None if x is None else 1e3 * x, "{:.1f}")


def _engine_table(rows: list[dict], group: str | None, unit_ms: bool) -> list[str]:
    scale, unit = (1e3, "ms") if unit_ms else (1.0, "s")
    head = (
        f"| {group + ' | ' if group else ''}engine | dtype | compile s (how) | "
        f"steady median {unit} | min {unit} | time / rfmpc | TFLOP/s | MFU | "
        "peak memory (child) | load 1m start/end |"
    )
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        g = f"{r.get(group, '?')} | " if group else ""
        if "error" in r:
            out.append(
                f"| {g}{r.get('engine', '?')} | {r.get('dtype', '')} | **failed:** "
                f"{md_escape(r['error'])} | | | | | | | {_load(r)} |"
            )
            continue
        mem = r.get("memory") or r.get("memory_process")
        extra = ""
        proc = r.get("memory_process")
        if r.get("memory") and proc and _mem(proc) != _mem(r["memory"]):
            extra = f"; process {_mem(proc)}"
        out.append(
            f"| {g}{r.get('engine')} | {r.get('dtype')} | "
            f"{fmt(r.get('compile_s'), '{:.2f}')} ({r.get('compile_method', '?')}) | "
            f"{fmt(scale * r['median_s'], '{:.2f}' if unit_ms else '{:.3f}')} | "
            f"{fmt(scale * r['min_s'], '{:.2f}' if unit_ms else '{:.3f}')} | "
            f"{fmt(r.get('time_ratio_vs_rfmpc'), '{:.2f}x')} | "
            f"{fmt(r.get('tflops_per_s'), '{:.4f}')} | {fmt(r.get('mfu'), '{:.1%}')} | "
            f"{_mem(mem)}{extra} | {_load(r)} |"
        )
    return out


def markdown(record: dict) -> str:
    """The report as markdown (a pure function of the record)."""
    pk = record.get("peak") or {}
    dev = _device_name(record)
    lines = [
        f"# rfmpc benchmark report: {dev} ({record.get('date', '?')})",
        "",
        f"config `{record.get('config')}`{' (--quick)' if record.get('quick') else ''}: "
        f"{record.get('config_description', '')}. git {record.get('git', {}).get('commit', '?')}"
        f"{' (+ uncommitted changes)' if record.get('git', {}).get('dirty_tracked_files') else ''}"
        f"; jax {pk.get('jax', '?')}, torch {pk.get('torch', '?')}, "
        f"diffusers {pk.get('diffusers', '?')}; total {fmt(record.get('total_s'), '{:.0f}')} s.",
        "",
        f"1-min load average: {fmt(record.get('loadavg_1min_start'), '{:.2f}')} at start, "
        f"{fmt(record.get('loadavg_1min_end'), '{:.2f}')} at end, on {record.get('cpus')} CPUs "
        "(per row: at the start/end of its child process). The machine may be shared: "
        "interference only adds time, so `min` is the more robust figure on a loaded CPU.",
        "",
        "Every ratio compares two figures measured in this run on this device. `time / rfmpc` "
        "> 1 means rfmpc is faster. Compile time: `aot` = `jit(f).lower(...).compile()` timed; "
        "`first-steady` = first call minus steady-state median (torch.compile starts from an "
        "empty inductor cache in every child). Peak memory: per child process "
        "(one engine, one benchmark); its kind is named in each cell.",
        "",
    ]
    lines += ["## Peak FLOP/s (MFU denominator)", ""]
    if "error" in pk:
        lines.append(f"peak measurement **failed:** {md_escape(pk['error'])}")
    for dt in ("float32", "bfloat16"):
        g = (pk.get("gemm") or {}).get(dt)
        if g:
            lines.append(
                f"- measured `jnp.dot` {g['n']}x{g['n']} {dt}: "
                f"{g['flops_per_s'] / 1e12:.4f} TFLOP/s (best of the runs)"
            )
    if pk.get("datasheet_bf16_flops"):
        lines.append(
            f"- datasheet dense bf16 peak: {pk['datasheet_bf16_flops'] / 1e12:.0f} TFLOP/s"
        )
    lines.append(
        "- MFU uses the datasheet bf16 peak on a GPU and the measured GEMM FLOP/s of the same "
        "dtype on a CPU (a measured figure, not a vendor peak). FLOPs are matmul FLOPs from "
        "`mmdit_speed.mmdit_forward_flops` (generation: transformer only, 2 x steps forwards "
        "of the CFG batch; text encoders and VAE not counted)."
    )
    sec = record.get("sections", {})
    if "mmdit" in sec:
        rows = sec["mmdit"]
        shapes = sorted({f"{r['case']}: {r['shape']}" for r in rows if "shape" in r})
        lines += ["", "## MM-DiT forward (rfmpc vs diffusers eager / torch.compile)", ""]
        lines += [f"- {s}" for s in shapes]
        errs = [
            f"{r['case']}: rel max err rfmpc vs diffusers {r['rel_max_err_vs_diffusers']:.1e}"
            for r in rows
            if "rel_max_err_vs_diffusers" in r
        ]
        lines += [f"- output agreement {e}" for e in errs] + [""]
        lines += _engine_table(rows, "case", unit_ms=True)
    if "generation" in sec:
        rows = sec["generation"]
        lines += [
            "",
            "## Full generation (steps + CFG, batch 1, text encode + denoise + decode)",
            "",
        ]
        shapes = sorted({f"{r['config']}: {r['shape']}" for r in rows if "shape" in r})
        lines += [f"- {s}" for s in shapes]
        lines += [
            "- transformer: the config's MM-DiT with random weights; VAE and text encoders are "
            "the tiny fixture ones (`pipeline_speed.py`); same latents and prompt for all engines",
            "- compile for diffusers eager is its first-call overhead (no compilation)",
        ]
        for r in rows:
            if "max_abs_image_diff_vs_rfmpc" in r:
                lines.append(
                    f"- {r['config']} {r['engine']}: max |image - rfmpc image| "
                    f"{r['max_abs_image_diff_vs_rfmpc']:.1e}"
                )
        lines.append("")
        lines += _engine_table(rows, "config", unit_ms=False)
    if "vae" in sec:
        rows = sec["vae"]
        lines += ["", "## VAE decode (rfmpc vs diffusers AutoencoderKL.decode, same weights)", ""]
        lines += [f"- {s}" for s in sorted({r["shape"] for r in rows if "shape" in r})]
        lines += [
            f"- output agreement: rel max err {r['rel_max_err_vs_diffusers']:.1e}"
            for r in rows
            if "rel_max_err_vs_diffusers" in r
        ]
        lines.append("")
        lines += _engine_table(rows, None, unit_ms=True)
    if "switch" in sec:
        lines += ["", "## Switch overhead per method (`rfmpc.control.switch`)", ""]
        lines += _switch_md(sec["switch"])
    if "inverse" in sec:
        lines += ["", "## MPC-Flow and baselines (`rfmpc.inverse`), one task", ""]
        lines += _inverse_md(sec["inverse"])
    for name in OPTIONAL:
        if name in sec:
            lines += ["", f"## {name} (benchmarks/{OPTIONAL[name]})", ""]
            lines += _optional_md(sec[name])
    lines += ["", "## Goals (issue 9)", ""]
    lines += ["| goal | target | measured here | verdict |", "|---|---|---|---|"]
    for g in record.get("goals") or []:
        lines.append(f"| {g['goal']} | {g['target']} | {g['measured']} | {g['verdict']} |")
    missing = [s for s in ALL_SECTIONS if s != "peak" and s not in sec]
    if missing:
        lines += ["", f"Sections not run: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def _switch_md(s: dict) -> list[str]:
    if "error" in s:
        return [f"**failed:** {md_escape(s['error'])}"]
    n, k = s["N"], s["k"]
    gen, fin = s["generation"], s["finish"]
    out = [
        f"- field: {s['field']}; N = {n} steps, switch at k = {k}",
        f"- baselines (same run): plain generation {gen['median_s'] * 1e3:.1f} ms median "
        f"({n} NFE, compile {gen['compile_s']:.1f} s first-steady), one denoising step "
        f"{s['step_s'] * 1e3:.2f} ms (generation / N), plain finish from k "
        f"{fin['median_s'] * 1e3:.1f} ms ({n - k} NFE)",
        "- overhead = method wall time - plain finish from k (steady-state medians); "
        "'% of a step' = overhead / (N - k) / step; for mpc also per MPC-controlled step "
        "(the controller's window: `MPC().control_steps` steps after the switch)",
        f"- load 1m at start/end: {_load(s)}",
        *([f"- **incomplete:** {s['incomplete']}"] if s.get("incomplete") else []),
        *([f"- note: {s['note']}"] if s.get("note") else []),
        "",
        "| method | NFE | extra NFE | wall ms | planning ms | overhead ms | % of a generation | "
        "% of a step (per remaining step) | % of a step (per MPC step) | compile s "
        "(first-steady) | fallback | running peak memory |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["methods"]:
        if "error" in r:
            out.append(
                f"| {r['method']} | **failed:** {md_escape(r['error'])} | | | | | | | | | | |"
            )
            continue
        out.append(
            f"| {r['method']} | {r['nfe']} | {r['extra_nfe']} | {_ms(r['wall_s'])} | "
            f"{_ms(r['planning_s'])} | {_ms(r['overhead_s'])} | "
            f"{fmt(r['overhead_of_generation_pct'], '{:.1f}%')} | "
            f"{fmt(r['overhead_per_remaining_step_pct'], '{:.1f}%')} | "
            f"{fmt(r.get('overhead_per_controlled_step_pct'), '{:.1f}%', '')} | "
            f"{fmt(r['compile_s'], '{:.1f}')} | {r['fallback']} | "
            f"{_mem(r.get('memory_running_peak'))} |"
        )
    return out


def _inverse_md(s: dict) -> list[str]:
    if "error" in s:
        return [f"**failed:** {md_escape(s['error'])}"]
    out = [
        f"- prior: {s['prior']}; task {s['task']}; {s['images']} held-out image(s) "
        f"{'x'.join(map(str, s['image_shape']))}; one batched pre-compiled run / images",
        f"- load 1m at start/end: {_load(s)}",
        *([f"- note: {s['note']}"] if s.get("note") else []),
        "",
        "| method | s / image | NFE | backprops | PSNR dB | compile s (aot) | XLA temp MiB | "
        "running peak memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in s["rows"]:
        if "error" in r:
            out.append(f"| {r['method']} | **failed:** {md_escape(r['error'])} | | | | | | |")
            continue
        temp = r.get("temp_bytes")
        out.append(
            f"| {r['method']} | {r['s_per_image']:.3f} | {r['nfe']} | {r['backprops']} | "
            f"{r['psnr_db']:.2f} | {r['compile_s']:.1f} | "
            f"{fmt(None if temp is None else temp / 2**20, '{:.2f}')} | "
            f"{_mem(r.get('memory_running_peak'))} |"
        )
    return out


def _optional_md(s: dict) -> list[str]:
    if "missing" in s:
        return [f"Hook: {s['missing']}."]
    if "error" in s:
        return [f"**failed:** {md_escape(s['error'])}"]
    if isinstance(s.get("markdown"), str):
        return [s["markdown"].rstrip(), "", f"peak memory (child): {_mem(s.get('memory_process'))}"]
    body = json.dumps(s.get("record"), indent=1, default=str)
    if len(body) > 4000:
        body = body[:4000] + "\n... (truncated; full record in the JSON)"
    return ["```json", body, "```"]
