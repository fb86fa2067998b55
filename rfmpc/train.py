"""Rectified-flow trainer for the embedded default model (a small MM-DiT on procedural images).

Recipe (documented in docs/embedded_model.md, measured there): pixel-space 32x32x3 images scaled
to [-1, 1], the project's own :class:`~rfmpc.models.mmdit.MMDiT` (patch 4 -> 64 image tokens),
conditioned on the frozen embedded text encoder (sequence + pooled embeddings, as SD3's encoders).
Loss: ``|| v_theta(x_sigma, sigma, c) - (noise - x0) ||^2`` with ``x_sigma = (1 - sigma) x0 +
sigma noise`` (Liu et al., 2023; Esser et al., 2024), sigma from a logit-normal (SD3's choice) or
uniform distribution, 10% condition dropout (to the empty prompt) for classifier-free guidance,
AdamW with warm-up and cosine decay, and an EMA of the weights (the EMA is what ships).

Everything is deterministic from the seed: batch ``i`` is ``make_batch(seed * 1_000_003 + i)`` and
the step key is ``fold_in(key, i)``, so a run resumed from a checkpoint continues exactly as the
uninterrupted one would. Checkpoints are atomic safetensors files (params, EMA, optimizer state,
step) written every ``checkpoint_every`` steps; ``train(..., resume=True)`` picks up the latest.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rfmpc.io import (
    atomic_write_bytes,
    load_safetensors,
    remove_stale_temp_files,
    save_safetensors,
)
from rfmpc.models.configs import MMDiTConfig

__all__ = ["TrainConfig", "embedded_mmdit_config", "load_checkpoint", "train"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of the embedded-model recipe (defaults: the shipped model's)."""

    steps: int = 5000
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.998
    sigma_sampling: str = "logit-normal"  # or "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    cond_dropout: float = 0.1
    two_object_fraction: float = 0.5
    resolution: int = 32
    checkpoint_every: int = 100
    log_every: int = 20
    seed: int = 0
    # architecture
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    patch_size: int = 4

    def __post_init__(self):
        if self.sigma_sampling not in ("logit-normal", "uniform"):
            raise ValueError(
                f"sigma_sampling must be 'logit-normal' or 'uniform', got {self.sigma_sampling!r}"
            )
        for name in ("steps", "batch_size", "checkpoint_every", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")


def embedded_mmdit_config(cfg: TrainConfig, seq_dim: int, pooled_dim: int) -> MMDiTConfig:
    """The MM-DiT architecture of the embedded model for a text encoder of the given widths."""
    tokens = cfg.resolution // cfg.patch_size
    return MMDiTConfig(
        sample_size=cfg.resolution,
        patch_size=cfg.patch_size,
        in_channels=3,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=seq_dim,
        caption_projection_dim=cfg.num_heads * cfg.head_dim,
        pooled_projection_dim=pooled_dim,
        out_channels=3,
        pos_embed_max_size=tokens,
    )


def _sample_sigma(key, n: int, cfg: TrainConfig):
    if cfg.sigma_sampling == "uniform":
        return jax.random.uniform(key, (n,))
    z = cfg.logit_mean + cfg.logit_std * jax.random.normal(key, (n,))
    return jax.nn.sigmoid(z)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    sched = optax.warmup_cosine_decay_schedule(
        0.0,
        cfg.learning_rate,
        cfg.warmup_steps,
        max(cfg.steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * 0.05,
    )
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(sched, b1=0.9, b2=0.99, weight_decay=cfg.weight_decay),
    )


@functools.lru_cache(maxsize=8)
def _compiled_step(cfg: TrainConfig, mcfg: MMDiTConfig):
    """The jitted train step for a (recipe, architecture): compiled once per process."""
    from rfmpc.models.mmdit import MMDiT

    abstract = nnx.eval_shape(lambda: MMDiT(mcfg, rngs=nnx.Rngs(0)))
    graphdef, _, _ = nnx.split(abstract, nnx.Param, ...)
    tx = make_optimizer(cfg)

    def loss_fn(params, buffers, x0, seq, pooled, key):
        k_sig, k_noise = jax.random.split(key)
        b = x0.shape[0]
        sigma = _sample_sigma(k_sig, b, cfg)
        noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
        s = sigma[:, None, None, None]
        xs = (1.0 - s) * x0 + s * noise
        model = nnx.merge(graphdef, params, buffers)
        v = model(xs, sigma * 1000.0, seq, pooled)
        return jnp.mean((v - (noise - x0)) ** 2)

    @jax.jit
    def step(params, buffers, opt_state, ema, x0, seq, pooled, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, buffers, x0, seq, pooled, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: cfg.ema_decay * e + (1 - cfg.ema_decay) * p, ema, params)
        return params, opt_state, ema, loss, optax.tree.norm(grads)

    return step


# ------------------------------------------------------------------------------ checkpoints
def _leaves_to_tensors(prefix: str, tree) -> dict[str, np.ndarray]:
    return {f"{prefix}.{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}


def _tensors_to_tree(prefix: str, tensors: dict[str, np.ndarray], like, source: str):
    leaves, treedef = jax.tree.flatten(like)
    got = sorted(k for k in tensors if k.startswith(prefix + "."))
    if len(got) != len(leaves):
        raise ValueError(
            f"{source}: checkpoint has {len(got)} '{prefix}' tensors, the model needs "
            f"{len(leaves)}: it was written for another architecture or config"
        )
    out = []
    for k, ref in zip(got, leaves):
        a = tensors[k]
        if a.shape != ref.shape:
            raise ValueError(f"{source}: {k} has shape {a.shape}, expected {ref.shape}")
        out.append(jnp.asarray(a, ref.dtype))
    return jax.tree.unflatten(treedef, out)


def _save_checkpoint(path: Path, step: int, params, opt_state, ema, meta: dict) -> None:
    tensors = {}
    tensors.update(_leaves_to_tensors("params", params))
    tensors.update(_leaves_to_tensors("ema", ema))
    tensors.update(_leaves_to_tensors("opt", opt_state))
    save_safetensors(path, tensors, {"step": str(step), "meta": json.dumps(meta)})


def load_checkpoint(path: Path, params_like, opt_like, ema_like):
    tensors, header = load_safetensors(path)
    src = str(path)
    return (
        int(header["step"]),
        _tensors_to_tree("params", tensors, params_like, src),
        _tensors_to_tree("opt", tensors, opt_like, src),
        _tensors_to_tree("ema", tensors, ema_like, src),
        json.loads(header.get("meta", "{}")),
    )


def _read_log(path: Path, last_step: int) -> list[dict]:
    """The records of ``log.jsonl`` up to ``last_step``, skipping a line torn by a kill."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= last_step:
            out.append(rec)
    return out


# ------------------------------------------------------------------------------ training loop
def train(
    out_dir: str | Path,
    cfg: TrainConfig = TrainConfig(),
    *,
    encoder=None,
    resume: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
    on_log: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Train (or resume) the embedded MM-DiT; returns a summary with the loss history.

    Args:
        out_dir: run folder (``checkpoint.safetensors``, ``log.jsonl``, ``loss.png``,
            ``config.json``).
        cfg: the recipe.
        encoder: a prompt encoder with ``.encode(list[str]) -> (seq, pooled)``, ``.seq_dim``,
            ``.pooled_dim`` (default: the embedded text encoder asset).
        resume: continue from ``out_dir/checkpoint.safetensors`` if present.
        progress: show a tqdm progress bar.
        stop_after: stop (after checkpointing) once this many steps are done in *this* call
            (used to simulate interruption in tests).
    """
    from rfmpc.data import make_batch
    from rfmpc.models.mmdit import MMDiT

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if encoder is None:
        from rfmpc.data.text_encoder_io import load_text_encoder

        encoder = load_text_encoder()
    mcfg = embedded_mmdit_config(cfg, encoder.seq_dim, encoder.pooled_dim)
    model = MMDiT(mcfg, rngs=nnx.Rngs(cfg.seed))
    _, params, buffers = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(cfg)
    opt_state = tx.init(params)
    ema = jax.tree.map(jnp.copy, params)
    start = 0
    ckpt = out / "checkpoint.safetensors"
    for target in (ckpt, out / "config.json", out / "log.jsonl"):
        remove_stale_temp_files(target)  # debris of a run killed mid-write (one writer per run)
    config_record = {"train": dataclasses.asdict(cfg), "mmdit": mcfg.to_diffusers()}
    if resume and ckpt.is_file():
        start, params, opt_state, ema, meta = load_checkpoint(ckpt, params, opt_state, ema)
        if meta.get("train") != config_record["train"]:
            raise ValueError(
                f"{ckpt} was written with a different TrainConfig; use another out_dir or "
                "resume=False"
            )
    atomic_write_bytes(out / "config.json", json.dumps(config_record, indent=2).encode())
    step_fn = _compiled_step(cfg, mcfg)
    key = jax.random.key(cfg.seed)
    log_path = out / "log.jsonl"
    history = _read_log(log_path, start)
    if log_path.is_file():
        # A run killed after logging steps past its last checkpoint (or mid-line) left records
        # this run will log again: keep only the ones the checkpoint covers.
        atomic_write_bytes(log_path, "".join(json.dumps(r) + "\n" for r in history).encode())
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True)
    t0 = time.perf_counter()
    done_here = 0
    losses = []
    i = start
    while i < cfg.steps:
        images, prompts, _ = make_batch(
            cfg.seed * 1_000_003 + i,
            cfg.batch_size,
            two_object_fraction=cfg.two_object_fraction,
            resolution=cfg.resolution,
        )
        rng = np.random.default_rng(cfg.seed * 7_919 + i)
        drop = rng.random(cfg.batch_size) < cfg.cond_dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop)]
        seq, pooled = encoder.encode(prompts)
        x0 = jnp.asarray(images) * 2.0 - 1.0
        params, opt_state, ema, loss, gnorm = step_fn(
            params, buffers, opt_state, ema, x0, seq, pooled, jax.random.fold_in(key, i)
        )
        i += 1
        done_here += 1
        losses.append(float(loss))
        if bar is not None:
            bar.update(1)
        if i % cfg.log_every == 0 or i == cfg.steps:
            rec = {
                "step": i,
                "loss": float(np.mean(losses)),
                "grad_norm": float(gnorm),
                "elapsed_s": time.perf_counter() - t0,
            }
            losses = []
            history.append(rec)
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
            if on_log is not None:
                on_log(rec)
        if (
            i % cfg.checkpoint_every == 0
            or i == cfg.steps
            or (stop_after is not None and done_here >= stop_after)
        ):
            _save_checkpoint(ckpt, i, params, opt_state, ema, config_record)
        if stop_after is not None and done_here >= stop_after:
            break
    if bar is not None:
        bar.close()
    _plot_loss(history, out / "loss.png")
    return {
        "steps_done": i,
        "finished": i >= cfg.steps,
        "wall_s": time.perf_counter() - t0,
        "history": history,
        "checkpoint": str(ckpt),
        "mmdit_config": mcfg,
    }


def _plot_loss(history: list[dict], path: Path) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h["loss"] for h in history])
    ax.set_xlabel("step")
    ax.set_ylabel("rectified-flow loss (MSE)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def export_transformer(run_dir: str | Path, dest: str | Path, *, use_ema: bool = True) -> Path:
    """Write a run's weights (the EMA by default) as an rfmpc-format transformer at ``dest``.

    Early in a run the EMA still carries much of the initialisation (``decay ** step``), so
    ``use_ema=False`` exports the raw weights for a quick look at a young checkpoint.
    """
    from rfmpc.models.mmdit import MMDiT
    from rfmpc.models.transformer import Transformer, save_transformer

    run = Path(run_dir)
    rec = json.loads((run / "config.json").read_text())
    cfg = TrainConfig(**rec["train"])
    mcfg = MMDiTConfig.from_diffusers(rec["mmdit"])
    model = MMDiT(mcfg, rngs=nnx.Rngs(0))
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(cfg)
    _, raw, _, ema, _ = load_checkpoint(
        run / "checkpoint.safetensors", params, tx.init(params), params
    )
    save_transformer(Transformer(graphdef, ema if use_ema else raw, buffers, mcfg), dest)
    return Path(dest)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="train the embedded default model")
    p.add_argument("--out", default="runs/embedded")
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.learning_rate)
    p.add_argument("--layers", type=int, default=TrainConfig.num_layers)
    p.add_argument("--heads", type=int, default=TrainConfig.num_heads)
    p.add_argument("--head-dim", type=int, default=TrainConfig.head_dim)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true")
    args = p.parse_args(argv)
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        num_layers=args.layers,
        num_heads=args.heads,
        head_dim=args.head_dim,
        seed=args.seed,
    )
    summary = train(args.out, cfg, resume=not args.no_resume)
    print(json.dumps({k: v for k, v in summary.items() if k in ("steps_done", "wall_s")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
