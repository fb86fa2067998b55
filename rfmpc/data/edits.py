"""One-attribute edits of a scene: the prompt pairs that cached generation and switching meet.

A cache serves prompt B from a similar prompt A. How B differs from A decides what a switch can
reuse: a paraphrase is the same picture; an object's colour, shape or size changes little of the
layout; a position, the background or an added object changes what the first, high-noise steps
laid down. :func:`edit_scene` makes each kind of edit on purpose, so benchmarks can cover every
kind and report by kind.

Kinds (:data:`EDIT_KINDS`):

=================  ================================================================
``paraphrase``     the same scene (the prompt is written in another template)
``colour``         one object's colour
``shape``          one object's shape (among the default shapes)
``position``       one object's grid cell
``size``           one object's size
``background``     the background colour
``second-object``  a second object added to a one-object scene
``multi``          two or three attributes at once
=================  ================================================================
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from rfmpc.data.grammar import STYLES, to_prompt
from rfmpc.data.scene import (
    COLOURS,
    DEFAULT_SHAPES,
    POSITIONS,
    SIZES,
    Object,
    Scene,
    visible_colours,
)

__all__ = ["EDIT_KINDS", "benchmark_split", "edit_prompt", "edit_scene"]

EDIT_KINDS: tuple[str, ...] = (
    "paraphrase",
    "colour",
    "shape",
    "position",
    "size",
    "background",
    "second-object",
    "multi",
)
_VOCAB = {"colour": COLOURS, "shape": DEFAULT_SHAPES, "position": POSITIONS, "size": SIZES}


def _other(rng: np.random.Generator, vocab, current):
    choices = [v for v in vocab if v != current]
    return choices[int(rng.integers(len(choices)))]


def _valid(objs: list[dict], bg: str, gradient) -> Scene | None:
    try:
        scene = Scene(tuple(Object(**o) for o in objs), bg, gradient)
    except ValueError:
        return None
    if any(o.colour not in visible_colours(bg, gradient) for o in scene.objects):
        return None
    return scene


def edit_scene(
    scene: Scene, kind: str, rng: np.random.Generator, *, max_tries: int = 200
) -> Scene | None:
    """``scene`` with one edit of ``kind`` drawn at random (None if no valid edit exists, e.g.
    ``second-object`` on a scene that already has two)."""
    if kind not in EDIT_KINDS:
        raise ValueError(f"kind must be one of {EDIT_KINDS}, got {kind!r}")
    if kind == "paraphrase":
        return scene
    if kind == "second-object" and len(scene.objects) != 1:
        return None
    for _ in range(max_tries):
        objs = [dataclasses.asdict(o) for o in scene.objects]
        bg = scene.background
        if kind == "background":
            bg = _other(rng, COLOURS, bg)
        elif kind == "second-object":
            free = [p for p in POSITIONS if p != objs[0]["position"]]
            cols = list(visible_colours(bg, scene.gradient))
            objs.append(
                dict(
                    shape=DEFAULT_SHAPES[int(rng.integers(len(DEFAULT_SHAPES)))],
                    colour=cols[int(rng.integers(len(cols)))],
                    position=free[int(rng.integers(len(free)))],
                    size=SIZES[int(rng.integers(len(SIZES)))],
                )
            )
        elif kind == "multi":
            attrs = ["background"] + [(a, i) for i in range(len(objs)) for a in _VOCAB]
            picks = rng.choice(len(attrs), size=int(rng.integers(2, 4)), replace=False)
            for j in picks:
                a = attrs[int(j)]
                if a == "background":
                    bg = _other(rng, COLOURS, bg)
                else:
                    name, i = a
                    objs[i][name] = _other(rng, _VOCAB[name], objs[i][name])
        else:
            i = int(rng.integers(len(objs)))
            objs[i][kind] = _other(rng, _VOCAB[kind], objs[i][kind])
        new = _valid(objs, bg, scene.gradient)
        if new is not None and new != scene:
            return new
    return None


def edit_prompt(scene: Scene, kind: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """``(prompt_a, prompt_b)``: the scene in the canonical template and its edit (a paraphrase
    is written in another template, drawn at random)."""
    new = edit_scene(scene, kind, rng)
    if new is None:
        return None
    style = STYLES[1 + int(rng.integers(len(STYLES) - 1))] if kind == "paraphrase" else "canonical"
    return to_prompt(scene), to_prompt(new, style)


def benchmark_split(scene: Scene) -> str:
    """``"dev"`` or ``"heldout"``: which split of the switch / cache benchmarks ``scene`` belongs
    to (``sha256(scene.key())`` even: dev; odd: held-out). A fixed rule, so tuning on the dev
    split never sees a held-out scene. (All of them are the *model's* held-out scenes: see
    :func:`rfmpc.data.is_heldout`.)"""
    h = int.from_bytes(hashlib.sha256(scene.key().encode()).digest()[:8], "little")
    return "dev" if h % 2 == 0 else "heldout"
