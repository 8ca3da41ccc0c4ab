"""Exceptions raised by ray_extsrc.

    RayExtSrcError
     ├── SampleError          producing a sample failed; names idx_in_epoch, worker id/pid, traceback
     │    ├── SourceError     ... because the user's source raised
     │    ├── DecodeError     ... because its encoded data could not be decoded (also a ValueError)
     │    └── SharedMemoryError ... because the shared memory carrying it ran out (/dev/shm full)
     ├── WorkerDiedError      a worker died and could not be replaced / replayed
     ├── ForkAfterCUDAError   fork-mode workers were asked for after CUDA was initialised
     └── LifecycleError       a pipeline step was called in the wrong state (also a RuntimeError)
"""

from __future__ import annotations

__all__ = [
    "RayExtSrcError",
    "SampleError",
    "SourceError",
    "WorkerDiedError",
    "DecodeError",
    "SharedMemoryError",
    "ForkAfterCUDAError",
    "LifecycleError",
]


class RayExtSrcError(Exception):
    """Base of every error ray_extsrc raises on purpose."""


class SampleError(RayExtSrcError):
    """Producing a sample failed (in a worker or in the pipeline's own process).

    ``idx_in_epoch``/``iteration``/``epoch_idx`` say for which sample, ``worker_id``/``pid`` where,
    and ``remote_traceback`` holds the original traceback as text.
    """

    def __init__(
        self,
        message: str,
        *,
        idx_in_epoch: int | None = None,
        iteration: int | None = None,
        epoch_idx: int | None = None,
        worker_id: int | None = None,
        pid: int | None = None,
        remote_traceback: str = "",
    ) -> None:
        super().__init__(message)
        self.idx_in_epoch = idx_in_epoch
        self.iteration = iteration
        self.epoch_idx = epoch_idx
        self.worker_id = worker_id
        self.pid = pid
        self.remote_traceback = remote_traceback

    def __reduce__(self):  # keep the fields when the error crosses a process boundary (Ray)
        return (_rebuild_sample_error, (type(self), str(self), self.__dict__))


def _rebuild_sample_error(cls: type, message: str, fields: dict) -> SampleError:
    err = cls(message)
    err.__dict__.update(fields)
    return err


class SourceError(SampleError):
    """The user's source callable raised an exception."""


class WorkerDiedError(RayExtSrcError):
    """A Python worker process died in a way that cannot be recovered by replaying its samples."""


class DecodeError(SampleError, ValueError):
    """Encoded data for a sample could not be decoded (corrupt, truncated or unsupported)."""


class SharedMemoryError(SampleError):
    """The shared memory that carries samples from the Python workers ran out (no room left in
    /dev/shm, or a worker killed by SIGBUS writing it). Not the source's fault: the message says how
    big /dev/shm is, what the pool needs, and how to give it room."""


class ForkAfterCUDAError(RayExtSrcError, RuntimeError):
    """Workers would be forked from a process whose CUDA driver is already initialised."""


class LifecycleError(RayExtSrcError, RuntimeError):
    """A pipeline method was called in a state that does not allow it."""
