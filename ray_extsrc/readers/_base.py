"""`Reader`: what every ready-made reader is — a per-sample source with random access and a length.

A reader maps ``idx_in_epoch`` to one sample, ``(encoded bytes as uint8, int32 label of shape (1,))``,
reading only that sample's bytes. Because the sample is a function of the index alone, sharding
(each rank asks for its own indices), shuffling (the pipeline permutes positions) and resuming
(any position can be asked for first) all work without the reader knowing of them.

The epoch: with ``batch_size`` it is ``len(samples) // batch_size`` full batches, as in DALI's
tutorial (``StopIteration`` at ``iteration >= full_iterations``); without it, every sample once
(``StopIteration`` at ``idx_in_epoch >= len(samples)``; the pipeline keeps only full batches).
``__len__`` gives the epoch's samples, so sharded loaders agree on its length up front.

Pickling: a reader pickles its listing or index as a few NumPy arrays (or, for `FileListSource`,
its lists), never a sample's bytes, an open file or a filesystem object; those are opened lazily
in each worker process (see `_storage`).
"""

from __future__ import annotations

import numpy as np

from ..types import SampleInfo

__all__ = ["Reader", "check_count"]


def check_count(name: str, value: object, *, allow_none: bool = True, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{' or None' if allow_none else ''}; got {value!r}")


class Reader:
    """Base of the readers. Subclasses set the sample count with `_set_length` and implement
    `read_sample` and `sample_name`."""

    batch_size: int | None = None
    full_iterations: int | None = None
    _num_samples: int = 0

    def _set_length(self, num_samples: int, batch_size: int | None) -> None:
        check_count(f"{type(self).__name__}: batch_size", batch_size)
        self.batch_size = batch_size
        self._num_samples = num_samples
        self.full_iterations = num_samples // batch_size if batch_size is not None else None

    @property
    def num_samples(self) -> int:
        """Samples in the data set (after ``limit``), whether or not they fill a last batch."""
        return self._num_samples

    def __len__(self) -> int:
        if self.batch_size is None:
            return self._num_samples
        return self.full_iterations * self.batch_size

    def __call__(self, sample_info: SampleInfo):
        if self.full_iterations is not None and sample_info.iteration >= self.full_iterations:
            raise StopIteration
        i = sample_info.idx_in_epoch
        if i >= self._num_samples:
            raise StopIteration
        data, label = self.read_sample(i)
        return np.frombuffer(data, dtype=np.uint8), np.int32([label])

    def read_sample(self, i: int) -> tuple[bytes, int]:
        """Sample ``i``'s encoded bytes and its label (for ``0 <= i < num_samples``)."""
        raise NotImplementedError

    def sample_name(self, i: int) -> str:
        """A name for sample ``i``: a relative path with the image's extension (``cls/img.jpg``)."""
        raise NotImplementedError

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self._num_samples:
            raise IndexError(f"{type(self).__name__}: sample {i} is out of range [0, {self._num_samples})")
