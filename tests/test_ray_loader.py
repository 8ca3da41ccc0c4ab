"""Loader actors under a local Ray, driven straight from the test (no TorchTrainer, for speed).

Every test checks its last-batch policy's contract (`sharding`) on labels that are the samples'
``idx_in_epoch`` — "drop": whole rounds, exactly once; "pad" (the Loader's default): every sample
at least once, the last round completed from the epoch's start; "exact": the same batches, every
sample valid exactly once — and that no shared-memory segment of a loader actor outlives it.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")
torch = pytest.importorskip("torch")

from ray_extsrc import SourceError, pipeline_def  # noqa: E402
from conftest import assert_no_segments_of  # noqa: E402
from ray_extsrc.pipeline import external_source  # noqa: E402
from ray_extsrc.train import Loader  # noqa: E402

# Ray pickles the sources and pipeline functions below into the actors; tests/ is not importable
# there, so send this module's definitions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [pytest.mark.timeout(120), pytest.mark.allow_children]

N, B = 103, 4  # 25 full batches and 3 samples. drop: 8 per rank for 3 ranks, 12 for 2; pad: 9 and 13


class IndexSource:
    """Sample i is (a 2x3 float32 array filled with i, [i]); ``bad`` raises, ``slow`` sleeps.
    Serves every ``idx_in_epoch`` below its ``__len__``, as "pad" and "exact" need."""

    def __init__(self, n: int, bs: int, bad: int | None = None, delay: float = 0.0) -> None:
        self.n = n
        self.bad = bad
        self.delay = delay

    def __len__(self) -> int:
        return self.n

    def __call__(self, info):
        if info.idx_in_epoch >= self.n:
            raise StopIteration
        if info.idx_in_epoch == self.bad:
            raise ValueError(f"record {info.idx_in_epoch} is unreadable")
        if self.delay:
            time.sleep(self.delay)
        return np.full((2, 3), info.idx_in_epoch, dtype=np.float32), np.int64([info.idx_in_epoch])


class RaggedSource:
    """Samples of different lengths: the output stays a list of per-sample tensors."""

    def __call__(self, info):
        if info.iteration >= 3:
            raise StopIteration
        return np.arange(info.idx_in_epoch % 3 + 1, dtype=np.int32)


@pipeline_def(batch_size=B, num_threads=1, py_num_workers=2, prefetch_queue_depth=2)
def index_pipeline(n=N, bad=None, delay=0.0):
    return external_source(source=IndexSource(n, B, bad, delay), num_outputs=2, batch=False, parallel=True)


@pipeline_def(batch_size=B, num_threads=1, py_num_workers=1)
def ragged_pipeline():
    return external_source(source=RaggedSource(), batch=False, parallel=True)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def labels(batch) -> list[int]:
    return batch["labels"].ravel().tolist()


def batch_of(g: int, policy: str, n: int = N) -> list[int]:
    """The labels of global batch g (unshuffled): under "pad"/"exact", slots past the epoch's end
    repeat its first samples."""
    return [(g * B + j) % n if policy != "drop" else g * B + j for j in range(B)]


def assert_no_shm_left(iterators) -> None:
    """No /dev/shm segment of any loader actor that served these iterators remains."""
    assert_no_segments_of(p for it in iterators for p in it.actor_pids)


def make_loader(**kw) -> Loader:
    return Loader(index_pipeline, outputs=("images", "labels"), **kw)


def consume_then_save(loader: Loader, batches: int):
    """Rank 0 of 1 takes ``batches`` batches, saves its state and stops (as a run that fails after a
    checkpoint). Returns the closed iterator, the labels seen and the state."""
    it = loader.iter_torch_batches(rank=0, world_size=1)
    try:
        gen = iter(it)
        seen = [i for _ in range(batches) for i in labels(next(gen))]
        state = it.state_dict()
        gen.close()
    finally:
        it.close()
    return it, seen, state


@pytest.mark.parametrize("policy", ["drop", "pad", "exact"])
def test_three_ranks_awkward_count_equal_batches_under_each_policy(policy):
    loader = make_loader(last_batch_policy=policy)
    its = [loader.iter_torch_batches(rank=r, world_size=3) for r in range(3)]
    steps = 8 if policy == "drop" else 9  # 25 batches // 3 ranks; or ceil(103 samples / 12)
    try:
        for epoch in range(2):
            batches = [list(it) for it in its]
            per_rank = [[labels(b) for b in bs] for bs in batches]
            assert [len(b) for b in per_rank] == [steps] * 3  # every epoch
            for r, rank_batches in enumerate(per_rank):
                for i, batch in enumerate(rank_batches):
                    g = 3 * i + r  # rank r, local step i serves global batch 3i + r
                    assert batch == batch_of(g, policy)
            flat = [i for b in per_rank for batch in b for i in batch]
            if policy == "drop":
                assert len(flat) == len(set(flat)) == 8 * 3 * B
            else:
                assert set(flat) == set(range(N)) and len(flat) == 9 * 3 * B  # positions 0..4 twice
            if policy == "exact":
                valid = [x for bs in batches for b in bs for x in b["labels"].ravel()[b["valid"]].tolist()]
                assert sorted(valid) == list(range(N))  # every sample valid exactly once
                assert batches[1][8]["valid"].tolist() == [True, True, True, False]  # samples 100..102, 0
                assert batches[2][8]["valid"].dtype == torch.bool and not batches[2][8]["valid"].any()
            else:
                assert "valid" not in batches[0][0]
            assert all(it.epoch_idx == epoch + 1 for it in its)
        padded = sum(it.stats()["padded_samples"] for it in its)
        assert padded == (0 if policy == "drop" else 2 * 5)  # 2 epochs of 5 repeats
        assert its[0].describe()["last_batch_policy"] == policy
        batch = next(iter(its[0]))
        assert batch["images"].dtype == torch.float32 and batch["images"].shape == (B, 2, 3)
        assert batch["images"].device.type == "cpu"
        assert (batch["images"][:, 0, 0] == batch["labels"].ravel().float()).all()
        d = its[1].describe()
        assert (d["num_shards"], d["shard_id"], d["epoch_size"]) == (3, 1, steps)
        assert d["node_id"] == ray.get_runtime_context().get_node_id()  # on its consumer's node
        assert d["cuda_visible_devices"] == ""  # a CPU consumer's actor sees no GPU
    finally:
        for it in its:
            it.close()
    assert_no_shm_left(its)


def test_each_for_is_one_epoch_and_iter_torch_batches_returns_the_same_iterator():
    loader = Loader(index_pipeline, outputs=("images", "labels"), n=24)  # 6 batches, one rank
    it = loader.iter_torch_batches()
    try:
        assert loader.iter_torch_batches() is it
        first = [labels(b) for b in it]
        assert len(first) == 6 and it.epoch_idx == 1
        second = [labels(b) for b in loader.iter_torch_batches()]  # Ray Data style: call per epoch
        assert second == first and it.epoch_idx == 2
        # leaving a `for` early keeps the position: the next `for` finishes that epoch
        for k, b in enumerate(it):
            if k == 1:
                break
        assert it.state_dict()["consumed_batches"] == 2
        assert [labels(b) for b in it] == first[2:]
    finally:
        it.close()
    assert_no_shm_left([it])


def test_backpressure_keeps_at_most_prefetch_batches_requested():
    loader = make_loader(prefetch_batches=2)
    it = loader.iter_torch_batches(rank=0, world_size=1)
    try:
        gen = iter(it)
        next(gen)
        # describe() runs after every call already sent: the actor served batches 0 and 1 only
        assert it.describe()["cursor"] == (0, 0, 2)
        time.sleep(0.3)
        assert it.describe()["cursor"] == (0, 0, 2)
        gen.close()
    finally:
        it.close()


def test_iter_torch_batches_asks_for_the_first_batches_before_the_first_next():
    loader = make_loader(prefetch_batches=2)
    it = loader.iter_torch_batches(rank=0, world_size=1)
    try:
        # describe() runs after every call already sent: batches 0 and 1 were asked for at once
        assert it.describe()["cursor"] == (0, 0, 2)
        # the first `for` takes those requests over: the whole epoch, from its first batch, once
        assert [labels(b) for b in it] == [batch_of(g, "pad") for g in range(26)]
        st = it.stats()
        assert 0 <= st["startup_actors_requested_s"] < st["startup_first_batch_s"]
        # a position given with the iterator: the requests made at once are that position's
        other = make_loader(prefetch_batches=2, seed=loader.seed)
        resumed = other.iter_torch_batches(state={"epoch_idx": 0, "consumed_batches": 5, "seed": loader.seed},
                                           rank=0, world_size=1)
        try:
            assert resumed.describe()["cursor"] == (0, 5, 2)
            assert [labels(b) for b in resumed] == [batch_of(g, "pad") for g in range(5, 26)]
        finally:
            resumed.close()
    finally:
        it.close()
    assert_no_shm_left([it])


def test_the_next_epoch_is_requested_while_one_ends_and_dropped_on_a_new_position():
    loader = make_loader(n=24, shuffle=True, prefetch_batches=2)  # 6 batches; the order changes per epoch
    it = loader.iter_torch_batches(rank=0, world_size=1)
    try:
        epochs = [[labels(b) for b in it] for _ in range(2)]
        # the first two batches of epoch 2 were asked for while epoch 1 ended
        assert it.describe()["cursor"] == (2, 0, 2)
        for e in epochs:
            assert len(e) == 6 and sorted(i for b in e for i in b) == list(range(24))
        assert epochs[0] != epochs[1]  # shuffled per epoch: carried batches of the wrong epoch would show
        # a saved position replaces the carried requests: the resumed epoch is the saved one
        it.load_state_dict({"epoch_idx": 1, "consumed_batches": 3, "seed": loader.seed})
        assert [labels(b) for b in it] == epochs[1][3:]
        # the carried epoch-2 batches are what a fresh run of epoch 2 gives
        third = [labels(b) for b in it]
        other = make_loader(n=24, shuffle=True, prefetch_batches=2)
        ref = other.iter_torch_batches(state={"epoch_idx": 2, "consumed_batches": 0, "seed": loader.seed},
                                       rank=0, world_size=1)
        try:
            assert [labels(b) for b in ref] == third
        finally:
            ref.close()
        # leaving an epoch early carries nothing: the next `for` finishes that epoch
        for k, _ in enumerate(it):
            if k == 1:
                break
        assert it._carry is None
        assert len([b for b in it]) == 4
    finally:
        it.close()
    assert_no_shm_left([it])


@pytest.mark.parametrize("how", ["ray.kill", "SIGKILL"])
def test_killed_loader_actor_restarts_and_resumes_at_the_waited_batch(how):
    loader = make_loader(n=60, delay=0.01)  # 15 batches; slow, so the kill lands mid-call
    it = loader.iter_torch_batches(rank=0, world_size=1)
    seen = []
    try:
        gen = iter(it)
        for _ in range(5):
            seen += labels(next(gen))
        old_pid = it.describe()["pid"]
        if how == "ray.kill":
            ray.kill(it.actor, no_restart=False)
        else:
            os.kill(old_pid, signal.SIGKILL)
        seen += [i for b in gen for i in labels(b)]
        assert seen == list(range(60))  # in order: nothing lost, nothing twice
        st = it.stats()
        assert st["actor_restarts"] == 1 and it.actor_pids[0] == old_pid != it.actor_pids[1]
        assert [labels(b) for b in it][:2] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # next epoch is whole
    finally:
        it.close()
    assert_no_shm_left([it])  # the dead actor's segments were unlinked by its janitor


def test_killed_forked_worker_is_replaced_and_its_samples_replayed():
    loader = make_loader(n=60, delay=0.01)
    it = loader.iter_torch_batches(rank=0, world_size=1)
    seen = []
    try:
        gen = iter(it)
        for _ in range(3):
            seen += labels(next(gen))
        victim = it.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        seen += [i for b in gen for i in labels(b)]
        assert seen == list(range(60))
        d = it.describe()
        assert d["worker_respawns"] >= 1 and victim not in d["worker_pids"].values()
        assert it.stats()["actor_restarts"] == 0
    finally:
        it.close()
    assert_no_shm_left([it])


def test_resume_mid_epoch_from_state_with_a_new_loader_object_and_shuffle():
    # A new Loader (as in a new run restored from a checkpoint) draws another seed; the state
    # carries the old one, so the shuffled order of the resumed epoch is the same. Policy "pad":
    # 26 batches, the last one completed with the epoch's first sample.
    first = make_loader(shuffle=True)
    it, seen, state = consume_then_save(first, 7)
    assert state["epoch_idx"] == 0 and state["consumed_batches"] == 7 and state["seed"] == first.seed
    second = make_loader(shuffle=True)
    assert second.seed != first.seed
    it2 = second.iter_torch_batches(state=pickle.loads(pickle.dumps(state)), rank=0, world_size=1)
    try:
        rest = [i for b in it2 for i in labels(b)]
        assert len(seen) + len(rest) == 26 * B and len(set(seen)) == len(seen)
        assert set(seen + rest) == set(range(N)) and rest[-1] == seen[0]  # the repeat: position 0
        assert it2.state_dict() == {"epoch_idx": 1, "consumed_batches": 0, "seed": first.seed}
    finally:
        it2.close()
    assert_no_shm_left([it, it2])


@pytest.mark.parametrize("policy", ["drop", "exact"])  # "exact" serves the batches of "pad", plus masks
def test_elastic_resume_with_three_ranks_after_two_keeps_the_policys_guarantee(policy):
    loader = make_loader(shuffle=True, last_batch_policy=policy)
    old = [loader.iter_torch_batches(rank=r, world_size=2) for r in range(2)]
    seen: list[int] = []
    valid: list[int] = []

    def take(batch) -> None:
        nonlocal seen, valid
        seen += labels(batch)
        valid += batch["labels"].ravel()[batch["valid"]].tolist() if policy == "exact" else labels(batch)

    try:
        gens = [iter(it) for it in old]
        for _ in range(4):  # both ranks in step, as between two ray.train.report calls
            for g in gens:
                take(next(g))
        state = old[0].state_dict()
        assert state == old[1].state_dict() and state["consumed_batches"] == 8
        for g in gens:
            g.close()
    finally:
        for it in old:
            it.close()
    new = [loader.iter_torch_batches(state=state, rank=r, world_size=3) for r in range(3)]
    try:
        rest = [list(it) for it in new]
        # equal steps on every new rank: (25 - 8) // 3, or ceil((103 - 32) / 12)
        assert [len(r) for r in rest] == [5 if policy == "drop" else 6] * 3
        for r in rest:
            for b in r:
                take(b)
        if policy == "drop":
            assert len(seen) == len(set(seen)) == (8 + 15) * B
        else:
            assert set(seen) == set(range(N)) and len(seen) == (8 + 18) * B  # one repeat
        if policy == "exact":
            assert sorted(valid) == list(range(N))  # exactly once across the re-shard
        # the next epoch is a whole one over the new layout
        assert [len([b for b in it]) for it in new] == [8 if policy == "drop" else 9] * 3
    finally:
        for it in new:
            it.close()
    assert_no_shm_left(old + new)


def test_two_actors_per_worker_serve_its_batches_in_turn_and_survive_a_kill():
    """Policy "exact": the masks, like the batches, do not depend on which actor serves them."""
    loader = make_loader(actors_per_worker=2, last_batch_policy="exact")
    its = [loader.iter_torch_batches(rank=r, world_size=2) for r in range(2)]

    def valid_labels(batches) -> list[int]:
        return [x for b in batches for x in b["labels"].ravel()[b["valid"]].tolist()]

    try:
        epoch = [list(it) for it in its]
        per_rank = [[labels(b) for b in bs] for bs in epoch]
        assert [len(b) for b in per_rank] == [13, 13]  # as with one actor per worker
        for r, batches in enumerate(per_rank):
            for i, batch in enumerate(batches):
                assert batch == batch_of(2 * i + r, "exact")
        assert sorted(valid_labels(epoch[0]) + valid_labels(epoch[1])) == list(range(N))
        for it in its:
            d0, d1 = it.describe(0), it.describe(1)
            assert d0["pid"] != d1["pid"] and (d0["way"], d1["way"]) == ((0, 2), (1, 2))
            assert (d0["epoch_size"], d1["epoch_size"]) == (7, 6)  # the worker's 13, dealt in turn
            assert it.stats()["actors_per_worker"] == 2
        # kill the second actor of rank 1 mid-epoch: Ray restarts it at the batch awaited from it
        gen = iter(its[1])
        seen = [next(gen) for _ in range(3)]
        os.kill(its[1].describe(1)["pid"], signal.SIGKILL)
        seen += list(gen)
        assert [labels(b) for b in seen] == [batch_of(g, "exact") for g in range(1, 26, 2)]
        assert valid_labels(seen) == [i for g in range(1, 26, 2) for i in range(g * B, g * B + B) if i < N]
        assert its[1].stats()["actor_restarts"] == 1
    finally:
        for it in its:
            it.close()
    assert_no_shm_left(its)


@pytest.mark.parametrize("ways_before,ways_after", [(2, 3), (3, 1)])
def test_resume_with_another_number_of_actors_per_worker_is_exactly_once(ways_before, ways_after):
    first = make_loader(actors_per_worker=ways_before)
    it, seen, state = consume_then_save(first, 7)
    assert state["consumed_batches"] == 7
    second = make_loader(actors_per_worker=ways_after)
    it2 = second.iter_torch_batches(state=state, rank=0, world_size=1)
    try:
        rest = [i for b in it2 for i in labels(b)]
        assert seen + rest == list(range(N)) + [0]  # in order, nothing lost; "pad" repeats sample 0
    finally:
        it2.close()
    assert_no_shm_left([it, it2])


def test_source_error_surfaces_with_sample_index_and_traceback():
    loader = make_loader(bad=13)
    it = loader.iter_torch_batches(rank=0, world_size=1)
    try:
        with pytest.raises(SourceError) as info:
            for _ in it:
                pass
        err = info.value
        assert err.idx_in_epoch == 13
        assert "idx_in_epoch=13" in str(err) and "record 13 is unreadable" in str(err)
        assert "Original traceback" in str(err) and "in __call__" in err.remote_traceback
        assert any("rank 0/1" in n for n in err.__notes__)
        assert it.state_dict()["consumed_batches"] == 3  # batches 0..2 were delivered, 3 failed
    finally:
        it.close()
    assert_no_shm_left([it])


def test_outputs_none_gives_tuples_and_ragged_outputs_give_lists():
    loader = Loader(ragged_pipeline)
    it = loader.iter_torch_batches(rank=0, world_size=1)
    try:
        batches = list(it)
        assert len(batches) == 3 and all(isinstance(b, tuple) and len(b) == 1 for b in batches)
        samples = batches[1][0]
        assert isinstance(samples, list) and [t.tolist() for t in samples] == [[0, 1], [0, 1, 2], [0], [0, 1]]
    finally:
        it.close()


def test_stats_report_throughput_and_stage_timings():
    loader = make_loader(n=40)
    it = loader.iter_torch_batches(rank=0, world_size=1)
    try:
        assert len(list(it)) == 10
        st = it.stats()
        assert st["batches"] == 10 and st["samples"] == 40 and st["transport"] == "host"
        assert st["padded_samples"] == 0 and st["last_batch_policy"] == "pad"  # 40 samples: no round to fill
        for k in ("worker_wait_s", "worker_compute_s", "main_ops_s", "encode_s", "delivery_s"):
            assert st[k] >= 0.0
        assert st["samples_per_s"] > 0 and st["worker_compute_s"] > 0
    finally:
        it.close()


def test_loader_is_small_picklable_and_validates_its_arguments():
    loader = make_loader(shuffle=True, py_num_workers=3)
    blob = pickle.dumps(loader)
    assert len(blob) < 4096
    assert pickle.loads(blob).seed == loader.seed
    with pytest.raises(ValueError, match="shard_id are set per Train worker"):
        make_loader(shard_id=1)
    with pytest.raises(ValueError, match="prefetch_batches must be an int >= 1; got 0"):
        make_loader(prefetch_batches=0)
    with pytest.raises(TypeError, match="outputs must be a tuple of names"):
        Loader(index_pipeline, outputs="images")
    with pytest.raises(ValueError, match="give both rank and world_size"):
        loader.iter_torch_batches(rank=0)
    with pytest.raises(ValueError, match="last_batch_policy must be one of .*got 'fill'"):
        make_loader(last_batch_policy="fill")
    with pytest.raises(ValueError, match="already has that name; rename that output"):
        Loader(index_pipeline, outputs=("images", "valid"), last_batch_policy="exact")


def not_a_pipeline(**kwargs):
    return kwargs


@pytest.mark.parametrize(
    ("loader", "message"),
    [
        (Loader(index_pipeline, outputs=("only_one",)), "names 1 outputs, but the pipeline"),
        (Loader(not_a_pipeline), "must be a @pipeline_def function, which returns a Pipeline"),
        (Loader(ragged_pipeline, last_batch_policy="exact"), "'exact' needs the epoch's number of samples"),
    ],
    ids=["output-names", "not-a-pipeline", "exact-without-len"],
)
def test_a_bad_loader_fails_at_actor_start_with_a_clear_message(loader, message):
    it = loader.iter_torch_batches(rank=0, world_size=1)
    try:
        with pytest.raises(ray.exceptions.ActorDiedError, match=message) as info:
            next(iter(it))
        assert any("cannot be restarted" in n for n in info.value.__notes__)
    finally:
        it.close()
