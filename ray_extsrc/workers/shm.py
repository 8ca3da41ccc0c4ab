"""Shared-memory segments and the layout of samples inside them.

The parent creates every segment (`Segment.create`), so it alone owns them. A worker gets each
segment as a file descriptor (`Segment.from_fd`; how the descriptor travels: `pool` NOTE [task
channel]), writes a chunk of samples into it (`write_samples`) and reports where each array lies
(`ArrayMeta`). A chunk larger than the segment grows it in place (``ftruncate`` on the worker's own
descriptor of the same file) and reports the new capacity; the parent remaps (after ``fstat``)
before reading.

Two backends, chosen once per pool (`choose_backend`; tests and users force one with
``RAY_EXTSRC_SHM=memfd|devshm``):

* ``"memfd"`` (the default where the kernel has ``memfd_create``): anonymous memory files, created
  close-on-exec. They have no name in any filesystem, so nothing can leak past the processes that
  hold them, and they do not count against the size of /dev/shm (Docker gives containers 64 MB
  there): only against memory (and the cgroup's memory limit), like any other allocation.
* ``"devshm"`` (the fallback): POSIX segments in /dev/shm, private: created O_EXCL with mode 0600,
  named ``/rxs_<pid>_<random>_<n>`` so a leak check can find ours. /dev/shm is a tmpfs of fixed size
  and a write into a page it has no room for kills the writer with SIGBUS, so a writer reserves
  every byte it is about to write with ``posix_fallocate`` first (`Segment.reserve`): running out
  becomes an ENOSPC error naming the sample, never a dead worker. We use `_posixshmem` directly
  rather than `multiprocessing.shared_memory`, whose resource tracker would warn about (or unlink)
  segments owned by another process.

Orphans (devshm only): a process killed before it closes its segments (kill -9) leaves them behind.
Whoever outlives it (the pool's zygote, a loader actor's janitor) calls `unlink_segments(pid)` once
it is gone; `segment_glob(pid)` is the pattern a leak check looks for. A memfd is freed by the
kernel when its last descriptor and mapping go; `live_memfds(pid)` lists those a process holds.
"""

from __future__ import annotations

import functools
import glob
import mmap
import os
import secrets
from collections.abc import Sequence

import _posixshmem
import numpy as np

from .messages import ArrayMeta

__all__ = [
    "DEVSHM",
    "MEMFD",
    "SHM_DIR",
    "SHM_ENV",
    "SHM_PREFIX",
    "Segment",
    "choose_backend",
    "layout_size",
    "live_memfds",
    "memfd_available",
    "read_samples",
    "segment_glob",
    "unlink_segments",
    "write_samples",
]

SHM_PREFIX = "rxs_"
SHM_DIR = "/dev/shm"  # where Linux exposes POSIX shared memory as files
SHM_ENV = "RAY_EXTSRC_SHM"  # forces a backend; read once, when a pool is built
MEMFD = "memfd"
DEVSHM = "devshm"
_MEMFD_TAG = "memfd:"  # what the kernel prefixes a memfd's name with in /proc/<pid>/fd
_ALIGN = 64  # cache-line alignment of every array


@functools.cache
def memfd_available() -> bool:
    """Can this process create memfds? (Linux >= 3.17; a seccomp profile may still refuse.)"""
    try:
        os.close(os.memfd_create(f"{SHM_PREFIX}probe", os.MFD_CLOEXEC))
    except (AttributeError, OSError):
        return False
    return True


def choose_backend(requested: str | None = None) -> str:
    """The backend to use: ``requested``, else ``$RAY_EXTSRC_SHM``, else memfd where available."""
    choice = requested or os.environ.get(SHM_ENV) or (MEMFD if memfd_available() else DEVSHM)
    if choice not in (MEMFD, DEVSHM):
        raise ValueError(
            f"shared-memory backend must be {MEMFD!r} or {DEVSHM!r} (argument shm_backend or ${SHM_ENV}); "
            f"got {choice!r}"
        )
    if choice == MEMFD and not memfd_available():
        raise ValueError(
            f"shared-memory backend {MEMFD!r} was asked for, but os.memfd_create is not available here "
            f"(old kernel or seccomp); use {DEVSHM!r} (set {SHM_ENV}={DEVSHM} or leave it unset)"
        )
    return choice


def segment_glob(pid: int) -> str:
    """Glob (a path under /dev/shm) of every devshm segment created by process ``pid``."""
    return f"{SHM_DIR}/{SHM_PREFIX}{int(pid)}_*"


def unlink_segments(pid: int) -> int:
    """Unlink every devshm segment created by process ``pid``; return how many were unlinked.

    Only for a process that is gone (killed before it could close its segments): a live owner's
    segments are in use.
    """
    count = 0
    for path in glob.glob(segment_glob(pid)):
        try:
            os.unlink(path)
        except OSError:  # someone else unlinked it first
            continue
        count += 1
    return count


def live_memfds(pid: int | None = None, creator: int | None = None) -> list[str]:
    """Names of the memfd segments process ``pid`` (default: this one) holds open, one per
    descriptor; only those created by process ``creator`` (default: any of ours)."""
    prefix = f"/{_MEMFD_TAG}{SHM_PREFIX}" + (f"{int(creator)}_" if creator is not None else "")
    fd_dir = f"/proc/{os.getpid() if pid is None else int(pid)}/fd"
    out = []
    try:
        fds = os.listdir(fd_dir)
    except OSError:  # the process is gone
        return out
    for fd in fds:
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith(prefix):
            out.append(target[1:].removesuffix(" (deleted)"))
    return out


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class Segment:
    """One shared-memory segment (a memfd or a /dev/shm file) mapped into this process."""

    def __init__(self, name: str, fd: int, size: int, owner: bool) -> None:
        self.name = name  # also the slot's key in the task protocol
        self.fd = fd
        self.owner = owner
        self.backend = MEMFD if name.startswith(_MEMFD_TAG) else DEVSHM
        self.size = 0
        self.reserved = 0  # devshm: bytes this process has already reserved (posix_fallocate)
        self.buf: mmap.mmap | None = None
        self._map(size)

    @classmethod
    def create(cls, size: int, tag: str = "", backend: str | None = None) -> Segment:
        """A new segment of ``size`` bytes, owned by this process. Its pages are not reserved yet:
        a devshm writer reserves what it writes (`reserve`)."""
        backend = choose_backend(backend)
        base = f"{SHM_PREFIX}{os.getpid()}_{tag}{secrets.token_hex(4)}"
        if backend == MEMFD:
            fd = os.memfd_create(base, os.MFD_CLOEXEC)
            name, unlink = _MEMFD_TAG + base, None
        else:
            name = "/" + base
            fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
            unlink = name
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            if unlink:
                _posixshmem.shm_unlink(unlink)
            raise
        return cls(name, fd, size, owner=True)

    @classmethod
    def from_fd(cls, name: str, fd: int) -> Segment:
        """The segment ``name`` through a descriptor received from its owner (taken over: closed
        by `close`)."""
        return cls(name, fd, os.fstat(fd).st_size, owner=False)

    @classmethod
    def attach(cls, name: str) -> Segment:
        """A devshm segment opened by name (another process's; not owned)."""
        fd = _posixshmem.shm_open(name, os.O_RDWR, mode=0o600)
        return cls(name, fd, os.fstat(fd).st_size, owner=False)

    def _map(self, size: int) -> None:
        # Views handed out earlier keep the old mapping alive until they are dropped, so we never
        # close it here (closing a mapping with exported buffers raises BufferError).
        self.buf = mmap.mmap(self.fd, size) if size else None
        self.size = size

    def remap(self) -> None:
        """Follow a growth made by another process."""
        size = os.fstat(self.fd).st_size
        if size != self.size:
            self._map(size)

    def reserve(self, nbytes: int) -> None:
        """devshm: make sure the first ``nbytes`` have pages, so writing them cannot SIGBUS.

        Raises OSError (ENOSPC) when /dev/shm has no room. A no-op for memfd, whose pages come
        from memory like any allocation's (past a memory limit the kernel's OOM killer acts).
        """
        if self.backend == DEVSHM and nbytes > self.reserved:
            os.posix_fallocate(self.fd, 0, nbytes)
            self.reserved = nbytes

    def grow(self, needed: int, size: int | None = None) -> None:
        """Make the first ``needed`` bytes writable: extend the file where it is smaller (to ``size``,
        by default double its size, at least ``needed``) and reserve them."""
        if needed > self.size:
            # extending the file allocates nothing (a devshm file stays sparse until `reserve`)
            new_size = max(needed, self.size * 2 if size is None else size)
            os.ftruncate(self.fd, new_size)
            self._map(new_size)
        self.reserve(needed)

    def close(self) -> None:
        self.buf = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.owner:
            if self.backend == DEVSHM:
                try:
                    _posixshmem.shm_unlink(self.name)
                except FileNotFoundError:
                    pass
            self.owner = False


def layout_size(samples: Sequence[Sequence[np.ndarray]]) -> int:
    return sum(_align(a.nbytes) for sample in samples for a in sample)


def write_samples(seg: Segment, samples: Sequence[Sequence[np.ndarray]]) -> tuple[tuple[ArrayMeta, ...], ...]:
    """Copy ``samples`` (per sample, per output) into ``seg``, growing it if needed.

    Raises OSError (ENOSPC) before writing anything when a devshm segment cannot get the room.
    """
    seg.grow(layout_size(samples))
    out = []
    offset = 0
    for sample in samples:
        metas = []
        for a in sample:
            if a.nbytes:
                dst = np.ndarray(a.shape, dtype=a.dtype, buffer=seg.buf, offset=offset)
                np.copyto(dst, a, casting="no")
            metas.append((offset, a.shape, a.dtype.str))
            offset += _align(a.nbytes)
        out.append(tuple(metas))
    return tuple(out)


def read_samples(seg: Segment, layout: Sequence[Sequence[ArrayMeta]]) -> list[tuple[np.ndarray, ...]]:
    """Zero-copy read-only views of the samples ``layout`` describes. Copy before the slot is reused."""
    out = []
    for metas in layout:
        arrays = []
        for offset, shape, dtype in metas:
            if all(shape):
                a = np.ndarray(shape, dtype=dtype, buffer=seg.buf, offset=offset)
            else:
                a = np.empty(shape, dtype=dtype)
            a.flags.writeable = False
            arrays.append(a)
        out.append(tuple(arrays))
    return out
