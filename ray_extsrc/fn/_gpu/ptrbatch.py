"""A batch of GPU images described by a pointer table, with no per-sample Python objects.

The decoders' fast path returns one: decoded images stay where nvImageCodec put them, and a crop is
just a moved pointer with the full image's row pitch. The batch kernels (`kernels.hwc_table`)
read the table directly; any other consumer gets CuPy views through `to_list()`.

Imports nothing heavy: `_gpu_exec` and the ops check ``isinstance(x, PtrBatch)`` cheaply.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Name under which a GPU op finds the output of its worker-side ``worker_prep`` step.
PREP_ARG = "__prep__"


class Held(list):
    """A batch's owners of decoded memory (nvImageCodec images, fallback arrays). ``escaped`` is set
    once a view of the memory left the batch kernels (`PtrBatch.to_list`): such memory may still be
    read after the batch, so its images are never given back for reuse (`decode._ImagePool`)."""

    escaped = False


class PtrBatch:
    """``ptrs[j]`` (device address of row 0, column 0), ``dims[j] = (h, w, row pitch in bytes)``,
    uint8 HWC with ``channels`` channels; ``owners`` keep the memory alive."""

    def __init__(self, ptrs: np.ndarray, dims: np.ndarray, channels: int, owners: list) -> None:
        self.ptrs = np.ascontiguousarray(ptrs, dtype=np.uint64)
        self.dims = np.ascontiguousarray(dims, dtype=np.int32).reshape(-1, 3)
        self.channels = channels
        self.owners = owners

    def __len__(self) -> int:
        return len(self.ptrs)

    def to_list(self) -> list:
        if isinstance(self.owners, Held):
            self.owners.escaped = True  # the views below outlive the batch: no reuse of this memory
        import cupy

        out = []
        c = self.channels
        for ptr, (h, w, pitch) in zip(self.ptrs.tolist(), self.dims.tolist()):
            size = (h - 1) * pitch + w * c if h and w else 0
            mem = cupy.cuda.UnownedMemory(ptr, size, self)
            out.append(cupy.ndarray((h, w, c), np.uint8, cupy.cuda.MemoryPointer(mem, 0), strides=(pitch, c, 1)))
        return out

    def __iter__(self):
        return iter(self.to_list())

    def __getitem__(self, j: int) -> Any:
        return self.to_list()[j]
