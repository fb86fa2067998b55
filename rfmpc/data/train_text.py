"""Train the embedded text encoder so that its embeddings reflect scene attributes.

Objective (per batch of scenes, each written as two paraphrases in random templates, half the
scenes being mutations of the other half in 1-3 attributes so that near neighbours are common):

1. **Similarity regression** on the pooled embedding: ``cos(pooled_i, pooled_j)`` regresses onto
   :func:`scene_similarity`, the fraction of attributes two scenes share (background, and
   shape / colour / position / size of optimally aligned objects). Paraphrases (similarity 1) are
   pulled together like the positives of a contrastive loss (InfoNCE, van den Oord et al. 2018),
   and unlike InfoNCE the negatives are graded: one differing attribute must stay closer than
   several. This is the property the trajectory cache relies on.
2. **Pooled attribute heads**: the pooled embedding classifies the background, the gradient and,
   for both object slots (reading order), colour, shape, position and size (or "none").
3. **Per-token attribute heads**: every token of an object's clause classifies that object's
   colour, shape, position and size; background tokens classify the background. So the sequence
   embeddings the image model attends to carry each object's attributes bound together (which
   colour goes with which shape, where).

The heads are discarded after training; only the encoder is saved. Run
``python -m rfmpc.data.train_text`` to (re)build ``rfmpc/assets/text_encoder/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rfmpc.data.dataset import sample_split_scene
from rfmpc.data.grammar import STYLES, parse_prompt_roles, random_prompt, to_prompt
from rfmpc.data.scene import (
    COLOURS,
    DEFAULT_SHAPES,
    POSITIONS,
    SHAPES,
    SIZES,
    Object,
    Scene,
    visible_colours,
)
from rfmpc.data.text_encoder_io import DEFAULT_TEXT_ENCODER_DIR, save_text_encoder
from rfmpc.data.tokenizer import PromptTokenizer
from rfmpc.models.text_encoder import PromptEncoder, TextEncoder, TextEncoderConfig

__all__ = [
    "TrainTextConfig",
    "mutate_scene",
    "ranking_report",
    "scene_similarity",
    "shared_attributes",
    "train_text_encoder",
]

_OBJ_ATTRS = ("colour", "shape", "position", "size")
_VOCABS = {"colour": COLOURS, "shape": SHAPES, "position": POSITIONS, "size": SIZES}
_N_CLASSES = {k: len(v) + 1 for k, v in _VOCABS.items()}  # + "none"
_N_SLOTS = 2
_IGNORE = -1


# ----------------------------------------------------------------------------- similarity


def _scene_codes(scenes) -> tuple[np.ndarray, np.ndarray]:
    """(n,) background codes and (n, 2, 4) object attribute codes (-1: no object)."""
    bg = np.asarray(
        [COLOURS.index(s.background) * 9 + (8 if s.gradient is None else COLOURS.index(s.gradient))
         for s in scenes]
    )  # fmt: skip
    obj = np.full((len(scenes), _N_SLOTS, len(_OBJ_ATTRS)), -1, dtype=np.int64)
    for i, s in enumerate(scenes):
        if len(s.objects) > _N_SLOTS:
            raise ValueError(f"at most {_N_SLOTS} objects per scene, got {len(s.objects)}")
        for j, o in enumerate(s.objects):
            obj[i, j] = [_VOCABS[a].index(getattr(o, a)) for a in _OBJ_ATTRS]
    return bg, obj


def _shared_matrix(scenes_a, scenes_b) -> tuple[np.ndarray, np.ndarray]:
    """Shared attributes and total attributes for all pairs, (na, nb) each."""
    bg_a, ob_a = _scene_codes(scenes_a)
    bg_b, ob_b = _scene_codes(scenes_b)
    valid_a = ob_a[:, :, 0] >= 0  # (na, 2)
    valid_b = ob_b[:, :, 0] >= 0
    # agree[i, j, s, t] = attributes shared by object s of a_i and object t of b_j
    eq = ob_a[:, None, :, None, :] == ob_b[None, :, None, :, :]
    both = valid_a[:, None, :, None] & valid_b[None, :, None, :]
    agree = np.sum(eq, axis=-1) * both
    straight = agree[:, :, 0, 0] + agree[:, :, 1, 1]
    swapped = agree[:, :, 0, 1] + agree[:, :, 1, 0]
    shared = (bg_a[:, None] == bg_b[None, :]) + np.maximum(straight, swapped)
    n_obj = np.maximum(valid_a.sum(1)[:, None], valid_b.sum(1)[None, :])
    return shared, 1 + len(_OBJ_ATTRS) * n_obj


def shared_attributes(a: Scene, b: Scene) -> tuple[int, int]:
    """``(shared, total)`` attributes of two scenes (at most two objects each).

    ``total = 1 + 4 * max(#objects)``: the background (colour and gradient together) and shape,
    colour, position and size per object; ``shared`` counts equal ones under the best pairing of
    the objects (an unpaired object shares nothing).
    """
    s, t = _shared_matrix([a], [b])
    return int(s[0, 0]), int(t[0, 0])


def scene_similarity(a: Scene, b: Scene) -> float:
    """Fraction of shared attributes, in [0, 1] (1 iff the scenes are equal)."""
    s, t = shared_attributes(a, b)
    return s / t


def mutate_scene(
    scene: Scene, rng: np.random.Generator, k: int, *, shapes=SHAPES, max_tries: int = 200
) -> Scene:
    """A scene that differs from ``scene`` in exactly ``k`` attributes (of the ones
    :func:`shared_attributes` counts), drawn at random; gradients are kept."""
    slots = [("bg", None)] + [(a, i) for i in range(len(scene.objects)) for a in _OBJ_ATTRS]
    if not 1 <= k <= len(slots):
        raise ValueError(f"k must be in [1, {len(slots)}] for this scene, got {k}")
    for _ in range(max_tries):
        chosen = [slots[i] for i in rng.choice(len(slots), size=k, replace=False)]
        bg = scene.background
        objs = [dataclasses.asdict(o) for o in scene.objects]
        for attr, i in chosen:
            if attr == "bg":
                bg = _other(rng, COLOURS, bg)
            else:
                vocab = shapes if attr == "shape" else _VOCABS[attr]
                objs[i][attr] = _other(rng, vocab, objs[i][attr])
        try:
            new = Scene(tuple(Object(**o) for o in objs), bg, scene.gradient)
        except ValueError:
            continue
        if any(o.colour not in visible_colours(bg, new.gradient) for o in new.objects):
            continue
        if shared_attributes(scene, new)[0] == shared_attributes(scene, scene)[0] - k:
            return new
    raise RuntimeError(f"could not mutate {scene} in {k} attributes")


def _other(rng: np.random.Generator, vocab, current):
    choices = [v for v in vocab if v != current]
    return choices[rng.integers(len(choices))]


# ----------------------------------------------------------------------------- batches


def _labels(scenes, prompts, tokenizer: PromptTokenizer):
    """Pooled labels (n, 10) and per-token labels (n, L, 4) objects + (n, L, 2) background."""
    n, length = len(prompts), tokenizer.max_length
    pooled = np.full((n, 2 + _N_SLOTS * len(_OBJ_ATTRS)), _IGNORE, dtype=np.int32)
    tok_obj = np.full((n, length, len(_OBJ_ATTRS)), _IGNORE, dtype=np.int32)
    tok_bg = np.full((n, length, 2), _IGNORE, dtype=np.int32)
    for i, (scene, prompt) in enumerate(zip(scenes, prompts)):
        parsed, _, roles = parse_prompt_roles(prompt)
        if parsed != scene:
            raise RuntimeError(f"grammar round trip failed for {prompt!r}")
        bg = [COLOURS.index(scene.background), 8 if scene.gradient is None else
              COLOURS.index(scene.gradient)]  # fmt: skip
        pooled[i, :2] = bg
        codes = []
        for j in range(_N_SLOTS):
            if j < len(scene.objects):
                o = scene.objects[j]
                code = [_VOCABS[a].index(getattr(o, a)) for a in _OBJ_ATTRS]
            else:
                code = [len(_VOCABS[a]) for a in _OBJ_ATTRS]  # "none"
            codes.append(code)
            pooled[i, 2 + j * len(_OBJ_ATTRS) : 2 + (j + 1) * len(_OBJ_ATTRS)] = code
        for w, role in enumerate(roles[: length - 1]):
            t = w + 1  # [CLS] comes first
            if role == "background":
                tok_bg[i, t] = bg
            elif isinstance(role, int):
                tok_obj[i, t] = codes[role]
    return pooled, tok_obj, tok_bg


def _make_batch(rng, n_scenes: int, tokenizer: PromptTokenizer, split: str = "train"):
    half = max(n_scenes // 2, 1)
    scenes = [
        sample_split_scene(rng, split, shapes=SHAPES, gradient_fraction=0.2) for _ in range(half)
    ]
    for s in list(scenes[: n_scenes - half]):
        scenes.append(mutate_scene(s, rng, int(rng.integers(1, 4))))
    all_scenes, prompts = [], []
    for s in scenes:
        i, j = rng.choice(len(STYLES), size=2, replace=False)
        prompts += [to_prompt(s, STYLES[i]), to_prompt(s, STYLES[j])]
        all_scenes += [s, s]
    ids, mask = tokenizer(prompts)
    shared, total = _shared_matrix(all_scenes, all_scenes)
    pooled, tok_obj, tok_bg = _labels(all_scenes, prompts, tokenizer)
    return {
        "ids": ids,
        "mask": mask,
        "sim": (shared / total).astype(np.float32),
        "pooled": pooled,
        "tok_obj": tok_obj,
        "tok_bg": tok_bg,
    }


# ----------------------------------------------------------------------------- model + loss


_OBJ_SIZES = tuple(_N_CLASSES[a] for a in _OBJ_ATTRS)
_POOLED_GROUPS = (9, 9) + _OBJ_SIZES * _N_SLOTS  # background, gradient, slot 0, slot 1
_BG_GROUPS = (9, 9)


class _GroupHead(nnx.Module):
    """Linear classifier for several label groups at once: logits (..., groups, max classes),
    with the classes a group does not have masked out."""

    def __init__(self, d_in: int, sizes: tuple[int, ...], *, rngs: nnx.Rngs):
        self.sizes = tuple(sizes)
        self.linear = nnx.Linear(d_in, len(sizes) * max(sizes), rngs=rngs)

    def __call__(self, x):
        groups, classes = len(self.sizes), max(self.sizes)
        logits = self.linear(x).reshape(*x.shape[:-1], groups, classes)
        valid = np.arange(classes)[None, :] < np.asarray(self.sizes)[:, None]
        return jnp.where(valid, logits, -1e9)


class _Heads(nnx.Module):
    def __init__(self, width: int, pooled_dim: int, *, rngs: nnx.Rngs):
        self.pooled = _GroupHead(pooled_dim, _POOLED_GROUPS, rngs=rngs)
        self.tok_obj = _GroupHead(width, _OBJ_SIZES, rngs=rngs)
        self.tok_bg = _GroupHead(width, _BG_GROUPS, rngs=rngs)


class _Trainee(nnx.Module):
    def __init__(self, config: TextEncoderConfig, *, rngs: nnx.Rngs):
        self.encoder = TextEncoder(config, rngs=rngs)
        self.heads = _Heads(config.width, config.pooled_dim, rngs=rngs)


def _group_ce(logits, labels):
    """Sum over label groups of the mean cross-entropy over valid (>= 0) labels.

    logits (..., groups, classes), labels (..., groups)."""
    valid = labels >= 0
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    axes = tuple(range(labels.ndim - 1))
    per_group = jnp.sum(ce * valid, axis=axes) / jnp.maximum(jnp.sum(valid, axis=axes), 1)
    return jnp.sum(per_group)


def _group_accuracy(logits, labels):
    """Fraction of valid (label >= 0) entries classified right, over all groups."""
    valid = labels >= 0
    right = (jnp.argmax(logits, axis=-1) == labels) & valid
    return jnp.sum(right) / jnp.maximum(jnp.sum(valid), 1)


def _head_accuracy(model: _Trainee, batch) -> dict[str, jax.Array]:
    seq, pooled = model.encoder(batch["ids"], batch["mask"])
    h = model.heads
    return {
        "pooled_attribute_accuracy": _group_accuracy(h.pooled(pooled), batch["pooled"]),
        "token_object_attribute_accuracy": _group_accuracy(h.tok_obj(seq), batch["tok_obj"]),
        "token_background_accuracy": _group_accuracy(h.tok_bg(seq), batch["tok_bg"]),
    }


def _loss(model: _Trainee, batch, weights):
    seq, pooled = model.encoder(batch["ids"], batch["mask"])
    unit = pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True).clip(1e-6)
    cos = unit @ unit.T
    off = 1.0 - jnp.eye(cos.shape[0], dtype=cos.dtype)
    sim_loss = jnp.sum(off * (cos - batch["sim"]) ** 2) / jnp.sum(off)
    h = model.heads
    pooled_loss = _group_ce(h.pooled(pooled), batch["pooled"])
    tok_loss = _group_ce(h.tok_obj(seq), batch["tok_obj"]) + _group_ce(
        h.tok_bg(seq), batch["tok_bg"]
    )
    loss = weights[0] * sim_loss + weights[1] * pooled_loss + weights[2] * tok_loss
    return loss, {"sim": sim_loss, "pooled": pooled_loss, "token": tok_loss}


@dataclasses.dataclass(frozen=True)
class TrainTextConfig:
    """Training hyper-parameters (the defaults build the shipped asset).

    Attributes:
        encoder: architecture; ``vocab_size``/``max_length`` are overwritten by the tokenizer's.
        steps: optimizer steps.
        batch_scenes: scenes per batch (each written twice: 2x prompts).
        lr: peak learning rate (linear warm-up, cosine decay).
        warmup: warm-up steps.
        weight_decay: AdamW weight decay.
        sim_weight, pooled_weight, token_weight: loss weights.
        seed: seeds the data stream and the initialisation.
        eval_scenes: held-out scenes (x2 prompts) on which the heads' accuracy is reported
            (0: skip).
    """

    encoder: TextEncoderConfig = dataclasses.field(
        default_factory=lambda: TextEncoderConfig(vocab_size=1)
    )
    steps: int = 1200  # the shipped asset (rfmpc/assets/text_encoder)
    batch_scenes: int = 48
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 1e-4
    sim_weight: float = 20.0
    pooled_weight: float = 1.0
    token_weight: float = 1.0
    seed: int = 0
    eval_scenes: int = 256


def train_text_encoder(
    config: TrainTextConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    log_every: int = 100,
    verbose: bool = True,
) -> tuple[PromptEncoder, dict]:
    """Train the text encoder; optionally save it to ``out_dir``.

    Returns:
        ``(encoder, history)``: the trained :class:`~rfmpc.models.text_encoder.PromptEncoder` and
        a dict with per-step ``"loss"`` (list of floats), ``"seconds"`` (wall), ``"cpu_seconds"``
        (process CPU time, all threads), ``"heldout"`` (accuracy
        of the attribute heads on held-out scenes' prompts) and the config.
    """
    config = TrainTextConfig() if config is None else config
    if config.steps < 1 or config.batch_scenes < 2 or config.eval_scenes < 0:
        raise ValueError("TrainTextConfig needs steps >= 1, batch_scenes >= 2, eval_scenes >= 0")
    t0, cpu0 = time.perf_counter(), time.process_time()
    tokenizer = PromptTokenizer.train()
    enc_cfg = dataclasses.replace(
        config.encoder, vocab_size=tokenizer.vocab_size, max_length=tokenizer.max_length
    )
    rng = np.random.default_rng(config.seed)
    graphdef, params = nnx.split(nnx.jit(lambda: _Trainee(enc_cfg, rngs=nnx.Rngs(config.seed)))())
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.lr, min(config.warmup, max(config.steps - 1, 1)), max(config.steps, 2)
    )
    tx = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=config.weight_decay)
    )
    opt_state = tx.init(params)
    weights = (config.sim_weight, config.pooled_weight, config.token_weight)

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(p):
            return _loss(nnx.merge(graphdef, p), batch, weights)

        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, parts

    losses = []
    for i in range(config.steps):
        raw = _make_batch(rng, config.batch_scenes, tokenizer)
        batch = {k: jnp.asarray(v) for k, v in raw.items()}
        params, opt_state, loss, parts = step(params, opt_state, batch)
        losses.append(float(loss))
        if verbose and (i % log_every == 0 or i == config.steps - 1):
            p = {k: round(float(v), 4) for k, v in parts.items()}
            print(f"step {i:5d}  loss {losses[-1]:.4f}  {p}  {time.perf_counter() - t0:.1f}s")
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - cpu0
    trained = nnx.merge(graphdef, params)
    heldout: dict[str, float] = {}
    if config.eval_scenes > 0:
        eval_batch = _make_batch(
            np.random.default_rng(config.seed + 1), config.eval_scenes, tokenizer, "heldout"
        )
        eval_batch = {k: jnp.asarray(v) for k, v in eval_batch.items()}
        accuracy = nnx.jit(_head_accuracy)(trained, eval_batch)
        heldout = {k: float(v) for k, v in accuracy.items()}
    if verbose:
        print(f"held-out head accuracy: {heldout}")
    history = {
        "loss": losses,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "heldout": heldout,
        "config": {**dataclasses.asdict(config), "encoder": enc_cfg.to_dict()},
    }
    encoder = PromptEncoder(trained.encoder, tokenizer)
    if out_dir is not None:
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(
            nnx.state(trained.encoder, nnx.Param)))  # fmt: skip
        meta = {
            "steps": config.steps,
            "batch_scenes": config.batch_scenes,
            "seed": config.seed,
            "seconds": round(seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1),
            "final_loss": round(losses[-1], 5),
            "parameters": n_params,
            "heldout_head_accuracy": {k: round(v, 4) for k, v in heldout.items()},
        }
        save_text_encoder(out_dir, trained.encoder, tokenizer, metadata=meta)
    return encoder, history


# ----------------------------------------------------------------------------- evaluation


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def _cos(a, b) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.sum(a * b, axis=-1)


def ranking_report(encoder: PromptEncoder, n_anchors: int = 100, seed: int = 0) -> dict:
    """Measure how pooled cosine similarity ranks prompts by shared scene attributes.

    For ``n_anchors`` held-out one-object scenes (canonical prompt) it encodes a paraphrase (other
    template) and variants with exactly 1, 2, 3 and 4 of the 5 attributes changed (random
    templates). For as many held-out two-object scenes it also encodes a paraphrase and the
    "binding swap" (the two objects exchange colours: the same words, bound differently).

    Returns:
        dict: ``mean_cos_paraphrase``, ``mean_cos_one_diff``, ``mean_cos_several_diff`` (2-4
        changed), ``spearman`` (rank correlation of cosine with the number of shared attributes,
        over all anchor-variant pairs), ``mean_cos_by_shared`` and, for two-object anchors,
        ``two_object_mean_cos_paraphrase`` / ``two_object_mean_cos_swapped``.
    """
    rng = np.random.default_rng(seed)
    anchors, variants, shared = [], [], []
    for _ in range(n_anchors):
        a = sample_split_scene(rng, "heldout", n_objects=1, shapes=DEFAULT_SHAPES)
        style = STYLES[1 + rng.integers(len(STYLES) - 1)]
        anchors.append(to_prompt(a, "canonical"))
        variants.append(to_prompt(a, style))
        shared.append(5)
        for k in (1, 2, 3, 4):
            anchors.append(to_prompt(a, "canonical"))
            variants.append(random_prompt(mutate_scene(a, rng, k, shapes=DEFAULT_SHAPES), rng))
            shared.append(5 - k)
    _, pa = encoder.encode(anchors)
    _, pv = encoder.encode(variants)
    cos = _cos(pa, pv)
    shared = np.asarray(shared)
    out = {
        "mean_cos_paraphrase": float(cos[shared == 5].mean()),
        "mean_cos_one_diff": float(cos[shared == 4].mean()),
        "mean_cos_several_diff": float(cos[shared <= 3].mean()),
        "spearman": _spearman(cos, shared),
        "mean_cos_by_shared": {int(s): float(cos[shared == s].mean()) for s in range(1, 6)},
    }
    two_a, two_p, two_s = [], [], []
    for _ in range(n_anchors):
        for _ in range(1000):
            a = sample_split_scene(rng, "heldout", n_objects=2, shapes=DEFAULT_SHAPES)
            o1, o2 = a.objects
            if o1.colour != o2.colour and o1.shape != o2.shape:
                break
        swapped = Scene(
            (dataclasses.replace(o1, colour=o2.colour), dataclasses.replace(o2, colour=o1.colour)),
            a.background,
        )
        style = STYLES[1 + rng.integers(len(STYLES) - 1)]
        two_a.append(to_prompt(a, "canonical"))
        two_p.append(to_prompt(a, style))
        two_s.append(to_prompt(swapped, "canonical"))
    _, qa = encoder.encode(two_a)
    _, qp = encoder.encode(two_p)
    _, qs = encoder.encode(two_s)
    out["two_object_mean_cos_paraphrase"] = float(_cos(qa, qp).mean())
    out["two_object_mean_cos_swapped"] = float(_cos(qa, qs).mean())
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_TEXT_ENCODER_DIR)
    parser.add_argument("--steps", type=int, default=TrainTextConfig.steps)
    parser.add_argument("--batch-scenes", type=int, default=TrainTextConfig.batch_scenes)
    parser.add_argument("--seed", type=int, default=TrainTextConfig.seed)
    args = parser.parse_args(argv)
    cfg = TrainTextConfig(steps=args.steps, batch_scenes=args.batch_scenes, seed=args.seed)
    encoder, history = train_text_encoder(cfg, out_dir=args.out)
    report = ranking_report(encoder)
    print(
        f"trained in {history['seconds']:.1f}s wall, {history['cpu_seconds']:.1f}s CPU "
        f"(all threads); saved to {args.out}"
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
