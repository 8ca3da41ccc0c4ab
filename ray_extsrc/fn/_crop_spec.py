"""`CropSpec`: the fixed crop window of ``fn.crop`` and ``fn.crop_mirror_normalize``, and
what to do past the edges.

DALI places a ``crop`` of size c in an extent of size n at ``anchor = round(pos * (n - c))`` with
``std::roundf`` (halves away from zero); the window may stick out when c > n, and
``out_of_bounds_policy`` decides: "error" (refuse), "pad" (fill with ``fill_values``) or
"trim_to_shape" (cut the window down to the image).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _args
from ._args import PER_SAMPLE

POLICIES = ("error", "pad", "trim_to_shape")


@dataclass(frozen=True, slots=True)
class CropSpec:
    """Validated crop arguments; ``crop_h``/``crop_w`` None mean "whole extent"."""

    crop_h: Any
    crop_w: Any
    crop_pos_x: Any
    crop_pos_y: Any
    policy: str
    fill_values: tuple[float, ...]

    @classmethod
    def parse(
        cls, op: str, crop: Any, crop_h: Any, crop_w: Any, crop_pos_x: Any, crop_pos_y: Any,
        out_of_bounds_policy: str, fill_values: Any,
    ) -> CropSpec:
        if crop is not None:
            if crop_h is not None or crop_w is not None:
                raise ValueError(
                    f"fn.{op}: give either crop or crop_h/crop_w, not both; got crop={crop!r}"
                )
            if crop is PER_SAMPLE:
                raise TypeError(f"fn.{op}: crop must be a constant (h, w); use crop_h/crop_w per sample")
            crop_h, crop_w = _args.numbers(op, "crop (h, w)", crop, length=2)
        elif (crop_h is None) != (crop_w is None):
            raise ValueError(
                f"fn.{op}: crop_h and crop_w must be given together; "
                f"got crop_h={crop_h!r}, crop_w={crop_w!r}"
            )
        for name, v in (("crop_h", crop_h), ("crop_w", crop_w)):
            if v is not None and v is not PER_SAMPLE:
                _args.positive(op, name, v)
        for name, v in (("crop_pos_x", crop_pos_x), ("crop_pos_y", crop_pos_y)):
            if v is not PER_SAMPLE:
                _args.unit_interval(op, name, v)
        _args.choice(op, "out_of_bounds_policy", out_of_bounds_policy, POLICIES)
        fill = _args.numbers(op, "fill_values", fill_values)
        return cls(crop_h, crop_w, crop_pos_x, crop_pos_y, out_of_bounds_policy, fill)

    @property
    def is_whole_image(self) -> bool:
        return self.crop_h is None

    def window(
        self, op: str, height: int, width: int, arg_inputs: Mapping[str, Any]
    ) -> tuple[int, int, int, int]:
        """``(y, x, h, w)`` for one sample; may extend past the image (see `cut`)."""
        if self.crop_h is None:
            return 0, 0, height, width
        # DALI truncates fractional crop sizes (static_cast<int>).
        ch = int(_args.sample_scalar(op, "crop_h", self.crop_h, arg_inputs))
        cw = int(_args.sample_scalar(op, "crop_w", self.crop_w, arg_inputs))
        if ch < 1 or cw < 1:
            raise ValueError(f"fn.{op}: crop size must be >= 1x1; got {ch}x{cw} for this sample")
        py = _args.sample_scalar(op, "crop_pos_y", self.crop_pos_y, arg_inputs)
        px = _args.sample_scalar(op, "crop_pos_x", self.crop_pos_x, arg_inputs)
        if not (0.0 <= py <= 1.0 and 0.0 <= px <= 1.0):
            raise ValueError(f"fn.{op}: crop_pos_x/crop_pos_y must be in [0, 1]; got ({px}, {py})")
        y = _args.round_half_away(py * (height - ch))
        x = _args.round_half_away(px * (width - cw))
        return y, x, ch, cw

    def cut(self, op: str, img: np.ndarray, window: tuple[int, int, int, int]) -> np.ndarray:
        """The window of ``img`` (HWC): a view when inside the image, padded/trimmed otherwise."""
        y, x, h, w = window
        H, W = img.shape[:2]
        if y >= 0 and x >= 0 and y + h <= H and x + w <= W:
            return img[y : y + h, x : x + w]
        if self.policy == "error":
            raise ValueError(
                f"fn.{op}: crop window {h}x{w} at (y={y}, x={x}) does not fit the {H}x{W} input; "
                "use a smaller crop or out_of_bounds_policy='pad' / 'trim_to_shape'"
            )
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, H), min(x + w, W)
        if self.policy == "trim_to_shape":
            return img[y0:max(y0, y1), x0:max(x0, x1)]
        out = np.empty((h, w, *img.shape[2:]), img.dtype)
        out[...] = self.fill_for(op, img)
        if y1 > y0 and x1 > x0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = img[y0:y1, x0:x1]
        return out

    def fill_for(self, op: str, img: np.ndarray) -> np.ndarray:
        """``fill_values`` as ``img``'s dtype (rounded, clamped), one per channel or one for all."""
        channels = img.shape[2] if img.ndim == 3 else 1
        if len(self.fill_values) not in (1, channels):
            raise ValueError(
                f"fn.{op}: fill_values has {len(self.fill_values)} values but the input has "
                f"{channels} channels; give one value or one per channel"
            )
        return _args.saturate(np.asarray(self.fill_values, np.float64), img.dtype)
