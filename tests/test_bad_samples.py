"""The bad-sample policy (`sample_errors`, issue 13 item 2) through real pipelines: forked workers,
shared memory, the CPU decoder. ``on_error="skip"`` replaces a sample whose source or decoder
fails by a deterministic substitute from the same shard and epoch; batches stay full, the skips
are named, and a flood is an error."""

from __future__ import annotations

import numpy as np
import pytest

import ray_extsrc.fn as fn
from ray_extsrc import DecodeError, SourceError, pipeline_def
from ray_extsrc.sample_errors import TooManyBadSamplesError
from sources import FlakyRecords

pytest.importorskip("simplejpeg")
pytestmark = pytest.mark.timeout(120)

N, B = 48, 8


def make(source, *, parallel=True, num_shards=1, shard_id=0, **kw):
    @pipeline_def(batch_size=B, num_threads=1, py_num_workers=2, seed=3, device_id=None, num_shards=num_shards,
                  shard_id=shard_id, **kw)
    def pipe():
        jpegs, labels = fn.external_source(source=source, num_outputs=2, batch=False, parallel=parallel)
        return fn.decoders.image(jpegs, device="cpu"), labels

    return pipe()


def epoch(p):
    """(labels per batch, image values per batch) of one epoch."""
    labels, values = [], []
    while True:
        try:
            images, lab = p.run()
        except StopIteration:
            return labels, values
        labels.append([int(np.asarray(lab.at(j))[0]) for j in range(len(lab))])
        values.append([int(np.asarray(images.at(j))[0, 0, 0]) for j in range(len(images))])


@pytest.mark.parametrize("parallel", [True, False], ids=["workers", "in-process"])
def test_source_and_decode_errors_are_replaced_with_full_batches_and_named(parallel):
    bad_source, bad_decode = {5, 30}, {12, 41}
    with make(FlakyRecords(N, bad_source, bad_decode), parallel=parallel, on_error="skip",
              max_error_rate=0.1) as p:
        p.build()
        labels, values = epoch(p)
        skipped = p.skipped_samples()
    assert len(labels) == N // B and all(len(b) == B for b in labels)  # every batch full
    served = [x for b in labels for x in b]
    assert not set(served) & (bad_source | bad_decode)  # no bad sample served
    assert len(set(served)) == N - 4  # the rest exactly once, plus 4 substitutes
    # a substitute is a whole sample: its label follows its image
    assert all(v == lab % 200 for bl, bv in zip(labels, values) for lab, v in zip(bl, bv))
    assert skipped["skipped_samples"] == 4
    named = {e["idx_in_epoch"]: e for e in skipped["skipped"]}
    assert set(named) == bad_source | bad_decode
    assert "OSError was raised for sample idx_in_epoch=5" in named[5]["error"] and "record 5: connection reset" in named[5]["error"]
    assert named[12]["error"].startswith("DecodeError")
    assert all(e["substitute"] is not None and e["substitute"] not in named for e in named.values())


def test_the_same_substitutes_come_back_on_a_rerun_and_after_a_resume():
    src = FlakyRecords(N, raise_at={9, 33}, garbage_at={20})
    with make(src, on_error="skip", max_error_rate=0.1) as p:
        p.build()
        first, _ = epoch(p)
    with make(src, on_error="skip", max_error_rate=0.1) as p:
        p.build()
        assert epoch(p)[0] == first  # another process, the same draws
    with make(src, on_error="skip", max_error_rate=0.1) as p:
        p.build()
        p.skip_to(0, 2)  # a resume at batch 2 (the one with sample 20)
        assert epoch(p)[0] == first[2:]


def test_substitutes_come_from_the_same_shard():
    for r in range(2):
        with make(FlakyRecords(N), num_shards=2, shard_id=r) as p:
            p.build()
            own = {x for b in epoch(p)[0] for x in b}
        with make(FlakyRecords(N, raise_at=set(range(0, N, 5))), num_shards=2, shard_id=r, on_error="skip",
                  max_error_rate=0.5) as p:
            p.build()
            labels, _ = epoch(p)
        served = {x for b in labels for x in b}
        assert len(own) == N // 2 and served <= own - set(range(0, N, 5))  # never the other shard's


def test_by_default_the_error_stops_the_batch_as_before():
    with make(FlakyRecords(N, raise_at={10})) as p:
        p.build()
        p.run()
        with pytest.raises(SourceError, match="record 10"):
            p.run()
    with make(FlakyRecords(N, garbage_at={3})) as p:
        p.build()
        with pytest.raises(DecodeError):
            p.run()


def test_a_flood_of_bad_samples_is_an_error_naming_them():
    with make(FlakyRecords(N, raise_at=set(range(8))), on_error="skip", max_error_rate=0.05) as p:
        p.build()  # budget: max(1, 5% of 48) = 2 skips per epoch
        with pytest.raises(TooManyBadSamplesError, match=r"3 samples failed in epoch 0.*max_error_rate=0.05"):
            p.run()


def test_bad_policy_arguments_are_refused_at_construction():
    with pytest.raises(ValueError, match="on_error must be one of"):
        make(FlakyRecords(N), on_error="ignore")
    with pytest.raises(ValueError, match="max_error_rate"):
        make(FlakyRecords(N), on_error="skip", max_error_rate=2)


class _Unsized(FlakyRecords):
    """FlakyRecords without ``__len__``: the epoch's end is learnt from StopIteration (a probe)."""

    __len__ = None


def test_without_len_a_substitute_batch_still_ends_the_epoch_where_the_shards_agree():
    """40 samples, 2 shards of batch 8: global batch 4 exists, 5 does not, so shard 0 stops after 2
    batches like shard 1 (its probe of batch 5 says so). A bad sample in batch 4 must not make the
    substitute batch lose that probe and serve a third batch."""
    served = []
    for r in range(2):
        with make(_Unsized(40, raise_at={35}), num_shards=2, shard_id=r, on_error="skip", max_error_rate=0.5) as p:
            p.build()
            assert p.epoch_size() is None  # no length: the probe decides where the epoch ends
            served.append(epoch(p)[0])
    assert [len(x) for x in served] == [2, 2]  # equal steps on every rank
