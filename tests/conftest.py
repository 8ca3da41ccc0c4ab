"""Shared fixtures. Every test fails if it leaks a child process, a /dev/shm segment of ours, or a
memfd segment this process created and still holds (the default backend, `workers.shm`)."""

from __future__ import annotations

import collections
import gc
import glob
import os
import time

import pytest

from ray_extsrc.workers.shm import DEVSHM, MEMFD, SHM_PREFIX, live_memfds

# How long a test's leftovers may take to go away after close(): the zygote gives workers 2 s
# after SIGTERM before SIGKILL, so 6 s leaves room on a loaded 2-core CI machine.
_LEAK_GRACE_S = 6.0


def descendants(pid: int | None = None) -> set[int]:
    """pids of every live (non-zombie) process below ``pid`` (default: this process)."""
    root = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    out: set[int] = set()
    todo = [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def our_shm(pid: int | None = None) -> set[str]:
    """Our segments created by process ``pid`` (default: this one); the name carries the creator's
    pid, so test runs in parallel on one machine do not see each other's segments."""
    return set(glob.glob(f"/dev/shm/{SHM_PREFIX}{os.getpid() if pid is None else pid}_*"))


# A loader actor killed by Ray leaves its segments to its janitor (or its zygote), which unlink
# them once Ray has ended the process: 10 s covers Ray's reaping on a loaded 2-core machine.
_DEAD_OWNER_SHM_GRACE_S = 10.0


def assert_no_segments_of(pids) -> None:
    """No /dev/shm segment created by any process in ``pids`` remains (within the grace time)."""
    pids = set(pids)
    assert pids, "no process to check"
    deadline = time.monotonic() + _DEAD_OWNER_SHM_GRACE_S
    while True:
        left = sorted(f for p in pids for f in our_shm(p))
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not left, f"shared memory left behind by loader actors: {left}"


@pytest.fixture(autouse=True)
def no_leaks(request):
    if request.node.get_closest_marker("allow_children"):
        yield
        return
    procs_before, shm_before = descendants(), our_shm()
    memfds_before = collections.Counter(live_memfds(creator=os.getpid()))
    yield
    deadline = time.monotonic() + _LEAK_GRACE_S
    gc.collect()  # a pipeline dropped without close() lets go of its segments at collection
    while True:
        procs, shm = descendants() - procs_before, our_shm() - shm_before
        memfds = collections.Counter(live_memfds(creator=os.getpid())) - memfds_before
        if not procs and not shm and not memfds or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not procs, f"test leaked child processes: {sorted(procs)}"
    assert not shm, f"test leaked shared-memory segments: {sorted(shm)}"
    assert not memfds, f"test leaked memfd segments (still open here): {sorted(memfds.elements())}"


@pytest.fixture(params=["fork", "spawn"])
def start_method(request) -> str:
    return request.param


@pytest.fixture(params=[MEMFD, DEVSHM])
def backend(request) -> str:
    """The shared-memory backends of `workers.shm`: memfd (the default) and the /dev/shm fallback."""
    return request.param


def pytest_configure(config):
    config.addinivalue_line("markers", "allow_children: the test may leave processes (e.g. a Ray cluster)")
