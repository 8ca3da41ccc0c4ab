"""Image ops on HWC arrays: ``fn.resize``, ``fn.crop``, ``fn.flip``, ``fn.crop_mirror_normalize``,
``fn.brightness_contrast``, with DALI's names, defaults and formulas.

Each op computes one sample in ``run_cpu`` and returns a C-contiguous array; the GPU path adds
``run_gpu`` on the same classes. Arguments that DALI accepts per sample may be given as DataNodes
(e.g. ``mirror=fn.random.coin_flip()``); they arrive in ``arg_inputs``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .. import types
from ..graph import DataNode, Operator, SampleContext
from . import _args, _normalize
from ._args import PER_SAMPLE
from ._resize import Sizing, resample
from ._crop_spec import CropSpec

__all__ = [
    "resize", "crop", "flip", "crop_mirror_normalize", "brightness_contrast",
    "Resize", "Crop", "Flip", "CropMirrorNormalize", "BrightnessContrast",
]


def _hwc(op: str, x: np.ndarray) -> np.ndarray:
    """The sample as HWC; a 2-D array is taken as HxWx1 (and the op's output is then HWC)."""
    x = np.asarray(x)
    if x.ndim == 2:
        return x[:, :, None]
    if x.ndim != 3:
        raise ValueError(f"fn.{op}: expected an HWC image; got an array of shape {x.shape}")
    return x


class Resize(Operator):
    """``fn.resize``: see `_resize` for DALI's sizing rules."""

    name = "resize"

    def __init__(
        self, device: str = "cpu", seed: int | None = None, *, resize_x: Any = None,
        resize_y: Any = None, size: Any = None, resize_shorter: Any = None,
        resize_longer: Any = None, mode: str | None = None, max_size: Any = None,
        subpixel_scale: bool = True, interp_type: Any = types.INTERP_LINEAR,
        antialias: bool = True, dtype: Any = None,
    ) -> None:
        super().__init__(device, seed)
        self.sizing = Sizing.parse(
            self.name, resize_x, resize_y, size, resize_shorter, resize_longer, mode, max_size,
            subpixel_scale,
        )
        self.interp_type = _args.enum_value(self.name, "interp_type", interp_type, types.DALIInterpType)
        self.antialias = _args.boolean(self.name, "antialias", antialias)
        self.dtype = None if dtype is None else _args.dtype(self.name, "dtype", dtype)

    @property
    def fixed_output_size(self) -> tuple[int, int] | None:
        """``(h, w)`` when every output has that size whatever the input, else None.

        The pipeline uses it to let a random-crop decoder decode at reduced scale.
        """
        s = self.sizing
        if s.method not in ("xy", "size") or s.mode not in ("default", "stretch") or s.max_size:
            return None
        if len(s.values) != 2 or any(v is None or v is PER_SAMPLE or v <= 0 for v in s.values):
            return None
        h, w = (max(1, _args.round_half_away(v)) for v in s.values)
        return h, w

    def run_cpu(
        self, inputs: Sequence[np.ndarray], arg_inputs: Mapping[str, np.ndarray], ctx: SampleContext
    ) -> np.ndarray:
        img = _hwc(self.name, inputs[0])
        out_dtype = _args.resample_dtype(self.name, img.dtype, self.dtype)
        out_h, out_w, box = self.sizing.plan(self.name, img.shape[0], img.shape[1], arg_inputs)
        return resample(img, out_h, out_w, box, self.interp_type, self.antialias, out_dtype)

    #: takes the decoders' pointer-table batches (`_gpu.ptrbatch`) without per-sample views
    accepts_ptr_batch = True

    def run_gpu(
        self, inputs: Sequence[Any], arg_inputs: Mapping[str, Any], ctxs: Sequence[SampleContext], stream: Any
    ) -> Any:
        """One batch on the GPU (CuPy), see `_gpu.ops.resize`."""
        from ._gpu import ops

        return ops.resize(self, inputs, arg_inputs, ctxs, stream)


class Crop(Operator):
    """``fn.crop``: a fixed-size window at a relative position, see `_crop_spec`."""

    name = "crop"

    def __init__(
        self, device: str = "cpu", seed: int | None = None, *, crop: Any = None, crop_h: Any = None,
        crop_w: Any = None, crop_pos_x: Any = 0.5, crop_pos_y: Any = 0.5,
        out_of_bounds_policy: str = "error", fill_values: Any = 0,
    ) -> None:
        super().__init__(device, seed)
        self.crop = CropSpec.parse(
            self.name, crop, crop_h, crop_w, crop_pos_x, crop_pos_y, out_of_bounds_policy, fill_values
        )

    def run_cpu(
        self, inputs: Sequence[np.ndarray], arg_inputs: Mapping[str, np.ndarray], ctx: SampleContext
    ) -> np.ndarray:
        img = _hwc(self.name, inputs[0])
        window = self.crop.window(self.name, img.shape[0], img.shape[1], arg_inputs)
        return _normalize.contiguous_hwc(self.crop.cut(self.name, img, window))

    def run_gpu(
        self, inputs: Sequence[Any], arg_inputs: Mapping[str, Any], ctxs: Sequence[SampleContext], stream: Any
    ) -> Any:
        """One batch on the GPU (CuPy), see `_gpu.ops.crop`."""
        from ._gpu import ops

        return ops.crop(self, inputs, arg_inputs, ctxs, stream)


class Flip(Operator):
    """``fn.flip``: mirror horizontally and/or vertically (non-zero = flip)."""

    name = "flip"

    def __init__(
        self, device: str = "cpu", seed: int | None = None, *, horizontal: Any = 1, vertical: Any = 0
    ) -> None:
        super().__init__(device, seed)
        for name, v in (("horizontal", horizontal), ("vertical", vertical)):
            setattr(self, name, v if v is PER_SAMPLE else _args.flag(self.name, name, v))

    def run_cpu(
        self, inputs: Sequence[np.ndarray], arg_inputs: Mapping[str, np.ndarray], ctx: SampleContext
    ) -> np.ndarray:
        img = _hwc(self.name, inputs[0])
        h = _args.sample_scalar(self.name, "horizontal", self.horizontal, arg_inputs) != 0
        v = _args.sample_scalar(self.name, "vertical", self.vertical, arg_inputs) != 0
        if h:
            img = img[:, ::-1]
        if v:
            img = img[::-1]
        return _normalize.contiguous_hwc(img)  # no copy when nothing was flipped

    def run_gpu(
        self, inputs: Sequence[Any], arg_inputs: Mapping[str, Any], ctxs: Sequence[SampleContext], stream: Any
    ) -> Any:
        """One batch on the GPU (CuPy), see `_gpu.ops.flip`."""
        from ._gpu import ops

        return ops.flip(self, inputs, arg_inputs, ctxs, stream)


class CropMirrorNormalize(Operator):
    """``fn.crop_mirror_normalize``: ``out = (in - mean) / std * scale + shift`` per channel,
    after an optional crop and horizontal mirror, as CHW or HWC in float32/float16/uint8/int8."""

    name = "crop_mirror_normalize"
    _DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.uint8), np.dtype(np.int8))

    def __init__(
        self, device: str = "cpu", seed: int | None = None, *, crop: Any = None, crop_h: Any = None,
        crop_w: Any = None, crop_pos_x: Any = 0.5, crop_pos_y: Any = 0.5, mean: Any = 0.0,
        std: Any = 1.0, mirror: Any = 0, output_layout: str = "CHW", dtype: Any = types.FLOAT,
        scale: float = 1.0, shift: float = 0.0, pad_output: bool = False,
        out_of_bounds_policy: str = "error", fill_values: Any = 0,
    ) -> None:
        super().__init__(device, seed)
        self.crop = CropSpec.parse(
            self.name, crop, crop_h, crop_w, crop_pos_x, crop_pos_y, out_of_bounds_policy, fill_values
        )
        self.mean = np.asarray(_args.numbers(self.name, "mean", mean), np.float64)
        self.std = np.asarray(_args.numbers(self.name, "std", std), np.float64)
        if (self.std == 0).any():
            raise ValueError(f"fn.{self.name}: std must not contain 0; got {std!r}")
        self.scale = _args.number(self.name, "scale", scale)
        self.shift = _args.number(self.name, "shift", shift)
        self.mirror = mirror if mirror is PER_SAMPLE else _args.flag(self.name, "mirror", mirror)
        self.output_layout = _args.choice(self.name, "output_layout", output_layout, ("CHW", "HWC"))
        dtype = types.FLOAT if dtype is None else dtype  # None = DALI's default
        self.dtype = _args.dtype(self.name, "dtype", dtype, self._DTYPES)
        self.pad_output = _args.boolean(self.name, "pad_output", pad_output)
        self._tables: dict[tuple[int, np.dtype], tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}

    def coefficients(
        self, channels: int, in_dtype: np.dtype
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Per-channel float32 ``a = scale/std``, ``b = shift - mean*scale/std``, and the
        `_normalize.affine_lut` table when one applies (else None); cached. Shared with the GPU
        path (`_gpu.ops`), so both normalize with the same numbers."""
        key = (channels, in_dtype)
        if key not in self._tables:
            for name, v in (("mean", self.mean), ("std", self.std)):
                if v.size not in (1, channels):
                    raise ValueError(
                        f"fn.{self.name}: {name} has {v.size} values but the input has "
                        f"{channels} channels"
                    )
            a64 = np.broadcast_to(self.scale / self.std, (channels,))
            b64 = np.broadcast_to(self.shift - self.mean * a64, (channels,))
            a, b = a64.astype(np.float32), b64.astype(np.float32)
            lut = None
            if _normalize.use_lut(in_dtype, self.dtype):
                lut = _normalize.affine_lut(a, b, self.dtype)
            self._tables[key] = (a, b, lut)
        return self._tables[key]

    def run_cpu(
        self, inputs: Sequence[np.ndarray], arg_inputs: Mapping[str, np.ndarray], ctx: SampleContext
    ) -> np.ndarray:
        img = _hwc(self.name, inputs[0])
        window = self.crop.window(self.name, img.shape[0], img.shape[1], arg_inputs)
        src = self.crop.cut(self.name, img, window)
        if _args.sample_scalar(self.name, "mirror", self.mirror, arg_inputs) != 0:
            src = src[:, ::-1]
        h, w, channels = src.shape
        a, b, lut = self.coefficients(channels, src.dtype)
        out_c = 1 << (channels - 1).bit_length() if self.pad_output else channels
        if self.output_layout == "CHW":
            out = np.empty((out_c, h, w), self.dtype)
            _normalize.affine_chw(src, out, a, b, lut)
            if out_c > channels:
                out[channels:] = 0
        else:
            out = np.empty((h, w, out_c), self.dtype)
            _normalize.affine_hwc(src, out, a, b, lut)
            if out_c > channels:
                out[:, :, channels:] = 0
        return out

    def run_gpu(
        self, inputs: Sequence[Any], arg_inputs: Mapping[str, Any], ctxs: Sequence[SampleContext], stream: Any
    ) -> Any:
        """One batch on the GPU (CuPy), see `_gpu.ops.crop_mirror_normalize`."""
        from ._gpu import ops

        return ops.crop_mirror_normalize(self, inputs, arg_inputs, ctxs, stream)


class BrightnessContrast(Operator):
    """``fn.brightness_contrast``: ``out = brightness_shift * max_out + brightness *
    (contrast_center + contrast * (in - contrast_center))``, rounded and clamped to the output type.

    ``max_out`` is the output type's maximum (1.0 for floats); ``contrast_center`` defaults to half
    the input type's range (128 for uint8, 0.5 for floats).
    """

    name = "brightness_contrast"

    def __init__(
        self, device: str = "cpu", seed: int | None = None, *, brightness: Any = 1.0,
        brightness_shift: Any = 0.0, contrast: Any = 1.0, contrast_center: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(device, seed)
        given = {"brightness": brightness, "brightness_shift": brightness_shift, "contrast": contrast}
        for name, v in given.items():
            setattr(self, name, v if v is PER_SAMPLE else _args.number(self.name, name, v))
        self.contrast_center = None if contrast_center is None else _args.number(
            self.name, "contrast_center", contrast_center
        )
        self.dtype = None if dtype is None else _args.dtype(self.name, "dtype", dtype)

    def run_cpu(
        self, inputs: Sequence[np.ndarray], arg_inputs: Mapping[str, np.ndarray], ctx: SampleContext
    ) -> np.ndarray:
        img = np.asarray(inputs[0])
        out_dtype = img.dtype if self.dtype is None else self.dtype
        bright = _args.sample_scalar(self.name, "brightness", self.brightness, arg_inputs)
        shift = _args.sample_scalar(self.name, "brightness_shift", self.brightness_shift, arg_inputs)
        contrast = _args.sample_scalar(self.name, "contrast", self.contrast, arg_inputs)
        multiplier, addend = _normalize.brightness_contrast_affine(
            bright, shift, contrast, self.contrast_center, img.dtype, out_dtype
        )
        if img.dtype == np.uint8:
            lut = _args.saturate(np.arange(256, dtype=np.float32) * multiplier + addend, out_dtype)
            return np.take(lut, img, mode="clip")  # one pass, rounding and clamping done once
        out = img.astype(np.float32) * multiplier
        out += addend
        return _args.saturate(out, out_dtype)

    def run_gpu(
        self, inputs: Sequence[Any], arg_inputs: Mapping[str, Any], ctxs: Sequence[SampleContext], stream: Any
    ) -> Any:
        """One batch on the GPU (CuPy), see `_gpu.ops.brightness_contrast`."""
        from ._gpu import ops

        return ops.brightness_contrast(self, inputs, arg_inputs, ctxs, stream)


# --- public functions ----------------------------------------------------------------------------


def resize(
    data: DataNode, *, device: str | None = None, resize_x: Any = None, resize_y: Any = None,
    size: Any = None, resize_shorter: Any = None, resize_longer: Any = None,
    mode: str | None = None, max_size: Any = None, subpixel_scale: bool = True,
    interp_type: Any = types.INTERP_LINEAR, antialias: bool = True, dtype: Any = None,
    seed: int | None = None, **unsupported: Any,
) -> DataNode:
    """Resize images (DALI's ``fn.resize``); ``size`` is ``(height, width)`` like DALI's."""
    args = dict(resize_x=resize_x, resize_y=resize_y, size=size, resize_shorter=resize_shorter,
                resize_longer=resize_longer, mode=mode, max_size=max_size,
                subpixel_scale=subpixel_scale, interp_type=interp_type, antialias=antialias, dtype=dtype)
    per_sample = ("resize_x", "resize_y", "size", "resize_shorter", "resize_longer")
    return _args.build(Resize, (data,), device, seed, unsupported, per_sample, args)


def crop(
    data: DataNode, *, device: str | None = None, crop: Any = None, crop_h: Any = None, crop_w: Any = None,
    crop_pos_x: Any = 0.5, crop_pos_y: Any = 0.5, out_of_bounds_policy: str = "error",
    fill_values: Any = 0, seed: int | None = None, **unsupported: Any,
) -> DataNode:
    """Crop a ``crop = (h, w)`` window at ``crop_pos_x/y`` (DALI's ``fn.crop``)."""
    args = dict(crop=crop, crop_h=crop_h, crop_w=crop_w, crop_pos_x=crop_pos_x,
                crop_pos_y=crop_pos_y, out_of_bounds_policy=out_of_bounds_policy,
                fill_values=fill_values)
    per_sample = ("crop_h", "crop_w", "crop_pos_x", "crop_pos_y")
    return _args.build(Crop, (data,), device, seed, unsupported, per_sample, args)


def flip(
    data: DataNode, *, device: str | None = None, horizontal: Any = 1, vertical: Any = 0,
    seed: int | None = None, **unsupported: Any,
) -> DataNode:
    """Flip images (DALI's ``fn.flip``); ``horizontal``/``vertical`` may be per-sample DataNodes."""
    args = dict(horizontal=horizontal, vertical=vertical)
    return _args.build(Flip, (data,), device, seed, unsupported, ("horizontal", "vertical"), args)


def crop_mirror_normalize(
    data: DataNode, *, device: str | None = None, crop: Any = None, crop_h: Any = None,
    crop_w: Any = None, crop_pos_x: Any = 0.5, crop_pos_y: Any = 0.5, mean: Any = 0.0,
    std: Any = 1.0, mirror: Any = 0, output_layout: str = "CHW", dtype: Any = types.FLOAT,
    scale: float = 1.0, shift: float = 0.0, pad_output: bool = False,
    out_of_bounds_policy: str = "error", fill_values: Any = 0, seed: int | None = None,
    **unsupported: Any,
) -> DataNode:
    """Crop, mirror, normalize and change layout/type in one op (DALI's ``fn.crop_mirror_normalize``)."""
    args = dict(crop=crop, crop_h=crop_h, crop_w=crop_w, crop_pos_x=crop_pos_x,
                crop_pos_y=crop_pos_y, mean=mean, std=std, mirror=mirror,
                output_layout=output_layout, dtype=dtype, scale=scale, shift=shift,
                pad_output=pad_output, out_of_bounds_policy=out_of_bounds_policy,
                fill_values=fill_values)
    per_sample = ("crop_h", "crop_w", "crop_pos_x", "crop_pos_y", "mirror")
    return _args.build(CropMirrorNormalize, (data,), device, seed, unsupported, per_sample, args)


def brightness_contrast(
    data: DataNode, *, device: str | None = None, brightness: Any = 1.0, brightness_shift: Any = 0.0,
    contrast: Any = 1.0, contrast_center: Any = None, dtype: Any = None, seed: int | None = None,
    **unsupported: Any,
) -> DataNode:
    """Adjust brightness and contrast (DALI's ``fn.brightness_contrast``)."""
    args = dict(brightness=brightness, brightness_shift=brightness_shift, contrast=contrast,
                contrast_center=contrast_center, dtype=dtype)
    per_sample = ("brightness", "brightness_shift", "contrast")
    return _args.build(BrightnessContrast, (data,), device, seed, unsupported, per_sample, args)
