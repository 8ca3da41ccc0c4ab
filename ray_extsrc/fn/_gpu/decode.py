"""``decoders.image`` / ``decoders.image_random_crop`` on the GPU, through nvImageCodec.

Every setting comes from the op's `DecoderOptions` (``op.decoder_options``, validated when the
op was built); nothing is read from the environment. Decoding runs in a few threads of the loader
process (``decode_threads``, default 2), each with its own nvImageCodec decoders (``backend``;
by default the hardware JPEG engine where the GPU has one, then the CUDA/hybrid decoders) and its
own CUDA stream (`streams.loader_stream`), so the two batches the pipeline keeps in flight decode
at once; the pipeline's stream waits on an event after each call.
Measured on an H100 (R1, 2026-11-25): one decoder alone 12.6k img/s, two in flight 18.7k; the
loader 7.9k with one thread, 9.3k with two. ``split_share`` splits each batch between a
hardware-only and a hybrid decoder instead (measured slower there: 14.5k decode-only). Decode
parameters do *not* apply EXIF orientation, because the CPU path (libjpeg-turbo) ignores it too;
``:fancy_upsampling=1`` asks nvJPEG for the same chroma upsampling libjpeg-turbo does by default,
which keeps the two paths within a pixel or two.

Random-crop decoding: on the fast path the workers read each image's size from its header and
draw the box with the CPU op's own `crop_window` (same generator, same draws); the whole image is
decoded and the crop is a pointer into it. Without the workers' prep, or with
``use_worker_prep=False`` (`_decode_each`), the host does that, and asks for the region only (a sub
code stream with a `Region`; ``roi=False`` decodes the whole image and views the crop).

Fallbacks, per sample, never for the whole batch: data that is not a baseline/progressive JPEG
(PNG, BMP, ...), a JPEG that does not end with its EOI marker (truncated, or with trailing
bytes), an output type other than RGB, a code stream nvImageCodec cannot parse, or a
sample it fails to decode go through the op's CPU implementation, whose result is copied to the
GPU. A sample the CPU cannot decode either raises the CPU path's `DecodeError` naming it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ... import types
from ...graph import SampleContext
from ..decoder_options import DecoderOptions
from .ptrbatch import PREP_ARG, Held, PtrBatch
from .streams import loader_stream

__all__ = [
    "decode_batch", "batch_enqueued", "retain", "release", "backend_set", "make_decoder", "options_of", "stats_snapshot",
    "STATS", "PREP_ARG", "batch_layout", "buffer_bytes", "warm_up",
]

_DEFAULT_OPTIONS = DecoderOptions()


def options_of(op: Any) -> DecoderOptions:
    """The op's `DecoderOptions` (``op.decoder_options``); the defaults for an op without one."""
    options = getattr(op, "decoder_options", None)
    return _DEFAULT_OPTIONS if options is None else options


def _decoder_key(kind: str, options: DecoderOptions) -> tuple:
    """What makes two decoders of a thread the same: the backend set and its construction arguments."""
    load = options.hw_decoder_load if kind == "hwload" else None
    return kind, load, options.cpu_threads, options.codec_option_text()


def backend_set(kind: str, options: DecoderOptions = _DEFAULT_OPTIONS) -> list[tuple[str, float]] | None:
    """The one table of backend sets: ``kind`` (one of `decoder_options.BACKENDS`) as
    ``[(backend, load hint)]`` ("hw", "cuda", "hybrid"), or None for nvImageCodec's defaults;
    "hwload" gives the hardware engine ``options.hw_decoder_load`` of each batch, the CUDA decoder
    the rest."""
    return {
        "default": None,
        "hw": [("hw", 1.0)],
        "cuda": [("cuda", 1.0)],
        "hybrid": [("hybrid", 1.0)],
        "hwload": [("hw", options.hw_decoder_load), ("cuda", 1.0), ("hybrid", 1.0)],
    }[kind]


def make_decoder(device_id: int, kind: str, options: DecoderOptions = _DEFAULT_OPTIONS) -> Any:
    """A new nvImageCodec (Python API) decoder with the backends `backend_set` gives for ``kind``
    (the benchmark's decode-only runs use it too); ``options`` also gives ``cpu_threads`` and
    `codec_option_text`."""
    from nvidia import nvimgcodec

    K = nvimgcodec.BackendKind
    kinds = {"hw": K.HW_GPU_ONLY, "cuda": K.GPU_ONLY, "hybrid": K.HYBRID_CPU_GPU}
    backends = backend_set(kind, options)
    kw: dict[str, Any] = {"device_id": device_id, "max_num_cpu_threads": options.cpu_threads}
    if backends is not None:
        kw["backends"] = [nvimgcodec.Backend(kinds[k], load_hint=h) for k, h in backends]
    try:
        return nvimgcodec.Decoder(**kw, options=options.codec_option_text())
    except Exception:  # an option this version does not know: keep the defaults
        return nvimgcodec.Decoder(**kw)


def batch_layout(hw: np.ndarray) -> tuple[np.ndarray, int]:
    """Where each decoded image of a batch goes in the batch's one buffer: images of ``hw[j] =
    (h, w)`` as interleaved RGB rows, each on a 256-byte boundary (as cudaMalloc's); returns the
    byte offsets (uint64) and the buffer's size in bytes."""
    sizes = hw[:, 0].astype(np.int64) * hw[:, 1] * 3
    aligned = (sizes + 255) // 256 * 256
    starts = np.zeros(len(sizes), np.uint64)
    np.cumsum(aligned[:-1], out=starts[1:], dtype=np.uint64)
    return starts, int(aligned.sum())


def buffer_bytes(total: int) -> int:
    """The size a batch's decode buffer of ``total`` bytes is allocated at: ``total`` rounded up to
    the next of eight steps per power of two (at most 12.5 % more, and a multiple of 512 bytes,
    CuPy's unit). Batches of one workload differ by a few percent in decoded size (R1: ~160 MB
    each); rounded, they ask the pool for one or two sizes, so a freed buffer fits the next batch
    whole instead of being split into remnants that no later batch fits while the pool grows."""
    if total <= 512:
        return 512
    step = max(512, 1 << (int(total - 1).bit_length() - 4))
    return -(-total // step) * step


_arena_streams: dict[int, Any] = {}


def _arena_stream(device_id: int) -> Any:
    """The stream a device's native-decode buffers are allocated under (a `loader_stream` on which
    no work is ever queued): one CuPy pool arena for every decode thread's buffers.

    CuPy's pool keeps freed memory per stream and hands it out again only to allocations on that
    stream: allocated on each decode thread's own stream, the buffers would fill one cache per
    thread, each at that thread's own peak. These buffers are freed only after the host saw the
    event that follows every read of them (`_keep`; a failed decode call, or a batch dropped before
    `_keep`, first waits for its stream), so reuse from any stream is safe, and one arena holds only
    what the batches in flight need. (Measured on an H100, ResNet-18's consumer-side stage, session
    17: CuPy's pool was 995 MB with and without this in the same call, 1,595 MB without it on
    another machine start: the spread between starts is not this.)"""
    with _lock:
        stream = _arena_streams.get(device_id)
        if stream is None:
            stream = _arena_streams[device_id] = loader_stream(device_id)
        return stream


class _DecodeThreads:
    """Threads that run nvImageCodec's blocking ``decode`` calls off the pipeline's threads.

    Each thread has its own decoders (nvImageCodec decoders are not shared between concurrent
    calls; one per `_decoder_key`) and its own CUDA stream (`loader_stream`), so two calls (two
    batches in flight, or the two halves of a split batch) decode at once, and a decode never
    queues behind the pipeline's kernels. A call returns the images and an event after them; the
    caller's stream waits on that event.
    """

    def __init__(self, device_id: int, threads: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.device_id = device_id
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix=f"ray_extsrc-nvimgcodec{device_id}")
        self.local = threading.local()

    def _local(self) -> Any:
        """This decode thread's stream and decoders (made on its first call; call on the device)."""
        loc = self.local
        if not hasattr(loc, "stream"):
            loc.stream = loader_stream(self.device_id)  # immortal: images may be freed on it later
            loc.decoders = {}
        return loc

    def _run(self, kind: str, options: DecoderOptions, data: list, params: Any,
             reuse: list | None = None) -> tuple[list, Any]:
        import cupy

        with cupy.cuda.Device(self.device_id):
            loc = self._local()
            dec = self._decoder(loc, kind, options, native=False)
            kw: dict[str, Any] = {"params": params, "cuda_stream": loc.stream.ptr}
            if reuse is not None:
                kw["images"] = reuse  # decode into these (their buffers grow if too small)
            try:
                images = dec.decode(data, **kw)
            except TypeError:  # an older version: code streams only, no images= (nothing is pooled)
                from nvidia import nvimgcodec

                if kw.pop("images", None) is not None:
                    _ImagePool.supported = False
                data = [nvimgcodec.CodeStream(np.ascontiguousarray(a)) for a in data]
                images = dec.decode(data, **kw)
            return images, loc.stream.record()

    def _decoder(self, loc: Any, kind: str, options: DecoderOptions, native: bool) -> Any:
        """This thread's decoder for ``kind`` and ``options`` (made now if it has none): a
        `native_decode.NativeDecoder` for the one-call path, else an nvImageCodec Python one."""
        key = ("native", *_decoder_key(kind, options)) if native else _decoder_key(kind, options)
        dec = loc.decoders.get(key)
        if dec is None:
            if native:
                from .native_decode import NativeDecoder

                dec = NativeDecoder(self.device_id, backend_set(kind, options) or [], options.cpu_threads,
                                    options.codec_option_text())
            else:
                dec = make_decoder(self.device_id, kind, options)
            loc.decoders[key] = dec
        return dec

    def warm_up(self, options: DecoderOptions) -> list:
        """Make every thread's stream and the decoders a batch with ``options`` will use, now, in
        the background; returns the futures. Each call waits at a barrier for the others, so that
        each thread makes its own (a thread's first decoder takes seconds: nvImageCodec loads its
        codecs and backends)."""
        import cupy

        n = self.threads
        barrier = threading.Barrier(n, timeout=_WARM_UP_WAIT_S)
        kinds = [options.backend] if options.split_share <= 0.0 else ["hw", options.split_backend]

        def make() -> None:
            try:
                with cupy.cuda.Device(self.device_id):
                    native = options.use_worker_prep and _native_ready(options)
                    loc = self._local()
                    for kind in kinds:
                        self._decoder(loc, kind, options, native)
            except BaseException:
                barrier.abort()  # the others stop waiting; the first batch meets (and raises) this again
                raise
            try:
                barrier.wait()
            except threading.BrokenBarrierError:  # a thread busy elsewhere: it makes its own when it decodes
                pass

        return [self.pool.submit(make) for _ in range(n)]

    def submit(self, kind: str, options: DecoderOptions, data: list, params: Any, reuse: list | None = None) -> Any:
        return self.pool.submit(self._run, kind, options, data, params, reuse)

    def _run_native(self, kind: str, options: DecoderOptions, src: np.ndarray, lengths: np.ndarray,
                    hw: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray, Any]:
        """`native_decode`: the batch decoded into one buffer from the device's decode-buffer
        arena (`_arena_stream`, `buffer_bytes`); returns the buffer, each image's address in it,
        the per-sample results and an event after the decode."""
        import cupy

        with cupy.cuda.Device(self.device_id):
            loc = self._local()
            dec = self._decoder(loc, kind, options, native=True)
            starts, total = batch_layout(hw)
            with _arena_stream(self.device_id):
                buf = cupy.empty(buffer_bytes(total), np.uint8)
            dst = np.uint64(buf.data.ptr) + starts
            try:
                result = dec.decode(src, lengths, dst, hw, loc.stream.ptr)  # GIL released in the call
            except BaseException:
                loc.stream.synchronize()  # whatever was queued is done before ``buf`` can be reused
                raise
            return buf, dst, result, loc.stream.record()

    def submit_native(self, kind: str, options: DecoderOptions, src: np.ndarray, lengths: np.ndarray,
                      hw: np.ndarray) -> Any:
        return self.pool.submit(self._run_native, kind, options, src, lengths, hw)


class _ImagePool:
    """Decoded images of one device kept to decode later batches into (`DecoderOptions.reuse_images`).

    nvImageCodec makes a Python ``Image`` and allocates its buffer for every output image, and frees
    both when the object dies: 256 objects made and destroyed per batch, with the GIL held, which
    a training step in the same process waits for (the CUDA calls themselves were measured not to
    slow the step: see the probe's interference phase). Its ``decode(..., images=...)`` (0.9)
    decodes into given images instead, growing a buffer only when the new image does not fit. A batch's images come back here from `_prune`, once the
    batch's last kernel is done and if no view of them left the batch (`ptrbatch.Held`); a batch
    takes the largest free images, largest to the largest sample, so buffers settle at the
    largest sizes and rarely grow. Beyond ``limit`` free images the smallest are let go.
    """

    #: False once the installed nvImageCodec refused ``images=`` (then nothing is pooled)
    supported = True

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lock = threading.Lock()
        self.free: list[tuple[int, Any]] = []  # (capacity in bytes, image)
        self.taken = self.missed = 0  # batches decoded into pooled images / with new ones

    def take(self, nbytes: Sequence[int]) -> list | None:
        """Images for samples of ``nbytes`` bytes each (same order), or None if too few are free."""
        n = len(nbytes)
        with self.lock:
            if not self.supported or n == 0 or len(self.free) < n:
                self.missed += 1
                return None
            self.free.sort(key=lambda t: t[0])
            got = self.free[-n:]
            del self.free[-n:]
            self.taken += 1
        out: list = [None] * n
        for (_, img), j in zip(got, np.argsort(np.asarray(nbytes), kind="stable").tolist()):
            out[j] = img
        return out

    def give_back(self, images: Sequence[Any]) -> None:
        with self.lock:
            self.free.extend((int(getattr(img, "capacity", 0) or 0), img) for img in images)
            if len(self.free) > self.limit:
                self.free.sort(key=lambda t: t[0])
                del self.free[: len(self.free) - self.limit]


_WARM_UP_WAIT_S = 30.0  # `_DecodeThreads.warm_up`: how long a thread waits for the others to take theirs

_lock = threading.Lock()
#: The process's decode thread pools, by (device_id, number of threads).
_threads: dict[tuple[int, int], _DecodeThreads] = {}
_params: list = []
#: The process's image pools, by device id (`_ImagePool`).
_pools: dict[int, _ImagePool] = {}


def _image_pool(device_id: int, options: DecoderOptions, batch: int) -> _ImagePool | None:
    """The device's pool of reusable images (at least ``options.reuse_images`` of them; -1: four
    batches of ``batch``), or None when ``reuse_images`` is 0 or nvImageCodec cannot reuse."""
    limit = 4 * batch if options.reuse_images < 0 else options.reuse_images
    if limit <= 0 or not _ImagePool.supported:
        return None
    with _lock:
        pool = _pools.get(device_id)
        if pool is None:
            pool = _pools[device_id] = _ImagePool(limit)
        pool.limit = max(pool.limit, limit)
        return pool


def _decode_threads(device_id: int, options: DecoderOptions) -> _DecodeThreads:
    """The process's decode threads for ``device_id`` and ``options``: ``decode_threads`` of
    them, twice that when batches are split between two decoders (``split_share`` > 0). Pipelines
    whose options agree on that count share the pool; each thread keeps one decoder per
    `_decoder_key` (backend, ``hw_decoder_load``, ``cpu_threads``, ``codec_option_text()``)."""
    n = options.decode_threads * (2 if options.split_share > 0.0 else 1)
    key = (device_id, n)
    with _lock:
        if key not in _threads:
            _threads[key] = _DecodeThreads(device_id, n)
        return _threads[key]


_users = 0  # open GPU pipelines of this process (`retain` / `release`)


def retain() -> None:
    """A GPU pipeline was built: keep the decode threads (made on first use) until `release`."""
    global _users
    with _lock:
        _users += 1


def release() -> None:
    """A GPU pipeline was closed. With none left, stop the decode threads: their nvImageCodec
    decoders (GPU memory, CPU thread pools) go with them. A later pipeline makes new ones."""
    global _users
    with _lock:
        _users = max(0, _users - 1)
        if _users:
            return
        stopping = list(_threads.values())
        _threads.clear()
        _pools.clear()  # their images are freed as they go
    for t in stopping:
        t.pool.shutdown(wait=True)  # thread exit drops the thread's decoders


def warm_up(device_id: int, options: DecoderOptions) -> list:
    """Make the decoders (and streams) the decode threads for ``options`` on ``device_id`` will use,
    in those threads, without waiting: a process whose first batch is not there yet (a Train
    worker whose loader actors are starting) does not pay for them when it comes. Returns the
    futures (each raises what making its decoders raised; the first batch would raise it too)."""
    _decode_params()
    return _decode_threads(device_id, options).warm_up(options)


def _decode_params() -> Any:
    if not _params:
        from nvidia import nvimgcodec

        _params.append(nvimgcodec.DecodeParams(apply_exif_orientation=False))
    return _params[0]


#: Host-side time of the batches so far, by stage (seconds, cumulative), and their count. Updated
#: under `_stats_lock` (several pipeline threads decode at once); read it with `stats_snapshot`.
STATS: dict[str, float] = {"prepare_s": 0.0, "decode_wait_s": 0.0, "fallback_s": 0.0, "batches": 0,
                           "native_batches": 0}
_stats_lock = threading.Lock()


def _add_stats(**seconds: float) -> None:
    """Add one batch's stage times to `STATS` (and count the batch), atomically."""
    with _stats_lock:
        for k, v in seconds.items():
            STATS[k] += v
        STATS["batches"] += 1


def stats_snapshot() -> dict[str, float]:
    """A consistent copy of `STATS` (the benchmark reads this)."""
    with _stats_lock:
        return dict(STATS)


def _decode_async(device_id: int, data: list, options: DecoderOptions,
                  reuse: list | None = None) -> list[tuple[list[int], Any]]:
    """Start decoding ``data``; returns ``[(positions in data, future of (images, event))]``.

    With ``options.split_share`` > 0 the batch goes to two decoders at once: that share to a
    hardware-engine-only decoder, the rest to ``options.split_backend`` (the hardware engines and
    the CUDA decoder are separate resources); otherwise one ``options.backend`` call, into the
    images ``reuse`` (one per sample) when given."""
    dt = _decode_threads(device_id, options)
    params = _decode_params()
    share = options.split_share
    if share <= 0.0 or len(data) < 2:
        return [(list(range(len(data))), dt.submit(options.backend, options, data, params, reuse))]
    k = max(1, min(len(data) - 1, round(share * len(data))))
    # interleaved, so both halves get a similar mix of image sizes
    hw = [j for j in range(len(data)) if (j * k) // len(data) != ((j + 1) * k) // len(data)]
    hw_set = set(hw)
    rest = [j for j in range(len(data)) if j not in hw_set]
    return [(hw, dt.submit("hw", options, [data[j] for j in hw], params)),
            (rest, dt.submit(options.split_backend, options, [data[j] for j in rest], params))]


def decode_batch(
    op: Any,
    inputs: Sequence[np.ndarray],
    ctxs: Sequence[SampleContext],
    stream: Any,
    random_crop: bool,
    prep: Sequence[np.ndarray] | None = None,
) -> Any:
    """Decode a batch; with the workers' ``prep`` rows (and ``use_worker_prep``, the default),
    through `_decode_prepared` (fast path), else on the host path `_decode_each`."""
    options = options_of(op)
    if prep is not None and options.use_worker_prep:
        rows = getattr(prep, "array", None)  # a stacked column (`host_batch.Rows`): no per-row stack
        return _decode_prepared(op, inputs, ctxs, stream, np.stack(prep) if rows is None else rows, options)
    return _decode_each(op, inputs, ctxs, stream, random_crop, options)


def _collect(parts: list[tuple[list[int], Any]], stream: Any) -> list:
    """Wait for the decode calls of `_decode_async`; ``stream`` waits on their events (the host only
    waits for the calls to return). Returns the images in the order of the data."""
    out: list = [None] * sum(len(where) for where, _ in parts)
    for where, fut in parts:
        images, ev = fut.result()
        stream.wait_event(ev)
        for j, img in zip(where, images):
            out[j] = img
    return out


_keep_lock = threading.Lock()
_batch = threading.local()  # this thread's batch: its keep entries, waiting for the batch's end event


def _keep(op: Any, stream: Any, owners: list) -> None:
    """Hold a batch's decoded images until the GPU is done with them.

    nvImageCodec frees an image's memory when its Python object dies, on the stream it was decoded
    on or synchronously: either may be before our kernels on ``stream`` read it. So the images are
    kept with an event on ``stream`` that follows every kernel of their batch, and dropped once
    that event has completed; the host never waits. The event comes from `batch_enqueued`, which
    the pipeline calls (in this same thread) once all the batch's GPU work is queued. Should it not
    come, the event of a call three calls later stands in (by then the pipeline queued every kernel
    of this batch: at most two batches compute at once).
    """
    entry = [None, 0, owners]
    with _keep_lock:
        keep = op.__dict__.setdefault("_gpu_keep", [])
        seq = op.__dict__.get("_gpu_keep_seq", 0)
        op._gpu_keep_seq = entry[1] = seq + 1
        ev = stream.record()
        for e in keep:
            if e[0] is None and e[1] <= seq - 2:
                e[0] = ev
        _prune(keep)
        keep.append(entry)
    if not hasattr(_batch, "entries"):
        _batch.entries = []
    _batch.entries.append((op, entry))


def _prune(keep: list) -> None:
    """Drop the entries whose event has completed (under `_keep_lock`); a batch's pooled images
    go back to their pool unless a view of them left the batch (`ptrbatch.Held`)."""
    kept = []
    for e in keep:
        if e[0] is None or not e[0].done:
            kept.append(e)
            continue
        owners = e[2]
        pool = getattr(owners, "pool", None)
        if pool is not None and not owners.escaped:
            pool.give_back(owners.images)
    keep[:] = kept


def batch_enqueued(event: Any) -> None:
    """All GPU work of this thread's current batch is queued before ``event`` (on the pipeline's
    stream): its decoded images can go once the event completes (see `_keep`)."""
    entries = getattr(_batch, "entries", None)
    if not entries:
        return
    with _keep_lock:
        for op, entry in entries:
            if entry[0] is None:
                entry[0] = event
            _prune(op.__dict__.get("_gpu_keep", []))
    entries.clear()


def _decode_prepared(op: Any, inputs: Sequence[np.ndarray], ctxs: Sequence[SampleContext], stream: Any,
                     prep: np.ndarray, options: DecoderOptions) -> PtrBatch:
    """The fast path: the workers already parsed headers and drew crop boxes (``prep`` rows
    ``[y, x, h, w, H, W, ok]``), so the host does no per-sample work: whole images are decoded
    (measured faster than region decode with nvImageCodec 0.9 on an H100: the hardware engine
    decodes whole images anyway), and each crop is a pointer into its image (`PtrBatch`) that the
    next kernel reads with the image's row pitch. With `DecoderOptions.native_batch` (and one
    decoder per batch) the batch goes to nvImageCodec in one C call (`native_decode`) and the
    pointer table is computed with NumPy; else through nvImageCodec's Python API.
    """
    import cupy

    t0 = time.perf_counter()
    n = len(inputs)
    ok = np.flatnonzero(prep[:, 6] == 1)
    device_id = cupy.cuda.Device().id
    ptrs = np.zeros(n, np.uint64)
    dims = np.zeros((n, 3), np.int32)
    done = np.zeros(n, bool)
    owners = Held()
    native = _native_ready(options)
    if native:
        src, lengths, keep = _host_addresses(inputs, ok)
        hw = prep[ok][:, 4:6].astype(np.int32)
        fut = _decode_threads(device_id, options).submit_native(options.backend, options, src, lengths, hw)
        buf, dst, result, ev = fut.result()
        stream.wait_event(ev)
        del keep  # the call has read the bytes
        t1 = time.perf_counter()
        sel = result == 1
        good = ok[sel]
        rows = prep[good].astype(np.uint64)
        pitch = rows[:, 5] * np.uint64(3)
        ptrs[good] = dst[sel] + rows[:, 0] * pitch + rows[:, 1] * np.uint64(3)
        dims[good] = np.stack([rows[:, 2], rows[:, 3], pitch], 1).astype(np.int32)
        done[good] = True
        owners.append(buf)
    else:
        pool = _image_pool(device_id, options, n) if options.split_share <= 0.0 else None
        reuse = pool.take((prep[ok, 4] * prep[ok, 5] * 3).tolist()) if pool is not None else None
        images = _collect(_decode_async(device_id, [inputs[j] for j in ok], options, reuse), stream)
        t1 = time.perf_counter()
        if pool is not None:  # these images go back to the pool after the batch (`_prune`)
            owners.pool = pool
            owners.images = [img for img in images if img is not None]
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
    try:
        for j in np.flatnonzero(~done).tolist():  # see "Fallbacks" in the module docstring
            arr = cupy.ascontiguousarray(cupy.asarray(op.run_cpu([inputs[j]], {}, ctxs[j])))
            ptrs[j] = arr.data.ptr
            dims[j] = (arr.shape[0], arr.shape[1], arr.strides[0])
            owners.append(arr)
    except BaseException:
        if native:  # the batch's buffer is dropped unkept: its decode must be over first (`_arena_stream`)
            stream.synchronize()
        raise
    _keep(op, stream, owners)
    _add_stats(decode_wait_s=t1 - t0, fallback_s=time.perf_counter() - t1, native_batches=float(native))
    return PtrBatch(ptrs, dims, 3, owners)


_native_warned: list = []


def _native_ready(options: DecoderOptions) -> bool:
    """Whether this batch goes through `native_decode`: asked for, one decoder per batch, and the
    library built here (else a warning, once per process, says why not)."""
    if not options.native_batch or options.split_share > 0.0:
        return False
    from . import native_decode

    if native_decode.library() is not None:
        return True
    if not _native_warned:
        _native_warned.append(True)
        import logging

        logging.getLogger(__name__).warning(
            "ray_extsrc: the one-call batch decoder could not be built, so decoding goes through "
            "nvImageCodec's Python API (slower beside a training step): %s", native_decode.unavailable())
    return False


def _host_addresses(inputs: Sequence[Any], ok: np.ndarray) -> tuple[np.ndarray, np.ndarray, Any]:
    """Host address and length of the encoded bytes of samples ``ok``, and what keeps them alive:
    computed from the offsets when the samples are views of one packed buffer
    (`host_batch.PackedSamples`), else per sample."""
    packed = getattr(inputs, "packed", None)
    if packed is not None and packed.data.flags.c_contiguous:
        offsets = packed.offsets
        src = np.uint64(packed.data.ctypes.data) + offsets[:-1][ok].astype(np.uint64)
        return src, (offsets[1:] - offsets[:-1])[ok].astype(np.uint64), packed
    arrays = [np.ascontiguousarray(np.frombuffer(a, np.uint8) if isinstance(a, (bytes, bytearray, memoryview))
                                   else a).reshape(-1).view(np.uint8) for a in (inputs[j] for j in ok.tolist())]
    src = np.array([a.ctypes.data for a in arrays], np.uint64)
    return src, np.array([a.nbytes for a in arrays], np.uint64), arrays


def _decode_each(
    op: Any,
    inputs: Sequence[np.ndarray],
    ctxs: Sequence[SampleContext],
    stream: Any,
    random_crop: bool,
    options: DecoderOptions,
) -> list:
    """Decode (a random crop of) each encoded sample to an HWC uint8 CuPy array on ``stream``.

    The host parses each header and draws the crop box here (the path without the workers' prep:
    in-process sources, or ``use_worker_prep=False``). The batch can go to nvImageCodec in chunks
    (``chunk`` samples): while one chunk decodes in a decode thread, this thread prepares the
    next. Measured on an H100 (R1, 2026-11-25), chunks of 128 were no faster than one call per
    batch (the default, 256). ``roi`` (default True) decodes only each crop's region; with
    ``roi=False`` the whole image is decoded and the crop is a view.
    """
    import cupy
    from nvidia import nvimgcodec

    from .. import _codec

    t0 = time.perf_counter()
    n = len(inputs)
    out: list[Any] = [None] * n
    use_roi = options.roi
    chunk = options.chunk
    device_id = cupy.cuda.Device().id
    pending: list[tuple[list, list[int], list]] = []
    streams: list = []
    where: list[int] = []
    views: list = []  # (y, x, h, w) to cut from a full decode, when not using ROI

    def submit() -> None:
        if streams:
            pending.append((_decode_async(device_id, list(streams), options), list(where), list(views)))
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
    owners: list = []
    for parts, idx, boxes in pending:
        images = _collect(parts, stream)
        for j, img, box in zip(idx, images, boxes):
            if img is not None:
                owners.append(img)
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
    _keep(op, stream, owners)
    _add_stats(prepare_s=t1 - t0, decode_wait_s=t2 - t1, fallback_s=time.perf_counter() - t2)
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
