"""How much shared memory a pool needs, how much there is, and what to say when it runs out.

* The need (`Need`): batches in shared memory at once (the pipeline's prefetch depth) x samples
  per batch x bytes per sample (the ``bytes_per_sample_hint``, or what the samples turned out to
  take, whichever is larger).
* What there is (`room`): for the devshm backend, the free space of the /dev/shm tmpfs
  (``statvfs``); for memfd, memory: ``MemAvailable`` from /proc/meminfo, and what the cgroup's
  memory limit leaves (v2 ``memory.max - memory.current``, v1 ``memory.limit_in_bytes -
  memory.usage_in_bytes``; on the process's cgroup and each ancestor, the tightest wins).
* When to say it: `WorkerPool.start` *warns* (RuntimeWarning, `shortage_warning`) when the need is
  larger than what there is, and starts anyway. It does not refuse, because the need is built from
  a hint (1 MB per sample unless the user says otherwise) and real samples are often far smaller:
  refusing would break pipelines that run fine. When space really runs out the worker gets ENOSPC
  before writing a byte (`shm.Segment.reserve`) and the pool raises `SharedMemoryError` with
  `exhausted_message`: both numbers in MB and the fixes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .shm import DEVSHM, SHM_DIR, SHM_ENV

__all__ = ["Need", "Room", "exhausted_message", "room", "shortage_warning"]

_MB = 1 << 20
_NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


def _mb(n: float) -> str:
    return f"{n / _MB:.0f}" if n >= 10 * _MB else f"{n / _MB:.1f}"


@dataclass(frozen=True)
class Need:
    batches: int  # batches in shared memory at once
    batch_size: int
    bytes_per_sample: int

    @property
    def bytes(self) -> int:
        return self.batches * self.batch_size * self.bytes_per_sample

    def __str__(self) -> str:
        return (
            f"about {_mb(self.bytes)} MB ({self.batches} batches in flight x {self.batch_size} samples "
            f"x {_mb(self.bytes_per_sample)} MB per sample)"
        )


@dataclass(frozen=True)
class Room:
    free: int | None  # bytes still to be had; None: unknown
    what: str  # e.g. "/dev/shm is 64 MB, 60 MB free"
    total: int | None = None  # devshm: the size of /dev/shm


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 says "max" for no limit


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """Bytes the tightest memory limit of this process's cgroups still allows; None: no limit."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    best: int | None = None
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:
            base, limit_file, usage_file = "/sys/fs/cgroup", "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            base, limit_file, usage_file = "/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):  # the cgroup and its ancestors: every limit applies
            where = os.path.join(base, *parts[:depth])
            limit = _read_int(os.path.join(where, limit_file))
            if limit is None or limit >= _NO_LIMIT:
                continue
            left = max(0, limit - (_read_int(os.path.join(where, usage_file)) or 0))
            best = left if best is None else min(best, left)
    return best


def room(backend: str) -> Room:
    """What the backend has left for us now."""
    if backend == DEVSHM:
        try:
            st = os.statvfs(SHM_DIR)
        except OSError as e:
            return Room(None, f"{SHM_DIR} cannot be inspected ({e})")
        free = st.f_bavail * st.f_frsize
        total = st.f_blocks * st.f_frsize
        return Room(free, f"{SHM_DIR} is {_mb(total)} MB, {_mb(free)} MB free", total)
    available, cgroup = _mem_available(), _cgroup_room()
    known = [n for n in (available, cgroup) if n is not None]
    parts = []
    if available is not None:
        parts.append(f"{_mb(available)} MB available (MemAvailable)")
    if cgroup is not None:
        parts.append(f"{_mb(cgroup)} MB left under the cgroup memory limit")
    return Room(min(known) if known else None, "memory: " + (", ".join(parts) or "unknown"))


def _fixes(backend: str, need: Need, have: Room) -> str:
    less = (
        "or make the pool need less: a bytes_per_sample_hint close to the real sample size, a "
        "smaller prefetch_queue_depth or batch_size"
    )
    if backend == DEVSHM:
        crowded = have.total is not None and have.free is not None and need.bytes <= have.total
        # big enough for us alone: something else holds the rest, and keeps holding it
        base = need.bytes + (have.total - have.free if crowded else 0)
        size = 64
        while size * _MB < base * 1.25:
            size *= 2
        others = (
            f"{SHM_DIR} would hold this pool, but other files fill it (see df -h {SHM_DIR}; "
            "remove what is stale); or "
            if crowded else ""
        )
        return (
            f"fix: {others}give {SHM_DIR} more room (docker run --shm-size={size}m ...; on Kubernetes/KubeRay "
            f"mount an emptyDir with medium: Memory at {SHM_DIR}), {less}; or use memfd shared memory, "
            f"which does not live in {SHM_DIR} ({SHM_ENV}=memfd; the default where os.memfd_create works)"
        )
    return f"fix: give the process more memory (container or Ray worker memory limit), {less}"


def shortage_warning(backend: str, need: Need) -> str | None:
    """A warning text if ``need`` does not fit in what ``backend`` has left, else None."""
    have = room(backend)
    if have.free is None or need.bytes <= have.free:
        return None
    return (
        f"the Python workers' shared memory may not fit: {have.what}, and the pool needs {need}. "
        f"Samples smaller than bytes_per_sample_hint need less; if it does run out, batches fail "
        f"with SharedMemoryError. {_fixes(backend, need, have)}."
    )


def exhausted_message(backend: str, need: Need) -> str:
    """The text of `SharedMemoryError`: both numbers in MB and the fixes."""
    have = room(backend)
    return f"shared memory exhausted ({have.what}; the pool needs {need}); {_fixes(backend, need, have)}"
