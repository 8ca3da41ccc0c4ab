"""Handing a batch from a loader actor to its Ray Train worker: host memory, or the same GPU.

Two paths, chosen per output by the actor side (`encode_outputs`) and undone by the consumer side
(`decode_outputs`):

* **host** — the output as a NumPy array (or a list of per-sample arrays when shapes differ) travels
  through Ray's object store. The consumer wraps the object-store buffer with ``torch.from_numpy``
  (no copy) and, when it has a GPU, copies it there with ``.to(device)``.
* **cuda_ipc** — the actor and the consumer share one GPU and the output is a dense CuPy array. The
  actor copies it into a buffer of a small pool of reused device buffers (`IpcExporter`) and sends
  only the buffer's CUDA IPC handle; the consumer opens each buffer once (`IpcImporter`, cached)
  and wraps it as a torch tensor through DLPack. Nothing crosses the PCIe bus or the object store.

NOTE [IPC buffer lifetime]
A buffer is *leased* to the consumer with the batch it carries. The consumer gives the lease back
when it asks for the batch after next (the lease ids ride on that request), or all at once when an
epoch ends or the iteration stops (`IpcExporter.release_all`); before giving a lease back it waits
for its own CUDA stream, so no kernel of the training step still reads the buffer when the actor
overwrites it. Hence, like DALI's iterators, a batch's tensors are valid until the next batch is
requested; ``clone()`` what must live longer. When the actor process dies its buffers die with it:
the consumer notices the new actor pid on the next batch and closes the handles it had opened.

Every message crossing the actor/consumer boundary for a batch is declared here (`IpcBuffer`) or in
`actor` (`BatchReply`). CuPy and torch are imported lazily: this module loads on CPU-only installs.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .tensors import TensorListCPU, TensorListGPU

if TYPE_CHECKING:
    import torch

__all__ = [
    "IpcBuffer",
    "IpcExporter",
    "IpcImporter",
    "encode_outputs",
    "decode_outputs",
    "host_to_torch",
]

_NOT_WRITABLE = "The given NumPy array is not writable"


@dataclass(frozen=True, slots=True)
class IpcBuffer:
    """One output of one batch, left on the GPU: where it lies and how to read it."""

    owner_pid: int  # the process that allocated the buffer (the loader actor)
    buffer_id: int  # stable per buffer of that process: the consumer opens each one once
    handle: bytes  # cudaIpcMemHandle_t of the buffer's base allocation
    capacity: int  # bytes allocated (>= the output's size)
    shape: tuple[int, ...]
    dtype: str


# -- actor side ---------------------------------------------------------------------------------------


class _DeviceBuffer:
    def __init__(self, buffer_id: int, nbytes: int) -> None:
        import cupy

        # cupy.cuda.Memory is a plain cudaMalloc: the pointer is the base of its own allocation,
        # which is what cudaIpcGetMemHandle needs (a memory-pool sub-allocation is not).
        self.mem = cupy.cuda.Memory(nbytes)
        self.buffer_id = buffer_id
        self.capacity = nbytes
        self.handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(self.mem.ptr))

    def view(self, shape: tuple[int, ...], dtype: Any) -> Any:
        import cupy

        return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(self.mem, 0))


class IpcExporter:
    """Actor side of the same-GPU path: a pool of reused device buffers, leased per batch.

    Consumer side: `IpcImporter`. See NOTE [IPC buffer lifetime].
    """

    def __init__(self, owner_pid: int) -> None:
        self.owner_pid = owner_pid
        self._free: list[_DeviceBuffer] = []
        self._leases: dict[int, list[_DeviceBuffer]] = {}
        self._next_buffer = 0
        self._next_lease = 0

    @property
    def num_buffers(self) -> int:
        return len(self._free) + sum(len(b) for b in self._leases.values())

    def _take(self, nbytes: int) -> _DeviceBuffer:
        fitting = [b for b in self._free if b.capacity >= nbytes]
        if fitting:
            buf = min(fitting, key=lambda b: b.capacity)
            self._free.remove(buf)
            return buf
        self._next_buffer += 1
        return _DeviceBuffer(self._next_buffer, max(nbytes, 512))

    def export(self, arrays: Sequence[Any]) -> tuple[int, list[IpcBuffer]]:
        """Copy each CuPy array into a pooled buffer; return the lease id and the buffers' refs."""
        import cupy

        bufs, refs = [], []
        for a in arrays:
            buf = self._take(a.nbytes)
            cupy.copyto(buf.view(a.shape, a.dtype), a)
            bufs.append(buf)
            refs.append(IpcBuffer(self.owner_pid, buf.buffer_id, buf.handle, buf.capacity, tuple(a.shape), a.dtype.str))
        # The copies run on the current stream, which the pipeline ordered after its own stream
        # (executor.gpu_stage.assemble). Wait for the whole device anyway — the pipeline's work and the
        # copies — so the consumer, in another process, never reads a buffer before its data is there.
        cupy.cuda.Device().synchronize()
        self._next_lease += 1
        self._leases[self._next_lease] = bufs
        return self._next_lease, refs

    def release(self, leases: Sequence[int]) -> None:
        for lease in leases:
            self._free.extend(self._leases.pop(lease, ()))

    def release_all(self) -> None:
        self.release(list(self._leases))

    def close(self) -> None:
        self._free.clear()
        self._leases.clear()


def encode_outputs(
    outputs: Sequence[TensorListCPU | TensorListGPU], exporter: IpcExporter | None
) -> tuple[tuple[Any, ...], int | None]:
    """Actor side: each output as a host array (list, if ragged) or an `IpcBuffer`; and the lease.

    With an ``exporter`` (the consumer shares this GPU), dense GPU outputs stay on the GPU; every
    other output goes to host memory.
    """
    payload: list[Any] = [None] * len(outputs)
    on_gpu: list[int] = []
    for k, out in enumerate(outputs):
        if isinstance(out, TensorListGPU):
            if exporter is not None and out.is_dense:
                on_gpu.append(k)
                continue
            out = out.as_cpu()
        payload[k] = out.as_array() if out.is_dense_tensor() else [np.asarray(a) for a in out]
    lease = None
    if on_gpu:
        lease, refs = exporter.export([outputs[k].as_array() for k in on_gpu])
        for k, ref in zip(on_gpu, refs):
            payload[k] = ref
    return tuple(payload), lease


# -- consumer side ------------------------------------------------------------------------------------


def host_to_torch(x: np.ndarray, device: torch.device | None = None) -> torch.Tensor:
    """A NumPy array (possibly a read-only view of Ray's object store) as a torch tensor on ``device``.

    On the CPU the tensor shares the array's memory (the object-store buffer, which only this
    consumer holds, so in-place ops are harmless); torch's warning about wrapping a read-only array
    is expected here and silenced. To a GPU the array goes through pinned memory with a
    non-blocking copy on the current stream: a copy from pageable memory would make the host wait
    for every kernel queued before it (the whole training step in flight), which costs the step
    its CPU lead on the GPU each batch. torch's pinned-memory cache keeps the staging buffer until
    the copy is done.
    """
    import torch

    if x.flags.writeable:
        t = torch.from_numpy(x)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NOT_WRITABLE, category=UserWarning)
            t = torch.from_numpy(x)
    if device is not None and device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    elif device is not None and device.type != "cpu":
        t = t.to(device)
    return t


class IpcImporter:
    """Consumer side of the same-GPU path: opens each exported buffer once, wraps it for torch.

    Actor side: `IpcExporter`. See NOTE [IPC buffer lifetime].
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._opened: dict[tuple[int, int], tuple[int, Any]] = {}  # (pid, buffer id) -> (ptr, mem)

    @property
    def num_open(self) -> int:
        return len(self._opened)

    def _memory(self, ref: IpcBuffer) -> Any:
        import cupy

        key = (ref.owner_pid, ref.buffer_id)
        if key not in self._opened:
            stale = [k for k in self._opened if k[0] != ref.owner_pid]
            if stale:  # the actor was restarted: its old buffers are gone with its process
                self._close(stale)
            with cupy.cuda.Device(self.device.index or 0):
                ptr = cupy.cuda.runtime.ipcOpenMemHandle(ref.handle, cupy.cuda.runtime.cudaIpcMemLazyEnablePeerAccess)
            mem = cupy.cuda.UnownedMemory(ptr, ref.capacity, self, device_id=self.device.index or 0)
            self._opened[key] = (ptr, mem)
        return self._opened[key][1]

    def to_torch(self, ref: IpcBuffer) -> torch.Tensor:
        import cupy
        import torch

        mem = self._memory(ref)
        with cupy.cuda.Device(self.device.index or 0):
            arr = cupy.ndarray(ref.shape, np.dtype(ref.dtype), cupy.cuda.MemoryPointer(mem, 0))
            return torch.from_dlpack(arr)

    def done_with_batch(self) -> None:
        """Wait until the work queued on this device's current torch stream (the training step
        that read the batch) is finished, so its buffers may be given back."""
        import torch

        torch.cuda.current_stream(self.device).synchronize()

    def _close(self, keys: Sequence[tuple[int, int]]) -> None:
        import cupy

        for key in keys:
            ptr, _ = self._opened.pop(key)
            try:
                with cupy.cuda.Device(self.device.index or 0):
                    cupy.cuda.runtime.ipcCloseMemHandle(ptr)
            except cupy.cuda.runtime.CUDARuntimeError:
                pass  # the exporting process is gone; nothing is left to unmap

    def close(self) -> None:
        if self._opened:
            self._close(list(self._opened))


def decode_outputs(
    payload: Sequence[Any], device: torch.device, importer: IpcImporter | None
) -> tuple[Any, ...]:
    """Consumer side of `encode_outputs`: torch tensors (a list of them for a ragged output)."""
    out: list[Any] = []
    for x in payload:
        if isinstance(x, IpcBuffer):
            if importer is None:
                raise RuntimeError(
                    "the loader actor sent a CUDA IPC buffer to a consumer without a GPU; this is a "
                    "bug in ray_extsrc (the actor only exports when its consumer shares its GPU)"
                )
            out.append(importer.to_torch(x))
        elif isinstance(x, list):
            out.append([host_to_torch(a, device) for a in x])
        else:
            out.append(host_to_torch(x, device))
    return tuple(out)
