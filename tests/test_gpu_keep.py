"""How long the GPU decoders keep a batch's decoded images (pure logic: fake streams and events,
so it runs without a GPU; the real thing runs in tests/gpu)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from ray_extsrc.fn._gpu import decode

pytestmark = pytest.mark.timeout(30)


class FakeEvent:
    def __init__(self, n: int) -> None:
        self.n = n
        self.done = False


class FakeStream:
    """Records numbered events, like a CUDA stream would, in order."""

    def __init__(self) -> None:
        self.events: list[FakeEvent] = []

    def record(self) -> FakeEvent:
        self.events.append(FakeEvent(len(self.events)))
        return self.events[-1]


def kept(op) -> list[str]:
    return [e[2][0] for e in op._gpu_keep]


def test_images_go_once_their_batch_end_event_completes_not_before():
    op, stream = SimpleNamespace(), FakeStream()
    decode._keep(op, stream, ["batch0"])
    end0 = stream.record()  # what assemble records after batch 0's kernels
    decode.batch_enqueued(end0)
    decode._keep(op, stream, ["batch1"])
    assert kept(op) == ["batch0", "batch1"]  # the GPU has not passed batch 0's end yet
    end0.done = True
    end1 = stream.record()
    decode.batch_enqueued(end1)  # batch 1 queued; batch 0's event has completed: it goes
    assert kept(op) == ["batch1"]
    end1.done = True
    decode._keep(op, stream, ["batch2"])
    assert kept(op) == ["batch2"]


def test_without_a_batch_end_a_later_call_stands_in():
    op, stream = SimpleNamespace(), FakeStream()

    def no_assemble():  # a thread that decodes but never reports its batch's end
        decode._keep(op, stream, ["orphan"])

    t = threading.Thread(target=no_assemble)
    t.start()
    t.join()
    for k in range(3):
        decode._keep(op, stream, [f"b{k}"])
        decode.batch_enqueued(stream.record())
    orphan = op._gpu_keep[0]
    assert orphan[2] == ["orphan"] and orphan[0] is not None  # three calls later: an event stands in
    orphan[0].done = True
    decode._keep(op, stream, ["b3"])
    assert "orphan" not in kept(op)
