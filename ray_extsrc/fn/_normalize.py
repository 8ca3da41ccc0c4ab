"""The per-pixel kernels of ``fn.crop_mirror_normalize`` and ``fn.brightness_contrast``.

Both are affine maps per channel, ``out = in * a[c] + b[c]``, and both run on the CPU path's hot
loop, so each output is written in one pass where NumPy allows:

* float32 output: ``np.multiply(src, a, out=dst, dtype=float32)`` then an in-place add; reading a
  transposed/mirrored uint8 view directly is faster than making it contiguous first.
* float16 and integer outputs from uint8 input: a 256-entry lookup table per channel already in the
  output type (rounded and clamped), applied with ``np.take``. NumPy's float32 -> float16 cast is
  scalar code (~3x the cost of the whole float32 path on 224x224x3); the table avoids it.

The coefficients of ``fn.brightness_contrast`` (`brightness_contrast_affine`, with the type ranges
`full_range` / `half_range`) live here too, so the CPU op and its GPU twin (`_gpu.ops`) share one
formula without importing each other.
"""

from __future__ import annotations

import numpy as np

from . import _args

_F32 = np.dtype(np.float32)


def full_range(dt: np.dtype) -> float:
    """The largest value of an integer type (255 for uint8); 1.0 for floats."""
    return float(np.iinfo(dt).max) if dt.kind in "iu" else 1.0


def half_range(dt: np.dtype) -> float:
    """Half an integer type's range (128 for uint8, 64 for int8); 0.5 for floats."""
    if dt.kind in "iu":
        return float(1 << (8 * dt.itemsize - (dt.kind == "i") - 1))
    return 0.5


def brightness_contrast_affine(
    brightness: float, brightness_shift: float, contrast: float, contrast_center: float | None,
    in_dtype: np.dtype, out_dtype: np.dtype,
) -> tuple[np.float32, np.float32]:
    """``(multiplier, addend)`` of ``fn.brightness_contrast`` for one sample: ``out = addend +
    multiplier * in`` (float32), DALI's rearrangement of ``brightness_shift * max_out + brightness
    * (center + contrast * (in - center))``; ``contrast_center`` None = half the input's range."""
    center = contrast_center if contrast_center is not None else half_range(in_dtype)
    addend = np.float32(
        brightness_shift * full_range(out_dtype) + brightness * (center - contrast * center)
    )
    return np.float32(brightness * contrast), addend


def affine_lut(a: np.ndarray, b: np.ndarray, out_dtype: np.dtype) -> np.ndarray:
    """``(C, 256)`` table of ``v * a[c] + b[c]`` (computed in float32) in ``out_dtype``."""
    v = np.arange(256, dtype=np.float32)
    table = v[None, :] * a.astype(np.float32)[:, None] + b.astype(np.float32)[:, None]
    return np.ascontiguousarray(_args.saturate(table, out_dtype))


def use_lut(in_dtype: np.dtype, out_dtype: np.dtype) -> bool:
    return in_dtype == np.uint8 and out_dtype != _F32


def affine_chw(
    src: np.ndarray, dst: np.ndarray, a: np.ndarray, b: np.ndarray, lut: np.ndarray | None
) -> None:
    """Write ``src`` (H, W, C view, any strides) into ``dst[:C]`` (C, H, W contiguous planes)."""
    channels = src.shape[2]
    if lut is not None:
        for c in range(channels):
            np.take(lut[c], src[:, :, c], out=dst[c], mode="clip")  # "clip": no index buffering
        return
    if dst.dtype == _F32:
        target = dst[:channels]
        np.multiply(src.transpose(2, 0, 1), a[:, None, None], out=target, dtype=_F32, casting="unsafe")
        np.add(target, b[:, None, None], out=target)
        return
    tmp = np.multiply(src.transpose(2, 0, 1), a[:, None, None], dtype=_F32)
    tmp += b[:, None, None]
    dst[:channels] = _args.saturate(tmp, dst.dtype)


def affine_hwc(
    src: np.ndarray, dst: np.ndarray, a: np.ndarray, b: np.ndarray, lut: np.ndarray | None
) -> None:
    """Write ``src`` (H, W, C view) into ``dst[..., :C]`` (H, W, C' with C' >= C).

    Broadcasting a length-C vector over the last axis makes NumPy loop C elements at a time (5x
    slower), so the pixels are treated as rows of W*C values with W-times tiled coefficients.
    """
    h, w, channels = src.shape
    rows = contiguous_hwc(src).reshape(h, w * channels)
    padded = dst.shape[2] != channels
    target = np.empty((h, w * channels), dst.dtype) if padded else dst.reshape(h, w * channels)
    if lut is not None:
        idx = rows.astype(np.intp)  # one flat take: index = value + 256 * channel
        idx += np.tile(np.arange(channels, dtype=np.intp) * 256, w)
        np.take(lut.reshape(-1), idx, out=target, mode="clip")
    elif dst.dtype == _F32:
        np.multiply(rows, np.tile(a, w), out=target, dtype=_F32, casting="unsafe")
        np.add(target, np.tile(b, w), out=target)
    else:
        tmp = np.multiply(rows, np.tile(a, w), dtype=_F32)
        tmp += np.tile(b, w)
        target[...] = _args.saturate(tmp, dst.dtype)
    if padded:
        dst[:, :, :channels] = target.reshape(h, w, channels)


def contiguous_hwc(x: np.ndarray) -> np.ndarray:
    """``x`` as a C-contiguous array, copying only when needed.

    A horizontally mirrored HWC view (negative W stride, C = 3 bytes per step) makes
    ``np.ascontiguousarray`` crawl (~340 us on 224x224x3); copying one channel plane at a time is
    ~8x faster. Views whose rows are contiguous (crops, vertical flips) copy fast either way.
    """
    if x.flags.c_contiguous:
        return x
    if x.ndim != 3 or x.strides[1] == x.shape[2] * x.itemsize:
        return np.ascontiguousarray(x)
    out = np.empty(x.shape, x.dtype)
    for c in range(x.shape[2]):
        out[:, :, c] = x[:, :, c]
    return out
