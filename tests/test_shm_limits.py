"""Shared memory when /dev/shm is small (Docker's default is 64 MB): memfd does not care, the
/dev/shm fallback fails with a `SharedMemoryError` that says so (never a `WorkerDiedError` blaming
the source), and the pool warns at start when its need will not fit.

The small /dev/shm is real: each such test runs Python in a private mount namespace with a 64 MB
tmpfs mounted on /dev/shm (``unshare -m``; root, as here and on CI). Where that is not permitted the
tests skip, saying why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest

import sources
from ray_extsrc.workers import WorkerPool
from ray_extsrc.workers.capacity import room
from ray_extsrc.workers.shm import DEVSHM, MEMFD, SHM_DIR, SHM_ENV

# a namespace run starts a pipeline (numpy, the package) and moves ~0.5 GB through shared memory
pytestmark = pytest.mark.timeout(180)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
SMALL_SHM_MB = 64
_MB = 1 << 20


BIG_SOURCE = textwrap.dedent(
    """
    import numpy as np

    MB = 1 << 20


    class Big:  # 8 MB a sample: a batch of 8 is all of a 64 MB /dev/shm
        def __call__(self, info):
            if info.iteration >= 4:
                raise StopIteration
            return np.full(8 * MB, info.idx_in_epoch % 251, dtype=np.uint8)
    """
)


@pytest.fixture(scope="module")
def small_shm(tmp_path_factory):
    """Runs ``python -c script`` with a private 64 MB /dev/shm; returns its JSON answer."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) (util-linux) for a private mount namespace")
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size={SMALL_SHM_MB}m tmpfs {SHM_DIR}"],
        capture_output=True, text=True, timeout=30,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private tmpfs on {SHM_DIR} (needs root or CAP_SYS_ADMIN): {probe.stderr.strip()}")

    # the source lives in a module of its own, so a spawned zygote can unpickle it
    modules = tmp_path_factory.mktemp("modules")
    (modules / "bigsource.py").write_text(BIG_SOURCE)

    def run(script: str, **env: str) -> dict:
        shell = f"mount -t tmpfs -o size={SMALL_SHM_MB}m tmpfs {SHM_DIR} && exec \"$0\" -c \"$1\""
        proc = subprocess.run(
            ["unshare", "-m", "sh", "-c", shell, sys.executable, script],
            capture_output=True, text=True, timeout=150, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, TESTS, str(modules)]), **env},
        )
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return run


BIG_PIPELINE = textwrap.dedent(
    """
    import json, os, sys, warnings
    import numpy as np
    from bigsource import MB, Big
    from ray_extsrc import pipeline_def
    from ray_extsrc.pipeline import external_source

    @pipeline_def(batch_size=8, num_threads=1, device_id=None, py_num_workers=4,
                  py_start_method=sys.argv[1], bytes_per_sample_hint=8 * MB)
    def pipe():
        return external_source(source=Big(), batch=False, parallel=True)

    answer = {"shm_mb": os.statvfs("/dev/shm").f_blocks * os.statvfs("/dev/shm").f_frsize // MB}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = pipe()
        p.start_py_workers()
    answer["warnings"] = [str(w.message) for w in caught if w.category is RuntimeWarning]
    seen = []
    try:
        while True:
            (out,) = p.run()
            for k in range(len(out)):
                a = np.asarray(out.at(k))
                i = int(a[0])
                assert a.shape == (8 * MB,) and (a == i).all()
                seen.append(i)
    except StopIteration:
        answer["result"] = "done"
    except Exception as e:
        answer.update(result="error", type=type(e).__name__, bases=[c.__name__ for c in type(e).__mro__],
                      message=str(e), idx_in_epoch=getattr(e, "idx_in_epoch", None))
    answer["seen"] = seen
    answer["respawns"] = p.py_worker_respawns
    p.close()
    print(json.dumps(answer))
    """
)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_memfd_carries_8mb_samples_where_dev_shm_is_64mb(small_shm, method):
    got = small_shm(BIG_PIPELINE.replace("sys.argv[1]", repr(method)))
    assert got["shm_mb"] == SMALL_SHM_MB
    assert got["result"] == "done", got.get("message")
    assert got["seen"] == list(range(32))  # 4 batches of 8, every sample once, in order
    assert got["warnings"] == []  # memfd is sized by memory, which this machine has


def test_dev_shm_fallback_says_shared_memory_is_exhausted(small_shm):
    got = small_shm(BIG_PIPELINE.replace("sys.argv[1]", "'fork'"), **{SHM_ENV: DEVSHM})
    assert got["shm_mb"] == SMALL_SHM_MB
    # start() saw it coming: 2 batches x 8 samples x 8 MB = 128 MB for a 64 MB /dev/shm
    assert len(got["warnings"]) == 1
    assert "may not fit: /dev/shm is 64 MB" in got["warnings"][0] and "needs about 128 MB" in got["warnings"][0]
    assert got["result"] == "error"
    assert got["type"] == "SharedMemoryError" and "SampleError" in got["bases"]
    assert "WorkerDiedError" not in got["bases"] and "SourceError" not in got["bases"]
    message = got["message"]
    assert message.startswith("samples idx_in_epoch=[")  # which samples found no room
    assert "shared memory exhausted (/dev/shm is 64 MB" in message
    # 128 MB however the pipeline splits it (per sample, or per chunk of a worker's share)
    assert "the pool needs about 128 MB (2 batches in flight x " in message
    assert "--shm-size=256m" in message and "medium: Memory" in message and "RAY_EXTSRC_SHM=memfd" in message
    assert "crashes" not in message and got["idx_in_epoch"] is not None
    assert got["respawns"] == 0  # no worker died: the ENOSPC came before any write


SIGBUS_POOL = textwrap.dedent(
    """
    import glob, json, os
    import numpy as np
    from ray_extsrc.errors import SharedMemoryError
    from ray_extsrc.types import SampleInfo
    from ray_extsrc.workers import WorkerPool
    from ray_extsrc.workers.pool import Chunk

    MB = 1 << 20
    FILLER = "/dev/shm/someone_else"

    class TakesTheSlotsPages:
        '''At sample 5 (batch 1, which reuses batch 0's slot) another tenant takes /dev/shm: our
        slot loses its pages behind the worker's reservation (as a segment grown by ftruncate alone
        never had them), and the filler takes the rest, so the worker's write hits SIGBUS.'''
        kind = "samples"

        def __init__(self, owner):
            self.owner = owner

        def run_sample(self, info):
            if info.idx_in_epoch == 5:
                for path in glob.glob(f"/dev/shm/rxs_{self.owner}_*"):
                    if "status" not in path:
                        size = os.path.getsize(path)
                        os.truncate(path, 0)
                        os.truncate(path, size)
                with open(FILLER, "wb") as f:
                    st = os.statvfs("/dev/shm")
                    os.posix_fallocate(f.fileno(), 0, max(MB, st.f_bavail * st.f_frsize - MB // 2))
            return (np.full(MB, info.idx_in_epoch % 251, dtype=np.uint8),)

    def batch(pool, it):
        infos = tuple(SampleInfo(it * 4 + j, j, it, 0) for j in range(4))
        pool.submit(it, 0, it, [Chunk("samples", infos)])
        try:
            out = [int(s[0][0]) for s in pool.collect(it, timeout=60)]
            pool.release(it)
            return {"ok": out}
        except SharedMemoryError as e:
            return {"error": str(e), "idx_in_epoch": e.idx_in_epoch}

    pool = WorkerPool(TakesTheSlotsPages(os.getpid()), 1, shm_backend="devshm", batch_size=4)
    pool.start()
    answer = {"first": batch(pool, 0), "second": batch(pool, 1), "respawns_then": pool.respawns}
    os.unlink(FILLER)  # the tenant leaves: the pool works again (a fresh worker reserves anew)
    pool.discard()
    answer["third"] = batch(pool, 2)
    pool.close()
    print(json.dumps(answer))
    """
)


def test_sigbus_while_writing_a_slot_is_reported_as_shared_memory_exhausted(small_shm):
    got = small_shm(SIGBUS_POOL)
    assert got["first"] == {"ok": [0, 1, 2, 3]}
    second = got["second"]
    assert "error" in second, second
    assert second["error"].startswith("samples idx_in_epoch=[4, 5, 6, 7] (iteration 1, epoch 0)")
    assert "shared memory exhausted (/dev/shm is 64 MB" in second["error"]
    assert "killed by SIGBUS writing this task's output" in second["error"]
    assert "/dev/shm would hold this pool, but other files fill it" in second["error"]
    assert "crashes" not in second["error"] and second["idx_in_epoch"] == 4
    assert got["respawns_then"] == 1  # diagnosed at the first death, not replayed into three more
    assert got["third"] == {"ok": [8, 9, 10, 11]}


@pytest.mark.parametrize("backend", [MEMFD, DEVSHM])
def test_start_warns_when_the_need_does_not_fit(backend):
    have = room(backend)
    assert have.free is not None and have.free > 0
    per_sample = have.free // 2 + _MB  # 2 batches x 2 samples of it: about twice what there is
    pool = WorkerPool(sources.PoolProgram(), 2, slot_bytes=per_sample, batch_size=2, prefetch_depth=2,
                      shm_backend=backend)
    try:
        with pytest.warns(RuntimeWarning, match=r"may not fit: (/dev/shm is \d+ MB, \d+ MB free|memory: \d+ MB "
                                                r"available).*the pool needs about \d+ MB \(2 batches in flight"):
            pool.start()
        assert pool.started  # a warning, not a refusal: the need comes from a hint
    finally:
        pool.close()


def test_no_warning_when_it_fits():
    pool = WorkerPool(sources.PoolProgram(), 2, batch_size=4, prefetch_depth=2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pool.start()
    finally:
        pool.close()


def test_room_reads_dev_shm_and_memory():
    st = os.statvfs(SHM_DIR)
    shm = room(DEVSHM)
    assert abs(shm.free - st.f_bavail * st.f_frsize) < 64 * _MB  # others may write meanwhile
    assert shm.what.startswith(f"{SHM_DIR} is ") and " MB free" in shm.what
    mem = room(MEMFD)
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert 0 < mem.free <= available + 256 * _MB and mem.what.startswith("memory: ")
