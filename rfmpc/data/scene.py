"""Scene description of the procedural text-image data: objects, background, palette, layout.

A :class:`Scene` is the exact ground truth behind one procedural image and one prompt: up to a
few :class:`Object` s (shape, colour, named grid position, size) on a solid or vertically
graded background. Everything here is plain data; :mod:`rfmpc.data.render` draws a scene,
:mod:`rfmpc.data.grammar` writes and parses prompts for it and :mod:`rfmpc.data.analyze` reads it
back from pixels.

Layout (in units of the image side, so 32x32 and 64x64 renders are the same picture): a 3x3 grid
of anchor points at 3/16, 1/2 and 13/16 of the side (6, 16 and 26 pixels at 32x32); objects are
``large`` (9/32 of the side) or ``small`` (6/32). Large objects in neighbouring cells are 1 pixel
apart at 32x32 and every object stays 1.5 pixels away from the border, so objects never overlap
and the image border is pure background (which is what makes the analyzer exact).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

__all__ = [
    "COLOURS",
    "DEFAULT_SHAPES",
    "DEFAULT_SIZE",
    "MIN_CONTRAST",
    "PALETTE",
    "POSITIONS",
    "POSITION_CENTERS",
    "SHAPES",
    "SIZES",
    "SIZE_EXTENTS",
    "Object",
    "Scene",
    "visible_colours",
]

#: Named palette (RGB in [0, 1]). Chosen so that every pair is >= 0.4 apart in RGB and no three
#: colours are collinear, which keeps anti-aliased edges unambiguous for the analyzer.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.88, 0.10, 0.10),
    "green": (0.10, 0.70, 0.15),
    "blue": (0.10, 0.25, 0.95),
    "yellow": (1.00, 0.95, 0.15),
    "white": (0.97, 0.97, 0.97),
    "black": (0.03, 0.03, 0.03),
    "orange": (1.00, 0.55, 0.00),
    "purple": (0.60, 0.10, 0.75),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)

#: Every shape the renderer, grammar and analyzer know.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring")
#: The shapes of the default training mix (the ones the issue requires; cheapest to learn).
DEFAULT_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

#: Sizes and their extent (side of the bounding box) as a fraction of the image side.
SIZE_EXTENTS: dict[str, float] = {"small": 6 / 32, "large": 9 / 32}
SIZES: tuple[str, ...] = tuple(SIZE_EXTENTS)
#: The size a prompt means when it names none ("a red circle at the top left ...").
DEFAULT_SIZE = "large"

_GRID = {"top": 3 / 16, "center": 1 / 2, "bottom": 13 / 16}
_GRID_X = {"left": 3 / 16, "center": 1 / 2, "right": 13 / 16}

#: The nine named positions in reading order, with their anchor (x, y) as fractions of the side
#: (y grows downwards, as in image rows).
POSITION_CENTERS: dict[str, tuple[float, float]] = {
    "top left": (_GRID_X["left"], _GRID["top"]),
    "top center": (_GRID_X["center"], _GRID["top"]),
    "top right": (_GRID_X["right"], _GRID["top"]),
    "center left": (_GRID_X["left"], _GRID["center"]),
    "center": (_GRID_X["center"], _GRID["center"]),
    "center right": (_GRID_X["right"], _GRID["center"]),
    "bottom left": (_GRID_X["left"], _GRID["bottom"]),
    "bottom center": (_GRID_X["center"], _GRID["bottom"]),
    "bottom right": (_GRID_X["right"], _GRID["bottom"]),
}
POSITIONS: tuple[str, ...] = tuple(POSITION_CENTERS)
_POSITION_INDEX = {p: i for i, p in enumerate(POSITIONS)}


#: Minimum RGB distance between an object colour and every background colour it may sit on.
MIN_CONTRAST = 0.3


@functools.lru_cache(maxsize=128)
def visible_colours(background: str, gradient: str | None = None) -> tuple[str, ...]:
    """Object colours the generator may use on a background.

    Excludes the background colour(s) and, for a gradient, any colour closer than
    :data:`MIN_CONTRAST` to a colour the gradient passes through (e.g. orange between red and
    yellow), so that every object is visible wherever it sits.
    """
    _check_name("background", background, COLOURS)
    top = np.asarray(PALETTE[background])
    bottom = top if gradient is None else np.asarray(PALETTE[_check_name_ret(gradient)])
    seg = bottom - top
    out = []
    for c in COLOURS:
        if c in (background, gradient):
            continue
        p = np.asarray(PALETTE[c])
        t = 0.0 if gradient is None else float(np.clip((p - top) @ seg / (seg @ seg), 0.0, 1.0))
        if np.linalg.norm(top + t * seg - p) >= MIN_CONTRAST:
            out.append(c)
    return tuple(out)


def _check_name_ret(value: str) -> str:
    _check_name("gradient", value, COLOURS)
    return value


def _check_name(arg: str, value, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{arg}={value!r} is not one of the known names {list(valid)}")


@dataclasses.dataclass(frozen=True)
class Object:
    """One object of a scene.

    Attributes:
        shape: one of :data:`SHAPES`.
        colour: one of :data:`COLOURS`.
        position: one of :data:`POSITIONS` (named 3x3 grid cell).
        size: one of :data:`SIZES`; defaults to :data:`DEFAULT_SIZE`.
    """

    shape: str
    colour: str
    position: str
    size: str = DEFAULT_SIZE

    def __post_init__(self):
        _check_name("shape", self.shape, SHAPES)
        _check_name("colour", self.colour, COLOURS)
        _check_name("position", self.position, POSITIONS)
        _check_name("size", self.size, SIZES)


@dataclasses.dataclass(frozen=True)
class Scene:
    """A whole procedural image: objects on a background.

    ``objects`` is stored sorted by position (reading order), so two descriptions of the same
    picture that list the objects in a different order compare (and hash) equal. Positions must be
    distinct and no object may have a background colour (it would be invisible).

    Attributes:
        objects: the objects, any number (the generator makes one or two).
        background: background colour (the top colour if ``gradient`` is set).
        gradient: ``None`` for a solid background, else the bottom colour of a vertical linear
            gradient from ``background`` (top) to ``gradient`` (bottom).
    """

    objects: tuple[Object, ...]
    background: str
    gradient: str | None = None

    def __post_init__(self):
        objs = tuple(self.objects)
        for o in objs:
            if not isinstance(o, Object):
                raise TypeError(f"Scene.objects must contain Object instances, got {type(o)}")
        _check_name("background", self.background, COLOURS)
        if self.gradient is not None:
            _check_name("gradient", self.gradient, COLOURS)
            if self.gradient == self.background:
                raise ValueError(
                    f"gradient={self.gradient!r} equals background; use gradient=None for a "
                    "solid background"
                )
        positions = [o.position for o in objs]
        if len(set(positions)) != len(positions):
            raise ValueError(f"objects must have distinct positions, got {positions}")
        bg = self.background_colours
        for o in objs:
            if o.colour in bg:
                raise ValueError(
                    f"object {o} has the background colour {o.colour!r}: it would be invisible; "
                    "pick another object or background colour"
                )
        objs = tuple(sorted(objs, key=lambda o: _POSITION_INDEX[o.position]))
        object.__setattr__(self, "objects", objs)

    @property
    def background_colours(self) -> tuple[str, ...]:
        """The background colour names (one, or two for a gradient)."""
        if self.gradient is None:
            return (self.background,)
        return (self.background, self.gradient)

    def key(self) -> str:
        """A canonical, stable text key of the scene (used for hashing into splits)."""
        objs = ";".join(f"{o.size} {o.colour} {o.shape} @ {o.position}" for o in self.objects)
        return f"{objs} | {self.background} -> {self.gradient}"
