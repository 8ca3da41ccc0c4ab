"""`HostRing`: a loader actor's shared-memory slots for the host batches it sends to the consumer
on its node (``Loader(gpu_stage="consumer")``), instead of Ray's object store.

Why: a host batch is mostly one buffer of encoded bytes (R1, batch 256: ~17 MB). Through the object
store, each batch lands in fresh pages of the node's store before the store reuses freed ones: one
loader actor touched 294 MB of them after 16 batches (a plain Ray actor returning 17 MB arrays, 3 in
flight, about 660 MB), and those pages count in the RSS of the actor and again of the Train worker
that maps them. Here each actor owns ``slots`` segments (`workers.shm.Segment`: a memfd, or a
/dev/shm file where memfds are refused), each holding one batch's packed bytes; a batch in flight
holds its slot until the consumer lets go of the last view of its bytes, so the pages the loader
touches are bounded by the slots, which are few (the requests a consumer keeps in flight to one
actor, plus the batch it is using, plus one).

The protocol (one header word per slot, in a small shared segment, plus a sequence number):

* the actor's pipeline packs a batch's encoded bytes straight into a ``FREE`` slot, which it marks
  ``RESERVED`` (`reserve`: the pipeline's run-ahead threads copy the samples out of the workers'
  shared memory once, into the slot); `place` then marks it ``SENT`` and sends a `RingRef` per
  column (the path of the segment, the slot, its sequence number, offsets) in the `HostBatch`
  instead of the bytes. A batch packed elsewhere (no slot was free when it was packed) is copied
  into a free slot by `place`. A batch dropped unsent (an epoch reset, an error) gives its slot
  back when its views are gone. With no slot free at all (a consumer holding more batches than
  expected, or one that died holding some) the batch goes through the object store as before
  (`HostRing.fallbacks` counts those).
* the consumer (`attach`) opens the segment by its path (``/proc/<actor pid>/fd/<n>`` for a memfd:
  same node, same user), maps it for this batch alone and gives `PackedBytes` views of it; it marks
  the slot with its pid while it holds it. When the last view is garbage-collected the mapping goes
  and the slot is marked ``FREE``. A batch the consumer will not use is given back unmapped
  (`discard`).
* an actor that finds no free slot reclaims those held by a process that is gone.

If the actor dies between sending a batch and the consumer's `attach`, the segment is gone with it:
`attach` raises `HostRingLost` and the consumer asks the restarted actor for the batch again
(`consumer_stage.ConsumerStage`). NumPy only; ``RAY_EXTSRC_HOST_RING=0`` turns the ring off
(every batch through the object store).
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import RayExtSrcError
from .host_batch import HostBatch, PackedBytes
from .workers.shm import MEMFD, SHM_DIR, Segment

__all__ = ["HOST_RING_ENV", "HostRing", "HostRingLost", "RingRef", "attach", "discard", "ring_slots"]

HOST_RING_ENV = "RAY_EXTSRC_HOST_RING"  # "0": every host batch through Ray's object store
FREE = 0
SENT = -1  # written by the actor, not yet attached; a positive value is the pid holding the slot
RESERVED = -2  # the actor's: a batch is being packed into it, or copied (not sent yet)
_WORDS = 2  # per slot in the header: state, sequence number of the batch in it
_ALIGN = 4096  # each column's bytes start on a page
_GROWTH = 1.25  # a slot is made this much larger than the first batch it holds


def ring_slots(requests_in_flight: int) -> int:
    """Slots for an actor with up to ``requests_in_flight`` requests from its consumer: those, the
    batch the consumer is using, and one spare; 0 where ``$RAY_EXTSRC_HOST_RING`` is "0"."""
    if os.environ.get(HOST_RING_ENV, "1") == "0":
        return 0
    return max(3, requests_in_flight + 2)


class HostRingLost(RayExtSrcError):
    """A host batch's shared memory is gone: the loader actor that sent it died before the
    consumer mapped it. The consumer asks for the batch again (the actor is restarted by Ray)."""


@dataclass(frozen=True)
class RingRef:
    """A `PackedBytes` column left in a loader actor's `HostRing`: what crosses instead of its bytes."""

    header: str  # path of the ring's header segment
    path: str  # path of the slot's segment
    slot: int
    seq: int  # the batch's sequence number in the slot (a stale reference is refused)
    offset: int  # where the column's bytes start in the slot
    offsets: np.ndarray  # int64, samples + 1: sample j is bytes offsets[j]:offsets[j+1] of the column

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def nbytes(self) -> int:
        return int(self.offsets[-1])


def _path(seg: Segment) -> str:
    """A path another process of this node (same user) opens ``seg`` by."""
    if seg.backend == MEMFD:
        return f"/proc/{os.getpid()}/fd/{seg.fd}"
    return SHM_DIR + seg.name


def _round_up(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _layout(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Where each of a batch's columns of ``sizes`` bytes starts in its slot (on a page), and the end."""
    starts, end = [], 0
    for n in sizes:
        starts.append(end)
        end = _round_up(end + n)
    return starts, max(end, 1)


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


class HostRing:
    """The actor's side: ``slots`` segments, made and grown as batches need (see the module docstring)."""

    def __init__(self, slots: int, backend: str | None = None) -> None:
        if slots < 1:
            raise ValueError(f"HostRing needs at least one slot; got {slots}")
        self._backend = backend
        self._header = Segment.create(slots * _WORDS * 8, tag="ring", backend=backend)
        self._header.reserve(slots * _WORDS * 8)
        self._header_path = _path(self._header)
        self._words = np.ndarray((slots, _WORDS), np.int64, buffer=self._header.buf)
        self._words[:] = 0
        self._slots: list[Segment | None] = [None] * slots
        self._seq = 0
        # `reserve` runs in the pipeline's run-ahead threads, `place` in the actor's; a reserved
        # slot's finalizer in whichever thread drops its batch (re-entrant: maybe inside `place`)
        self._lock = threading.RLock()
        self._reserved: dict[int, weakref.ref] = {}  # slot -> the array `reserve` viewed it by
        self.placed = 0  # batches sent through the ring
        self.packed_in_place = 0  # of those, packed straight into their slot (no copy in `place`)
        self.fallbacks = 0  # batches sent through the object store: no free slot (or no room)
        self.reclaimed = 0  # slots taken back from a consumer that is gone

    @property
    def num_slots(self) -> int:
        return len(self._slots)

    def held(self) -> int:
        """Slots not free (sent, or held by a consumer)."""
        return int(np.count_nonzero(self._words[:, 0] != FREE))

    def _free_slot(self) -> int | None:
        state = self._words[:, 0]
        free = np.flatnonzero(state == FREE)
        if len(free):
            return int(free[0])
        for s, holder in enumerate(state.tolist()):  # reclaim from consumers that are gone
            if holder > 0 and not _alive(holder):
                self._words[s, 0] = FREE
                self.reclaimed += 1
                return s
        return None

    def _take(self, nbytes: int) -> tuple[int, Segment, int] | None:
        """A free slot of at least ``nbytes``, marked ``RESERVED`` under a new sequence number:
        (slot, its segment, the number); None when none is free or it cannot grow, or the ring is closed."""
        with self._lock:
            if self._words is None:
                return None
            s = self._free_slot()
            if s is None:
                return None
            try:
                seg = self._segment(s, nbytes)
            except OSError:  # /dev/shm has no room for it
                return None
            self._seq += 1
            self._words[s] = (RESERVED, self._seq)
            return s, seg, self._seq

    def reserve(self, sizes: Sequence[int]) -> list[np.ndarray] | None:
        """Room in a free slot for a batch's byte columns of ``sizes`` bytes: a writable uint8 view
        of it per column (`executor.host_stage.Buffers`), or None when no slot is free. The slot is
        the batch's until `place` sends it, or until the last of the views is gone (a batch dropped
        unsent: an epoch reset, an error)."""
        starts, end = _layout(sizes)
        taken = self._take(end)
        if taken is None:
            return None
        s, seg, seq = taken
        whole = np.frombuffer(seg.buf, np.uint8, end)  # every view's base (NumPy keeps it so)
        with self._lock:
            self._reserved[s] = weakref.ref(whole)
        weakref.finalize(whole, self._unreserve, s, seq)
        return [whole[a:a + n] for a, n in zip(starts, sizes)]

    def _unreserve(self, s: int, seq: int) -> None:
        """A reserved slot's views are gone: free it, unless it was sent (or reused) meanwhile."""
        with self._lock:
            if self._words is not None and self._words[s].tolist() == [RESERVED, seq]:
                self._words[s, 0] = FREE
                self._reserved.pop(s, None)

    def _packed_in(self, packed: list[tuple[int, int, Any]]) -> tuple[int, np.ndarray] | None:
        """The reserved slot holding every column of ``packed`` (views `reserve` gave), and its
        whole view; None where they are anywhere else."""
        whole = packed[0][2].data.base
        for s, ref in self._reserved.items():
            if ref() is whole and whole is not None:
                if all(c.data.base is whole for _, _, c in packed) and self._words[s, 0] == RESERVED:
                    return s, whole
                return None
        return None

    def place(self, batch: HostBatch) -> HostBatch:
        """``batch`` with its `PackedBytes` columns replaced by `RingRef`s to a slot: the slot
        `reserve` packed them into, else a free one they are copied into; ``batch`` itself where
        it has none, or no slot is free."""
        packed = _columns(batch, PackedBytes)
        if not packed:
            return batch
        with self._lock:
            found = self._packed_in(packed)
            if found is not None:
                s, whole = found
                del self._reserved[s]
                seq = int(self._words[s, 1])
                base = _address(whole)
                starts = [_address(c.data) - base for _, _, c in packed]
                self.packed_in_place += 1
        if found is None:
            starts, end = _layout([c.data.nbytes for _, _, c in packed])
            taken = self._take(end)
            if taken is None:  # the object store takes this batch
                self.fallbacks += 1
                return batch
            s, seg, seq = taken
            for (_, _, c), start in zip(packed, starts):
                n = c.data.nbytes
                if n:
                    np.frombuffer(seg.buf, np.uint8, n, start)[:] = c.data
        path = _path(self._slots[s])
        columns = {op_id: dict(outs) for op_id, outs in batch.columns.items()}
        for (op_id, k, c), start in zip(packed, starts):
            columns[op_id][k] = RingRef(self._header_path, path, s, seq, start, c.offsets)
        with self._lock:
            self._words[s] = (SENT, seq)
            self.placed += 1
        return dataclasses.replace(batch, columns=columns)

    def _segment(self, s: int, nbytes: int) -> Segment:
        seg = self._slots[s]
        if seg is None:
            seg = Segment.create(0, tag=f"ring{s}_", backend=self._backend)
            self._slots[s] = seg
        seg.grow(nbytes, int(nbytes * _GROWTH))  # only ever grows: a reader maps what it needs
        return seg

    def stats(self) -> dict[str, int]:
        return {"slots": self.num_slots, "held": self.held(), "placed": self.placed,
                "packed_in_place": self.packed_in_place, "fallbacks": self.fallbacks, "reclaimed": self.reclaimed,
                "bytes": sum(s.size for s in self._slots if s is not None)}

    def close(self) -> None:
        """Free the segments (a consumer's mapping keeps a memfd's pages until it lets go)."""
        with self._lock:
            for seg in self._slots:
                if seg is not None:
                    seg.close()
            self._slots = [None] * len(self._slots)
            self._reserved.clear()
            self._words = None  # type: ignore[assignment]
            self._header.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _map(path: str, length: int, label: str) -> mmap.mmap:
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        raise HostRingLost(f"{label}: the loader actor's shared memory {path} is gone (the actor died "
                           "after sending the batch)") from None
    except PermissionError as e:
        raise PermissionError(
            f"{label}: this process may not open its loader actor's shared memory {path} ({e.strerror}; the "
            f"actor runs on this node, as this user, but /proc may hide other processes' files here). Set "
            f"{HOST_RING_ENV}=0 where Ray starts (the driver's environment, or ray.init(runtime_env="
            f'{{"env_vars": {{"{HOST_RING_ENV}": "0"}}}})) to send host batches through the object store'
        ) from None
    try:
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        return mmap.mmap(fd, length, flags=flags)
    finally:
        os.close(fd)


def _columns(batch: HostBatch, kind: type) -> list[tuple[int, int, Any]]:
    """(op id, output, column) of each column of ``batch`` that is a ``kind``."""
    return [(op_id, k, c) for op_id, outs in batch.columns.items() for k, c in outs.items() if isinstance(c, kind)]


def attach(batch: HostBatch, label: str = "loader") -> HostBatch:
    """``batch`` with its `RingRef` columns as `PackedBytes` views of the actor's slot, mapped for
    this batch; the slot is given back when the last view is gone. ``batch`` where it has none."""
    refs = _columns(batch, RingRef)
    if not refs:
        return batch
    first = refs[0][2]
    words = _header(first, label)
    if not _sent(words, first):
        state, seq = words[first.slot].tolist()
        raise RuntimeError(f"{label}: host-batch slot {first.slot} holds batch {seq} (state {state}), not the "
                           f"batch {first.seq} sent; a slot was reused while in flight (a bug: please report it)")
    words[first.slot, 0] = os.getpid()
    end = max(r.offset + r.nbytes for _, _, r in refs)
    try:
        whole = np.frombuffer(_map(first.path, max(end, 1), label), np.uint8)
    except BaseException:
        words[first.slot, 0] = FREE
        raise
    # the views' base is `whole`: when the last of them goes, so do the mapping and the slot
    weakref.finalize(whole, _give_back, words, first.slot)
    columns = {op_id: dict(outs) for op_id, outs in batch.columns.items()}
    for op_id, k, r in refs:
        data = whole[r.offset:r.offset + r.nbytes]
        data.flags.writeable = False
        columns[op_id][k] = PackedBytes(data, r.offsets)
    return dataclasses.replace(batch, columns=columns)


def _header(ref: RingRef, label: str) -> np.ndarray:
    """The words of ``ref``'s ring header (slots x (state, sequence number)), mapped anew."""
    return np.frombuffer(_map(ref.header, 0, label), np.int64).reshape(-1, _WORDS)


def _sent(words: np.ndarray, ref: RingRef) -> bool:
    """Does ``ref``'s slot hold its batch, sent and not yet attached?"""
    return int(words[ref.slot, 1]) == ref.seq and int(words[ref.slot, 0]) == SENT


def _give_back(words: np.ndarray, slot: int) -> None:
    words[slot, 0] = FREE


def discard(batch: Any) -> None:
    """Give back the slot of a host batch that will not be used (not mapped). Anything else: no-op."""
    if not isinstance(batch, HostBatch):
        return
    refs = _columns(batch, RingRef)
    if not refs:
        return
    r = refs[0][2]
    try:
        words = _header(r, "loader")
    except HostRingLost:
        return  # the actor is gone, and its ring with it
    if _sent(words, r):  # else stale: the slot holds a later batch now
        words[r.slot, 0] = FREE
