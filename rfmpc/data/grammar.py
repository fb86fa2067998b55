"""Prompt grammar of the procedural data: sample scenes, write prompts, parse prompts back.

The canonical form is ``"a {colour} {shape} at the {position} on a {background} background"``
(``"a small ..."`` for small objects; two objects are joined with ``"and"``), and
:data:`STYLES` lists paraphrase templates of the same scene, e.g.

- canonical: ``a red circle at the top left and a small blue square at the bottom right on a
  green background``
- terse: ``top-left red circle and bottom-right small blue square, green background``
- with: ``a green background with a small blue square in the lower right and a large red circle
  in the upper left``
- image: ``an image of a big red circle in the top left corner and ... on a plain green
  background``
- list: ``red circle, large, top left and blue square, small, bottom right; green background``

:func:`parse_prompt` does not match templates: it finds the background phrase
(``{colour} background`` or ``{colour} to {colour} gradient background``), splits the rest into
object clauses at ``"and"`` and reads one colour, one shape, an optional size and position words
from each clause. So every template, the canonical form and many free variations parse, and an
unknown word raises a ``ValueError`` that names it and lists the valid words.
"""

from __future__ import annotations

import re

import numpy as np

from rfmpc.data.scene import (
    COLOURS,
    DEFAULT_SHAPES,
    DEFAULT_SIZE,
    POSITIONS,
    SHAPES,
    SIZES,
    Object,
    Scene,
    visible_colours,
)

__all__ = [
    "STYLES",
    "VOCABULARY",
    "parse_prompt",
    "parse_prompt_roles",
    "random_prompt",
    "sample_scene",
    "split_words",
    "to_prompt",
]

#: Paraphrase templates understood by :func:`to_prompt` (the first one is canonical).
STYLES: tuple[str, ...] = ("canonical", "terse", "with", "image", "list")

_SIZE_WORDS = {
    "small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large",
}  # fmt: skip
_VERTICAL_WORDS = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
_HORIZONTAL_WORDS = {"left": "left", "right": "right"}
_CENTER_WORDS = ("center", "centre", "middle")
_STRUCTURE_WORDS = ("and", "background", "gradient", "to")
_FILLER_WORDS = (
    "a", "an", "the", "at", "in", "on", "of", "with", "image", "picture", "corner", "placed",
    "plain", "solid", "against",
)  # fmt: skip

#: Every word the grammar knows (punctuation is always accepted and ignored).
VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        set(COLOURS)
        | set(SHAPES)
        | set(_SIZE_WORDS)
        | set(_VERTICAL_WORDS)
        | set(_HORIZONTAL_WORDS)
        | set(_CENTER_WORDS)
        | set(_STRUCTURE_WORDS)
        | set(_FILLER_WORDS)
    )
)
_KNOWN = frozenset(VOCABULARY)
_WORD_RE = re.compile(r"\w+|[^\w\s]+")


def split_words(text: str) -> list[str]:
    r"""Lower-case ``text`` and split it into words and punctuation runs (``\w+|[^\w\s]+``).

    This is exactly the pre-tokenisation of :mod:`rfmpc.data.tokenizer`, so word ``i`` of a
    prompt is token ``i + 1`` of its encoding (after the leading ``[CLS]``).
    """
    return _WORD_RE.findall(text.lower())


def _is_punct(word: str) -> bool:
    return not word[0].isalnum() and word[0] != "_"


# ----------------------------------------------------------------------------- sampling


def _check_rng(rng) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy Generator (np.random.default_rng(seed)), got {type(rng)}"
        )
    return rng


def _check_subset(arg: str, values, valid: tuple[str, ...]) -> tuple[str, ...]:
    values = tuple(values)
    bad = [v for v in values if v not in valid]
    if bad or not values:
        raise ValueError(f"{arg} must be a non-empty subset of {list(valid)}, got {list(values)}")
    return values


def sample_scene(
    rng: np.random.Generator,
    *,
    n_objects: int | None = None,
    two_object_fraction: float = 0.5,
    shapes=DEFAULT_SHAPES,
    colours=COLOURS,
    sizes=SIZES,
    positions=POSITIONS,
    gradient_fraction: float = 0.0,
) -> Scene:
    """Draw a random scene (uniform over the allowed attribute values).

    Args:
        rng: numpy ``Generator``; the scene is a deterministic function of its state.
        n_objects: number of objects (1 or 2); ``None`` draws 2 with probability
            ``two_object_fraction``.
        shapes, colours, sizes, positions: allowed values (subsets of the scene vocabularies).
        gradient_fraction: probability of a vertical two-colour gradient background.

    Objects get distinct positions and a colour visible on the background (see
    :func:`~rfmpc.data.scene.visible_colours`).
    """
    rng = _check_rng(rng)
    shapes = _check_subset("shapes", shapes, SHAPES)
    colours = _check_subset("colours", colours, COLOURS)
    sizes = _check_subset("sizes", sizes, SIZES)
    positions = _check_subset("positions", positions, POSITIONS)
    if not 0.0 <= two_object_fraction <= 1.0:
        raise ValueError(f"two_object_fraction must be in [0, 1], got {two_object_fraction}")
    if not 0.0 <= gradient_fraction <= 1.0:
        raise ValueError(f"gradient_fraction must be in [0, 1], got {gradient_fraction}")
    if n_objects is None:
        n_objects = 2 if rng.random() < two_object_fraction else 1
    if n_objects not in (1, 2) or n_objects > len(positions):
        raise ValueError(f"n_objects must be 1 or 2 (and <= len(positions)), got {n_objects}")
    if len(colours) < 2:
        raise ValueError("colours needs at least two entries (objects never have the bg colour)")
    background = colours[rng.integers(len(colours))]
    gradient = None
    if len(colours) >= 3 and rng.random() < gradient_fraction:
        others = [c for c in colours if c != background]
        gradient = others[rng.integers(len(others))]
    object_colours = [c for c in visible_colours(background, gradient) if c in colours]
    if not object_colours:
        raise ValueError(f"no colour in {list(colours)} is visible on background {background!r}")
    cells = rng.choice(len(positions), size=n_objects, replace=False)
    objects = []
    for cell in cells:
        objects.append(
            Object(
                shape=shapes[rng.integers(len(shapes))],
                colour=object_colours[rng.integers(len(object_colours))],
                position=positions[int(cell)],
                size=sizes[rng.integers(len(sizes))],
            )
        )
    return Scene(tuple(objects), background, gradient)


# ----------------------------------------------------------------------------- writing

_POS_WITH = {"top": "upper", "bottom": "lower", "center": "middle"}


def _position_phrase(position: str, style: str) -> str:
    if style == "terse":
        return position.replace(" ", "-")
    if style == "with":
        return " ".join(_POS_WITH.get(w, w) for w in position.split())
    if style == "image" and position in ("top left", "top right", "bottom left", "bottom right"):
        return position + " corner"
    return position


def _size_phrase(size: str, style: str) -> str:
    if style in ("canonical", "terse"):
        return "" if size == DEFAULT_SIZE else size
    if style == "image":
        return {"small": "little", "large": "big"}[size]
    return size


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _object_phrase(o: Object, style: str) -> str:
    size = _size_phrase(o.size, style)
    pos = _position_phrase(o.position, style)
    if style == "list":
        return f"{o.colour} {o.shape}, {size}, {pos}"
    noun = " ".join(w for w in (size, o.colour, o.shape) if w)
    if style == "terse":
        return f"{pos} {noun}"
    prep = "at" if style == "canonical" else "in"
    return f"{_article(noun)} {noun} {prep} the {pos}"


def to_prompt(scene: Scene, style: str = "canonical") -> str:
    """Write a prompt for ``scene`` in one of :data:`STYLES`.

    ``parse_prompt(to_prompt(scene, style)) == scene`` for every scene and style.
    """
    if not isinstance(scene, Scene):
        raise TypeError(f"scene must be a rfmpc.data.Scene, got {type(scene).__name__}")
    if style not in STYLES:
        raise ValueError(f"style={style!r} is not one of {list(STYLES)}")
    objs = list(scene.objects)
    if style == "with":
        objs = objs[::-1]  # order must not matter
    body = " and ".join(_object_phrase(o, style) for o in objs)
    bg = scene.background if scene.gradient is None else f"{scene.background} to {scene.gradient}"
    bg += "" if scene.gradient is None else " gradient"
    if style == "canonical":
        return f"{body} on a {bg} background"
    if style == "terse":
        return f"{body}, {bg} background"
    if style == "with":
        return f"{_article(bg)} {bg} background with {body}"
    if style == "image":
        plain = "plain " if scene.gradient is None else ""
        return f"an image of {body} on a {plain}{bg} background"
    return f"{body}; {bg} background"  # list


def random_prompt(scene: Scene, rng: np.random.Generator, styles=STYLES) -> str:
    """A prompt for ``scene`` in a style drawn uniformly from ``styles``."""
    styles = _check_subset("styles", styles, STYLES)
    return to_prompt(scene, styles[_check_rng(rng).integers(len(styles))])


# ----------------------------------------------------------------------------- parsing


def _unknown_word_error(word: str, text: str) -> ValueError:
    positions = sorted(set(_VERTICAL_WORDS) | set(_HORIZONTAL_WORDS) | set(_CENTER_WORDS))
    other = sorted(set(_STRUCTURE_WORDS) | set(_FILLER_WORDS))
    return ValueError(
        f"unknown word {word!r} in prompt {text!r}. Valid colours: {list(COLOURS)}; shapes: "
        f"{list(SHAPES)}; sizes: {sorted(_SIZE_WORDS)}; position words: {positions}; other "
        f"words: {other}"
    )


def _parse_position(words: list[str], text: str) -> str:
    vertical = {_VERTICAL_WORDS[w] for w in words if w in _VERTICAL_WORDS}
    horizontal = {_HORIZONTAL_WORDS[w] for w in words if w in _HORIZONTAL_WORDS}
    center = any(w in _CENTER_WORDS for w in words)
    if len(vertical) > 1 or len(horizontal) > 1 or (center and vertical and horizontal):
        raise ValueError(f"conflicting position words {words} in prompt {text!r}")
    if not (vertical or horizontal or center):
        raise ValueError(
            f"an object in prompt {text!r} has no position; say e.g. 'at the top left'. "
            f"Positions: {list(POSITIONS)}"
        )
    v = vertical.pop() if vertical else "center"
    h = horizontal.pop() if horizontal else "center"
    if v == "center" and h == "center":
        return "center"
    return f"{v} {h}" if v != "center" else f"center {h}"


def _parse_object(words: list[str], text: str) -> Object:
    colours = [w for w in words if w in COLOURS]
    shapes = [w for w in words if w in SHAPES]
    sizes = [_SIZE_WORDS[w] for w in words if w in _SIZE_WORDS]
    clause = " ".join(words)
    for name, found in (("colour", colours), ("shape", shapes)):
        if len(found) != 1:
            raise ValueError(
                f"each object needs exactly one {name}; the clause {clause!r} of prompt {text!r} "
                f"has {found or 'none'} (separate two objects with 'and')"
            )
    if len(set(sizes)) > 1:
        raise ValueError(f"conflicting sizes {sizes} in clause {clause!r} of prompt {text!r}")
    for w in words:
        if w in _STRUCTURE_WORDS:
            raise ValueError(
                f"unexpected {w!r} in object clause {clause!r} of prompt {text!r}; the background "
                "reads '{colour} background' or '{colour} to {colour} gradient background'"
            )
    return Object(
        shape=shapes[0],
        colour=colours[0],
        position=_parse_position(words, text),
        size=sizes[0] if sizes else DEFAULT_SIZE,
    )


def parse_prompt_roles(text: str) -> tuple[Scene, list[str], list[int | str | None]]:
    """Parse a prompt and say which part of the scene each word describes.

    Returns:
        ``(scene, words, roles)``: ``words = split_words(text)``; ``roles[i]`` is the index into
        ``scene.objects`` of the object whose clause contains word ``i``, ``"background"`` for
        the words of the background phrase, or ``None`` (separators).

    Raises:
        ValueError: unknown word (named, with the valid words), no or several backgrounds, an
            object clause without exactly one colour and one shape or without a position, or an
            impossible scene (two objects at one position, an object of the background colour).
    """
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a str, got {type(text).__name__}")
    words = split_words(text)
    for w in words:
        if not _is_punct(w) and w not in _KNOWN:
            raise _unknown_word_error(w, text)
    roles: list[int | str | None] = [None] * len(words)
    bg_at = [i for i, w in enumerate(words) if w == "background"]
    if len(bg_at) != 1:
        raise ValueError(
            f"prompt {text!r} must name exactly one background (e.g. '... on a blue background'); "
            f"found {len(bg_at)}"
        )
    j = bg_at[0]
    roles[j] = "background"
    content = [i for i in range(j) if not _is_punct(words[i])]  # word indices before it
    cw = [words[i] for i in content]
    if cw and cw[-1] == "gradient":
        if len(cw) < 4 or cw[-3] != "to" or cw[-4] not in COLOURS or cw[-2] not in COLOURS:
            raise ValueError(
                f"prompt {text!r}: a gradient background reads '{{top colour}} to {{bottom "
                f"colour}} gradient background', colours from {list(COLOURS)}"
            )
        tail, background, gradient = content[-4:], cw[-4], cw[-2]
    elif cw and cw[-1] in COLOURS:
        tail, background, gradient = content[-1:], cw[-1], None
    else:
        raise ValueError(
            f"prompt {text!r}: 'background' must follow a colour, e.g. 'on a blue "
            f"background'; colours: {list(COLOURS)}"
        )
    for i in tail:
        roles[i] = "background"

    clauses: list[list[int]] = [[]]
    for i, w in enumerate(words):
        if roles[i] == "background":
            continue
        if w == "and":
            clauses.append([])
        else:
            clauses[-1].append(i)
    objects, clause_words = [], []
    for clause in clauses:
        ws = [words[i] for i in clause if not _is_punct(words[i])]
        if not any(w in COLOURS or w in SHAPES for w in ws) and not any(
            w in _SIZE_WORDS or w in _VERTICAL_WORDS or w in _HORIZONTAL_WORDS for w in ws
        ):
            continue  # only fillers ("on a", "with", ...)
        objects.append(_parse_object(ws, text))
        clause_words.append(clause)
    if not objects:
        raise ValueError(f"prompt {text!r} names no object; e.g. 'a red circle at the top left'")
    try:
        scene = Scene(tuple(objects), background, gradient)
    except ValueError as e:
        raise ValueError(f"prompt {text!r} describes an impossible scene: {e}") from e
    for o, clause in zip(objects, clause_words):
        k = scene.objects.index(o)
        for i in clause:
            roles[i] = k
    return scene, words, roles


def parse_prompt(text: str) -> Scene:
    """Parse a prompt of the grammar into its :class:`~rfmpc.data.scene.Scene`.

    Accepts the canonical form ``"a {colour} {shape} at the {position} on a {background}
    background"``, every template of :func:`to_prompt` and free variations of them (word order
    inside an object clause, ``a``/``an``/``the``, punctuation, synonyms such as ``upper``,
    ``middle``, ``centre``, ``big``, ``little``). Objects without a size word are ``large``.
    See :func:`parse_prompt_roles` for the errors.
    """
    return parse_prompt_roles(text)[0]
