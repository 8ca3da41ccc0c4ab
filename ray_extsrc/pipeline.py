"""`pipeline_def`, `Pipeline` and `external_source`: DALI's pipeline API over the worker pool.

Lifecycle (explicit, each illegal step says which state it is in)::

    DEFINED --start_py_workers()--> WORKERS_STARTED --build()--> BUILT --run()/reset()--> ...
       \\___________________________ build() _______________________/           close() -> CLOSED

Execution plan: `plan.make_plan`, fixed when the workers start (before CUDA, since fork happens
there): the *worker stage* runs in the Python workers, the *main stage* (GPU ops, ops on
non-parallel sources) per batch in this process — or, split with `serve_host_stage` /
`run_device`, in a consumer's process (`consumer_stage`).

Sharding (used by the Ray layer, see `sharding`): with ``num_shards=R, shard_id=r``, local iteration i
serves global batch ``g = i*R + r``; SampleInfo carries the global ``idx_in_epoch = g*B + j`` (or the
shuffled sample at that position) and ``iteration = g``. ``last_batch_policy`` says what happens to a
last round that R does not fill (`sharding`): ``"drop"`` (the default here, DALI's behaviour: only
whole batches of whole rounds), ``"pad"`` or ``"exact"`` (every sample below the source's
``__len__``, the partial last batch included; the slots past the end wrap to the epoch's start and
carry the SampleInfo of the position they repeat, so the source sees only positions of a normal
epoch; `valid_samples` says how many of a batch's samples are its own). With ``ways=A, way=k``
(not DALI's: several pipelines, one process each, serving one shard in turn, as a Loader's
``actors_per_worker`` do) this pipeline serves the shard's batches k, k+A, k+2A, ...
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import inspect
import secrets
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .errors import LifecycleError, SourceError
from .host_batch import HostBatch, pack_column
from .external_source import ExternalSourceOp, external_source, is_source, output_layout
from .graph import DataNode, Graph, OpNode, graph_scope
from .plan import Plan, make_plan
from .sharding import ShardLayout, check_last_batch_policy, epoch_permutation
from .gpu_probe import gpu_available
from .source import SourceKind, chunk_samples
from .tensors import TensorListCPU, TensorListGPU, assemble_cpu
from .types import BatchInfo, SampleInfo
from .workers import WorkerPool
from .workers.messages import TASK_SAMPLES
from .workers.pool import Chunk

__all__ = ["Pipeline", "pipeline_def", "external_source", "NoGPUWarning", "State", "ExternalSourceOp", "gpu_available"]


_warned_no_gpu = False  # one NoGPUWarning per process is enough


class NoGPUWarning(UserWarning):
    """GPU ops were asked for on a machine (or process) without a usable GPU; they run on the CPU."""


class State(enum.Enum):
    DEFINED = "defined"
    WORKERS_STARTED = "workers started"
    BUILT = "built"
    CLOSED = "closed"


class _EndOfEpoch(Exception):
    """StopIteration, carried through a Future (which must not raise StopIteration itself)."""


class Pipeline:
    """DALI's Pipeline, for graphs fed by external sources. Usually made with `pipeline_def`."""

    def __init__(
        self,
        batch_size: int,
        num_threads: int = 1,
        device_id: int | None = None,
        seed: int = -1,
        *,
        py_num_workers: int = 1,
        py_start_method: str = "fork",
        py_callback_pickler: Any = None,
        prefetch_queue_depth: int = 2,
        bytes_per_sample_hint: int | None = None,
        num_shards: int = 1,
        shard_id: int = 0,
        ways: int = 1,
        way: int = 0,
        shuffle: bool = False,
        last_batch_policy: str = "drop",
        exec_pipelined: bool = True,
        exec_async: bool = True,
        set_affinity: bool = False,
        max_streams: int = -1,
        enable_conditionals: bool = False,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
        if not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads must be a positive int; got {num_threads!r}")
        if not isinstance(prefetch_queue_depth, int) or prefetch_queue_depth < 1:
            raise ValueError(f"prefetch_queue_depth must be a positive int; got {prefetch_queue_depth!r}")
        if enable_conditionals:
            raise ValueError("enable_conditionals=True is not supported by ray_extsrc")
        if not isinstance(py_num_workers, int) or isinstance(py_num_workers, bool) or py_num_workers < 1:
            raise ValueError(
                f"py_num_workers must be a positive int (the Python workers of parallel sources); got {py_num_workers!r}"
            )
        if set_affinity:
            raise ValueError(
                "set_affinity=True is not supported by ray_extsrc: its CPU work runs in forked Python "
                "workers and nvImageCodec threads whose placement the OS decides; drop the argument"
            )
        if max_streams != -1:
            raise ValueError(
                f"max_streams={max_streams!r} is not supported by ray_extsrc: each pipeline uses one CUDA "
                "stream of its own (plus one per decode thread); drop the argument"
            )
        if py_start_method not in ("fork", "spawn"):
            raise ValueError(f"py_start_method must be 'fork' or 'spawn'; got {py_start_method!r}")
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.device_id = device_id
        self.seed = seed if seed is not None and seed >= 0 else secrets.randbits(63)
        self.py_num_workers = py_num_workers
        self.py_start_method = py_start_method
        self.py_callback_pickler = py_callback_pickler
        self.prefetch_queue_depth = prefetch_queue_depth
        self.bytes_per_sample_hint = bytes_per_sample_hint or (1 << 20)
        check_last_batch_policy(last_batch_policy, "Pipeline")
        self.layout = ShardLayout(num_shards, shard_id, ways=ways, way=way, last_batch_policy=last_batch_policy)
        self.shuffle = shuffle
        self._exec_async = bool(exec_async and exec_pipelined)
        self._ahead: collections.deque = collections.deque()  # (local iteration, Future), in order
        self._ahead_thread: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()  # the pool is driven from the ahead threads
        self._broken: tuple[int, str] | None = None  # (batch, error type) that stopped the epoch
        self.graph = Graph()
        self.outputs: tuple[DataNode, ...] = ()
        self.state = State.DEFINED
        self.epoch_idx = 0
        self._iteration = 0  # local iteration to run next
        self._submitted = 0  # local iterations submitted to the pool
        self._epoch_over = False
        self._pool: WorkerPool | None = None
        self._threads: ThreadPoolExecutor | None = None
        self._planned = False
        self.plan: Plan | None = None  # fixed when the workers start (see `plan`)
        self._gpu_release: weakref.finalize | None = None  # holds the process's GPU decoders (see build/close)
        # host stage only (a loader actor whose consumer runs the GPU stage): run() yields HostBatch
        self._host_only = False
        self._device_stage_open = False  # the consumer side: run_device() may be called
        self._scope: graph_scope | None = None
        #: seconds spent on the last batch, by stage (see run())
        self.last_timings: dict[str, float] = {}

    # -- definition --------------------------------------------------------------------------------

    def __enter__(self) -> Pipeline:
        self._require(State.DEFINED, "define ops in")
        self._scope = graph_scope(self.graph)
        self._scope.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._scope is not None:
            self._scope.__exit__(*exc)
            self._scope = None

    def set_outputs(self, *outputs: DataNode) -> None:
        self._require(State.DEFINED, "set outputs of")
        for i, x in enumerate(outputs):
            if not isinstance(x, DataNode):
                raise TypeError(f"pipeline output {i} must be a DataNode (an op's output); got {type(x).__name__}")
        self.outputs = tuple(outputs)

    # -- lifecycle ---------------------------------------------------------------------------------

    def _require(self, state: State, action: str) -> None:
        if self.state is not state:
            raise LifecycleError(
                f"cannot {action} a pipeline whose state is '{self.state.value}'; it must be '{state.value}'"
            )

    def start_py_workers(self) -> None:
        """Start the Python workers of the parallel sources. Call before anything touches CUDA."""
        if self.state is State.CLOSED:
            raise LifecycleError("cannot start workers of a closed pipeline")
        if self.state is not State.DEFINED:
            raise LifecycleError(
                f"start_py_workers() was already done (pipeline state: '{self.state.value}'); "
                "call it once per pipeline, before build()"
            )
        self._plan()
        if self.plan.program is not None:
            self._pool = WorkerPool(
                self.plan.program,
                self.py_num_workers,
                start_method=self.py_start_method,
                pickler=self.py_callback_pickler,
                slot_bytes=self._sample_bytes_hint() * max(1, -(-self.batch_size // self.py_num_workers)),
                name=f"shard {self.layout.shard_id}/{self.layout.num_shards}" if self.layout.num_shards > 1 else "",
            )
            self._pool.start()
        self.state = State.WORKERS_STARTED

    def _sample_bytes_hint(self) -> int:
        """Shared-memory bytes to reserve per sample: each parallel source's ``bytes_per_sample_hint``
        (``fn.external_source``'s, else the pipeline's), summed over the sources a sample comes from."""
        hints = [
            n.op.bytes_per_sample_hint or self.bytes_per_sample_hint
            for n in self.graph.nodes if is_source(n) and n.op.spec.parallel
        ]
        return sum(hints) if hints else self.bytes_per_sample_hint

    def build(self) -> None:
        if self.state is State.CLOSED:
            raise LifecycleError("cannot build a closed pipeline")
        if self.state is State.BUILT:
            return
        if self.state is State.DEFINED:
            self.start_py_workers()
        if self.plan.main_cpu and not self._host_only:
            self._threads = ThreadPoolExecutor(self.num_threads, thread_name_prefix="ray_extsrc")
        if self.plan.run_ahead:
            self._ahead_thread = ThreadPoolExecutor(self.plan.ahead_depth, thread_name_prefix="ray_extsrc-ahead")
        if not self._host_only:
            self._retain_gpu()
        self.state = State.BUILT

    def _retain_gpu(self) -> None:
        if self.plan.gpu_main and self._gpu_release is None:
            from .fn._gpu import decode

            decode.retain()  # the process's GPU decoders live while a GPU pipeline is open
            # released by close(), or when the pipeline is garbage-collected without it
            self._gpu_release = weakref.finalize(self, decode.release)

    # -- split execution: host stage in one process, the main-stage ops in another ---------------

    def serve_host_stage(self) -> None:
        """Make `run` stop after the host stage and return a `HostBatch` (call before `build`).

        The host stage is the workers' share and the in-process sources; the main-stage ops (GPU
        decode and augmentation) are left to a consumer that holds the same pipeline definition and
        calls `run_device` — a Ray Train worker running them in its own CUDA context. This process
        then never touches CUDA. The plan is the one a GPU process makes, so the workers compute
        the same per-sample parameters (crop boxes) either way.
        """
        if self.state not in (State.DEFINED, State.WORKERS_STARTED):
            raise LifecycleError(f"serve_host_stage() must come before build(); the pipeline is '{self.state.value}'")
        self._host_only = True

    def open_device_stage(self) -> None:
        """Prepare this (never started) pipeline to run `run_device` on host batches made by a
        twin pipeline's `serve_host_stage` in another process. Starts no workers."""
        if self.state is not State.DEFINED:
            raise LifecycleError(f"open_device_stage() needs a fresh pipeline; this one is '{self.state.value}'")
        if not self._planned:
            self._plan()
        if self.plan.main_cpu and self._threads is None:
            self._threads = ThreadPoolExecutor(self.num_threads, thread_name_prefix="ray_extsrc")
        self._retain_gpu()
        self._device_stage_open = True

    def prep_of(self, op_id: int) -> DataNode | None:
        """The output of GPU op ``op_id``'s per-sample host step run in the workers, if it has one."""
        return self.plan.prep_of.get(op_id)

    @property
    def has_device_stage(self) -> bool:
        """Whether any op runs after the host stage (else a HostBatch already holds the outputs)."""
        if not self._planned:
            self._plan()
        return any(not is_source(n) for n in self.plan.main_nodes)

    def run_device(self, batch: HostBatch, *, order_consumer: bool = True) -> tuple:
        """The outputs of ``batch`` after the main-stage ops (see `serve_host_stage`).

        With ``order_consumer=False`` the consumer's streams are not made to wait here: each GPU
        output's ``ready_event`` is the event to wait on (`gpu_handoff` waits on it and copies the
        output, so nothing of the stage's memory is reused while the consumer reads it).
        """
        if not self._device_stage_open:
            raise LifecycleError("run_device() needs open_device_stage() first")
        env = batch.env()
        t0 = time.perf_counter()
        outputs = self._run_ops(batch.infos, env, order_consumer=order_consumer)
        self.last_timings = {"main_ops_s": time.perf_counter() - t0}
        return outputs

    def close(self) -> None:
        """Stop the workers and free shared memory. Idempotent; also done at garbage collection."""
        self._drain_ahead()
        if self._ahead_thread is not None:
            self._ahead_thread.shutdown(wait=True)
            self._ahead_thread = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._threads is not None:
            self._threads.shutdown(wait=True, cancel_futures=True)
            self._threads = None
        if self._gpu_release is not None:
            self._gpu_release()  # runs decode.release() once
            self._gpu_release = None
        self._device_stage_open = False
        self.state = State.CLOSED

    @property
    def py_worker_pids(self) -> dict[int, int]:
        """worker id -> pid of this pipeline's live Python workers (empty when not parallel)."""
        return self._pool.pids if self._pool is not None else {}

    @property
    def py_worker_respawns(self) -> int:
        return self._pool.respawns if self._pool is not None else 0

    # -- planning ----------------------------------------------------------------------------------

    def _plan(self) -> None:
        """Fix the execution plan (see `plan.make_plan`), apply its op settings, warn once about
        GPU ops that run on the CPU."""
        plan = make_plan(
            self.graph.nodes, self.outputs, use_gpu=self.device_id is not None and gpu_available(),
            batch_size=self.batch_size, seed=self.seed, exec_async=self._exec_async,
        )
        if self.shuffle and plan.num_samples is None:
            raise ValueError("shuffle=True needs per-sample sources that define __len__ (the number of samples)")
        if (self.layout.num_shards > 1 or self.layout.ways > 1) and plan.has_iterable:
            raise ValueError("an iterable source cannot be sharded (it is stateful); use a callable source")
        if self.layout.last_batch_policy == "exact" and plan.num_samples is None:
            raise ValueError(
                "last_batch_policy='exact' needs the epoch's number of samples, to mark the padding "
                "of the last round: give every source a __len__ (per-sample sources; batch sources and "
                "iterables have none), or use last_batch_policy='pad' or 'drop'"
            )
        if self.layout.last_batch_policy == "pad" and plan.num_samples is None and self.layout.num_shards > 1:
            warnings.warn(
                f"ray_extsrc: last_batch_policy='pad' (shard {self.layout.shard_id}/{self.layout.num_shards}) "
                "cannot pad an epoch of unknown length: the source has no __len__, so the epoch ends "
                "where it raises StopIteration and a last round the shards do not fill is dropped. "
                "Give the source a __len__ to serve every sample.",
                RuntimeWarning,
                stacklevel=3,
            )
        plan.apply_to_ops(self.graph.nodes)
        global _warned_no_gpu
        if plan.cpu_fallback and not _warned_no_gpu:
            _warned_no_gpu = True
            why = "no usable GPU in this process" if not plan.use_gpu else "their GPU implementation is not available"
            warnings.warn(
                f"ray_extsrc: {', '.join(plan.cpu_fallback)} will run on the CPU: {why} "
                f"(device_id={self.device_id!r}). Results are the same; only speed differs.",
                NoGPUWarning,
                stacklevel=3,
            )
        self.plan = plan
        self._perm: tuple[int, np.ndarray] | None = None
        self._planned = True

    @property
    def last_batch_policy(self) -> str:
        """The last-batch policy in effect: the one asked for, except ``"pad"`` without a known
        number of samples, which can only drop (see `sharding`)."""
        if not self._planned:
            self._plan()
        if self.layout.pads and self.plan.num_samples is None:
            return "drop"
        return self.layout.last_batch_policy

    def valid_samples(self, iteration: int | None = None) -> int:
        """How many samples of local batch ``iteration`` (default: the one `run` returned last)
        are its own: the first ones. The rest pad the last round (``"pad"``/``"exact"``) with
        repeats of the epoch's first positions; under ``"exact"`` the validity mask of a batch is
        ``np.arange(batch_size) < pipe.valid_samples()``."""
        if not self._planned:
            self._plan()
        i = self._iteration - 1 if iteration is None else iteration
        if i < 0:
            raise LifecycleError("valid_samples(): no batch of this epoch was run yet; pass the local iteration")
        return self.layout.valid_samples(self._global_iteration(i), self.plan.num_samples, self.batch_size)

    @property
    def _epoch_length(self) -> int | None:
        if self.plan.num_samples is None:
            return None
        return self.layout.epoch_length(self.plan.num_samples, self.batch_size)

    def epoch_size(self) -> int | None:
        """Batches this pipeline (this shard) yields per epoch, if the source has ``__len__``."""
        if not self._planned:
            self._plan()
        return self._epoch_length

    def shard_epoch_size(self) -> int | None:
        """Batches the whole shard yields per epoch (all the ways of a shard that several
        pipelines serve in turn, see `sharding`), if the source has ``__len__``."""
        if not self._planned:
            self._plan()
        if self.plan.num_samples is None:
            return None
        return self.layout.shard_length(self.plan.num_samples, self.batch_size)

    # -- running -----------------------------------------------------------------------------------

    def _global_iteration(self, i: int) -> int:
        return self.layout.global_batch(i)

    def _sample_index(self, position: int) -> int:
        if not self.shuffle:
            return position
        if self._perm is None or self._perm[0] != self.epoch_idx:
            self._perm = (self.epoch_idx, epoch_permutation(self.seed, self.epoch_idx, self.plan.num_samples))
        return int(self._perm[1][position])

    def _infos_of_global(self, g: int, only_last: bool = False) -> tuple[SampleInfo, ...]:
        """The SampleInfos of global batch g: slot j holds position q (``g*B + j``, or the position a
        padding slot repeats), with that position's own ``idx_in_batch = q % B`` and
        ``iteration = q // B``: a repeat is the very sample (and augmentation) served at q."""
        b = self.batch_size
        if only_last:  # a probe: asked only when the epoch's length is unknown (no padding)
            return (SampleInfo(self._sample_index(g * b + b - 1), b - 1, g, self.epoch_idx),)
        positions = self.layout.positions(g, self.plan.num_samples, b).tolist()
        return tuple(SampleInfo(self._sample_index(q), q % b, q // b, self.epoch_idx) for q in positions)

    def _sample_infos(self, i: int) -> tuple[SampleInfo, ...]:
        return self._infos_of_global(self._global_iteration(i))

    def _probe(self, i: int) -> tuple[SampleInfo, ...]:
        """See `sharding`: without __len__, a shard learns the epoch's end from the last shard's batch."""
        if self._epoch_length is not None:
            return ()
        g = self.layout.probe_batch(i)
        return () if g is None else self._infos_of_global(g, only_last=True)

    def _submit_ahead(self, i: int) -> None:
        if self._pool is None:
            return
        last = i + self.prefetch_queue_depth
        if self._epoch_length is not None:
            last = min(last, self._epoch_length)
        while self._submitted < last:
            k = self._submitted
            g = self._global_iteration(k)
            kind = self.plan.program.kind
            if kind == TASK_SAMPLES:
                chunks = [Chunk(kind, samples=c) for c in chunk_samples(self._sample_infos(k), self.py_num_workers)]
                probe = self._probe(k)
                if probe:
                    chunks.append(Chunk(kind, samples=probe))
            else:
                chunks = [Chunk(kind, batch=BatchInfo(g, self.epoch_idx))]
            self._pool.submit((self.epoch_idx, k), self.epoch_idx, g, chunks)
            self._submitted += 1

    def run(self) -> tuple[TensorListCPU | TensorListGPU, ...]:
        """The next batch's outputs. Raises StopIteration at the end of the epoch (then reset())."""
        if self.state is State.CLOSED:
            raise LifecycleError("cannot run a closed pipeline")
        if self.state is not State.BUILT:
            self.build()
        if self._epoch_over:
            raise StopIteration
        if self._broken is not None:
            raise LifecycleError(
                f"this epoch stopped at batch {self._broken[0]} with {self._broken[1]}; "
                "call reset() to start the next epoch (or skip_to() to go elsewhere)"
            )
        i = self._iteration
        try:
            if self.plan.run_ahead:
                self._fill_ahead(i)
                _, fut = self._ahead.popleft()
                outputs, self.last_timings = fut.result()
                self._fill_ahead(i + 1)  # start the next batches now, overlapping the consumer
            else:
                outputs, self.last_timings = self._compute(i, None)
        except _EndOfEpoch:
            self._epoch_over = True
            raise StopIteration from None
        except Exception as e:
            self._broken = (i, type(e).__name__)
            raise
        self._iteration = i + 1
        return outputs

    def _fill_ahead(self, start: int) -> None:
        """Have batches ``start .. start + depth - 1`` (within the epoch) computing ahead."""
        nxt = self._ahead[-1][0] + 1 if self._ahead else start
        while len(self._ahead) < self.plan.ahead_depth and (self._epoch_length is None or nxt < self._epoch_length or not self._ahead):
            self._ahead.append((nxt, self._ahead_thread.submit(self._compute, nxt, self.consumer_fence())))
            nxt += 1

    def consumer_fence(self) -> Any:
        """Called in the consumer's thread: a marker after everything it queued on the GPU so far
        (its work on earlier batches), which the next batch's GPU work waits for before reusing
        memory those batches had."""
        if not self.plan.gpu_main:
            return None
        from .fn import _gpu_exec

        return _gpu_exec.consumer_fence()

    def _compute(self, i: int, fence: Any) -> tuple[tuple, dict[str, float]]:
        """Batch i of the epoch, start to finish (in the caller's or the ahead thread)."""
        if self._epoch_length is not None and i >= self._epoch_length:
            raise _EndOfEpoch
        env: dict[int, Any] = {}
        key = (self.epoch_idx, i)
        t0 = time.perf_counter()
        try:
            if self._pool is not None:
                with self._pool_lock:
                    self._submit_ahead(i)
                    samples = self._pool.collect(key)[: self.batch_size]  # minus the probe, if any
                    compute_s = self._pool.last_compute_s
                for k, x in enumerate(self.plan.exports):
                    env.setdefault(x.source.op_id, {})[x.index] = [s[k] for s in samples]
            t1 = time.perf_counter()
            if self._host_only:
                self._run_sources(i, env)
                outputs = (self._host_batch(i, env),)
            else:
                if fence is not None:
                    from .fn import _gpu_exec

                    _gpu_exec.wait_fence(self, fence)
                outputs = self._run_main(i, env)
        except StopIteration:
            if self.layout.pads and self.plan.num_samples is not None:
                raise self._stop_inside_epoch(i) from None
            raise _EndOfEpoch from None
        finally:
            if self._pool is not None:
                with self._pool_lock:
                    self._pool.release(key)
        t2 = time.perf_counter()
        timings = {
            "worker_wait_s": t1 - t0,  # waiting for the workers' share of this batch
            "worker_compute_s": compute_s if self._pool is not None else 0.0,
            "main_ops_s": t2 - t1,  # main-stage ops (GPU decode/augment) and assembling outputs
        }
        return outputs, timings

    def _stop_inside_epoch(self, i: int) -> SourceError:
        """A source that ended the epoch before its ``__len__`` under a padding policy: the shards
        agreed on the epoch's length from ``__len__``, so an early end would leave them unequal."""
        g = self._global_iteration(i)
        iterations = sorted({info.iteration for info in self._sample_infos(i)})
        return SourceError(
            f"the source raised StopIteration in global batch {g} (epoch_idx={self.epoch_idx}, its samples' "
            f"SampleInfo.iteration {iterations}), inside the {self.plan.num_samples} samples its __len__ "
            f"declares. Under last_batch_policy={self.layout.last_batch_policy!r} every idx_in_epoch below "
            "__len__ is served, a partial last batch included. Make the source serve all of them (raise "
            "StopIteration on idx_in_epoch >= len, not on iteration >= len // batch_size), make __len__ "
            "return the number it serves, or use last_batch_policy='drop'",
            iteration=g,
            epoch_idx=self.epoch_idx,
        )

    def _drain_ahead(self) -> None:
        """Let a batch computed ahead finish (its result is dropped) before the pool is touched."""
        while self._ahead:
            _, fut = self._ahead.popleft()
            try:
                fut.result()
            except BaseException:  # noqa: BLE001 - its error belongs to a batch nobody will ask for
                pass

    def _run_main(self, i: int, env: dict[int, dict[int, list]]) -> tuple:
        # in-process (parallel=False) sources first, then the main-stage ops in graph order
        self._run_sources(i, env)
        return self._run_ops(self._sample_infos(i), env)

    def _host_batch(self, i: int, env: dict[int, dict[int, list]]) -> HostBatch:
        """Batch i after the host stage, copied out of the workers' slots (see `host_batch`)."""
        columns = {op_id: {k: pack_column(v) for k, v in outs.items()} for op_id, outs in env.items()}
        return HostBatch(self.epoch_idx, i, self._sample_infos(i), columns)

    def _run_sources(self, i: int, env: dict[int, dict[int, list]]) -> None:
        infos = self._sample_infos(i)
        g = self._global_iteration(i)
        for node in self.plan.main_nodes:
            if is_source(node):
                spec = node.op.spec
                if spec.kind is SourceKind.SAMPLE:
                    for info in self._probe(i):
                        spec.call_sample(info)  # raises StopIteration past the end
                    rows = [spec.call_sample(info) for info in infos]
                elif spec.kind is SourceKind.BATCH:
                    rows = spec.call_batch(BatchInfo(g, self.epoch_idx))
                else:
                    if i == 0:
                        spec.start_epoch(self.epoch_idx)
                    rows = spec.next_batch(BatchInfo(g, self.epoch_idx))
                env[node.op_id] = {k: [r[k] for r in rows] for k in range(spec.width)}

    def _run_ops(self, infos: Sequence[SampleInfo], env: dict, *, order_consumer: bool = True) -> tuple:
        """The main-stage ops for one batch (CPU ops on the thread pool, then GPU ops), assembled."""
        cpu_nodes = {n.op_id for n in self.plan.main_eval.nodes}
        if cpu_nodes:
            self._run_main_cpu(infos, env, infos[0].epoch_idx if infos else self.epoch_idx)
        for node in self.plan.main_nodes:
            if node.op_id in cpu_nodes or is_source(node):
                continue
            self._run_gpu_op(node, infos, env)
        return tuple(self._assemble(x, env, order_consumer) for x in self.outputs)

    def _run_main_cpu(self, infos: Sequence[SampleInfo], env: dict[int, dict[int, list]], epoch_idx: int) -> None:
        def one(j: int) -> dict[int, tuple]:
            sample_env = {op_id: _row(outs, j) for op_id, outs in env.items()}
            return self.plan.main_eval.run(infos[j], sample_env, epoch_idx)

        if self._threads is None:  # build() makes the pool when the main stage has CPU ops
            raise LifecycleError("the pipeline is not built")
        results = list(self._threads.map(one, range(len(infos))))
        for node in self.plan.main_eval.nodes:
            env[node.op_id] = {
                k: [r[node.op_id][k] for r in results] for k in range(node.op.num_outputs)
            }

    def _run_gpu_op(self, node: OpNode, infos: Sequence[SampleInfo], env: dict) -> None:
        from .fn import _gpu_exec  # GPU modules load lazily, only on GPU machines

        env[node.op_id] = _gpu_exec.run_op(self, node, infos, env)

    def _assemble(self, x: DataNode, env: dict, order_consumer: bool = True) -> TensorListCPU | TensorListGPU:
        data = env[x.source.op_id][x.index]
        layout = output_layout(x)
        if self.plan.device.get(x.source.op_id) == "gpu":
            from .fn import _gpu_exec

            return _gpu_exec.assemble(data, layout, order_consumer=order_consumer)
        return assemble_cpu(data, layout)

    def reset(self) -> None:
        """End the current epoch (wherever it stands) and start the next one (``epoch_idx + 1``)."""
        if self.state is State.CLOSED:
            raise LifecycleError("cannot reset a closed pipeline")
        self._drain_ahead()
        if self._pool is not None:
            self._pool.discard()
        self._broken = None
        self.epoch_idx += 1
        if self.layout.base:  # a resumed epoch is over: the next one starts from its beginning
            self.layout = dataclasses.replace(self.layout, base=0)
        self._iteration = 0
        self._submitted = 0
        self._epoch_over = False

    def position(self) -> dict[str, int]:
        """Where this shard stands: the epoch, and the global batches consumed by all shards.

        Feed it to `skip_to` (possibly of a pipeline with another ``num_shards``) to resume.
        """
        return {"epoch_idx": self.epoch_idx, "consumed_batches": self.layout.consumed_after(self._iteration)}

    def skip_to(self, epoch_idx: int, iteration: int = 0, *, consumed_batches: int | None = None) -> None:
        """Continue at local ``iteration`` of ``epoch_idx``; with ``consumed_batches``, after that many
        global batches of the epoch were consumed under an earlier (maybe different) shard layout."""
        if self.state is State.CLOSED:
            raise LifecycleError("cannot move a closed pipeline")
        self._drain_ahead()
        if self._pool is not None:
            self._pool.discard()
        if consumed_batches is not None:
            self.layout = dataclasses.replace(self.layout, base=consumed_batches)
        self.epoch_idx = epoch_idx
        self._iteration = iteration
        self._submitted = iteration
        self._epoch_over = False
        self._broken = None


def _row(outs: dict[int, list], j: int) -> tuple:
    """Sample j of a node's outputs; outputs nobody downstream needs stay None."""
    return tuple(outs[k][j] if k in outs else None for k in range(max(outs) + 1))


_PIPELINE_ARGS = set(inspect.signature(Pipeline.__init__).parameters) - {"self"}


def pipeline_def(fn: Callable | None = None, **pipeline_kwargs: Any) -> Callable:
    """DALI's ``@pipeline_def``: calling the decorated function builds a `Pipeline`.

    Pipeline arguments (``batch_size``, ``py_num_workers``, ...) given to the decorator are defaults;
    the same names given to the call override them; other arguments go to the function::

        @pipeline_def(batch_size=4, num_threads=2, device_id=0, py_num_workers=4)
        def training_pipeline():
            jpegs, labels = fn.external_source(source=..., num_outputs=2, parallel=True, batch=False)
            return fn.decoders.image(jpegs, device="mixed"), labels

        pipe = training_pipeline()
        pipe.start_py_workers(); pipe.build(); images, labels = pipe.run()
    """
    unknown = set(pipeline_kwargs) - _PIPELINE_ARGS
    if unknown:
        raise TypeError(f"pipeline_def: unknown pipeline argument(s) {sorted(unknown)}")

    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def create(*args: Any, **kwargs: Any) -> Pipeline:
            pipe_args = dict(pipeline_kwargs)
            for k in list(kwargs):
                if k in _PIPELINE_ARGS:
                    pipe_args[k] = kwargs.pop(k)
            pipe = Pipeline(**pipe_args)
            with pipe:
                outputs = func(*args, **kwargs)
            if isinstance(outputs, DataNode):
                outputs = (outputs,)
            pipe.set_outputs(*outputs)
            return pipe

        create.pipeline_kwargs = dict(pipeline_kwargs)  # read by train.Loader (e.g. the seed)
        return create

    return decorate(fn) if fn is not None else decorate
