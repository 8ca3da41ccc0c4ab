"""Pipeline ops with DALI's names: ``fn.decoders.image``, ``fn.resize``, ``fn.random.uniform``, ...

One module per kind of op: `decoders`, `image` (resize, crop, flip, crop_mirror_normalize,
brightness_contrast), `color` (color_twist, hsv), `geometry` (rotate, random_resized_crop),
`normalization` (normalize), `tensor` (cast, transpose), `random` (uniform, coin_flip, normal).

Call them inside a pipeline definition; each returns a `DataNode` (or a tuple of them).

    >>> from ray_extsrc import fn, types                              # doctest: +SKIP
    >>> images = fn.decoders.image_random_crop(jpegs, device="mixed")  # doctest: +SKIP
    >>> images = fn.resize(images, size=(224, 224))                    # doctest: +SKIP
    >>> images = fn.crop_mirror_normalize(images, mirror=fn.random.coin_flip(),
    ...                                   mean=[123.7, 116.3, 103.5], std=[58.4, 57.1, 57.4],
    ...                                   dtype=types.FLOAT16)          # doctest: +SKIP
"""

from __future__ import annotations

from ..external_source import external_source
from . import decoders, random
from .color import color_twist, hsv
from .geometry import random_resized_crop, rotate
from .image import brightness_contrast, crop, crop_mirror_normalize, flip, resize
from .normalization import normalize
from .tensor import cast, transpose

__all__ = [
    "external_source",
    "decoders",
    "random",
    "resize",
    "crop",
    "flip",
    "crop_mirror_normalize",
    "brightness_contrast",
    "color_twist",
    "hsv",
    "rotate",
    "random_resized_crop",
    "normalize",
    "cast",
    "transpose",
]
