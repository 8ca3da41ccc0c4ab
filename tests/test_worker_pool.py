"""The parallel external source end to end: real forked/spawned workers, real shared memory.

The pool's shared-memory backend is memfd by default; tests that are about the backend run on both
(the pipeline builds its pool with ``$RAY_EXTSRC_SHM``, read once when the pool is built). The
autouse `no_leaks` (conftest) checks /dev/shm and the memfds this process holds.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import sources
from conftest import descendants, our_shm
from ray_extsrc import (
    ForkAfterCUDAError,
    LifecycleError,
    SourceError,
    WorkerDiedError,
    pipeline_def,
    types,
)
from ray_extsrc.pipeline import external_source
from ray_extsrc.workers.shm import DEVSHM, MEMFD, SHM_ENV, live_memfds

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(params=[MEMFD, DEVSHM])
def backend(request, monkeypatch) -> str:
    """Pipelines built in the test use this backend."""
    monkeypatch.setenv(SHM_ENV, request.param)
    return request.param


def make(source, *, num_outputs=4, batch=False, workers=3, bs=4, method="fork", **kw):
    @pipeline_def(batch_size=bs, num_threads=1, device_id=None, py_num_workers=workers, py_start_method=method, **kw)
    def pipe():
        out = external_source(source=source, num_outputs=num_outputs, batch=batch, parallel=True)
        return out if num_outputs else (out,)

    p = pipe()
    p.start_py_workers()
    p.build()
    return p


def epoch(p, col=1):
    """Run one epoch; return the list of per-batch arrays of output ``col`` and reset."""
    batches = []
    while True:
        try:
            outs = p.run()
        except StopIteration:
            p.reset()
            return batches
        batches.append(outs[col].as_array().ravel())


def test_every_sample_once_in_order_across_epochs(start_method):
    src = sources.IndexSource(num_samples=30, batch_size=4)
    p = make(src, method=start_method)
    try:
        for e in range(3):
            before = p.epoch_idx
            outs = []
            while True:
                try:
                    data, idx, ep, pid = p.run()
                except StopIteration:
                    p.reset()
                    break
                outs.append(idx.as_array().ravel())
                assert set(ep.as_array().ravel()) == {before}
                # variable-size samples come back per sample, with their contents intact
                for k in range(len(data)):
                    i = int(idx.at(k)[0])
                    assert data.at(k).shape == (i % 7 + 1, 3) and (data.at(k) == i).all()
            assert np.concatenate(outs).tolist() == list(range(28))  # 7 full batches of 4
            assert p.epoch_idx == before + 1
        pids_used = {int(x) for x in pid.as_array().ravel()}
        assert pids_used <= set(p.py_worker_pids.values()) and os.getpid() not in pids_used
    finally:
        p.close()


def test_batch_is_split_across_workers():
    p = make(sources.IndexSource(num_samples=64, batch_size=16), bs=16, workers=4)
    try:
        _, _, _, pid = p.run()
        assert len(set(pid.as_array().ravel())) == 4
    finally:
        p.close()


def test_order_kept_with_uneven_latency():
    p = make(sources.SlowSource(96, 8), num_outputs=None, bs=8, workers=4, prefetch_queue_depth=3)
    try:
        assert np.concatenate(epoch(p, col=0)).tolist() == list(range(96))
    finally:
        p.close()


@pytest.mark.parametrize("batch_info", [True, False])
def test_batch_callable(start_method, batch_info):
    src = sources.BatchSource(batch_size=3, iterations=4)

    @pipeline_def(batch_size=3, num_threads=1, py_num_workers=2, py_start_method=start_method)
    def pipe():
        return external_source(source=src, num_outputs=2, batch=True, batch_info=batch_info, parallel=True)

    p = pipe()
    try:
        p.start_py_workers()
        p.build()
        for e in range(2):
            labels = []
            while True:
                try:
                    lab, ep = p.run()
                except StopIteration:
                    p.reset()
                    break
                labels += lab.as_array().ravel().tolist()
                assert set(ep.as_array().ravel()) == ({e} if batch_info else {-1})
            assert labels == list(range(12))
    finally:
        p.close()


@pytest.mark.parametrize("source", [sources.BatchIterable(2, 3), sources.batch_generator])
def test_iterable_runs_in_one_dedicated_worker_and_restarts_each_epoch(source, start_method):
    @pipeline_def(batch_size=2, num_threads=1, py_num_workers=4, py_start_method=start_method)
    def pipe():
        return external_source(source=source, parallel=True, batch=True, cycle="raise")

    p = pipe()
    try:
        p.start_py_workers()
        assert len(p.py_worker_pids) == 1
        for _ in range(2):
            assert np.concatenate(epoch(p, col=0)).tolist() == list(range(6))
    finally:
        p.close()


def test_parallel_false_runs_in_this_process():
    src = sources.IndexSource(num_samples=8, batch_size=4)

    @pipeline_def(batch_size=4, num_threads=1, py_num_workers=2)
    def pipe():
        return external_source(source=src, num_outputs=4, batch=False, parallel=False)

    p = pipe()
    try:
        p.build()
        assert p.py_worker_pids == {}
        _, idx, _, pid = p.run()
        assert idx.as_array().ravel().tolist() == [0, 1, 2, 3]
        assert set(pid.as_array().ravel()) == {os.getpid()}
    finally:
        p.close()


def test_source_error_names_sample_worker_and_traceback_quickly(start_method):
    p = make(sources.FailingSource(bad_idx=9), num_outputs=None, method=start_method)
    try:
        p.run(), p.run()
        t0 = time.monotonic()
        with pytest.raises(SourceError) as info:
            p.run()  # batch 2 holds sample 9
        assert time.monotonic() - t0 < 1.0
        err = info.value
        assert err.idx_in_epoch == 9 and err.iteration == 2 and err.epoch_idx == 0
        assert err.pid in p.py_worker_pids.values() and err.worker_id in p.py_worker_pids
        assert "cannot read record 9" in str(err) and "idx_in_epoch=9" in str(err)
        assert "sources.py" in err.remote_traceback and "raise ValueError" in err.remote_traceback
        with pytest.raises(LifecycleError, match=r"stopped at batch 2 with SourceError.*reset\(\)"):
            p.run()
        # the pool survives: the next epoch (where the source no longer fails) is complete
        p.reset()
        assert np.concatenate(epoch(p, col=0)).tolist() == list(range(32))
    finally:
        p.close()


def test_unpicklable_exception_does_not_hang():
    p = make(sources.UnpicklableErrorSource(), num_outputs=None)
    try:
        with pytest.raises(SourceError, match="_Unpicklable"):
            p.run()
    finally:
        p.close()


def test_wrong_dtype_names_the_sample():
    @pipeline_def(batch_size=2, num_threads=1, py_num_workers=1)
    def pipe():
        return external_source(source=sources.WrongDtypeSource(), batch=False, parallel=True, dtype=types.INT64)

    p = pipe()
    try:
        with pytest.raises(SourceError, match=r"idx_in_epoch=0.*float64.*dtype=int64"):
            p.run()
    finally:
        p.close()


def test_killed_worker_is_replaced_and_its_samples_replayed(start_method, tmp_path):
    src = sources.SuicideSource(num_samples=40, batch_size=4, victim=13, marker=str(tmp_path / "killed"))
    p = make(src, num_outputs=2, method=start_method)
    try:
        pids_before = set(p.py_worker_pids.values())
        labels = np.concatenate(epoch(p, col=0)).tolist()
        assert labels == list(range(40))  # every sample exactly once, in order
        assert (tmp_path / "killed").exists() and p.py_worker_respawns == 1
        assert set(p.py_worker_pids.values()) != pids_before and len(p.py_worker_pids) == 3
        assert np.concatenate(epoch(p, col=0)).tolist() == list(range(40))
    finally:
        p.close()


def test_worker_killed_from_outside_mid_epoch():
    p = make(sources.IndexSource(num_samples=64, batch_size=4), prefetch_queue_depth=3)
    try:
        seen = [p.run()[1].as_array().ravel()]
        victim = p.py_worker_pids[1]
        os.kill(victim, signal.SIGKILL)
        seen += epoch(p)
        assert np.concatenate(seen).tolist() == list(range(64))
        assert victim not in p.py_worker_pids.values()
    finally:
        p.close()


def test_sample_that_always_kills_its_worker_is_reported():
    p = make(sources.AlwaysCrashSource(), num_outputs=None, workers=2)
    try:
        with pytest.raises(WorkerDiedError, match=r"idx_in_epoch=\[.*2.*\].*killed 4 workers"):
            p.run()
    finally:
        p.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_pool_is_usable_after_a_sample_killed_too_many_workers(workers):
    # issue 12, bug 1: the worker was dropped, not replaced; after reset() run() hit ZeroDivisionError
    p = make(sources.CrashInFirstEpochSource(16, 4, victim=2), num_outputs=None, workers=workers)
    try:
        with pytest.raises(WorkerDiedError, match=r"idx_in_epoch=\[.*2.*\].*killed 4 workers"):
            p.run()
        p.reset()
        assert len(p.py_worker_pids) == workers
        assert np.concatenate(epoch(p, col=0)).tolist() == list(range(16))
        assert np.concatenate(epoch(p, col=0)).tolist() == list(range(16))
    finally:
        p.close()


def test_iterable_worker_death_then_reset_restarts_the_iterable(tmp_path):
    # issue 12, bug 2: the message says reset(); after reset() run() hit KeyError: 0
    src = sources.SuicideIterable(batch_size=2, iterations=4, victim=1, marker=str(tmp_path / "killed"))

    @pipeline_def(batch_size=2, num_threads=1, py_num_workers=2, prefetch_queue_depth=2)
    def pipe():
        return external_source(source=src, parallel=True, batch=True, cycle="raise")

    p = pipe()
    try:
        p.start_py_workers()
        p.build()
        with pytest.raises(WorkerDiedError, match=r"iterable source.*reset\(\)"):
            while True:
                p.run()
        assert (tmp_path / "killed").exists()
        p.reset()
        assert len(p.py_worker_pids) == 1
        assert np.concatenate(epoch(p, col=0)).tolist() == list(range(8))
        assert np.concatenate(epoch(p, col=0)).tolist() == list(range(8))
    finally:
        p.close()


def test_fork_after_cuda_is_refused_with_the_fix(monkeypatch):
    # No GPU here: pretend the driver is initialised, as ray_extsrc.workers.cuda_initialized()
    # reports after cuInit (the GPU test suite checks the real detection).
    monkeypatch.setattr("ray_extsrc.workers.pool.cuda_initialized", lambda: True)

    @pipeline_def(batch_size=2, num_threads=1, py_num_workers=2)
    def pipe():
        return external_source(source=sources.IndexSource(8, 2), num_outputs=4, batch=False, parallel=True)

    p = pipe()
    with pytest.raises(ForkAfterCUDAError, match=r"CUDA is already initialised.*start_py_workers\(\).*spawn"):
        p.start_py_workers()
    p.close()
    p = pipe(py_start_method="spawn")  # the documented fix works
    try:
        p.start_py_workers()
        assert p.run()[1].as_array().ravel().tolist() == [0, 1]
    finally:
        p.close()


def test_cuda_detection_without_a_gpu_is_false():
    from ray_extsrc.workers import cuda_initialized

    assert cuda_initialized() is False


def test_spawn_needs_a_picklable_source():
    @pipeline_def(batch_size=2, num_threads=1, py_num_workers=1, py_start_method="spawn")
    def pipe():
        return external_source(source=sources.LambdaHolder(), batch=False, parallel=True)

    p = pipe()
    with pytest.raises(TypeError, match=r"picklable source.*py_start_method='fork'"):
        p.start_py_workers()
    p.close()


def test_slots_grow_for_samples_larger_than_the_hint():
    p = make(sources.BigSampleSource(), num_outputs=None, bs=3, workers=2, bytes_per_sample_hint=1024)
    try:
        for it in range(3):
            out = p.run()[0]
            for k in range(3):
                i = it * 3 + k
                assert out.at(k).size == 50_000 * (i + 1) and (out.at(k) == i % 251).all()
    finally:
        p.close()


def test_both_backends_carry_samples_to_forked_and_spawned_workers(backend, start_method):
    src = sources.IndexSource(num_samples=24, batch_size=4)
    p = make(src, method=start_method)
    try:
        assert np.concatenate(epoch(p)).tolist() == list(range(24))
        memfds, files = set(live_memfds(creator=os.getpid())), our_shm()
        # the status page and a slot per chunk in flight, in one backend only
        assert len(memfds if backend == MEMFD else files) >= 2 and not (files if backend == MEMFD else memfds)
        for pid in p.py_worker_pids.values():  # workers hold the slots they were sent, not the others'
            assert set(live_memfds(pid, creator=os.getpid())) <= memfds
    finally:
        p.close()


def test_shared_memory_is_private(backend):
    p = make(sources.IndexSource(8, 4))
    try:
        p.run()
        if backend == DEVSHM:
            segs = our_shm()
            assert segs and all(os.stat(s).st_mode & 0o777 == 0o600 for s in segs)
        else:  # no name anywhere: only processes holding a descriptor can reach them
            assert live_memfds(creator=os.getpid()) and not our_shm()
            for name in set(live_memfds(creator=os.getpid())):
                assert name.startswith(f"memfd:rxs_{os.getpid()}_")
    finally:
        p.close()


def test_lifecycle_errors_say_which_step():
    p = make(sources.IndexSource(8, 4))
    with pytest.raises(LifecycleError, match="already done"):
        p.start_py_workers()
    p.close()
    with pytest.raises(LifecycleError, match="closed"):
        p.run()


def test_garbage_collection_stops_workers():
    p = make(sources.IndexSource(8, 4))
    p.run()
    pids = set(p.py_worker_pids.values())
    del p
    gc.collect()
    deadline = time.monotonic() + 5
    while pids & descendants() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pids & descendants()


def test_fifty_epochs_leak_nothing():
    p = make(sources.IndexSource(num_samples=12, batch_size=4), workers=2)
    try:
        for _ in range(3):  # steady state: slots of tasks still running at an epoch's end are reused
            epoch(p)
        fds, shm, procs = len(os.listdir("/proc/self/fd")), our_shm(), descendants()
        for _ in range(50):
            assert len(epoch(p)) == 3
        assert len(os.listdir("/proc/self/fd")) == fds and our_shm() == shm and descendants() == procs
    finally:
        p.close()


CTRL_C_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import sources
    from ray_extsrc import pipeline_def
    from ray_extsrc.pipeline import external_source

    @pipeline_def(batch_size=4, num_threads=1, py_num_workers=2)
    def pipe():
        return external_source(source=sources.SlowSource(10**6, 4), batch=False, parallel=True)

    p = pipe()
    p.start_py_workers()
    p.run()
    print("READY", flush=True)
    while True:
        p.run()
    """
)


def _segments_of(pid: int, backend: str) -> set[str]:
    return set(live_memfds(pid, creator=pid)) if backend == MEMFD else our_shm(pid)


def test_ctrl_c_leaves_no_processes_or_shared_memory(backend):
    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_SCRIPT.format(tests=os.path.dirname(__file__))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal would give it
    )
    try:
        assert proc.stdout.readline().strip() == "READY"
        assert _segments_of(proc.pid, backend)
        tree = descendants(proc.pid)
        assert len(tree) == 3  # zygote + 2 workers
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        _, err = proc.communicate(timeout=20)
        assert "KeyboardInterrupt" in err
        deadline = time.monotonic() + 6
        while tree & descendants(1) | tree & set(map(int, filter(str.isdigit, os.listdir("/proc")))) and time.monotonic() < deadline:
            time.sleep(0.05)
        alive = {p for p in tree if os.path.exists(f"/proc/{p}")}
        assert not alive, f"processes outlived Ctrl-C: {alive}"
        assert not our_shm(proc.pid)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_parent_killed_leaves_no_processes_or_shared_memory(backend):
    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_SCRIPT.format(tests=os.path.dirname(__file__))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        assert proc.stdout.readline().strip() == "READY"
        tree = descendants(proc.pid)
        assert len(tree) == 3 and _segments_of(proc.pid, backend)
        # memfds die with the last process holding one: the workers must not outlive the parent
        os.kill(proc.pid, signal.SIGKILL)  # no finalizer runs in the parent
        proc.wait(timeout=10)
        deadline = time.monotonic() + 8
        while ({p for p in tree if os.path.exists(f"/proc/{p}")} or our_shm(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not {p for p in tree if os.path.exists(f"/proc/{p}")}, "workers or zygote outlived their parent"
        assert not our_shm(proc.pid), "the dead parent's segments were not unlinked"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
