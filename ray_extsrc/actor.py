"""`LoaderActor`: one shard of the epoch, served to one Ray Train worker (its consumer).

Consumer side: `loader_iterator.LoaderIterator`, which creates this actor on its own node, pinned
to its own GPU, and asks for batches by exact position. The actor is plain Python here;
`loader_iterator` wraps it with ``ray.remote`` (``max_restarts=-1, max_task_retries=-1``), so this
module imports no Ray at load.

NOTE [fork before CUDA]
``__init__`` runs in this order, and the order matters:
1. ``CUDA_VISIBLE_DEVICES`` is set to the consumer's GPU (the actor asks Ray for ``num_gpus=0``:
   the GPU is the Train worker's, shared), or to "" for a CPU consumer;
2. the shared-memory janitor is started (see NOTE [orphaned shared memory]);
3. the pipeline is created and ``start_py_workers()`` forks its workers — nothing has touched CUDA yet;
4. ``build()``, then CUDA is initialised at once on device 0 (the consumer's GPU), so that later
   calls, which Ray runs with its own view of the environment, find the device already claimed.

NOTE [position protocol]
The consumer asks for ``next_batch(epoch_idx, base, iteration)``: local ``iteration`` of epoch
``epoch_idx`` under the shard layout that started after ``base`` global batches (``base`` is 0 except
in an epoch resumed with another number of shards; see `sharding`). The actor keeps a cursor, the
position its pipeline will produce next. A request at the cursor just runs the pipeline; the first
request of the epoch after one that ended does ``reset()``; any other request (a restarted actor
serving a retried call, a consumer that stopped mid-epoch, a resume from a checkpoint) moves the
pipeline with ``skip_to``. Because a batch is a pure function of (seed, epoch, position), a restarted
actor serves the very batch its consumer was waiting for: nothing is lost or served twice. The
last-batch policy (`sharding`) is part of the spec, so the padding of the last round, and how many
of a batch's samples are its own (`BatchReply.valid`), are pure functions of the position too.
A request past the epoch's end answers `BatchReply.end` without touching the pipeline.

NOTE [orphaned shared memory]
The pipeline's shared-memory slots are memfds by default (`workers.shm`): the kernel frees them
with the last descriptor or mapping, however the actor dies, and the janitor finds nothing. With
the ``/dev/shm`` fallback they are files (``/dev/shm/rxs_<pid>_*``), unlinked by ``close()``. An actor
killed by Ray (restart after a crash, ``ray.kill``, its owner's death, its node going away) never
gets there, so ``__init__`` starts a tiny janitor process (no imports but ``os``/``glob``) holding the
read end of a pipe whose only write end lives in this process. When the actor dies, however it
dies, the janitor reads EOF and unlinks this pid's segments; after a clean ``close()`` it finds none.
The janitor detaches (forks, and its parent exits) because Ray kills an actor's child processes when
``ray.kill`` ends it; as a grandchild re-parented to init it outlives the actor, by design, until
that EOF (the zygote closes every inherited descriptor, so only this process holds the write end).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import RayExtSrcError
from .pipeline import Pipeline
from .workers.shm import segment_glob

__all__ = ["LoaderSpec", "BatchReply", "LoaderActor", "process_start_time", "shm_pattern"]

_JANITOR = (
    "import glob, os, sys\n"
    "if os.fork():\n"  # detach: Ray kills an actor's child processes when it kills the actor
    "    os._exit(0)\n"
    "sys.stdin.buffer.read()\n"  # EOF: the actor process is gone (or closed us after close())
    "for p in glob.glob(sys.argv[1]):\n"
    "    try:\n"
    "        os.unlink(p)\n"
    "    except OSError:\n"
    "        pass\n"
)


def process_start_time(pid: int | str = "self") -> float:
    """When process ``pid`` started, as a ``time.time()`` value (Linux ``/proc``, to 10 ms; now elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime, clock ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return time.time()
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


def shm_pattern(pid: int) -> str:
    """Glob of the shared-memory segments created by process ``pid`` (see `workers.shm`)."""
    return segment_glob(pid)


@dataclass(frozen=True)
class LoaderSpec:
    """What a `LoaderActor` is built from (travels to the actor, and again on each restart)."""

    pipeline_fn: Callable[..., Any]  # a @pipeline_def function
    pipeline_kwargs: Mapping[str, Any]  # overrides: pipeline args and the function's own args
    output_names: tuple[str, ...] | None
    num_shards: int
    shard_id: int
    seed: int
    gpu_id: str | None = None  # the consumer's GPU (as Ray names it), or None for a CPU consumer
    zero_copy: bool = True  # same-GPU outputs by CUDA IPC (else through host memory)
    label: str = "loader"  # for messages: which loader this is
    ways: int = 1  # loader actors serving this shard in turn (see `sharding`)
    way: int = 0  # which of them this actor is
    # "actor": the GPU stage runs here and outputs are delivered (CUDA IPC / host);
    # "consumer": this actor stops after the host stage and sends a HostBatch (never touches CUDA)
    gpu_stage: str = "actor"
    last_batch_policy: str = "drop"  # what the last round that the shards do not fill becomes (`sharding`)
    # "consumer": slots of this actor's shared-memory ring for the host batches (`host_ring`);
    # 0: they go through Ray's object store
    host_ring_slots: int = 0


@dataclass(frozen=True)
class BatchReply:
    """The answer to one `LoaderActor.next_batch` call."""

    epoch_idx: int
    base: int
    iteration: int
    end: bool  # the epoch has no batch at this position (outputs empty)
    # per output: a NumPy array, a list of them, or a transport.IpcBuffer; or, when the consumer
    # runs the GPU stage, a single host_batch.HostBatch
    outputs: tuple[Any, ...] = ()
    lease: int | None = None  # IPC buffers to give back once the consumer is done (see transport)
    # the shard's batches this epoch (its consumer's iterations, over all the shard's actors), when
    # the source knows its length
    epoch_size: int | None = None
    # how many of the batch's samples are its own (the first ones); the rest pad the last round
    # ("pad"/"exact", see `sharding`). None at the end.
    valid: int | None = None
    timings: Mapping[str, float] = field(default_factory=dict)
    actor_pid: int = 0
    worker_respawns: int = 0
    # samples of this batch replaced under on_error="skip" (`sample_errors.SkippedSample.to_dict`)
    skipped: tuple[dict, ...] = ()


class LoaderActor:
    """Runs one shard of a pipeline and serves its batches by position. See the module's NOTEs."""

    def __init__(self, spec: LoaderSpec) -> None:
        # NOTE [fork before CUDA], step 1
        os.environ["CUDA_VISIBLE_DEVICES"] = spec.gpu_id if spec.gpu_id is not None else ""
        self.spec = spec
        self.pid = os.getpid()
        #: wall-clock times (time.time()) of this actor's start-up milestones (`describe`)
        self.startup: dict[str, float] = {"process_started": process_start_time(), "init_began": time.time()}
        janitor = subprocess.Popen(
            [sys.executable, "-c", _JANITOR, shm_pattern(self.pid)],
            stdin=subprocess.PIPE,
            start_new_session=True,  # not in our process group: a group kill must not take it too
        )
        janitor.wait()  # the detached grandchild carries on
        self._janitor_pipe = janitor.stdin
        kwargs = dict(spec.pipeline_kwargs)
        kwargs.update(
            num_shards=spec.num_shards,
            shard_id=spec.shard_id,
            device_id=0 if spec.gpu_id is not None else None,
            seed=spec.seed,
            last_batch_policy=spec.last_batch_policy,
            ways=spec.ways,
            way=spec.way,
        )
        self.pipe = spec.pipeline_fn(**kwargs)
        if not isinstance(self.pipe, Pipeline):
            self.close()
            raise TypeError(
                f"{spec.label}: the Loader's pipeline function must be a @pipeline_def function, which "
                f"returns a Pipeline; {spec.pipeline_fn!r} returned {type(self.pipe).__name__}"
            )
        self._host_only = spec.gpu_stage == "consumer"
        self._ring = None
        if self._host_only:
            # the batches' bytes are packed straight into the ring's slots (made after build)
            self.pipe.serve_host_stage(buffers=self._ring_buffers if spec.host_ring_slots else None)
        n_out = len(self.pipe.outputs)
        if spec.output_names is not None and len(spec.output_names) != n_out:
            self.close()
            raise ValueError(
                f"{spec.label}: outputs={spec.output_names!r} names {len(spec.output_names)} outputs, "
                f"but the pipeline {getattr(spec.pipeline_fn, '__name__', spec.pipeline_fn)!r} returns {n_out}"
            )
        self.pipe.start_py_workers()  # step 3: fork while CUDA is untouched
        self.startup["workers_started"] = time.time()
        self.pipe.build()
        if self._host_only and spec.host_ring_slots:
            from .host_ring import HostRing

            # a slot for each batch the pipeline packs ahead of the requests, too
            plan = self.pipe.plan
            self._ring = HostRing(spec.host_ring_slots + (plan.ahead_depth if plan.run_ahead else 0))
        self._exporter = None
        if spec.gpu_id is not None and not self._host_only:
            import cupy

            cupy.cuda.Device(0).use()  # step 4: claim the GPU now
            cupy.cuda.runtime.free(cupy.cuda.runtime.malloc(1))
            if spec.zero_copy:
                from .transport import IpcExporter

                self._exporter = IpcExporter(self.pid)
        self._cursor = (self.pipe.epoch_idx, 0, 0)  # (epoch_idx, base, iteration) run() produces next
        self._cursor_valid = True
        self._epoch_over = False
        self._ends: dict[tuple[int, int], int] = {}  # (epoch, base) -> first iteration past the end
        self.startup["ready"] = time.time()

    # -- introspection (tests, stats) -------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        import ray

        return {
            "pid": self.pid,
            "node_id": ray.get_runtime_context().get_node_id(),
            "num_shards": self.spec.num_shards,
            "shard_id": self.spec.shard_id,
            "way": (self.spec.way, self.spec.ways),
            "seed": self.pipe.seed,
            "gpu_id": self.spec.gpu_id,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "epoch_size": self.pipe.epoch_size(),
            "last_batch_policy": self.pipe.last_batch_policy,
            "cursor": self._cursor if self._cursor_valid else None,
            "worker_pids": dict(self.pipe.py_worker_pids),
            "worker_respawns": self.pipe.py_worker_respawns,
            "ipc_buffers": self._exporter.num_buffers if self._exporter is not None else 0,
            "gpu_stage": "consumer" if self._host_only else "actor",
            "host_ring": self._ring.stats() if self._ring is not None else None,
            "startup": dict(self.startup),
        }

    def worker_pids(self) -> dict[int, int]:
        """worker id -> pid of the pipeline's Python workers (to kill one in a test)."""
        return dict(self.pipe.py_worker_pids)

    # -- serving ----------------------------------------------------------------------------------

    def _ring_buffers(self, sizes: list[int]) -> list | None:
        """Where the pipeline packs a host batch's bytes: room in a ring slot, if one is free."""
        ring = self._ring
        return ring.reserve(sizes) if ring is not None else None

    def _move_to(self, epoch_idx: int, base: int, iteration: int) -> None:
        """See NOTE [position protocol]."""
        want = (epoch_idx, base, iteration)
        if self._cursor_valid and self._cursor == want:
            return
        if self._cursor_valid and self._epoch_over and want == (self._cursor[0] + 1, 0, 0):
            self.pipe.reset()
        else:
            self.pipe.skip_to(epoch_idx, iteration, consumed_batches=base)
        self._cursor, self._cursor_valid, self._epoch_over = want, True, False

    def next_batch(self, epoch_idx: int, base: int, iteration: int, release: Sequence[int] = ()) -> BatchReply:
        """The batch at local ``iteration`` of epoch ``epoch_idx`` (layout after ``base``), or the end."""
        if self._exporter is not None and release:
            self._exporter.release(release)
        end = self._ends.get((epoch_idx, base))
        if end is not None and iteration >= end:
            return self._end_reply(epoch_idx, base, iteration)
        t0 = time.perf_counter()
        self._move_to(epoch_idx, base, iteration)
        t1 = time.perf_counter()
        try:
            outputs = self.pipe.run()
        except StopIteration:
            self._epoch_over = True
            self._ends[(epoch_idx, base)] = iteration
            if len(self._ends) > 8:  # only the current and recent epochs matter
                del self._ends[next(iter(self._ends))]
            return self._end_reply(epoch_idx, base, iteration)
        except RayExtSrcError as e:
            self._cursor_valid = False  # the pipeline's queue is in an unknown state: skip_to next time
            e.add_note(f"in {self.spec.label}, loader actor pid {self.pid}")
            raise
        except BaseException:
            self._cursor_valid = False
            raise
        self._cursor = (epoch_idx, base, iteration + 1)
        t2 = time.perf_counter()
        if self._host_only:  # (HostBatch,): the consumer runs the GPU stage
            payload, lease = outputs, None
            if self._ring is not None:  # its bytes in the ring, not the object store
                payload = (self._ring.place(outputs[0]),)
        else:
            from .transport import encode_outputs

            payload, lease = encode_outputs(outputs, self._exporter)
        t3 = time.perf_counter()
        self.startup.setdefault("first_batch", time.time())
        timings = dict(self.pipe.last_timings)
        timings.update(seek_s=t1 - t0, encode_s=t3 - t2)
        return BatchReply(
            epoch_idx,
            base,
            iteration,
            end=False,
            outputs=payload,
            lease=lease,
            epoch_size=self.pipe.shard_epoch_size(),
            valid=self.pipe.valid_samples(iteration),
            timings=timings,
            actor_pid=self.pid,
            worker_respawns=self.pipe.py_worker_respawns,
            skipped=tuple(e.to_dict() for e in self.pipe.last_skipped),
        )

    def _end_reply(self, epoch_idx: int, base: int, iteration: int) -> BatchReply:
        return BatchReply(
            epoch_idx,
            base,
            iteration,
            end=True,
            epoch_size=self._ends.get((epoch_idx, base)) if self.spec.ways == 1 else None,
            actor_pid=self.pid,
            worker_respawns=self.pipe.py_worker_respawns,
        )

    def release(self, leases: Sequence[int] = (), everything: bool = False) -> None:
        """Give back IPC buffers (see transport's NOTE [IPC buffer lifetime])."""
        if self._exporter is None:
            return
        if everything:
            self._exporter.release_all()
        else:
            self._exporter.release(leases)

    def close(self) -> None:
        """Stop the workers, free shared memory and GPU buffers. Idempotent."""
        pipe = getattr(self, "pipe", None)
        if isinstance(pipe, Pipeline):
            pipe.close()
        exporter = getattr(self, "_exporter", None)
        if exporter is not None:
            exporter.close()
        ring = getattr(self, "_ring", None)
        if ring is not None:
            ring.close()
            self._ring = None
        self._janitor_pipe.close()  # EOF: the janitor finds nothing left to unlink and exits
