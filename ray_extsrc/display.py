"""Saving a batch of images as one PNG grid: the tutorial's ``display()``, without matplotlib."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

__all__ = ["save_grid"]


def _to_uint8_hwc(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[2] not in (1, 3):
        a = a.transpose(1, 2, 0)  # CHW -> HWC
    if a.dtype != np.uint8:
        lo, hi = float(a.min()), float(a.max())  # normalized floats: stretch to 0..255 for viewing
        a = ((a - lo) / (hi - lo or 1.0) * 255.0).round().astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    return a


def save_grid(
    images: Sequence[np.ndarray],
    path: str | os.PathLike,
    columns: int = 2,
    captions: Sequence[str] | None = None,
    cell: int = 256,
) -> str:
    """Tile ``images`` (HWC or CHW, uint8 or float) into ``columns`` columns of ``cell`` px cells."""
    from PIL import Image, ImageDraw

    n = len(images)
    if n == 0:
        raise ValueError("save_grid: no images to draw")
    rows = math.ceil(n / columns)
    pad = 18 if captions else 4
    canvas = Image.new("RGB", (columns * (cell + 4), rows * (cell + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, img in enumerate(images):
        tile = Image.fromarray(_to_uint8_hwc(img)).convert("RGB")
        tile.thumbnail((cell, cell))
        x, y = (i % columns) * (cell + 4), (i // columns) * (cell + pad)
        canvas.paste(tile, (x + (cell - tile.width) // 2, y + pad - 2))
        if captions:
            draw.text((x + 2, y + 1), str(captions[i]), fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return str(path)
