"""Batches as the pipeline returns them: DALI's TensorListCPU / TensorListGPU, kept small.

A batch output holds either one dense array (all samples the same shape: the usual case after
resize/crop) or a list of per-sample arrays (e.g. decoded images of different sizes).
``as_cpu()``, ``at(i)``, ``as_array()``/``as_tensor()`` and ``layout()`` behave as in DALI.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .host_batch import Rows

__all__ = ["TensorListCPU", "TensorListGPU", "assemble_cpu"]


class _TensorList:
    def __init__(self, data: Any, layout: str = "") -> None:
        self._data = data  # a dense array (batch first), or a list of arrays
        self._layout = layout

    @property
    def is_dense(self) -> bool:
        return not isinstance(self._data, list)

    def is_dense_tensor(self) -> bool:
        if self.is_dense:
            return True
        shapes = {a.shape for a in self._data}
        return len(shapes) <= 1

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, i: int) -> Any:
        return self._data[i]

    def at(self, i: int) -> Any:
        return self._data[i]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._data)

    def layout(self) -> str:
        return self._layout

    def shape(self) -> list[tuple[int, ...]]:
        return [tuple(a.shape) for a in self]

    @property
    def dtype(self) -> Any:
        return self._data.dtype if self.is_dense else (self._data[0].dtype if self._data else None)


class TensorListCPU(_TensorList):
    """A batch in host memory (NumPy)."""

    def as_cpu(self) -> TensorListCPU:
        return self

    def as_array(self) -> np.ndarray:
        """The batch as one array of shape (batch, ...); samples must share a shape."""
        if self.is_dense:
            return self._data
        if not self.is_dense_tensor():
            raise ValueError(
                f"as_array(): samples have different shapes {sorted(set(self.shape()))[:4]}...; "
                "resize/crop them to one shape first, or use at(i)"
            )
        return np.stack(self._data) if self._data else np.empty((0,))

    as_tensor = as_array

    def __repr__(self) -> str:
        return f"TensorListCPU(len={len(self)}, dense={self.is_dense}, layout={self._layout!r})"


class TensorListGPU(_TensorList):
    """A batch in GPU memory (CuPy arrays)."""

    def as_cpu(self) -> TensorListCPU:
        if self.is_dense:
            return TensorListCPU(self._data.get(), self._layout)
        return TensorListCPU([a.get() for a in self._data], self._layout)

    def as_array(self) -> Any:
        import cupy

        if self.is_dense:
            return self._data
        return cupy.stack(self._data)

    as_tensor = as_array

    def __repr__(self) -> str:
        return f"TensorListGPU(len={len(self)}, dense={self.is_dense}, layout={self._layout!r})"


def assemble_cpu(samples: Sequence[np.ndarray], layout: str = "") -> TensorListCPU:
    """Own copies of ``samples`` (which may be views into a reusable slot) as one batch output; a
    `Rows` column is one copy of its array (what stacking its samples gives, without them)."""
    if isinstance(samples, Rows) and len(samples):
        return TensorListCPU(np.array(samples.array, order="C"), layout)  # as np.stack gives
    if samples and all(a.shape == samples[0].shape for a in samples):
        return TensorListCPU(np.stack(samples), layout)
    return TensorListCPU([np.array(a) for a in samples], layout)
