"""Batch-level GPU implementations behind the ops' ``run_gpu`` methods (see `graph` for the contract).

Each function takes the op (for its validated arguments), the batch's inputs (a dense CuPy batch or
a list of CuPy samples), the per-sample argument values (host scalars, from CPU random ops), the
samples' contexts and the pipeline's stream (already current), and returns a dense batch when all
outputs share a shape, else a list. Per-sample geometry is planned on the host with the CPU op's
own helpers (`Sizing.plan`, `CropSpec.window`, `CropMirrorNormalize.coefficients`,
`_normalize.brightness_contrast_affine`), so both paths agree on every box and every value. This
module takes the ops as arguments and never imports the modules that define them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .. import _args, _normalize
from . import kernels
from .ptrbatch import PtrBatch

_MODES = {"INTERP_NN": 0, "INTERP_LINEAR": 1, "INTERP_TRIANGULAR": 1}


def _arg_row(arg_inputs: Mapping[str, Sequence[Any]], j: int) -> dict[str, Any]:
    return {k: v[j] for k, v in arg_inputs.items()}


def _shape_hw(a: Any) -> tuple[int, int]:
    return int(a.shape[0]), int(a.shape[1])


def _cpu_fallback(op: Any, samples: Sequence[Any], arg_inputs: Mapping, ctxs: Sequence) -> list:
    import cupy

    return [
        cupy.asarray(op.run_cpu([cupy.asnumpy(x)], _arg_row(arg_inputs, j), ctxs[j]))
        for j, x in enumerate(samples)
    ]


def _dense_if_same(outs: list) -> Any:
    import cupy

    if outs and all(o.shape == outs[0].shape and o.dtype == outs[0].dtype for o in outs):
        return cupy.stack(outs)
    return outs


def _full_box_size(op: Any) -> tuple[int, int] | None:
    """The output size when every sample is resized whole to one integral size (no subpixel box)."""
    size = op.fixed_output_size
    if size is None or not all(float(v).is_integer() for v in op.sizing.values):
        return None
    return size


def resize(op: Any, inputs: Sequence[Any], arg_inputs: Mapping, ctxs: Sequence, stream: Any) -> Any:
    out_dtype = np.dtype(np.uint8) if op.dtype is None else op.dtype
    mode = _MODES.get(getattr(op.interp_type, "name", str(op.interp_type)))
    if isinstance(inputs[0], PtrBatch):
        batch = inputs[0]
        size = _full_box_size(op) if not arg_inputs else None
        if size is not None and mode is not None and out_dtype.name in ("uint8", "float32"):
            # vectorised planning: the box is each whole (cropped) image
            zeros = np.zeros(len(batch), np.float32)
            boxes = np.stack([zeros, zeros, batch.dims[:, 1], batch.dims[:, 0]], 1).astype(np.float32)
            mode = 2 if mode == 1 and op.antialias else mode
            return kernels.resize(batch, boxes, size[0], size[1], mode, out_dtype, [])
        inputs = [batch.to_list()]
    samples = kernels.as_samples(inputs[0])
    uint8_in = all(x.dtype == np.uint8 and x.ndim in (2, 3) for x in samples)
    if mode is None or not uint8_in or out_dtype.name not in ("uint8", "float32"):
        return _dense_if_same(_cpu_fallback(op, samples, arg_inputs, ctxs))  # cubic/lanczos, non-uint8
    if mode == 1 and op.antialias:
        mode = 2
    plans = [op.sizing.plan(op.name, *_shape_hw(x), _arg_row(arg_inputs, j)) for j, x in enumerate(samples)]
    sizes = {(h, w) for h, w, _ in plans}
    keep: list = []
    if len(sizes) == 1:
        (out_h, out_w), = sizes
        boxes = np.array([box for _, _, box in plans], np.float32).reshape(-1, 4)
        return kernels.resize(inputs[0], boxes, out_h, out_w, mode, out_dtype, keep)
    outs = []
    for x, (h, w, box) in zip(samples, plans):
        outs.append(kernels.resize([x], np.array([box], np.float32), h, w, mode, out_dtype, keep)[0])
    return outs


def _mirror_flags(op: Any, arg_inputs: Mapping, n: int) -> np.ndarray:
    if "mirror" in arg_inputs:
        return (np.asarray([np.asarray(v).reshape(-1)[0] for v in arg_inputs["mirror"]], np.float64) != 0).astype(np.int32)
    return np.full(n, int(_args.sample_scalar(op.name, "mirror", op.mirror, {}) != 0), np.int32)


def crop_mirror_normalize(op: Any, inputs: Sequence[Any], arg_inputs: Mapping, ctxs: Sequence, stream: Any) -> Any:
    import cupy

    batch = inputs[0]
    if isinstance(batch, cupy.ndarray) and batch.dtype == np.uint8 and set(arg_inputs) <= {"mirror"}:
        # a dense batch and constant crop arguments: one window for all, mirror flags as one array
        h, w = int(batch.shape[1]), int(batch.shape[2])
        y0, x0, ch, cw = op.crop.window(op.name, h, w, {})
        if y0 >= 0 and x0 >= 0 and y0 + ch <= h and x0 + cw <= w:
            n = int(batch.shape[0])
            channels = int(batch.shape[3]) if batch.ndim == 4 else 1
            a, b, _ = op.coefficients(channels, np.dtype(np.uint8))
            fill = np.broadcast_to(op.crop.fill_for(op.name, np.empty((1, 1, channels), np.uint8)), (channels,))
            out_c = 1 << (channels - 1).bit_length() if op.pad_output else channels
            win = np.tile(np.array([y0, x0], np.int32), (n, 1))
            return kernels.crop_mirror_normalize(
                batch, win, _mirror_flags(op, arg_inputs, n), a, b, fill.astype(np.float32), ch, cw,
                out_c, op.output_layout == "CHW", op.dtype, [],
            )
    samples = kernels.as_samples(batch)
    if not all(x.dtype == np.uint8 for x in samples):
        return _dense_if_same(_cpu_fallback(op, samples, arg_inputs, ctxs))
    windows, mirrors = [], []
    for j, x in enumerate(samples):
        row = _arg_row(arg_inputs, j)
        h, w = _shape_hw(x)
        y0, x0, ch, cw = op.crop.window(op.name, h, w, row)
        if not (y0 >= 0 and x0 >= 0 and y0 + ch <= h and x0 + cw <= w):
            if op.crop.policy == "error":
                op.crop.cut(op.name, np.empty((h, w, 0), np.uint8), (y0, x0, ch, cw))  # raises the CPU error
            if op.crop.policy == "trim_to_shape":
                y1, x1 = min(y0 + ch, h), min(x0 + cw, w)
                y0, x0 = max(y0, 0), max(x0, 0)
                ch, cw = max(0, y1 - y0), max(0, x1 - x0)
        windows.append((y0, x0, ch, cw))
        mirrors.append(_args.sample_scalar(op.name, "mirror", op.mirror, row) != 0)
    channels = samples[0].shape[2] if samples[0].ndim == 3 else 1
    a, b, _ = op.coefficients(channels, np.dtype(np.uint8))
    fill = np.broadcast_to(op.crop.fill_for(op.name, np.empty((1, 1, channels), np.uint8)), (channels,))
    out_c = 1 << (channels - 1).bit_length() if op.pad_output else channels
    chw = op.output_layout == "CHW"
    keep: list = []
    sizes = {(ch, cw) for _, _, ch, cw in windows}
    win = np.array([(y, x) for y, x, _, _ in windows], np.int32).reshape(-1, 2)
    mir = np.array(mirrors, np.int32)
    if len(sizes) == 1:
        (out_h, out_w), = sizes
        return kernels.crop_mirror_normalize(
            inputs[0], win, mir, a, b, fill.astype(np.float32), out_h, out_w, out_c, chw, op.dtype, keep
        )
    return [
        kernels.crop_mirror_normalize(
            [x], win[j : j + 1], mir[j : j + 1], a, b, fill.astype(np.float32),
            windows[j][2], windows[j][3], out_c, chw, op.dtype, keep,
        )[0]
        for j, x in enumerate(samples)
    ]


def brightness_contrast(op: Any, inputs: Sequence[Any], arg_inputs: Mapping, ctxs: Sequence, stream: Any) -> Any:
    import cupy

    batch = inputs[0]
    samples = kernels.as_samples(batch)
    mult, add = [], []
    out_dtype = None
    for j, x in enumerate(samples):
        row = _arg_row(arg_inputs, j)
        out_dtype = x.dtype if op.dtype is None else op.dtype
        bright = _args.sample_scalar(op.name, "brightness", op.brightness, row)
        shift = _args.sample_scalar(op.name, "brightness_shift", op.brightness_shift, row)
        contrast = _args.sample_scalar(op.name, "contrast", op.contrast, row)
        m, a = _normalize.brightness_contrast_affine(bright, shift, contrast, op.contrast_center, x.dtype, out_dtype)
        mult.append(m)
        add.append(a)

    def apply(x: Any, m: Any, a: Any) -> Any:
        v = x.astype(cupy.float32) * m + a
        if out_dtype.kind in "iu":
            info = np.iinfo(out_dtype)
            return cupy.clip(cupy.rint(v), info.min, info.max).astype(out_dtype)
        return v.astype(out_dtype)

    if isinstance(batch, cupy.ndarray):
        shape = (-1,) + (1,) * (batch.ndim - 1)
        m = cupy.asarray(np.array(mult, np.float32)).reshape(shape)
        a = cupy.asarray(np.array(add, np.float32)).reshape(shape)
        return apply(batch, m, a)
    return [apply(x, mult[j], add[j]) for j, x in enumerate(samples)]


def flip(op: Any, inputs: Sequence[Any], arg_inputs: Mapping, ctxs: Sequence, stream: Any) -> Any:
    import cupy

    batch = inputs[0]
    samples = kernels.as_samples(batch)
    outs = []
    for j, x in enumerate(samples):
        row = _arg_row(arg_inputs, j)
        img = x if x.ndim == 3 else x[:, :, None]
        if _args.sample_scalar(op.name, "horizontal", op.horizontal, row) != 0:
            img = img[:, ::-1]
        if _args.sample_scalar(op.name, "vertical", op.vertical, row) != 0:
            img = img[::-1]
        outs.append(cupy.ascontiguousarray(img))
    return _dense_if_same(outs) if isinstance(batch, cupy.ndarray) else outs


def crop(op: Any, inputs: Sequence[Any], arg_inputs: Mapping, ctxs: Sequence, stream: Any) -> Any:
    import cupy

    samples = kernels.as_samples(inputs[0])
    outs = []
    for j, x in enumerate(samples):
        img = x if x.ndim == 3 else x[:, :, None]
        h, w = _shape_hw(img)
        y, x0, ch, cw = op.crop.window(op.name, h, w, _arg_row(arg_inputs, j))
        if y >= 0 and x0 >= 0 and y + ch <= h and x0 + cw <= w:
            outs.append(cupy.ascontiguousarray(img[y : y + ch, x0 : x0 + cw]))
            continue
        if op.crop.policy == "error":
            op.crop.cut(op.name, np.empty((h, w, 0), np.uint8), (y, x0, ch, cw))  # raises the CPU error
        ya, xa, yb, xb = max(y, 0), max(x0, 0), min(y + ch, h), min(x0 + cw, w)
        if op.crop.policy == "trim_to_shape":
            outs.append(cupy.ascontiguousarray(img[ya:max(ya, yb), xa:max(xa, xb)]))
            continue
        fill = op.crop.fill_for(op.name, np.empty((1, 1, img.shape[2]), img.dtype))
        out = cupy.empty((ch, cw, img.shape[2]), img.dtype)
        out[...] = cupy.asarray(np.broadcast_to(fill, (img.shape[2],)))
        if yb > ya and xb > xa:
            out[ya - y : yb - y, xa - x0 : xb - x0] = img[ya:yb, xa:xb]
        outs.append(out)
    return _dense_if_same(outs)
