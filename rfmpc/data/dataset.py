"""Deterministic batches of (image, prompt, scene) and the held-out split.

The split is a property of the *scene* (the attribute combination), not of the prompt: a scene is
held out iff a hash of its canonical key falls in the first :data:`HELDOUT_PERMILLE` of 1000
buckets. Training batches never contain a held-out scene in any paraphrase, so held-out prompts
test composition of attributes the model has only seen in other combinations.
"""

from __future__ import annotations

import hashlib

import numpy as np

from rfmpc.data.grammar import STYLES, random_prompt, sample_scene, to_prompt
from rfmpc.data.render import render_batch
from rfmpc.data.scene import DEFAULT_SHAPES, Scene

__all__ = [
    "HELDOUT_PERMILLE",
    "heldout_prompts",
    "is_heldout",
    "make_batch",
    "sample_split_scene",
]

#: Held-out share of all scenes, in 1/1000 (100 = 10%).
HELDOUT_PERMILLE = 100

_SPLITS = ("train", "heldout")


def is_heldout(scene: Scene) -> bool:
    """Whether ``scene`` belongs to the held-out split (a stable hash of ``scene.key()``)."""
    if not isinstance(scene, Scene):
        raise TypeError(f"scene must be a rfmpc.data.Scene, got {type(scene).__name__}")
    digest = hashlib.sha256(scene.key().encode()).digest()
    return int.from_bytes(digest[:8], "little") % 1000 < HELDOUT_PERMILLE


def _rng(seed_or_rng) -> np.random.Generator:
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng
    if isinstance(seed_or_rng, bool) or not isinstance(seed_or_rng, int | np.integer):
        raise TypeError(
            f"seed_or_rng must be an int seed or a numpy Generator, got {type(seed_or_rng)}"
        )
    return np.random.default_rng(int(seed_or_rng))


def _check_split(split: str) -> str:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
    return split


def sample_split_scene(rng: np.random.Generator, split: str = "train", **scene_kwargs) -> Scene:
    """:func:`~rfmpc.data.grammar.sample_scene` restricted to one split (rejection sampling)."""
    want = _check_split(split) == "heldout"
    for _ in range(100_000):
        scene = sample_scene(rng, **scene_kwargs)
        if is_heldout(scene) == want:
            return scene
    raise RuntimeError(f"could not sample a {split!r} scene with {scene_kwargs}")


def make_batch(
    seed_or_rng,
    n: int,
    *,
    split: str = "train",
    two_object_fraction: float = 0.5,
    resolution: int = 32,
    shapes=DEFAULT_SHAPES,
    styles=STYLES,
    gradient_fraction: float = 0.0,
) -> tuple[np.ndarray, list[str], list[Scene]]:
    """A batch of rendered scenes with paraphrased prompts.

    Args:
        seed_or_rng: int seed (the batch is a pure function of it) or a numpy ``Generator``
            (advanced in place: successive calls give successive batches).
        n: batch size.
        split: ``"train"`` (never a held-out scene) or ``"heldout"`` (only held-out scenes).
        two_object_fraction: probability that a scene has two objects.
        resolution: image side in pixels.
        shapes: shapes to draw from (default: circle, square, triangle).
        styles: prompt templates to draw from (see :data:`~rfmpc.data.grammar.STYLES`).
        gradient_fraction: probability of a gradient background.

    Returns:
        ``(images, prompts, scenes)``: float32 (n, resolution, resolution, 3) in [0, 1] (NHWC),
        n prompt strings, n :class:`~rfmpc.data.scene.Scene` s.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    rng = _rng(seed_or_rng)
    scenes, prompts = [], []
    for _ in range(int(n)):
        scene = sample_split_scene(
            rng,
            split,
            two_object_fraction=two_object_fraction,
            shapes=shapes,
            gradient_fraction=gradient_fraction,
        )
        scenes.append(scene)
        prompts.append(random_prompt(scene, rng, styles))
    return render_batch(scenes, resolution), prompts, scenes


def heldout_prompts(
    n: int = 200,
    seed: int = 0,
    *,
    two_object_fraction: float = 0.5,
    style: str = "canonical",
    shapes=DEFAULT_SHAPES,
) -> tuple[list[str], list[Scene]]:
    """``n`` distinct held-out scenes and their prompts, for the prompt-fidelity benchmark.

    The first ``n - round(n * two_object_fraction)`` scenes have one object, the rest two. The
    prompts are in ``style`` (default: the canonical form).

    Returns:
        ``(prompts, scenes)``.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not 0.0 <= two_object_fraction <= 1.0:
        raise ValueError(f"two_object_fraction must be in [0, 1], got {two_object_fraction}")
    rng = _rng(seed)
    n_two = round(n * two_object_fraction)
    scenes: list[Scene] = []
    seen: set[Scene] = set()
    for n_objects, count in ((1, n - n_two), (2, n_two)):
        got = 0
        for _ in range(1_000_000):
            if got == count:
                break
            scene = sample_split_scene(rng, "heldout", n_objects=n_objects, shapes=shapes)
            if scene not in seen:
                seen.add(scene)
                scenes.append(scene)
                got += 1
        else:
            raise ValueError(f"fewer than {count} distinct held-out {n_objects}-object scenes")
    return [to_prompt(s, style) for s in scenes], scenes
