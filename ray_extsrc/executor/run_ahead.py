"""`RunAhead`: a pipeline's batches, start to finish, computed ahead of the consumer.

One batch is the host stage (`host_stage.HostStage`: the workers' share, the in-process sources)
then, unless the pipeline stops after the host stage (``main is None``: it returns a
`HostBatch`), the main stage (`main_stage.MainStage`). With the plan's ``run_ahead`` (DALI's
``exec_async``/``exec_pipelined``) the batches after the one asked for are computed in background
threads, ``plan.ahead_depth`` at once, so batch i+1's decode and augmentation overlap the
consumer's work on batch i; results come back in order. Without it a batch is computed in the
caller's thread when asked for.

Each batch started ahead carries a *fence* taken in the consumer's thread when it was started
(`gpu_stage.consumer_fence`: a marker after the GPU work the consumer queued so far), which its
GPU work waits for before reusing memory the earlier batches had.

`move` (a new epoch, a skip) first lets every batch in flight finish and drops its result: the
worker pool must not be touched while one runs.
"""

from __future__ import annotations

import collections
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import SourceError
from ..plan import Plan
from ..sample_errors import SkippedSample
from ..types import SampleInfo
from .host_stage import Env, HostStage
from .main_stage import MainStage
from .positions import Positions
from .substitutes import SKIPPABLE, Substitutes

__all__ = ["RunAhead", "EndOfEpoch"]


class EndOfEpoch(Exception):
    """StopIteration, carried through a Future (which must not raise StopIteration itself)."""


class RunAhead:
    """The batches of one built pipeline, in order (see the module docstring)."""

    def __init__(self, plan: Plan, host: HostStage, main: MainStage | None, substitutes: Substitutes) -> None:
        self._plan = plan
        self._host = host
        self._main = main  # None: the pipeline stops after the host stage
        self._subs = substitutes  # on_error="skip" (`substitutes`), or raise as it is
        self._ahead: collections.deque = collections.deque()  # (local iteration, Future), in order
        self._threads: ThreadPoolExecutor | None = None
        if plan.run_ahead:
            self._threads = ThreadPoolExecutor(plan.ahead_depth, thread_name_prefix="ray_extsrc-ahead")

    def move(self, positions: Positions, iteration: int) -> None:
        """Serve ``positions`` from local ``iteration`` on (after the batches in flight finish)."""
        self.drain()
        self._host.move(positions, iteration)

    def run(self, i: int) -> tuple[tuple, dict[str, float], list[SkippedSample]]:
        """Batch i's outputs, its seconds by stage and the samples it skipped (``on_error="skip"``);
        raises `EndOfEpoch` past the epoch's end."""
        if self._threads is None:
            return self._compute(i, None)
        self._fill(i)
        _, fut = self._ahead.popleft()
        result = fut.result()
        self._fill(i + 1)  # start the next batches now, overlapping the consumer
        return result

    def _fill(self, start: int) -> None:
        """Have batches ``start .. start + depth - 1`` (within the epoch) computing ahead."""
        nxt = self._ahead[-1][0] + 1 if self._ahead else start
        length = self._host.positions.epoch_length
        while len(self._ahead) < self._plan.ahead_depth and (length is None or nxt < length or not self._ahead):
            fence = _consumer_fence(self._plan) if self._main is not None else None
            self._ahead.append((nxt, self._threads.submit(self._compute, nxt, fence)))
            nxt += 1

    def _compute(self, i: int, fence: Any) -> tuple[tuple, dict[str, float], list[SkippedSample]]:
        """Batch i of the epoch, start to finish (in the caller's or an ahead thread)."""
        at = self._host.positions
        if at.epoch_length is not None and i >= at.epoch_length:
            raise EndOfEpoch
        t0 = time.perf_counter()
        compute_s = 0.0
        skipped: list[SkippedSample] = []
        try:
            env, infos, compute_s = self._host_stage(at, i, skipped)
            t1 = time.perf_counter()
            if self._main is None:
                outputs: tuple = (self._host.pack(i, env, infos),)
            else:
                if fence is not None:
                    self._main.wait_fence(fence)
                outputs = self._main_stage(at, i, infos, env, skipped)
        except StopIteration:
            if at.layout.pads and at.num_samples is not None:
                raise _stopped_inside_epoch(at, i) from None
            raise EndOfEpoch from None
        finally:
            self._host.release(i)
        t2 = time.perf_counter()
        timings = {
            "worker_wait_s": t1 - t0,  # waiting for the workers' share of this batch
            "worker_compute_s": compute_s,
            "main_ops_s": t2 - t1,  # main-stage ops (GPU decode/augment) and assembling outputs
        }
        return outputs, timings, skipped

    def _host_stage(self, at: Positions, i: int, skipped: list) -> tuple[Env, tuple[SampleInfo, ...], float]:
        """Batch i's host stage: the workers' share, then the in-process sources. Under
        ``on_error="skip"`` a sample that fails there is replaced by another of the shard and the
        host stage runs again for the new SampleInfos (`Substitutes.for_host`)."""
        infos = at.sample_infos(i)
        tried: dict[int, int] = {}
        again = False
        while True:
            try:
                env, compute_s = self._host.collect(i, infos if again else None)
                self._host.run_sources(i, env, infos, name_failures=self._subs.enabled)
                return env, infos, compute_s
            except SKIPPABLE as e:
                self._host.release(i)
                infos, entries = self._subs.for_host(e, at, i, infos, tried)  # raises e if not skipped
                skipped.extend(entries)
                again = True

    def _main_stage(self, at: Positions, i: int, infos: tuple, env: Env, skipped: list) -> tuple:
        """Batch i's main stage. Under ``on_error="skip"`` a sample that fails here (a decoder) is
        replaced by a copy of another sample of the batch and the stage runs again
        (`Substitutes.for_main`, the same choice a consumer-side GPU stage makes)."""
        if not self._subs.enabled:
            return self._main.run(infos, env, epoch_idx=at.epoch_idx)
        return self._subs.run_main(lambda inf, e: self._main.run(inf, e, epoch_idx=at.epoch_idx),
                                   infos, env, at, i, skipped)

    def drain(self) -> None:
        """Let a batch computed ahead finish (its result is dropped) before the pool is touched."""
        while self._ahead:
            _, fut = self._ahead.popleft()
            try:
                fut.result()
            except BaseException:  # noqa: BLE001 - its error belongs to a batch nobody will ask for
                pass

    def close(self) -> None:
        """Finish the batches in flight and stop the threads. Idempotent."""
        self.drain()
        if self._threads is not None:
            self._threads.shutdown(wait=True)
            self._threads = None


def _consumer_fence(plan: Plan) -> Any:
    """The consumer's fence for a batch started now, when the main stage has GPU ops. Never asked
    for by a pipeline that stops after the host stage: a loader actor feeding a consumer-side GPU
    stage must not touch CUDA (a fence would make it a CUDA context of its own on the GPU)."""
    if not plan.gpu_main:
        return None
    from .gpu_stage import consumer_fence

    return consumer_fence()


def _stopped_inside_epoch(at: Positions, i: int) -> SourceError:
    """A source that ended the epoch before its ``__len__`` under a padding policy: the shards
    agreed on the epoch's length from ``__len__``, so an early end would leave them unequal."""
    g = at.global_batch(i)
    iterations = sorted({info.iteration for info in at.sample_infos(i)})
    return SourceError(
        f"the source raised StopIteration in global batch {g} (epoch_idx={at.epoch_idx}, its samples' "
        f"SampleInfo.iteration {iterations}), inside the {at.num_samples} samples its __len__ "
        f"declares. Under last_batch_policy={at.layout.last_batch_policy!r} every idx_in_epoch below "
        "__len__ is served, a partial last batch included. Make the source serve all of them (raise "
        "StopIteration on idx_in_epoch >= len, not on iteration >= len // batch_size), make __len__ "
        "return the number it serves, or use last_batch_policy='drop'",
        iteration=g,
        epoch_idx=at.epoch_idx,
    )
