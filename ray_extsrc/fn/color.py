"""Colour ops on HWC RGB images: ``fn.color_twist`` and ``fn.hsv``, with DALI's names, defaults and
formulas.

DALI applies both as one linear map per pixel, built in the YIQ colour space (its ``color_twist.h``
and ``hsv.h``)::

    yiq = RGB2YIQ @ rgb
    hue:        rotate (I, Q) by ``hue`` degrees:  I' = I cos h + Q sin h,  Q' = -I sin h + Q cos h
    saturation: scale (I, Q) by ``saturation``
    value:      scale (Y, I, Q) by ``value``                  (fn.hsv only)
    rgb' = YIQ2RGB @ yiq'                                     (YIQ2RGB is the exact inverse)

``fn.color_twist`` then applies contrast about half the input range and brightness as a factor::

    out = brightness * (contrast * rgb' + half * (1 - contrast))   half = 128 (integers), 0.5 (floats)

The result is rounded and clamped to the output type (`_args.saturate`). Every argument may be a
per-sample DataNode (``hue=fn.random.uniform(range=(-20, 20))``).

Both devices run `apply_color_matrices` (NumPy or CuPy), with the matrices planned on the host by
the op's ``coefficients``: the GPU gives the CPU's bits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .. import types
from ..graph import Operator, SampleContext
from . import _args
from ._args import PER_SAMPLE
from ._warp import saturate

__all__ = ["color_twist", "hsv", "ColorTwist", "Hsv", "yiq_matrix", "apply_color_matrices"]

# DALI's RGB -> YIQ matrix (rows: Y, I, Q). DALI inverts it for the way back (since 2022; earlier
# releases used a 3-decimal rounding of the inverse, which differs by < 0.2 %).
_RGB2YIQ = np.array(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]], np.float64
)
_YIQ2RGB = np.linalg.inv(_RGB2YIQ)

#: DALI's colour ops accept these input and output types
_DTYPES = tuple(np.dtype(t) for t in (np.uint8, np.int16, np.int32, np.float32, np.float16))


def yiq_matrix(hue: float = 0.0, saturation: float = 1.0, value: float = 1.0) -> np.ndarray:
    """The 3x3 RGB -> RGB matrix of a hue rotation (degrees), a saturation and a value factor."""
    h = math.radians(hue)
    c, s = math.cos(h), math.sin(h)
    adjust = np.array([[value, 0, 0], [0, c, s], [0, -s, c]], np.float64)
    adjust[1:, 1:] *= saturation * value
    return _YIQ2RGB @ adjust @ _RGB2YIQ


def _rgb_image(op: str, x: Any) -> Any:
    """``x`` checked to be an HWC RGB image of a type the colour ops take (NumPy or CuPy: only
    ``ndim``, ``shape`` and ``dtype`` are read)."""
    if x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"fn.{op}: expected an HWC image with 3 (RGB) channels; got shape {x.shape}")
    if x.dtype not in _DTYPES:
        names = ", ".join(str(t) for t in _DTYPES)
        raise TypeError(f"fn.{op}: input type must be one of ({names}); got {x.dtype}")
    return x


def apply_color_matrices(xp: Any, batch: Any, matrices: Any, offsets: Any, out_dtype: np.dtype) -> Any:
    """``saturate(matrix @ pixel + offset)`` for every pixel of a (B, H, W, 3) batch, with one
    float32 3x3 matrix (``matrices``: (B, 3, 3)) and offset (``offsets``: (B,)) per sample.

    ``xp`` is NumPy or CuPy. Each output channel is ``((r*m0 + g*m1) + b*m2) + offset``, one IEEE
    float32 operation per array step (nothing a compiler may fuse into an FMA), so both devices
    produce the same bits."""
    n = batch.shape[0]
    shape = (n,) + (1,) * (batch.ndim - 2)
    m = matrices.reshape(n, 9).astype(np.float32, copy=False)
    coef = [m[:, k].reshape(shape) for k in range(9)]
    off = offsets.astype(np.float32, copy=False).reshape(shape)
    xf = batch.astype(np.float32, copy=False)
    r, g, b = xf[..., 0], xf[..., 1], xf[..., 2]
    out = xp.empty(batch.shape, np.float32)
    for c in range(3):
        v = r * coef[3 * c]
        v += g * coef[3 * c + 1]
        v += b * coef[3 * c + 2]
        v += off
        out[..., c] = v
    return saturate(xp, out, out_dtype)


class _ColorOp(Operator):
    """Shared constructor: scalar arguments (constants or per-sample) and the output type."""

    _ARGS: tuple[tuple[str, float], ...] = ()

    def __init__(self, device: str = "cpu", seed: int | None = None, *, dtype: Any = None, **args: Any) -> None:
        super().__init__(device, seed)
        for name, default in self._ARGS:
            v = args.pop(name, default)
            setattr(self, name, v if v is PER_SAMPLE else _args.number(self.name, name, v))
        if args:  # the public function only passes known names; this guards direct construction
            raise TypeError(f"fn.{self.name}: unexpected argument(s) {sorted(args)}")
        self.dtype = None if dtype is None else _args.dtype(self.name, "dtype", dtype, _DTYPES)

    def _values(self, arg_inputs: Mapping[str, Any]) -> dict[str, float]:
        out = {}
        for name, _ in self._ARGS:
            out[name] = _args.sample_scalar(self.name, name, getattr(self, name), arg_inputs)
        return out

    def coefficients(self, arg_inputs: Mapping[str, Any], in_dtype: np.dtype) -> tuple[np.ndarray, float]:
        """The sample's float64 3x3 matrix and offset (per-sample values from ``arg_inputs``)."""
        raise NotImplementedError

    def check_input(self, img: Any) -> Any:
        """Refuse what the op does not take (NumPy or CuPy; only shape and dtype are read)."""
        return _rgb_image(self.name, img)

    def out_dtype(self, in_dtype: np.dtype) -> np.dtype:
        return np.dtype(in_dtype) if self.dtype is None else self.dtype

    #: the per-pixel map for a batch (``xp`` = NumPy or CuPy); the GPU path calls it too
    apply_batch = staticmethod(apply_color_matrices)

    def run_cpu(
        self, inputs: Sequence[np.ndarray], arg_inputs: Mapping[str, np.ndarray], ctx: SampleContext
    ) -> np.ndarray:
        img = self.check_input(np.asarray(inputs[0]))
        matrix, offset = self.coefficients(arg_inputs, img.dtype)
        return apply_color_matrices(
            np, img[None], matrix[None], np.array([offset]), self.out_dtype(img.dtype)
        )[0]

    def run_gpu(
        self, inputs: Sequence[Any], arg_inputs: Mapping[str, Any], ctxs: Sequence[SampleContext], stream: Any
    ) -> Any:
        """One batch on the GPU: the same `apply_color_matrices` with CuPy, per-sample matrices
        gathered into one device array (see `_gpu.ops.color_matrix`); equal bits to the CPU."""
        from ._gpu import ops

        return ops.color_matrix(self, inputs, arg_inputs, ctxs, stream)


class ColorTwist(_ColorOp):
    """``fn.color_twist``: hue (degrees), saturation, contrast and brightness in one linear map."""

    name = "color_twist"
    _ARGS = (("hue", 0.0), ("saturation", 1.0), ("contrast", 1.0), ("brightness", 1.0))

    def coefficients(self, arg_inputs: Mapping[str, Any], in_dtype: np.dtype) -> tuple[np.ndarray, float]:
        v = self._values(arg_inputs)
        half = 0.5 if np.dtype(in_dtype).kind == "f" else 128.0
        matrix = v["brightness"] * v["contrast"] * yiq_matrix(v["hue"], v["saturation"])
        offset = (half - half * v["contrast"]) * v["brightness"]
        return matrix, offset


class Hsv(_ColorOp):
    """``fn.hsv``: hue delta (degrees), saturation and value multipliers, as one linear map."""

    name = "hsv"
    _ARGS = (("hue", 0.0), ("saturation", 1.0), ("value", 1.0))

    def coefficients(self, arg_inputs: Mapping[str, Any], in_dtype: np.dtype) -> tuple[np.ndarray, float]:
        v = self._values(arg_inputs)
        return yiq_matrix(v["hue"], v["saturation"], v["value"]), 0.0


def color_twist(
    data: Any, *, device: str | None = None, hue: Any = 0.0, saturation: Any = 1.0,
    contrast: Any = 1.0, brightness: Any = 1.0, image_type: Any = types.RGB, dtype: Any = None,
    seed: int | None = None, **unsupported: Any,
) -> Any:
    """Adjust hue, saturation, contrast and brightness (DALI's ``fn.color_twist``); every
    adjustment may be a per-sample DataNode. ``image_type`` must be RGB, as DALI's formula assumes."""
    _rgb_only(ColorTwist.name, image_type)
    args = dict(hue=hue, saturation=saturation, contrast=contrast, brightness=brightness, dtype=dtype)
    per_sample = ("hue", "saturation", "contrast", "brightness")
    return _args.build(ColorTwist, (data,), device, seed, unsupported, per_sample, args, ("image_type",))


def hsv(
    data: Any, *, device: str | None = None, hue: Any = 0.0, saturation: Any = 1.0, value: Any = 1.0,
    dtype: Any = None, seed: int | None = None, **unsupported: Any,
) -> Any:
    """Adjust hue, saturation and value (DALI's ``fn.hsv``); each may be a per-sample DataNode."""
    args = dict(hue=hue, saturation=saturation, value=value, dtype=dtype)
    return _args.build(Hsv, (data,), device, seed, unsupported, ("hue", "saturation", "value"), args)


def _rgb_only(op: str, image_type: Any) -> None:
    if _args.enum_value(op, "image_type", image_type, types.DALIImageType) is not types.RGB:
        raise ValueError(
            f"fn.{op}: image_type must be types.RGB (the YIQ formula is defined on RGB); got {image_type!r}"
        )
