"""`random_crop_window`: the random crop box of ``fn.decoders.image_random_crop``, on the CPU
and GPU paths alike.

A pure function of (generator, image size, parameters): the CPU path and the GPU path both call it
with ``ctx.rng()`` and the size read from the file header, so a sample gets the same box whichever
device decodes it. The algorithm is torchvision's ``RandomResizedCrop.get_params`` (the box DALI's
random-crop decoders approximate): draw an area fraction and a log-uniform aspect ratio, accept the
box if it fits; after ``num_attempts`` misses, fall back to a centred crop of the whole image
clamped to the aspect-ratio range.

The order and kind of draws (uniform, uniform, integers, integers per attempt) is part of the
contract: changing it changes every box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _args

__all__ = ["RandomCropArgs", "random_crop_window"]


@dataclass(frozen=True, slots=True)
class RandomCropArgs:
    """DALI's ``RandomCropAttr`` arguments, validated: shared by ``fn.decoders.image_random_crop``
    and ``fn.random_resized_crop`` so both draw their boxes from the same parameters."""

    random_area: tuple[float, float] = (0.08, 1.0)
    random_aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    num_attempts: int = 10

    @classmethod
    def parse(cls, op: str, random_area: Any, random_aspect_ratio: Any, num_attempts: Any) -> RandomCropArgs:
        area = _args.range_pair(op, "random_area", random_area)
        if area[0] <= 0 or area[1] > 1:
            raise ValueError(f"fn.{op}: random_area must lie in (0, 1]; got {random_area!r}")
        aspect = _args.range_pair(op, "random_aspect_ratio", random_aspect_ratio)
        if aspect[0] <= 0:
            raise ValueError(f"fn.{op}: random_aspect_ratio must be > 0; got {random_aspect_ratio!r}")
        is_int = isinstance(num_attempts, (int, np.integer)) and not isinstance(num_attempts, bool)
        if not is_int or num_attempts < 1:
            raise ValueError(f"fn.{op}: num_attempts must be an int >= 1; got {num_attempts!r}")
        return cls(area, aspect, int(num_attempts))

    def window(self, rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int]:
        """This sample's ``(y, x, h, w)`` box (see `random_crop_window`)."""
        return random_crop_window(
            rng, height, width, self.random_area, self.random_aspect_ratio, self.num_attempts
        )


def random_crop_window(
    rng: np.random.Generator,
    height: int,
    width: int,
    random_area: tuple[float, float] = (0.08, 1.0),
    random_aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3),
    num_attempts: int = 10,
) -> tuple[int, int, int, int]:
    """Return ``(y, x, h, w)`` with ``0 <= y``, ``y + h <= height`` (likewise x, w) and h, w >= 1.

    ``random_area`` bounds the box area as a fraction of the image area; ``random_aspect_ratio``
    bounds width / height (sampled uniformly in log space).
    """
    if height < 1 or width < 1:
        raise ValueError(f"random_crop_window: image must be at least 1x1; got {height}x{width}")
    area = float(height * width)
    log_lo, log_hi = math.log(random_aspect_ratio[0]), math.log(random_aspect_ratio[1])
    for _ in range(num_attempts):
        target_area = area * rng.uniform(random_area[0], random_area[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            y = int(rng.integers(0, height - h + 1))
            x = int(rng.integers(0, width - w + 1))
            return y, x, h, w
    # Fallback: the whole image, narrowed to the nearest allowed aspect ratio, centred.
    in_ratio = width / height
    if in_ratio < random_aspect_ratio[0]:
        w = width
        h = min(height, max(1, round(w / random_aspect_ratio[0])))
    elif in_ratio > random_aspect_ratio[1]:
        h = height
        w = min(width, max(1, round(h * random_aspect_ratio[1])))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w
