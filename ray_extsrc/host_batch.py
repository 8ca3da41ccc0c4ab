"""`HostBatch`: one batch after the host stage, before the GPU stage — what crosses from a loader
actor to a consumer that runs the GPU stage itself (`Loader(gpu_stage="consumer")`).

It holds what the pipeline's main-stage ops read: for each (op, output) a column of per-sample
values — the workers' exports (encoded JPEG bytes, per-sample parameters such as crop boxes drawn
from the counter-based generator, labels) and the outputs of in-process sources — plus the batch's
`SampleInfo`s, from which a GPU op rebuilds every random decision exactly as the actor would have.

A column of 1-D ``uint8`` arrays (encoded images) is packed into one contiguous buffer with offsets
(`PackedBytes`): the actor copies the samples out of its workers' shared-memory slots once (the
slots are reused for the next batch), and Ray places the buffer in the node's object store, which
the consumer on the same node maps read-only without another copy. Other columns (small arrays,
labels) travel as lists. NumPy only: this module loads in any process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .types import SampleInfo

__all__ = ["HostBatch", "PackedBytes", "pack_column", "unpack_column"]


@dataclass(frozen=True)
class PackedBytes:
    """Variable-length 1-D ``uint8`` samples in one buffer: sample j is ``data[offsets[j]:offsets[j+1]]``."""

    data: np.ndarray  # uint8, 1-D
    offsets: np.ndarray  # int64, len = samples + 1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def samples(self) -> list[np.ndarray]:
        o = self.offsets
        return [self.data[o[j] : o[j + 1]] for j in range(len(self))]


def _is_bytes_sample(a: Any) -> bool:
    return isinstance(a, np.ndarray) and a.dtype == np.uint8 and a.ndim == 1


def pack_column(values: Sequence[Any]) -> PackedBytes | list:
    """A column as it travels: packed bytes when every sample is a 1-D uint8 array, else a list of
    private copies (the values may be views of shared memory that is about to be reused)."""
    if values and all(_is_bytes_sample(a) for a in values):
        sizes = np.fromiter((a.size for a in values), np.int64, len(values))
        offsets = np.zeros(len(values) + 1, np.int64)
        np.cumsum(sizes, out=offsets[1:])
        data = np.empty(int(offsets[-1]), np.uint8)
        for j, a in enumerate(values):
            data[offsets[j] : offsets[j + 1]] = a
        return PackedBytes(data, offsets)
    return [np.array(a) if isinstance(a, np.ndarray) else a for a in values]


def unpack_column(column: PackedBytes | list) -> list:
    return column.samples() if isinstance(column, PackedBytes) else list(column)


@dataclass(frozen=True)
class HostBatch:
    """Batch ``iteration`` (local) of epoch ``epoch_idx`` after the host stage (see the module docstring)."""

    epoch_idx: int
    iteration: int
    infos: tuple[SampleInfo, ...]
    columns: dict[int, dict[int, PackedBytes | list]] = field(default_factory=dict)  # op id -> output -> column

    def __len__(self) -> int:
        return len(self.infos)

    @property
    def nbytes(self) -> int:
        return sum(c.data.nbytes for outs in self.columns.values() for c in outs.values() if isinstance(c, PackedBytes))

    def env(self) -> dict[int, dict[int, list]]:
        """The columns as per-sample lists (views of the packed buffers), keyed like a pipeline's env."""
        return {op_id: {k: unpack_column(c) for k, c in outs.items()} for op_id, outs in self.columns.items()}
