"""Batch-level GPU implementations behind the ops' ``run_gpu`` methods (see `graph` for the contract).

Each function takes the op (for its validated arguments), the batch's inputs (a dense CuPy batch or
a list of CuPy samples), the per-sample argument values (host scalars, from CPU random ops), the
samples' contexts and the pipeline's stream (already current), and returns a dense batch when all
outputs share a shape, else a list. Per-sample geometry is planned on the host with the CPU op's
own helpers (`Sizing.plan`, `CropSpec.window`, `CropMirrorNormalize.coefficients`,
`_normalize.brightness_contrast_affine`), so both paths agree on every box and every value. This
module takes the ops as arguments and never imports the modules that define them.

Ops whose math is plain array code (colour matrices, the rotate warp, normalize, cast) keep it in
one function written against an array namespace, which ``run_cpu`` calls with NumPy and the
functions here with CuPy (``op.apply_batch``, `_warp.affine_warp_batch`, ``op.normalize_batch``,
``op.convert``): one implementation, checked on machines without a GPU by running this module's
glue with NumPy in CuPy's place (tests/test_fn_ops_more.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ...host_batch import Rows
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
    """Each sample's ``mirror`` (the first element of its value) != 0, as int32; a `Rows` column
    from its one array, without per-sample objects."""
    if "mirror" in arg_inputs:
        values = arg_inputs["mirror"]
        if isinstance(values, Rows) and len(values):
            a = values.array
            return (a.reshape(len(a), -1)[:, 0].astype(np.float64) != 0).astype(np.int32)
        return (np.asarray([np.asarray(v).reshape(-1)[0] for v in values], np.float64) != 0).astype(np.int32)
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


# --- ops whose math is written against an array namespace (NumPy on the CPU, CuPy here) ----------
#
# `color_matrix`, `rotate`, `normalize` and `cast` call the very function the CPU op calls, with
# ``xp=cupy``: a dense batch goes through it at once, a list of differently sized samples one
# sample at a time (a batch of one). The host plans each sample first (matrices, canvases,
# statistics' axes) with the op's own methods, so both devices validate and plan identically.


def _is_dense(batch: Any) -> bool:
    import cupy

    return isinstance(batch, cupy.ndarray)


def color_matrix(op: Any, inputs: Sequence[Any], arg_inputs: Mapping, ctxs: Sequence, stream: Any) -> Any:
    """``fn.color_twist`` / ``fn.hsv``: one 3x3 matrix and offset per sample (``op.coefficients``),
    applied by ``op.apply_batch`` (`color.apply_color_matrices`) with CuPy: the CPU's bits."""
    import cupy

    batch = inputs[0]
    samples = kernels.as_samples(batch)
    mats, offs = [], []
    for j, x in enumerate(samples):
        op.check_input(x)
        m, off = op.coefficients(_arg_row(arg_inputs, j), x.dtype)
        mats.append(m)
        offs.append(off)
    if not samples:
        return []
    mats_h = np.asarray(mats, np.float64).astype(np.float32)
    offs_h = np.asarray(offs, np.float64).astype(np.float32)
    if _is_dense(batch):
        return op.apply_batch(cupy, batch, cupy.asarray(mats_h), cupy.asarray(offs_h), op.out_dtype(batch.dtype))
    mats_d, offs_d = cupy.asarray(mats_h), cupy.asarray(offs_h)  # one upload, sliced per sample
    return [
        op.apply_batch(cupy, x[None], mats_d[j : j + 1], offs_d[j : j + 1], op.out_dtype(x.dtype))[0]
        for j, x in enumerate(samples)
    ]


def rotate(op: Any, inputs: Sequence[Any], arg_inputs: Mapping, ctxs: Sequence, stream: Any) -> Any:
    """``fn.rotate``: canvases and matrices planned on the host (``op.plan``), the warp by
    `_warp.affine_warp_batch` with CuPy (the CPU's arithmetic, equal bits). A dense batch whose
    canvases agree is warped at once; otherwise one sample at a time."""
    import cupy

    from .. import _warp

    batch = inputs[0]
    samples = [x if x.ndim == 3 else x[:, :, None] for x in kernels.as_samples(batch)]
    plans = []
    for j, x in enumerate(samples):
        op.check_input(x)
        plans.append(op.plan(int(x.shape[0]), int(x.shape[1]), _arg_row(arg_inputs, j)))
    if not samples:
        return []

    def warp(imgs: Any, rows: Sequence[tuple], out_dtype: np.dtype) -> Any:
        mats = cupy.asarray(np.stack([m for _, _, m in rows]).astype(np.float64))
        h, w = rows[0][0], rows[0][1]
        return _warp.affine_warp_batch(cupy, imgs, h, w, mats, op.interp_type, op.fill_value, out_dtype)

    if _is_dense(batch) and len({(h, w) for h, w, _ in plans}) == 1:
        imgs = batch if batch.ndim == 4 else batch[..., None]
        return warp(imgs, plans, imgs.dtype if op.dtype is None else op.dtype)
    outs = [warp(x[None], [p], x.dtype if op.dtype is None else op.dtype)[0] for x, p in zip(samples, plans)]
    return _dense_if_same(outs) if _is_dense(batch) else outs


def _stack_param(values: list) -> Any:
    """Per-sample mean/stddev values as one batch argument: None, one float for all, or a
    (B, *reduced) host array; ``False`` when they do not stack (then per sample)."""
    if all(v is None for v in values):
        return None
    if all(isinstance(v, float) for v in values):
        if all(v == values[0] for v in values):
            return values[0]
        return np.asarray(values, np.float64)  # reshaped by the caller
    if all(isinstance(v, np.ndarray) for v in values) and len({v.shape for v in values}) == 1:
        return np.stack(values)
    return False


def normalize(op: Any, inputs: Sequence[Any], arg_inputs: Mapping, ctxs: Sequence, stream: Any) -> Any:
    """``fn.normalize``: ``op.plan`` per sample on the host (axes, given mean/stddev, the CPU's
    checks), then ``op.normalize_batch`` with CuPy (float64 reductions, another summation order
    than NumPy's: float32 results may differ in the last bit)."""
    import cupy

    batch = inputs[0]
    samples = kernels.as_samples(batch)
    plans = []
    for j, x in enumerate(samples):
        op.check_input(x)
        plans.append(op.plan(tuple(x.shape), _arg_row(arg_inputs, j)))
    if not samples:
        return []
    if _is_dense(batch) and len({axes for _, _, axes in plans}) == 1:
        axes = plans[0][2]
        params = []
        for k in (0, 1):
            p = _stack_param([pl[k] for pl in plans])
            if isinstance(p, np.ndarray) and p.ndim == 1:  # one float per sample
                p = p.reshape((-1,) + (1,) * (batch.ndim - 1))
            params.append(p)
        if all(p is not False for p in params):
            return op.normalize_batch(cupy, batch, params[0], params[1], axes)
    outs = []
    for x, (mean, stddev, axes) in zip(samples, plans):
        one = [None if p is None else p if isinstance(p, float) else p[None] for p in (mean, stddev)]
        outs.append(op.normalize_batch(cupy, x[None], one[0], one[1], axes)[0])
    return _dense_if_same(outs) if _is_dense(batch) else outs


def cast(op: Any, inputs: Sequence[Any], arg_inputs: Mapping, ctxs: Sequence, stream: Any) -> Any:
    """``fn.cast``: ``op.convert`` (`tensor.saturate_cast`) with CuPy; elementwise, so a dense
    batch converts at once."""
    import cupy

    batch = inputs[0]
    if _is_dense(batch):
        return cupy.ascontiguousarray(op.convert(op.check_input(batch), op.dtype, xp=cupy))
    return [cupy.ascontiguousarray(op.convert(op.check_input(x), op.dtype, xp=cupy)) for x in batch]


def transpose(op: Any, inputs: Sequence[Any], arg_inputs: Mapping, ctxs: Sequence, stream: Any) -> Any:
    """``fn.transpose``: one contiguous copy of the permuted view (the batch axis stays first)."""
    import cupy

    batch = inputs[0]
    if _is_dense(batch):
        op.check_input(batch[0] if batch.shape[0] else batch.reshape(batch.shape[1:]))
        return cupy.ascontiguousarray(cupy.transpose(batch, (0, *(p + 1 for p in op.perm))))
    return [cupy.ascontiguousarray(cupy.transpose(op.check_input(x), op.perm)) for x in batch]


# --- random_resized_crop: the resize kernel over per-sample boxes -------------------------------


def random_resized_crop(op: Any, inputs: Sequence[Any], arg_inputs: Mapping, ctxs: Sequence, stream: Any) -> Any:
    """Boxes from ``op.crop_window`` (the CPU's draws, from each image's size), resampled to
    ``op.size`` by `kernels.resize` in one launch (a pointer batch from the decoder is read as is).

    As the CPU path (`_resize.resample`): antialiased linear (Pillow's triangle filter widened when
    shrinking) unless ``antialias=False`` and the box shrinks on both axes, which takes plain
    bilinear taps (Pillow's affine transform there); those samples go in a second launch.
    Cubic/Lanczos, nearest (see the comment below), inputs other than uint8 and outputs other than
    uint8/float32 run the CPU implementation per sample (the kernel has neither those filters nor
    those types).
    """
    import cupy

    batch = inputs[0]
    if isinstance(batch, PtrBatch):
        dims, channels, images = batch.dims, batch.channels, batch
    else:
        images = batch
        samples = kernels.as_samples(batch)
        dims = np.array([_shape_hw(x) for x in samples], np.int32).reshape(-1, 2)
        ok = all(x.dtype == np.uint8 and x.ndim in (2, 3) for x in samples)
        channels = (samples[0].shape[2] if samples[0].ndim == 3 else 1) if samples else 3
        if not ok or len({(x.shape[2] if x.ndim == 3 else 1) for x in samples}) > 1:
            return _dense_if_same(_cpu_fallback(op, samples, arg_inputs, ctxs))
    n = len(dims)
    if n == 0:
        return []
    out_dtype = _args.resample_dtype(op.name, np.dtype(np.uint8), op.dtype)
    mode = _MODES.get(getattr(op.interp_type, "name", str(op.interp_type)))
    # Nearest neighbour runs the CPU implementation too: the kernel's nearest taps disagreed with
    # Pillow's on whole rows of some crops (an H200 run, 2026-12-02: 3 of 16 samples, ~12% of
    # pixels off by a neighbour's value), so until that rounding is matched it is not used here.
    if mode is None or mode == 0 or out_dtype.name not in ("uint8", "float32") or channels > 4:
        samples = kernels.as_samples(batch)  # cubic / lanczos / nearest: see the docstring
        return _dense_if_same(_cpu_fallback(op, samples, arg_inputs, ctxs))
    boxes = np.empty((n, 4), np.float32)
    out_h, out_w = op.size
    plain = np.zeros(n, bool)
    for j in range(n):
        y, x, h, w = op.crop_window(ctxs[j], int(dims[j, 0]), int(dims[j, 1]))
        boxes[j] = (x, y, x + w, y + h)
        # `_resize.resample`: plain taps only without antialias, for linear, when both axes shrink
        plain[j] = mode == 1 and not op.antialias and w / out_w >= 1 and h / out_h >= 1
    keep: list = []
    if mode == 0 or not plain.any() or plain.all():
        m = mode if mode == 0 else (1 if plain.all() else 2)
        return kernels.resize(images, boxes, out_h, out_w, m, out_dtype, keep)
    out = cupy.empty((n, out_h, out_w, channels), out_dtype)
    samples = kernels.as_samples(batch)
    for m, sel in ((1, np.flatnonzero(plain)), (2, np.flatnonzero(~plain))):
        part = kernels.resize([samples[j] for j in sel.tolist()], boxes[sel], out_h, out_w, m, out_dtype, keep)
        out[cupy.asarray(sel)] = part
    return out


# --- region decoders: crop the decoded batch ------------------------------------------------------


def image_sizes(decoded: Any) -> list[tuple[int, int]]:
    """``(h, w)`` of each image of a decoder's output (a `PtrBatch` or a list of HWC arrays)."""
    if isinstance(decoded, PtrBatch):
        return [(int(h), int(w)) for h, w in decoded.dims[:, :2].tolist()]
    return [_shape_hw(x) for x in decoded]


def crop_decoded(decoded: Any, windows: Sequence[tuple[int, int, int, int]]) -> Any:
    """Cut ``(y, x, h, w)`` windows (inside their images) from a decoder's output, without a copy:
    a `PtrBatch` gets moved pointers (the full image's row pitch, the same owners), a list views."""
    if isinstance(decoded, PtrBatch):
        win = np.asarray(windows, np.int64).reshape(-1, 4)
        pitch = decoded.dims[:, 2].astype(np.int64)
        offsets = (win[:, 0] * pitch + win[:, 1] * decoded.channels).astype(np.uint64)
        dims = np.stack([win[:, 2], win[:, 3], pitch], 1)
        return PtrBatch(decoded.ptrs + offsets, dims, decoded.channels, decoded.owners)
    return [img[y : y + h, x : x + w] for img, (y, x, h, w) in zip(decoded, windows)]
