"""``decoders.image`` / ``decoders.image_random_crop`` on the GPU, through nvImageCodec.

One persistent `nvimgcodec.Decoder` per device and process, with its default backends (the
hardware JPEG engine where the GPU has one, plus the CUDA/hybrid decoder), decodes the whole batch
in one call on the pipeline's stream. Decode parameters do *not* apply EXIF orientation, because
the CPU path (libjpeg-turbo) ignores it too; ``:fancy_upsampling=1`` asks nvJPEG for the same
chroma upsampling libjpeg-turbo does by default, which keeps the two paths within a pixel or two.

Random-crop decoding reads each image's size from its header (nvImageCodec's parse of the code
stream), computes the op's box with the CPU op's own `crop_window` (same generator, same draws),
and asks for that region only (a sub code stream with a `Region`): the hybrid decoder then skips
the rest of the image, the hardware engine decodes it whole and crops.

Fallbacks, per sample, never for the whole batch: data that is not a baseline/progressive JPEG
(PNG, BMP, ...), a JPEG that does not end with its EOI marker (truncated, or with trailing
bytes), an output type other than RGB, a code stream nvImageCodec cannot parse, or a
sample it fails to decode go through the op's CPU implementation, whose result is copied to the
GPU. A sample the CPU cannot decode either raises the CPU path's `DecodeError` naming it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from ... import types
from ...graph import SampleContext
from .ptrbatch import PREP_ARG, PtrBatch

__all__ = ["decode_batch", "decoder_for", "PREP_ARG"]

_lock = threading.Lock()
_decoders: dict[int, tuple[Any, Any]] = {}

#: Extra nvImageCodec decoder options (space-separated, nvImageCodec's format); the default asks
#: for libjpeg-turbo's chroma upsampling.
OPTIONS_ENV = "RAY_EXTSRC_NVIMGCODEC_OPTIONS"


def decoder_for(device_id: int) -> tuple[Any, Any]:
    """``(Decoder, DecodeParams)`` for ``device_id``, made once per process."""
    with _lock:
        if device_id not in _decoders:
            from nvidia import nvimgcodec

            options = os.environ.get(OPTIONS_ENV, ":fancy_upsampling=1")
            threads = int(os.environ.get("RAY_EXTSRC_NVIMGCODEC_THREADS", "0"))
            try:
                dec = nvimgcodec.Decoder(device_id=device_id, max_num_cpu_threads=threads, options=options)
            except Exception:  # an option this version does not know: keep the defaults
                dec = nvimgcodec.Decoder(device_id=device_id, max_num_cpu_threads=threads)
            params = nvimgcodec.DecodeParams(apply_exif_orientation=False)
            _decoders[device_id] = (dec, params)
        return _decoders[device_id]


#: Host-side time of the last batches, by stage (seconds, cumulative): read by the benchmark.
STATS: dict[str, float] = {"prepare_s": 0.0, "decode_wait_s": 0.0, "fallback_s": 0.0, "batches": 0}

_pool_lock = threading.Lock()
_pool: Any = None


def _decode_thread() -> Any:
    """One background thread per process that runs nvImageCodec's blocking ``decode`` calls."""
    global _pool
    with _pool_lock:
        if _pool is None:
            from concurrent.futures import ThreadPoolExecutor

            _pool = ThreadPoolExecutor(1, thread_name_prefix="ray_extsrc-nvimgcodec")
        return _pool


def decode_batch(
    op: Any,
    inputs: Sequence[np.ndarray],
    ctxs: Sequence[SampleContext],
    stream: Any,
    random_crop: bool,
    prep: Sequence[np.ndarray] | None = None,
) -> Any:
    """Decode a batch; with the workers' ``prep`` rows, through `_decode_prepared` (fast path)."""
    if prep is not None and os.environ.get("RAY_EXTSRC_GPU_ROI", "0") == "0":
        return _decode_prepared(op, inputs, ctxs, stream, np.stack(prep))
    return _decode_each(op, inputs, ctxs, stream, random_crop)


def _decode_prepared(op: Any, inputs: Sequence[np.ndarray], ctxs: Sequence[SampleContext], stream: Any,
                     prep: np.ndarray) -> PtrBatch:
    """The fast path: the workers already parsed headers and drew crop boxes (``prep`` rows
    ``[y, x, h, w, H, W, ok]``), so the host does no per-sample work beyond one list: whole
    images are decoded in one call (measured faster than region decode with nvImageCodec 0.9 on
    an H100: hardware engine decodes whole images anyway), and each crop is a pointer into its
    image (`PtrBatch`) that the next kernel reads with the image's row pitch.
    """
    import time

    import cupy
    from nvidia import nvimgcodec

    t0 = time.perf_counter()
    n = len(inputs)
    ok = np.flatnonzero(prep[:, 6] == 1)
    dec, params = decoder_for(cupy.cuda.Device().id)
    data = [inputs[j] for j in ok]
    try:
        images = _decode_thread().submit(dec.decode, data, params=params, cuda_stream=stream.ptr).result()
    except TypeError:  # a version that only takes code streams
        data = [nvimgcodec.CodeStream(np.ascontiguousarray(a)) for a in data]
        images = _decode_thread().submit(dec.decode, data, params=params, cuda_stream=stream.ptr).result()
    t1 = time.perf_counter()
    ptrs = np.zeros(n, np.uint64)
    dims = np.zeros((n, 3), np.int32)
    done = np.zeros(n, bool)
    owners: list = []
    for j, img in zip(ok.tolist(), images):
        if img is None:
            continue
        cai = img.__cuda_array_interface__
        shape = cai["shape"]
        if len(shape) != 3 or shape[2] != 3 or shape[0] != prep[j, 4] or shape[1] != prep[j, 5]:
            continue  # not what the header promised: the CPU decoder judges it
        pitch = cai["strides"][0] if cai.get("strides") else shape[1] * 3
        y, x, h, w = prep[j, :4].tolist()
        ptrs[j] = cai["data"][0] + y * pitch + x * 3
        dims[j] = (h, w, pitch)
        done[j] = True
        owners.append(img)
    for j in np.flatnonzero(~done).tolist():  # see "Fallbacks" in the module docstring
        arr = cupy.ascontiguousarray(cupy.asarray(op.run_cpu([inputs[j]], {}, ctxs[j])))
        ptrs[j] = arr.data.ptr
        dims[j] = (arr.shape[0], arr.shape[1], arr.strides[0])
        owners.append(arr)
    # nvImageCodec frees an image's memory when its object dies, maybe synchronously: keep this
    # batch's images until three batches later (two compute at once), when the stream is past them.
    op._gpu_keep = [owners] + getattr(op, "_gpu_keep", [])[:2]
    STATS["decode_wait_s"] += t1 - t0
    STATS["fallback_s"] += time.perf_counter() - t1
    STATS["batches"] += 1
    return PtrBatch(ptrs, dims, 3, owners)


def _decode_each(
    op: Any,
    inputs: Sequence[np.ndarray],
    ctxs: Sequence[SampleContext],
    stream: Any,
    random_crop: bool,
) -> list:
    """Decode (a random crop of) each encoded sample to an HWC uint8 CuPy array on ``stream``.

    The batch can go to nvImageCodec in chunks (``RAY_EXTSRC_DECODE_CHUNK`` samples): while one
    chunk decodes in a background thread, this thread parses the next chunk's headers and draws its
    crop boxes. Measured on an H100 (R1, 2026-11-25), chunks of 128 were no faster than one call per
    batch (the default, 256), so by default the thread only moves the call off the GIL holder.
    With ``RAY_EXTSRC_GPU_ROI=0`` the whole image is decoded and the crop is a view.
    """
    import time

    import cupy
    from nvidia import nvimgcodec

    from .. import _codec

    t0 = time.perf_counter()
    n = len(inputs)
    out: list[Any] = [None] * n
    use_roi = os.environ.get("RAY_EXTSRC_GPU_ROI", "1") != "0"
    chunk = max(1, int(os.environ.get("RAY_EXTSRC_DECODE_CHUNK", "256")))
    dec, params = decoder_for(cupy.cuda.Device().id)
    pool = _decode_thread()
    pending: list[tuple[Any, list[int], list]] = []
    streams: list = []
    where: list[int] = []
    views: list = []  # (y, x, h, w) to cut from a full decode, when not using ROI

    def submit() -> None:
        if streams:
            fut = pool.submit(dec.decode, list(streams), params=params, cuda_stream=stream.ptr)
            pending.append((fut, list(where), list(views)))
            streams.clear(), where.clear(), views.clear()

    for j, (raw, ctx) in enumerate(zip(inputs, ctxs)):
        data = _codec.as_bytes(op.name, raw, ctx)
        if op.output_type is not types.RGB or not _codec.is_complete_jpeg(data):
            continue  # CPU fallback below
        try:
            cs = nvimgcodec.CodeStream(data)
            box = None
            if random_crop:
                y, x, h, w = op.crop_window(ctx, cs.height, cs.width)
                if (h, w) != (cs.height, cs.width):
                    if use_roi:
                        cs = cs.get_sub_code_stream(image_idx=0, region=nvimgcodec.Region(y, x, y + h, x + w))
                    else:
                        box = (y, x, h, w)
        except Exception:
            continue  # nvImageCodec cannot parse it: let the CPU decoder judge (and name) it
        streams.append(cs)
        where.append(j)
        views.append(box)
        if len(streams) >= chunk:
            submit()
    submit()
    t1 = time.perf_counter()
    for fut, idx, boxes in pending:
        images = fut.result()
        for j, img, box in zip(idx, images, boxes):
            if img is not None:
                arr = _as_cupy(img)
                if box is not None:
                    y, x, h, w = box
                    arr = arr[y : y + h, x : x + w]
                out[j] = arr
    t2 = time.perf_counter()
    for j in range(n):
        if out[j] is None:  # see "Fallbacks" above
            host = op.run_cpu([inputs[j]], {}, ctxs[j])
            out[j] = cupy.asarray(host)
    STATS["prepare_s"] += t1 - t0
    STATS["decode_wait_s"] += t2 - t1
    STATS["fallback_s"] += time.perf_counter() - t2
    STATS["batches"] += 1
    return out


def _as_cupy(img: Any) -> Any:
    """The decoded `nvimgcodec.Image` as a CuPy array, zero-copy (it keeps the Image alive)."""
    import cupy

    try:
        arr = cupy.from_dlpack(img)  # ordered after the decoder on the current (= our) stream
    except Exception:
        arr = cupy.asarray(img)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr
