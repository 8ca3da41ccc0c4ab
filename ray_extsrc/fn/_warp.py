"""`affine_warp`: DALI's affine warp sampling (``fn.rotate``), written once against an array
namespace (``xp``: NumPy on the CPU, CuPy on the GPU), so both devices run the same arithmetic.

DALI maps every *destination* pixel back to the source (its ``map_coords``): the pixel's centre
``(x + 0.5, y + 0.5)`` goes through the 2x3 matrix and the sampler reads the source there, with
source pixel centres at ``i + 0.5`` too:

* nearest neighbour: the pixel ``floor(src)``;
* linear: the four pixels around ``src - 0.5``, weighted by the fractional parts.

A neighbour outside the image is ``fill_value`` when one is given, else the nearest border pixel
(DALI clamps the coordinates when no ``fill_value`` is set). The sum is taken in float32 and
rounded/clamped to the output type.

Every step is one elementwise IEEE operation (float64 coordinates, float32 lerps, a gather), with
no step that a compiler may fuse into an FMA, so the CuPy run gives the NumPy run's bits exactly
(tests/gpu/test_gpu_ops_more.py checks equality).

`saturate` is `_args.saturate` for any array namespace; the colour, normalize and warp code of
both devices uses it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import types
from . import _args

__all__ = ["affine_warp", "affine_warp_batch", "saturate"]


def saturate(xp: Any, values: Any, dt: np.dtype) -> Any:
    """`_args.saturate` with the array module first (NumPy or CuPy), as this module's callers pass it."""
    return _args.saturate(values, dt, xp)


def affine_warp(
    img: np.ndarray, out_h: int, out_w: int, matrix: np.ndarray, interp: types.DALIInterpType,
    fill_value: float | None, out_dtype: np.dtype,
) -> np.ndarray:
    """Warp HWC ``img`` onto an ``out_h x out_w`` canvas; ``matrix`` (2x3) maps destination
    ``(x, y)`` (pixel-centred) to source ``(x, y)``."""
    m = np.asarray(matrix, np.float64).reshape(1, 2, 3)
    return affine_warp_batch(np, img[None], out_h, out_w, m, interp, fill_value, out_dtype)[0]


def affine_warp_batch(
    xp: Any, imgs: Any, out_h: int, out_w: int, matrices: Any, interp: types.DALIInterpType,
    fill_value: float | None, out_dtype: np.dtype,
) -> Any:
    """`affine_warp` of a dense batch ``imgs`` (B, H, W, C) with one 2x3 matrix per sample
    (``matrices``: (B, 2, 3) float64, an ``xp`` array); returns (B, out_h, out_w, C)."""
    n, in_h, in_w, channels = imgs.shape
    if in_h == 0 or in_w == 0:  # nothing to sample: every pixel is outside
        fill = 0.0 if fill_value is None else fill_value
        return saturate(xp, xp.full((n, out_h, out_w, channels), fill, np.float64), out_dtype)
    m = matrices.reshape(n, 6)
    col_of = [m[:, k].reshape(n, 1, 1) for k in range(6)]
    dx = xp.arange(out_w, dtype=np.float64) + 0.5
    dy = xp.arange(out_h, dtype=np.float64)[:, None] + 0.5
    sx = (col_of[0] * dx + col_of[1] * dy + col_of[2]).astype(np.float32)  # (B, out_h, out_w)
    sy = (col_of[3] * dx + col_of[4] * dy + col_of[5]).astype(np.float32)
    # One pixel of border around the image (the fill value, or the edge pixels: clamping), so
    # every coordinate clamped into [-1, extent] reads what DALI's sampler reads there.
    if fill_value is None:
        padded = xp.pad(imgs, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    else:
        padded = xp.empty((n, in_h + 2, in_w + 2, channels), imgs.dtype)
        padded.fill(saturate(np, np.asarray(fill_value, np.float64), imgs.dtype).item())
        padded[:, 1:-1, 1:-1] = imgs
    stride = in_w + 2
    flat = padded.reshape(-1, channels)
    base = (xp.arange(n, dtype=np.intp) * ((in_h + 2) * stride)).reshape(n, 1, 1)

    def col(ix: Any) -> Any:
        return xp.clip(ix, -1, in_w) + 1

    def row(iy: Any) -> Any:
        return (xp.clip(iy, -1, in_h) + 1) * stride + base

    # take along axis 0 is ~15x faster than table[idx] for (N, C) tables (NumPy)
    if interp is types.INTERP_NN:
        idx = row(xp.floor(sy).astype(np.intp)) + col(xp.floor(sx).astype(np.intp))
        out = xp.take(flat, idx, axis=0)
        return out if out.dtype == out_dtype else saturate(xp, out.astype(np.float64), out_dtype)
    sx -= 0.5
    sy -= 0.5
    fx, fy = xp.floor(sx), xp.floor(sy)
    # weights repeated per channel: broadcasting a length-1 last axis makes NumPy's inner loop
    # C elements long (several times slower than same-shape arithmetic)
    qx = xp.repeat((sx - fx)[..., None], channels, axis=3)
    qy = xp.repeat((sy - fy)[..., None], channels, axis=3)
    x0, y0 = fx.astype(np.intp), fy.astype(np.intp)
    c0, c1, r0, r1 = col(x0), col(x0 + 1), row(y0), row(y0 + 1)
    values = flat.astype(np.float32, copy=False)
    top, bottom = xp.take(values, r0 + c0, axis=0), xp.take(values, r1 + c0, axis=0)
    top += (xp.take(values, r0 + c1, axis=0) - top) * qx
    bottom += (xp.take(values, r1 + c1, axis=0) - bottom) * qx
    top += (bottom - top) * qy
    return saturate(xp, top, out_dtype)
