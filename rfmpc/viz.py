"""PNG files (Pillow): grids with captions and strips for results people would rather see than
read, and :func:`load_png`, which reads a ground-truth image for a restoration."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["image_grid", "load_png", "save_grid", "save_strip"]


def image_grid(
    images,
    captions: Sequence[str] | None = None,
    *,
    ncols: int = 4,
    scale: int = 4,
    caption_width: int = 28,
):
    """Tile NHWC float images in [0, 1] into one PIL image, each upscaled ``scale`` times
    (nearest neighbour) with an optional wrapped caption underneath."""
    from PIL import Image, ImageDraw, ImageFont

    arr = np.clip(np.asarray(images, np.float32), 0, 1)
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"images must be NHWC with 1 or 3 channels, got shape {arr.shape}")
    n, h, w, _ = arr.shape
    if captions is not None and len(captions) != n:
        raise ValueError(f"{len(captions)} captions for {n} images")
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    cw, ch = w * scale, h * scale
    font = ImageFont.load_default()
    lines = [textwrap.wrap(c, caption_width) for c in captions] if captions else [[]] * n
    cap_h = 12 * max((len(lc) for lc in lines), default=0) + (4 if captions else 0)
    pad = 4
    sheet = Image.new("RGB", (ncols * (cw + pad) + pad, nrows * (ch + cap_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        r, c = divmod(i, ncols)
        x0, y0 = pad + c * (cw + pad), pad + r * (ch + cap_h + pad)
        tile = Image.fromarray(np.round(arr[i] * 255).astype(np.uint8).squeeze())
        sheet.paste(tile.resize((cw, ch), Image.NEAREST), (x0, y0))
        for j, line in enumerate(lines[i]):
            draw.text((x0, y0 + ch + 2 + 12 * j), line, fill="black", font=font)
    return sheet


def save_grid(path: str | Path, images, captions: Sequence[str] | None = None, **kw) -> Path:
    """Write :func:`image_grid` to ``path`` (PNG), atomically."""
    import io

    from rfmpc.io import atomic_write_bytes

    buf = io.BytesIO()
    image_grid(images, captions, **kw).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


#: PIL modes ``--image`` accepts (8-bit; converted to RGB).
_IMAGE_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")


def load_png(path: str, image_shape) -> np.ndarray:
    """Read an 8-bit image as a ``(1, h, w, 3)`` float32 array in model space ``[-1, 1]``.

    ``image_shape`` is the model's ``(h, w, c)``; an image of the same aspect ratio but another
    size is resized (bicubic). Wrong aspect ratios, transparency, 16-bit or unreadable files raise
    ``ValueError`` saying how to fix the file.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--image {path}: no such file")
    h, w, c = image_shape
    try:
        img = Image.open(p)
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"--image {path} is not a readable image ({e}); pass a PNG file") from e
    if img.mode not in _IMAGE_MODES:
        raise ValueError(
            f"--image {path} has mode {img.mode!r}, expected 8-bit RGB, grey or palette "
            f"({', '.join(_IMAGE_MODES)}); save it as an 8-bit RGB PNG first"
        )
    if "A" in img.mode and img.getchannel("A").getextrema()[0] < 255:
        raise ValueError(
            f"--image {path} has transparent pixels (mode {img.mode}); flatten it onto a "
            "background and save it as RGB first"
        )
    if img.width * h != img.height * w:
        raise ValueError(
            f"--image {path} is {img.width}x{img.height} (width x height) but the model works on "
            f"{w}x{h} images; resizing would distort it: crop it to a {w}:{h} aspect ratio first"
        )
    img = img.convert("RGB")
    if img.size != (w, h):
        img = img.resize((w, h), Image.BICUBIC)
    arr = np.asarray(img, np.float32) / 255.0
    if c != 3:
        raise ValueError(f"the model works on {c}-channel images; --image gives RGB")
    return (2.0 * arr - 1.0)[None]


def save_strip(path: str, panels, scale: int = 4) -> None:
    """Write ``(h, w, 3)`` images in ``[0, 1]`` side by side as a PNG, upscaled ``scale`` times
    (nearest neighbour)."""
    from PIL import Image

    strip = np.concatenate([np.asarray(p) for p in panels], axis=1)
    img = Image.fromarray(np.clip(strip * 255.0 + 0.5, 0, 255).astype(np.uint8))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
