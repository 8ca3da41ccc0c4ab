"""`workers.shm` on its own: real memfds and real POSIX shared memory, real processes on the other side.

Most tests run on both backends (`backend`). The autouse `no_leaks` fixture (conftest) fails a test
that leaves a segment of this process in /dev/shm or a memfd open;
segments of the child processes started here are checked by the tests themselves.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import our_shm
from ray_extsrc.workers.shm import (
    DEVSHM,
    MEMFD,
    SHM_ENV,
    SHM_PREFIX,
    Segment,
    choose_backend,
    layout_size,
    live_memfds,
    memfd_available,
    read_samples,
    segment_glob,
    unlink_segments,
    write_samples,
)

pytestmark = pytest.mark.timeout(60)


def path_of(seg: Segment) -> str:
    """Where the segment's file can be seen: its /dev/shm path, or our /proc/self/fd entry."""
    return "/dev/shm" + seg.name if seg.backend == DEVSHM else f"/proc/self/fd/{seg.fd}"


def samples_of(n: int, scale: int = 1) -> list[tuple[np.ndarray, ...]]:
    """Per sample: a uint8 image-like array, a float32 vector, an int64 label, an empty array."""
    return [
        (
            np.full((scale * (i + 1), 3), i, dtype=np.uint8),
            np.arange(i + 2, dtype=np.float32) / 3,
            np.int64([i]),
            np.empty((0, 4), dtype=np.int16),
        )
        for i in range(n)
    ]


def assert_same(got, want) -> None:
    assert len(got) == len(want)
    for g_sample, w_sample in zip(got, want):
        assert len(g_sample) == len(w_sample)
        for g, w in zip(g_sample, w_sample):
            assert g.dtype == w.dtype and g.shape == w.shape and np.array_equal(g, w)


def test_create_is_private_and_named_for_its_creator():
    seg = Segment.create(4096, tag="t_", backend=DEVSHM)
    try:
        assert seg.name.startswith(f"/{SHM_PREFIX}{os.getpid()}_t_") and seg.size == 4096
        assert os.stat(path_of(seg)).st_mode & 0o777 == 0o600
        assert os.path.getsize(path_of(seg)) == 4096
        assert our_shm() == {path_of(seg)}
    finally:
        seg.close()
    assert not os.path.exists(path_of(seg)) and not our_shm()
    seg.close()  # idempotent


def test_memfd_is_anonymous_and_named_for_its_creator():
    assert memfd_available()  # Linux >= 3.17: every machine this runs on
    seg = Segment.create(4096, tag="t_", backend=MEMFD)
    try:
        assert seg.name.startswith(f"memfd:{SHM_PREFIX}{os.getpid()}_t_") and seg.backend == MEMFD
        assert os.readlink(path_of(seg)) == f"/{seg.name} (deleted)"  # no name in any filesystem
        assert os.fstat(seg.fd).st_size == 4096 and not our_shm()
        assert set(live_memfds(creator=os.getpid())) == {seg.name}  # (mmap holds a dup of the fd)
        assert not os.get_inheritable(seg.fd)  # MFD_CLOEXEC: a spawned process does not get it
    finally:
        seg.close()
    assert live_memfds(creator=os.getpid()) == []
    seg.close()  # idempotent


def test_backend_choice(monkeypatch):
    monkeypatch.delenv(SHM_ENV, raising=False)
    assert choose_backend() == MEMFD and choose_backend(DEVSHM) == DEVSHM
    monkeypatch.setenv(SHM_ENV, DEVSHM)
    assert choose_backend() == DEVSHM and choose_backend(MEMFD) == MEMFD  # the argument wins
    monkeypatch.setenv(SHM_ENV, "hugepages")
    with pytest.raises(ValueError, match=rf"'memfd' or 'devshm'.*\${SHM_ENV}.*got 'hugepages'"):
        choose_backend()


def test_devshm_reserves_what_is_written_and_no_more():
    seg = Segment.create(1 << 20, backend=DEVSHM)
    try:
        assert os.stat(path_of(seg)).st_blocks == 0  # created sparse: a hint costs no /dev/shm
        want = samples_of(3, scale=10_000)
        write_samples(seg, want)
        allocated = os.stat(path_of(seg)).st_blocks * 512
        assert layout_size(want) <= allocated < layout_size(want) + (64 << 10)
        assert seg.reserved == layout_size(want)
    finally:
        seg.close()


def test_write_then_read_back_zero_copy(backend):
    seg = Segment.create(1 << 16, backend=backend)
    try:
        want = samples_of(5)
        layout = write_samples(seg, want)
        assert seg.size == 1 << 16  # it fitted: no growth
        offsets = [off for sample in layout for off, _, _ in sample]
        assert all(off % 64 == 0 for off in offsets) and offsets == sorted(offsets)
        got = read_samples(seg, layout)
        assert_same(got, want)
        assert all(not a.flags.writeable for sample in got for a in sample)
        # views, not copies: a later write into the slot shows through
        first = got[0][0]
        write_samples(seg, [tuple(np.full_like(a, 7) for a in want[0])])
        assert (first == 7).all()
    finally:
        seg.close()


def test_layout_size_is_aligned_per_array():
    assert layout_size([(np.zeros(1, np.uint8),)]) == 64
    assert layout_size([(np.zeros(65, np.uint8), np.zeros(0, np.uint8)), (np.zeros(8, np.float64),)]) == 128 + 64


def test_grows_in_place_keeping_its_name(backend):
    seg = Segment.create(4096, backend=backend)
    try:
        ino = os.stat(path_of(seg)).st_ino
        want = samples_of(4, scale=2000)  # ~60 KB: far past the 4 KiB slot
        assert layout_size(want) > 4096
        layout = write_samples(seg, want)
        assert seg.size >= layout_size(want)
        assert os.stat(path_of(seg)).st_ino == ino and os.fstat(seg.fd).st_size == seg.size
        assert_same(read_samples(seg, layout), want)
        if backend == DEVSHM:
            assert our_shm() == {path_of(seg)}  # grown, not replaced
        else:
            assert set(live_memfds(creator=os.getpid())) == {seg.name}  # (mmap holds a dup of the fd)
    finally:
        seg.close()


WRITER = textwrap.dedent(
    """
    import pickle, sys
    import numpy as np
    from ray_extsrc.workers.shm import Segment, write_samples
    # a devshm segment by name; a memfd through the descriptor it inherited
    seg = Segment.from_fd(sys.argv[1], int(sys.argv[2])) if len(sys.argv) > 2 else Segment.attach(sys.argv[1])
    samples = [(np.full((n, 5), n % 251, dtype=np.uint8), np.int64([n])) for n in (10, 20_000, 3)]
    layout = write_samples(seg, samples)
    sys.stdout.buffer.write(pickle.dumps((seg.size, layout)))
    seg.close()  # not the owner: closes, does not unlink
    """
)


def test_another_process_attaches_grows_and_the_owner_remaps(backend):
    seg = Segment.create(4096, backend=backend)
    try:
        fd_args = [str(seg.fd)] if backend == MEMFD else []
        out = subprocess.run(
            [sys.executable, "-c", WRITER, seg.name, *fd_args],
            capture_output=True, check=True, timeout=30, pass_fds=(seg.fd,) if fd_args else (),
        ).stdout
        capacity, layout = pickle.loads(out)
        assert capacity > 4096 and seg.size == 4096  # grown by the writer; this mapping is stale
        assert os.path.exists(path_of(seg))  # the writer's close() did not unlink it
        seg.remap()
        assert seg.size == capacity
        got = read_samples(seg, layout)
        for (data, label), n in zip(got, (10, 20_000, 3)):
            assert data.shape == (n, 5) and (data == n % 251).all() and label.tolist() == [n]
    finally:
        seg.close()


def test_old_views_survive_growth_and_close(backend):
    seg = Segment.create(4096, backend=backend)
    small = samples_of(1)
    view = read_samples(seg, write_samples(seg, small))[0][0]
    write_samples(seg, samples_of(2, scale=5000))  # remaps; the old mapping lives on in `view`
    seg.close()
    assert not our_shm()
    assert np.array_equal(view, small[0][0])
    if backend == MEMFD:  # the view's mapping (CPython's mmap keeps a dup of the fd) holds the memory
        assert len(live_memfds(creator=os.getpid())) == 1
        del view
        assert not live_memfds(creator=os.getpid())


def test_unlink_segments_of_a_dead_process():
    # A process that dies without closing its segments (os._exit skips every finalizer).
    code = textwrap.dedent(
        """
        import os
        from ray_extsrc.workers.shm import Segment
        segs = [Segment.create(4096, tag=f"{k}_", backend="devshm") for k in range(3)]
        print(os.getpid(), flush=True)
        os._exit(0)
        """
    )
    pid = int(subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, timeout=30).stdout)
    try:
        assert segment_glob(pid) == f"/dev/shm/{SHM_PREFIX}{pid}_*"
        assert len(our_shm(pid)) == 3  # the leak it left
        assert unlink_segments(pid) == 3
        assert not our_shm(pid)
        assert unlink_segments(pid) == 0  # nothing left: nothing to do
    finally:
        unlink_segments(pid)


def test_unlink_segments_only_touches_that_pid():
    seg = Segment.create(4096, backend=DEVSHM)
    try:
        other = max(int(p) for p in os.listdir("/proc") if p.isdigit()) + 1_000_000  # no such process
        assert unlink_segments(other) == 0
        assert os.path.exists(path_of(seg))
        # "12" must not match "123": the pid is followed by "_"
        assert not segment_glob(12).endswith("12*")
    finally:
        seg.close()
