"""`PinnedStaging`: a consumer-side GPU stage's encoded bytes copied into page-locked host memory.

A `host_batch.HostBatch` reaches the Train worker in Ray's object store: pageable memory, from which
the hardware JPEG decoder's copies to the GPU are staged by the CUDA driver, one sample at a time
(a profile on an H200, 2026-12-02: 256 pageable copies per batch, each ~21 us). With this staging
each `PackedBytes` column is copied once, by NumPy in the stage's thread (the GIL released), into a
reused page-locked buffer, and the decoder's copies become plain DMA. Measured there: the stage
alone ~15% faster, the training step it feeds not faster (ResNet-50 0.89x of synthetic with it,
0.886x without; ResNet-18 0.63x vs 0.72x, one Train run each), so `ConsumerStage` leaves it off
unless asked (``RAY_EXTSRC_PIN_HOST_BYTES=1``).

A buffer is reused only once the GPU has passed the event recorded after the batch that read
it (`PinnedStaging.release`); the host never waits for that, except when `MAX_BUFFERS` are all
in flight. CuPy is imported lazily; this module loads anywhere.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np

from .host_batch import HostBatch, PackedBytes

__all__ = ["PinnedStaging"]

#: Page-locked buffers kept at most (each about one batch of encoded bytes): past that, a new
#: batch waits for the oldest one's event instead of locking more memory.
MAX_BUFFERS = 12
_ROUND = 1 << 20


class _Buffer:
    __slots__ = ("mem", "array", "event", "busy")

    def __init__(self, nbytes: int) -> None:
        import cupy

        nbytes = -(-int(nbytes * 1.25) // _ROUND) * _ROUND  # room to grow, in whole MiB
        self.mem = cupy.cuda.alloc_pinned_memory(nbytes)
        self.array = np.frombuffer(self.mem, np.uint8, nbytes)
        self.event: Any = None  # the GPU passes it once the batch that read this buffer is done
        self.busy = True  # handed out (by `PinnedStaging._acquire`) and not yet released

    def free(self) -> bool:
        return self.event is None or self.event.done


class PinnedStaging:
    """Copies a batch's packed bytes into page-locked buffers (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffers: list[_Buffer] = []

    def stage(self, batch: HostBatch) -> tuple[HostBatch, list[_Buffer]]:
        """``batch`` with every `PackedBytes` column read from page-locked memory, and the buffers
        it uses (give them to `release`). A batch without packed bytes comes back as it is."""
        held: list[_Buffer] = []
        columns: dict[int, dict[int, Any]] = {}
        for op_id, outs in batch.columns.items():
            columns[op_id] = dict(outs)
            for k, col in outs.items():
                if isinstance(col, PackedBytes) and col.data.nbytes:
                    buf = self._acquire(col.data.nbytes)
                    held.append(buf)
                    dst = buf.array[: col.data.nbytes]
                    np.copyto(dst, col.data)  # NumPy releases the GIL for a large copy
                    columns[op_id][k] = PackedBytes(dst, col.offsets)
        if not held:
            return batch, held
        return dataclasses.replace(batch, columns=columns), held

    def release(self, held: list[_Buffer], event: Any) -> None:
        """The batch that read ``held`` is queued; ``event`` (None: nothing on the GPU reads them any
        more) follows the last GPU work that reads them."""
        with self._lock:
            for buf in held:
                buf.event = event
                buf.busy = False

    def _acquire(self, nbytes: int) -> _Buffer:
        with self._lock:
            idle = [b for b in self._buffers if not b.busy]
            fits = [b for b in idle if b.array.nbytes >= nbytes and b.free()]
            if fits:
                buf = min(fits, key=lambda b: b.array.nbytes)
            elif len(self._buffers) < MAX_BUFFERS or not idle:
                buf = _Buffer(nbytes)
                self._buffers.append(buf)
            else:  # all kept buffers are in flight or too small: reuse the oldest idle one
                old = idle[0]
                self._buffers.remove(old)
                if old.event is not None:
                    old.event.synchronize()
                buf = old if old.array.nbytes >= nbytes else _Buffer(nbytes)
                buf.event = None
                self._buffers.append(buf)
            buf.busy = True
            return buf

    def close(self) -> None:
        with self._lock:
            for buf in self._buffers:
                if buf.event is not None:
                    buf.event.synchronize()
            self._buffers.clear()
