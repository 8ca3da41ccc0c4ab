"""Shared-memory segments and the layout of samples inside them.

The parent creates every segment (`Segment.create`), so it alone owns and unlinks them. A worker
opens a segment by name (`Segment.attach`), writes a chunk of samples into it (`write_samples`) and
reports where each array lies (`ArrayMeta`). A chunk larger than the segment grows it in place
(`ftruncate` on the same name) and reports the new capacity; the parent remaps before reading.

Segments are private: created O_EXCL with mode 0600, named ``/rxs_<pid>_<random>_<n>`` so a leak
check can find ours. We use `_posixshmem` directly rather than `multiprocessing.shared_memory`
because the latter registers every segment with a resource tracker process that would warn about
(or unlink) segments owned by another process.

Orphans: a process killed before it closes its segments (kill -9) leaves them behind. Whoever
outlives it (the pool's zygote, a loader actor's janitor) calls `unlink_segments(pid)` once it is
gone; `segment_glob(pid)` is the pattern a leak check looks for.
"""

from __future__ import annotations

import glob
import mmap
import os
import secrets
from collections.abc import Sequence

import _posixshmem
import numpy as np

from .messages import ArrayMeta

__all__ = [
    "SHM_PREFIX",
    "Segment",
    "layout_size",
    "read_samples",
    "segment_glob",
    "unlink_segments",
    "write_samples",
]

SHM_PREFIX = "rxs_"
_SHM_DIR = "/dev/shm"  # where Linux exposes POSIX shared memory as files
_ALIGN = 64  # cache-line alignment of every array


def segment_glob(pid: int) -> str:
    """Glob (a path under /dev/shm) of every segment created by process ``pid``."""
    return f"{_SHM_DIR}/{SHM_PREFIX}{int(pid)}_*"


def unlink_segments(pid: int) -> int:
    """Unlink every segment created by process ``pid``; return how many were unlinked.

    Only for a process that is gone (killed before it could close its segments): a live owner
    still needs the names, since its workers attach to its segments by name.
    """
    count = 0
    for path in glob.glob(segment_glob(pid)):
        try:
            os.unlink(path)
        except OSError:  # someone else unlinked it first
            continue
        count += 1
    return count


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class Segment:
    """One POSIX shared-memory segment mapped into this process."""

    def __init__(self, name: str, fd: int, size: int, owner: bool) -> None:
        self.name = name
        self.fd = fd
        self.owner = owner
        self.size = 0
        self.buf: mmap.mmap | None = None
        self._map(size)

    @classmethod
    def create(cls, size: int, tag: str = "") -> Segment:
        name = f"/{SHM_PREFIX}{os.getpid()}_{tag}{secrets.token_hex(4)}"
        fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            _posixshmem.shm_unlink(name)
            raise
        return cls(name, fd, size, owner=True)

    @classmethod
    def attach(cls, name: str) -> Segment:
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

    def grow(self, needed: int) -> None:
        if needed <= self.size:
            return
        new_size = max(needed, self.size * 2)
        os.ftruncate(self.fd, new_size)
        self._map(new_size)

    def close(self) -> None:
        self.buf = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.owner:
            try:
                _posixshmem.shm_unlink(self.name)
            except FileNotFoundError:
                pass
            self.owner = False


def layout_size(samples: Sequence[Sequence[np.ndarray]]) -> int:
    return sum(_align(a.nbytes) for sample in samples for a in sample)


def write_samples(seg: Segment, samples: Sequence[Sequence[np.ndarray]]) -> tuple[tuple[ArrayMeta, ...], ...]:
    """Copy ``samples`` (per sample, per output) into ``seg``, growing it if needed."""
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
