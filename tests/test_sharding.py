"""Sharding across pipelines (what each loader actor runs): equal steps, every sample at most once.

These pipelines use the Pipeline's default last-batch policy, "drop" (whole rounds of whole
batches, as DALI's tutorial); "pad" and "exact" are tested in test_remainder.py.
"""

from __future__ import annotations

import pytest

import sources
from ray_extsrc import Pipeline, pipeline_def
from ray_extsrc.pipeline import external_source
from ray_extsrc.sharding import ShardLayout, epoch_permutation

pytestmark = pytest.mark.timeout(90)

N, B = 103, 4  # 25 full batches: does not divide by 3 shards


def shard_pipes(source, num_shards, **kw):
    @pipeline_def(batch_size=B, num_threads=1, py_num_workers=2, seed=7, **kw)
    def pipe():
        return external_source(source=source, num_outputs=4, batch=False, parallel=True)

    pipes = [pipe(num_shards=num_shards, shard_id=r) for r in range(num_shards)]
    for p in pipes:
        p.start_py_workers()
    return pipes


def run_epoch(p):
    out = []
    while True:
        try:
            out.append(p.run()[1].as_array().ravel().tolist())
        except StopIteration:
            p.reset()
            return out


@pytest.mark.parametrize("sized", [True, False], ids=["with-len", "probe"])
def test_three_shards_equal_steps_no_duplicates(sized):
    cls = sources.SizedIndexSource if sized else sources.IndexSource
    pipes = shard_pipes(cls(N, B), 3)
    try:
        for _ in range(2):
            per_rank = [run_epoch(p) for p in pipes]
            assert [len(b) for b in per_rank] == [8, 8, 8]  # 25 batches // 3 ranks
            flat = [i for b in per_rank for batch in b for i in batch]
            assert len(flat) == len(set(flat)) == 8 * 3 * B
            # rank r, local step i holds global batch g = 3i + r
            for r, batches in enumerate(per_rank):
                for i, batch in enumerate(batches):
                    g = 3 * i + r
                    assert batch == list(range(g * B, g * B + B))
        if sized:
            assert all(p.epoch_size() == 8 for p in pipes)
    finally:
        for p in pipes:
            p.close()


def test_shuffle_is_a_permutation_shared_by_all_shards_and_changes_per_epoch():
    pipes = shard_pipes(sources.SizedIndexSource(N, B), 2, shuffle=True)
    try:
        epochs = []
        for _ in range(2):
            per_rank = [run_epoch(p) for p in pipes]
            flat = [i for b in per_rank for batch in b for i in batch]
            assert len(flat) == len(set(flat)) == 12 * 2 * B and set(flat) <= set(range(N))
            epochs.append(per_rank)
        assert epochs[0] != epochs[1]
        perm = epoch_permutation(pipes[0].seed, 0, N)
        assert epochs[0][1][0] == perm[B : 2 * B].tolist()  # rank 1, step 0 = positions 4..7
    finally:
        for p in pipes:
            p.close()


def test_elastic_resume_with_other_shard_count_finishes_the_epoch_exactly_once():
    old = shard_pipes(sources.SizedIndexSource(N, B), 2)
    seen = []
    try:
        for _ in range(3):  # every rank does 3 steps, then the run "fails"
            for p in old:
                seen += p.run()[1].as_array().ravel().tolist()
        state = old[0].position()
        assert state == old[1].position() == {"epoch_idx": 0, "consumed_batches": 6}
    finally:
        for p in old:
            p.close()
    new = shard_pipes(sources.SizedIndexSource(N, B), 3)
    try:
        for p in new:
            p.skip_to(state["epoch_idx"], 0, consumed_batches=state["consumed_batches"])
        rest = [run_epoch(p) for p in new]
        assert [len(b) for b in rest] == [(25 - 6) // 3] * 3
        seen += [i for b in rest for batch in b for i in batch]
        assert len(seen) == len(set(seen))
        assert sorted(seen) == list(range((6 + 18) * B))
        # the next epoch starts over on the new layout
        assert [len(run_epoch(p)) for p in new] == [8, 8, 8]
    finally:
        for p in new:
            p.close()


def test_layout_validation_quotes_the_value():
    with pytest.raises(ValueError, match="shard_id must be in \\[0, 2\\); got 2"):
        ShardLayout(2, 2)


def test_ways_are_pipeline_arguments_checked_when_given():
    assert Pipeline(batch_size=B, ways=3, way=2).layout == ShardLayout(ways=3, way=2)
    with pytest.raises(ValueError, match="way must be in \\[0, 3\\); got 3"):
        Pipeline(batch_size=B, ways=3, way=3)
    with pytest.raises(ValueError, match="ways must be a positive int; got 0"):
        Pipeline(batch_size=B, ways=0)


def test_ways_of_a_layout_deal_each_shards_batches_out_exactly_once():
    """Pure layout arithmetic, every small case: the ways of a shard together serve exactly the
    shard's batches of the one-way layout, and every shard the same number of them."""
    for shards in range(1, 5):
        for ways in range(1, 5):
            for full in range(0, 23):
                for base in (0, 1, 5):
                    n = full * B
                    one_way = [ShardLayout(shards, r, base) for r in range(shards)]
                    expected = {lay.global_batch(i) for lay in one_way for i in range(lay.epoch_length(n, B))}
                    got: list[int] = []
                    for r in range(shards):
                        lays = [ShardLayout(shards, r, base, ways, k) for k in range(ways)]
                        lengths = [lay.epoch_length(n, B) for lay in lays]
                        assert sum(lengths) == one_way[r].epoch_length(n, B) == lays[0].shard_length(n, B)
                        for k, lay in enumerate(lays):
                            for i in range(lengths[k]):
                                # way k's local step i is the shard's step i*ways + k
                                assert lay.global_batch(i) == one_way[r].global_batch(i * ways + k)
                                got.append(lay.global_batch(i))
                    assert len(got) == len(set(got)) and set(got) == expected


@pytest.mark.parametrize("sized", [True, False], ids=["with-len", "probe"])
def test_pipelines_serving_one_shard_in_turn_yield_the_shards_batches(sized):
    cls = sources.SizedIndexSource if sized else sources.IndexSource
    shards, ways = 2, 3

    @pipeline_def(batch_size=B, num_threads=1, py_num_workers=1, seed=7)
    def pipe():
        return external_source(source=cls(N, B), num_outputs=4, batch=False, parallel=True)

    pipes = {}
    for r in range(shards):
        for k in range(ways):
            p = pipe(num_shards=shards, shard_id=r, ways=ways, way=k)
            p.start_py_workers()
            pipes[r, k] = p
    try:
        for _ in range(2):
            for r in range(shards):
                per_way = [run_epoch(pipes[r, k]) for k in range(ways)]
                assert [len(b) for b in per_way] == [4, 4, 4]  # 25 // 2 = 12 shard steps over 3 ways
                merged = [per_way[n % ways][n // ways] for n in range(12)]
                for n, batch in enumerate(merged):
                    g = shards * n + r
                    assert batch == list(range(g * B, g * B + B))
        if sized:
            assert {p.epoch_size() for p in pipes.values()} == {4}
            assert {p.shard_epoch_size() for p in pipes.values()} == {12}
    finally:
        for p in pipes.values():
            p.close()
