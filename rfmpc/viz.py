"""PNG grids with captions (Pillow), for results people would rather see than read."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["image_grid", "save_grid"]


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
