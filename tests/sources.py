"""Sources used by the tests. Module-level, so they pickle for py_start_method='spawn'."""

from __future__ import annotations

import os
import signal
import time

import numpy as np

from ray_extsrc.types import BatchInfo, SampleInfo


class IndexSource:
    """Sample i is (array filled with i of a size that varies with i, [i], [epoch_idx], [pid])."""

    def __init__(self, num_samples: int, batch_size: int, with_len: bool = False) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.full_iterations = num_samples // batch_size
        self.with_len = with_len

    def __call__(self, info: SampleInfo):
        if info.iteration >= self.full_iterations:
            raise StopIteration
        i = info.idx_in_epoch
        return (
            np.full((i % 7 + 1, 3), i, dtype=np.int32),
            np.int64([i]),
            np.int64([info.epoch_idx]),
            np.int64([os.getpid()]),
        )


class SizedIndexSource(IndexSource):
    def __len__(self) -> int:
        return self.num_samples


class FailingSource:
    """Raises ValueError for one sample in epoch 0 only."""

    def __init__(self, bad_idx: int) -> None:
        self.bad_idx = bad_idx

    def __call__(self, info: SampleInfo):
        if info.iteration >= 8:
            raise StopIteration
        if info.idx_in_epoch == self.bad_idx and info.epoch_idx == 0:
            raise ValueError(f"cannot read record {info.idx_in_epoch}")
        return np.int64([info.idx_in_epoch])


class _Unpicklable(Exception):
    def __init__(self) -> None:
        super().__init__("boom")
        self.fn = lambda: None


class UnpicklableErrorSource:
    def __call__(self, info: SampleInfo):
        if info.idx_in_epoch == 3:
            raise _Unpicklable()
        return np.int64([info.idx_in_epoch])


class SuicideSource:
    """kill -9s its own worker at sample ``victim`` the first time (a marker file remembers)."""

    def __init__(self, num_samples: int, batch_size: int, victim: int, marker: str) -> None:
        self.full_iterations = num_samples // batch_size
        self.victim = victim
        self.marker = marker

    def __call__(self, info: SampleInfo):
        if info.iteration >= self.full_iterations:
            raise StopIteration
        if info.idx_in_epoch == self.victim and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return np.int64([info.idx_in_epoch]), np.int64([os.getpid()])


class AlwaysCrashSource:
    def __call__(self, info: SampleInfo):
        if info.idx_in_epoch == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return np.int64([info.idx_in_epoch])


class SlowSource:
    """Uneven per-sample latency, to shuffle completion order across workers."""

    def __init__(self, n: int, bs: int) -> None:
        self.full_iterations = n // bs

    def __call__(self, info: SampleInfo):
        if info.iteration >= self.full_iterations:
            raise StopIteration
        time.sleep(((info.idx_in_epoch * 7919) % 5) * 0.002)
        return np.int64([info.idx_in_epoch])


class BigSampleSource:
    """Samples far larger than bytes_per_sample_hint: the slots must grow."""

    def __call__(self, info: SampleInfo):
        if info.iteration >= 3:
            raise StopIteration
        n = 50_000 * (info.idx_in_epoch + 1)
        return np.full(n, info.idx_in_epoch % 251, dtype=np.uint8)


class BatchSource:
    def __init__(self, batch_size: int, iterations: int) -> None:
        self.batch_size = batch_size
        self.iterations = iterations

    def __call__(self, info):
        it = info.iteration if isinstance(info, BatchInfo) else info
        epoch = info.epoch_idx if isinstance(info, BatchInfo) else -1
        if it >= self.iterations:
            raise StopIteration
        first = it * self.batch_size
        labels = [np.int64([first + j]) for j in range(self.batch_size)]
        epochs = [np.int64([epoch])] * self.batch_size
        return labels, epochs


class BatchIterable:
    """An iterable (re-iterated each epoch) yielding batches of consecutive labels."""

    def __init__(self, batch_size: int, iterations: int) -> None:
        self.batch_size = batch_size
        self.iterations = iterations

    def __iter__(self):
        for it in range(self.iterations):
            yield [np.int64([it * self.batch_size + j]) for j in range(self.batch_size)]


def batch_generator():
    for it in range(3):
        yield [np.int64([it * 2 + j]) for j in range(2)]


class LambdaHolder:
    def __init__(self) -> None:
        self.f = lambda x: x

    def __call__(self, info):
        return np.int64([info.idx_in_epoch])


class WrongDtypeSource:
    def __call__(self, info):
        return np.float64([info.idx_in_epoch])


class CrashInFirstEpochSource:
    """kill -9s every worker that reaches sample ``victim`` in epoch 0 (more than MAX_REPLAYS
    times, so the pool gives up on it); later epochs are healthy."""

    def __init__(self, num_samples: int, batch_size: int, victim: int) -> None:
        self.full_iterations = num_samples // batch_size
        self.victim = victim

    def __call__(self, info: SampleInfo):
        if info.iteration >= self.full_iterations:
            raise StopIteration
        if info.idx_in_epoch == self.victim and info.epoch_idx == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return np.int64([info.idx_in_epoch])


class SuicideIterable:
    """An iterable of ``iterations`` batches of consecutive labels whose worker kill -9s itself at
    batch ``victim`` the first time (a marker file remembers)."""

    def __init__(self, batch_size: int, iterations: int, victim: int, marker: str) -> None:
        self.batch_size = batch_size
        self.iterations = iterations
        self.victim = victim
        self.marker = marker

    def __iter__(self):
        for it in range(self.iterations):
            if it == self.victim and not os.path.exists(self.marker):
                open(self.marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            yield [np.int64([it * self.batch_size + j]) for j in range(self.batch_size)]


class PoolProgram:
    """A small `workers.worker.WorkerProgram` for unit tests of `WorkerPool` (no pipeline).

    Sample ``i`` is ``(array of i % 5 + 1 (or ``big`` bytes) values i, [pid])``. ``stop_at``: the
    epoch ends at that idx_in_epoch (StopIteration); ``fail_at``: ValueError there; ``crash_at``:
    kill -9 there (once, if ``marker`` is given: the marker file remembers; else every time).
    Batches (``kind="batch"``) and the iterable (``kind="iter"``, ``iterations`` batches an epoch)
    yield two samples ``[(10 * iteration + j, epoch_idx)]``; the iterable crashes like samples do, at
    batch ``crash_at``.
    """

    def __init__(self, kind: str = "samples", *, stop_at=None, fail_at=None, crash_at=None,
                 marker=None, big: int = 0, iterations: int = 3) -> None:
        self.kind = kind
        self.stop_at = stop_at
        self.fail_at = fail_at
        self.crash_at = crash_at
        self.marker = marker
        self.big = big
        self.iterations = iterations
        self._it = None

    def _maybe_crash(self, where: int) -> None:
        if where != self.crash_at:
            return
        if self.marker is not None:
            if os.path.exists(self.marker):
                return
            open(self.marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)

    def run_sample(self, info: SampleInfo):
        i = info.idx_in_epoch
        if self.stop_at is not None and i >= self.stop_at:
            raise StopIteration
        if i == self.fail_at:
            raise ValueError(f"bad record {i}")
        self._maybe_crash(i)
        n = self.big if self.big else i % 5 + 1
        return np.full(n, i % 251, dtype=np.uint8), np.int64([os.getpid()])

    def _batch(self, info: BatchInfo):
        return [(np.int64([10 * info.iteration + j]), np.int64([info.epoch_idx])) for j in range(2)]

    def run_batch(self, info: BatchInfo):
        if info.iteration >= self.iterations:
            raise StopIteration
        return self._batch(info)

    def start_epoch(self, epoch_idx: int) -> None:
        self._it = iter(range(self.iterations))

    def next_batch(self, info: BatchInfo):
        k = next(self._it)  # StopIteration ends the epoch
        self._maybe_crash(k)
        return self._batch(BatchInfo(k, info.epoch_idx))


class FlakyRecords:
    """``n`` samples (with ``__len__``): sample i is (JPEG of a flat image of value i % 200, [i]).
    Samples in ``raise_at`` raise OSError (a source error); those in ``garbage_at`` return bytes
    that are not an image (a decode error). The label says which image it belongs to, so a test
    can check that a substitute's label follows its image."""

    def __init__(self, n: int, raise_at=(), garbage_at=()) -> None:
        self.n = n
        self.raise_at = frozenset(raise_at)
        self.garbage_at = frozenset(garbage_at)

    def __len__(self) -> int:
        return self.n

    def __call__(self, info: SampleInfo):
        import simplejpeg

        i = info.idx_in_epoch
        if i >= self.n:
            raise StopIteration
        if i in self.raise_at:
            raise OSError(f"record {i}: connection reset while reading")
        if i in self.garbage_at:
            return np.frombuffer(b"this is not a JPEG at all" * 4, np.uint8), np.int64([i])
        img = np.full((16 + i % 3, 20, 3), i % 200, np.uint8)
        return np.frombuffer(simplejpeg.encode_jpeg(img, quality=95), np.uint8), np.int64([i])


class ListSource:
    """Per-sample source over encoded files: sample i is (file i's bytes, [i])."""

    def __init__(self, files: list[bytes], batch_size: int) -> None:
        self.files = files
        self.batch_size = batch_size
        self.full_iterations = len(files) // batch_size

    def __len__(self) -> int:
        return self.full_iterations * self.batch_size

    def __call__(self, info: SampleInfo):
        if info.iteration >= self.full_iterations:
            raise StopIteration
        return np.frombuffer(self.files[info.idx_in_epoch], np.uint8), np.int32([info.idx_in_epoch])
