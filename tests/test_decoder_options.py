"""`DecoderOptions`: validation, the decoder ops' keyword arguments, and that the GPU decode path
(`_gpu.decode`) takes its settings from the op and never from the environment.

The decode path runs here against stand-ins for CuPy and nvImageCodec (NumPy arrays for device
memory, simplejpeg for the decoder), so its routing (which decoder, how many threads, which
stream, region or whole image) is checked without a GPU; tests/gpu runs the real thing.
"""

from __future__ import annotations

import io
import pickle
import re
import sys
import threading
import types as pytypes
from types import SimpleNamespace

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from ray_extsrc import fn
from ray_extsrc.fn.decoder_options import BACKENDS, OPTION_NAMES, SPLIT_BACKENDS, DecoderOptions
from ray_extsrc.fn.decoders import ImageDecoder, ImageRandomCropDecoder
from ray_extsrc.graph import Graph, SampleContext, graph_scope

pytestmark = pytest.mark.timeout(60)

#: The environment variables DecoderOptions replaced, with the defaults decode.py had for them
#: (RAY_EXTSRC_GPU_ROI had two: "0" where the workers' prep is used, "1" on the host path).
OLD_ENV_DEFAULTS = {
    "RAY_EXTSRC_DECODER": ("backend", "default"),
    "RAY_EXTSRC_HW_LOAD": ("hw_decoder_load", 0.65),
    "RAY_EXTSRC_HW_SHARE": ("split_share", 0.0),
    "RAY_EXTSRC_SPLIT_KIND": ("split_backend", "hybrid"),
    "RAY_EXTSRC_DECODE_THREADS": ("decode_threads", 2),
    "RAY_EXTSRC_NVIMGCODEC_THREADS": ("cpu_threads", 0),
    "RAY_EXTSRC_DECODE_CHUNK": ("chunk", 256),
    "RAY_EXTSRC_NVIMGCODEC_OPTIONS": ("codec_options", ":fancy_upsampling=1"),
}


# --- the options object ----------------------------------------------------------------------------


def test_defaults_are_the_old_environment_defaults():
    o = DecoderOptions()
    for env, (field, default) in OLD_ENV_DEFAULTS.items():
        assert getattr(o, field) == default, env
    # RAY_EXTSRC_GPU_ROI unset: the workers' prep was used ("0" in decode_batch) and the host path
    # decoded regions ("1" in _decode_each); the two fields keep both
    assert o.use_worker_prep is True and o.roi is True
    assert set(OPTION_NAMES) == {f for f, _ in OLD_ENV_DEFAULTS.values()} | {"use_worker_prep", "roi", "reuse_images", "native_batch",
                                                                        "hybrid_huffman_threshold"}


def test_options_are_frozen_hashable_and_picklable():
    o = DecoderOptions(backend="hwload", hw_decoder_load=0.8)
    with pytest.raises(AttributeError):
        o.backend = "hw"  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(o)) == o and hash(o) == hash(DecoderOptions(backend="hwload", hw_decoder_load=0.8))
    assert o.replace(chunk=64) == DecoderOptions(backend="hwload", hw_decoder_load=0.8, chunk=64)


def test_values_are_normalized():
    o = DecoderOptions(hw_decoder_load=1, split_share=np.float32(0.5), decode_threads=np.int64(3), roi=np.bool_(False))
    assert type(o.hw_decoder_load) is float and o.hw_decoder_load == 1.0
    assert type(o.split_share) is float and type(o.decode_threads) is int and o.roi is False


@pytest.mark.parametrize(
    "field, bad, allowed",
    [
        ("backend", "nvjpeg", "one of"),
        ("backend", None, "one of"),
        ("hw_decoder_load", 1.5, "[0, 1]"),
        ("hw_decoder_load", -0.1, "[0, 1]"),
        ("hw_decoder_load", float("nan"), "[0, 1]"),
        ("hw_decoder_load", "0.5", "[0, 1]"),
        ("hw_decoder_load", True, "[0, 1]"),
        ("split_share", 1.0, "[0, 1)"),
        ("split_share", -0.5, "[0, 1)"),
        ("split_backend", "hw", "one of"),
        ("split_backend", "default", "one of"),
        ("decode_threads", 0, ">= 1"),
        ("decode_threads", 2.0, ">= 1"),
        ("decode_threads", True, ">= 1"),
        ("cpu_threads", -1, ">= 0"),
        ("cpu_threads", "4", ">= 0"),
        ("chunk", 0, ">= 1"),
        ("chunk", 1.5, ">= 1"),
        ("roi", 1, "bool"),
        ("roi", "yes", "bool"),
        ("use_worker_prep", None, "bool"),
        ("codec_options", 3, "str"),
        ("reuse_images", -2, ">= -1"),
        ("reuse_images", 256.0, ">= -1"),
    ],
)
def test_bad_values_raise_naming_argument_value_and_range(field, bad, allowed):
    with pytest.raises(ValueError) as e:
        DecoderOptions(**{field: bad})
    msg = str(e.value)
    assert msg.startswith("DecoderOptions: ") and field in msg and repr(bad) in msg and allowed in msg
    # through an op, the message names the op
    with pytest.raises(ValueError, match=rf"^fn\.decoders\.image_random_crop: {field} .*{re.escape(allowed)}"):
        ImageRandomCropDecoder("mixed", **{field: bad})


def test_choices_list_what_is_allowed():
    with pytest.raises(ValueError) as e:
        DecoderOptions(backend="x")
    assert all(b in str(e.value) for b in BACKENDS)
    with pytest.raises(ValueError) as e:
        DecoderOptions(split_backend="x")
    assert all(b in str(e.value) for b in SPLIT_BACKENDS)


def test_boundaries_are_accepted():
    DecoderOptions(hw_decoder_load=0.0)
    DecoderOptions(hw_decoder_load=1.0)
    DecoderOptions(split_share=0.0)
    DecoderOptions(split_share=0.999)
    DecoderOptions(decode_threads=1, cpu_threads=0, chunk=1, codec_options="", hybrid_huffman_threshold=0)


def test_hybrid_huffman_threshold_reaches_the_codec_options_only_when_changed():
    assert DecoderOptions().hybrid_huffman_threshold == 1_000_000  # DALI's default, and nvImageCodec's
    assert DecoderOptions().codec_option_text() == ":fancy_upsampling=1"
    o = DecoderOptions(hybrid_huffman_threshold=0)
    assert o.codec_option_text() == ":fancy_upsampling=1 nvjpeg_cuda_decoder:hybrid_huffman_threshold=0"
    assert DecoderOptions(codec_options="", hybrid_huffman_threshold=5).codec_option_text() == (
        "nvjpeg_cuda_decoder:hybrid_huffman_threshold=5")
    with pytest.raises(ValueError, match=r"hybrid_huffman_threshold must be an int >= 0; got -1"):
        DecoderOptions(hybrid_huffman_threshold=-1)
    with pytest.raises(ValueError, match=r"hybrid_huffman_threshold must be an int >= 0; got 0.5"):
        ImageRandomCropDecoder("mixed", hybrid_huffman_threshold=0.5)


# --- the decoder ops -------------------------------------------------------------------------------


def build(call):
    with graph_scope(Graph()) as g:
        call(fn.random.uniform())
        return g.nodes[-1].op


KWARGS = dict(backend="hwload", hw_decoder_load=0.8, split_share=0.25, split_backend="cuda",
              decode_threads=3, cpu_threads=4, use_worker_prep=False, roi=False, chunk=64,
              codec_options=":fancy_upsampling=0", hybrid_huffman_threshold=0)


@pytest.mark.parametrize("public", [fn.decoders.image, fn.decoders.image_random_crop])
def test_op_keyword_arguments_round_trip(public):
    op = build(lambda x: public(x, device="mixed", **KWARGS))
    assert op.decoder_options == DecoderOptions(**KWARGS)
    assert build(lambda x: public(x, device="mixed")).decoder_options == DecoderOptions()
    # the CPU op takes (and checks) them too, so a pipeline switches device with one argument
    assert build(lambda x: public(x, **KWARGS)).decoder_options == DecoderOptions(**KWARGS)


@pytest.mark.parametrize("cls", [ImageDecoder, ImageRandomCropDecoder])
def test_op_takes_a_whole_options_object_and_keywords_override_it(cls):
    base = DecoderOptions(**KWARGS)
    assert cls("mixed", decoder_options=base).decoder_options is not None
    assert cls("mixed", decoder_options=base).decoder_options == base
    assert cls("mixed", decoder_options=base, chunk=8).decoder_options == base.replace(chunk=8)
    op = build(lambda x: fn.decoders.image_random_crop(x, device="mixed", decoder_options=base, roi=True))
    assert op.decoder_options == base.replace(roi=True)
    with pytest.raises(ValueError, match="decoder_options must be a DecoderOptions"):
        cls("mixed", decoder_options={"chunk": 8})


def test_ops_pickle_with_their_options():
    op = ImageRandomCropDecoder("mixed", hw_decoder_load=0.3, backend="hwload")
    assert pickle.loads(pickle.dumps(op)).decoder_options == op.decoder_options


@pytest.mark.parametrize("public", [fn.decoders.image, fn.decoders.image_random_crop])
def test_unknown_decoder_keywords_are_refused_by_name(public):
    with pytest.raises(TypeError, match=r"unsupported argument\(s\) 'hw_decoder_laod'.*hw_decoder_load"):
        build(lambda x: public(x, device="mixed", hw_decoder_laod=0.5))
    with pytest.raises(TypeError, match=r"'max_streams'"):  # a DALI argument we do not implement
        build(lambda x: public(x, device="mixed", max_streams=4))


def test_op_class_refuses_unknown_options_by_name():
    with pytest.raises(TypeError, match=r"unknown decoder option\(s\) 'threads'"):
        ImageDecoder("mixed", threads=2)


def test_options_must_be_constants_not_data_nodes():
    with pytest.raises(TypeError, match="'chunk' must be a constant"):
        build(lambda x: fn.decoders.image(x, device="mixed", chunk=x))


# --- the GPU decode path, against stand-ins for CuPy and nvImageCodec --------------------------


class FakeEvent:
    done = True


class FakeStream:
    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False,
                 priority: int | None = None) -> None:
        self.non_blocking, self.priority = non_blocking, priority
        self.ptr = id(self)

    def record(self) -> FakeEvent:
        return FakeEvent()

    def wait_event(self, event: FakeEvent) -> None:
        pass


class FakeDevice:
    def __init__(self, device_id: int = 0) -> None:
        self.id = device_id

    def __enter__(self) -> FakeDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class FakeCodeStream:
    def __init__(self, data, region=None) -> None:
        self.data = np.ascontiguousarray(np.asarray(data, np.uint8))
        self.height, self.width = simplejpeg.decode_jpeg_header(self.data)[:2]
        self.region = region

    def get_sub_code_stream(self, image_idx: int, region) -> FakeCodeStream:
        assert image_idx == 0
        return FakeCodeStream(self.data, region)


class FakeImage:
    """A decoded image: "device memory" is the NumPy array's buffer."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.__cuda_array_interface__ = {"shape": array.shape, "strides": None,
                                         "data": (array.ctypes.data, False)}


class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.decoders: list[dict] = []  # construction arguments
        self.calls: list[tuple[tuple, int, int, str]] = []  # (backends, n, stream ptr, thread)
        self.streams: list[FakeStream] = []
        self.reused: list[bool] = []  # per decode call: given images to decode into


def fake_modules(rec: Recorder):
    class Backend:
        def __init__(self, kind: str, load_hint: float | None = None) -> None:
            self.kind, self.load_hint = kind, load_hint

    class Decoder:
        def __init__(self, **kw) -> None:
            with rec.lock:
                rec.decoders.append(kw)
            self.kinds = tuple((b.kind, b.load_hint) for b in kw["backends"]) if "backends" in kw else None

        def decode(self, data, params, cuda_stream, images=None):
            with rec.lock:
                rec.calls.append((self.kinds, len(data), cuda_stream, threading.current_thread().name))
                rec.reused.append(images is not None)
            assert images is None or len(images) == len(data)
            out = []
            for j, d in enumerate(data):
                cs = d if isinstance(d, FakeCodeStream) else FakeCodeStream(d)
                img = simplejpeg.decode_jpeg(cs.data.tobytes(), colorspace="RGB", strict=True)
                if cs.region is not None:
                    y0, x0, y1, x1 = cs.region
                    img = np.ascontiguousarray(img[y0:y1, x0:x1])
                if images is None:
                    out.append(FakeImage(img))
                else:  # nvImageCodec 0.9: the same Image object, its buffer holding the new image
                    images[j].__init__(img)
                    out.append(images[j])
            return out

    nvimgcodec = pytypes.ModuleType("nvidia.nvimgcodec")
    nvimgcodec.BackendKind = SimpleNamespace(HW_GPU_ONLY="hw", GPU_ONLY="cuda", HYBRID_CPU_GPU="hybrid")
    nvimgcodec.Backend = Backend
    nvimgcodec.Decoder = Decoder
    nvimgcodec.CodeStream = FakeCodeStream
    nvimgcodec.Region = lambda y0, x0, y1, x1: (y0, x0, y1, x1)
    nvimgcodec.DecodeParams = lambda **kw: SimpleNamespace(**kw)
    nvidia = pytypes.ModuleType("nvidia")
    nvidia.nvimgcodec = nvimgcodec

    def make_stream(**kw) -> FakeStream:
        s = FakeStream(**kw)
        with rec.lock:
            rec.streams.append(s)
        return s

    cupy = pytypes.ModuleType("cupy")
    cupy.cuda = SimpleNamespace(
        Device=FakeDevice, Stream=make_stream,
        runtime=SimpleNamespace(deviceGetStreamPriorityRange=lambda: (0, -5)),
    )
    cupy.from_dlpack = lambda img: img.array
    cupy.asarray = np.asarray
    cupy.ascontiguousarray = np.ascontiguousarray
    return {"cupy": cupy, "nvidia": nvidia, "nvidia.nvimgcodec": nvimgcodec}


@pytest.fixture
def gpu(monkeypatch):
    """Stand-in CuPy/nvImageCodec, fresh decode-thread pools and stream list; the old environment
    variables set to values that would each change the routing, were they still read."""
    from ray_extsrc.fn._gpu import decode, native_decode, streams

    rec = Recorder()
    # the Python-API path: the one-call C decoder needs the real nvImageCodec (tests/test_native_decode.py)
    monkeypatch.setattr(native_decode, "_state", {"error": "the stand-in nvImageCodec of these tests"})
    for name, module in fake_modules(rec).items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(decode, "_threads", {})
    monkeypatch.setattr(decode, "_params", [])
    monkeypatch.setattr(decode, "_pools", {})
    monkeypatch.setattr(decode._ImagePool, "supported", True)
    monkeypatch.setattr(streams, "_immortal_streams", [])
    for name, value in {
        "RAY_EXTSRC_DECODER": "cuda", "RAY_EXTSRC_HW_LOAD": "0.1", "RAY_EXTSRC_HW_SHARE": "0.5",
        "RAY_EXTSRC_SPLIT_KIND": "cuda", "RAY_EXTSRC_DECODE_THREADS": "5",
        "RAY_EXTSRC_NVIMGCODEC_THREADS": "7", "RAY_EXTSRC_GPU_ROI": "1",
        "RAY_EXTSRC_DECODE_CHUNK": "1", "RAY_EXTSRC_NVIMGCODEC_OPTIONS": "bogus=1",
    }.items():
        monkeypatch.setenv(name, value)
    yield SimpleNamespace(decode=decode, streams=streams, rec=rec)
    decode.batch_enqueued(FakeEvent())  # this thread's batches end: their keep entries go
    for pool in decode._threads.values():
        pool.pool.shutdown(wait=True)


def jpeg(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = (np.add.outer(np.arange(h), np.arange(w))[:, :, None] * [1, 2, 3] % 256).astype(np.uint8)
    img[rng.integers(0, h), :] = 255
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return np.frombuffer(buf.getvalue(), np.uint8)


def batch(op, n: int = 6):
    data = [jpeg(60 + 8 * j, 80 + 4 * j, j) for j in range(n)]
    ctxs = [SampleContext(seed=3, op_key=1, epoch_idx=0, idx_in_epoch=j, idx_in_batch=j, iteration=0)
            for j in range(n)]
    prep = [op.worker_prep([d], {}, c) for d, c in zip(data, ctxs)]
    return data, ctxs, prep


def test_default_op_ignores_the_environment_and_uses_the_prepared_path(gpu):
    op = ImageRandomCropDecoder("mixed")
    data, ctxs, prep = batch(op)
    before = gpu.decode.stats_snapshot()
    out = gpu.decode.decode_batch(op, data, ctxs, FakeStream(), random_crop=True, prep=prep)
    from ray_extsrc.fn._gpu.ptrbatch import PtrBatch

    assert isinstance(out, PtrBatch)  # RAY_EXTSRC_GPU_ROI=1 would have taken the host path
    assert len(gpu.rec.calls) == 1 and gpu.rec.calls[0][:2] == (None, 6)  # one call, default backends
    assert gpu.rec.decoders == [{"device_id": 0, "max_num_cpu_threads": 0, "options": ":fancy_upsampling=1"}]
    assert list(gpu.decode._threads) == [(0, 2)]  # decode_threads=2, no split
    # each crop is a pointer into its whole decoded image, the box the workers drew
    for j, row in enumerate(prep):
        y, x, h, w, H, W, ok = row.tolist()
        assert ok == 1 and tuple(out.dims[j]) == (h, w, W * 3)
        img = out.owners[j]
        assert int(out.ptrs[j]) == img.array.ctypes.data + y * W * 3 + x * 3
        assert np.array_equal(img.array[y : y + h, x : x + w], op.run_cpu([data[j]], {}, ctxs[j]))
    after = gpu.decode.stats_snapshot()
    assert after["batches"] == before["batches"] + 1 and after["decode_wait_s"] >= before["decode_wait_s"]


def test_the_prepared_path_decodes_into_the_images_of_a_finished_batch_unless_they_escaped(gpu):
    op = ImageRandomCropDecoder("mixed")
    data, ctxs, prep = batch(op)
    first = gpu.decode.decode_batch(op, data, ctxs, FakeStream(), random_crop=True, prep=prep)
    first_images = list(first.owners)
    gpu.decode.batch_enqueued(FakeEvent())  # its kernels are done (FakeEvent.done): images go back
    pool = gpu.decode._pools[0]
    assert len(pool.free) == 6 and pool.limit == 4 * 6  # the default: four batches' worth
    second = gpu.decode.decode_batch(op, data, ctxs, FakeStream(), random_crop=True, prep=prep)
    assert gpu.rec.reused == [False, True] and pool.taken == 1 and not pool.free
    assert {id(x) for x in second.owners} == {id(x) for x in first_images}  # the same images, decoded again
    for j, row in enumerate(prep):  # ... and every crop is right in them
        y, x, h, w, H, W, ok = row.tolist()
        img = next(i for i in second.owners if i.array.ctypes.data <= int(second.ptrs[j]) < i.array.ctypes.data + i.array.nbytes)
        assert np.array_equal(img.array[y : y + h, x : x + w], op.run_cpu([data[j]], {}, ctxs[j]))
    second.owners.escaped = True  # as PtrBatch.to_list marks it: a view left the batch
    gpu.decode.batch_enqueued(FakeEvent())
    assert not pool.free  # never decoded into again
    gpu.decode.decode_batch(op, data, ctxs, FakeStream(), random_crop=True, prep=prep)
    assert gpu.rec.reused == [False, True, False] and pool.missed == 2


def test_no_image_reuse_with_reuse_images_0(gpu):
    op = ImageRandomCropDecoder("mixed", reuse_images=0)
    data, ctxs, prep = batch(op, 3)
    for _ in range(3):
        gpu.decode.decode_batch(op, data, ctxs, FakeStream(), random_crop=True, prep=prep)
        gpu.decode.batch_enqueued(FakeEvent())
    assert gpu.rec.reused == [False] * 3 and not gpu.decode._pools


def test_decode_streams_come_from_loader_stream_at_lowest_priority(gpu):
    op = ImageDecoder("mixed", decode_threads=1)
    data, ctxs, prep = batch(op, 3)
    for _ in range(3):
        gpu.decode.decode_batch(op, data, ctxs, FakeStream(), random_crop=False, prep=prep)
    made = gpu.rec.streams
    assert len(made) == 1  # one decode thread, one stream, made once
    assert made[0].non_blocking is True and made[0].priority == 0  # range (0, -5): 0 is the lowest
    assert gpu.streams._immortal_streams == made
    assert {c[2] for c in gpu.rec.calls} == {made[0].ptr}


def test_loader_stream_helper():
    from ray_extsrc.fn._gpu import streams

    rec = Recorder()
    mods = fake_modules(rec)
    mp = pytest.MonkeyPatch()
    try:
        mp.setitem(sys.modules, "cupy", mods["cupy"])
        mp.setattr(streams, "_immortal_streams", [])
        mods["cupy"].cuda.runtime.deviceGetStreamPriorityRange = lambda: (3, -2)
        s = streams.loader_stream(0)
        assert (s.non_blocking, s.priority) == (True, 3)
        # a CuPy without the range query (the one on the GPU machine): 0, CUDA's default and lowest
        del mods["cupy"].cuda.runtime.deviceGetStreamPriorityRange
        t = streams.loader_stream(0)
        assert (t.non_blocking, t.priority) == (True, 0)

        # a CuPy whose Stream takes no priority: still non-blocking, at the default priority
        def old_stream(null=False, non_blocking=False, ptds=False):
            return FakeStream(non_blocking=non_blocking)

        mods["cupy"].cuda.Stream = old_stream
        u = streams.loader_stream(0)
        assert (u.non_blocking, u.priority) == (True, None)
        assert streams._immortal_streams == [s, t, u]
    finally:
        mp.undo()


def test_hw_decoder_load_reaches_the_hwload_backend(gpu):
    op = ImageDecoder("mixed", backend="hwload", hw_decoder_load=0.8, cpu_threads=3, codec_options="")
    data, ctxs, prep = batch(op, 4)
    gpu.decode.decode_batch(op, data, ctxs, FakeStream(), random_crop=False, prep=prep)
    (kw,) = gpu.rec.decoders
    assert kw["max_num_cpu_threads"] == 3 and kw["options"] == ""
    assert [(b.kind, b.load_hint) for b in kw["backends"]] == [("hw", 0.8), ("cuda", 1.0), ("hybrid", 1.0)]  # 1.0: nvImageCodec's own default hint


def test_make_decoder_is_the_one_backend_table(gpu):
    gpu.decode.make_decoder(0, "hybrid")
    gpu.decode.make_decoder(1, "hw", DecoderOptions(cpu_threads=2))
    first, second = gpu.rec.decoders
    assert first["max_num_cpu_threads"] == 0 and first["options"] == ":fancy_upsampling=1"
    assert [b.kind for b in first["backends"]] == ["hybrid"]
    assert second["device_id"] == 1 and second["max_num_cpu_threads"] == 2
    with pytest.raises(KeyError):
        gpu.decode.make_decoder(0, "nvjpeg")


def test_split_share_splits_between_two_decoders_with_twice_the_threads(gpu):
    op = ImageRandomCropDecoder("mixed", split_share=0.5, split_backend="cuda", decode_threads=1)
    data, ctxs, prep = batch(op, 6)
    gpu.decode.decode_batch(op, data, ctxs, FakeStream(), random_crop=True, prep=prep)
    assert list(gpu.decode._threads) == [(0, 2)]
    calls = sorted((c[0], c[1]) for c in gpu.rec.calls)
    assert calls == [((("cuda", 1.0),), 3), ((("hw", 1.0),), 3)]
    # a pipeline with other options gets its own pool, keyed by device and thread count
    other = ImageDecoder("mixed", decode_threads=3)
    gpu.decode.decode_batch(other, data, ctxs, FakeStream(), random_crop=False, prep=batch(other, 6)[2])
    assert sorted(gpu.decode._threads) == [(0, 2), (0, 3)]


@pytest.mark.parametrize("roi", [True, False])
def test_host_path_roi_and_chunk(gpu, roi):
    op = ImageRandomCropDecoder("mixed", use_worker_prep=False, roi=roi, chunk=2)
    data, ctxs, prep = batch(op, 5)
    out = gpu.decode.decode_batch(op, data, ctxs, FakeStream(), random_crop=True, prep=prep)
    assert isinstance(out, list) and len(out) == 5
    assert sorted(c[1] for c in gpu.rec.calls) == [1, 2, 2]  # chunks of 2
    for j in range(5):  # the same boxes and pixels as the CPU op (same decoder here)
        assert np.array_equal(np.asarray(out[j]), op.run_cpu([data[j]], {}, ctxs[j]))


def test_host_path_decodes_regions_or_whole_images(gpu, monkeypatch):
    seen: list = []
    real = sys.modules["nvidia.nvimgcodec"].Decoder.decode

    def spy(self, data, params, cuda_stream):
        seen.extend(getattr(d, "region", "whole") for d in data)
        return real(self, data, params, cuda_stream)

    monkeypatch.setattr(sys.modules["nvidia.nvimgcodec"].Decoder, "decode", spy)
    for roi in (True, False):
        seen.clear()
        op = ImageRandomCropDecoder("mixed", use_worker_prep=False, roi=roi)
        data, ctxs, prep = batch(op, 4)
        gpu.decode.decode_batch(op, data, ctxs, FakeStream(), random_crop=True, prep=prep)
        crops = [tuple(r[:4].tolist()) != (0, 0, r[4], r[5]) for r in prep]
        assert any(crops)
        regions = [r is not None for r in seen]
        assert regions == (crops if roi else [False] * 4)


def test_no_batch_reads_the_environment(gpu):
    """Behavioural: with os.environ replaced by a mapping that fails on every read, batches still
    decode (the options were read when the op was built)."""
    import os

    op = ImageRandomCropDecoder("mixed", split_share=0.5)
    data, ctxs, prep = batch(op, 4)

    class NoReads(dict):
        def _refuse(self, *a, **k):
            raise AssertionError("the decode path read the environment")

        __getitem__ = get = __contains__ = keys = items = _refuse

    env = pytest.MonkeyPatch()  # its own, so undoing it leaves the fixture's patches in place
    try:
        env.setattr(os, "environ", NoReads())
        gpu.decode.decode_batch(op, data, ctxs, FakeStream(), random_crop=True, prep=prep)
        op.decoder_options = op.decoder_options.replace(use_worker_prep=False)
        gpu.decode.decode_batch(op, data, ctxs, FakeStream(), random_crop=True, prep=prep)
    finally:
        env.undo()
    assert len(gpu.rec.calls) == 4


def test_decode_source_has_no_environment_reads():
    import inspect

    from ray_extsrc.fn._gpu import decode, streams

    for module in (decode, streams):
        src = inspect.getsource(module)
        assert "os.environ" not in src and "getenv" not in src and "import os" not in src


def test_stats_are_added_under_a_lock_and_snapshot_is_a_copy():
    from ray_extsrc.fn._gpu import decode

    before = decode.stats_snapshot()

    def work() -> None:
        for _ in range(2000):
            decode._add_stats(prepare_s=1.0, decode_wait_s=0.5, fallback_s=0.0)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = decode.stats_snapshot()
    assert snap["batches"] - before["batches"] == 8000
    assert snap["prepare_s"] - before["prepare_s"] == pytest.approx(8000.0)
    snap["batches"] = -1
    assert decode.stats_snapshot()["batches"] != -1
    with decode._stats_lock:  # restore, for whoever reads STATS next in this process
        decode.STATS.update(before)
