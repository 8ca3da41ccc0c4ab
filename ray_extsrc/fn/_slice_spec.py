"""`SliceSpec`: the region of ``fn.decoders.image_slice``, by DALI's ``SliceAttr`` rules.

The region is given per listed axis of the image's ``HW`` extent, in the order of ``axis_names``
(default ``"WH"``: x first) or ``axes`` (indices into ``HW``; negative count from the back). Either

* named arguments: a start (``start`` absolute, or ``rel_start`` as a fraction of the extent;
  default 0) and an end (``end``/``rel_end``) or a size (``shape``/``rel_shape``; default: to the
  end of the extent) - at most one of each group; or
* two positional inputs, ``anchor`` and ``shape``: floats are fractions when ``normalized_anchor``
  / ``normalized_shape`` (both default True), integers are always pixels.

For each axis the start and end are computed in float64 and rounded half away from zero
(``std::llround``) separately, so the size is ``round(end) - round(start)``; with both relative
(``rel_start`` + ``rel_shape``, or normalized positional inputs) the end is ``(start + size) *
extent``, one multiplication, as DALI does to limit rounding error. A region that leaves the image
is refused, as DALI's decoders do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _args
from ._args import PER_SAMPLE

__all__ = ["SliceSpec", "NAMED_ARGS"]

NAMED_ARGS = ("start", "rel_start", "end", "rel_end", "shape", "rel_shape")


@dataclass(frozen=True, slots=True)
class SliceSpec:
    """Validated slice arguments; values are tuples, `PER_SAMPLE` or None."""

    axes: tuple[int, ...]  # indices into (H, W)
    named: tuple[tuple[str, Any], ...]  # the given named arguments, in NAMED_ARGS order
    normalized_anchor: bool
    normalized_shape: bool

    @classmethod
    def parse(
        cls, op: str, positional: bool, named: Mapping[str, Any], axes: Any, axis_names: Any,
        normalized_anchor: Any, normalized_shape: Any,
    ) -> SliceSpec:
        given = {k: v for k, v in named.items() if v is not None}
        starts = [k for k in ("start", "rel_start") if k in given]
        ends = [k for k in ("end", "rel_end", "shape", "rel_shape") if k in given]
        if len(starts) > 1:
            raise ValueError(f"fn.{op}: start and rel_start are mutually exclusive; got both")
        if len(ends) > 1:
            raise ValueError(f"fn.{op}: end, rel_end, shape and rel_shape are mutually exclusive; got {', '.join(ends)}")
        if positional and given:
            raise ValueError(
                f"fn.{op}: named slice arguments ({', '.join(given)}) cannot be combined with the "
                "positional anchor and shape inputs"
            )
        if not positional and not given:
            raise ValueError(
                f"fn.{op}: give the slice as named arguments (e.g. rel_start/rel_shape, start/end) "
                "or as two positional inputs (anchor, shape)"
            )
        if axes is not None and axis_names is not None:
            raise ValueError(f"fn.{op}: axes and axis_names are mutually exclusive; got axes={axes!r}, axis_names={axis_names!r}")
        if axes is not None:
            dims = [axes] if np.isscalar(axes) else list(axes)
            if not all(isinstance(a, (int, np.integer)) and not isinstance(a, bool) and -2 <= a < 2 for a in dims):
                raise ValueError(f"fn.{op}: axes must be indices in [-2, 1] of the image's (H, W); got {axes!r}")
            resolved = tuple(int(a) % 2 for a in dims)
        else:
            names = "WH" if axis_names is None else axis_names
            if not isinstance(names, str) or any(c not in "HW" for c in names):
                raise ValueError(f"fn.{op}: axis_names must use the letters 'H' and 'W'; got {axis_names!r}")
            resolved = tuple("HW".index(c) for c in names)
        if len(set(resolved)) != len(resolved) or not resolved:
            raise ValueError(f"fn.{op}: each axis may be listed once (and at least one); got {resolved}")
        values = []
        for k in NAMED_ARGS:
            if k in given:
                v = given[k]
                if v is not PER_SAMPLE:
                    v = _args.numbers(op, k, v, length=len(resolved))
                values.append((k, v))
        flags = []
        for name, v in (("normalized_anchor", normalized_anchor), ("normalized_shape", normalized_shape)):
            flags.append(True if v is None else _args.boolean(op, name, v))
        return cls(resolved, tuple(values), flags[0], flags[1])

    def window(
        self, op: str, height: int, width: int, arg_inputs: Mapping[str, Any],
        anchor: np.ndarray | None = None, shape: np.ndarray | None = None,
    ) -> tuple[int, int, int, int]:
        """``(y, x, h, w)`` for one sample; raises when it leaves the ``height x width`` image."""
        extent = (height, width)
        lo, hi = [0, 0], [height, width]
        if anchor is not None:
            starts, ends = self._positional(op, extent, anchor, shape)
        else:
            starts, ends = self._named(op, extent, arg_inputs)
        for i, dim in enumerate(self.axes):
            if ends[i] < starts[i]:
                raise ValueError(
                    f"fn.{op}: slice end {ends[i]} is before its start {starts[i]} on axis "
                    f"{'HW'[dim]}"
                )
            lo[dim] = _args.round_half_away(starts[i])
            hi[dim] = _args.round_half_away(ends[i])
        if lo[0] < 0 or lo[1] < 0 or hi[0] > height or hi[1] > width:
            raise ValueError(
                f"fn.{op}: slice rows {lo[0]}:{hi[0]}, columns {lo[1]}:{hi[1]} leave the "
                f"{height}x{width} image"
            )
        return lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1]

    def _vector(self, op: str, name: str, value: Any) -> np.ndarray:
        a = np.asarray(value, np.float64).reshape(-1)
        if a.size != len(self.axes):
            raise ValueError(
                f"fn.{op}: {name} must have {len(self.axes)} value(s), one per axis "
                f"{''.join('HW'[d] for d in self.axes)}; got {np.asarray(value).tolist()!r}"
            )
        if not np.isfinite(a).all():
            raise ValueError(f"fn.{op}: {name} must be finite; got {a.tolist()!r}")
        return a

    def _named(self, op: str, extent: tuple[int, int], arg_inputs: Mapping[str, Any]) -> tuple[list, list]:
        vals = {k: self._vector(op, k, _args.sample_arg(op, k, v, arg_inputs)) for k, v in self.named}
        starts, ends = [], []
        for i, dim in enumerate(self.axes):
            n = extent[dim]
            start = vals["start"][i] if "start" in vals else vals["rel_start"][i] * n if "rel_start" in vals else 0.0
            if "end" in vals:
                end = vals["end"][i]
            elif "rel_end" in vals:
                end = vals["rel_end"][i] * n
            elif "shape" in vals or "rel_shape" in vals:
                key = "shape" if "shape" in vals else "rel_shape"
                size = vals[key][i]
                if size < 0:
                    raise ValueError(f"fn.{op}: {key} must be >= 0; got {vals[key].tolist()!r}")
                if key == "shape":
                    end = start + size
                elif "rel_start" in vals:  # one multiplication after the sum, as DALI
                    end = (vals["rel_start"][i] + size) * n
                else:
                    end = start + size * n
            else:
                end = float(n)
            starts.append(start)
            ends.append(end)
        return starts, ends

    def _positional(
        self, op: str, extent: tuple[int, int], anchor: np.ndarray, shape: np.ndarray | None
    ) -> tuple[list, list]:
        anchor_a, shape_a = np.asarray(anchor), np.asarray(shape)
        if anchor_a.dtype.kind != shape_a.dtype.kind or anchor_a.dtype.kind not in "iuf":
            raise TypeError(
                f"fn.{op}: anchor and shape inputs must both be integers or both floats; got "
                f"{anchor_a.dtype} and {shape_a.dtype}"
            )
        if anchor_a.ndim > 1 or shape_a.ndim > 1:
            raise ValueError(f"fn.{op}: anchor and shape inputs must be 1-D; got shapes {anchor_a.shape}, {shape_a.shape}")
        rel_a = anchor_a.dtype.kind == "f" and self.normalized_anchor
        rel_s = shape_a.dtype.kind == "f" and self.normalized_shape
        a, s = self._vector(op, "anchor", anchor_a), self._vector(op, "shape", shape_a)
        starts, ends = [], []
        for i, dim in enumerate(self.axes):
            n = extent[dim]
            if rel_a and rel_s:
                start, end = a[i] * n, (a[i] + s[i]) * n
            else:
                start = a[i] * n if rel_a else a[i]
                end = start + (s[i] * n if rel_s else s[i])
            starts.append(start)
            ends.append(end)
        return starts, ends

