"""The one-call C batch decoder (`fn._gpu.native_decode`) on the CPU: the real C file, built by the
real build step with the machine's compiler against the installed nvImageCodec wheel, decoding
with nvImageCodec's CPU backend (libjpeg-turbo) into host buffers — the same code the GPU path
runs, but for the buffer kind and the backend. Needs ``nvidia-nvimgcodec-cu12`` (a test
dependency) and a C compiler; the GPU path is tested in tests/gpu/test_image_reuse.py."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

simplejpeg = pytest.importorskip("simplejpeg")
nvimgcodec = pytest.importorskip("nvidia.nvimgcodec")

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="needs a C compiler"),
]


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    import os

    from ray_extsrc.fn._gpu import native_decode

    saved = os.environ.get("RAY_EXTSRC_CACHE_DIR")
    os.environ["RAY_EXTSRC_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    native_decode._state.clear()
    try:
        assert native_decode.library() is not None, native_decode.unavailable()
        yield native_decode
    finally:
        native_decode._state.clear()  # the next user builds (or finds) its own
        if saved is None:
            os.environ.pop("RAY_EXTSRC_CACHE_DIR", None)
        else:
            os.environ["RAY_EXTSRC_CACHE_DIR"] = saved


def _jpegs(sizes, seed=0):
    rs = np.random.RandomState(seed)
    images = [(rs.rand(h, w, 3) * 255).astype(np.uint8) for h, w in sizes]
    return images, [np.frombuffer(simplejpeg.encode_jpeg(a, quality=90), np.uint8) for a in images]


def _decode(dec, encoded, hw):
    outs = [np.full((max(h, 1), max(w, 1), 3), 7, np.uint8) for h, w in hw]
    src = np.array([e.ctypes.data for e in encoded], np.uint64)
    lengths = np.array([e.size for e in encoded], np.uint64)
    dst = np.array([o.ctypes.data for o in outs], np.uint64)
    return dec.decode(src, lengths, dst, np.array(hw, np.int32), host_buffers=True), outs


def test_decodes_a_batch_like_libjpeg_turbo_and_reuses_its_handles(native):
    dec = native.NativeDecoder(native.DEVICE_CPU_ONLY, [("cpu", 1.0)])
    for seed, sizes in enumerate([[(37, 53), (64, 64), (100, 31)], [(8, 8)], [(64, 64), (37, 53), (5, 300), (99, 2)]]):
        _, encoded = _jpegs(sizes, seed)
        result, outs = _decode(dec, encoded, sizes)
        assert result.tolist() == [1] * len(sizes)
        for e, o in zip(encoded, outs):
            ref = simplejpeg.decode_jpeg(e.tobytes(), colorspace="RGB", fastdct=False, fastupsample=False)
            assert np.array_equal(o, ref)
    dec.close()
    dec.close()  # idempotent


def test_a_batch_decodes_into_one_buffer_laid_out_by_batch_layout(native):
    from ray_extsrc.fn._gpu.decode import batch_layout

    sizes = [(37, 53), (64, 64), (5, 300), (1, 1)]
    _, encoded = _jpegs(sizes, 3)
    hw = np.array(sizes, np.int32)
    starts, total = batch_layout(hw)
    assert starts.dtype == np.uint64 and all(int(s) % 256 == 0 for s in starts)
    assert total >= int(starts[-1]) + 3 and total % 256 == 0
    buf = np.full(total, 7, np.uint8)  # the GPU path's one device buffer, here on the host
    dec = native.NativeDecoder(native.DEVICE_CPU_ONLY, [("cpu", 1.0)])
    src = np.array([e.ctypes.data for e in encoded], np.uint64)
    lengths = np.array([e.size for e in encoded], np.uint64)
    result = dec.decode(src, lengths, np.uint64(buf.ctypes.data) + starts, hw, host_buffers=True)
    assert result.tolist() == [1] * len(sizes)
    for (h, w), e, start in zip(sizes, encoded, starts.tolist()):
        ref = simplejpeg.decode_jpeg(e.tobytes(), colorspace="RGB", fastdct=False, fastupsample=False)
        assert np.array_equal(buf[start: start + h * w * 3].reshape(h, w, 3), ref)  # no image overwrote another
    dec.close()


def test_bad_samples_are_reported_one_by_one_and_the_rest_decode(native):
    dec = native.NativeDecoder(native.DEVICE_CPU_ONLY, [("cpu", 1.0)])
    _, encoded = _jpegs([(20, 30), (40, 10), (16, 16)])
    truncated = encoded[2][: encoded[2].size // 3]
    garbage = np.frombuffer(b"certainly not an image", np.uint8)
    batch = [encoded[0], garbage, encoded[1], truncated]
    hw = [(20, 30), (5, 5), (41, 10), (16, 16)]  # sample 2's size is not what its header says
    result, outs = _decode(dec, batch, hw)
    assert result[0] == 1 and result[1] == -1 and result[2] == -2 and result[3] in (-1, 0, 1)  # truncated: not parsed, not decoded, or decoded in part
    assert np.all(outs[2] == 7)  # nothing written where the size did not match
    ref = simplejpeg.decode_jpeg(encoded[0].tobytes(), colorspace="RGB", fastdct=False, fastupsample=False)
    assert np.array_equal(outs[0], ref)
    # the handle of the sample that did not parse was dropped: the next batch is whole again
    result, _ = _decode(dec, encoded, [(20, 30), (40, 10), (16, 16)])
    assert result.tolist() == [1, 1, 1]


def test_an_empty_batch_and_a_bad_backend_set(native):
    dec = native.NativeDecoder(native.DEVICE_CPU_ONLY, [("cpu", 1.0)])
    result, _ = _decode(dec, [], [])
    assert result.size == 0
    with pytest.raises(RuntimeError, match="too many backends"):
        native.NativeDecoder(native.DEVICE_CPU_ONLY, [("cpu", 1.0)] * 9)


def test_the_build_is_cached_and_a_missing_compiler_is_reported(native, monkeypatch, tmp_path):
    first = native._build(native._package_dir())
    assert first.exists() and native._build(native._package_dir()) == first
    monkeypatch.setenv("RAY_EXTSRC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(RuntimeError, match="no-such-cc"):
        native._build(native._package_dir())
    saved = dict(native._state)
    native._state.clear()
    try:
        assert native.library() is None and "no-such-cc" in native.unavailable()
    finally:
        native._state.clear()
        native._state.update(saved)


def test_decode_buffers_are_sized_in_a_few_classes_at_most_an_eighth_over():
    from ray_extsrc.fn._gpu.decode import buffer_bytes

    assert buffer_bytes(0) == buffer_bytes(1) == buffer_bytes(512) == 512
    for total in [513, 4097, 10**6, 160 * 2**20 - 1, 160 * 2**20, 160 * 2**20 + 1, 3 * 10**9]:
        got = buffer_bytes(total)
        assert total <= got <= total * 1.125 + 512 and got % 512 == 0, (total, got)
        assert buffer_bytes(got) == got  # a class size is its own class
    # R1-like batches (256 images of 400-640 x 300-500, ~160 MB decoded) ask for two sizes at most
    rng = np.random.default_rng(0)
    classes = {buffer_bytes(int((rng.integers(400, 641, 256) * rng.integers(300, 501, 256) * 3).sum()))
               for _ in range(200)}
    assert len(classes) <= 2, sorted(classes)
