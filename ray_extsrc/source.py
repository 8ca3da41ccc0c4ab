"""Recognising, validating and calling an external source, with DALI's semantics.

Three kinds (DALI's ``fn.external_source``):

* per-sample callable (``batch=False``): ``source(sample_info) -> sample`` — stateless, so samples
  of a batch run in parallel on any worker;
* batch callable (``batch=True``): ``source(batch_info)`` (``batch_info=True``) or
  ``source(iteration)`` -> batch;
* iterable or generator function: ``next(it) -> batch``; stateful, so it runs in one dedicated
  worker, and ``iter(source)`` is called again at every epoch.

A sample is one array (``num_outputs=None``) or a tuple of ``num_outputs`` arrays; a batch is a
list of samples' arrays (or, with ``num_outputs``, a tuple of such lists). Raising StopIteration
ends the epoch. Outputs are checked against ``dtype`` and the error names the sample.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .types import BatchInfo, SampleInfo, to_numpy_dtype

__all__ = ["SourceKind", "SourceSpec", "describe_source", "chunk_samples"]


class SourceKind(enum.Enum):
    SAMPLE = "sample"
    BATCH = "batch"
    ITERABLE = "iterable"


@dataclass
class SourceSpec:
    source: Any
    kind: SourceKind
    num_outputs: int | None
    dtypes: tuple[np.dtype | None, ...]
    batch_info: bool
    parallel: bool
    batch_size: int = 0
    _iterator: Any = None

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

    def start_epoch(self, epoch_idx: int) -> None:
        src = self.source
        self._iterator = iter(src() if inspect.isgeneratorfunction(src) else src)

    def next_batch(self, info: BatchInfo) -> list[tuple[np.ndarray, ...]]:
        if self._iterator is None:
            self.start_epoch(info.epoch_idx)
        return self._split_batch(next(self._iterator), info)

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
) -> SourceSpec:
    if source is None:
        raise TypeError("external_source: source= is required (feeding data with feed_input is not supported)")
    if num_outputs is not None and (not isinstance(num_outputs, int) or num_outputs < 1):
        raise ValueError(f"external_source: num_outputs must be a positive int or None; got {num_outputs!r}")
    width = 1 if num_outputs is None else num_outputs
    if dtype is None:
        dtypes: tuple = (None,) * width
    elif isinstance(dtype, (list, tuple)):
        if len(dtype) != width:
            raise ValueError(f"external_source: {len(dtype)} dtypes given for {width} outputs")
        dtypes = tuple(to_numpy_dtype(d) for d in dtype)
    else:
        dtypes = (to_numpy_dtype(dtype),) * width

    if inspect.isgeneratorfunction(source) or (
        not callable(source) and isinstance(source, Iterable)
    ):
        if batch is False:
            raise ValueError(
                "external_source: an iterable/generator source yields whole batches; batch=False "
                "needs a per-sample callable source(sample_info)"
            )
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
    if kind is SourceKind.ITERABLE and parallel and not inspect.isgeneratorfunction(source):
        if iter(source) is source:
            raise TypeError(
                "external_source(parallel=True): an iterator object cannot be moved to a worker and "
                "restarted each epoch; pass an iterable (an object with __iter__) or a generator function"
            )
    return SourceSpec(source, kind, num_outputs, dtypes, batch_info, parallel)


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
