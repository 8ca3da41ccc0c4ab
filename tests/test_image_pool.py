"""The GPU decoder's pool of reusable images (`decode._ImagePool`) and the rule that gives a batch's
images back (`decode._prune`): pure bookkeeping, checked here without a GPU on stand-in images and
events (the GPU test `tests/gpu/test_image_reuse.py` runs the real thing)."""

from __future__ import annotations

import pytest

from ray_extsrc.fn._gpu import decode
from ray_extsrc.fn._gpu.ptrbatch import Held, PtrBatch

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    """No pool and no verdict on nvImageCodec left by an earlier test of the session."""
    monkeypatch.setattr(decode, "_pools", {})
    monkeypatch.setattr(decode._ImagePool, "supported", True)


class Img:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity

    def __repr__(self) -> str:
        return f"Img({self.capacity})"


class Event:
    def __init__(self, done: bool) -> None:
        self.done = done


def test_take_needs_one_free_image_a_sample_and_gives_the_largest_to_the_largest():
    pool = decode._ImagePool(limit=10)
    assert pool.take([10, 20]) is None and pool.missed == 1
    pool.give_back([Img(5), Img(50), Img(30), Img(1)])
    got = pool.take([100, 7, 40])
    assert [g.capacity for g in got] == [50, 5, 30]  # the three largest, matched by size
    assert [c for c, _ in pool.free] == [1] and pool.taken == 1
    assert pool.take([]) is None


def test_give_back_keeps_at_most_limit_images_dropping_the_smallest():
    pool = decode._ImagePool(limit=3)
    pool.give_back([Img(c) for c in (4, 9, 1, 7, 3)])
    assert sorted(c for c, _ in pool.free) == [4, 7, 9]


def test_an_unsupported_codec_pools_nothing(monkeypatch):
    monkeypatch.setattr(decode._ImagePool, "supported", False)
    pool = decode._ImagePool(limit=3)
    pool.give_back([Img(1)])
    assert pool.take([1]) is None


def _entry(event, images, pool, escaped=False):
    owners = Held(images)
    owners.pool, owners.images, owners.escaped = pool, list(images), escaped
    return [event, 0, owners]


def test_prune_gives_back_only_finished_batches_whose_memory_did_not_escape():
    pool = decode._ImagePool(limit=100)
    done, pending = Event(True), Event(False)
    a, b, c, d = Img(1), Img(2), Img(3), Img(4)
    keep = [_entry(done, [a], pool), _entry(pending, [b], pool), _entry(done, [c], pool, escaped=True),
            _entry(None, [d], pool)]
    decode._prune(keep)
    assert [img for _, img in pool.free] == [a]  # finished and not escaped
    assert [e[2].images for e in keep] == [[b], [d]]  # still in flight (or not yet enqueued): kept
    pending.done = True
    decode._prune(keep)
    assert [img for _, img in pool.free] == [a, b]


def test_a_view_of_a_ptr_batch_marks_its_owners_escaped():
    owners = Held()
    batch = PtrBatch([0], [[0, 0, 0]], 3, owners)
    assert not owners.escaped
    try:
        batch.to_list()
    except Exception:  # no CuPy, or no CUDA runtime for its views: the flag is set before CuPy loads
        pass
    assert owners.escaped


def test_the_pool_is_sized_from_the_option_or_four_batches_and_off_at_zero(monkeypatch):
    from ray_extsrc.fn.decoder_options import DecoderOptions

    assert decode._image_pool(0, DecoderOptions(reuse_images=0), 256) is None
    assert decode._image_pool(0, DecoderOptions(), 256).limit == 1024  # the default: four batches
    assert decode._image_pool(0, DecoderOptions(reuse_images=100), 256).limit == 1024  # never shrinks
    assert decode._image_pool(1, DecoderOptions(reuse_images=100), 256).limit == 100  # per device
    assert decode._image_pool(0, DecoderOptions(), 512) is decode._pools[0] and decode._pools[0].limit == 2048
