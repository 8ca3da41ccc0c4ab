"""`LoaderIterator`: one Ray Train worker's batches from its loader actors, as torch tensors.

Made by `train.Loader.iter_torch_batches` (the same object on every call in one process). It
creates the worker's loader actors (`actor.LoaderActor`; in `start`, which ``iter_torch_batches``
calls at once) on its own node, pinned to its GPU, serving shard ``rank`` of ``world_size``; asks
them for batches by exact position, ``prefetch_batches`` requests in flight; and turns their
replies into torch tensors on the worker's device (through the consumer-side GPU stage,
`consumer_stage`, when ``gpu_stage`` is ``"consumer"``; by CUDA IPC or host memory, `transport`,
when it is ``"actor"``).

Exactly-once across failures: ``it.state_dict()`` (``{"epoch_idx", "consumed_batches", "seed"}``) is
what a checkpoint saves; ``iter_torch_batches(state=...)`` resumes the epoch at the next unconsumed
batch, with any number of workers (`sharding`). A crashed loader actor is restarted by Ray and
resumes at the very batch its Train worker waits for (`actor`'s NOTE [position protocol]).

Several actors per Train worker (``actors_per_worker``; by default 3 where the actors run the GPU
stage on a GPU, else 1, see `gpu_stage_choice.default_actors_per_worker`): a pipeline's main stage
(collecting the workers' samples, driving nvImageCodec and the CUDA kernels) is Python in one
process, and one process tops out well below what a GPU decodes (R1 on an H100: one process ~9k
img/s, three ~22k); an actor that only runs the host stage keeps up alone. The shard's batches are
dealt to its actors in turn
(batch n from actor ``n % actors_per_worker``, see `sharding`), so positions, checkpoints and
exactly-once are the same as with one actor. Each actor forks its own ``py_num_workers``.

Observability: `LoaderIterator.stats` (seconds per batch by stage, throughput, restarts), also
exported as Ray metrics (`_Metrics`).
"""

from __future__ import annotations

import collections
import functools
import os
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from .actor import BatchReply, LoaderActor, LoaderSpec
from .errors import RayExtSrcError
from .gpu_stage_choice import default_actors_per_worker, resolve_gpu_stage
from .host_ring import ring_slots

if TYPE_CHECKING:
    import torch

    from .train import Loader

__all__ = ["LoaderIterator", "NAMESPACE", "VALID_OUTPUT"]

#: Ray namespace of every loader actor (names are per run, loader, seed, rank and node).
NAMESPACE = "ray_extsrc"
#: The batch entry (or last tuple element) holding the per-sample validity mask under ``"exact"``.
VALID_OUTPUT = "valid"
_CLOSE_TIMEOUT_S = 10.0  # an actor's close() stops its workers (2 s SIGTERM grace) and unlinks shm
_STAGES = ("worker_wait_s", "worker_compute_s", "main_ops_s", "encode_s", "fetch_s", "delivery_s")


_REMOTE_ACTOR: Any = None


def _remote_actor_class() -> Any:
    """`LoaderActor` as a Ray actor class (made once per process)."""
    global _REMOTE_ACTOR
    if _REMOTE_ACTOR is None:
        import ray

        _REMOTE_ACTOR = ray.remote(LoaderActor)
    return _REMOTE_ACTOR


def _run_name() -> str:
    import ray

    job = ray.get_runtime_context().get_job_id()
    try:
        import ray.train

        return f"{job}/{ray.train.get_context().get_experiment_name()}"
    except (RuntimeError, ImportError, AttributeError):
        return job


def _resolve_device(device: Any) -> tuple[torch.device, str | None]:
    """The consumer's torch device, and its GPU as Ray names it (to pin the actor to), if any."""
    import ray
    import torch

    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if device is None:
        gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        if not gpu_ids:
            return torch.device("cpu"), None
        index = visible.index(gpu_ids[0]) if gpu_ids[0] in visible else 0
        return torch.device("cuda", index), gpu_ids[0]
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev, None
    index = dev.index or 0
    return torch.device("cuda", index), (visible[index] if index < len(visible) else str(index))


class _Metrics:
    """Ray metrics of all iterators of this process, created on first use."""

    _instance: _Metrics | None = None

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self.stage = Histogram(
            "ray_extsrc_stage_seconds",
            description="Seconds per batch, by stage: worker wait/compute, main-stage ops, encode, delivery.",
            boundaries=[0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5],
            tag_keys=("loader", "rank", "stage"),
        )
        self.skipped = Counter(
            "ray_extsrc_skipped_samples",
            description="Samples replaced by a substitute under on_error='skip' (their source or decoder failed).",
            tag_keys=("loader", "rank"),
        )
        self.throughput = Gauge(
            "ray_extsrc_samples_per_second",
            description="Samples per second delivered to one Train worker (over its current epoch).",
            tag_keys=("loader", "rank"),
        )

    @classmethod
    def get(cls) -> _Metrics:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance


class LoaderIterator:
    """One Train worker's batches; each ``for`` over it runs (the rest of) one epoch.

    Positions: `state_dict` / `load_state_dict`. Observability: `stats`. Made by
    `Loader.iter_torch_batches`; its actor side is `actor.LoaderActor` (``ways`` of them, serving
    this worker's batches in turn).
    """

    def __init__(self, loader: Loader, rank: int, world_size: int, device: Any = None) -> None:
        self.loader = loader
        self.rank = rank
        self.world_size = world_size
        self.device, self._gpu_id = _resolve_device(device)
        #: where this worker's GPU stage runs: "consumer" (here) or "actor" (see `Loader`)
        self.gpu_stage: str = resolve_gpu_stage(loader.gpu_stage, self._gpu_id is not None)
        default_ways = default_actors_per_worker(self.gpu_stage, self._gpu_id is not None)
        #: with the consumer-side stage: the batches it runs at once (`consumer_stage.stage_threads`)
        self._stage_threads = 0
        if self.gpu_stage == "consumer":
            from .consumer_stage import stage_threads

            self._stage_threads = stage_threads(self._gpu_id is not None)
        #: with the consumer-side stage: `cuda_work_queues.widen_work_queues`'s outcome (in `stats`)
        self.cuda_work_queues: str | None = None
        if self.gpu_stage == "consumer" and self._gpu_id is not None:
            from .cuda_work_queues import widen_work_queues

            self.cuda_work_queues = widen_work_queues()
        self._stage: Any = None  # consumer_stage.ConsumerStage, when gpu_stage == "consumer"
        #: loader actors serving this worker in turn (batch n comes from actor n % ways)
        self.ways: int = loader.actors_per_worker or default_ways
        self.seed = loader.seed
        self.epoch_idx = 0
        self._base = 0  # global batches consumed before this epoch's layout took over (resume)
        self._iteration = 0  # local batches of this epoch already yielded
        self._actors: list[Any] = []
        self._actor_names: list[str] = []
        self._actor_pid: list[int | None] = [None] * self.ways
        #: pids of the loader actor processes that served this iterator (a restart adds one)
        self.actor_pids: list[int] = []
        self._importers: list[Any] = []
        #: requests for the start of the next epoch, made while this one ended (see `_epoch`):
        #: ((epoch_idx, base) they belong to, deque of (position, ref or stage future))
        self._carry: tuple[tuple[int, int], collections.deque] | None = None
        self.closed = False
        self._reset_stats()
        self._actor_restarts = 0
        self._worker_respawns = [0] * self.ways
        # on_error="skip": (epoch, idx_in_epoch) of every sample replaced, each counted once (a
        # batch served again after a restart reports its skips again); the latest listed in stats()
        self._skipped_keys: set[tuple[int, int]] = set()
        self._skipped: collections.deque[dict] = collections.deque(maxlen=100)
        #: seconds from the start of the actors (`start`) to: their creation being requested, the
        #: consumer-side GPU stage built, the first batch handed over (see `stats`)
        self._startup: dict[str, float] = {}
        self._t_start: float | None = None
        self._t_start_wall: float | None = None

    # -- position ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        """Where this iterator stands: ``{"epoch_idx", "consumed_batches", "seed"}``.

        ``consumed_batches`` counts the global batches consumed by all ranks, assuming they are in
        step (they are, at a synchronous ``ray.train.report``). Feed it to ``iter_torch_batches(state=)``.
        Padding (``"pad"``/``"exact"``) exists only in an epoch's last round, so a mid-epoch state
        never points past a real sample, and a resume with any ``world_size`` keeps the policy's
        guarantee.
        """
        return {
            "epoch_idx": self.epoch_idx,
            "consumed_batches": self._base + self._iteration * self.world_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        try:
            epoch_idx, consumed = int(state["epoch_idx"]), int(state["consumed_batches"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"state must be a dict from state_dict() with 'epoch_idx' and 'consumed_batches'; got {state!r}"
            ) from e
        if epoch_idx < 0 or consumed < 0:
            raise ValueError(f"state: epoch_idx and consumed_batches must be >= 0; got {dict(state)!r}")
        if self._carry is not None:
            self._drop(self._carry[1])
            self._carry = None
        seed = state.get("seed")
        if seed is not None and int(seed) != self.seed:
            self._stop_actors()  # their pipelines draw from the old seed: build new ones
            if self._stage is not None:
                self._stage.close()
                self._stage = None
            self.seed = int(seed)
        self.epoch_idx, self._base, self._iteration = epoch_idx, consumed, 0

    # -- the actors -------------------------------------------------------------------------------

    @property
    def actor(self) -> Any:
        """The first `LoaderActor` handle (all are created on first use)."""
        return self.actors[0]

    @property
    def actors(self) -> list[Any]:
        """The `LoaderActor` handles, one per way (created on first use)."""
        if not self._actors:
            self._start_actors()
        return self._actors

    def start(self) -> None:
        """Create the loader actors (and the consumer-side GPU stage) now, if not yet, and ask for
        the first batches of the current position; idempotent.

        `Loader.iter_torch_batches` calls it, so the actors boot, fork their workers and make
        the first batches — and the consumer-side GPU stage creates its decoders and decodes them
        — while the Train worker goes on building its model. The next ``for`` takes those
        requests over (as it takes over the next epoch's, see `_epoch`); a new position
        (`load_state_dict`) or `close` drops them."""
        if not self._actors:
            self._start_actors()
        if self._carry is None and self._iteration == 0:
            first = collections.deque((pos, self._request(self.epoch_idx, self._base, pos, ()))
                                      for pos in range(self._depth))
            self._carry = ((self.epoch_idx, self._base), first)

    @property
    def _depth(self) -> int:
        """Requests kept in flight: ``prefetch_batches``, at least one per actor (each has work
        queued), and with the consumer-side stage one more than its threads (each thread busy with
        a batch, and the next one asked for)."""
        return max(self.loader.prefetch_batches, self.ways, self._stage_threads + 1)  # 0 threads: no stage

    def _request(self, epoch: int, at: int, pos: int, release: tuple[int, ...]) -> Any:
        """Ask the actor of batch ``pos`` for it (releasing its leases ``release``): a Ray
        reference, or with the consumer-side GPU stage the future of that stage's output."""
        way = pos % self.ways
        ref = self._actors[way].next_batch.remote(epoch, at, pos // self.ways, release)
        if self._stage is not None:  # fetched and run through the GPU stage in its threads
            def again() -> BatchReply:
                return self._get(self._actors[way].next_batch.remote(epoch, at, pos // self.ways, ()), way)

            ref = self._stage.submit(functools.partial(self._get, ref, way), again)
        return ref

    def _start_actors(self) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if self.closed:
            raise RuntimeError(f"{self._label()}: the iterator is closed")
        self._t_start = time.perf_counter()
        self._t_start_wall = time.time()
        self._startup = {}
        node_id = ray.get_runtime_context().get_node_id()
        names, actors = [], []
        for way in range(self.ways):
            spec = LoaderSpec(
                pipeline_fn=self.loader.pipeline_fn,
                pipeline_kwargs=self.loader.pipeline_args,
                output_names=self.loader.outputs,
                num_shards=self.world_size,
                shard_id=self.rank,
                seed=self.seed,
                gpu_id=self._gpu_id,
                zero_copy=self.loader.zero_copy,
                label=self._label(way),
                ways=self.ways,
                way=way,
                gpu_stage=self.gpu_stage,
                last_batch_policy=self.loader.last_batch_policy,
                # the consumer keeps up to ceil(depth / ways) requests in flight to each actor
                host_ring_slots=ring_slots(-(-self._depth // self.ways)) if self.gpu_stage == "consumer" else 0,
            )
            # One name per (run, loader, seed, rank, way, node): a Train worker that re-creates its
            # iterator finds its actors again; anything that changes what they serve gets new ones.
            name = (
                f"{_run_name()}/{self.loader.name}-{self.loader.uid}/seed{self.seed}/"
                f"rank{self.rank}of{self.world_size}/way{way}of{self.ways}@{node_id[:12]}"
            )
            options = {
                "num_cpus": self.loader.actor_num_cpus,
                "num_gpus": 0,  # the GPU is the Train worker's: the actor shares it (CUDA_VISIBLE_DEVICES)
                "max_restarts": -1,
                "max_task_retries": -1,
                "name": name,
                "namespace": NAMESPACE,
                "get_if_exists": True,
                "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
                **self.loader.actor_options,
            }
            names.append(name)
            actors.append(_remote_actor_class().options(**options).remote(spec))
        self._actor_names, self._actors = names, actors
        self._startup["actors_requested_s"] = time.perf_counter() - self._t_start
        if self._stage is not None:  # a stage kept from an earlier start: its firsts are this start's now
            self._stage.firsts.clear()
        if self.gpu_stage == "consumer":
            if self._stage is None:
                from .consumer_stage import ConsumerStage

                kwargs = dict(self.loader.pipeline_args, num_shards=self.world_size, shard_id=self.rank, seed=self.seed)
                self._stage = ConsumerStage(self.loader.pipeline_fn, kwargs, self.device, self._label(),
                                            threads=self._stage_threads)
            # the stage builds in its own thread (`ConsumerStage`): note when it is done, in this start's record
            startup, t_start = self._startup, self._t_start
            self._stage.on_built(lambda: startup.setdefault("stage_built_s", time.perf_counter() - t_start))
        elif self._gpu_id is not None and self.loader.zero_copy and not self._importers:
            from .transport import IpcImporter

            self._importers = [IpcImporter(self.device) for _ in range(self.ways)]

    def _stop_actors(self) -> None:
        if not self._actors:
            return
        import ray

        actors, self._actors = self._actors, []
        closing = [a.close.remote() for a in actors]
        try:
            ray.get(closing, timeout=_CLOSE_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - best effort: the janitor frees what close() could not
            pass
        for a in actors:
            ray.kill(a, no_restart=True)

    def worker_pids(self, way: int = 0) -> dict[int, int]:
        """worker id -> pid of the Python workers of loader actor ``way``."""
        import ray

        return ray.get(self.actors[way].worker_pids.remote())

    def describe(self, way: int = 0) -> dict[str, Any]:
        """Loader actor ``way``'s pid, node, shard, seed, epoch size, workers (see `LoaderActor.describe`)."""
        import ray

        return ray.get(self.actors[way].describe.remote())

    def startup_report(self) -> dict[str, float]:
        """Seconds from the latest start of the actors (`start`) to each start-up milestone: when
        the last of the actors reached it (left out until every actor has): ``actor_process_started``
        (negative where Ray gave the actor a worker process it had started before),
        ``actor_init_began``, ``actor_workers_started`` (its Python workers forked), ``actor_ready``
        (``__init__`` done), ``actor_first_batch`` (its first batch made); with the consumer-side
        stage, ``first_host_batch`` (the first host batch mapped here) and ``first_decoded`` (through
        the GPU stage); and ``first_batch`` (handed to the caller, as in `stats`). Asks every actor."""
        if self._t_start_wall is None:
            return {}
        import ray

        t0 = self._t_start_wall
        out = _last_to_reach([d.get("startup", {}) for d in ray.get([a.describe.remote() for a in self.actors])], t0)
        if self._stage is not None:
            out.update({f"first_{k}": round(t - t0, 3) for k, t in self._stage.firsts.items()})
        if "first_batch_s" in self._startup:
            out["first_batch"] = round(self._startup["first_batch_s"], 3)
        return out

    def close(self) -> None:
        """Stop the loader actors (their workers, shared memory, GPU buffers). Idempotent."""
        if self.closed:
            return
        if self._carry is not None:
            self._drop(self._carry[1])
            self._carry = None
        self._stop_actors()
        for imp in self._importers:
            imp.close()
        self._importers = []
        if self._stage is not None:
            self._stage.close()
            self._stage = None
        self.closed = True

    def _label(self, way: int | None = None) -> str:
        label = f"loader {self.loader.name!r} rank {self.rank}/{self.world_size}"
        return label if way is None or self.ways == 1 else f"{label} actor {way}/{self.ways}"

    # -- iteration --------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        return self._epoch()

    def _epoch(self) -> Iterator[Any]:
        """The rest of the current epoch. NOTE: the consumer's half of actor's [position protocol].

        Batch n of this worker's epoch is local iteration ``n // ways`` of actor ``n % ways``.

        Across epochs: once every request of this epoch is made (its size is known), the free
        prefetch slots ask for the first batches of the next epoch, so the loader works through
        the epoch boundary instead of starting cold when the next ``for`` begins (on the H200,
        ResNet-18 waited ~0.1 s for each epoch's first batch, a tenth of a 32-batch epoch). The
        next epoch's ``for`` takes them over; anything else (a new position, close) drops them.
        """
        actors, ways = self.actors, self.ways
        stage = self._stage
        epoch_idx, base = self.epoch_idx, self._base
        depth = self._depth
        pending: collections.deque[tuple[int, Any]] = collections.deque()
        carried, self._carry = self._carry, None
        if carried is not None and carried[0] == (epoch_idx, base) and self._iteration == 0:
            pending = carried[1]
        elif carried is not None:
            self._drop(carried[1])
        carry: collections.deque[tuple[int, Any]] = collections.deque()  # the next epoch's first requests
        to_release: list[list[int]] = [[] for _ in range(ways)]
        next_req = pending[-1][0] + 1 if pending else self._iteration
        end: int | None = None
        t_prev = time.perf_counter()
        finished = False

        def request(epoch: int, at: int, pos: int) -> Any:
            way = pos % ways
            release, to_release[way] = tuple(to_release[way]), []
            return self._request(epoch, at, pos, release)

        try:
            while True:
                while len(pending) < depth and (end is None or next_req < end):
                    pending.append((next_req, request(epoch_idx, base, next_req)))
                    next_req += 1
                while end is not None and next_req >= end and len(pending) + len(carry) < depth:
                    carry.append((len(carry), request(epoch_idx + 1, 0, len(carry))))
                if not pending:
                    finished = True
                    break
                pos, ref = pending.popleft()
                way = pos % ways
                t0 = time.perf_counter()
                if stage is not None:
                    reply, outputs = ref.result()
                else:
                    reply = self._get(ref, way)
                delivery = time.perf_counter() - t0
                if reply.end:
                    finished = True
                    break
                if reply.epoch_size is not None:
                    end = reply.epoch_size
                if stage is not None:
                    batch = self._consumer_to_torch(reply, outputs, way)
                else:
                    batch = self._to_torch(reply, way)
                now = time.perf_counter()
                if "first_batch_s" not in self._startup and self._t_start is not None:
                    self._startup["first_batch_s"] = now - self._t_start
                self._record(reply, delivery, now - t_prev, way)
                t_prev = now
                self._iteration = pos + 1
                yield batch
                # The caller asked for the next batch: it is done with this one.
                if reply.lease is not None:
                    self._importers[way].done_with_batch()
                    to_release[way].append(reply.lease)
        finally:
            if finished and carry:
                self._carry = ((epoch_idx + 1, 0), carry)
            else:
                pending.extend(carry)  # a break or an error: the next epoch's requests go too
            if stage is not None:  # batches past the end or after a break: nobody will take them
                stage.discard(fut for _, fut in pending)
            if self._importers:
                busy = {pos % ways for pos, _ in pending}
                for way in sorted(busy):
                    # Runs after every call still pending (one caller's calls run in order), so it
                    # frees their leases too. Not waited for: the next request queues behind it anyway.
                    actors[way].release.remote(everything=True)
                for way in range(ways):
                    if to_release[way] and way not in busy:  # only these: carried batches stay leased
                        actors[way].release.remote(tuple(to_release[way]))
            if finished:
                self.epoch_idx += 1
                self._base = 0
                self._iteration = 0

    def _drop(self, requests: collections.deque) -> None:
        """Give up requests nobody will consume (carried into an epoch that did not come)."""
        if self._stage is not None:
            self._stage.discard(fut for _, fut in requests)
        if self._importers and self._actors:
            for way in sorted({pos % self.ways for pos, _ in requests}):
                self._actors[way].release.remote(everything=True)

    def _get(self, ref: Any, way: int = 0) -> BatchReply:
        import ray

        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, RayExtSrcError):
                cause.add_note(f"delivered to {self._label()} (loader actor {self._actor_names[way]!r})")
                raise cause from None
            raise
        except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnschedulableError) as e:
            e.add_note(
                f"{self._label()}: its loader actor {self._actor_names[way]!r} is dead and cannot be "
                "restarted (its node is gone, or its __init__ failed: see above). A loader actor lives on "
                "its Train worker's node, so that worker is lost too: let Ray Train restart the worker "
                "group (RunConfig(failure_config=FailureConfig(max_failures=...))) and resume with "
                "iter_torch_batches(state=<state_dict() saved in the last checkpoint>)."
            )
            raise

    def _note_actor(self, reply: BatchReply, way: int) -> None:
        if reply.actor_pid != self._actor_pid[way]:
            if self._actor_pid[way] is not None:
                self._actor_restarts += 1
            self._actor_pid[way] = reply.actor_pid
            self.actor_pids.append(reply.actor_pid)

    def _named(self, tensors: tuple, reply: BatchReply) -> Any:
        names = self.loader.outputs
        if self.loader.last_batch_policy == "exact":
            tensors = (*tensors, self._valid_mask(tensors, reply.valid))
            names = (*names, VALID_OUTPUT) if names is not None else None
        return dict(zip(names, tensors)) if names is not None else tensors

    def _valid_mask(self, tensors: tuple, valid: int | None) -> Any:
        """The batch's validity mask on this worker's device: its first ``valid`` samples are its
        own, the rest pad the epoch's last round (see `sharding`)."""
        import torch

        n = next((x.shape[0] if isinstance(x, torch.Tensor) else len(x) for x in tensors), 0)
        return torch.arange(n, device=self.device) < (n if valid is None else valid)

    def _to_torch(self, reply: BatchReply, way: int = 0) -> Any:
        from .transport import decode_outputs

        self._note_actor(reply, way)
        tensors = decode_outputs(reply.outputs, self.device, self._importers[way] if self._importers else None)
        return self._named(tensors, reply)

    def _consumer_to_torch(self, reply: BatchReply, outputs: tuple, way: int) -> Any:
        self._note_actor(reply, way)
        return self._named(self._stage.to_torch(outputs), reply)

    # -- observability ----------------------------------------------------------------------------

    def _reset_stats(self) -> None:
        self._batches = 0
        self._samples = 0
        self._padded = 0  # samples that repeat another to fill the last round ("pad"/"exact")
        self._wall_s = 0.0  # time between consecutive batches (loader + the training step)
        self._rate_ema: float | None = None
        self._totals = dict.fromkeys(_STAGES, 0.0)

    def _record(self, reply: BatchReply, delivery: float, wall: float, way: int = 0) -> None:
        self._worker_respawns[way] = reply.worker_respawns
        new_skips = 0
        for entry in reply.skipped:
            key = (entry["epoch_idx"], entry["idx_in_epoch"])
            if key not in self._skipped_keys:
                self._skipped_keys.add(key)
                self._skipped.append(entry)
                new_skips += 1
        timings = dict(reply.timings)
        timings["delivery_s"] = delivery
        if self._stage is not None:
            timings["main_ops_s"] = self._stage.last_main_ops_s
            timings["fetch_s"] = self._stage.last_fetch_s
        n = _batch_len(reply.outputs)
        self._batches += 1
        self._samples += n
        self._padded += max(0, n - reply.valid) if reply.valid is not None else 0
        self._wall_s += wall
        for k in _STAGES:
            self._totals[k] += timings.get(k, 0.0)
        if wall > 0:
            rate = n / wall
            self._rate_ema = rate if self._rate_ema is None else 0.9 * self._rate_ema + 0.1 * rate
        try:
            m = _Metrics.get()
            tags = {"loader": self.loader.name, "rank": str(self.rank)}
            for k in _STAGES:
                m.stage.observe(timings.get(k, 0.0), tags={**tags, "stage": k.removesuffix("_s")})
            if self._rate_ema is not None:
                m.throughput.set(self._rate_ema, tags=tags)
            if new_skips:
                m.skipped.inc(new_skips, tags=tags)
        except Exception as e:  # noqa: BLE001 - metrics must never break training
            warnings.warn(f"ray_extsrc: could not export Ray metrics: {e}", RuntimeWarning, stacklevel=2)

    def stats(self) -> dict[str, Any]:
        """Throughput and mean seconds per batch by stage, since this iterator was created.

        Stages: ``worker_wait_s`` (the actor waiting for its Python workers), ``worker_compute_s``
        (workers running the source and worker-side ops, summed over workers), ``main_ops_s``
        (main-stage ops: GPU decode/augment), ``encode_s`` (the actor preparing the batch for
        transport), ``fetch_s`` (with the consumer-side GPU stage: its thread waiting in ``ray.get``
        for the host batch), ``delivery_s`` (this Train worker waiting for the batch: near zero when
        the loader keeps up). With the consumer-side stage on a GPU, ``decode_*`` give this
        process's GPU decode timings (cumulative seconds, ``decode_batches``). ``samples_per_s`` counts the training step's time too: it is the rate the
        Train worker actually consumed at. The same numbers go to Ray metrics
        (``ray_extsrc_stage_seconds``, ``ray_extsrc_samples_per_second``, tagged ``loader``, ``rank``).
        ``samples`` counts every sample delivered; ``padded_samples`` those of them that repeat
        another to fill the epoch's last round (``last_batch_policy`` ``"pad"``/``"exact"``).
        ``skipped_samples`` counts the samples replaced by a substitute (``on_error="skip"``; also
        the Ray counter ``ray_extsrc_skipped_samples``), and ``skipped`` lists the latest 100 with
        their ``epoch_idx``, ``idx_in_epoch``, error and substitute. ``startup_*_s``: seconds from
        the latest start of the actors (`start`) to their creation being requested
        (``startup_actors_requested_s``), the consumer-side GPU stage built (in a thread of its own,
        while the caller goes on: ``startup_stage_built_s``) and the first batch handed to this worker
        (``startup_first_batch_s``). ``cuda_work_queues``: with the consumer-side stage, whether this
        process's CUDA context got 32 hardware work queues (`cuda_work_queues.widen_work_queues`).
        """
        b = max(self._batches, 1)
        out: dict[str, Any] = {
            "loader": self.loader.name,
            "rank": self.rank,
            "world_size": self.world_size,
            "epoch_idx": self.epoch_idx,
            "batches": self._batches,
            "samples": self._samples,
            "padded_samples": self._padded,
            "skipped_samples": len(self._skipped_keys),
            "skipped": list(self._skipped),
            "last_batch_policy": self.loader.last_batch_policy,
            "samples_per_s": self._samples / self._wall_s if self._wall_s > 0 else 0.0,
            "actor_restarts": self._actor_restarts,
            "worker_respawns": sum(self._worker_respawns),
            "actors_per_worker": self.ways,
            "transport": "host_batch" if self._stage is not None else "cuda_ipc" if self._importers else "host",
            "gpu_stage": self.gpu_stage,
            "cuda_work_queues": self.cuda_work_queues,
            "consumer_threads": self._stage.threads if self._stage is not None else None,
        }
        out.update({k: self._totals[k] / b for k in _STAGES})
        out.update({f"startup_{k}": v for k, v in dict(self._startup).items()})  # a copy: the stage's build thread may add to it
        if self._stage is not None:
            out.update({f"decode_{k}": v for k, v in self._stage.decode_stats().items()})
        return out


def _last_to_reach(reports: list[dict[str, float]], t0: float) -> dict[str, float]:
    """``actor_<milestone>``: seconds after ``t0`` at which the last of the actors (their
    ``startup`` wall times) reached each milestone that every one of them has reached."""
    return {f"actor_{k}": round(max(r[k] for r in reports) - t0, 3)
            for k in (reports[0] if reports else {}) if all(k in r for r in reports)}


def _batch_len(outputs: Any) -> int:
    for x in outputs:
        try:
            return len(x) if not hasattr(x, "shape") else int(x.shape[0])
        except (TypeError, IndexError):
            continue
    return 0
