"""`Loader(gpu_stage="consumer")`: the loader actors stop after the host stage and the Train worker
runs the pipeline's main-stage ops itself (`consumer_stage`). On this CPU machine the main stage is
the CPU decode and augmentation of a batch source (a batch source keeps every op out of the
workers), so the split, the host-batch packing and the consumer-side execution all run for real:
real forked workers, shared memory, Ray actors, the same ops the GPU stage drives.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

ray = pytest.importorskip("ray")
torch = pytest.importorskip("torch")
simplejpeg = pytest.importorskip("simplejpeg")

import ray_extsrc.fn as fn  # noqa: E402
from conftest import assert_no_segments_of  # noqa: E402
import ray_extsrc  # noqa: E402
from ray_extsrc import pipeline_def  # noqa: E402
from ray_extsrc.host_batch import HostBatch, PackedBytes, pack_column, unpack_column  # noqa: E402
from ray_extsrc.train import Loader, mps_daemon_running, resolve_gpu_stage  # noqa: E402
from ray_extsrc.types import SampleInfo  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [pytest.mark.timeout(120), pytest.mark.allow_children,
              pytest.mark.filterwarnings("ignore::ray_extsrc.pipeline.NoGPUWarning")]  # CPU machine: mixed ops on the CPU

N, B = 40, 4  # 10 global batches


def _jpeg(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    img = rng.integers(0, 255, (24 + i % 5, 32, 3), dtype=np.uint8)
    return np.frombuffer(simplejpeg.encode_jpeg(img, quality=90), np.uint8)


class JpegBatches:
    """Batch g: the JPEGs of samples g*B .. g*B+B-1 and their labels (= idx_in_epoch)."""

    def __call__(self, g: int):  # a batch callable without batch_info gets the global iteration
        if g >= N // B:
            raise StopIteration
        idx = range(g * B, (g + 1) * B)
        return [_jpeg(i) for i in idx], [np.int64([i]) for i in idx]


@pipeline_def(batch_size=B, num_threads=2, py_num_workers=1, seed=7)
def jpeg_pipeline():
    jpegs, labels = fn.external_source(source=JpegBatches(), num_outputs=2, batch=True, parallel=True)
    images = fn.decoders.image_random_crop(jpegs, device="mixed")
    images = fn.resize(images, size=(16, 16))
    images = fn.crop_mirror_normalize(images, mirror=fn.random.coin_flip(), mean=[128.0] * 3, std=[64.0] * 3)
    return images, labels


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _epoch(it):
    return [(b["images"].clone(), b["labels"].clone()) for b in it]


def test_pack_column_round_trips_bytes_and_copies_the_rest():
    a = [np.arange(n, dtype=np.uint8) for n in (3, 0, 5)]
    packed = pack_column(a)
    assert isinstance(packed, PackedBytes) and len(packed) == 3 and packed.data.nbytes == 8
    assert all(np.array_equal(x, y) for x, y in zip(unpack_column(packed), a))
    src = np.zeros((2, 2), np.float32)
    other = pack_column([src, 5])
    src[0, 0] = 1  # the packed column holds a copy (the original may be a shared-memory slot)
    assert other[0][0, 0] == 0 and other[1] == 5
    hb = HostBatch(0, 0, (SampleInfo(0, 0, 0, 0),), {3: {0: packed}})
    assert hb.nbytes == 8 and len(hb.env()[3][0]) == 3


def test_auto_is_the_training_benchmarks_winner_and_stages_are_validated(monkeypatch, tmp_path):
    # the consumer stage won the training benchmark on an H200 (see resolve_gpu_stage), without MPS
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    assert not mps_daemon_running()
    assert resolve_gpu_stage("auto", has_gpu=True) == "consumer"
    assert resolve_gpu_stage("auto", has_gpu=False) == "actor"
    (tmp_path / "control").touch()  # an MPS daemon's control pipe
    assert mps_daemon_running()
    assert resolve_gpu_stage("auto", has_gpu=True) == "actor"  # kernels of separate processes overlap
    assert resolve_gpu_stage("actor", has_gpu=True) == "actor"
    assert resolve_gpu_stage("consumer", has_gpu=False) == "consumer"
    with pytest.raises(ValueError, match="gpu_stage"):
        Loader(jpeg_pipeline, gpu_stage="trainer")


def test_actors_and_stage_threads_by_default(monkeypatch):
    from ray_extsrc.consumer_stage import stage_threads
    from ray_extsrc.gpu_stage_choice import default_actors_per_worker

    # an actor that only runs the host stage keeps up alone; one that drives the GPU does not
    assert default_actors_per_worker("consumer", has_gpu=True) == 1
    assert default_actors_per_worker("actor", has_gpu=True) == 3
    assert default_actors_per_worker("actor", has_gpu=False) == 1
    monkeypatch.delenv("RAY_EXTSRC_CONSUMER_THREADS", raising=False)
    assert (stage_threads(True), stage_threads(False)) == (2, 1)
    monkeypatch.setenv("RAY_EXTSRC_CONSUMER_THREADS", "3")
    assert (stage_threads(True), stage_threads(False)) == (3, 3)
    for bad in ("0", "two"):
        monkeypatch.setenv("RAY_EXTSRC_CONSUMER_THREADS", bad)
        with pytest.raises(ValueError, match="RAY_EXTSRC_CONSUMER_THREADS"):
            stage_threads(True)


def test_the_start_up_report_gives_each_milestone_in_order():
    """`LoaderIterator.startup_report`: seconds from the start of the actors to each milestone of
    the slowest actor, then the consumer-side stage's first host batch and decoded batch."""
    it = Loader(jpeg_pipeline, outputs=("images", "labels"), gpu_stage="consumer", actors_per_worker=2).iter_torch_batches()
    try:
        batches = iter(it)
        next(batches)
        next(batches)  # from the second actor: every actor has made a batch now
        up = it.startup_report()
    finally:
        it.close()
    # the last actor's milestones in order (the first batch may come from another actor before)
    order = ["actor_init_began", "actor_workers_started", "actor_ready", "actor_first_batch"]
    assert [up[k] for k in order] == sorted(up[k] for k in order), up
    # a process Ray started before (a reused worker) started before this start: a negative figure
    assert up["actor_process_started"] <= up["actor_init_began"] and up["first_batch"] < 60
    assert up["first_host_batch"] <= up["first_decoded"] <= up["first_batch"]
    assert it.stats()["startup_first_batch_s"] == pytest.approx(up["first_batch"], abs=1e-3)


def test_the_device_stage_warms_up_only_once_opened_and_has_nothing_to_make_without_a_gpu():
    from ray_extsrc.errors import LifecycleError

    pipe = jpeg_pipeline()
    with pytest.raises(LifecycleError, match="open_device_stage"):
        pipe.warm_up_device()
    pipe.open_device_stage()
    assert pipe.warm_up_device() == []  # this machine's plan decodes on the CPU: no GPU decoder to make
    pipe.close()


def test_a_milestone_is_when_the_last_actor_reached_it_and_only_once_all_have():
    from ray_extsrc.loader_iterator import _last_to_reach

    reports = [{"ready": 102.0, "first_batch": 103.5}, {"ready": 102.5}]
    assert _last_to_reach(reports, 100.0) == {"actor_ready": 2.5}  # actor 1 has made no batch yet
    reports[1]["first_batch"] = 103.0
    assert _last_to_reach(reports, 100.0) == {"actor_ready": 2.5, "actor_first_batch": 3.5}
    assert _last_to_reach([], 100.0) == {}


def test_a_process_start_time_is_when_it_started():
    import subprocess
    import time

    from ray_extsrc.actor import process_start_time

    before = time.time()
    child = subprocess.Popen(["sleep", "5"])
    try:
        time.sleep(0.5)
        assert before - 0.05 <= process_start_time(child.pid) <= before + 0.3  # /proc's ticks: 10 ms
    finally:
        child.kill()
        child.wait()
    assert process_start_time(10**9) == pytest.approx(time.time(), abs=1)  # no such process: now


def test_consumer_stage_gives_the_same_batches_as_the_actor_stage():
    """Same seed, same positions: crop boxes, flips and decodes are rebuilt in the consumer exactly."""
    epochs = {}
    for stage in ("actor", "consumer"):
        loader = Loader(jpeg_pipeline, outputs=("images", "labels"), gpu_stage=stage, actors_per_worker=2)
        it = loader.iter_torch_batches()
        epochs[stage] = (_epoch(it), _epoch(it))
        assert it.stats()["gpu_stage"] == stage
        assert it.stats()["transport"] == ("host_batch" if stage == "consumer" else "host")
        if stage == "consumer":  # the encoded bytes came through the actors' rings, not the object store
            rings = [it.describe(w)["host_ring"] for w in range(2)]
            assert sum(r["placed"] for r in rings) >= 2 * (N // B) and all(r["fallbacks"] == 0 for r in rings)
            # each batch's bytes were packed straight into a ring slot (copied once, not twice)
            assert all(r["packed_in_place"] == r["placed"] for r in rings), rings
            # the stage was built in its own thread, before its first batch was handed over
            st = it.stats()
            assert 0 <= st["startup_stage_built_s"] <= st["startup_first_batch_s"], st
        pids = it.actor_pids
        it.close()
        assert_no_segments_of(pids)
    for e in range(2):
        a, c = epochs["actor"][e], epochs["consumer"][e]
        assert len(a) == len(c) == N // B
        for (ia, la), (ic, lc) in zip(a, c):
            assert torch.equal(la, lc)
            assert torch.equal(ia, ic)
    labels = torch.cat([lab for _, lab in epochs["consumer"][0]]).flatten().tolist()
    assert labels == list(range(N))  # every sample once, in order
    # a new epoch draws new crops/flips (the consumer takes the epoch from the batch, not its own pipeline)
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(epochs["consumer"][0], epochs["consumer"][1]))


def test_consumer_stage_resumes_exactly_once_and_survives_a_killed_actor():
    loader = Loader(jpeg_pipeline, outputs=("images", "labels"), gpu_stage="consumer", actors_per_worker=2)
    it = loader.iter_torch_batches(rank=0, world_size=2)
    seen, state = [], None
    for n, b in enumerate(it):
        seen += b["labels"].flatten().tolist()
        if n == 1:
            state = it.state_dict()
            victim = it.describe(1)["pid"]
            import os
            import signal

            os.kill(victim, signal.SIGKILL)  # Ray restarts it; it serves the batch we wait for
    assert len(seen) == (N // B // 2) * B and it.stats()["actor_restarts"] >= 1
    # resume the same epoch after batch 2 (consumed 4 global batches) on one rank: the rest of it
    it.close()
    one = Loader(jpeg_pipeline, outputs=("images", "labels"), gpu_stage="consumer").iter_torch_batches(
        state=state, rank=0, world_size=1)
    rest = [x for b in one for x in b["labels"].flatten().tolist()]
    one.close()
    assert sorted(rest) == list(range(4 * B, N))


def _host_batch() -> HostBatch:
    """One host batch of `jpeg_pipeline`, as its loader actor would send it (host stage only)."""
    twin = jpeg_pipeline()
    twin.serve_host_stage()
    twin.build()
    try:
        return twin.run()[0]
    finally:
        twin.close()


def test_a_loader_actor_packs_into_its_ring_and_a_move_gives_the_batch_packed_ahead_back(monkeypatch):
    """The actor (plain Python here) packs each host batch straight into a ring slot; leaving an
    epoch early drops the batch its run-ahead thread had packed, and its slot comes back: with
    every slot that leaked, the ring would run out and batches would go through the object store."""
    from ray_extsrc.actor import LoaderActor, LoaderSpec
    from ray_extsrc.host_ring import RingRef, discard

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the actor sets it for its process: put it back after
    spec = LoaderSpec(jpeg_pipeline, {}, ("images", "labels"), num_shards=1, shard_id=0, seed=7,
                      gpu_stage="consumer", host_ring_slots=3)
    actor = LoaderActor(spec)
    try:
        ring = actor._ring
        for epoch in range(2 * ring.num_slots):  # two batches of each epoch, then the next epoch
            for it in range(2):
                reply = actor.next_batch(epoch, 0, it)
                (batch,) = reply.outputs
                assert isinstance(batch.columns[next(iter(batch.columns))][0], RingRef)
                discard(batch)  # a consumer that will not use it: its slot back, unmapped
        st = ring.stats()
        n = 4 * ring.num_slots
        assert st["placed"] == n and st["packed_in_place"] == n and st["fallbacks"] == 0, st
    finally:
        actor.close()


def test_a_batch_whose_actor_died_before_it_was_mapped_is_asked_for_again():
    """The consumer maps a host batch's bytes from its actor's ring; an actor killed after sending it
    takes the ring along (`host_ring.HostRingLost`), and the stage asks the restarted actor again."""
    from ray_extsrc.actor import BatchReply
    from ray_extsrc.consumer_stage import ConsumerStage
    from ray_extsrc.host_ring import HostRing, HostRingLost

    host = _host_batch()
    ring = HostRing(1, backend="devshm")
    lost = ring.place(host)
    ring.close()  # what the actor's death does to its ring
    stage = ConsumerStage(jpeg_pipeline, {}, torch.device("cpu"))
    try:
        def reply(batch):
            return BatchReply(0, 0, 0, end=False, outputs=(batch,))

        again = []
        _, outputs = stage.submit(lambda: reply(lost), lambda: again.append(1) or reply(host)).result(60)
        _, direct = stage.submit(lambda: reply(host)).result(60)
        assert again == [1] and np.array_equal(outputs[0].as_array(), direct[0].as_array())
        with pytest.raises(HostRingLost, match="is gone"):
            stage.submit(lambda: reply(lost)).result(60)
    finally:
        stage.close()


def test_the_stage_is_built_in_the_background_and_a_build_error_reaches_the_first_batch():
    """`ConsumerStage` builds its pipeline (on a GPU: imports, streams, decoders) in a thread of its
    own, so the consumer's thread returns at once and builds its model meanwhile; a batch waits for
    the build, and what the build raised is raised by each batch, naming the loader."""
    import threading

    from ray_extsrc.actor import BatchReply
    from ray_extsrc.consumer_stage import ConsumerStage

    host = _host_batch()
    gate, builder = threading.Event(), []

    def slow_pipeline(**kwargs):
        builder.append(threading.current_thread().name)
        assert gate.wait(30)
        return jpeg_pipeline(**kwargs)

    def reply():
        return BatchReply(0, 0, 0, end=False, outputs=(host,))

    stage = ConsumerStage(slow_pipeline, {}, torch.device("cpu"), "loader 'slow'")
    try:
        assert stage.pipe is None and stage.last_main_ops_s == 0.0  # constructed: not built yet
        fut = stage.submit(reply)
        assert not fut.done()  # fetched, waiting for the build
        gate.set()
        _, outputs = fut.result(60)
        assert outputs[0].as_array().shape[0] == B and stage.built(5) is stage.pipe
        assert builder and builder[0].startswith("ray_extsrc-consumer-stage-build")
    finally:
        gate.set()
        stage.close()

    def not_a_pipeline(**kwargs):
        return "nope"

    broken = ConsumerStage(not_a_pipeline, {}, torch.device("cpu"), "loader 'broken'")
    try:
        for _ in range(2):  # every batch raises it, and nothing else breaks
            with pytest.raises(TypeError, match="loader 'broken': the Loader's pipeline function must return a Pipeline; got str"):
                broken.submit(reply).result(60)
    finally:
        broken.close()  # nothing was built: nothing to close


class FileBatches:
    """Batch g: the files of a folder (encoded JPEGs), read as a file-list source reads them."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __call__(self, g: int):
        if g >= 8:
            raise StopIteration
        names = sorted(os.listdir(self.folder))
        return [np.fromfile(os.path.join(self.folder, n), np.uint8) for n in names], [np.int64([i]) for i in range(len(names))]


def _heap_private_dirty_mb(pid: int) -> float:
    kb, in_heap = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if not line[0].isupper():
                in_heap = line.rstrip().endswith("[heap]")
            elif in_heap and line.startswith("Private_Dirty:"):
                kb += int(line.split()[1])
    return kb / 1024


def test_a_loader_actors_worker_gives_its_tasks_freed_heap_back(tmp_path):
    """A worker frees each task's samples once they are in shared memory, before it waits for the
    next task: held until the next task replaced them, they kept glibc from reusing their heap
    pages (each worker of a loader actor grew by ~32 MB; this one by 21 MB in 8 tasks)."""
    rng = np.random.default_rng(0)
    for i in range(256):
        img = rng.integers(0, 255, (96 + i % 64, 128, 3), dtype=np.uint8)
        np.frombuffer(simplejpeg.encode_jpeg(img, quality=95), np.uint8).tofile(tmp_path / f"{i:03d}.jpg")

    @pipeline_def(batch_size=256, num_threads=1, py_num_workers=1, seed=7)
    def file_pipeline():
        jpegs, labels = fn.external_source(source=FileBatches(str(tmp_path)), num_outputs=2, batch=True, parallel=True)
        return fn.resize(fn.decoders.image(jpegs, device="mixed"), size=(16, 16)), labels

    it = Loader(file_pipeline, outputs=("images", "labels"), gpu_stage="consumer", actors_per_worker=1).iter_torch_batches()
    try:
        assert sum(1 for _ in it) == 8
        (pid,) = it.worker_pids().values()
        assert _heap_private_dirty_mb(pid) < 12  # a task's samples: 256 JPEGs, ~10 MB
    finally:
        it.close()


class JpegBatchesWithGarbage(JpegBatches):
    """JpegBatches, with sample 9's bytes not an image (a corrupt file)."""

    def __call__(self, g: int):
        jpegs, labels = super().__call__(g)
        return [np.frombuffer(b"garbage!" * 8, np.uint8) if int(lab[0]) == 9 else x
                for x, lab in zip(jpegs, labels)], labels


@pipeline_def(batch_size=B, num_threads=2, py_num_workers=1, seed=7)
def garbage_pipeline():
    jpegs, labels = fn.external_source(source=JpegBatchesWithGarbage(), num_outputs=2, batch=True, parallel=True)
    images = fn.decoders.image_random_crop(jpegs, device="mixed")
    return fn.resize(images, size=(16, 16)), labels


def test_a_corrupt_sample_is_replaced_alike_in_both_stages_and_counted_once():
    """on_error="skip": the decoder runs in the actor or in the consumer; either way the corrupt
    sample becomes the same copy of another sample of its batch (image and label), and stats() names it."""
    epochs, stats = {}, {}
    for stage in ("actor", "consumer"):
        it = Loader(garbage_pipeline, outputs=("images", "labels"), gpu_stage=stage, on_error="skip",
                    max_error_rate=0.1).iter_torch_batches()
        epochs[stage] = _epoch(it)
        stats[stage] = it.stats()
        it.close()
    for (ia, la), (ic, lc) in zip(epochs["actor"], epochs["consumer"]):
        assert torch.equal(la, lc) and torch.equal(ia, ic)
    labels = [lab.flatten().tolist() for _, lab in epochs["consumer"]]
    assert len(labels) == N // B and 9 not in sum(labels, [])
    twin = labels[2][1]  # slot 1 of batch 2 held sample 9; now a copy of another sample of that batch
    k = next(k for k, x in enumerate(labels[2]) if x == twin and k != 1)
    assert twin in (8, 10, 11) and torch.equal(epochs["consumer"][2][0][1], epochs["consumer"][2][0][k])
    for s in stats.values():
        assert s["skipped_samples"] == 1
        assert s["skipped"][0]["idx_in_epoch"] == 9 and s["skipped"][0]["substitute"] == twin
        assert s["skipped"][0]["error"].startswith("DecodeError")
    with pytest.raises(ValueError, match="on_error must be one of"):
        Loader(garbage_pipeline, on_error="drop")
    it = Loader(garbage_pipeline, outputs=("images", "labels"), gpu_stage="consumer").iter_torch_batches()
    with pytest.raises(ray_extsrc.DecodeError, match="idx_in_epoch=9"):  # the default: raise, as DALI
        _epoch(it)
    it.close()
