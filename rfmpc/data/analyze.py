"""Attribute analyzer: read a :class:`~rfmpc.data.scene.Scene` back from an image.

Used to score the prompt fidelity of generated images. The method inverts the renderer's own
image model ``pixel = (1 - a) * background + a * colour``:

1. **Background.** The border is pure background in every render (objects keep a 1.5 pixel
   margin), so the medians of the top and bottom rows, extrapolated linearly to the image edges,
   give the top and bottom background colours; each snaps to the nearest palette colour (equal
   names: solid background).
2. **Colour and coverage per pixel.** For each candidate object colour ``c`` (palette minus the
   background colours) the pixel's offset from the background is projected on ``c - bg``:
   ``a_c = <p - bg, c - bg> / |c - bg|^2`` (clipped to [0, 1]). The colour with the smallest
   residual ``|p - bg - a_c (c - bg)|`` wins; on the generator's own renders the residual is 0
   for the true colour, even on anti-aliased edges (where nearest-colour snapping would fail:
   half red on blue is close to purple).
3. **Blobs.** Pixels with ``a >= 0.6`` form cores (4-connected components; objects are 1 pixel
   apart, so cores of neighbours never touch). Each core takes the majority colour of its pixels;
   cores of one colour whose centroids snap to one grid cell are merged (a thin ring or a noisy
   object may break up), specks (< 3 pixels) dropped. A blob owns the pixels nearest to it
   (within 2.5 pixels), where its coverage map is ``a_colour``.
4. **Shape, size, position.** The coverage map is compared (sum of squared differences) with the
   renderer's coverage mask of every (shape, size), sharp and Gaussian-blurred (generated images
   have soft edges), placed at the grid cell nearest to the blob and shifted by the rounded
   centroid difference. The best template gives shape, size and
   position. On the generator's own renders the true template matches to float rounding, so the
   analyzer is exact; on generated images, the nearest template is a tolerant classifier.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from rfmpc.data.render import grid_coverage
from rfmpc.data.scene import (
    COLOURS,
    PALETTE,
    POSITION_CENTERS,
    POSITIONS,
    SHAPES,
    SIZES,
    Object,
    Scene,
    visible_colours,
)

__all__ = ["ATTRIBUTES", "Detection", "analyze", "attribute_accuracy", "detect"]

#: Per-object attributes scored by :func:`attribute_accuracy`.
ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "position", "size")

_CORE_ALPHA = 0.6  # coverage of a core pixel
_MIN_CONTRAST = 0.1  # |pixel - background| below this is never a core pixel
_OWN_RADIUS = 2.5  # pixels a core owns around itself (edges of anti-aliased shapes)
_MIN_CORE = 3  # pixels; smaller cores are noise
_MIN_AREA = 3.0  # total coverage; smaller blobs are noise
_MIN_MATCH = 0.5  # Dice overlap with the best template; below it a blob is noise
_MAX_DETECTIONS = 8
_BLURS = (0.0, 0.5, 1.0)  # Gaussian blur (pixels at 32x32) of the templates: soft generated edges


class Detection(NamedTuple):
    """One object found in an image: ``centroid`` is (x, y) in pixels, ``error`` the template
    mismatch (sum of squared coverage differences, 0 for an exact render) and ``match`` the Dice
    overlap of the coverage map with the best template (1 for an exact render)."""

    shape: str
    colour: str
    position: str
    size: str
    area: float
    centroid: tuple[float, float]
    error: float
    match: float


_PALETTE_ARR = np.asarray([PALETTE[c] for c in COLOURS], dtype=np.float64)


def _nearest_colour(rgb: np.ndarray, exclude=()) -> str:
    d = np.sum((_PALETTE_ARR - rgb[None, :]) ** 2, axis=-1)
    for i, c in enumerate(COLOURS):
        if c in exclude:
            d[i] = np.inf
    return COLOURS[int(np.argmin(d))]


def _check_image(image) -> np.ndarray:
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 3 or img.shape[-1] != 3 or img.shape[0] != img.shape[1] or img.shape[0] < 16:
        raise ValueError(
            f"image must be one square RGB image (H, W, 3) in HWC layout with H = W >= 16, got "
            f"shape {img.shape}; analyze batches one image at a time"
        )
    if not np.all(np.isfinite(img)):
        raise ValueError("image contains NaN or inf values")
    lo, hi = float(img.min()), float(img.max())
    if lo < -0.2 or hi > 1.2:
        raise ValueError(
            f"image values must lie in [0, 1] (got [{lo:.3f}, {hi:.3f}]); map a [-1, 1] image "
            "with (x + 1) / 2"
        )
    return np.clip(img, 0.0, 1.0)


def _background(img: np.ndarray) -> tuple[np.ndarray, str, str | None]:
    """Per-row background colour (H, 3), its top colour name and gradient name (or None)."""
    h = img.shape[0]
    top_row = np.median(img[0], axis=0)
    bottom_row = np.median(img[-1], axis=0)
    t0, t1 = 0.5 / h, 1.0 - 0.5 / h
    slope = (bottom_row - top_row) / (t1 - t0)
    top = _nearest_colour(top_row - slope * t0)
    bottom = _nearest_colour(bottom_row + slope * (1.0 - t1))
    if top == bottom:
        border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]], axis=0)
        rows = np.broadcast_to(np.median(border, axis=0), (h, 3))
        return rows, top, None
    t = (np.arange(h) + 0.5) / h
    rows = (1 - t[:, None]) * (top_row - slope * t0)[None, :] + t[:, None] * (
        bottom_row + slope * (1.0 - t1)
    )[None, :]
    return rows, top, bottom


@functools.lru_cache(maxsize=8)
def _template_bank(resolution: int):
    """Every template at every grid position, sharp and blurred, with its centroid.

    Returns ``(masks (S, Z, B, P, H, W), centroids (S, Z, B, P, 2), offsets (S, Z, 2))`` over
    shapes S, sizes Z, blurs B and positions P; ``offsets`` is centroid minus anchor.
    """
    ys, xs = np.mgrid[0:resolution, 0:resolution] + 0.5
    anchors = np.asarray([POSITION_CENTERS[p] for p in POSITIONS]) * resolution
    shape = (len(SHAPES), len(SIZES), len(_BLURS), len(POSITIONS))
    masks = np.zeros((*shape, resolution, resolution), dtype=np.float64)
    centroids = np.zeros((*shape, 2))
    for (i, sh), (j, sz), (k, blur), (p, pos) in itertools.product(
        enumerate(SHAPES), enumerate(SIZES), enumerate(_BLURS), enumerate(POSITIONS)
    ):
        m = np.asarray(grid_coverage(sh, sz, pos, resolution), dtype=np.float64)
        if blur > 0:  # in pixels at 32x32, scaled with the resolution
            m = ndimage.gaussian_filter(m, blur * resolution / 32, mode="constant")
        masks[i, j, k, p] = m
        centroids[i, j, k, p] = ((m * xs).sum() / m.sum(), (m * ys).sum() / m.sum())
    offsets = centroids[:, :, 0].mean(axis=2) - anchors.mean(axis=0)
    for a in (masks, centroids, offsets):
        a.flags.writeable = False
    return masks, centroids, offsets


def _shift(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    if dx == 0 and dy == 0:
        return mask
    out = np.zeros_like(mask)
    h, w = mask.shape
    if abs(dx) >= w or abs(dy) >= h:
        return out
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = mask[ys, xs]
    return out


def _classify(alpha: np.ndarray, centroid, shapes) -> tuple[str, str, str, float, float]:
    """Best (shape, size, position, error, dice) template for one blob's coverage map."""
    res = alpha.shape[0]
    masks, centroids, offsets = _template_bank(res)
    anchors = np.asarray([POSITION_CENTERS[p] for p in POSITIONS]) * res
    si = np.asarray([SHAPES.index(s) for s in shapes])
    cs, cz, cb = (
        a.ravel()
        for a in np.meshgrid(si, np.arange(len(SIZES)), np.arange(len(_BLURS)), indexing="ij")
    )
    anchor = np.asarray(centroid)[None, :] - offsets[cs, cz]  # (n, 2)
    cp = np.argmin(np.sum((anchor[:, None, :] - anchors[None]) ** 2, axis=-1), axis=1)
    t = masks[cs, cz, cb, cp]  # (n, h, w)
    shifts = np.rint(np.asarray(centroid)[None, :] - centroids[cs, cz, cb, cp]).astype(int)
    moved = np.flatnonzero(np.any(shifts != 0, axis=1))
    if moved.size:
        t = t.copy()
        for i in moved:
            t[i] = _shift(t[i], int(shifts[i, 0]), int(shifts[i, 1]))
    err = np.sum((alpha[None] - t) ** 2, axis=(1, 2))
    b = int(np.argmin(err))
    dice = 2 * float(np.sum(alpha * t[b])) / max(float(np.sum(alpha**2 + t[b] ** 2)), 1e-9)
    return SHAPES[cs[b]], SIZES[cz[b]], POSITIONS[cp[b]], float(err[b]), dice


def _check_shapes(shapes) -> tuple[str, ...]:
    shapes = SHAPES if shapes is None else tuple(shapes)
    bad = [s for s in shapes if s not in SHAPES]
    if bad or not shapes:
        raise ValueError(f"shapes must be a non-empty subset of {list(SHAPES)}, got {shapes}")
    return shapes


def _detect(image, shapes=None) -> tuple[list[Detection], str, str | None]:
    shapes = _check_shapes(shapes)
    img = _check_image(image)
    h = img.shape[0]
    bg_rows, bg_name, grad_name = _background(img)
    cand = list(visible_colours(bg_name, grad_name))
    cols = np.asarray([PALETTE[c] for c in cand])  # (k, 3)
    d = img - bg_rows[:, None, :]  # (h, w, 3)
    dirs = cols[:, None, :] - bg_rows[None, :, :]  # (k, h, 3)
    norm2 = np.maximum(np.sum(dirs**2, axis=-1), 1e-6)  # (k, h)
    a = np.clip(np.einsum("hwc,khc->khw", d, dirs) / norm2[:, :, None], 0.0, 1.0)  # (k, h, w)
    resid = np.linalg.norm(d[None] - a[..., None] * dirs[:, :, None, :], axis=-1)
    best = np.argmin(resid, axis=0)  # (h, w)
    a_best = np.take_along_axis(a, best[None], axis=0)[0]
    core = (a_best >= _CORE_ALPHA) & (np.linalg.norm(d, axis=-1) >= _MIN_CONTRAST)
    labels, n = ndimage.label(core)
    if n == 0:
        return [], bg_name, grad_name
    # Merge core fragments of one colour whose centroids fall in one grid cell (a thin ring or a
    # noisy object can break into pieces), then drop specks.
    ys, xs = np.mgrid[0:h, 0:h] + 0.5
    anchors = np.asarray([POSITION_CENTERS[p] for p in POSITIONS]) * h
    index = np.arange(1, n + 1)
    cy = ndimage.mean(ys, labels, index)
    cx = ndimage.mean(xs, labels, index)
    groups: dict[tuple[int, int], int] = {}
    merged = np.zeros(n + 1, dtype=np.int64)
    for k in range(1, n + 1):
        in_core = labels == k
        colour = int(np.argmax(np.bincount(best[in_core], weights=a_best[in_core])))
        cell = int(np.argmin((anchors[:, 0] - cx[k - 1]) ** 2 + (anchors[:, 1] - cy[k - 1]) ** 2))
        merged[k] = groups.setdefault((colour, cell), len(groups) + 1)
    labels = merged[labels]
    counts = np.bincount(labels.ravel(), minlength=len(groups) + 1)
    keep = [k for k in range(1, len(groups) + 1) if counts[k] >= _MIN_CORE]
    labels = np.where(np.isin(labels, keep), labels, 0)
    if not keep:
        return [], bg_name, grad_name
    dist, (iy, ix) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
    owner = np.where(dist <= _OWN_RADIUS, labels[iy, ix], 0)
    found = []
    for k in keep:
        in_core = labels == k
        votes = np.bincount(best[in_core], weights=a_best[in_core], minlength=len(cand))
        ci = int(np.argmax(votes))
        alpha = np.where(owner == k, a[ci], 0.0)
        area = float(alpha.sum())
        if area < _MIN_AREA:
            continue
        centroid = (float((alpha * xs).sum() / area), float((alpha * ys).sum() / area))
        shape, size, pos, err, match = _classify(alpha, centroid, shapes)
        if match < _MIN_MATCH:
            continue  # a scatter of noisy pixels, not an object
        found.append(Detection(shape, cand[ci], pos, size, area, centroid, err, match))
    found.sort(key=lambda det: -det.area)
    return found[:_MAX_DETECTIONS], bg_name, grad_name


def detect(image, *, shapes=None) -> list[Detection]:
    """All objects found in ``image`` (H, W, 3) in [0, 1], largest first (at most 8).

    ``shapes`` restricts the shape classifier (default: all of :data:`SHAPES`). Unlike
    :func:`analyze`, detections may share a grid position (a generated image may put two blobs
    in one cell).
    """
    return _detect(image, shapes)[0]


def analyze(image, *, shapes=None) -> Scene:
    """Read the scene back from an image (H, W, 3) float in [0, 1], HWC.

    Returns the :class:`~rfmpc.data.scene.Scene`: background (and gradient), and each object's
    shape, colour, position and size. Exact (equal to the rendered scene) on the generator's own
    renders; on other images each attribute is the nearest one the generator can make. Blobs
    that share a grid position keep only the largest one; a blank image gives no objects.
    """
    found, bg, grad = _detect(image, shapes)
    objects, used = [], set()
    for det in found:
        if det.position in used:
            continue
        used.add(det.position)
        objects.append(Object(det.shape, det.colour, det.position, det.size))
    return Scene(tuple(objects), bg, grad)


def attribute_accuracy(image, scene: Scene, *, shapes=None) -> dict[str, float]:
    """Score how well an image shows ``scene``.

    Detected objects are matched one-to-one to the scene's objects (the matching that agrees on
    the most attributes, ties broken by distance to the object's grid anchor); an object without
    a match scores 0 on every attribute.

    Returns:
        dict with, as floats in [0, 1]: ``"background"`` (colour and gradient right), one entry
        per attribute in :data:`ATTRIBUTES` (fraction of the scene's objects with it right),
        ``"count"`` (1 if exactly as many objects were found), ``"mean"`` (fraction of all
        ``1 + 4 * len(scene.objects)`` attribute checks right) and ``"all"`` (every check right
        and no extra object).
    """
    if not isinstance(scene, Scene):
        raise TypeError(f"scene must be a rfmpc.data.Scene, got {type(scene).__name__}")
    found, bg, grad = _detect(image, shapes)
    targets = scene.objects
    res = np.asarray(image).shape[0]

    def agree(t: Object, det: Detection) -> tuple[int, ...]:
        return tuple(int(getattr(t, k) == getattr(det, k)) for k in ATTRIBUTES)

    def dist(t: Object, det: Detection) -> float:
        ax, ay = np.asarray(POSITION_CENTERS[t.position]) * res
        return float(np.hypot(det.centroid[0] - ax, det.centroid[1] - ay))

    best_key, best = None, [(0,) * len(ATTRIBUTES)] * len(targets)
    m = min(len(targets), len(found))
    for perm in itertools.permutations(range(len(found)), m):
        for chosen in itertools.combinations(range(len(targets)), m):
            scores = [(0,) * len(ATTRIBUTES)] * len(targets)
            total, d = 0, 0.0
            for ti, fi in zip(chosen, perm):
                scores[ti] = agree(targets[ti], found[fi])
                total += sum(scores[ti])
                d += dist(targets[ti], found[fi])
            key = (total, -d)
            if best_key is None or key > best_key:
                best_key, best = key, scores
    bg_ok = float(bg == scene.background and grad == scene.gradient)
    n = len(targets)
    out = {"background": bg_ok}
    for j, name in enumerate(ATTRIBUTES):
        out[name] = float(sum(s[j] for s in best) / n) if n else 1.0
    out["count"] = float(len(found) == n)
    checks = bg_ok + sum(sum(s) for s in best)
    out["mean"] = float(checks / (1 + len(ATTRIBUTES) * n))
    out["all"] = float(out["mean"] == 1.0 and out["count"] == 1.0)
    return out
