"""The child side of the pool: one worker process's loop (its parent side is `pool.WorkerPool`).

A worker receives `Task`s on its task socket (and, after a Task naming a slot it has not seen, that
slot's descriptor: `pool` NOTE [task channel]), runs the program (the user's source plus the CPU
ops that can run next to it), writes the samples into the task's shared-memory slot and answers
`TaskDone`, or `TaskFailed` carrying the sample index and the formatted traceback (or, when shared
memory ran out, how much each sample needed). While it writes a slot its entry in the status page
says so (`messages.STATUS_STRIDE`). It never calls Ray, CUDA or torch. It exits when told to
(`Shutdown`) or when its task socket closes (the parent is gone), so an orphan cannot outlive its pool.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import socket
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Protocol

import numpy as np

from ..types import BatchInfo, SampleInfo
from .messages import STATUS_STRIDE, TASK_BATCH, TASK_ITER, TASK_SAMPLES, Shutdown, Task, TaskDone, TaskFailed
from .shm import Segment, layout_size, write_samples

__all__ = ["Sample", "WorkerArgs", "WorkerProgram", "worker_main"]

Sample = tuple[np.ndarray, ...]


class WorkerProgram(Protocol):
    """What a worker runs. Built by the pipeline; opaque to the pool but for ``kind`` and ``source``.

    ``run_sample`` serves per-sample sources, ``run_batch`` batch callables, ``next_batch``
    iterables (stateful: ``start_epoch`` is called when the tasks' epoch changes; whether the
    iterator restarts then is the source's ``cycle``, see `source` NOTE [cycle]).

    ``source`` (optional): the `SourceSpec` of a batch/iterable program. The pool reads its
    ``cycle`` to know whether an iterable's place survives an epoch reset (NOTE [iterable across
    epochs] in `pool`); a program without one restarts each epoch (``cycle="raise"``).
    """

    kind: str

    def run_sample(self, info: SampleInfo) -> Sample: ...

    def run_batch(self, info: BatchInfo) -> list[Sample]: ...

    def start_epoch(self, epoch_idx: int) -> None: ...

    def next_batch(self, info: BatchInfo) -> list[Sample]: ...


@dataclass
class WorkerArgs:
    worker_id: int
    task_fd: int  # a Unix stream socket: pickled Tasks, and slot fds (`pool` NOTE [task channel])
    result_fd: int  # a pipe's write end
    status_fd: int  # the status page (`messages.STATUS_STRIDE`)
    program: Any


class _SampleFailure(Exception):
    def __init__(self, idx: int | None, stop: bool) -> None:
        self.idx = idx
        self.stop = stop


def _run_task(program: Any, task: Task, state: dict) -> list[Sample]:
    if task.kind == TASK_SAMPLES:
        out = []
        for info in task.samples:
            try:
                out.append(program.run_sample(info))
            except StopIteration:
                raise _SampleFailure(info.idx_in_epoch, stop=True) from None
            except Exception as e:
                raise _SampleFailure(info.idx_in_epoch, stop=False) from e
        return out
    try:
        if task.kind == TASK_BATCH:
            return program.run_batch(task.batch)
        if task.kind == TASK_ITER:
            if state.get("epoch") != task.epoch_idx:
                program.start_epoch(task.epoch_idx)
                state["epoch"] = task.epoch_idx
            return program.next_batch(task.batch)
    except StopIteration:
        raise _SampleFailure(None, stop=True) from None
    except Exception as e:
        raise _SampleFailure(None, stop=False) from e
    raise ValueError(f"unknown task kind {task.kind!r}")


def _slot_of(task: Task, segments: dict[str, Segment], fds: socket.socket) -> Segment:
    slot = task.slot
    if slot.fd_follows:  # the parent sent the slot's descriptor right after the task
        _, got, _, _ = socket.recv_fds(fds, 1, 1)
        if len(got) != 1:
            raise RuntimeError(f"the descriptor of slot {slot.name} did not arrive with its task")
        old = segments.pop(slot.name, None)
        if old is not None:
            old.close()
        segments[slot.name] = Segment.from_fd(slot.name, got[0])
        return segments[slot.name]
    seg = segments[slot.name]
    seg.remap()
    return seg


def _failed(task: Task, args: WorkerArgs, message: str, exc: BaseException, **kw: Any) -> TaskFailed:
    return TaskFailed(
        task_id=task.task_id,
        worker_id=args.worker_id,
        pid=os.getpid(),
        idx_in_epoch=task.samples[0].idx_in_epoch if task.samples else None,
        iteration=task.iteration,
        epoch_idx=task.epoch_idx,
        stop_iteration=False,
        exc_type=type(exc).__name__,
        message=message,
        traceback=traceback.format_exc(),
        **kw,
    )


def worker_main(args: WorkerArgs) -> None:
    # Ctrl-C goes to the whole process group; the parent handles it and shuts us down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tasks = Connection(args.task_fd, writable=False)
    fds = socket.socket(fileno=os.dup(args.task_fd))  # the same socket, for SCM_RIGHTS
    results = Connection(args.result_fd, readable=False)
    status_map = mmap.mmap(args.status_fd, 0)
    os.close(args.status_fd)
    status = np.frombuffer(status_map, dtype=np.int64)
    mine = args.worker_id * STATUS_STRIDE
    status[mine] = 0
    pid = os.getpid()
    segments: dict[str, Segment] = {}
    state: dict = {}
    try:
        while True:
            try:
                msg = tasks.recv()
            except (EOFError, OSError):
                return  # parent closed the connection or died
            if isinstance(msg, Shutdown):
                return
            task: Task = msg
            try:
                # first, so a task whose source fails still takes its slot's fd off the socket
                seg = _slot_of(task, segments, fds)
            except (OSError, KeyError, RuntimeError):
                return  # the parent broke the protocol or is gone: nothing sensible is left to do
            t0 = time.perf_counter()
            try:
                samples = _run_task(args.program, task, state)
            except _SampleFailure as f:
                cause = f.__cause__
                results.send(
                    TaskFailed(
                        task_id=task.task_id,
                        worker_id=args.worker_id,
                        pid=pid,
                        idx_in_epoch=f.idx,
                        iteration=task.iteration,
                        epoch_idx=task.epoch_idx,
                        stop_iteration=f.stop,
                        exc_type=type(cause).__name__ if cause else "",
                        message=str(cause) if cause else "",
                        traceback="".join(traceback.format_exception(cause)) if cause else "",
                    )
                )
                continue
            status[mine] = task.task_id + 1
            try:
                layout = write_samples(seg, samples)
            except Exception as e:
                if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.ENOMEM):
                    need = layout_size(samples)
                    results.send(_failed(
                        task, args,
                        f"no room in shared memory for this task's {len(samples)} samples "
                        f"({need / (1 << 20):.1f} MB in slot {seg.name}): {e}",
                        e, shm_bytes_per_sample=max(1, need // max(1, len(samples))),
                    ))
                else:  # a sample the pool cannot carry (e.g. an object array)
                    results.send(_failed(task, args, f"cannot place the task's output in shared memory: {e}", e))
                continue
            finally:
                status[mine] = 0
                # The samples are in shared memory now: free them before waiting for the next task.
                # Held until the next task replaced them, they kept glibc from reusing their heap
                # pages, and each worker of a loader actor grew by ~32 MB (tests/test_consumer_stage.py).
                del samples
            results.send(TaskDone(task.task_id, args.worker_id, seg.size, layout, time.perf_counter() - t0))
    finally:
        for seg in segments.values():
            seg.close()
        fds.close()
