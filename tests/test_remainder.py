"""The last-batch policies ("drop", "pad", "exact") of a sharded epoch (`sharding`, issue 14).

First the layout's arithmetic, on its own: exhaustively for small (R, ways, N, B, base), including
a checkpoint resumed with another R, then by property at cluster sizes (R up to 4,096, N in the
millions). Then real pipelines with forked workers: what each shard is served, the SampleInfo a
padding slot carries, and the errors.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

from ray_extsrc import SourceError, pipeline_def
from ray_extsrc.pipeline import external_source
from ray_extsrc.sharding import LAST_BATCH_POLICIES, ShardLayout, epoch_permutation

pytestmark = pytest.mark.timeout(120)


# -- the arithmetic ----------------------------------------------------------------------------------


def serve(num_shards: int, n: int, b: int, policy: str, base: int = 0, ways: int = 1):
    """What every shard is served, as its consumer sees it (ways merged in the shard's order):
    per shard a list of (global batch, positions, valid samples)."""
    out = []
    for r in range(num_shards):
        lays = [ShardLayout(num_shards, r, base, ways, k, policy) for k in range(ways)]
        lengths = [lay.epoch_length(n, b) for lay in lays]
        total = sum(lengths)
        assert total == lays[0].shard_length(n, b)
        batches = []
        for step in range(total):
            lay = lays[step % ways]  # the shard's step is way (step % ways)'s local iteration step // ways
            i = step // ways
            assert i < lengths[step % ways]
            g = lay.global_batch(i)
            batches.append((g, lay.positions(g, n, b).tolist(), lay.valid_samples(g, n, b)))
        out.append(batches)
    return out


def check_epoch(per_shard, num_shards: int, n: int, b: int, policy: str, start: int = 0) -> None:
    """The policy's guarantee for the positions ``start .. n-1`` (a layout that starts after
    ``start // b`` consumed batches)."""
    steps = {len(s) for s in per_shard}
    assert len(steps) <= 1, f"unequal steps per shard: {[len(s) for s in per_shard]}"
    slots = [q for s in per_shard for _, pos, _ in s for q in pos]
    valid = [q for s in per_shard for _, pos, v in s for q in pos[:v]]
    assert all(len(pos) == b for s in per_shard for _, pos, _ in s)  # batches are always full
    assert all(0 <= q < n for q in slots) and all(q >= start for q in valid)
    rest = n - start
    if policy == "drop":
        assert len(slots) == len(set(slots)) and all(v == b for s in per_shard for *_, v in s)
        assert len(slots) == max(0, n // b - start // b) // num_shards * num_shards * b
        assert set(slots) == set(range(start, start + len(slots)))
        return
    # pad / exact: every position of the rest served; the extras are under one round
    assert set(range(start, n)) <= set(slots)
    extras = len(slots) - max(0, rest)
    assert 0 <= extras < num_shards * b or rest <= 0 and not slots
    # the valid samples are exactly the rest, once each; padding only in the last round
    assert sorted(valid) == list(range(start, n))
    last = max(steps) - 1 if steps else -1
    for s in per_shard:
        for step, (g, pos, v) in enumerate(s):
            assert pos[:v] == list(range(g * b, g * b + v))  # a batch's own samples come first
            assert pos[v:] == [p % n for p in range(g * b + v, g * b + b)]  # repeats of the epoch's start
            if v < b:
                assert step == last, "padding before the last round"


@pytest.mark.parametrize("policy", LAST_BATCH_POLICIES)
def test_layout_arithmetic_exhaustively_for_small_cases(policy):
    """Every (R, ways, N, B, base) up to small bounds: equal steps, the policy's guarantee, the
    ways of a shard dealing out exactly its one-way batches, and the same epoch for any ways."""
    for num_shards, b in itertools.product(range(1, 6), range(1, 5)):
        for n in range(0, 3 * num_shards * b + b + 2):
            for base in range(0, n // b + 2):
                one_way = serve(num_shards, n, b, policy, base)
                check_epoch(one_way, num_shards, n, b, policy, base * b)
                for ways in (2, 3):
                    assert serve(num_shards, n, b, policy, base, ways) == one_way


@pytest.mark.parametrize("policy", LAST_BATCH_POLICIES)
def test_a_checkpoint_resumed_with_another_shard_count_keeps_the_guarantee(policy):
    """Stop after t rounds under R shards, save consumed_batches, resume under R' shards: the two
    parts together serve the epoch as the policy promises (exactly once for the valid samples)."""
    for r_old, r_new, b in itertools.product(range(1, 5), range(1, 5), (1, 3)):
        for n in range(1, 2 * max(r_old, r_new) * b + b + 2):
            full = serve(r_old, n, b, policy)
            for t in range(len(full[0])):  # a mid-epoch checkpoint after t rounds
                consumed = ShardLayout(r_old, 0, last_batch_policy=policy).consumed_after(t)
                assert consumed * b < n or policy == "drop"  # never past a real sample
                before = [s[:t] for s in full]
                after = serve(r_new, n, b, policy, base=consumed)
                served = [q for part in (before, after) for s in part for _, pos, _ in s for q in pos]
                valid = [q for part in (before, after) for s in part for _, pos, v in s for q in pos[:v]]
                if policy == "drop":
                    assert len(served) == len(set(served))
                else:
                    assert set(served) == set(range(n))
                    assert sorted(valid) == list(range(n))  # exactly once across the resume
                check_epoch(after, r_new, n, b, policy, consumed * b)


def test_the_same_shard_count_resumed_pads_exactly_as_the_uninterrupted_run():
    n, b, shards = 103, 4, 3
    whole = serve(shards, n, b, "pad")
    for t in range(len(whole[0])):
        after = serve(shards, n, b, "pad", base=ShardLayout(shards, 0).consumed_after(t))
        assert [s[:t] + a for s, a in zip(whole, after)] == whole


CLUSTER = [  # (R, N, B): the issue's ImageNet cases, and a few odd ones
    (8, 1_281_167, 256),
    (64, 1_281_167, 256),
    (1024, 1_281_167, 256),
    (4096, 1_281_167, 32),
    (4096, 1_000_003, 7),
    (3, 2_000_001, 255),
    (1000, 999_999, 1000),
]


@pytest.mark.parametrize("num_shards,n,b", CLUSTER, ids=[f"R{r}-N{n}-B{b}" for r, n, b in CLUSTER])
def test_layout_property_at_cluster_sizes(num_shards, n, b):
    """Counting how often each sample is served, per policy, at the scale of a real cluster."""
    rng = np.random.default_rng(num_shards * 7 + b)
    for policy in LAST_BATCH_POLICIES:
        for base in (0, int(rng.integers(0, n // b))):
            counts = np.zeros(n, np.int64)
            valid = np.zeros(n, np.int64)
            lengths = set()
            for r in range(num_shards):
                ways = 1 + r % 3  # shards need not agree on ways: each shard's batches are its own
                served = 0
                for k in range(ways):
                    lay = ShardLayout(num_shards, r, base, ways, k, policy)
                    steps = lay.epoch_length(n, b)
                    served += steps
                    if not steps:
                        continue
                    g = np.array([lay.global_batch(i) for i in range(steps)], np.int64)
                    slots = (g[:, None] * b + np.arange(b)).ravel()
                    pos = slots % n if policy != "drop" else slots
                    np.add.at(counts, pos, 1)
                    v = np.array([lay.valid_samples(int(x), n, b) for x in g])
                    ok = (np.arange(b)[None, :] < v[:, None]).ravel()
                    np.add.at(valid, pos[ok], 1)
                    # the layout's own positions agree with the closed form on a few batches
                    for i in (0, steps - 1):
                        assert lay.positions(int(g[i]), n, b).tolist() == pos.reshape(-1, b)[i].tolist()
                lengths.add(served)
            assert len(lengths) == 1, f"{policy}: unequal steps per rank {sorted(lengths)}"
            start = base * b
            rest = counts[start:]
            if policy == "drop":
                assert counts.max() <= 1 and counts[:start].sum() == 0
                full = (n // b - base) // num_shards * num_shards * b
                assert rest.sum() == full
            else:
                assert rest.min() >= 1, f"{policy}: a sample was never served"
                extras = counts.sum() - (n - start)
                assert 0 <= extras < num_shards * b, f"{policy}: {extras} extras is more than one round"
                assert (valid[start:] == 1).all() and valid[:start].sum() == 0


def test_drop_loses_what_the_issue_says_and_pad_loses_nothing():
    """The issue's numbers (ImageNet, batch 256 / 32): the share of the epoch never served."""
    def unserved(num_shards, n, b, policy):
        lay = ShardLayout(num_shards, 0, last_batch_policy=policy)
        return max(0, n - lay.shard_length(n, b) * num_shards * b) / n

    n = 1_281_167
    got = {r: round(100 * unserved(r, n, 256 if r < 4096 else 32, "drop"), 2) for r in (8, 64, 1024, 4096)}
    assert got == {8: 0.09, 64: 0.25, 1024: 18.15, 4096: 7.92}
    assert all(unserved(r, n, 256, p) == 0 for r in (8, 64, 1024, 4096) for p in ("pad", "exact"))


def test_layout_refuses_an_unknown_policy_and_quotes_it():
    with pytest.raises(ValueError, match="last_batch_policy must be one of .*got 'fill'"):
        ShardLayout(2, 0, last_batch_policy="fill")


# -- real pipelines ------------------------------------------------------------------------------------

N, B = 103, 4  # 25 full batches and 3 samples: nothing divides


class AllIndices:
    """Serves every idx_in_epoch below its __len__ (the contract under "pad"/"exact"); each sample
    carries its SampleInfo, so the test sees what the source was asked for."""

    def __init__(self, n: int, sized: bool = True) -> None:
        self.n = n
        self.sized = sized

    def __len__(self) -> int:
        if not self.sized:
            raise TypeError("no length")
        return self.n

    def __call__(self, info):
        if info.idx_in_epoch >= self.n:
            raise StopIteration
        return np.int64([info.idx_in_epoch, info.idx_in_batch, info.iteration])


class FullBatchesOnly(AllIndices):
    """DALI's tutorial style: StopIteration at ``iteration >= n // B``, though __len__ says n."""

    def __call__(self, info):
        if info.iteration >= self.n // B:
            raise StopIteration
        return super().__call__(info)


def make_pipes(source, num_shards, policy, ways=1, **kw):
    @pipeline_def(batch_size=B, num_threads=1, py_num_workers=1, seed=11, **kw)
    def pipe():
        return external_source(source=source, batch=False, parallel=True)

    pipes = {}
    for r in range(num_shards):
        for k in range(ways):
            p = pipe(num_shards=num_shards, shard_id=r, ways=ways, way=k, last_batch_policy=policy)
            p.start_py_workers()
            pipes[r, k] = p
    return pipes


def shard_epochs(pipes, num_shards, ways=1):
    """Per shard, its epoch as its consumer sees it: [(rows of [idx, idx_in_batch, iteration], valid)]."""
    per_way = {key: [] for key in pipes}
    for key, p in pipes.items():
        while True:
            try:
                rows = p.run()[0].as_array().tolist()
            except StopIteration:
                p.reset()
                break
            per_way[key].append((rows, p.valid_samples()))
    out = []
    for r in range(num_shards):
        steps = sum(len(per_way[r, k]) for k in range(ways))
        out.append([per_way[r, n % ways][n // ways] for n in range(steps)])
    return out


@pytest.mark.parametrize("policy", ["pad", "exact"])
def test_three_shards_two_ways_serve_every_sample_and_pad_from_the_epochs_start(policy):
    pipes = make_pipes(AllIndices(N), 3, policy, ways=2, shuffle=True)
    try:
        for epoch in range(2):
            per_shard = shard_epochs(pipes, 3, ways=2)
            assert [len(s) for s in per_shard] == [9, 9, 9]  # ceil(103 / (3*4)) rounds
            perm = epoch_permutation(pipes[0, 0].seed, epoch, N)
            served, valid = [], []
            for r, batches in enumerate(per_shard):
                for i, (rows, v) in enumerate(batches):
                    g = 3 * i + r
                    positions = [(g * B + j) % N for j in range(B)]
                    # a slot repeats position q with q's own SampleInfo: the very sample served at q
                    assert rows == [[int(perm[q]), q % B, q // B] for q in positions]
                    assert v == min(B, max(0, N - g * B))
                    served += [row[0] for row in rows]
                    valid += [row[0] for row in rows[:v]]
            assert sorted(valid) == list(range(N))  # exactly once, counting the valid samples
            assert set(served) == set(range(N)) and len(served) == 9 * 3 * B  # 5 repeats
            assert {x for x in served if served.count(x) == 2} == {int(perm[q]) for q in range(5)}
        assert {p.epoch_size() for p in pipes.values()} == {5, 4} and pipes[0, 0].shard_epoch_size() == 9
    finally:
        for p in pipes.values():
            p.close()


def test_pad_resumed_on_another_shard_count_still_serves_every_sample():
    old = make_pipes(AllIndices(N), 2, "pad")
    seen = []
    try:
        for _ in range(3):  # 3 rounds of 2 shards, then the run "fails"
            for p in old.values():
                seen += [row[0] for row in p.run()[0].as_array().tolist()]
        state = old[0, 0].position()
        assert state == {"epoch_idx": 0, "consumed_batches": 6}
    finally:
        for p in old.values():
            p.close()
    new = make_pipes(AllIndices(N), 3, "pad")
    try:
        for p in new.values():
            p.skip_to(state["epoch_idx"], 0, consumed_batches=state["consumed_batches"])
        rest = shard_epochs(new, 3)
        assert [len(s) for s in rest] == [7, 7, 7]  # ceil((103 - 24) / 12)
        seen += [row[0] for s in rest for rows, _ in s for row in rows]
        assert set(seen) == set(range(N)) and len(seen) == 24 + 84  # 5 repeats: under one round
        assert [len(s) for s in shard_epochs(new, 3)] == [9, 9, 9]  # the next epoch: whole, from 0
    finally:
        for p in new.values():
            p.close()


def test_a_source_that_ends_before_its_len_is_an_error_under_pad_and_the_end_under_drop():
    pipes = make_pipes(FullBatchesOnly(N), 1, "pad")
    try:
        p = pipes[0, 0]
        for _ in range(25):
            p.run()
        with pytest.raises(SourceError, match="StopIteration in global batch 25 .* inside the 103 samples its "
                                              "__len__ declares.*last_batch_policy='drop'") as info:
            p.run()
        assert info.value.iteration == 25 and info.value.epoch_idx == 0
    finally:
        p.close()
    pipes = make_pipes(FullBatchesOnly(N), 1, "drop")
    try:
        assert [len(s) for s in shard_epochs(pipes, 1)] == [25]
    finally:
        pipes[0, 0].close()


def test_exact_needs_a_length_and_pad_without_one_warns_and_drops():
    with pytest.raises(ValueError, match="last_batch_policy='exact' needs the epoch's number of samples"):
        make_pipes(AllIndices(N, sized=False), 1, "exact")
    with pytest.warns(RuntimeWarning, match="cannot pad an epoch of unknown length"):
        pipes = make_pipes(AllIndices(N, sized=False), 2, "pad")
    try:
        assert {p.last_batch_policy for p in pipes.values()} == {"drop"}
        per_shard = shard_epochs(pipes, 2)
        assert [len(s) for s in per_shard] == [12, 12]  # the probe finds the end: whole rounds only
    finally:
        for p in pipes.values():
            p.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = make_pipes(AllIndices(N, sized=False), 1, "pad")  # one shard: nothing to pad, no warning
        one[0, 0].close()
    with pytest.raises(ValueError, match="last_batch_policy must be one of .*got 'partial'"):
        make_pipes(AllIndices(N), 1, "partial")
