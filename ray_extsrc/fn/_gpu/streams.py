"""The CUDA streams the loader creates: one helper, `loader_stream`, so they all share one policy.

* Non-blocking: they never synchronize with the legacy default stream.
* The lowest priority the device allows: the loader's kernels (decode, resize, normalize) yield
  the GPU's schedulers to the training step's work on default-priority streams.
* Never destroyed: memory freed while a stream is current (CuPy's pool, nvImageCodec's images)
  may be released on it later, from any thread, after its creator is gone; destroying the stream
  first would leave that release ordered on a dead stream. A loader makes a handful of streams
  (one per decode thread, one per pipeline thread), so keeping them costs nothing.

CuPy is imported inside the function: this module is importable without it.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["loader_stream", "lowest_priority"]

_lock = threading.Lock()
#: Every stream `loader_stream` made; never emptied (see the module docstring).
_immortal_streams: list = []


def loader_stream(device_id: int) -> Any:
    """A new non-blocking ``cupy.cuda.Stream`` on ``device_id`` at the device's lowest priority,
    kept alive for the life of the process."""
    import cupy

    with cupy.cuda.Device(device_id):
        priority = lowest_priority()
        try:
            stream = cupy.cuda.Stream(non_blocking=True, priority=priority)
        except TypeError:  # a CuPy without stream priorities: CUDA's default, which is the lowest
            stream = cupy.cuda.Stream(non_blocking=True)
    with _lock:
        _immortal_streams.append(stream)
    return stream


def lowest_priority() -> int:
    """The current device's lowest stream priority: the larger number of
    ``cudaDeviceGetStreamPriorityRange`` (lower numbers are higher priorities), where CuPy's
    runtime module binds it. The CuPy on the GPU machine does not (found by the GPU tests of commit
    57f660b); then this is 0, CUDA's default priority, which is the least of the range
    [greatest, 0] CUDA reports."""
    import cupy

    query = getattr(cupy.cuda.runtime, "deviceGetStreamPriorityRange", None)
    if query is None:
        return 0
    return max(query())
