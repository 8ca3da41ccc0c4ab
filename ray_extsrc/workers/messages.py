"""Every message that crosses a process boundary in the worker pool.

Parent (`pool.WorkerPool`)  ──Task / Shutdown──►  worker (`worker.worker_main`)
Parent                      ◄──TaskDone / TaskFailed──  worker
Parent  ──SpawnWorker (+2 fds over SCM_RIGHTS)──►  zygote (`zygote.zygote_main`)
Parent  ◄──WorkerSpawned──  zygote

All are small dataclasses pickled by `multiprocessing.connection` (parent <-> worker) or by the
zygote's control socket. Array payloads never travel here: they go through shared memory
(`shm`), and messages only say where they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..types import BatchInfo, SampleInfo

__all__ = [
    "TASK_SAMPLES",
    "TASK_BATCH",
    "TASK_ITER",
    "ArrayMeta",
    "Shutdown",
    "SlotRef",
    "SpawnWorker",
    "Task",
    "TaskDone",
    "TaskFailed",
    "WorkerSpawned",
]

TASK_SAMPLES = "samples"  # per-sample callable(s): the task carries the SampleInfos of a chunk
TASK_BATCH = "batch"  # batch callable: the task carries one BatchInfo
TASK_ITER = "iter"  # iterable/generator: next() of the worker's iterator (its cycle says when it restarts)


@dataclass(frozen=True, slots=True)
class SlotRef:
    """A shared-memory segment the worker should write its output into."""

    name: str
    capacity: int


@dataclass(frozen=True, slots=True)
class Task:
    task_id: int
    kind: str
    epoch_idx: int
    iteration: int
    samples: tuple[SampleInfo, ...] = ()
    batch: BatchInfo | None = None
    slot: SlotRef | None = None


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


#: Where one array of a sample lies in a slot: ``(offset, shape, dtype.str)``. A plain tuple, not
#: a dataclass: a batch carries hundreds of them and plain tuples unpickle in C (a dataclass with
#: slots unpickles through a Python function per object, measured at ~5 ms per batch of 256).
ArrayMeta = tuple[int, tuple[int, ...], str]


@dataclass(frozen=True, slots=True)
class TaskDone:
    task_id: int
    worker_id: int
    capacity: int  # the slot's size now (a worker grows a slot that was too small)
    samples: tuple[tuple[ArrayMeta, ...], ...]  # per sample, per output
    compute_s: float = 0.0  # time the worker spent in the source and worker-side ops


@dataclass(frozen=True, slots=True)
class TaskFailed:
    """A task could not be completed. ``stop_iteration`` marks the end of the epoch, not an error.

    The original exception is never pickled (an unpicklable one would hang the parent): its type
    name, message and formatted traceback travel as plain strings.
    """

    task_id: int
    worker_id: int
    pid: int
    idx_in_epoch: int | None
    iteration: int
    epoch_idx: int
    stop_iteration: bool
    exc_type: str = ""
    message: str = ""
    traceback: str = ""


@dataclass(frozen=True, slots=True)
class SpawnWorker:
    worker_id: int


@dataclass(frozen=True, slots=True)
class WorkerSpawned:
    worker_id: int
    pid: int
