"""`workers.WorkerPool` on its own: a small program object, real worker processes, real shared memory.

No pipeline here (tests/test_worker_pool.py covers the pool through `pipeline_def`). The autouse
`no_leaks` fixture (conftest) fails any test that leaves a process, a /dev/shm segment or a memfd
segment (the default backend, which has no name in /dev/shm but shows in /proc/self/fd) behind.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

import sources
from conftest import descendants, our_shm
from ray_extsrc.errors import SourceError, WorkerDiedError
from ray_extsrc.types import BatchInfo, SampleInfo
from ray_extsrc.workers import WorkerPool
from ray_extsrc.workers.pool import MAX_REPLAYS, Chunk
from ray_extsrc.workers.shm import DEVSHM, MEMFD, live_memfds

pytestmark = pytest.mark.timeout(60)

BS = 4


def our_segments(backend: str) -> set[str]:
    """This process's segments of ``backend``: memfd names from /proc/self/fd, or /dev/shm paths."""
    return set(live_memfds(creator=os.getpid())) if backend == MEMFD else our_shm()


def infos(iteration: int, epoch_idx: int = 0, bs: int = BS) -> tuple[SampleInfo, ...]:
    return tuple(SampleInfo(iteration * bs + j, j, iteration, epoch_idx) for j in range(bs))


def sample_chunks(iteration: int, epoch_idx: int = 0, per_chunk: int = 2) -> list[Chunk]:
    s = infos(iteration, epoch_idx)
    return [Chunk("samples", s[k : k + per_chunk]) for k in range(0, len(s), per_chunk)]


def batch_chunk(kind: str, iteration: int, epoch_idx: int = 0) -> list[Chunk]:
    return [Chunk(kind, batch=BatchInfo(iteration, epoch_idx))]


@pytest.fixture
def pool_of(request):
    """``pool_of(program, workers, **kw)``: a started pool, closed after the test."""
    pools: list[WorkerPool] = []

    def make(program, workers: int = 2, **kw) -> WorkerPool:
        pool = WorkerPool(program, workers, **kw)
        pools.append(pool)
        pool.start()
        return pool

    yield make
    for pool in pools:
        pool.close()


def run_batch(pool: WorkerPool, iteration: int, epoch_idx: int = 0) -> list[tuple]:
    key = (epoch_idx, iteration)
    pool.submit(key, epoch_idx, iteration, sample_chunks(iteration, epoch_idx))
    out = [tuple(np.array(a) for a in sample) for sample in pool.collect(key, timeout=30)]
    pool.release(key)
    return out


def test_samples_come_back_in_order_as_read_only_views(pool_of, start_method, backend):
    pool = pool_of(sources.PoolProgram(), 3, start_method=start_method, shm_backend=backend)
    assert pool.started and len(pool.pids) == 3 and pool.zygote_pid is not None
    assert os.getpid() not in pool.pids.values() and set(pool.pids.values()) <= descendants()
    for it in range(3):  # submitted before anything is collected: answers arrive out of order
        pool.submit(it, 0, it, sample_chunks(it, per_chunk=1))
    for it in range(3):
        out = pool.collect(it, timeout=30)
        assert [int(s[0][0]) for s in out] == [(it * BS + j) % 251 for j in range(BS)]
        for j, (data, pid) in enumerate(out):
            i = it * BS + j
            assert data.shape == (i % 5 + 1,) and (data == i).all() and not data.flags.writeable
            assert int(pid[0]) in pool.pids.values()
        pool.release(it)
    assert pool.last_compute_s >= 0 and pool.respawns == 0


def test_slots_are_reused_after_release(pool_of, backend):
    pool = pool_of(sources.PoolProgram(), 2, shm_backend=backend)
    run_batch(pool, 0)
    segments = our_segments(backend)
    assert len(segments) == 3  # the status page and the batch's two slots
    for it in range(1, 20):
        run_batch(pool, it)
    assert our_segments(backend) == segments  # no new segment per batch once released


def test_samples_larger_than_the_slot_grow_it(pool_of, backend):
    pool = pool_of(sources.PoolProgram(big=3 << 20), 2, slot_bytes=4096, shm_backend=backend)
    for it in range(2):
        out = run_batch(pool, it)
        assert [s[0].shape for s in out] == [(3 << 20,)] * BS
        assert all((s[0] == (it * BS + j) % 251).all() for j, s in enumerate(out))


def test_batch_program(pool_of, start_method):
    pool = pool_of(sources.PoolProgram("batch"), 2, start_method=start_method)
    for it in range(3):
        pool.submit(it, 5, it, batch_chunk("batch", it, 5))
    for it in range(3):
        assert [(int(a[0]), int(e[0])) for a, e in pool.collect(it, timeout=30)] == [(10 * it, 5), (10 * it + 1, 5)]
        pool.release(it)
    pool.submit(3, 5, 3, batch_chunk("batch", 3, 5))
    with pytest.raises(StopIteration):
        pool.collect(3, timeout=30)


def test_iterable_runs_in_one_worker_and_restarts_each_epoch(pool_of):
    pool = pool_of(sources.PoolProgram("iter", iterations=2), 4)
    assert len(pool.pids) == 1
    for epoch_idx in range(2):
        for it in range(3):
            pool.submit((epoch_idx, it), epoch_idx, it, batch_chunk("iter", it, epoch_idx))
        for it in range(2):
            got = [(int(a[0]), int(e[0])) for a, e in pool.collect((epoch_idx, it), timeout=30)]
            assert got == [(10 * it, epoch_idx), (10 * it + 1, epoch_idx)]
            pool.release((epoch_idx, it))
        with pytest.raises(StopIteration):
            pool.collect((epoch_idx, 2), timeout=30)
        pool.discard()


def test_end_of_epoch_and_source_error(pool_of):
    pool = pool_of(sources.PoolProgram(stop_at=6, fail_at=1), 2)
    pool.submit("a", 0, 0, sample_chunks(0))
    with pytest.raises(SourceError, match=r"ValueError was raised for sample idx_in_epoch=1") as info:
        pool.collect("a", timeout=30)
    assert info.value.idx_in_epoch == 1 and "bad record 1" in info.value.remote_traceback
    with pytest.raises(RuntimeError, match="reset"):  # a failed batch is gone
        pool.collect("a")
    pool.submit("b", 0, 1, sample_chunks(1))
    with pytest.raises(StopIteration):  # samples 4, 5 exist, 6 ends the epoch
        pool.collect("b", timeout=30)
    pool.discard()
    pool.submit("c", 1, 0, sample_chunks(0, epoch_idx=1))  # the next epoch: same error, same sample
    with pytest.raises(SourceError, match=r"idx_in_epoch=1, iteration=0, epoch_idx=1"):
        pool.collect("c", timeout=30)


def test_collect_times_out_and_unknown_keys_are_refused(pool_of):
    pool = pool_of(sources.PoolProgram(), 1)
    with pytest.raises(RuntimeError, match="not submitted"):
        pool.collect("nope")
    pool.submit("k", 0, 0, sample_chunks(0))
    pool.collect("k", timeout=30)
    with pytest.raises(RuntimeError, match="already collected"):
        pool.collect("k")
    pool.release("k")


def test_killed_worker_is_replaced_and_its_task_replayed(pool_of, tmp_path):
    pool = pool_of(sources.PoolProgram(crash_at=5, marker=str(tmp_path / "m")), 2)
    before = dict(pool.pids)
    assert [int(s[0][0]) for s in run_batch(pool, 1)] == [4, 5, 6, 7]
    assert pool.respawns == 1 and (tmp_path / "m").exists()
    assert len(pool.pids) == 2 and pool.pids != before and set(pool.pids) == set(before)
    os.kill(pool.pids[0], signal.SIGKILL)  # from outside, between batches
    assert [int(s[0][0]) for s in run_batch(pool, 2)] == [8, 9, 10, 11]
    assert pool.respawns == 2 and len(pool.pids) == 2


@pytest.mark.parametrize("workers", [1, 2])
def test_sample_that_keeps_killing_workers_fails_its_batch_and_the_pool_recovers(pool_of, workers):
    pool = pool_of(sources.PoolProgram(crash_at=2), workers)
    pool.submit("bad", 0, 0, sample_chunks(0))
    # the zygote reaped the last one and says how it ended
    with pytest.raises(WorkerDiedError, match=rf"idx_in_epoch=\[2, 3\].*killed {MAX_REPLAYS + 1} workers.*killed by SIGKILL\)"):
        pool.collect("bad", timeout=30)
    assert pool.respawns == MAX_REPLAYS + 1 and len(pool.pids) == workers
    pool.discard()
    for it in (1, 2):  # the pool is whole: batches without the bad sample go through
        assert [int(s[0][0]) for s in run_batch(pool, it, epoch_idx=1)] == list(range(it * BS, it * BS + BS))


def test_iterable_worker_death_fails_the_epoch_until_discard(pool_of, tmp_path):
    pool = pool_of(sources.PoolProgram("iter", iterations=3, crash_at=1, marker=str(tmp_path / "m")), 2)
    for it in range(2):
        pool.submit(it, 0, it, batch_chunk("iter", it))
    assert [int(a[0]) for a, _ in pool.collect(0, timeout=30)] == [0, 1]
    pool.release(0)
    with pytest.raises(WorkerDiedError, match=r"iterable source.*reset\(\)"):
        pool.collect(1, timeout=30)
    assert len(pool.pids) == 1 and pool.respawns == 1
    # the iterator's place in the epoch is lost: no later batch of this epoch is served
    pool.submit(2, 0, 2, batch_chunk("iter", 2))
    with pytest.raises(WorkerDiedError, match="iterable source"):
        pool.collect(2, timeout=30)
    pool.discard()  # the epoch reset: a fresh iterator
    for it in range(3):
        pool.submit((1, it), 1, it, batch_chunk("iter", it, 1))
    for it in range(3):
        assert [int(a[0]) for a, _ in pool.collect((1, it), timeout=30)] == [10 * it, 10 * it + 1]
        pool.release((1, it))


def test_discard_forgets_uncollected_batches(pool_of):
    pool = pool_of(sources.PoolProgram(), 2)
    for it in range(4):
        pool.submit(it, 0, it, sample_chunks(it))
    pool.discard()
    for it in range(4):
        with pytest.raises(RuntimeError, match="not submitted"):
            pool.collect(it)
    assert [int(s[0][0]) for s in run_batch(pool, 0, epoch_idx=1)] == [0, 1, 2, 3]


def test_close_stops_every_process_and_unlinks_every_segment(start_method, backend):
    pool = WorkerPool(sources.PoolProgram(), 2, start_method=start_method, shm_backend=backend)
    pool.start()
    procs = set(pool.pids.values()) | {pool.zygote_pid}
    run_batch(pool, 0)
    assert our_segments(backend) and procs <= descendants()
    if backend == MEMFD:
        assert not our_shm()  # nothing of ours in /dev/shm
        for pid in pool.pids.values():  # the workers got the slots as descriptors
            assert live_memfds(pid, creator=os.getpid())
    pool.close()
    pool.close()  # idempotent
    deadline = time.monotonic() + 6  # the zygote gives workers 2 s after SIGTERM, plus margin
    while procs & descendants() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not procs & descendants() and not our_segments(DEVSHM) and not our_segments(MEMFD)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="py_num_workers"):
        WorkerPool(sources.PoolProgram(), 0)
    with pytest.raises(ValueError, match="py_start_method"):
        WorkerPool(sources.PoolProgram(), 1, start_method="forkserver")
    with pytest.raises(ValueError, match=r"'memfd' or 'devshm'.*got 'tmpfs'"):
        WorkerPool(sources.PoolProgram(), 1, shm_backend="tmpfs")
    with pytest.raises(ValueError, match="prefetch_depth"):
        WorkerPool(sources.PoolProgram(), 1, prefetch_depth=0)
    pool = WorkerPool(sources.PoolProgram(), 1)
    with pytest.raises(RuntimeError, match="not started"):
        pool.submit("k", 0, 0, sample_chunks(0))
    pool.close()  # never started: nothing to do


def test_spawn_refuses_an_unpicklable_program():
    program = sources.PoolProgram()
    program.hook = lambda: None
    pool = WorkerPool(program, 1, start_method="spawn")
    with pytest.raises(TypeError, match="picklable"):
        pool.start()
    pool.close()
