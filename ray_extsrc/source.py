"""Recognising, validating and calling an external source, with DALI's semantics.

Three kinds (DALI's ``fn.external_source``):

* per-sample callable (``batch=False``): ``source(sample_info) -> sample`` — stateless, so samples
  of a batch run in parallel on any worker;
* batch callable (``batch=True``): ``source(batch_info)`` (``batch_info=True``) or
  ``source(iteration)`` -> batch;
* iterable, iterator (a generator object included) or generator function (a function, a callable
  object or a ``functools.partial`` whose call is a generator, called with no arguments):
  ``next(it) -> batch``; stateful, so it runs in one dedicated worker (``parallel=True``) or in
  this process, and ``cycle`` says what happens at the end of the data (the rules below).

A sample is one array (``num_outputs=None``) or a tuple of ``num_outputs`` arrays; a batch is a
list of samples' arrays (or, with ``num_outputs``, a tuple of such lists). Raising StopIteration
ends the epoch. Outputs are checked against ``dtype`` and the error names the sample.

NOTE [cycle]
DALI's ``cycle`` argument, for the iterable kind only (any other kind given ``cycle``, even
``False``, is refused, as DALI does):

==============================  =========================================================
``None``, ``False``, ``"no"``   One pass over the data. ``iter(source)`` (or ``source()``) is
                                called once, at the first batch; its StopIteration ends the
                                epoch and every later one: after ``reset()``, ``run()`` raises
                                StopIteration again. Any iterable, iterator or generator
                                object is accepted.
``True``, ``"quiet"``           Wrap around: when the iterator ends, a fresh ``iter(source)``
                                (or ``source()``) continues at once, so the epoch never ends
                                from this source (another source's StopIteration, or
                                ``reset()``, ends it). A source whose fresh iterator
                                yields nothing ends this epoch and every later one, rather
                                than spinning.
``"raise"``                     StopIteration at the end of the data; every new epoch starts a
                                fresh ``iter(source)`` (or ``source()``), also after a
                                ``reset()`` in mid-epoch.
==============================  =========================================================

``True``/``"quiet"``/``"raise"`` must be able to start over, so they need an iterable whose
``iter()`` returns a fresh iterator, or a generator function; an iterator (``iter(x) is x``: a
generator object, ``iter(list)``, a file) is refused with a TypeError naming ``cycle``.

Between epochs, ``None`` and ``"quiet"`` keep the iterator's place: an epoch that ended early
(``reset()`` in mid-epoch, or another source's StopIteration) is continued where it stopped, not
restarted. With ``parallel=True`` the batches the worker had already computed ahead are handed to
the next epoch rather than dropped (`workers.pool`, NOTE [iterable across epochs]), so the data
seen is the same as with ``parallel=False``. Once the end of the data was met (StopIteration), the
source is not asked again until it restarts: never (``None``), the next epoch (``"raise"``). A
one-pass (``None``) source whose worker died cannot be continued: later batches fail with
`WorkerDiedError` (`workers.pool`, NOTE [shutdown and faults]).

Where this differs from DALI, on purpose: an iterator given ``cycle=True``/``"raise"`` is refused
(DALI refuses only generator objects, and cycles other iterators for one pass, silently);
``"raise"`` restarts at every new epoch, also one that began by ``reset()`` in mid-epoch (DALI
restarts only after the source's own StopIteration; its ``reset()`` does nothing in mid-epoch).
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .types import BatchInfo, SampleInfo, to_numpy_dtype

__all__ = ["Cycle", "SourceKind", "SourceSpec", "cycle_mode", "describe_source", "chunk_samples"]


class SourceKind(enum.Enum):
    SAMPLE = "sample"
    BATCH = "batch"
    ITERABLE = "iterable"


class Cycle(enum.Enum):
    """What an iterable source does at the end of its data (see NOTE [cycle]); DALI's names."""

    NO = "no"  # one pass; the end of the data ends this epoch and every later one
    QUIET = "quiet"  # wrap around at once; the epoch never ends from this source
    RAISE = "raise"  # StopIteration at the end; a fresh iterator every epoch

    @property
    def keeps_place(self) -> bool:
        """Whether the iterator carries over from one epoch to the next (not restarted)."""
        return self is not Cycle.RAISE


_CYCLE_VALUES = (
    "None, False or 'no' (one pass over the data), True or 'quiet' (wrap around; the epoch never "
    "ends from this source) or 'raise' (StopIteration at the end of the data, a fresh iter() next epoch)"
)


def cycle_mode(cycle: Any) -> Cycle:
    """DALI's ``cycle`` values as a `Cycle`; anything else is a ValueError quoting it."""
    # identity for the bools: 0, 1 and numpy bools are not DALI values
    if cycle is None or cycle is False:
        return Cycle.NO
    if cycle is True:
        return Cycle.QUIET
    if isinstance(cycle, str):
        for mode in Cycle:
            if cycle == mode.value:
                return mode
    raise ValueError(f"external_source: cycle={cycle!r} is not valid; use {_CYCLE_VALUES}")


class _Cursor:
    """An iterable source's place in its data, in the process that runs it (the dedicated worker,
    or this one), applying its `Cycle` (NOTE [cycle])."""

    def __init__(self, source: Any, generator_function: bool, cycle: Cycle) -> None:
        self.source = source
        self.generator_function = generator_function
        self.cycle = cycle
        self._it: Iterator | None = None
        self._epoch: int | None = None  # the epoch the iterator was started for
        self._ended = False  # the iterator met the end of the data: it is not asked again

    def _restart(self, epoch_idx: int) -> None:
        self._it = self._fresh()
        self._epoch = epoch_idx
        self._ended = False

    def _fresh(self) -> Iterator:
        return iter(self.source() if self.generator_function else self.source)

    def start_epoch(self, epoch_idx: int) -> None:
        """Epoch ``epoch_idx`` begins: ``"raise"`` starts over; the others keep their place."""
        if self._it is None or self.cycle is Cycle.RAISE:
            self._restart(epoch_idx)

    def next(self, epoch_idx: int) -> Any:
        if self._it is None or (self.cycle is Cycle.RAISE and epoch_idx != self._epoch):
            self._restart(epoch_idx)
        if self._ended:
            raise StopIteration
        try:
            return next(self._it)
        except StopIteration:
            if self.cycle is Cycle.QUIET:
                self._it = self._fresh()
                try:
                    return next(self._it)
                except StopIteration:
                    pass  # a fresh iterator without data: end the epoch rather than spin
            self._ended = True
            raise StopIteration from None


@dataclass
class SourceSpec:
    source: Any
    kind: SourceKind
    num_outputs: int | None
    dtypes: tuple[np.dtype | None, ...]
    batch_info: bool
    parallel: bool
    batch_size: int = 0
    cycle: Cycle = Cycle.NO  # iterables only (NOTE [cycle])
    generator_function: bool = False  # an iterable source given as a generator function
    _cursor: _Cursor | None = field(default=None, repr=False, compare=False)

    @property
    def width(self) -> int:
        return 1 if self.num_outputs is None else self.num_outputs

    # -- per-sample --------------------------------------------------------------------------------

    def call_sample(self, info: SampleInfo) -> tuple[np.ndarray, ...]:
        return self._check(self.source(info), f"sample idx_in_epoch={info.idx_in_epoch}")

    # -- batches -----------------------------------------------------------------------------------

    def call_batch(self, info: BatchInfo) -> list[tuple[np.ndarray, ...]]:
        arg = info if self.batch_info else info.iteration
        return self._split_batch(self.source(arg), info)

    def _iterator(self) -> _Cursor:
        if self._cursor is None:
            self._cursor = _Cursor(self.source, self.generator_function, self.cycle)
        return self._cursor

    def start_epoch(self, epoch_idx: int) -> None:
        """Epoch ``epoch_idx`` begins (an iterable: restarted or not, by its cycle, NOTE [cycle])."""
        self._iterator().start_epoch(epoch_idx)

    def next_batch(self, info: BatchInfo) -> list[tuple[np.ndarray, ...]]:
        """The iterable's next batch; StopIteration at the end of the data (by its cycle)."""
        return self._split_batch(self._iterator().next(info.epoch_idx), info)

    def _split_batch(self, batch: Any, info: BatchInfo) -> list[tuple[np.ndarray, ...]]:
        where = f"batch iteration={info.iteration}"
        if self.num_outputs is None:
            columns = [batch]
        else:
            if not isinstance(batch, (tuple, list)) or len(batch) != self.num_outputs:
                raise ValueError(
                    f"external_source: {where}: expected a tuple of num_outputs={self.num_outputs} "
                    f"batches; got {type(batch).__name__}"
                )
            columns = list(batch)
        lengths = {len(c) for c in columns}
        if len(lengths) != 1:
            raise ValueError(f"external_source: {where}: outputs have different batch sizes {sorted(lengths)}")
        n = lengths.pop()
        if self.batch_size and n != self.batch_size:
            raise ValueError(
                f"external_source: {where}: the source returned {n} samples; the pipeline's "
                f"batch_size is {self.batch_size}"
            )
        first = info.iteration * n
        return [
            self._check(
                tuple(c[i] for c in columns) if self.num_outputs is not None else columns[0][i],
                f"sample idx_in_epoch={first + i} ({where})",
            )
            for i in range(n)
        ]

    # -- validation --------------------------------------------------------------------------------

    def _check(self, sample: Any, where: str) -> tuple[np.ndarray, ...]:
        if self.num_outputs is None:
            values = (sample,)
        else:
            if not isinstance(sample, (tuple, list)) or len(sample) != self.num_outputs:
                got = f"{type(sample).__name__} of length {len(sample)}" if isinstance(sample, (tuple, list)) else type(sample).__name__
                raise ValueError(
                    f"external_source: {where}: expected a tuple of num_outputs={self.num_outputs} "
                    f"arrays; got {got}"
                )
            values = tuple(sample)
        out = []
        for k, (v, dt) in enumerate(zip(values, self.dtypes)):
            a = np.ascontiguousarray(v)
            if a.dtype == object:
                raise TypeError(f"external_source: {where}, output {k}: cannot carry an object array ({v!r:.80})")
            if dt is not None and a.dtype != dt:
                raise TypeError(
                    f"external_source: {where}, output {k}: the source returned dtype {a.dtype}, "
                    f"but dtype={dt} was declared; convert it in the source (e.g. np.{dt}(...))"
                )
            out.append(a)
        return tuple(out)


def describe_source(
    source: Any,
    *,
    num_outputs: int | None,
    batch: bool | None,
    batch_info: bool,
    parallel: bool,
    dtype: Any,
    cycle: Any = None,
) -> SourceSpec:
    if source is None:
        raise TypeError("external_source: source= is required (feeding data with feed_input is not supported)")
    if num_outputs is not None and (not isinstance(num_outputs, int) or num_outputs < 1):
        raise ValueError(f"external_source: num_outputs must be a positive int or None; got {num_outputs!r}")
    mode = cycle_mode(cycle)
    width = 1 if num_outputs is None else num_outputs
    if dtype is None:
        dtypes: tuple = (None,) * width
    elif isinstance(dtype, (list, tuple)):
        if len(dtype) != width:
            raise ValueError(f"external_source: {len(dtype)} dtypes given for {width} outputs")
        dtypes = tuple(to_numpy_dtype(d) for d in dtype)
    else:
        dtypes = (to_numpy_dtype(dtype),) * width

    generator_function = _is_generator_function(source)
    if generator_function or (not callable(source) and isinstance(source, Iterable)):
        if batch is False:
            raise ValueError(
                "external_source: an iterable/generator source yields whole batches; batch=False "
                "needs a per-sample callable source(sample_info)"
            )
        if generator_function:
            _check_no_arguments(source)
        kind = SourceKind.ITERABLE
    elif callable(source):
        _check_arity(source)
        # DALI: batch=None means per-batch, except that parallel=True makes it per-sample.
        per_sample = batch is False or (batch is None and parallel)
        kind = SourceKind.SAMPLE if per_sample else SourceKind.BATCH
    else:
        raise TypeError(
            f"external_source: source must be a callable, an iterable or a generator function; "
            f"got {type(source).__name__}"
        )
    if cycle is not None and kind is not SourceKind.ITERABLE:
        # DALI refuses any cycle= here, False included: a callable ends its epoch itself
        what = "per-sample" if kind is SourceKind.SAMPLE else "batch"
        raise ValueError(
            f"external_source: cycle={cycle!r} applies only to an iterable or a generator function "
            f"source; {_name(source)} is a {what} callable, which ends the epoch by raising "
            "StopIteration itself: drop cycle="
        )
    if mode is not Cycle.NO and isinstance(source, Iterator):
        if inspect.isgenerator(source):
            what = (
                "a generator object runs only once; pass the generator function itself "
                "(source=gen, not source=gen())"
            )
        else:
            what = (
                f"{_name(source)} is an iterator (iter() returns the same object, which stays "
                "exhausted); pass the iterable it came from (the list, not iter(list)) or a "
                "generator function"
            )
        raise TypeError(
            f"external_source: cycle={cycle!r} has to start the source over (a fresh iter() at "
            f"the end of the data), but {what}; or drop cycle= for a single pass over the data"
        )
    return SourceSpec(
        source, kind, num_outputs, dtypes, batch_info, parallel, cycle=mode, generator_function=generator_function
    )


def _name(source: Any) -> str:
    return getattr(source, "__name__", None) or type(source).__name__


def _is_generator_function(source: Any) -> bool:
    """A generator function, or something that calls one: a method, a ``functools.partial`` of
    one (both seen through by `inspect`), or an object whose ``__call__`` is one (as DALI does)."""
    if inspect.isgeneratorfunction(source):
        return True
    if isinstance(source, type) or inspect.isroutine(source) or not callable(source):
        return False
    return inspect.isgeneratorfunction(getattr(type(source), "__call__", None))


def _check_no_arguments(source: Any) -> None:
    """A generator function source is called as ``source()``, at each (re)start."""
    try:
        sig = inspect.signature(source)
    except (TypeError, ValueError):
        return
    required = [
        p.name
        for p in sig.parameters.values()
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if required:
        raise TypeError(
            f"external_source: a generator function source is called with no arguments (source()), "
            f"but {_name(source)}{sig} requires {', '.join(required)}; bind them first "
            "(functools.partial) or give them defaults"
        )


def _check_arity(source: Callable) -> None:
    try:
        sig = inspect.signature(source)
    except (TypeError, ValueError):
        return
    params = [
        p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    varargs = any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values())
    if len(params) > 1 or (not params and not varargs):
        raise TypeError(
            f"external_source: the source callable must take exactly one argument (sample_info, "
            f"batch_info or the iteration number); {getattr(source, '__name__', type(source).__name__)}"
            f"{sig} takes {len(params)}"
        )


def chunk_samples(samples: Sequence[SampleInfo], parts: int) -> list[tuple[SampleInfo, ...]]:
    """Split a batch's SampleInfos into at most ``parts`` contiguous, nearly equal chunks."""
    n = len(samples)
    parts = max(1, min(parts, n))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [tuple(samples[bounds[i] : bounds[i + 1]]) for i in range(parts)]
