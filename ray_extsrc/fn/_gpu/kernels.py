"""CuPy kernels over whole batches of HWC images of possibly different sizes.

Every kernel reads its samples through a small per-sample table (device pointer, height, width,
row pitch, and the op's per-sample parameters), so a batch of 256 differently sized images is one
launch (grid z = sample). Outputs of equal shape go into one dense batch array.

* `resize`: separable-weight resampling evaluated in 2-D per output pixel, with Pillow's
  geometry (centre-aligned, the op's source box) and Pillow's triangle filter widened by the scale
  when shrinking, i.e. DALI's/Pillow's antialiased linear resize; ``antialias=False`` keeps the
  plain 2x2 bilinear taps. Pillow rounds to uint8 between its horizontal and vertical passes, this
  kernel rounds once at the end: results differ by at most a unit or two (measured in
  tests/gpu/test_gpu_ops.py). Nearest-neighbour uses Pillow's pixel-centre rule.
* `crop_mirror_normalize`: crop window (with out-of-bounds fill), horizontal mirror, per-channel
  ``x * a[c] + b[c]`` in float32, conversion to float32/float16/uint8/int8, CHW or HWC, optional
  channel padding, in one pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

_RESIZE_SRC = r"""
extern "C" __global__ void resize_batch(
    const unsigned long long* __restrict__ ptrs, const int* __restrict__ dims,
    const float* __restrict__ boxes, OUT_T* __restrict__ out,
    const long long* __restrict__ out_offsets, int out_h, int out_w, int C, int mode)
{
    // mode: 0 nearest, 1 linear (plain bilinear taps), 2 linear antialiased (triangle widened)
    const int ox = blockIdx.x * blockDim.x + threadIdx.x;
    const int oy = blockIdx.y * blockDim.y + threadIdx.y;
    const int b = blockIdx.z;
    if (ox >= out_w || oy >= out_h) return;
    const unsigned char* src = (const unsigned char*)ptrs[b];
    const int in_h = dims[3 * b], in_w = dims[3 * b + 1], pitch = dims[3 * b + 2];
    const float x0 = boxes[4 * b], y0 = boxes[4 * b + 1], x1 = boxes[4 * b + 2], y1 = boxes[4 * b + 3];
    const float sx = (x1 - x0) / out_w, sy = (y1 - y0) / out_h;
    const float cx = x0 + (ox + 0.5f) * sx, cy = y0 + (oy + 0.5f) * sy;
    OUT_T* dst = out + out_offsets[b] + ((long long)oy * out_w + ox) * C;
    if (mode == 0) {
        int xi = min(max((int)floorf(cx), 0), in_w - 1);
        int yi = min(max((int)floorf(cy), 0), in_h - 1);
        const unsigned char* p = src + (long long)yi * pitch + xi * C;
        for (int c = 0; c < C; ++c) dst[c] = STORE((float)p[c]);
        return;
    }
    const float fx = (mode == 2) ? fmaxf(sx, 1.0f) : 1.0f;
    const float fy = (mode == 2) ? fmaxf(sy, 1.0f) : 1.0f;
    const float ix = 1.0f / fx, iy = 1.0f / fy;
    int xmin = (int)(cx - fx + 0.5f); if (xmin < 0) xmin = 0;
    int xmax = (int)(cx + fx + 0.5f); if (xmax > in_w) xmax = in_w;
    int ymin = (int)(cy - fy + 0.5f); if (ymin < 0) ymin = 0;
    int ymax = (int)(cy + fy + 0.5f); if (ymax > in_h) ymax = in_h;
    float wsx = 0.f, wsy = 0.f;
    for (int x = xmin; x < xmax; ++x) wsx += fmaxf(0.f, 1.f - fabsf((x - cx + 0.5f) * ix));
    for (int y = ymin; y < ymax; ++y) wsy += fmaxf(0.f, 1.f - fabsf((y - cy + 0.5f) * iy));
    float acc0 = 0.f, acc1 = 0.f, acc2 = 0.f, acc3 = 0.f;
    for (int y = ymin; y < ymax; ++y) {
        const float wy = fmaxf(0.f, 1.f - fabsf((y - cy + 0.5f) * iy));
        if (wy == 0.f) continue;
        const unsigned char* row = src + (long long)y * pitch;
        for (int x = xmin; x < xmax; ++x) {
            const float w = wy * fmaxf(0.f, 1.f - fabsf((x - cx + 0.5f) * ix));
            const unsigned char* p = row + x * C;
            acc0 += w * p[0];
            if (C > 1) acc1 += w * p[1];
            if (C > 2) acc2 += w * p[2];
            if (C > 3) acc3 += w * p[3];
        }
    }
    const float norm = (wsx > 0.f && wsy > 0.f) ? 1.f / (wsx * wsy) : 0.f;
    dst[0] = STORE(acc0 * norm);
    if (C > 1) dst[1] = STORE(acc1 * norm);
    if (C > 2) dst[2] = STORE(acc2 * norm);
    if (C > 3) dst[3] = STORE(acc3 * norm);
}
"""

_CMN_SRC = r"""
extern "C" __global__ void cmn_batch(
    const unsigned long long* __restrict__ ptrs, const int* __restrict__ dims,
    const int* __restrict__ params, const float* __restrict__ coef, const float* __restrict__ fill,
    OUT_T* __restrict__ out, int out_h, int out_w, int C, int out_c, int chw)
{
    // dims: in_h, in_w, pitch; params: crop y, crop x, mirror; coef: a[C], b[C]
    const int ox = blockIdx.x * blockDim.x + threadIdx.x;
    const int oy = blockIdx.y * blockDim.y + threadIdx.y;
    const int b = blockIdx.z;
    if (ox >= out_w || oy >= out_h) return;
    const unsigned char* src = (const unsigned char*)ptrs[b];
    const int in_h = dims[3 * b], in_w = dims[3 * b + 1], pitch = dims[3 * b + 2];
    const int y = params[3 * b] + oy;
    const int x = params[3 * b + 1] + (params[3 * b + 2] ? (out_w - 1 - ox) : ox);
    const bool inside = y >= 0 && y < in_h && x >= 0 && x < in_w;
    const unsigned char* p = src + (long long)y * pitch + (long long)x * C;
    const long long plane = (long long)out_h * out_w;
    OUT_T* base = out + (long long)b * plane * out_c;
    for (int c = 0; c < out_c; ++c) {
        float v = 0.f;
        if (c < C) v = (inside ? (float)p[c] : fill[c]) * coef[c] + coef[C + c];
        const long long idx = chw ? (c * plane + (long long)oy * out_w + ox)
                                  : (((long long)oy * out_w + ox) * out_c + c);
        base[idx] = (c < C) ? STORE(v) : STORE(0.f);
    }
}
"""

_TYPES = {
    "uint8": ("unsigned char", "(unsigned char)fminf(fmaxf(rintf(V), 0.f), 255.f)"),
    "int8": ("signed char", "(signed char)fminf(fmaxf(rintf(V), -128.f), 127.f)"),
    "float32": ("float", "(V)"),
    "float16": ("__half", "__float2half_rn(V)"),
}

_kernels: dict[tuple[str, str], Any] = {}


def _kernel(name: str, out_dtype: np.dtype) -> Any:
    import cupy

    key = (name, np.dtype(out_dtype).name)
    if key not in _kernels:
        if key[1] not in _TYPES:
            raise TypeError(f"no GPU kernel for output type {key[1]}")
        ctype, store = _TYPES[key[1]]
        src = _RESIZE_SRC if name == "resize_batch" else _CMN_SRC
        head = "#include <cuda_fp16.h>\n" if key[1] == "float16" else ""
        head += f"#define OUT_T {ctype}\n#define STORE(V) {store.replace('V', '(V)')}\n"
        _kernels[key] = cupy.RawKernel(head + src, name)
    return _kernels[key]


def hwc_table(images: Any) -> tuple[list[int], np.ndarray, int]:
    """Pointers, ``(h, w, row pitch)`` rows and the channel count of a batch of HWC uint8 images.

    ``images`` is a dense (B, H, W, C) array or a list of (H, W, C) arrays whose pixels are packed
    (row pitch may exceed W*C, as decoders' outputs sometimes do).
    """
    import cupy

    from .ptrbatch import PtrBatch

    if isinstance(images, PtrBatch):
        return images.ptrs, images.dims, images.channels
    if isinstance(images, cupy.ndarray):
        arr = images if images.ndim == 4 else images[..., None]
        arr = _packed_rows(arr, batch=True)
        n, h, w, c = arr.shape
        ptrs = arr.data.ptr + np.arange(n, dtype=np.uint64) * np.uint64(arr.strides[0])
        dims = np.tile(np.array([h, w, arr.strides[1]], np.int32), (n, 1))
        return ptrs, dims, c
    ptrs, rows, chans = [], [], set()
    for a in images:
        a = a if a.ndim == 3 else a[..., None]
        a = _packed_rows(a, batch=False)
        ptrs.append(a.data.ptr)
        rows.append((a.shape[0], a.shape[1], a.strides[0]))
        chans.add(a.shape[2])
    if len(chans) > 1:
        raise ValueError(f"all images of a batch must have the same number of channels; got {sorted(chans)}")
    return ptrs, np.array(rows, np.int32).reshape(-1, 3), chans.pop() if chans else 3


def _packed_rows(a: Any, batch: bool) -> Any:
    import cupy

    c = a.shape[-1]
    ok = a.dtype == np.uint8 and a.strides[-1] == 1 and a.strides[-2] == c and a.strides[-3] > 0
    if batch:
        ok = ok and a.strides[0] > 0
    return a if ok else cupy.ascontiguousarray(a, dtype=np.uint8)


def _grid(out_h: int, out_w: int, n: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    block = (32, 8, 1)
    return ((out_w + 31) // 32, (out_h + 7) // 8, n), block


def _upload_tables(tables: Sequence[np.ndarray], keep: list) -> list:
    """A kernel's small host tables on the device in one upload: packed into one host buffer, each
    at an offset aligned to 16 bytes, and returned as flat views of the one device buffer (each
    table's dtype; the kernels read them flat), which goes into ``keep``. One ``cupy.asarray`` per
    table cost a host->device copy and its Python each, under the GIL the training step waits for."""
    import cupy

    flat = [t.reshape(-1) for t in tables]  # a copy only where a table is not contiguous
    offsets, end = [], 0
    for t in flat:
        offsets.append(end)
        end += -(-t.nbytes // 16) * 16
    host = np.zeros(end, np.uint8)
    for t, off in zip(flat, offsets):
        host[off : off + t.nbytes] = t.view(np.uint8)
    dev = cupy.asarray(host)
    keep.append(dev)  # the views below hold it too; kept as the separate tables were
    return [dev[off : off + t.nbytes].view(t.dtype) for t, off in zip(flat, offsets)]


def resize(
    images: Any, boxes: np.ndarray, out_h: int, out_w: int, mode: int, out_dtype: np.dtype,
    keep: list,
) -> Any:
    """Resize every image's ``box`` (x0, y0, x1, y1) to ``out_h x out_w``: a (B, out_h, out_w, C) array.

    ``keep`` collects the inputs that must stay alive until the kernel ran (the caller holds it).
    """
    import cupy

    ptrs, dims, c = hwc_table(images)
    if c > 4:
        raise ValueError(f"GPU resize handles up to 4 channels; got {c}")
    n = len(ptrs)
    out = cupy.empty((n, out_h, out_w, c), out_dtype)
    offsets = np.arange(n, dtype=np.int64) * (out_h * out_w * c)
    tables = _upload_tables([np.asarray(ptrs, np.uint64), dims, np.asarray(boxes, np.float32), offsets], keep)
    grid, block = _grid(out_h, out_w, n)
    _kernel("resize_batch", out_dtype)(
        grid, block,
        (tables[0], tables[1], tables[2], out, tables[3], np.int32(out_h), np.int32(out_w),
         np.int32(c), np.int32(mode)),
    )
    return out


def crop_mirror_normalize(
    images: Any, windows: np.ndarray, mirror: np.ndarray, a: np.ndarray, b: np.ndarray,
    fill: np.ndarray, out_h: int, out_w: int, out_c: int, chw: bool, out_dtype: np.dtype, keep: list,
) -> Any:
    """Crop ``windows`` (y, x) of size out_h x out_w, mirror, ``x*a+b``: a (B, C', H, W) or (B, H, W, C') array."""
    import cupy

    ptrs, dims, c = hwc_table(images)
    n = len(ptrs)
    shape = (n, out_c, out_h, out_w) if chw else (n, out_h, out_w, out_c)
    out = cupy.empty(shape, out_dtype)
    params = np.concatenate([windows.reshape(n, 2).astype(np.int32), mirror.reshape(n, 1).astype(np.int32)], 1)
    coef = np.concatenate([a.astype(np.float32), b.astype(np.float32)])
    tables = _upload_tables([np.asarray(ptrs, np.uint64), dims, params, coef, np.asarray(fill, np.float32)], keep)
    grid, block = _grid(out_h, out_w, n)
    _kernel("cmn_batch", out_dtype)(
        grid, block,
        (tables[0], tables[1], tables[2], tables[3], tables[4], out, np.int32(out_h), np.int32(out_w),
         np.int32(c), np.int32(out_c), np.int32(1 if chw else 0)),
    )
    return out


def as_samples(batch: Any) -> Sequence[Any]:
    """A dense batch or a list, as a sequence of per-sample arrays (views)."""
    from .ptrbatch import PtrBatch

    if isinstance(batch, PtrBatch):
        return batch.to_list()
    return batch if isinstance(batch, list) else [batch[j] for j in range(batch.shape[0])]
