"""DALI's framework iterators, the part every framework shares: `LastBatchPolicy` and the epoch
accounting (how many batches an epoch has, which samples of its last batch are returned, when
``reset()`` is allowed). `ray_extsrc.plugin.pytorch` adds the conversion to torch tensors.

The iterator drives one or more pipelines (one per GPU in DALI; here, one per shard) in lock step:
each step runs every pipeline once. Its epoch is set by one of three things, as in DALI:

* nothing (``size=-1``, no ``reader_name``): the pipeline's own epoch, which ends where its source
  raises StopIteration (or at its ``__len__``). One pipeline only; DALI's iterator returns each
  batch as the pipeline made it, and so does this one — except that the batches of a pipeline made
  with ``last_batch_policy="exact"`` are cut to their `Pipeline.valid_samples` (the analogue of a
  DALI source returning a short last batch).
* ``size=S``: S samples per epoch, summed over the pipelines; a step counts ``pipelines * B``.
  The pipelines are read as streams that go on (DALI's readers wrap around): a source that maps
  ``idx_in_epoch`` past its end back into the data, or a pipeline whose epoch is long enough.
* ``reader_name="R"``: the per-sample ``fn.external_source(..., name="R")`` whose ``__len__`` is
  the number of samples N of an epoch, all shards together; the shards are the pipelines'
  ``num_shards``/``shard_id``.

Worked out for a reader of N samples, batch size B, R shards. A ray_extsrc pipeline deals the
epoch's global batches out in turn (shard r serves ``g = i*R + r``, see `ray_extsrc.sharding`). Let
``E = N // B // R`` be the rounds every shard can fill and ``T = N - E*R*B`` the samples left over.

=========  ==============  =====================================================================
policy     batches         the last one (shard r)
=========  ==============  =====================================================================
DROP       E               (the left-over samples are not returned)
FILL       E + (T > 0)     global batch ``g = E*R + r``, full: positions past N wrap to the
                           epoch's first ones (DALI's reader without ``pad_last_batch``)
PARTIAL    E + (T > 0)     the same batch cut to its ``max(0, min(B, N - g*B))`` own samples
                           (empty for the shards past the end)
=========  ==============  =====================================================================

N=10, B=4, one shard: DROP [0-3] [4-7]; FILL [0-3] [4-7] [8 9 0 1]; PARTIAL [0-3] [4-7] [8 9].
Two shards: DROP shard 0 [0-3], shard 1 [4-7]; FILL shard 0 [0-3] [8 9 0 1], shard 1 [4-7]
[2 3 4 5]; PARTIAL shard 0 [0-3] [8 9], shard 1 [4-7] []. Every shard takes the same number of
steps (DDP stays in step). ``len()`` and ``size`` are DALI's numbers: 3 and 12 (or 2 and 10 for
DROP), and per shard of two 2 and 8 (1 and 5).

The last batch of FILL and PARTIAL (T > 0) is the pipeline's last round, which a pipeline serves
when it is made with ``last_batch_policy="pad"`` or ``"exact"`` (`ray_extsrc.sharding`: its slots
past N wrap to the epoch's start). A pipeline that drops its last round (``"drop"``, the default)
cannot serve it, and the iterator that would need it is refused when it is made, saying so.

Where this differs from DALI, and why (each follows from how ray_extsrc pipelines work):

* ``reset()`` starts every pipeline's next epoch from its beginning (per-sample sources restart at
  ``idx_in_epoch`` 0 with a new ``epoch_idx`` and that epoch's shuffle): nothing read past an
  epoch's end carries into the next. So every epoch has the same batches, whatever
  ``last_batch_padded`` says (DALI, with FILL and an unpadded reader, starts the next epoch after
  the samples the fill took, and shortens it: its ``[7, 1]`` is followed by ``[2, 3]``, ours by
  ``[1, 2]``). What a filled batch holds is the pipeline's to say (above), not the flag's.
* Shards are the interleaved global batches above, not DALI's contiguous ranges
  ``[r*N//R, (r+1)*N//R)``, and a pipeline keeps its shard every epoch (``stick_to_shard``).
* ``size=`` with a pipeline whose epoch ends before the iterator's is an error naming both
  numbers (when the iterator is made, if the pipeline knows its epoch_size(), else when it ends);
  DALI stops the epoch early there and then ignores the ``reset()`` that follows, so every later
  epoch is empty.
* ``len()`` without ``size``/``reader_name`` is the pipeline's ``epoch_size()`` when its source
  knows its length (DALI gives 0).
* Errors are ``ValueError``/``TypeError`` with the offending value, where DALI asserts.
* ``checkpoints()`` is refused (the pipelines have no DALI checkpoints; resume with
  ``Pipeline.position()``/``skip_to()``).
"""

from __future__ import annotations

import enum
import inspect
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..external_source import is_source
from ..pipeline import Pipeline
from ..source import SourceKind

__all__ = ["LastBatchPolicy"]

_log = logging.getLogger(__name__)


@enum.unique
class LastBatchPolicy(enum.Enum):
    """What an epoch's last batch holds when the epoch's samples do not fill it.

    * FILL — a full batch: the epoch's remaining samples, then either its first samples again
      or its last sample repeated (``last_batch_padded``, or the reader's padding);
    * DROP — the last batch is left out if it cannot be filled with this epoch's samples;
    * PARTIAL — only the epoch's remaining samples (a shorter, possibly empty, batch).
    """

    FILL = 0
    DROP = 1
    PARTIAL = 2


@dataclass(frozen=True)
class _Reader:
    """What the iterator needs to know of the reader named by ``reader_name`` (DALI's reader_meta)."""

    name: str
    epoch_size: int  # samples per epoch, all shards together
    epoch_size_padded: int
    num_shards: int
    pad_last_batch: bool
    stick_to_shard: bool


@dataclass(frozen=True)
class _EpochPlan:
    """An epoch, step by step, fixed when the iterator is made.

    steps: steps per epoch (None: until the pipeline's source raises StopIteration).
    last_keep: per pipeline, samples of the last step's batch to return (None: all of them); a
        pipeline past the end of this tuple returns nothing at the last step.
    """

    steps: int | None
    last_keep: tuple[int | None, ...] | None = None


class _DaliBaseIterator:
    """DALI's base iterator over ray_extsrc pipelines; see the module docstring. Framework
    iterators (`ray_extsrc.plugin.pytorch.DALIGenericIterator`) subclass it and implement
    ``__next__`` with `_fetch`."""

    def __init__(
        self,
        pipelines: Pipeline | Sequence[Pipeline],
        size: int = -1,
        reader_name: str | None = None,
        auto_reset: bool | str | None = False,
        fill_last_batch: bool | None = None,
        last_batch_padded: bool = False,
        last_batch_policy: LastBatchPolicy = LastBatchPolicy.FILL,
        prepare_first_batch: bool = True,
    ) -> None:
        pipes = _as_pipelines(pipelines)
        self._num_gpus = len(pipes)  # DALI's name: pipelines driven in lock step
        #: samples per batch of every pipeline (frameworks expect the attribute)
        self.batch_size: int = pipes[0].batch_size
        sizes = [p.batch_size for p in pipes]
        if any(s != self.batch_size for s in sizes):
            raise ValueError(f"all pipelines must have the same batch_size; got {sizes}")
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"size must be an int (samples per epoch, -1: the pipeline's epoch); got {size!r}")
        self._size = size
        self._auto_reset = _auto_reset_policy(auto_reset)
        self._prepare_first_batch = bool(prepare_first_batch)

        if fill_last_batch is not None:
            warnings.warn(
                "fill_last_batch is deprecated (as in DALI): use last_batch_policy=LastBatchPolicy.FILL "
                "(fill_last_batch=True) or LastBatchPolicy.PARTIAL (False)",
                FutureWarning,
                stacklevel=_caller_level(),
            )
            policy = LastBatchPolicy.FILL if fill_last_batch else LastBatchPolicy.PARTIAL
        elif type(last_batch_policy) is not LastBatchPolicy:
            raise ValueError(
                f"last_batch_policy must be a ray_extsrc.plugin.base_iterator.LastBatchPolicy; "
                f"got {last_batch_policy!r} ({type(last_batch_policy).__name__})"
            )
        else:
            policy = last_batch_policy
        padded = bool(last_batch_padded)

        if size == 0:
            raise ValueError("size cannot be 0; give the samples per epoch, or -1 for the pipeline's own epoch")
        if size < 0 and not reader_name and len(pipes) > 1:
            raise ValueError(
                f"{len(pipes)} pipelines need size= or reader_name=: without them the epoch is where "
                "a pipeline's source raises StopIteration, which is supported for one pipeline only"
            )
        if reader_name and size > 0:
            raise ValueError(f"give either reader_name ({reader_name!r}) or size ({size}), not both")
        if reader_name and last_batch_padded:
            raise ValueError(
                "last_batch_padded cannot be set with reader_name: it comes from the reader's configuration"
            )
        if reader_name is not None and not isinstance(reader_name, str):
            raise TypeError(f"reader_name must be a str; got {type(reader_name).__name__}")
        if size < 0 and not reader_name:
            # DALI: the policies do not apply to the pipeline's own epoch
            policy, padded = LastBatchPolicy.FILL, False
        if size > 0 and not reader_name:
            warnings.warn(
                "Please set `reader_name` and don't set last_batch_padded and size manually whenever "
                "possible. This may lead, in some situations, to missing some samples or returning "
                "duplicated ones (ray_extsrc: reader_name names the fn.external_source(name=...) whose "
                "__len__ is the epoch).",
                UserWarning,
                stacklevel=_caller_level(),
            )
        self._last_batch_policy = policy
        self._pipes = pipes
        for p in pipes:
            p.build()  # DALI's iterators build their pipelines; ours is a no-op once built
        self._reader_name = reader_name
        self._reader = _reader_of(pipes, reader_name) if reader_name else None
        if self._reader is not None:
            padded = self._reader.pad_last_batch
            if not self._reader.stick_to_shard:
                raise ValueError(
                    f"reader {reader_name!r} reports stick_to_shard=False, but ray_extsrc pipelines "
                    "keep their shard every epoch"
                )
            self._size = _reader_size(self._reader, policy, self.batch_size)
        self._last_batch_padded = padded  # DALI's attribute; see the module docstring
        self._epoch = self._plan_epoch()
        self._step = 0  # steps taken in this epoch
        self._ever_consumed = False
        self._first_batch: Any = None

    # -- the epoch ---------------------------------------------------------------------------------

    def _plan_epoch(self) -> _EpochPlan:
        b, n = self.batch_size, self._num_gpus
        policy = self._last_batch_policy
        if self._reader is not None:
            return self._plan_reader_epoch()
        if self._size < 0:
            return _EpochPlan(None)
        per_step = n * b
        if policy is LastBatchPolicy.DROP:
            steps = self._size // per_step
        else:
            steps = -(-self._size // per_step)
        for k in range(n):
            self._check_length(k, steps, f"size={self._size}")
        last_keep = None
        if policy is LastBatchPolicy.PARTIAL and steps * per_step > self._size:
            # DALI: exactly `size` samples, from the first pipelines of the last step
            left = self._size - (steps - 1) * per_step
            grab = -(-left // b)
            last_keep = (None,) * (grab - 1) + (left - (grab - 1) * b,)
        return _EpochPlan(steps, last_keep)

    def _plan_reader_epoch(self) -> _EpochPlan:
        reader, b = self._reader, self.batch_size
        per_round = reader.num_shards * b
        full, rounds = reader.epoch_size // per_round, -(-reader.epoch_size // per_round)
        for k, p in enumerate(self._pipes):
            want = rounds if _pads(p) else full
            got = p.epoch_size()
            if got != want:
                raise ValueError(
                    f"reader {reader.name!r} has {reader.epoch_size} samples, so pipeline {k} (shard "
                    f"{p.layout.shard_id} of {reader.num_shards}, batch_size {b}, last_batch_policy "
                    f"{_pipeline_policy(p)!r}) should serve {want} batches per epoch, but its "
                    f"epoch_size() is {got}: another of its sources is shorter, or the pipeline was "
                    "moved with skip_to(consumed_batches=...)"
                )
        if self._last_batch_policy is LastBatchPolicy.DROP:
            return _EpochPlan(full)
        for k in range(self._num_gpus):
            self._check_length(k, rounds, f"reader_name={reader.name!r}")
        last_keep = None
        if self._last_batch_policy is LastBatchPolicy.PARTIAL and rounds > full:
            last_keep = tuple(p.valid_samples(rounds - 1) for p in self._pipes)
        return _EpochPlan(rounds, last_keep)

    def _check_length(self, k: int, steps: int, why: str) -> None:
        """Refuse an epoch of ``steps`` that pipeline k cannot serve (when it knows its length)."""
        pipe = self._pipes[k]
        have = pipe.epoch_size()
        if have is None or steps <= have:
            return  # a stream that goes on, or long enough
        policy = self._last_batch_policy.name
        if steps == have + 1 and not _pads(pipe):
            fix = (
                "make the pipeline with Pipeline(last_batch_policy='pad') (or 'exact'), which serves "
                "that last round, or give"
                if "last_batch_policy" in _PIPELINE_ARGS
                else "this version's Pipeline cannot serve them (it keeps whole rounds only); give"
            )
            raise ValueError(
                f"{why} with last_batch_policy={policy} needs {steps} batches per epoch from pipeline "
                f"{k}, whose epoch_size() is {have}: the last batch holds the samples its whole rounds "
                f"leave over, and the pipeline drops them (its own last_batch_policy is "
                f"{_pipeline_policy(pipe)!r}). To have them, {fix} the iterator "
                "last_batch_policy=LastBatchPolicy.DROP"
            )
        raise ValueError(
            f"{why} with last_batch_policy={policy} needs {steps} batches per epoch from pipeline {k}, "
            f"but its epoch_size() is {have}; give a smaller size, or a source without __len__ that "
            "keeps producing samples (idx_in_epoch past the end wrapped into the data)"
        )

    # -- stepping ----------------------------------------------------------------------------------

    def _fetch(self) -> list[tuple[tuple, int | None]]:
        """The next step's outputs: per pipeline, (its run() outputs, how many samples to keep or
        None for all). Raises StopIteration at the epoch's end (after reset() with auto_reset)."""
        plan = self._epoch
        if plan.steps is not None and self._step >= plan.steps:
            self._end_iteration()
        step = self._step
        outputs = [self._run_pipe(k, step) for k in range(self._num_gpus)]
        self._step = step + 1
        if plan.steps is None:  # the pipeline's own batches; an "exact" one marks its padding
            return [(out, p.valid_samples() if _pipeline_policy(p) == "exact" else None)
                    for out, p in zip(outputs, self._pipes)]
        if plan.last_keep is not None and step == plan.steps - 1:
            return list(zip(outputs, plan.last_keep))
        return [(out, None) for out in outputs]

    def _run_pipe(self, k: int, step: int) -> tuple:
        try:
            return self._pipes[k].run()
        except StopIteration:
            if self._epoch.steps is None:  # the pipeline's own epoch is the iterator's
                if self._auto_reset:
                    self.reset()
                raise
            raise ValueError(
                f"pipeline {k} ended its epoch (its source raised StopIteration) after {step} batches, "
                f"but this iterator's epoch has {self._epoch.steps} ({self._describe()}); with size= the "
                "pipelines must keep producing samples (as DALI's readers do), e.g. a source that maps "
                "idx_in_epoch past its end back into the data — or use reader_name= for a source with "
                "__len__, or size=-1 to end the epoch where the source does"
            ) from None

    def _describe(self) -> str:
        if self._reader is not None:
            return f"reader {self._reader.name!r} of {self._reader.epoch_size} samples"
        return f"size={self._size}, {self._num_gpus} pipeline(s) of batch_size {self.batch_size}"

    def _end_iteration(self) -> None:
        if self._auto_reset:
            self.reset()
        raise StopIteration

    def _report_no_data_in_pipeline(self) -> None:
        raise RuntimeError(
            "It seems that there is no data in the pipeline. This may happen if `last_batch_policy` "
            "is set to DROP (or PARTIAL) and the requested batch size is greater than the shard size "
            f"({self._describe()})."
        )

    # -- DALI's public surface ---------------------------------------------------------------------

    def reset(self) -> None:
        """Start the next epoch, once this one is over (DALI ignores a reset in the middle of an
        epoch, with a warning in the log; so does this). Every pipeline restarts at the beginning
        of its next epoch."""
        if self._epoch.steps is not None and self._step < self._epoch.steps:
            _log.warning(
                "DALI iterator does not support resetting while epoch is not finished. Ignoring... "
                "(at step %d of %d)",
                self._step,
                self._epoch.steps,
            )
            return
        self._step = 0
        self._first_batch = None
        for p in self._pipes:
            p.reset()

    def next(self) -> Any:
        """The next batch (DALI's alias of ``__next__``)."""
        self._ever_consumed = True
        return self.__next__()

    def __next__(self) -> Any:
        raise NotImplementedError

    def __iter__(self) -> _DaliBaseIterator:
        # a new `for` over an iterator that was read from starts the next epoch (DALI); not on a
        # fresh iterator, whose first batch may be buffered already
        if self._step != 0 and self._ever_consumed:
            self.reset()
        return self

    @property
    def size(self) -> int:
        """DALI's ``size``: samples per epoch the iterator counts (per shard with ``reader_name``)."""
        return self._size

    def __len__(self) -> int:
        """Batches (steps) per epoch."""
        if self._epoch.steps is not None:
            return self._epoch.steps
        sizes = {p.epoch_size() for p in self._pipes}
        return sizes.pop() if len(sizes) == 1 and None not in sizes else 0

    def checkpoints(self) -> list:
        raise ValueError(
            "Cannot access checkpoints with checkpointing disabled: ray_extsrc pipelines have no DALI "
            "checkpoints; save Pipeline.position() and resume with Pipeline.skip_to()"
        )


_PIPELINE_ARGS = frozenset(inspect.signature(Pipeline.__init__).parameters)


def _pipeline_policy(pipe: Pipeline) -> str:
    """The pipeline's own last-batch policy ("drop", "pad", "exact"; "drop" where it has none)."""
    return getattr(pipe, "last_batch_policy", "drop")


def _pads(pipe: Pipeline) -> bool:
    """Whether the pipeline serves its last round, the slots past the epoch's end wrapped."""
    return _pipeline_policy(pipe) != "drop"


def _caller_level() -> int:
    """``warnings.warn``'s stacklevel that points at the first caller outside the plugin modules
    (a user's ``DALIClassificationIterator(...)`` is three frames up, ``DALIGenericIterator`` two)."""
    here = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == here:
        frame, level = frame.f_back, level + 1
    return level


def _as_pipelines(pipelines: Any) -> list[Pipeline]:
    if isinstance(pipelines, Pipeline):
        return [pipelines]
    if not isinstance(pipelines, (list, tuple)):
        raise TypeError(
            f"pipelines must be a ray_extsrc Pipeline or a list of them; got {type(pipelines).__name__}"
        )
    if not pipelines:
        raise ValueError("Number of provided pipelines has to be at least 1")
    for i, p in enumerate(pipelines):
        if not isinstance(p, Pipeline):
            raise TypeError(f"pipelines[{i}] must be a ray_extsrc Pipeline; got {type(p).__name__}")
    return list(pipelines)


def _auto_reset_policy(auto_reset: Any) -> bool:
    if auto_reset is False or auto_reset is None or auto_reset == "no":
        return False
    if auto_reset is True or auto_reset == "yes":
        return True
    raise ValueError(f"Unsupported value for `auto_reset` {auto_reset!r}: use True/'yes' or False/'no'/None")


def _reader_size(reader: _Reader, policy: LastBatchPolicy, batch_size: int) -> int:
    """DALI's ``size`` of an iterator over a reader: the samples of one shard it counts."""
    if policy is LastBatchPolicy.DROP:
        return reader.epoch_size // reader.num_shards
    if reader.pad_last_batch:
        return reader.epoch_size_padded // reader.num_shards
    per_shard = -(-reader.epoch_size // reader.num_shards)
    return -(-per_shard // batch_size) * batch_size


# -- the reader: a named fn.external_source --------------------------------------------------------


def _reader_of(pipes: Sequence[Pipeline], name: str) -> _Reader:
    metas = [_reader_meta(p, name) for p in pipes]
    first = metas[0]
    for key in ("epoch_size", "number_of_shards"):
        values = [m[key] for m in metas]
        if any(v != values[0] for v in values):
            raise ValueError(f"reader {name!r} should have the same {key} in all the pipelines; got {values}")
    for key in ("pad_last_batch", "stick_to_shard"):
        values = [bool(m[key]) for m in metas]
        if any(values) and not all(values):
            raise ValueError(f"reader {name!r} should have the same {key} in all the pipelines; got {values}")
    return _Reader(
        name=name,
        epoch_size=int(first["epoch_size"]),
        epoch_size_padded=int(first["epoch_size_padded"]),
        num_shards=int(first["number_of_shards"]),
        pad_last_batch=bool(first["pad_last_batch"]),
        stick_to_shard=bool(first["stick_to_shard"]),
    )


def _reader_meta(pipe: Pipeline, name: str) -> dict[str, Any]:
    """DALI's ``Pipeline.reader_meta(name)``, read from the graph: the named per-sample source's
    ``__len__`` and the pipeline's shard."""
    node = _find_reader(pipe, name)
    n = len(node.op.spec.source)
    return {
        "epoch_size": n,
        "epoch_size_padded": n,
        "number_of_shards": pipe.layout.num_shards,
        "shard_id": pipe.layout.shard_id,
        "pad_last_batch": False,
        "stick_to_shard": True,
    }


def _find_reader(pipe: Pipeline, name: str) -> Any:
    """The graph node of ``fn.external_source(name=name)`` (its ``instance_name``); exactly one."""
    sources = [n for n in pipe.graph.nodes if is_source(n)]
    named = [n for n in sources if n.op.instance_name == name]
    if len(named) != 1:
        known = sorted(str(n.op.instance_name) for n in sources if n.op.instance_name)
        raise ValueError(
            f"reader_name={name!r}: the pipeline has {len(named)} fn.external_source(name={name!r}); "
            f"its named sources: {known}"
        )
    return _check_reader(named[0], name)


def _check_reader(node: Any, name: str) -> Any:
    spec = node.op.spec
    if spec.kind is not SourceKind.SAMPLE:
        raise ValueError(
            f"reader_name={name!r} names a {spec.kind.value} source; a reader must be a per-sample "
            "source (batch=False, or parallel=True) with __len__"
        )
    if _length(node) is None:
        raise ValueError(
            f"reader_name={name!r}: the source {type(spec.source).__name__} has no __len__, which "
            "the iterator reads as the number of samples per epoch"
        )
    return node


def _length(node: Any) -> int | None:
    try:
        return len(node.op.spec.source)
    except TypeError:
        return None
