"""The parallel part of the external source: a pool of Python worker processes.

Modules, one noun each (the protocol can be followed across the fork):

* `messages` — every message that crosses a process boundary, in one place.
* `shm` — shared-memory segments (memfds, or private /dev/shm files as the fallback; growable),
  the sample layout in them, and the cleanup of a dead process's /dev/shm files (`unlink_segments`).
* `capacity` — what a pool needs in shared memory, what there is, and the "shared memory
  exhausted" message.
* `worker` — the child-side loop: runs the source (and the worker-side CPU ops) per task.
* `zygote` — a small pre-CUDA process that forks (and re-forks) the workers on request.
* `pool` — the parent side: starts the zygote, dispatches tasks, collects results in order,
  replaces dead workers and replays their tasks.

Nothing here imports CuPy, torch or Ray: it all ends up in every forked child.
"""

from .pool import WorkerPool, cuda_initialized

__all__ = ["WorkerPool", "cuda_initialized"]
