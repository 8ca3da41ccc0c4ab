"""`ConsumerStage`: a Loader's GPU stage run inside the Train worker's own process.

Processes that share a GPU without MPS take turns on it: a training step fed by loader actors that
decode on the same GPU waits while they run (ResNet-50 on an H200: 0.81x its synthetic-data speed).
So, for a Train worker that holds a GPU (``Loader(gpu_stage="consumer")``, the default there), the
loader actors stop after the host stage — the source, the forked workers, shared memory, per-sample
random parameters — and send a `host_batch.HostBatch` (encoded bytes and parameters); this module
runs the pipeline's main-stage ops (nvImageCodec decode, the CuPy kernels) in background threads of
the Train worker, on the pipeline's own non-blocking streams, in the CUDA context the step already
has. One context per GPU: no loader process holds GPU memory.

Ordering and memory, without blocking either side: the consumer's torch stream waits on the event
recorded after the batch's last kernel when the consumer takes the batch (not earlier: the legacy
default stream is shared by all threads), and each GPU output is copied on that stream into a
tensor of torch's allocator (`gpu_handoff` says why a zero-copy hand-over is unsafe here).

The pipeline object here is the same ``@pipeline_def`` function called with the actor's arguments,
planned but never started (`Pipeline.open_device_stage`): its main-stage ops rebuild every random
decision from the batch's `SampleInfo`s and the seed, as the actor would have. CuPy and torch are
imported lazily.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from . import host_ring
from .gpu_handoff import GpuHandoff
from .host_batch import HostBatch
from .pinned_staging import PinnedStaging
from .pipeline import Pipeline
from .tensors import TensorListCPU, TensorListGPU

if TYPE_CHECKING:
    import torch

__all__ = ["ConsumerStage", "stage_threads"]

_REFETCHES = 3  # times a batch whose actor died before it was mapped is asked for again


@dataclasses.dataclass
class _Job:
    """One batch for the stage: how to fetch it (and again), and whether it is still wanted."""

    fetch: Callable[[], Any]
    refetch: Callable[[], Any] | None
    discarded: bool = False


def stage_threads(gpu: bool) -> int:
    """Batches the stage runs at once: ``RAY_EXTSRC_CONSUMER_THREADS``, else 2 on a GPU, 1 on the CPU."""
    raw = os.environ.get("RAY_EXTSRC_CONSUMER_THREADS", "")
    if not raw:
        return 2 if gpu else 1
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"RAY_EXTSRC_CONSUMER_THREADS={raw!r}: expected an integer >= 1 (batches run through "
                         "the consumer-side GPU stage at once); unset it for the default, 2 on a GPU")
    return n


class ConsumerStage:
    """Runs host batches through the pipeline's main-stage ops in this process (see the module docstring)."""

    def __init__(self, pipeline_fn: Callable[..., Any], pipeline_kwargs: Mapping[str, Any], device: torch.device,
                 label: str = "loader", *, pin_host_bytes: bool | None = None, threads: int | None = None) -> None:
        self.device = device
        self.label = label
        self._gpu = device.type == "cuda"
        kwargs = dict(pipeline_kwargs)
        kwargs["device_id"] = (device.index or 0) if self._gpu else None
        self.pipe: Pipeline | None = None  # once `_build` is done
        self.warm_up: list = []
        # Built in a thread of its own: on a GPU that is CuPy's and nvImageCodec's imports, the
        # pipeline's streams and the decoders, 1.16 s in the consumer's thread on an H100 (T1,
        # 2026-12-07), which a Train worker that makes the feed before its model (as the Loader's
        # docs say) spent before building the model. Now the consumer's thread goes on; a batch
        # waits for the build, and a build error is raised by every batch.
        builder = ThreadPoolExecutor(1, thread_name_prefix="ray_extsrc-consumer-stage-build")
        self._built = builder.submit(self._build, pipeline_fn, kwargs)
        builder.shutdown(wait=False)
        # Two batches at once on a GPU: one's nvImageCodec call (blocking, in its own thread)
        # overlaps the other's gathering and kernel launches (RAY_EXTSRC_CONSUMER_THREADS: another count)
        self.threads = stage_threads(self._gpu) if threads is None else threads
        self._threads = ThreadPoolExecutor(self.threads, thread_name_prefix="ray_extsrc-consumer-stage")
        self._handoff = GpuHandoff()
        # encoded bytes copied into page-locked memory before the GPU decode (`pinned_staging`)
        # (None: RAY_EXTSRC_PIN_HOST_BYTES=1 turns it on; off by default until a training A/B says so)
        if pin_host_bytes is None:
            pin_host_bytes = os.environ.get("RAY_EXTSRC_PIN_HOST_BYTES", "0") == "1"
        self._pinned = PinnedStaging() if self._gpu and pin_host_bytes else None
        self.last_fetch_s = 0.0  # the last batch's wait in fetch() (ray.get of the host batch)
        #: wall-clock times (time.time()) of the first host batch mapped here and of the first
        #: batch through the GPU stage (start-up milestones, `LoaderIterator.startup_report`)
        self.firsts: dict[str, float] = {}

    def _build(self, pipeline_fn: Callable[..., Any], kwargs: dict[str, Any]) -> Pipeline:
        # the whole build on this worker's GPU: a thread's CUDA device is its own (0 unless set),
        # and the caller's thread had the worker's set (Ray Train's `torch.cuda.set_device`)
        with self._on_device():
            pipe = pipeline_fn(**kwargs)
            if not isinstance(pipe, Pipeline):
                raise TypeError(f"{self.label}: the Loader's pipeline function must return a Pipeline; "
                                f"got {type(pipe).__name__}")
            pipe.open_device_stage()
            # the decoders, made now in their threads: the first host batch comes only once the
            # loader actors have started (~1.7 s), and making them took ~3 s after it (H200)
            self.warm_up = pipe.warm_up_device() if self._gpu else []
        self.pipe = pipe
        return pipe

    def on_built(self, fn: Callable[[], Any]) -> None:
        """Call ``fn()`` once the build is done (now, if it is), whether it worked or not."""
        self._built.add_done_callback(lambda _f: fn())

    def built(self, timeout: float | None = None) -> Pipeline:
        """The stage's pipeline, once built (waits up to ``timeout`` s); raises what building it raised."""
        return self._built.result(timeout)

    def submit(self, fetch: Callable[[], Any], refetch: Callable[[], Any] | None = None) -> Future:
        """Start a batch: ``fetch()`` (run in the stage's thread) returns the actor's `BatchReply`;
        the future gives ``(reply, outputs)`` (outputs ``None`` at the end of the epoch).
        ``refetch()`` asks for the same batch again, for a batch whose actor died before its bytes
        were mapped (`host_ring.HostRingLost`)."""
        job = _Job(fetch, refetch)
        fut = self._threads.submit(self._run, job)
        fut.job = job  # type: ignore[attr-defined]
        return fut

    def discard(self, futures: Any) -> None:
        """Give up batches nobody will take. Each is still fetched in the stage's threads, but not
        decoded, so that its actor gets its shared-memory slot back (`host_ring.discard`)."""
        for fut in futures:
            fut.job.discarded = True

    def _on_device(self) -> Any:
        """This worker's GPU as CuPy's current device (this thread), or nothing on a CPU worker."""
        if not self._gpu:
            return contextlib.nullcontext()
        import cupy

        return cupy.cuda.Device(self.device.index or 0)

    def _run(self, job: _Job) -> tuple[Any, tuple | None]:
        t0 = time.perf_counter()
        reply = job.fetch()
        for attempt in range(_REFETCHES + 1):
            if reply.end:
                break
            batch = reply.outputs[0]
            if not isinstance(batch, HostBatch):
                raise TypeError(f"{self.label}: the loader actor sent outputs, not a HostBatch; its gpu_stage differs")
            if job.discarded:
                host_ring.discard(batch)
                return reply, None
            try:
                batch = host_ring.attach(batch, self.label)
                break
            except host_ring.HostRingLost:
                if job.refetch is None or attempt == _REFETCHES:
                    raise
                reply = job.refetch()  # the restarted actor serves the same position again
        self.last_fetch_s = time.perf_counter() - t0
        if reply.end:
            return reply, None
        self.firsts.setdefault("host_batch", time.time())
        pipe = self.built()  # (the first batches' fetches ran beside the build)
        skipped: list = []
        with self._on_device():
            outputs = self._run_device(pipe, batch, skipped)
        self.firsts.setdefault("decoded", time.time())
        if skipped:  # decode failures replaced here (on_error="skip"), reported with the actor's
            reply = dataclasses.replace(reply, skipped=reply.skipped + tuple(e.to_dict() for e in skipped))
        return reply, outputs

    def _run_device(self, pipe: Pipeline, batch: HostBatch, skipped: list) -> tuple:
        if self._pinned is None:
            return pipe.run_device(batch, order_consumer=False, skipped=skipped)
        staged, held = self._pinned.stage(batch)
        try:
            outputs = pipe.run_device(staged, order_consumer=False, skipped=skipped)
        except BaseException:
            if held:  # the GPU may still read the buffers: wait for it before they are reused
                import cupy

                cupy.cuda.Device().synchronize()
            self._pinned.release(held, None)
            raise
        # the event after the batch's last kernel follows every GPU read of the buffers (the
        # pipeline's stream waits on the decode calls' events); no GPU output: nothing reads them
        events = [x.ready_event for x in outputs if isinstance(x, TensorListGPU) and x.ready_event is not None]
        self._pinned.release(held, events[0] if events else None)
        return outputs

    @property
    def last_main_ops_s(self) -> float:
        return self.pipe.last_timings.get("main_ops_s", 0.0) if self.pipe is not None else 0.0

    def decode_stats(self) -> dict[str, float]:
        """This process's GPU decode timings (`fn._gpu.decode.stats_snapshot`): cumulative host
        seconds by stage and the batch count; empty on a CPU worker."""
        if not self._gpu:
            return {}
        from .fn._gpu import decode

        return decode.stats_snapshot()

    def to_torch(self, outputs: tuple) -> tuple[Any, ...]:
        """The batch's outputs as torch tensors on this worker's device: GPU outputs copied on the
        current torch stream after the batch's kernels (`gpu_handoff`), host outputs through pinned
        memory. Call in the consumer's thread; the host does not wait."""
        from .transport import host_to_torch

        out: list[Any] = []
        for x in outputs:
            if isinstance(x, TensorListGPU):
                out.append(self._handoff.to_torch(x))
            else:
                assert isinstance(x, TensorListCPU)
                if x.is_dense_tensor():
                    out.append(host_to_torch(x.as_array(), self.device))
                else:
                    out.append([host_to_torch(np.asarray(a), self.device) for a in x])
        return tuple(out)

    def close(self) -> None:
        self._threads.shutdown(wait=True, cancel_futures=True)
        if self._pinned is not None:
            self._pinned.close()
        try:
            pipe = self.built()  # a build still running is let finish, then closed
        except BaseException:  # noqa: BLE001 - it failed: nothing to close (the batches raised it)
            return
        pipe.close()
