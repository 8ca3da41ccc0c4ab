"""``fn.resize`` internals: DALI's output-size rules, and resampling with Pillow.

Output size follows DALI's ``ResizeAttr`` exactly: sizes are requested per spatial axis in layout
order (``size=(h, w)`` for HWC; ``resize_y``/``resize_x`` separately), a missing (0) extent is
filled in by ``mode``, and the fractional size is rounded half away from zero. With
``subpixel_scale`` (DALI's default) the source region is widened or narrowed about its centre so
the scale factor stays the requested one despite that rounding; Pillow's ``box`` argument takes
exactly that region.

Pillow's resampling is centre-aligned like DALI's, and its filters widen when scaling down, which
is DALI's ``antialias=True``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .. import types
from . import _args
from ._args import PER_SAMPLE

MODES = ("default", "stretch", "not_larger", "not_smaller")

_PIL_FILTER = {
    types.INTERP_NN: Image.Resampling.NEAREST,
    types.INTERP_LINEAR: Image.Resampling.BILINEAR,
    # DALI's triangular filter is linear interpolation that averages when scaling down: that is
    # what Pillow's BILINEAR does.
    types.INTERP_TRIANGULAR: Image.Resampling.BILINEAR,
    types.INTERP_CUBIC: Image.Resampling.BICUBIC,
}


@dataclass(frozen=True, slots=True)
class Sizing:
    """How the output size is requested: ``method`` is "xy", "size", "shorter" or "longer"."""

    method: str
    values: tuple[Any, ...]  # (resize_y, resize_x) | (h, w) | (s,) ; numbers, None or PER_SAMPLE
    mode: str
    max_size: tuple[float, float] | None
    subpixel_scale: bool

    @classmethod
    def parse(
        cls, op: str, resize_x: Any, resize_y: Any, size: Any, resize_shorter: Any,
        resize_longer: Any, mode: str | None, max_size: Any, subpixel_scale: Any,
    ) -> Sizing:
        given = {
            "resize_x/resize_y": resize_x is not None or resize_y is not None,
            "size": size is not None,
            "resize_shorter": resize_shorter is not None,
            "resize_longer": resize_longer is not None,
        }
        if sum(given.values()) != 1:
            used = [k for k, v in given.items() if v] or ["none"]
            raise ValueError(
                f"fn.{op}: give exactly one of resize_x/resize_y, size, resize_shorter or "
                f"resize_longer; got {', '.join(used)}"
            )
        if mode is not None and (resize_shorter is not None or resize_longer is not None):
            raise ValueError(
                f"fn.{op}: mode cannot be combined with resize_shorter/resize_longer; got mode={mode!r}"
            )
        mode = _args.choice(op, "mode", "default" if mode is None else mode, MODES)
        if max_size is not None:
            ms = _args.numbers(op, "max_size", max_size)
            if len(ms) == 1:
                ms = (ms[0], ms[0])
            if len(ms) != 2 or min(ms) <= 0:
                raise ValueError(f"fn.{op}: max_size must be one or two numbers > 0; got {max_size!r}")
            max_size = ms
        subpixel = _args.boolean(op, "subpixel_scale", subpixel_scale)

        def check(name: str, v: Any) -> Any:
            return v if v is None or v is PER_SAMPLE else _args.positive(op, name, v)

        if given["size"]:
            if size is PER_SAMPLE:
                values: tuple[Any, ...] = (PER_SAMPLE,)
            else:
                vals = _args.numbers(op, "size", size)
                if len(vals) == 1:
                    vals = (vals[0], vals[0])
                if len(vals) != 2 or min(vals) < 0 or max(vals) == 0:
                    raise ValueError(
                        f"fn.{op}: size must be (height, width) with extents >= 0 (0 = keep aspect "
                        f"ratio), not both 0; got {size!r}"
                    )
                values = vals
            return cls("size", values, mode, max_size, subpixel)
        if given["resize_x/resize_y"]:
            values = (check("resize_y", resize_y), check("resize_x", resize_x))
            return cls("xy", values, mode, max_size, subpixel)
        if given["resize_shorter"]:
            value = check("resize_shorter", resize_shorter)
            return cls("shorter", (value,), "not_smaller", max_size, subpixel)
        value = check("resize_longer", resize_longer)
        return cls("longer", (value,), "not_larger", max_size, subpixel)

    def requested(self, op: str, arg_inputs: Mapping[str, Any]) -> tuple[float, float]:
        """The requested (h, w) for one sample; 0 means "derive from the other extent"."""
        if self.method == "size":
            if self.values[0] is PER_SAMPLE:
                vals = _args.sample_arg(op, "size", PER_SAMPLE, arg_inputs)
                vals = np.asarray(vals, np.float64).reshape(-1)
                if vals.size == 1:
                    vals = np.repeat(vals, 2)
                if vals.size != 2 or (vals < 0).any():
                    raise ValueError(
                        f"fn.{op}: per-sample size must be (h, w) >= 0; got {vals.tolist()}"
                    )
                return float(vals[0]), float(vals[1])
            return self.values[0], self.values[1]
        if self.method == "xy":
            (ry, rx) = self.values
            h = 0.0 if ry is None else _args.sample_scalar(op, "resize_y", ry, arg_inputs)
            w = 0.0 if rx is None else _args.sample_scalar(op, "resize_x", rx, arg_inputs)
            return h, w
        name = "resize_shorter" if self.method == "shorter" else "resize_longer"
        s = _args.sample_scalar(op, name, self.values[0], arg_inputs)
        return s, s

    def plan(
        self, op: str, in_h: int, in_w: int, arg_inputs: Mapping[str, Any]
    ) -> tuple[int, int, tuple[float, float, float, float]]:
        """Output ``(h, w)`` and Pillow source box ``(x0, y0, x1, y1)`` for one sample."""
        req = self.requested(op, arg_inputs)
        if min(req) < 0:
            raise ValueError(f"fn.{op}: requested size must be >= 0; got {req} for this sample")
        out = _adjust_output_size(list(req), [float(in_h), float(in_w)], self.mode, self.max_size)
        dst = [max(1, _args.round_half_away(o)) for o in out]
        box = [0.0, 0.0, float(in_h), float(in_w)]  # lo_h, lo_w, hi_h, hi_w
        if self.subpixel_scale:
            for d, n in enumerate((in_h, in_w)):
                if out[d] > 0 and dst[d] != out[d]:
                    adj = min(10.0, dst[d] / out[d])
                    # Keep the region's centre; Pillow refuses a box outside the image, so clamp
                    # (costs at most half an output pixel of scale accuracy at the border).
                    box[d] = max(0.0, n / 2 - n / 2 * adj)
                    box[d + 2] = min(float(n), n / 2 + n / 2 * adj)
        return dst[0], dst[1], (box[1], box[0], box[3], box[2])


def _adjust_output_size(
    out: list[float], in_size: list[float], mode: str, max_size: tuple[float, float] | None
) -> list[float]:
    """DALI's ``ResizeAttr::AdjustOutputSize`` for two axes (sizes are never negative here)."""
    mask = [o != 0 and i != 0 for o, i in zip(out, in_size)]
    scale = [o / i if i else 1.0 for o, i in zip(out, in_size)]
    if not any(mask):
        return list(in_size)
    if mode in ("default", "stretch"):
        if not all(mask):
            if mode == "default":  # missing extents get the (geometric) mean of the given scales
                given = [s for s, m in zip(scale, mask) if m]
                fill = math.prod(given) ** (1.0 / len(given))
            else:
                fill = 1.0
            out = [o if m else i * fill for o, i, m in zip(out, in_size, mask)]
        if max_size is not None:
            out = [min(o, ms) for o, ms in zip(out, max_size)]
        return out
    given = [s for s, m in zip(scale, mask) if m]
    final = max(given) if mode == "not_smaller" else min(given)
    if max_size is not None:
        final = min([final] + [ms / i for ms, i in zip(max_size, in_size)])
    return [o if m and s == final else i * final for o, i, s, m in zip(out, in_size, scale, mask)]


def resample(
    img: np.ndarray,
    out_h: int,
    out_w: int,
    box: tuple[float, float, float, float],
    interp: types.DALIInterpType,
    antialias: bool,
    out_dtype: np.dtype,
) -> np.ndarray:
    """Resize HWC ``img`` (the ``box`` region of it) to ``out_h x out_w`` with Pillow."""
    in_h, in_w, channels = img.shape
    resample_filter = _PIL_FILTER[interp]
    as_float = out_dtype.kind == "f"
    if not as_float and img.dtype == np.uint8 and channels in (1, 3):
        planes = [img.reshape(in_h, in_w) if channels == 1 else img]
    else:  # float output, non-uint8 input or odd channel counts: resample each channel as "F"
        planes = [np.ascontiguousarray(img[:, :, c], dtype=np.float32) for c in range(channels)]
    # antialias=False only differs when scaling down; Pillow's resize always antialiases, so do
    # plain center-aligned sampling with an affine transform then (only when both axes shrink;
    # for mixed cases the shrinking axis is antialiased anyway - a documented approximation).
    sx, sy = (box[2] - box[0]) / out_w, (box[3] - box[1]) / out_h
    plain = not antialias and interp is not types.INTERP_NN and sx >= 1 and sy >= 1
    results = []
    for plane in planes:
        im = Image.fromarray(plane)
        if plain:
            im = im.transform(
                (out_w, out_h), Image.Transform.AFFINE, (sx, 0, box[0], 0, sy, box[1]), resample_filter
            )
        else:
            im = im.resize((out_w, out_h), resample_filter, box=box, reducing_gap=None)
        results.append(np.asarray(im))
    if len(results) == 1 and results[0].dtype == out_dtype:
        out = results[0]
        return out.reshape(out_h, out_w, channels) if out.ndim == 2 else out
    stacked = np.stack(results, axis=-1)
    return stacked.astype(out_dtype, copy=False) if as_float else _args.saturate(stacked, out_dtype)
