"""`PinnedStaging`: a consumer stage's encoded bytes in page-locked memory, reused only after the GPU
has passed the batch that read them; and a consumer stage with and without it makes the same batch."""

from __future__ import annotations

import numpy as np
import pytest

from ray_extsrc.host_batch import HostBatch, pack_column
from ray_extsrc.types import SampleInfo

from . import gpu_ready


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(120),
    pytest.mark.skipif(not gpu_ready(), reason="needs a GPU with CuPy"),
]


def _batch(seed: int, n: int = 6) -> HostBatch:
    rng = np.random.default_rng(seed)
    samples = [rng.integers(0, 256, int(rng.integers(1000, 50000)), dtype=np.uint8) for _ in range(n)]
    infos = tuple(SampleInfo(j, j, 0, 0) for j in range(n))
    return HostBatch(0, 0, infos, {1: {0: pack_column(samples), 1: [np.int32(j) for j in range(n)]}})


def _is_pinned(a: np.ndarray) -> bool:
    import cupy

    attrs = cupy.cuda.runtime.pointerGetAttributes(a.ctypes.data)
    return attrs.type == cupy.cuda.runtime.memoryTypeHost


def test_staged_bytes_are_pinned_equal_and_other_columns_untouched():
    from ray_extsrc.pinned_staging import PinnedStaging

    staging = PinnedStaging()
    try:
        batch = _batch(0)
        staged, held = staging.stage(batch)
        assert len(held) == 1
        col, orig = staged.columns[1][0], batch.columns[1][0]
        assert _is_pinned(col.data) and not _is_pinned(orig.data)
        assert np.array_equal(col.data, orig.data) and np.array_equal(col.offsets, orig.offsets)
        assert staged.columns[1][1] is batch.columns[1][1]
        assert [bytes(a) for a in col.samples()] == [bytes(a) for a in orig.samples()]
        staging.release(held, None)
    finally:
        staging.close()


def test_a_buffer_is_reused_only_after_its_event():
    import cupy

    from ray_extsrc.pinned_staging import PinnedStaging

    staging = PinnedStaging()
    stream = cupy.cuda.Stream(non_blocking=True)
    try:
        first, held = staging.stage(_batch(1))
        ptr = first.columns[1][0].data.ctypes.data
        with stream:  # keep the GPU busy, then record the "batch done" event behind that work
            x = cupy.ones((4096, 4096), cupy.float32)
            for _ in range(20):
                x = x @ x / 4096
            pending = stream.record()
        staging.release(held, pending)
        second, held2 = staging.stage(_batch(1))
        if not pending.done:  # still in flight: a different buffer, and the first one is intact
            assert second.columns[1][0].data.ctypes.data != ptr
        staging.release(held2, None)
        pending.synchronize()
        third, held3 = staging.stage(_batch(2))  # both idle now: one of them is reused, none made
        assert third.columns[1][0].data.ctypes.data in (ptr, second.columns[1][0].data.ctypes.data)
        assert np.array_equal(third.columns[1][0].data, _batch(2).columns[1][0].data)
        staging.release(held3, None)
    finally:
        staging.close()


@pytest.mark.skipif(not gpu_ready(nvimgcodec=True, torch=True), reason="needs nvImageCodec and CUDA-enabled torch too")
def test_consumer_stage_gives_the_same_batch_with_and_without_pinned_bytes(tmp_path):
    import torch

    from ray_extsrc.bench._pipelines import r1_pipeline
    from ray_extsrc.consumer_stage import ConsumerStage
    from ray_extsrc.synthetic import R1, make_jpeg_dataset
    import dataclasses

    root = str(make_jpeg_dataset(tmp_path / "r1", dataclasses.replace(R1, num_images=64), progress=False))
    # spawned workers: the tests before this one initialised CUDA in this process
    pipe = r1_pipeline(root=root, batch=32, batch_size=32, device_id=0, py_num_workers=2, py_start_method="spawn")
    try:
        pipe.serve_host_stage()
        pipe.build()
        hb = pipe.run()[0]
    finally:
        pipe.close()
    dev = torch.device("cuda", 0)
    outs = []
    for pin in (True, False):
        stage = ConsumerStage(r1_pipeline, {"root": root, "batch": 32, "batch_size": 32}, dev, "test", pin_host_bytes=pin)
        try:
            reply = type("Reply", (), {"end": False, "outputs": (hb,), "skipped": ()})()
            _, outputs = stage.submit(lambda r=reply: r).result(timeout=60)
            images, labels = stage.to_torch(outputs)
            torch.cuda.synchronize()
            outs.append((images.cpu(), labels.cpu()))
        finally:
            stage.close()
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
