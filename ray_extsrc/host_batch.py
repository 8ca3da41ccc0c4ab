"""`HostBatch`: one batch after the host stage, before the GPU stage — what crosses from a loader
actor to a consumer that runs the GPU stage itself (`Loader(gpu_stage="consumer")`).

It holds what the pipeline's main-stage ops read: for each (op, output) a column of per-sample
values — the workers' exports (encoded JPEG bytes, per-sample parameters such as crop boxes drawn
from the counter-based generator, labels) and the outputs of in-process sources — plus the batch's
`SampleInfo`s, from which a GPU op rebuilds every random decision exactly as the actor would have.

A column of 1-D ``uint8`` arrays (encoded images) is packed into one contiguous buffer with offsets
(`PackedBytes`): the actor copies the samples out of its workers' shared-memory slots once (the
slots are reused for the next batch), straight into a slot of its `host_ring` that the consumer on
the same node maps read-only (else into a buffer of its own, which Ray places in the node's object
store, mapped by the consumer without another copy). A column of same-shape,
same-dtype arrays or NumPy scalars (labels, the workers' crop boxes) travels as one array
(`StackedArrays`), and the batch's `SampleInfo`s as one array too (`SampleInfos`): the consumer
unpickles a few buffers, not hundreds of small objects, in the thread whose GIL time the training
step waits for (on this project's CPU machine, 256 SampleInfos took 0.72 ms to unpickle and 256
crop-box rows 0.45 ms). Other columns travel as lists. NumPy only: this module loads in any process.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .types import SampleInfo

__all__ = [
    "HostBatch", "PackedBytes", "PackedSamples", "Rows", "SampleInfos", "StackedArrays", "pack_column", "packed_size",
    "unpack_column",
]


@dataclass(frozen=True)
class PackedBytes:
    """Variable-length 1-D ``uint8`` samples in one buffer: sample j is ``data[offsets[j]:offsets[j+1]]``."""

    data: np.ndarray  # uint8, 1-D
    offsets: np.ndarray  # int64, len = samples + 1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def samples(self) -> PackedSamples:
        # Python-int bounds: slicing with the offsets' NumPy scalars took 73 us per 256 samples,
        # these 45 us (the consumer's GPU stage pays it holding the GIL; see `Rows`)
        o = self.offsets.tolist()
        d = self.data
        return PackedSamples((d[a:b] for a, b in zip(o, o[1:])), self)


class PackedSamples(list):
    """The samples of a `PackedBytes` (views), a list that also names the buffer they view
    (``packed``), so that the GPU decoder takes the addresses of all of them from its offsets
    (`fn._gpu.decode`) instead of one sample at a time."""

    def __init__(self, samples: Iterator[np.ndarray], packed: PackedBytes) -> None:
        super().__init__(samples)
        self.packed = packed

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("PackedSamples are read-only (they must stay the views of `packed`): copy with list() first")

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _read_only
    append = extend = insert = pop = remove = clear = sort = reverse = _read_only

    def __reduce__(self) -> tuple:
        return list, (list(self),)  # elsewhere the views are plain samples


@dataclass(frozen=True)
class StackedArrays:
    """Samples of one shape and dtype as one array: sample j is ``data[j]`` (a view), or a NumPy
    scalar where the samples were NumPy scalars (``scalars``)."""

    data: np.ndarray  # (samples, *sample shape)
    scalars: bool = False

    def __len__(self) -> int:
        return len(self.data)

    def samples(self) -> Rows:
        return Rows(self.data, self.scalars)


class Rows(Sequence):
    """The samples of a `StackedArrays`, read-only: item j is ``array[j, ...]`` (a view), or a NumPy
    scalar where ``scalars``, made only when asked for. The consumer's GPU stage runs in a thread
    of the training process, whose step waits for the GIL that per-sample objects hold: code that
    reads a whole column takes ``array`` at once (`tensors.assemble_cpu`, the GPU ops' argument
    tables). Code that changes a column makes a list of it first (`executor.substitutes.with_rows`)."""

    __slots__ = ("array", "scalars")

    def __init__(self, array: np.ndarray, scalars: bool = False) -> None:
        self.array = array
        self.scalars = scalars

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, j: Any) -> Any:
        if isinstance(j, slice):
            return [self[k] for k in range(*j.indices(len(self)))]
        return self.array[j] if self.scalars else self.array[j, ...]

    def __iter__(self) -> Iterator[Any]:
        a = self.array
        if self.scalars or a.ndim > 1:  # NumPy's own iteration gives these very items
            return iter(a)
        return (a[j, ...] for j in range(len(a)))  # 0-d arrays, not NumPy scalars

    def __reduce__(self) -> tuple:
        return Rows, (self.array, self.scalars)

    def __repr__(self) -> str:
        return f"Rows({self.array!r}, scalars={self.scalars})"


def _stackable(values: Sequence[Any]) -> bool:
    """Every value a NumPy array (or every one a NumPy scalar) of the first one's shape and dtype."""
    first = values[0]
    if isinstance(first, np.ndarray):
        kind = np.ndarray
    elif isinstance(first, np.generic):
        kind = np.generic
    else:
        return False
    if first.dtype.hasobject:
        return False
    return all(isinstance(a, kind) and a.shape == first.shape and a.dtype == first.dtype for a in values)


def _is_bytes_sample(a: Any) -> bool:
    return isinstance(a, np.ndarray) and a.dtype == np.uint8 and a.ndim == 1


def packed_size(values: Sequence[Any]) -> int | None:
    """The bytes `pack_column` packs ``values`` into when it makes them a `PackedBytes` (every
    sample a 1-D uint8 array), else None."""
    if values and all(_is_bytes_sample(a) for a in values):
        return sum(a.size for a in values)
    return None


def pack_column(values: Sequence[Any], out: np.ndarray | None = None) -> PackedBytes | StackedArrays | list:
    """A column as it travels: packed bytes when every sample is a 1-D uint8 array, one array when
    all have one shape and dtype (`StackedArrays`), else a list of private copies (the values may be
    views of shared memory that is about to be reused; the other two forms are copies too).

    ``out``: a 1-D uint8 array of at least `packed_size` bytes to pack the bytes into (a loader
    actor's `host_ring` slot, so that they are copied once); ignored by the other two forms."""
    if values and all(_is_bytes_sample(a) for a in values):
        sizes = np.fromiter((a.size for a in values), np.int64, len(values))
        offsets = np.zeros(len(values) + 1, np.int64)
        np.cumsum(sizes, out=offsets[1:])
        n = int(offsets[-1])
        if out is None:
            data = np.empty(n, np.uint8)
        elif out.dtype != np.uint8 or out.ndim != 1 or len(out) < n:
            raise ValueError(f"pack_column: out must be a 1-D uint8 array of at least {n} bytes; got {out.dtype} {out.shape}")
        else:
            data = out[:n]
        for j, a in enumerate(values):
            data[offsets[j] : offsets[j + 1]] = a
        return PackedBytes(data, offsets)
    if values and _stackable(values):
        return StackedArrays(np.stack(values), scalars=isinstance(values[0], np.generic))
    return [np.array(a) if isinstance(a, np.ndarray) else a for a in values]


def unpack_column(column: PackedBytes | StackedArrays | list) -> Sequence:
    """A column as a per-sample sequence: a list, or `Rows` (read-only) for `StackedArrays`."""
    return column.samples() if isinstance(column, (PackedBytes, StackedArrays)) else list(column)


class SampleInfos(Sequence):
    """A batch's `SampleInfo`s as one ``(samples, 4)`` int64 array (idx_in_epoch, idx_in_batch,
    iteration, epoch_idx); each `SampleInfo` is made when asked for. Equal to any sequence of the
    same `SampleInfo`s."""

    __slots__ = ("rows",)

    def __init__(self, infos: Sequence[SampleInfo] | np.ndarray) -> None:
        if isinstance(infos, np.ndarray):
            self.rows = infos
        else:
            self.rows = np.array([(i.idx_in_epoch, i.idx_in_batch, i.iteration, i.epoch_idx) for i in infos],
                                 np.int64).reshape(-1, 4)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: Any) -> Any:
        if isinstance(j, slice):
            return tuple(SampleInfo(*r) for r in self.rows[j].tolist())
        return SampleInfo(*self.rows[j].tolist())

    def __iter__(self) -> Iterator[SampleInfo]:
        return (SampleInfo(*r) for r in self.rows.tolist())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SampleInfos):
            return np.array_equal(self.rows, other.rows)
        return isinstance(other, Sequence) and len(other) == len(self) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> tuple:
        return SampleInfos, (self.rows,)

    def __repr__(self) -> str:
        return f"SampleInfos({list(self)!r})"


@dataclass(frozen=True)
class HostBatch:
    """Batch ``iteration`` (local) of epoch ``epoch_idx`` after the host stage (see the module docstring)."""

    epoch_idx: int
    iteration: int
    infos: Sequence[SampleInfo]  # made a `SampleInfos` (one array) on construction
    columns: dict[int, dict[int, PackedBytes | StackedArrays | list]] = field(default_factory=dict)  # op id -> output -> column

    def __post_init__(self) -> None:
        if not isinstance(self.infos, SampleInfos):
            object.__setattr__(self, "infos", SampleInfos(self.infos))

    def __len__(self) -> int:
        return len(self.infos)

    @property
    def nbytes(self) -> int:
        return sum(c.data.nbytes for outs in self.columns.values() for c in outs.values() if isinstance(c, PackedBytes))

    def env(self) -> dict[int, dict[int, Sequence]]:
        """The columns as per-sample sequences (views of the packed buffers: lists, `Rows` for the
        stacked ones), keyed like a pipeline's env."""
        return {op_id: {k: unpack_column(c) for k, c in outs.items()} for op_id, outs in self.columns.items()}
