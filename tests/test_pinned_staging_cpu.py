"""`PinnedStaging`'s buffer bookkeeping without a GPU: CuPy's page-locked allocation is stood in for by
plain host memory and the GPU's events by flags, so the rules are checked here on every CI run (the
GPU test `tests/gpu/test_pinned_staging.py` checks real page-locked memory and a real stage)."""

from __future__ import annotations

import sys
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest

from ray_extsrc import pinned_staging
from ray_extsrc.host_batch import HostBatch, pack_column
from ray_extsrc.pinned_staging import PinnedStaging
from ray_extsrc.types import SampleInfo

pytestmark = pytest.mark.timeout(30)


class Event:
    def __init__(self) -> None:
        self.done = False
        self.waited = False

    def synchronize(self) -> None:
        self.waited = self.done = True


@pytest.fixture(autouse=True)
def host_cupy(monkeypatch):
    cupy = ModuleType("cupy")
    cupy.cuda = SimpleNamespace(alloc_pinned_memory=lambda n: bytearray(n))
    monkeypatch.setitem(sys.modules, "cupy", cupy)


def _batch(seed: int, size: int = 3000) -> HostBatch:
    rng = np.random.default_rng(seed)
    samples = [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(4)]
    return HostBatch(0, 0, tuple(SampleInfo(j, j, 0, 0) for j in range(4)), {1: {0: pack_column(samples)}})


def _ptr(batch: HostBatch) -> int:
    return batch.columns[1][0].data.ctypes.data


def test_a_buffer_waits_for_its_event_and_the_smallest_fitting_idle_one_is_taken():
    staging = PinnedStaging()
    first, held = staging.stage(_batch(0))
    assert np.array_equal(first.columns[1][0].data, _batch(0).columns[1][0].data)
    assert held[0].array.nbytes == 1 << 20  # 1.25 x 12,000 bytes, rounded up to a whole MiB
    pending = Event()
    staging.release(held, pending)
    second, held2 = staging.stage(_batch(1))
    assert _ptr(second) != _ptr(first)  # the first is idle, but the GPU may still read it
    assert np.array_equal(first.columns[1][0].data, _batch(0).columns[1][0].data)
    staging.release(held2, None)
    pending.done = True
    third, held3 = staging.stage(_batch(2))
    assert _ptr(third) in (_ptr(first), _ptr(second)) and len(staging._buffers) == 2  # reused, none made
    staging.release(held3, None)
    staging.close()


def test_past_max_buffers_the_oldest_idle_buffer_is_waited_for_and_reused(monkeypatch):
    monkeypatch.setattr(pinned_staging, "MAX_BUFFERS", 2)
    staging = PinnedStaging()
    a, held_a = staging.stage(_batch(0))
    b, held_b = staging.stage(_batch(1))  # a is handed out: a second buffer
    events = [Event(), Event()]
    staging.release(held_a, events[0])
    staging.release(held_b, events[1])
    c, held_c = staging.stage(_batch(2))  # both in flight, none may be added: wait for the oldest
    assert events[0].waited and not events[1].waited
    assert _ptr(c) == _ptr(a) and len(staging._buffers) == 2
    d, held_d = staging.stage(_batch(3, size=400_000))  # too big for b: b is let go for a new one
    assert events[1].waited and len(staging._buffers) == 2 and held_d[0].array.nbytes == 2 << 20
    assert np.array_equal(d.columns[1][0].data, _batch(3, size=400_000).columns[1][0].data)
    staging.release(held_c, None)
    staging.release(held_d, None)
    staging.close()
    assert not staging._buffers


def test_a_batch_without_packed_bytes_comes_back_as_it_is():
    staging = PinnedStaging()
    batch = HostBatch(0, 0, (SampleInfo(0, 0, 0, 0),), {1: {0: pack_column([np.int32(3)])}})
    same, held = staging.stage(batch)
    assert same is batch and held == []
