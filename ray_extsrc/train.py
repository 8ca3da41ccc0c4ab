"""What a Ray Train ``train_loop_per_worker`` calls to get its batches: `Loader` and its iterator.

`Loader` is a small, picklable description (a ``@pipeline_def`` function and its arguments) that
travels in ``train_loop_config``. In each Train worker, ``loader.iter_torch_batches()`` starts
loader actors (`actor.LoaderActor`) on the worker's node at once, pinned to the worker's GPU,
serving shard ``rank`` of ``world_size``, and yields their batches as torch tensors::

    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray_extsrc.train import Loader

    def train_loop_per_worker(config):
        it = config["loaders"]["train"].iter_torch_batches()
        for epoch in range(2):
            for batch in it:  # one whole epoch per `for`
                images, labels = batch["images"], batch["labels"]  # on this worker's GPU, if any
                ...
            ray.train.report({"epoch": epoch, **it.stats()})

    loader = Loader(training_pipeline, outputs=("images", "labels"), shuffle=True, py_num_workers=4)
    TorchTrainer(train_loop_per_worker, scaling_config=ScalingConfig(num_workers=2),
                 train_loop_config={"loaders": {"train": loader}}).fit()

Every sample, every epoch, at any world size (``last_batch_policy``, see `sharding`): ``"pad"`` (the
default) completes the last round of ``world_size`` batches with repeats of the epoch's first
samples, so every sample is trained on and every rank takes the same number of steps; ``"exact"``
(for validation) does the same and adds a per-sample mask, ``batch["valid"]``, that is False on the
repeats, so sums and counts over the valid samples, all-reduced over ranks, equal the one-rank
result; ``"drop"`` serves whole rounds only. Resumes, re-shards, restarts and ``actors_per_worker``
keep each policy's guarantee: the padding is a function of the position, like everything else.

One Train worker's side, its iterator, is `loader_iterator.LoaderIterator` (positions and
exactly-once across failures, several actors per worker); where the GPU stage runs is
`gpu_stage_choice`.

Why loader actors reserve no CPU by default (``actor_num_cpus=0``): the CPU work happens in the
pipeline's forked Python workers, which Ray cannot see or account for anyway; the actor itself mostly
waits on them. Reserving a CPU for it would not bound the real load, and on a machine whose CPUs the
Train workers already hold (a 2-CPU CI box running 2 one-CPU workers) the actors could never be
scheduled. Account for the loaders' workers by giving the Train workers more CPUs
(``ScalingConfig(resources_per_worker={"CPU": 1 + py_num_workers})``) or pass ``actor_num_cpus``.
"""

from __future__ import annotations

import atexit
import inspect
import secrets
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .gpu_stage_choice import GPU_STAGES, mps_daemon_running, resolve_gpu_stage
from .loader_iterator import NAMESPACE, VALID_OUTPUT, LoaderIterator
from .sample_errors import ErrorPolicy
from .sharding import check_last_batch_policy

if TYPE_CHECKING:
    import torch

__all__ = ["Loader", "LoaderIterator", "NAMESPACE", "VALID_OUTPUT", "mps_daemon_running", "resolve_gpu_stage"]

_SET_BY_LOADER = ("num_shards", "shard_id", "ways", "way", "device_id")


def _decorator_seed(pipeline_fn: Callable) -> int | None:
    """The ``seed`` given to ``@pipeline_def(...)``, if any (so the Loader does not override it)."""
    kwargs = getattr(pipeline_fn, "pipeline_kwargs", None)
    if kwargs is None:
        try:  # pipeline_def keeps its arguments in the closure of the function it returns
            kwargs = inspect.getclosurevars(pipeline_fn).nonlocals.get("pipeline_kwargs")
        except TypeError:
            kwargs = None
    seed = kwargs.get("seed") if isinstance(kwargs, Mapping) else None
    return seed if isinstance(seed, int) and seed >= 0 else None


class Loader:
    """A pipeline to be run as sharded loader actors for each Ray Train worker. Small and picklable.

    Args:
        pipeline_fn: a ``@pipeline_def`` function.
        outputs: names of the pipeline's outputs: batches are then dicts ``name -> tensor``;
            ``None`` yields tuples.
        name: a label for actor names, metrics and messages (default: the function's name).
        prefetch_batches: ``next_batch`` calls kept in flight per Train worker (backpressure); at
            least one per loader actor, and with the consumer-side GPU stage one more than its
            threads (`consumer_stage.stage_threads`).
        actor_num_cpus: CPUs each loader actor reserves in Ray (see the module docstring).
        actors_per_worker: loader actors feeding each Train worker in turn (each a process with its
            own ``py_num_workers``); ``None``: 3 where the GPU stage runs in the actors on a GPU,
            else 1 (`gpu_stage_choice.default_actors_per_worker`).
        zero_copy: hand GPU outputs to a Train worker on the same GPU by CUDA IPC (else via host);
            only where the GPU stage runs in the actors.
        gpu_stage: where the pipeline's main-stage ops (GPU decode and augmentation) run.
            ``"consumer"``: in the Train worker's own process, in background threads on streams of
            their own, sharing the CUDA context of the training step (the actors send encoded bytes
            and per-sample parameters; see `consumer_stage`). ``"actor"``: in the loader actors,
            delivered by CUDA IPC — for consumers without a GPU, or nodes running an MPS daemon.
            ``"auto"`` (default): the winner of the training benchmark: ``"consumer"`` for a Train
            worker with a GPU on a node without an MPS daemon, else ``"actor"`` (see
            `resolve_gpu_stage`). Unless it is ``"actor"``, a Loader made before Ray starts puts
            ``CUDA_DEVICE_MAX_CONNECTIONS=32`` in the driver's environment, for the local cluster
            to inherit: the step's stream then shares its hardware work queue with fewer of the
            decoder's streams (`cuda_work_queues`; a value you set is kept).
        last_batch_policy: what the last round of ``world_size`` batches becomes when the epoch does
            not fill it (see `sharding`; DALI's iterators' knob of that name). ``"pad"`` (default,
            for training): completed with repeats of the epoch's first samples, so every sample is
            served at least once per epoch, and at most one round of samples twice. ``"exact"``
            (for evaluation): the same batches, plus a bool mask ``batch["valid"]`` (the last
            element of a tuple batch), False on the repeats: every sample is valid exactly once
            across ranks. ``"drop"``: only whole rounds of whole batches (the samples left over are
            not served). ``"pad"`` and ``"exact"`` need the source's ``__len__`` and a source that
            serves every ``idx_in_epoch`` below it; without ``__len__``, ``"pad"`` drops (a warning
            in the actor's log says so) and ``"exact"`` is refused.
        actor_options: more ``ray.remote`` options for the actor (``runtime_env``, ``memory``...).
        **pipeline_args: override the pipeline's arguments (``batch_size``, ``py_num_workers``,
            ``shuffle``, ``seed``, ``on_error``, ``max_error_rate``, ...) or go to the pipeline
            function, as ``@pipeline_def`` does. ``on_error="skip"`` replaces a sample whose source
            or decoder fails by a deterministic substitute of the same shard and epoch (batches
            stay full, ranks in step, a restart draws the same), counted in ``it.stats()`` and
            the Ray counter ``ray_extsrc_skipped_samples``; more than ``max_error_rate`` of a
            shard's epoch fails it (`sample_errors`).
            ``num_shards``, ``shard_id``, ``ways``, ``way`` and ``device_id`` are set per Train
            worker (and per loader actor).
    """

    def __init__(
        self,
        pipeline_fn: Callable[..., Any],
        outputs: tuple[str, ...] | list[str] | None = None,
        *,
        name: str | None = None,
        prefetch_batches: int = 2,
        actor_num_cpus: float = 0,
        actors_per_worker: int | None = None,
        zero_copy: bool = True,
        gpu_stage: str = "auto",
        last_batch_policy: str = "pad",
        actor_options: Mapping[str, Any] | None = None,
        **pipeline_args: Any,
    ) -> None:
        if gpu_stage not in GPU_STAGES:
            raise ValueError(f"Loader: gpu_stage must be one of {GPU_STAGES}; got {gpu_stage!r}")
        check_last_batch_policy(last_batch_policy, "Loader")
        if not callable(pipeline_fn):
            raise TypeError(f"Loader: pipeline_fn must be a @pipeline_def function; got {type(pipeline_fn).__name__}")
        if outputs is not None:
            if isinstance(outputs, str) or not all(isinstance(o, str) for o in outputs):
                raise TypeError(f"Loader: outputs must be a tuple of names (str) or None; got {outputs!r}")
            if len(set(outputs)) != len(outputs):
                raise ValueError(f"Loader: output names must be unique; got {tuple(outputs)!r}")
            outputs = tuple(outputs)
            if last_batch_policy == "exact" and VALID_OUTPUT in outputs:
                raise ValueError(
                    f"Loader: last_batch_policy='exact' adds the validity mask to each batch as "
                    f"{VALID_OUTPUT!r}, and outputs={outputs!r} already has that name; rename that output"
                )
        if not isinstance(prefetch_batches, int) or prefetch_batches < 1:
            raise ValueError(f"Loader: prefetch_batches must be an int >= 1; got {prefetch_batches!r}")
        if not isinstance(actor_num_cpus, (int, float)) or actor_num_cpus < 0:
            raise ValueError(f"Loader: actor_num_cpus must be a number >= 0; got {actor_num_cpus!r}")
        if actors_per_worker is not None and (not isinstance(actors_per_worker, int) or actors_per_worker < 1):
            raise ValueError(f"Loader: actors_per_worker must be an int >= 1 or None; got {actors_per_worker!r}")
        fixed = sorted(set(pipeline_args) & set(_SET_BY_LOADER))
        if fixed:
            raise ValueError(
                f"Loader: {', '.join(fixed)} are set per Train worker by the Loader (shard = rank, "
                "ways = actors_per_worker, device = the worker's GPU); do not pass them"
            )
        # a bad policy is refused here, not in every actor (ErrorPolicy's defaults fill the rest)
        ErrorPolicy(**{k: pipeline_args[k] for k in ("on_error", "max_error_rate") if k in pipeline_args})
        seed = pipeline_args.pop("seed", None)
        if seed is None or seed < 0:
            seed = _decorator_seed(pipeline_fn)
        # Every rank must shuffle with one permutation and draw the same random augmentation after
        # a restart: one seed for the whole Loader, fixed here, saved in state_dict().
        self.seed: int = seed if seed is not None else secrets.randbits(63)
        self.pipeline_fn = pipeline_fn
        self.outputs = outputs
        self.name = name or getattr(pipeline_fn, "__name__", "loader")
        self.prefetch_batches = prefetch_batches
        self.actor_num_cpus = actor_num_cpus
        self.actors_per_worker = actors_per_worker
        self.zero_copy = bool(zero_copy)
        self.gpu_stage = gpu_stage
        self.last_batch_policy = last_batch_policy
        self.actor_options = dict(actor_options or {})
        self.pipeline_args = pipeline_args
        self.uid = secrets.token_hex(4)  # tells this Loader's actors from another's of the same name
        if gpu_stage != "actor":  # the consumer-side stage shares the step's CUDA context: more queues
            from .cuda_work_queues import for_the_cluster

            for_the_cluster()

    def __repr__(self) -> str:
        return f"Loader({self.name!r}, outputs={self.outputs!r}, uid={self.uid!r})"

    def iter_torch_batches(
        self,
        state: Mapping[str, int] | None = None,
        *,
        device: str | torch.device | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> LoaderIterator:
        """This Train worker's iterator (the same object on every call in one process).

        ``state`` (from `LoaderIterator.state_dict`) moves it to a saved position. ``rank`` and
        ``world_size`` default to the Train context's (rank 0 of 1 outside Ray Train); ``device`` to
        this worker's GPU when it has one, else the CPU. The loader actors start here (not at the
        first batch): call it before building the model, and they boot, fork their workers and
        read their first batches meanwhile.
        """
        import ray

        if not ray.is_initialized():
            ray.init()  # what the first .remote() would do; the device lookup below needs it first
        if (rank is None) != (world_size is None):
            raise ValueError("iter_torch_batches: give both rank and world_size, or neither")
        if rank is None:
            rank, world_size = _train_rank()
        if not (isinstance(world_size, int) and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(
                f"iter_torch_batches: need 0 <= rank < world_size; got rank={rank!r}, world_size={world_size!r}"
            )
        key = (self.uid, rank, world_size)
        it = _ITERATORS.get(key)
        if it is None or it.closed:
            it = _ITERATORS[key] = LoaderIterator(self, rank, world_size, device)
        if state is not None:
            it.load_state_dict(state)
        it.start()
        return it


_ITERATORS: dict[tuple[str, int, int], LoaderIterator] = {}


def _train_rank() -> tuple[int, int]:
    try:
        import ray.train

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size()
    except (RuntimeError, ImportError, AttributeError):
        return 0, 1  # not inside a Ray Train worker: one shard


@atexit.register
def _close_all() -> None:
    """Best effort at interpreter exit: close this process's loader actors cleanly."""
    try:
        import ray

        if not ray.is_initialized():
            return
    except ImportError:
        return
    for it in list(_ITERATORS.values()):
        try:
            it.close()
        except Exception:  # noqa: BLE001
            pass
