"""The parent side of the worker pool (child sides: `zygote.zygote_main`, `worker.worker_main`).

A batch is submitted as one or more chunks; each chunk becomes a `Task` sent to the least busy
worker together with a free shared-memory slot. `collect` returns a batch's samples in order, as
read-only views into the slots, which stay reserved until `release`.

NOTE [shared memory]
Slots are `shm.Segment`s of one backend per pool, chosen when the pool is built (argument
``shm_backend``, else ``$RAY_EXTSRC_SHM``, else memfd where the kernel has it; never re-read on the
hot path): anonymous memfds, which do not depend on the size of /dev/shm (64 MB in a default Docker
container), or private /dev/shm files as the fallback. `start()` compares what the pool will need
(``prefetch_depth`` x ``batch_size`` x ``slot_bytes`` per sample) with what there is and warns if it
does not fit (`capacity`: a warning, not an error, since the need comes from a hint). A devshm
worker reserves every byte before writing it, so a full /dev/shm fails the batch with
`SharedMemoryError` ("shared memory exhausted (/dev/shm is N MB ...; the pool needs M MB); fix:
..."), never a SIGBUS.

NOTE [task channel]
Each worker's task channel is a Unix stream socketpair, not a pipe, so descriptors can travel on
it: a slot is created by the parent and reaches a worker (forked or spawned alike) as an fd over
SCM_RIGHTS. The parent remembers which slots each worker has; the first Task naming a slot a
worker has not seen carries ``SlotRef.fd_follows`` and is followed, on the same socket, by one byte
with the slot's fd attached. The worker reads the Task (`multiprocessing.connection` framing, which
never reads past a message), then that byte with ``socket.recv_fds``, and keeps the fd (and its
mapping) for later tasks. A replacement worker starts with no slots, so replayed tasks send their
fds again. The result channel stays a pipe. Why not once per slot at spawn time: slots are made on
demand, after the workers start.

NOTE [shutdown and faults]
* A worker that dies (kill -9, segfault in a C extension) is noticed by EOF on its result pipe. The
  zygote forks a replacement with the same worker id, answering with how the dead one ended (its
  exit status: the zygote reaps workers), and the dead worker's unfinished tasks are sent to it again
  (replay), so the epoch still holds every sample exactly once. A task that kills more than
  `MAX_REPLAYS` workers in a row is not sent again: its batch fails with `WorkerDiedError` naming
  its samples (and the last worker's fatal signal). One death is diagnosed instead of replayed: a
  devshm worker killed by SIGBUS while its status page entry (`messages.STATUS_STRIDE`) says it was
  writing a slot ran out of /dev/shm pages (someone truncated the segment or filled /dev/shm behind
  our reservation), so its batch fails at once with `SharedMemoryError`, not with a message blaming
  the source. Iterable sources are stateful and cannot be replayed:
  their worker's death fails every batch it had (and any submitted before the next `discard()`,
  the epoch reset) with `WorkerDiedError`. Either way the dead worker is replaced at once, so the
  pool is whole again for the next epoch (a fresh iterable worker starts its iterator anew) —
  except for an iterable with ``cycle=None`` (one pass): a fresh iterator would serve again data
  already served, so every later batch fails with `WorkerDiedError`, across resets too.
* `close()` (also run by garbage collection and at interpreter exit through `weakref.finalize`)
  asks every worker to stop, closes the zygote's control socket (the zygote then terminates and
  reaps any worker left), waits for the zygote, and closes (devshm: unlinks) every slot. If the
  parent itself is killed, workers see EOF on their task socket and the zygote on its control
  socket, and both exit; memfds go with the last process holding them, and the zygote unlinks a
  dead parent's /dev/shm files.

NOTE [iterable across epochs]
An iterable's worker runs ahead of the consumer: when an epoch ends early (``reset()`` in
mid-epoch, or another source's StopIteration), the batches it computed ahead were already taken
from the iterator. With ``cycle="raise"`` (and programs without a ``source``) the next epoch
restarts the iterator, so `discard()` drops them, as for callables. With ``cycle=None`` or
``"quiet"`` the iterator keeps its place across epochs (`source` NOTE [cycle]): `discard()`
keeps those batches, in order, and the next `submit()` calls are served from them before any
new task is sent, so no batch computed ahead is lost and the consumer sees the data in the order
``parallel=False`` gives (DALI's pool likewise keeps an iterable's prefetched batches on reset).
The one batch dropped is that of the iteration another source stopped: the pipeline collected it
before the in-process sources ran, as ``parallel=False`` runs an iterable defined before the
source that stops, and as DALI does. A kept batch still carries the iteration and epoch it was
computed for (in its error messages). A StopIteration among them ends the next epoch at once,
which is right for ``cycle=None``.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from ..errors import (
    DecodeError,
    ForkAfterCUDAError,
    RayExtSrcError,
    SharedMemoryError,
    SourceError,
    WorkerDiedError,
)
from ..source import Cycle
from ..types import BatchInfo, SampleInfo
from ._cuda import cuda_initialized
from .capacity import Need, exhausted_message, shortage_warning
from .messages import (
    STATUS_STRIDE,
    TASK_ITER,
    Shutdown,
    SlotRef,
    SpawnWorker,
    Task,
    TaskDone,
    TaskFailed,
    WorkerSpawned,
)
from .shm import DEVSHM, Segment, choose_backend, read_samples

__all__ = ["WorkerPool", "Chunk", "cuda_initialized", "MAX_REPLAYS"]

MAX_REPLAYS = 3
_ZYGOTE_REPLY_TIMEOUT_S = 30.0  # a fork takes milliseconds; a spawned zygote imports numpy first
_JOIN_TIMEOUT_S = 5.0  # the zygote gives workers 2 s after SIGTERM before SIGKILL, plus margin

_FORK_AFTER_CUDA = (
    "cannot start Python workers with py_start_method='fork': CUDA is already initialised in this "
    "process (pid {pid}), and a forked child cannot use, or safely inherit, a CUDA context. "
    "Either call start_py_workers() on every pipeline before anything touches CUDA (building a "
    "pipeline, creating a torch/CuPy GPU tensor, ...), or use py_start_method='spawn' (the source "
    "must then be picklable)."
)


@dataclass(frozen=True, slots=True)
class Chunk:
    """Part of a batch for one task: the SampleInfos of a slice, or a BatchInfo."""

    kind: str
    samples: tuple[SampleInfo, ...] = ()
    batch: BatchInfo | None = None


@dataclass(eq=False)
class _Worker:
    worker_id: int
    pid: int
    tasks: Connection  # pickled messages on the task socket
    fds: socket.socket  # the same socket, for slot fds (NOTE [task channel])
    results: Connection
    outstanding: dict[int, Task] = field(default_factory=dict)
    slots_sent: set[str] = field(default_factory=set)  # slots whose fd this worker has

    def close(self) -> None:
        self.tasks.close()
        self.fds.close()
        self.results.close()


@dataclass(eq=False)
class _Batch:
    key: Hashable
    task_ids: list[int]
    done: dict[int, TaskDone] = field(default_factory=dict)
    failed: TaskFailed | None = None
    # set when a task of it cannot be completed nor replayed (it kept killing workers, its worker
    # ran out of shared memory): WorkerDiedError or SharedMemoryError
    died: RayExtSrcError | None = None


def _finalize(zygote: Any, ctl: socket.socket | None, workers: dict, slots: list) -> None:
    """Shutdown shared by close() and the finalizer. See NOTE [shutdown and faults]."""
    for w in list(workers.values()):
        try:
            w.tasks.send(Shutdown())
        except OSError:
            pass
        w.close()
    workers.clear()
    if ctl is not None:
        ctl.close()
    if zygote is not None:
        deadline = time.monotonic() + _JOIN_TIMEOUT_S
        while time.monotonic() < deadline and zygote.poll() is None:
            time.sleep(0.005)
        if zygote.poll() is None:
            zygote.kill()
            zygote.wait()
    for seg in slots:
        seg.close()
    slots.clear()


class _ForkedZygote:
    """`subprocess.Popen`-like handle on a zygote we forked ourselves."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


class WorkerPool:
    """Python worker processes running ``program`` (see `worker.WorkerProgram`).

    ``start_method`` "fork" forks the zygote from this process (refused once CUDA is initialised);
    "spawn" starts it as a fresh interpreter and sends it the pickled program (``pickler`` is a
    module-like object with ``dumps``; default `pickle`).

    Shared memory (NOTE [shared memory]): ``slot_bytes`` is what a slot reserves per sample of its
    task (slots grow when samples are larger); ``batch_size`` (default: ``num_workers``, one sample
    per worker) and ``prefetch_depth`` (batches in shared memory at once) only size the check that
    `start` makes; ``shm_backend`` is "memfd" or "devshm" (default: ``$RAY_EXTSRC_SHM``, else memfd
    where available).
    """

    def __init__(
        self,
        program: Any,
        num_workers: int,
        *,
        start_method: str = "fork",
        pickler: Any = None,
        slot_bytes: int = 1 << 20,
        name: str = "",
        batch_size: int | None = None,
        prefetch_depth: int = 2,
        shm_backend: str | None = None,
    ) -> None:
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"py_num_workers must be an int >= 1; got {num_workers!r}")
        if start_method not in ("fork", "spawn"):
            raise ValueError(f"py_start_method must be 'fork' or 'spawn'; got {start_method!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be an int >= 1 or None; got {batch_size!r}")
        if not isinstance(prefetch_depth, int) or prefetch_depth < 1:
            raise ValueError(f"prefetch_depth must be an int >= 1; got {prefetch_depth!r}")
        self.shm_backend = choose_backend(shm_backend)  # once: NOTE [shared memory]
        self.program = program
        self.num_workers = 1 if program.kind == TASK_ITER else num_workers
        self.start_method = start_method
        self.pickler = pickler if pickler is not None else pickle
        self.slot_bytes = max(4096, int(slot_bytes))
        self.batch_size = batch_size if batch_size is not None else num_workers
        self.prefetch_depth = prefetch_depth
        self.name = name
        self._workers: dict[int, _Worker] = {}
        self._slots: list[Segment] = []  # every segment, the status page first once started
        self._status: Segment | None = None  # the status page (messages.STATUS_STRIDE)
        self._free_slots: list[Segment] = []
        self._task_slot: dict[int, Segment] = {}
        self._task_batch: dict[int, _Batch] = {}
        self._task_replays: defaultdict[int, int] = defaultdict(int)
        self._batches: dict[Hashable, _Batch] = {}
        self._held: dict[Hashable, list[Segment]] = {}
        # set when an iterable's worker died: the iterator's place in the epoch is lost, so every
        # batch until the next discard() (epoch reset) fails with this error; with cycle=None (one
        # pass, which no fresh iterator can continue) every batch from then on
        self._iter_lost: WorkerDiedError | None = None
        # an iterable's end-of-data rule (`source` NOTE [cycle]); None: not an iterable program
        self._cycle: Cycle | None = None
        if program.kind == TASK_ITER:
            cycle = getattr(getattr(program, "source", None), "cycle", Cycle.RAISE)
            self._cycle = cycle if isinstance(cycle, Cycle) else Cycle.RAISE
        # batches an iterable computed ahead of an epoch reset, for the next epoch (NOTE
        # [iterable across epochs]); oldest first
        self._carried: collections.deque[_Batch] = collections.deque()
        self._ids = itertools.count()
        self._rr = itertools.count()
        self._zygote: Any = None
        self._ctl: socket.socket | None = None
        self._finalizer: Callable[[], Any] | None = None
        self.respawns = 0
        self.last_compute_s = 0.0  # worker time (source + worker-side ops) of the last collected batch

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._zygote is not None

    @property
    def pids(self) -> dict[int, int]:
        """worker id -> pid of the live workers."""
        return {w.worker_id: w.pid for w in self._workers.values()}

    @property
    def zygote_pid(self) -> int | None:
        return self._zygote.pid if self._zygote is not None else None

    def start(self) -> None:
        if self.started:
            return
        warning = shortage_warning(self.shm_backend, self._need())
        if warning is not None:
            warnings.warn(f"worker pool{self._label()}: {warning}", RuntimeWarning, stacklevel=2)
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            if self.start_method == "fork":
                self._zygote = self._fork_zygote(child_sock)
            else:
                self._zygote = self._spawn_zygote(child_sock)
        finally:
            child_sock.close()
        self._ctl = parent_sock
        self._finalizer = weakref.finalize(
            self, _finalize, self._zygote, self._ctl, self._workers, self._slots
        )
        self._status = Segment.create(max(4096, 64 * self.num_workers), tag="status_", backend=self.shm_backend)
        self._slots.append(self._status)  # closed with the slots
        try:
            self._status.reserve(self._status.size)  # its pages exist before any worker writes one
        except OSError as e:
            raise SharedMemoryError(
                f"worker pool{self._label()}: cannot start: {e}; " + exhausted_message(self.shm_backend, self._need())
            ) from e
        for wid in range(self.num_workers):
            self._spawn_worker(wid)

    def _fork_zygote(self, child_sock: socket.socket) -> _ForkedZygote:
        if cuda_initialized():
            raise ForkAfterCUDAError(_FORK_AFTER_CUDA.format(pid=os.getpid()))
        from .zygote import run_forked

        with warnings.catch_warnings():
            # Python 3.12 warns about fork() in a multi-threaded process (Ray's workers are). The
            # zygote only runs our single-threaded loop, which takes none of the other threads' locks.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            run_forked(child_sock.fileno(), self.program)  # never returns
        return _ForkedZygote(pid)

    def _spawn_zygote(self, child_sock: socket.socket) -> subprocess.Popen:
        try:
            payload = self.pickler.dumps(self.program)
        except Exception as e:
            hint = (
                " A generator object cannot be pickled by any pickler: pass the generator function "
                "(source=gen, not gen()) or an iterable."
                if "generator" in str(e) else ""
            )
            raise TypeError(
                "py_start_method='spawn' needs a picklable source: pickling it failed with "
                f"{type(e).__name__}: {e}. Define the source (callable class or function) at module "
                "level of an importable module and keep only picklable state in it, pass "
                f"py_callback_pickler=cloudpickle, or use py_start_method='fork'.{hint}"
            ) from e
        fd = child_sock.fileno()
        # Workers run one sample at a time each; BLAS thread pools in them only oversubscribe.
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "ray_extsrc.workers.zygote", str(fd)],
            stdin=subprocess.PIPE,
            pass_fds=(fd,),
            env=env,
        )
        try:  # stdin=PIPE: proc.stdin is set
            pickle.dump(list(sys.path), proc.stdin)
            proc.stdin.write(payload)
            proc.stdin.close()
        except BrokenPipeError:
            pass  # the zygote died early; _spawn_worker reports it
        return proc

    def _need(self, bytes_per_sample: int = 0) -> Need:
        return Need(self.prefetch_depth, self.batch_size, max(self.slot_bytes, bytes_per_sample))

    def _spawn_worker(self, worker_id: int, replaces: int = 0) -> tuple[_Worker, int | None]:
        """Have the zygote fork worker ``worker_id``; also return how the worker it replaces
        (pid ``replaces``) ended (see `messages.WorkerSpawned`)."""
        task_w, task_r = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        result_r, result_w = os.pipe()
        try:
            if self._ctl is None or self._status is None:
                raise RuntimeError("the worker pool is not started")
            socket.send_fds(
                self._ctl,
                [pickle.dumps(SpawnWorker(worker_id, replaces))],
                [task_r.fileno(), result_w, self._status.fd],
            )
            self._ctl.settimeout(_ZYGOTE_REPLY_TIMEOUT_S)
            reply = self._ctl.recv(1 << 16)
            if not reply:
                raise EOFError
            msg = pickle.loads(reply)
        except (OSError, EOFError) as e:
            task_w.close()
            os.close(result_r)
            code = self._zygote.poll() if self._zygote is not None else None
            raise WorkerDiedError(
                f"worker pool{self._label()}: the zygote process (pid {self.zygote_pid}) could not "
                f"start worker {worker_id} ({type(e).__name__}: {e}; zygote exit code {code}). "
                "With py_start_method='spawn', the zygote's own error is printed above."
            ) from e
        finally:
            task_r.close()
            os.close(result_w)
        if not isinstance(msg, WorkerSpawned) or msg.worker_id != worker_id:
            raise WorkerDiedError(f"worker pool{self._label()}: unexpected zygote reply {msg!r}")
        w = _Worker(
            worker_id,
            msg.pid,
            Connection(os.dup(task_w.fileno()), readable=False),
            task_w,
            Connection(result_r, writable=False),
        )
        self._workers[worker_id] = w
        return w, msg.replaced_exit

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._batches.clear()
        self._carried.clear()
        self._held.clear()

    def _label(self) -> str:
        return f" {self.name!r}" if self.name else ""

    # -- data path -------------------------------------------------------------------------------

    def submit(self, key: Hashable, epoch_idx: int, iteration: int, chunks: Sequence[Chunk]) -> None:
        """Queue one batch, made of ``chunks``, under ``key``.

        An iterable that keeps its place across epochs serves it from a batch it computed before
        the last `discard()`, if one is left (NOTE [iterable across epochs]).
        """
        if not self.started:
            raise RuntimeError("the worker pool is not started")
        if self._carried:
            batch = self._carried.popleft()
            batch.key = key
            self._batches[key] = batch
            return
        batch = _Batch(key, [])
        self._batches[key] = batch
        if self._iter_lost is not None:
            batch.died = self._iter_lost
            return
        for chunk in chunks:
            task_id = next(self._ids)
            try:
                slot = self._take_slot(max(1, len(chunk.samples)))
            except OSError as e:  # the parent cannot even make the segment (out of memory/files)
                batch.died = SharedMemoryError(
                    f"cannot create a shared-memory slot for iteration {iteration}: {e}; "
                    + exhausted_message(self.shm_backend, self._need()),
                    iteration=iteration,
                    epoch_idx=epoch_idx,
                )
                return
            task = Task(
                task_id=task_id,
                kind=chunk.kind,
                epoch_idx=epoch_idx,
                iteration=iteration,
                samples=chunk.samples,
                batch=chunk.batch,
                slot=SlotRef(slot.name, slot.size),
            )
            batch.task_ids.append(task_id)
            self._task_slot[task_id] = slot
            self._task_batch[task_id] = batch
            self._send(self._pick_worker(chunk.kind), task)

    def _pick_worker(self, kind: str) -> _Worker:
        if kind == TASK_ITER:
            return self._workers[0]
        workers = list(self._workers.values())
        start = next(self._rr) % len(workers)
        rotated = workers[start:] + workers[:start]
        return min(rotated, key=lambda w: len(w.outstanding))

    def _send(self, w: _Worker, task: Task) -> None:
        """See NOTE [task channel]."""
        w.outstanding[task.task_id] = task
        seg = self._task_slot[task.task_id]
        new = seg.name not in w.slots_sent
        try:
            if new:
                w.tasks.send(dataclasses.replace(task, slot=dataclasses.replace(task.slot, fd_follows=True)))
                socket.send_fds(w.fds, [b"\0"], [seg.fd])
                w.slots_sent.add(seg.name)
            else:
                w.tasks.send(task)
        except OSError:
            pass  # the worker is dead; its EOF on the result pipe triggers the replay

    def _take_slot(self, nsamples: int) -> Segment:
        if self._free_slots:
            return self._free_slots.pop()
        seg = Segment.create(self.slot_bytes * nsamples, tag=f"{len(self._slots)}_", backend=self.shm_backend)
        self._slots.append(seg)
        return seg

    def collect(self, key: Hashable, timeout: float | None = None) -> list[tuple]:
        """Wait for batch ``key``; return its samples (views) in order, or raise.

        Raises StopIteration when the source ended the epoch in this batch, `SourceError` when it
        raised, `WorkerDiedError` when a worker could not be replaced or a task kept killing them.
        """
        batch = self._batches.get(key)
        if batch is None:
            raise RuntimeError(
                f"worker pool{self._label()}: batch {key!r} was not submitted, or was already "
                "collected or failed; after an error, call reset() to start the next epoch"
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        while batch.failed is None and batch.died is None and len(batch.done) < len(batch.task_ids):
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"worker pool{self._label()}: batch {key!r} not ready after {timeout} s")
            self._poll(remaining)
        del self._batches[key]
        slots = [self._task_slot.pop(t) for t in batch.task_ids]
        for t in batch.task_ids:
            self._task_batch.pop(t, None)
            self._task_replays.pop(t, None)
        if batch.failed is not None or batch.died is not None:
            # tasks of this batch still running keep their slots until their answers arrive
            pending = [t for t in batch.task_ids if t not in batch.done and self._is_outstanding(t)]
            for t, seg in zip(batch.task_ids, slots):
                if t in pending:
                    self._task_slot[t] = seg
                else:
                    self._free_slots.append(seg)
            if batch.died is not None and (batch.failed is None or batch.failed.stop_iteration):
                raise batch.died  # a real error outranks an end of epoch in the same batch
            self._raise_failure(batch.failed)
        out: list[tuple] = []
        for t, seg in zip(batch.task_ids, slots):
            done = batch.done[t]
            if seg.size != done.capacity:
                seg.remap()
            out.extend(read_samples(seg, done.samples))
        self._held[key] = slots
        self.last_compute_s = sum(d.compute_s for d in batch.done.values())
        return out

    def release(self, key: Hashable) -> None:
        """Give back the slots of a collected batch (its views must no longer be used)."""
        self._free_slots.extend(self._held.pop(key, ()))

    def discard(self) -> None:
        """Forget every submitted, uncollected batch (epoch reset); their slots free as answers come.

        An iterable that keeps its place across epochs keeps them instead, for the next epoch
        (NOTE [iterable across epochs]), unless its worker died.
        """
        if self._cycle is not None and self._cycle.keeps_place and self._iter_lost is None:
            self._carried.extend(self._batches.values())
            self._batches.clear()
            return
        for batch in (*self._carried, *self._batches.values()):
            for t in batch.task_ids:
                self._task_batch.pop(t, None)
                self._task_replays.pop(t, None)
                if not self._is_outstanding(t):  # answered already: its slot is free now
                    self._free_slots.append(self._task_slot.pop(t))
        self._carried.clear()
        self._batches.clear()
        if self._cycle is not Cycle.NO:
            self._iter_lost = None  # the next epoch starts a fresh iterator
        # Wait for the discarded tasks still running. Workers take tasks in order, so the next
        # epoch's tasks could not start before these anyway; waiting here keeps the number of
        # slots bounded by what one epoch has in flight.
        while any(w.outstanding for w in self._workers.values()):
            self._poll(None)

    def _is_outstanding(self, task_id: int) -> bool:
        return any(task_id in w.outstanding for w in self._workers.values())

    def _poll(self, timeout: float | None) -> None:
        by_conn = {w.results: w for w in self._workers.values()}
        for conn in wait(list(by_conn), timeout):
            w = by_conn[conn]
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                self._replace(w)
                continue
            self._handle(w, msg)

    def _handle(self, w: _Worker, msg: TaskDone | TaskFailed) -> None:
        task = w.outstanding.pop(msg.task_id, None)
        batch = self._task_batch.get(msg.task_id)
        if batch is None:  # a discarded batch (epoch reset) or a failed one: just free the slot
            seg = self._task_slot.pop(msg.task_id, None)
            if seg is not None:
                if isinstance(msg, TaskDone) and seg.size != msg.capacity:
                    seg.remap()
                self._free_slots.append(seg)
            return
        if isinstance(msg, TaskDone):
            batch.done[msg.task_id] = msg
        elif msg.shm_bytes_per_sample:
            if batch.died is None:
                batch.died = self._shm_error(msg, task, msg.shm_bytes_per_sample, msg.message)
        elif batch.failed is None or (batch.failed.stop_iteration and not msg.stop_iteration):
            batch.failed = msg  # a real error outranks an end of epoch in the same batch

    def _shm_error(self, f: TaskFailed | None, task: Task | None, per_sample: int, detail: str) -> SharedMemoryError:
        """`SharedMemoryError` for a task whose output found no room (NOTE [shared memory])."""
        samples = [s.idx_in_epoch for s in task.samples] if task is not None else []
        where = f"samples idx_in_epoch={samples}" if samples else "a batch"
        if task is not None:
            where += f" (iteration {task.iteration}, epoch {task.epoch_idx})"
        if f is not None:
            where += f" in Python worker {f.worker_id} (pid {f.pid})"
        return SharedMemoryError(
            f"{where} of pool{self._label()}: {exhausted_message(self.shm_backend, self._need(per_sample))}. "
            f"[{detail}]",
            idx_in_epoch=samples[0] if samples else None,
            iteration=task.iteration if task is not None else None,
            epoch_idx=task.epoch_idx if task is not None else None,
            worker_id=f.worker_id if f is not None else None,
            pid=f.pid if f is not None else None,
        )

    def _writing_when_died(self, dead: _Worker) -> int | None:
        """The task whose output ``dead`` was writing when it died (status page), if any."""
        if self._status is None or self._status.buf is None:
            return None
        off = 8 * STATUS_STRIDE * dead.worker_id
        task_id = int.from_bytes(self._status.buf[off : off + 8], sys.byteorder, signed=True) - 1
        return task_id if task_id in dead.outstanding else None

    def _replace(self, dead: _Worker) -> None:
        """See NOTE [shutdown and faults]."""
        dead.close()
        del self._workers[dead.worker_id]
        writing = self._writing_when_died(dead)
        new, exit_code = self._spawn_worker(dead.worker_id, replaces=dead.pid)
        self.respawns += 1
        how = _how_it_ended(exit_code)
        if writing is not None and exit_code == -signal.SIGBUS and self.shm_backend == DEVSHM:
            task = dead.outstanding.pop(writing)
            self._give_up(writing, self._shm_error(
                None, task, 0,
                f"worker {dead.worker_id} (pid {dead.pid}) was killed by SIGBUS writing this task's "
                f"output into its /dev/shm slot: the slot's pages could not be allocated",
            ))
        if self.program.kind == TASK_ITER:
            if self._cycle is Cycle.NO:
                fix = (
                    "It had cycle=None (one pass over the data): a fresh iterator would serve data "
                    "already served, so this pipeline yields no more batches, after reset() too. "
                    "Build a new pipeline for another pass, give the source cycle='raise' (a fresh "
                    "iter() each epoch), or use a per-sample callable source, whose samples are "
                    "replayed after a worker dies."
                )
            else:
                fix = (
                    "Restart the epoch (reset(): a fresh iterator), or use a per-sample callable "
                    "source, whose samples are replayed after a worker dies."
                )
            self._iter_lost = WorkerDiedError(
                f"worker {dead.worker_id} (pid {dead.pid}) of pool{self._label()} died{how}; it ran an "
                f"iterable source, whose state cannot be replayed. {fix}"
            )
            for task_id in dead.outstanding:
                self._give_up(task_id, self._iter_lost)
            return
        for task_id, task in dead.outstanding.items():
            self._task_replays[task_id] += 1
            if self._task_replays[task_id] > MAX_REPLAYS:
                idx = [s.idx_in_epoch for s in task.samples]
                self._give_up(task_id, WorkerDiedError(
                    f"samples idx_in_epoch={idx} (iteration {task.iteration}, epoch {task.epoch_idx}) "
                    f"killed {MAX_REPLAYS + 1} workers in a row (last: worker {dead.worker_id}, "
                    f"pid {dead.pid}{how}); the source likely crashes the process on them (a segfault "
                    "in a C extension, os._exit, running out of memory). Fix or skip those samples."
                ))
            else:
                self._send(new, task)

    def _give_up(self, task_id: int, error: RayExtSrcError) -> None:
        """A task of a dead worker that will not run again: fail its batch, or free its slot when
        nobody waits for it (a discarded or already failed batch)."""
        self._task_replays.pop(task_id, None)
        batch = self._task_batch.get(task_id)
        if batch is None:
            seg = self._task_slot.pop(task_id, None)
            if seg is not None:
                self._free_slots.append(seg)
        elif batch.died is None:
            batch.died = error

    def _raise_failure(self, f: TaskFailed) -> None:
        if f.stop_iteration:
            raise StopIteration
        where = f"idx_in_epoch={f.idx_in_epoch}, " if f.idx_in_epoch is not None else ""
        cls = DecodeError if f.exc_type == "DecodeError" else SourceError
        what = "decoding failed" if cls is DecodeError else f"{f.exc_type} was raised"
        raise cls(
            f"{what} for sample {where}iteration={f.iteration}, epoch_idx={f.epoch_idx} in Python "
            f"worker {f.worker_id} (pid {f.pid}) of pool{self._label()}: {f.message}\n\n"
            f"Original traceback (in the worker):\n{f.traceback}",
            idx_in_epoch=f.idx_in_epoch,
            iteration=f.iteration,
            epoch_idx=f.epoch_idx,
            worker_id=f.worker_id,
            pid=f.pid,
            remote_traceback=f.traceback,
        )


def _how_it_ended(exit_code: int | None) -> str:
    """", killed by SIGBUS" and the like, for messages about a dead worker."""
    if exit_code is None:
        return ""
    if exit_code < 0:
        try:
            return f", killed by {signal.Signals(-exit_code).name}"
        except ValueError:
            return f", killed by signal {-exit_code}"
    return f", exit code {exit_code}"
