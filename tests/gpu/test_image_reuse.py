"""The prepared decode path's two ways to nvImageCodec, on a GPU.

Its Python API decoding into reused images (`DecoderOptions.reuse_images`, with
``native_batch=False``): the batches are the same as with fresh images, images are really reused,
and memory a view of which left the pipeline (the decoder's own output) is never decoded into again.
The one-call C batch decoder (`native_decode`, ``native_batch=True``, the default): really used,
the same batches as the Python API, and a decoder output the user holds stays intact."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from . import gpu_ready


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not gpu_ready(nvimgcodec=True), reason="needs a GPU with CuPy and nvImageCodec"),
]

BATCH = 16
BATCHES = 8  # one epoch of 128 images: from the third batch on, decodes go into reused images


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from ray_extsrc.synthetic import R1, make_jpeg_dataset

    return str(make_jpeg_dataset(tmp_path_factory.mktemp("r1"), dataclasses.replace(R1, num_images=BATCH * BATCHES), progress=False))


def _host(out) -> np.ndarray:
    """A batch output on the host: the dense array, or the samples flattened end to end."""
    cpu = out.as_cpu()
    if cpu.is_dense_tensor():
        return np.array(cpu.as_array())
    return np.concatenate([np.asarray(a).ravel() for a in cpu])


def _run(root: str, with_decoded: bool, **decoder) -> list[list[np.ndarray]]:
    """``BATCHES`` batches of an R1 pipeline (worker prep on: the prepared decode path), copied to
    the host as each arrives; with ``with_decoded`` the decoder's output is an output too, and the
    GPU outputs of every batch are kept and copied again at the end."""
    from ray_extsrc import fn, pipeline_def, types
    from ray_extsrc.bench._pipelines import IMAGENET_MEAN, IMAGENET_STD, READERS
    from ray_extsrc.fn._gpu import decode

    # spawned workers: earlier tests of the session initialised CUDA in this process
    @pipeline_def(batch_size=BATCH, num_threads=2, device_id=0, seed=7, py_num_workers=2, py_start_method="spawn",
                  prefetch_queue_depth=2)
    def pipe():
        jpegs, labels = fn.external_source(source=READERS["file_list"](root, BATCH, None), num_outputs=2,
                                           batch=False, parallel=True, dtype=[types.UINT8, types.INT32])
        dec = fn.decoders.image_random_crop(jpegs, device="mixed", **decoder)
        img = fn.resize(dec, resize_x=96, resize_y=96)
        img = fn.crop_mirror_normalize(img, mirror=fn.random.coin_flip(probability=0.5), mean=IMAGENET_MEAN,
                                       std=IMAGENET_STD, dtype=types.FLOAT, output_layout="CHW")
        return (img, labels, dec) if with_decoded else (img, labels)

    p = pipe()
    native0 = decode.stats_snapshot().get("native_batches", 0)
    try:
        p.start_py_workers()
        p.build()
        first, kept = [], []
        for _ in range(BATCHES):
            outs = p.run()
            first.append([_host(o) for o in outs])
            if with_decoded:
                kept.append(outs)
        _run.native = decode.stats_snapshot().get("native_batches", 0) - native0
        _run.pool = decode._pools.get(0)
        _run.taken = _run.pool.taken if _run.pool is not None else 0
        if with_decoded:  # the kept outputs, read again after every later batch decoded
            _run.again = [[_host(o) for o in outs] for outs in kept]
        return first
    finally:
        p.close()


def test_reused_images_give_the_same_batches(root):
    fresh = _run(root, False, reuse_images=0, native_batch=False)
    reused = _run(root, False, reuse_images=4 * BATCH, native_batch=False)
    assert _run.taken >= BATCHES - 3, f"only {_run.taken} of {BATCHES} batches decoded into reused images"
    for k, (a, b) in enumerate(zip(fresh, reused)):
        for x, y in zip(a, b):
            assert np.array_equal(x, y), f"batch {k} differs with reused images"


def test_memory_seen_outside_the_pipeline_is_not_reused(root):
    batches = _run(root, True, reuse_images=4 * BATCH, native_batch=False)
    assert _run.taken == 0  # every batch's decoded images left the pipeline as an output
    for k, (now, later) in enumerate(zip(batches, _run.again)):
        assert np.array_equal(now[2], later[2]), f"batch {k}'s decoded images changed after later batches"


def test_native_batch_decoder_is_used_and_gives_the_python_api_batches(root):
    from ray_extsrc.fn._gpu import native_decode

    if native_decode.library() is None and "compiler" in (native_decode.unavailable() or ""):
        pytest.skip(f"the C batch decoder cannot be built here: {native_decode.unavailable()}")
    python_api = _run(root, False, reuse_images=0, native_batch=False)
    assert _run.native == 0
    native = _run(root, False)  # the defaults
    assert native_decode.unavailable() is None
    assert _run.native >= BATCHES, f"{_run.native} of {BATCHES} batches went through the native decoder"
    for k, (a, b) in enumerate(zip(python_api, native)):
        for x, y in zip(a, b):
            assert np.array_equal(x, y), f"batch {k} differs between the native and the Python API decoder"


def test_native_decoder_output_held_by_the_user_stays_intact(root):
    from ray_extsrc.fn._gpu import native_decode

    if native_decode.library() is None:
        pytest.skip(f"the C batch decoder is unavailable: {native_decode.unavailable()}")
    batches = _run(root, True)
    assert _run.native >= BATCHES
    for k, (now, later) in enumerate(zip(batches, _run.again)):
        assert np.array_equal(now[2], later[2]), f"batch {k}'s decoded images changed after later batches"


def _thread_decoders(options) -> list[list]:
    """Each decode thread's decoder keys (one task per thread: they wait for each other)."""
    import threading

    from ray_extsrc.fn._gpu import decode

    dt = decode._decode_threads(0, options)
    n = dt.threads
    barrier = threading.Barrier(n, timeout=60)

    def keys() -> list:
        barrier.wait()
        return sorted(map(repr, getattr(dt.local, "decoders", {})))

    return [f.result(timeout=120) for f in [dt.pool.submit(keys) for _ in range(n)]]


@pytest.mark.parametrize("native_batch", [True, False])
def test_warm_up_makes_each_decode_threads_decoders_that_the_batches_then_use(root, native_batch):
    """A consumer-side stage makes its decoders while its first host batch is on the way
    (`decode.warm_up`): every decode thread gets its own, and the batches find them (no new one)."""
    from ray_extsrc.fn._gpu import decode, native_decode
    from ray_extsrc.fn.decoder_options import DecoderOptions

    if native_batch and native_decode.library() is None:
        pytest.skip(f"the C batch decoder is unavailable: {native_decode.unavailable()}")
    options = DecoderOptions(native_batch=native_batch, reuse_images=0)
    decode.retain()  # keep the decode threads (and their decoders) across the pipeline's close
    try:
        for f in decode.warm_up(0, options):
            f.result(timeout=120)
        warm = _thread_decoders(options)
        assert len(warm) == options.decode_threads and all(len(k) == 1 for k in warm), warm
        assert all(k == warm[0] for k in warm) and ("'native'" in warm[0][0]) == native_batch
        _run(root, False, native_batch=native_batch, reuse_images=0)
        assert _run.native >= BATCHES if native_batch else _run.native == 0
        assert _thread_decoders(options) == warm  # the batches made no decoder of their own
    finally:
        decode.release()


@pytest.mark.parametrize("native_batch", [True, False])
def test_gpu_huffman_threshold_reaches_the_decoders_and_decodes_alike(root, native_batch):
    """``hybrid_huffman_threshold=0`` (DALI's name): nvImageCodec's CUDA decoder then decodes the
    Huffman stage of every image on the GPU, where at its default (1,000,000 pixels) R1's images
    have it decoded on the CPU. The threads' decoders carry the option, and the batches match the
    CPU-Huffman ones (Huffman decoding is lossless: only the GPU stages after it may differ)."""
    from ray_extsrc.bench._pipelines import IMAGENET_STD
    from ray_extsrc.fn._gpu import decode, native_decode
    from ray_extsrc.fn.decoder_options import DecoderOptions

    if native_batch and native_decode.library() is None:
        pytest.skip(f"the C batch decoder is unavailable: {native_decode.unavailable()}")
    common = dict(backend="hybrid", native_batch=native_batch, reuse_images=0)
    cpu_huffman = _run(root, False, **common)
    options = DecoderOptions(hybrid_huffman_threshold=0, **common)
    decode.retain()  # keep the decode threads (and their decoders) past the pipeline's close
    try:
        gpu_huffman = _run(root, False, hybrid_huffman_threshold=0, **common)
        keys = _thread_decoders(options)
    finally:
        decode.release()
    assert any("hybrid_huffman_threshold=0" in k for ks in keys for k in ks), keys
    one_pixel = 1 / min(IMAGENET_STD)  # one 8-bit step after normalisation, in its widest channel
    for k, ((a_img, a_lab), (b_img, b_lab)) in enumerate(zip(cpu_huffman, gpu_huffman)):
        assert np.array_equal(a_lab, b_lab)
        diff = np.abs(a_img.astype(np.float64) - b_img)
        assert diff.mean() < one_pixel and np.percentile(diff, 99.9) < 8 * one_pixel, (k, diff.mean())


def test_a_native_decode_buffer_freed_after_one_threads_batch_serves_the_next_threads(root):
    """Every decode thread takes its batch buffers from one CuPy pool arena (`decode._arena_stream`),
    not from its own stream's: the buffer a batch decoded on one thread freed is the one the next
    batch, of the same size class, gets on another thread. (Per-thread arenas each grew to their
    thread's own peak: 1.3-1.6 GB of CuPy pool for ResNet-18's consumer-side stage on an H100.)"""
    import threading
    from pathlib import Path

    from PIL import Image

    from ray_extsrc.fn._gpu import decode, native_decode
    from ray_extsrc.fn.decoder_options import DecoderOptions

    if native_decode.library() is None:
        pytest.skip(f"the C batch decoder is unavailable: {native_decode.unavailable()}")
    paths = sorted(Path(root).rglob("*.jpg"))[:BATCH]
    encoded = [np.fromfile(p, np.uint8) for p in paths]
    hw = np.array([Image.open(p).size[::-1] for p in paths], np.int32)
    src, lengths, keep = decode._host_addresses(encoded, np.arange(len(encoded)))
    options = DecoderOptions()
    threads = decode._DecodeThreads(0, 1)  # its decode method, called from two threads of our own
    got: list = []

    def one_batch() -> None:  # a new thread: its own stream and decoder (`_DecodeThreads._local`)
        try:
            buf, dst, result, ev = threads._run_native(options.backend, options, src, lengths, hw)
            ev.synchronize()
            got.append((buf.data.ptr, buf.nbytes, result.tolist(), threads.local.stream.ptr))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            got.append(e)
        # ``buf`` goes when this returns: the decode is over, so its memory is free for any stream

    for _ in range(2):
        t = threading.Thread(target=one_batch)
        t.start()
        t.join(timeout=120)
    del keep
    assert len(got) == 2 and not any(isinstance(g, BaseException) for g in got), got
    (ptr1, size1, res1, stream1), (ptr2, size2, res2, stream2) = got
    assert res1 == res2 == [1] * len(paths)
    assert stream1 != stream2  # two threads, two decode streams
    assert size1 == size2 == decode.buffer_bytes(decode.batch_layout(hw)[1])
    assert ptr2 == ptr1, "the second thread's batch did not reuse the buffer the first one freed"
