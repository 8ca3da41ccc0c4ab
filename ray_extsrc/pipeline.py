"""`pipeline_def`, `Pipeline` and `external_source`: DALI's pipeline API over the worker pool.

Lifecycle (explicit, each illegal step says which state it is in)::

    DEFINED --start_py_workers()--> WORKERS_STARTED --build()--> BUILT --run()/reset()--> ...
       \\___________________________ build() _______________________/           close() -> CLOSED

Execution plan: `plan.make_plan`, fixed when the workers start (before CUDA, since fork happens
there): the *worker stage* runs in the Python workers, the *main stage* (GPU ops, ops on
non-parallel sources) per batch in this process — or, split with `serve_host_stage` /
`run_device`, in a consumer's process (`consumer_stage`). Running it is `executor`'s: the
pipeline keeps the lifecycle and the position (epoch, local iteration, layout) and hands the
executor a fresh `executor.Positions` whenever it moves.

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

Bad samples (not DALI's): ``on_error="skip"`` replaces a sample whose source or decoder fails by a
deterministic substitute from the same shard and epoch, so batches stay full; ``max_error_rate``
bounds how many one epoch may skip (`sample_errors`, `executor.substitutes`); `skipped_samples`
names them. The default, ``"raise"``, stops the batch with the sample's error, as DALI does.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import secrets
import time
import warnings
from collections.abc import Callable
from typing import Any

from .errors import LifecycleError
from .executor import EndOfEpoch, HostStage, MainStage, Positions, RunAhead
from .executor.host_stage import Buffers
from .executor.substitutes import Substitutes
from .external_source import ExternalSourceOp, external_source, is_source
from .graph import DataNode, Graph, graph_scope
from .gpu_probe import gpu_available
from .host_batch import HostBatch
from .plan import Plan, make_plan
from .sample_errors import ErrorPolicy, SkippedSample
from .sharding import ShardLayout, check_last_batch_policy
from .tensors import TensorListCPU, TensorListGPU
from .workers import WorkerPool

__all__ = ["Pipeline", "pipeline_def", "external_source", "NoGPUWarning", "State", "ExternalSourceOp", "gpu_available"]


_warned_no_gpu = False  # one NoGPUWarning per process is enough


class NoGPUWarning(UserWarning):
    """GPU ops were asked for on a machine (or process) without a usable GPU; they run on the CPU."""


class State(enum.Enum):
    DEFINED = "defined"
    WORKERS_STARTED = "workers started"
    BUILT = "built"
    CLOSED = "closed"


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
        on_error: str = "raise",
        max_error_rate: float = 0.01,
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
        self._layout = ShardLayout(num_shards, shard_id, ways=ways, way=way, last_batch_policy=last_batch_policy)
        self.shuffle = shuffle
        self._substitutes = Substitutes(ErrorPolicy(on_error, max_error_rate), self.seed,
                                        name=f"shard {shard_id}/{num_shards}" if num_shards > 1 else "")
        #: the samples the last batch `run` returned replaced (``on_error="skip"``), oldest first
        self.last_skipped: list[SkippedSample] = []
        self._exec_async = bool(exec_async and exec_pipelined)
        self._broken: tuple[int, str] | None = None  # (batch, error type) that stopped the epoch
        self.graph = Graph()
        self.outputs: tuple[DataNode, ...] = ()
        self.state = State.DEFINED
        self.epoch_idx = 0
        self._iteration = 0  # local iteration to run next
        self._epoch_over = False
        self._pool: WorkerPool | None = None
        self._planned = False
        self.plan: Plan | None = None  # fixed when the workers start (see `plan`)
        self._positions: Positions | None = None  # the epoch's positions, once planned (see `_moved`)
        self._main: MainStage | None = None  # the main-stage ops (build, or open_device_stage)
        self._runner: RunAhead | None = None  # the batches, once built
        # host stage only (a loader actor whose consumer runs the GPU stage): run() yields HostBatch
        self._host_only = False
        self._host_buffers: Buffers | None = None  # where a HostBatch's bytes go (serve_host_stage)
        self._device_stage_open = False  # the consumer side: run_device() may be called
        self._scope: graph_scope | None = None
        #: seconds spent on the last batch, by stage (see run())
        self.last_timings: dict[str, float] = {}

    @property
    def layout(self) -> ShardLayout:
        """Which global batches this pipeline serves (`sharding`): from ``num_shards``, ``shard_id``,
        ``ways``, ``way`` and ``last_batch_policy``; ``skip_to(consumed_batches=)`` moves its base."""
        return self._layout

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
                slot_bytes=self._sample_bytes_hint(),  # per sample: a slot holds slot_bytes x its task's samples
                batch_size=self.batch_size,
                # batches in shared memory at once: those submitted ahead, plus the ones computing ahead
                prefetch_depth=self.prefetch_queue_depth + (self.plan.ahead_depth - 1 if self.plan.run_ahead else 0),
                name=f"shard {self._layout.shard_id}/{self._layout.num_shards}" if self._layout.num_shards > 1 else "",
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
        if not self._host_only and self._main is None:
            self._main = self._main_stage()
        host = HostStage(
            self.plan, self._pool, self._positions, self._iteration,
            prefetch_queue_depth=self.prefetch_queue_depth, py_num_workers=self.py_num_workers,
            buffers=self._host_buffers,
        )
        self._runner = RunAhead(self.plan, host, self._main, self._substitutes)
        self.state = State.BUILT

    def _main_stage(self) -> MainStage:
        # holds the process's GPU decoders while open (see `executor.main_stage`): close() lets go
        return MainStage(self.plan, self.outputs, seed=self.seed, device_id=self.device_id, num_threads=self.num_threads)

    # -- split execution: host stage in one process, the main-stage ops in another ---------------

    def serve_host_stage(self, buffers: Buffers | None = None) -> None:
        """Make `run` stop after the host stage and return a `HostBatch` (call before `build`).

        The host stage is the workers' share and the in-process sources; the main-stage ops (GPU
        decode and augmentation) are left to a consumer that holds the same pipeline definition and
        calls `run_device` — a Ray Train worker running them in its own CUDA context. This process
        then never touches CUDA. The plan is the one a GPU process makes, so the workers compute
        the same per-sample parameters (crop boxes) either way.

        ``buffers`` (`executor.host_stage.Buffers`): where a batch's encoded bytes are packed, when
        it gives room (a loader actor's `host_ring` slot); else each batch gets fresh memory.
        """
        if self.state not in (State.DEFINED, State.WORKERS_STARTED):
            raise LifecycleError(f"serve_host_stage() must come before build(); the pipeline is '{self.state.value}'")
        self._host_only = True
        self._host_buffers = buffers

    def open_device_stage(self) -> None:
        """Prepare this (never started) pipeline to run `run_device` on host batches made by a
        twin pipeline's `serve_host_stage` in another process. Starts no workers."""
        if self.state is not State.DEFINED:
            raise LifecycleError(f"open_device_stage() needs a fresh pipeline; this one is '{self.state.value}'")
        if not self._planned:
            self._plan()
        self._main = self._main_stage()
        self._device_stage_open = True

    def warm_up_device(self) -> list:
        """After `open_device_stage`: start making the GPU decoders `run_device` will use, in the
        background (a consumer does it while its first host batch is still being made); returns
        the futures, empty when the stage decodes nothing on the GPU."""
        if not self._device_stage_open:
            raise LifecycleError("warm_up_device() needs open_device_stage() first")
        return self._main.warm_up()

    def prep_of(self, op_id: int) -> DataNode | None:
        """The output of GPU op ``op_id``'s per-sample host step run in the workers, if it has one."""
        return self.plan.prep_of.get(op_id)

    @property
    def has_device_stage(self) -> bool:
        """Whether any op runs after the host stage (else a HostBatch already holds the outputs)."""
        if not self._planned:
            self._plan()
        return any(not is_source(n) for n in self.plan.main_nodes)

    def run_device(self, batch: HostBatch, *, order_consumer: bool = True, skipped: list | None = None) -> tuple:
        """The outputs of ``batch`` after the main-stage ops (see `serve_host_stage`).

        With ``order_consumer=False`` the consumer's streams are not made to wait here: each GPU
        output's ``ready_event`` is the event to wait on (`gpu_handoff` waits on it and copies the
        output, so nothing of the stage's memory is reused while the consumer reads it).
        ``skipped``: a list to which the samples replaced under ``on_error="skip"`` are added (for
        callers running several batches at once, which `last_skipped` cannot tell apart).
        """
        if not self._device_stage_open:
            raise LifecycleError("run_device() needs open_device_stage() first")
        t0 = time.perf_counter()
        found: list[SkippedSample] = []

        def run(infos: tuple, env: dict) -> tuple:
            return self._main.run(infos, env, epoch_idx=self.epoch_idx, order_consumer=order_consumer)

        # on_error="skip": the actor stage's choice, from the batch at hand
        outputs = self._substitutes.run_main(run, batch.infos, batch.env(), None, batch.iteration, found)
        self.last_timings = {"main_ops_s": time.perf_counter() - t0}
        self.last_skipped = found
        if skipped is not None:
            skipped.extend(found)
        return outputs

    def close(self) -> None:
        """Stop the workers and free shared memory. Idempotent; also done at garbage collection."""
        if self._runner is not None:
            self._runner.close()  # the batches in flight finish first
            self._runner = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._main is not None:
            self._main.close()  # its threads, and the GPU decoders
            self._main = None
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
        if (self._layout.num_shards > 1 or self._layout.ways > 1) and plan.has_iterable:
            raise ValueError("an iterable source cannot be sharded (it is stateful); use a callable source")
        if self._layout.last_batch_policy == "exact" and plan.num_samples is None:
            raise ValueError(
                "last_batch_policy='exact' needs the epoch's number of samples, to mark the padding "
                "of the last round: give every source a __len__ (per-sample sources; batch sources and "
                "iterables have none), or use last_batch_policy='pad' or 'drop'"
            )
        if self._layout.last_batch_policy == "pad" and plan.num_samples is None and self._layout.num_shards > 1:
            warnings.warn(
                f"ray_extsrc: last_batch_policy='pad' (shard {self._layout.shard_id}/{self._layout.num_shards}) "
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
        self._planned = True
        self._moved()

    def _moved(self) -> None:
        """The position (epoch, local iteration, layout) changed: new `Positions` for the executor,
        which lets the batches in flight finish and drops the workers' batches of the old place."""
        if not self._planned:
            return  # `_plan` makes the first ones
        self._positions = Positions(
            self._layout, self.epoch_idx, self.batch_size, self.plan.num_samples, shuffle=self.shuffle, seed=self.seed,
        )
        if self._runner is not None:
            self._runner.move(self._positions, self._iteration)
        elif self._pool is not None:  # started, not built: nothing is in flight
            self._pool.discard()

    @property
    def last_batch_policy(self) -> str:
        """The last-batch policy in effect: the one asked for, except ``"pad"`` without a known
        number of samples, which can only drop (see `sharding`)."""
        if not self._planned:
            self._plan()
        if self._layout.pads and self.plan.num_samples is None:
            return "drop"
        return self._layout.last_batch_policy

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
        return self._positions.valid_samples(i)

    def epoch_size(self) -> int | None:
        """Batches this pipeline (this shard) yields per epoch, if the source has ``__len__``."""
        if not self._planned:
            self._plan()
        return self._positions.epoch_length

    def shard_epoch_size(self) -> int | None:
        """Batches the whole shard yields per epoch (all the ways of a shard that several
        pipelines serve in turn, see `sharding`), if the source has ``__len__``."""
        if not self._planned:
            self._plan()
        return self._positions.shard_length

    # -- running -----------------------------------------------------------------------------------

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
            outputs, self.last_timings, self.last_skipped = self._runner.run(i)
        except EndOfEpoch:
            self._epoch_over = True
            raise StopIteration from None
        except Exception as e:
            self._broken = (i, type(e).__name__)
            raise
        self._iteration = i + 1
        return outputs

    @property
    def on_error(self) -> str:
        """``"raise"`` or ``"skip"`` (see the module docstring)."""
        return self._substitutes.policy.on_error

    def skipped_samples(self) -> dict[str, Any]:
        """``{"skipped_samples": count, "skipped": [{"epoch_idx", "idx_in_epoch", "error",
        "substitute"}, ...]}``: every sample this pipeline replaced under ``on_error="skip"``
        (the most recent 1,000 listed), each counted once however often its batch was run."""
        return self._substitutes.log.snapshot()

    def consumer_fence(self) -> Any:
        """Called in the consumer's thread: a marker after everything it queued on the GPU so far
        (its work on earlier batches), which the next batch's GPU work waits for before reusing
        memory those batches had."""
        if not self.plan.gpu_main:
            return None
        from .executor.gpu_stage import consumer_fence  # GPU modules load lazily, only on GPU machines

        return consumer_fence()

    def reset(self) -> None:
        """End the current epoch (wherever it stands) and start the next one (``epoch_idx + 1``)."""
        if self.state is State.CLOSED:
            raise LifecycleError("cannot reset a closed pipeline")
        self._broken = None
        self.epoch_idx += 1
        if self._layout.base:  # a resumed epoch is over: the next one starts from its beginning
            self._layout = dataclasses.replace(self._layout, base=0)
        self._iteration = 0
        self._epoch_over = False
        self._moved()

    def position(self) -> dict[str, int]:
        """Where this shard stands: the epoch, and the global batches consumed by all shards.

        Feed it to `skip_to` (possibly of a pipeline with another ``num_shards``) to resume.
        """
        return {"epoch_idx": self.epoch_idx, "consumed_batches": self._layout.consumed_after(self._iteration)}

    def skip_to(self, epoch_idx: int, iteration: int = 0, *, consumed_batches: int | None = None) -> None:
        """Continue at local ``iteration`` of ``epoch_idx``; with ``consumed_batches``, after that many
        global batches of the epoch were consumed under an earlier (maybe different) shard layout."""
        if self.state is State.CLOSED:
            raise LifecycleError("cannot move a closed pipeline")
        if consumed_batches is not None:
            self._layout = dataclasses.replace(self._layout, base=consumed_batches)
        self.epoch_idx = epoch_idx
        self._iteration = iteration
        self._epoch_over = False
        self._broken = None
        self._moved()


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
