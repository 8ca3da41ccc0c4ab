"""Geometric ops on HWC images: ``fn.rotate`` and ``fn.random_resized_crop``, with DALI's names,
defaults and formulas.

``fn.rotate`` (DALI's ``rotate_params.h``): ``angle`` in degrees, counter-clockwise on screen (the
top-left corner at ``(0, 0)``, y pointing down). Each output pixel centre ``d`` reads the source at

    s = in_size / 2 + R(angle) @ (d - out_size / 2),     R(a) = [[cos a, -sin a], [sin a, cos a]]

with ``(x, y)`` vectors (see `_warp` for the sampling). The canvas is ``size`` when given
(``max(round(s), 1)``; it wins over ``keep_size``, as in DALI), the input's size with
``keep_size=True``, else the smallest that holds the rotated image, by DALI's parity rule:
``w = ceil(|cos| W + |sin| H - 0.01)`` and ``h = ceil(|cos| H + |sin| W - 0.01)``, then each is
bumped by one where needed so that it has the parity of the input extent that dominates it (W for
w and H for h up to 45 degrees, swapped beyond), which keeps the centre sharp.

``fn.random_resized_crop``: the box of `RandomCropArgs` (the same draws as
``fn.decoders.image_random_crop``), resampled to ``size`` by `_resize.resample`.

GPU twins (``run_gpu``): rotate runs `_warp.affine_warp_batch` with CuPy, the CPU's arithmetic
step for step (equal bits); random_resized_crop draws its boxes on the host with `crop_window`
and resamples them with the resize kernel (`_gpu.kernels.resize`), within a unit of Pillow.
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
from ._random_crop_window import RandomCropArgs
from ._resize import resample
from ._warp import affine_warp
from .image import _hwc

__all__ = ["rotate", "random_resized_crop", "Rotate", "RandomResizedCrop", "rotated_canvas_size"]

#: interpolation DALI's warp sampler implements
_WARP_INTERP = (types.INTERP_NN, types.INTERP_LINEAR)
_WARP_DTYPES = tuple(np.dtype(t) for t in (np.uint8, np.int16, np.uint16, np.int32, np.float32))


def rotated_canvas_size(height: int, width: int, angle_deg: float) -> tuple[int, int]:
    """DALI's ``RotatedCanvasSize``: the ``(h, w)`` that fits the rotated image (module docstring)."""
    a = math.radians(angle_deg)
    abs_cos, abs_sin = abs(math.cos(a)), abs(math.sin(a))
    w_out = math.ceil(abs_cos * width + abs_sin * height - 1e-2)
    h_out = math.ceil(abs_cos * height + abs_sin * width - 1e-2)
    w_like, h_like = (width, height) if abs_sin <= abs_cos else (height, width)
    w_out += (w_out - w_like) % 2
    h_out += (h_out - h_like) % 2
    return h_out, w_out


class Rotate(Operator):
    """``fn.rotate`` on 2-D (HWC) images; see the module docstring."""

    name = "rotate"

    def __init__(
        self, device: str = "cpu", seed: int | None = None, *, angle: Any = None,
        keep_size: bool = False, size: Any = None, fill_value: Any = None,
        interp_type: Any = types.INTERP_LINEAR, dtype: Any = None,
    ) -> None:
        super().__init__(device, seed)
        if angle is None:
            raise TypeError(f"fn.{self.name}: angle is required (degrees, counter-clockwise)")
        self.angle = angle if angle is PER_SAMPLE else _args.number(self.name, "angle", angle)
        self.keep_size = _args.boolean(self.name, "keep_size", keep_size)
        if size is not None and size is not PER_SAMPLE:
            size = _size_pair(self.name, size)
        self.size = size  # when given, it wins over keep_size (DALI's WarpParamProvider order)
        self.fill_value = None if fill_value is None else _args.number(self.name, "fill_value", fill_value)
        interp = _args.enum_value(self.name, "interp_type", interp_type, types.DALIInterpType)
        if interp not in _WARP_INTERP:
            raise ValueError(
                f"fn.{self.name}: interp_type must be types.INTERP_NN or types.INTERP_LINEAR "
                f"(DALI's warp sampler); got {interp_type!r}"
            )
        self.interp_type = interp
        self.dtype = None if dtype is None else _args.dtype(self.name, "dtype", dtype, _WARP_DTYPES)

    def check_input(self, img: Any) -> None:
        """Refuse an input type DALI's warp does not take (reads only ``dtype``: NumPy or CuPy)."""
        if img.dtype not in _WARP_DTYPES:
            names = ", ".join(str(t) for t in _WARP_DTYPES)
            raise TypeError(f"fn.{self.name}: input type must be one of ({names}); got {img.dtype}")

    def plan(self, in_h: int, in_w: int, arg_inputs: Mapping[str, Any]) -> tuple[int, int, np.ndarray]:
        """``(out_h, out_w, matrix)`` of one sample: the canvas and the 2x3 float64 matrix from
        destination to source ``(x, y)``. Shared by both devices."""
        angle = _args.sample_scalar(self.name, "angle", self.angle, arg_inputs)
        if self.size is not None:
            out_h, out_w = _size_pair(self.name, _args.sample_arg(self.name, "size", self.size, arg_inputs))
        elif self.keep_size:
            out_h, out_w = in_h, in_w
        else:
            out_h, out_w = rotated_canvas_size(in_h, in_w, angle)
        a = math.radians(angle)
        c, s = math.cos(a), math.sin(a)
        matrix = np.array([
            [c, -s, in_w / 2 - c * out_w / 2 + s * out_h / 2],
            [s, c, in_h / 2 - s * out_w / 2 - c * out_h / 2],
        ])
        return out_h, out_w, matrix

    def run_cpu(
        self, inputs: Sequence[np.ndarray], arg_inputs: Mapping[str, np.ndarray], ctx: SampleContext
    ) -> np.ndarray:
        img = _hwc(self.name, inputs[0])
        self.check_input(img)
        out_h, out_w, matrix = self.plan(img.shape[0], img.shape[1], arg_inputs)
        out_dtype = img.dtype if self.dtype is None else self.dtype
        return affine_warp(img, out_h, out_w, matrix, self.interp_type, self.fill_value, out_dtype)

    def run_gpu(
        self, inputs: Sequence[Any], arg_inputs: Mapping[str, Any], ctxs: Sequence[SampleContext], stream: Any
    ) -> Any:
        """One batch on the GPU: `_warp.affine_warp_batch` with CuPy (bit-exact with the CPU), see
        `_gpu.ops.rotate`."""
        from ._gpu import ops

        return ops.rotate(self, inputs, arg_inputs, ctxs, stream)


def _size_pair(op: str, size: Any) -> tuple[int, int]:
    """``size`` as ``(h, w)`` integers: ``max(round(s), 1)`` of positive values, as DALI."""
    vals = np.asarray(size, np.float64).reshape(-1)
    if vals.size != 2 or not np.isfinite(vals).all() or (vals <= 0).any():
        raise ValueError(f"fn.{op}: size must be (height, width) > 0; got {np.asarray(size).tolist()!r}")
    return tuple(max(1, _args.round_half_away(float(v))) for v in vals)


class RandomResizedCrop(Operator):
    """``fn.random_resized_crop``: a random box (area fraction and aspect ratio, as
    ``fn.decoders.image_random_crop``) resized to ``size = (h, w)``."""

    name = "random_resized_crop"
    is_random = True

    def __init__(
        self, device: str = "cpu", seed: int | None = None, *, size: Any = None,
        random_area: Any = (0.08, 1.0), random_aspect_ratio: Any = (3 / 4, 4 / 3),
        num_attempts: int = 10, interp_type: Any = types.INTERP_LINEAR, antialias: bool = True,
        dtype: Any = None,
    ) -> None:
        super().__init__(device, seed)
        if size is None:
            raise TypeError(f"fn.{self.name}: size is required, as (height, width) or one int")
        vals = _args.numbers(self.name, "size", size)
        vals = vals * 2 if len(vals) == 1 else vals
        if len(vals) != 2 or min(vals) < 1 or any(v != int(v) for v in vals):
            raise ValueError(f"fn.{self.name}: size must be (height, width) ints >= 1 or one int; got {size!r}")
        self.size = (int(vals[0]), int(vals[1]))
        self.crop = RandomCropArgs.parse(self.name, random_area, random_aspect_ratio, num_attempts)
        self.interp_type = _args.enum_value(self.name, "interp_type", interp_type, types.DALIInterpType)
        self.antialias = _args.boolean(self.name, "antialias", antialias)
        self.dtype = None if dtype is None else _args.dtype(self.name, "dtype", dtype)

    def crop_window(self, ctx: SampleContext, height: int, width: int) -> tuple[int, int, int, int]:
        """The sample's ``(y, x, h, w)`` box."""
        return self.crop.window(ctx.rng(), height, width)

    def run_cpu(
        self, inputs: Sequence[np.ndarray], arg_inputs: Mapping[str, np.ndarray], ctx: SampleContext
    ) -> np.ndarray:
        img = _hwc(self.name, inputs[0])
        out_dtype = _args.resample_dtype(self.name, img.dtype, self.dtype)
        y, x, h, w = self.crop_window(ctx, img.shape[0], img.shape[1])
        out_h, out_w = self.size
        box = (float(x), float(y), float(x + w), float(y + h))
        return resample(img, out_h, out_w, box, self.interp_type, self.antialias, out_dtype)

    #: takes the decoders' pointer-table batches (`_gpu.ptrbatch`) without per-sample views
    accepts_ptr_batch = True

    def run_gpu(
        self, inputs: Sequence[Any], arg_inputs: Mapping[str, Any], ctxs: Sequence[SampleContext], stream: Any
    ) -> Any:
        """One batch on the GPU: each sample's box from `crop_window` (the CPU's draws), resampled
        by the resize kernel in one launch; see `_gpu.ops.random_resized_crop`."""
        from ._gpu import ops

        return ops.random_resized_crop(self, inputs, arg_inputs, ctxs, stream)


def rotate(
    data: Any, *, angle: Any = None, device: str | None = None, keep_size: bool = False,
    size: Any = None, fill_value: Any = None, interp_type: Any = types.INTERP_LINEAR,
    dtype: Any = None, seed: int | None = None, **unsupported: Any,
) -> Any:
    """Rotate images by ``angle`` degrees counter-clockwise (DALI's ``fn.rotate``); ``angle`` and
    ``size`` may be per-sample DataNodes. Only 2-D images: ``axis`` (3-D) is refused."""
    args = dict(angle=angle, keep_size=keep_size, size=size, fill_value=fill_value,
                interp_type=interp_type, dtype=dtype)
    return _args.build(Rotate, (data,), device, seed, unsupported, ("angle", "size"), args)


def random_resized_crop(
    data: Any, *, size: Any = None, device: str | None = None, random_area: Any = (0.08, 1.0),
    random_aspect_ratio: Any = (3 / 4, 4 / 3), num_attempts: int = 10,
    interp_type: Any = types.INTERP_LINEAR, antialias: bool = True, dtype: Any = None,
    seed: int | None = None, **unsupported: Any,
) -> Any:
    """Crop a random area/aspect-ratio box and resize it to ``size`` (DALI's
    ``fn.random_resized_crop``)."""
    args = dict(size=size, random_area=random_area, random_aspect_ratio=random_aspect_ratio,
                num_attempts=num_attempts, interp_type=interp_type, antialias=antialias, dtype=dtype)
    return _args.build(RandomResizedCrop, (data,), device, seed, unsupported, (), args)
