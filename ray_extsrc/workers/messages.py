"""Every message that crosses a process boundary in the worker pool.

Parent (`pool.WorkerPool`)  ──Task (+ a new slot's fd) / Shutdown──►  worker (`worker.worker_main`)
Parent                      ◄──TaskDone / TaskFailed──  worker
Parent  ──SpawnWorker (+3 fds over SCM_RIGHTS)──►  zygote (`zygote.zygote_main`)
Parent  ◄──WorkerSpawned──  zygote

All are small dataclasses pickled by `multiprocessing.connection` (parent <-> worker) or by the
zygote's control socket. Array payloads never travel here: they go through shared memory
(`shm`), and messages only say where they are. Descriptors travel over SCM_RIGHTS: a slot's fd
right after the first Task that names it on a worker's task socket (`pool` NOTE [task channel]),
a worker's three fds with its SpawnWorker.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..types import BatchInfo, SampleInfo

__all__ = [
    "TASK_SAMPLES",
    "TASK_BATCH",
    "TASK_ITER",
    "STATUS_STRIDE",
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

#: The status page, the one thing a worker says without a message (so it survives the worker's
#: death): a small shared segment of int64 entries, one per worker at ``worker_id * STATUS_STRIDE``
#: (64 bytes apart, a cache line each), holding ``task_id + 1`` while the worker writes that task's
#: output into its slot and 0 otherwise. A worker that dies with its entry set died writing shared
#: memory (`pool` NOTE [shutdown and faults]).
STATUS_STRIDE = 8


@dataclass(frozen=True, slots=True)
class SlotRef:
    """A shared-memory segment the worker should write its output into.

    ``fd_follows``: this worker has not seen the slot yet; its descriptor comes next on the task
    socket, as one byte with the fd attached (`pool` NOTE [task channel]).
    """

    name: str
    capacity: int
    fd_follows: bool = False


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

    ``shm_bytes_per_sample`` is set when the output could not be placed because shared memory ran
    out (ENOSPC reserving /dev/shm pages): what each of the task's samples takes, on average.
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
    shm_bytes_per_sample: int = 0


@dataclass(frozen=True, slots=True)
class SpawnWorker:
    """Fork worker ``worker_id``; its fds: task socket, result pipe (write end), status page.

    ``replaces``: the pid of the dead worker it replaces (0: none), whose exit status the zygote
    reaps and reports in `WorkerSpawned`.
    """

    worker_id: int
    replaces: int = 0


@dataclass(frozen=True, slots=True)
class WorkerSpawned:
    """``replaced_exit``: how the replaced worker ended, as `subprocess.Popen.returncode` says it
    (``-N``: killed by signal N); None when there was none or it could not be reaped in time."""

    worker_id: int
    pid: int
    replaced_exit: int | None = None
