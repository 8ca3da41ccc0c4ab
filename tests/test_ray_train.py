"""The loader under a real TorchTrainer: 2 CPU workers, DDP over gloo, checkpoints, failures.

Each Train worker writes the labels (= ``idx_in_epoch``) it received to a JSON file per attempt, so
the test can check each last-batch policy's contract (`sharding`) across ranks, restarts and
resumes: "pad" (the Loader's default) serves every sample at least once, the extras within one
round; "drop" whole rounds exactly once; "exact" every sample exactly once among the valid ones.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import sys
import tempfile

import numpy as np
import pytest

ray = pytest.importorskip("ray")
torch = pytest.importorskip("torch")
pytest.importorskip("ray.train.torch")

from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402

from ray_extsrc import SourceError, pipeline_def  # noqa: E402
from conftest import assert_no_segments_of  # noqa: E402
from ray_extsrc.pipeline import external_source  # noqa: E402
from ray_extsrc.train import Loader  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not importable in workers

pytestmark = [pytest.mark.timeout(180), pytest.mark.allow_children]

B = 4  # 103 samples: 25 full batches and 3 samples; "pad" makes 13 steps per rank of 2


class IndexSource:
    """Serves every idx_in_epoch below its __len__ (what "pad"/"exact" ask of a sized source)."""

    def __init__(self, n: int, bad: int | None = None) -> None:
        self.n = n
        self.bad = bad

    def __len__(self) -> int:
        return self.n

    def __call__(self, info):
        if info.idx_in_epoch >= self.n:
            raise StopIteration
        if info.idx_in_epoch == self.bad:
            raise ValueError(f"record {info.idx_in_epoch} is unreadable")
        return np.full((6,), info.idx_in_epoch, dtype=np.float32), np.int64([info.idx_in_epoch])


@pipeline_def(batch_size=B, num_threads=1, py_num_workers=1)
def pipeline(n=103, bad=None):
    return external_source(source=IndexSource(n, bad), num_outputs=2, batch=False, parallel=True)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _dump(out_dir: str, name: str, data) -> None:
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(data, f)


def _load_all(out_dir: str, pattern: str) -> dict[str, object]:
    out = {}
    for path in sorted(glob.glob(os.path.join(out_dir, pattern))):
        with open(path) as f:
            out[os.path.basename(path)] = json.load(f)
    return out


def _checkpoint_state() -> dict | None:
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d, open(os.path.join(d, "loader.json")) as f:
        return json.load(f)


def _report(metrics: dict, state: dict) -> None:
    """Every rank reports; rank 0 attaches the checkpoint holding the loader's position."""
    if ray.train.get_context().get_world_rank() == 0:
        with tempfile.TemporaryDirectory() as d:
            _dump(d, "loader.json", state)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics)


def train_loop(config):
    rank = ray.train.get_context().get_world_rank()
    state = _checkpoint_state() or config.get("resume_state")
    attempt = "resumed" if state is not None else "first"
    train_it = config["loaders"]["train"].iter_torch_batches(state=state)
    val_it = config["loaders"]["val"].iter_torch_batches() if "val" in config["loaders"] else None
    model = ray.train.torch.prepare_model(torch.nn.Linear(6, 1))  # DDP over gloo: ranks in lockstep
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    record = {"train": [], "val": [], "actor_pids": []}
    for epoch in range(config.get("epochs", 1)):
        for k, batch in enumerate(train_it):
            x, y = batch["images"], batch["labels"]
            assert x.shape == (B, 6) and torch.equal(x[:, 0].long(), y.ravel())
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            record["train"].append([epoch, y.ravel().tolist()])
            if config.get("kill_actor_at") == (rank, epoch, k):
                os.kill(train_it.describe()["pid"], signal.SIGKILL)  # Ray restarts it; nothing lost
            stop_at = config.get("stop_after")
            if stop_at is not None and attempt == "first" and (epoch, k + 1) == tuple(stop_at):
                _report({"epoch": epoch}, train_it.state_dict())
                record["actor_pids"] = train_it.actor_pids
                _dump(config["out_dir"], f"{attempt}_rank{rank}.json", record)
                if config.get("crash"):
                    raise RuntimeError("simulated Train worker crash after a checkpoint")
                return
        if val_it is not None:
            record["val"].append([y for b in val_it for y in b["labels"].ravel().tolist()])
        _report({"epoch": epoch, **train_it.stats()}, train_it.state_dict())
    record["actor_pids"] = train_it.actor_pids
    _dump(config["out_dir"], f"{attempt}_rank{rank}_ws{ray.train.get_context().get_world_size()}.json", record)


def fit(tmp_path, name, config, num_workers=2, cpu_per_worker=1.0, max_failures=0):
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"out_dir": str(out_dir), **config},
        scaling_config=ScalingConfig(num_workers=num_workers, resources_per_worker={"CPU": cpu_per_worker}),
        run_config=RunConfig(
            name=name, storage_path=str(tmp_path / "storage"), failure_config=FailureConfig(max_failures=max_failures)
        ),
    )
    return trainer.fit(), str(out_dir)


def train_labels(records, epoch):
    """Per file: the labels of one epoch's batches, in order."""
    return {name: [lab for e, lab in r["train"] if e == epoch] for name, r in records.items()}


def assert_no_shm_left(records) -> None:
    """No /dev/shm segment of the loader actors that served these records remains."""
    assert_no_segments_of(p for r in records.values() for p in r.get("actor_pids", []))


def test_two_workers_two_epochs_train_and_val_exactly_once_even_with_an_actor_killed(tmp_path):
    loaders = {
        "train": Loader(pipeline, outputs=("images", "labels"), shuffle=True),
        "val": Loader(pipeline, outputs=("images", "labels"), n=40),
    }
    result, out = fit(tmp_path, "basic", {"loaders": loaders, "epochs": 2, "kill_actor_at": (1, 0, 3)})
    records = _load_all(out, "first_rank*.json")
    assert len(records) == 2
    for epoch in range(2):  # "pad": ceil(103 / 8) = 13 steps per rank, sample 0's position repeated
        per_rank = train_labels(records, epoch)
        assert [len(b) for b in per_rank.values()] == [13, 13]
        flat = [i for batches in per_rank.values() for b in batches for i in b]
        assert set(flat) == set(range(103)) and len(flat) == 26 * B
        val = [r["val"][epoch] for r in records.values()]
        assert sorted(val[0] + val[1]) == list(range(40))  # 40 samples fill 5 rounds: no padding
    shuffled = train_labels(records, 0)["first_rank0_ws2.json"]
    assert shuffled != [list(range(g * B, g * B + B)) for g in range(0, 26, 2)]
    assert [len(r["actor_pids"]) for r in records.values()] == [1, 2]  # rank 1's actor restarted once
    m = result.metrics
    assert m["batches"] == 26 and m["samples"] == 26 * B and m["samples_per_s"] > 0
    assert m["padded_samples"] == 0  # the repeat is in rank 1's last batch (global batch 25)
    assert m["actor_restarts"] == 0 and m["transport"] == "host"
    assert_no_shm_left(records)


def test_crashed_worker_group_resumes_mid_epoch_from_the_checkpoint_exactly_once(tmp_path):
    loaders = {"train": Loader(pipeline, outputs=("images", "labels"), shuffle=True)}
    config = {"loaders": loaders, "epochs": 2, "stop_after": (0, 5), "crash": True}
    result, out = fit(tmp_path, "crash", config, max_failures=1)
    first = _load_all(out, "first_rank*.json")
    resumed = _load_all(out, "resumed_rank*.json")
    assert len(first) == 2 and len(resumed) == 2
    before = [i for r in first.values() for _, b in r["train"] for i in b]
    after = [i for r in resumed.values() for e, b in r["train"] if e == 0 for i in b]
    assert len(before) == 2 * 5 * B and len(after) == 2 * (13 - 5) * B
    # "pad": every sample across the crash, and only the one repeat an uninterrupted epoch has
    assert set(before + after) == set(range(103)) and len(set(before)) == len(before)
    whole = [i for r in resumed.values() for e, b in r["train"] if e == 1 for i in b]
    assert set(whole) == set(range(103)) and len(whole) == 26 * B
    assert result.metrics["epoch"] == 1
    assert_no_shm_left({**first, **resumed})  # the crashed group's actors were killed with it


def test_resume_with_three_workers_after_two_continues_the_epoch_exactly_once(tmp_path):
    loaders = {"train": Loader(pipeline, outputs=("images", "labels"), shuffle=True)}
    config = {"loaders": loaders, "epochs": 1, "stop_after": (0, 4)}
    result, out = fit(tmp_path, "elastic-a", config)
    with result.checkpoint.as_directory() as d, open(os.path.join(d, "loader.json")) as f:
        state = json.load(f)
    assert state["epoch_idx"] == 0 and state["consumed_batches"] == 8
    # A new run (new Loader object, new seed) with 3 workers: the state carries the seed.
    loaders = {"train": Loader(pipeline, outputs=("images", "labels"), shuffle=True)}
    config = {"loaders": loaders, "epochs": 1, "resume_state": state}
    fit(tmp_path, "elastic-b", config, num_workers=3, cpu_per_worker=0.5)
    first = _load_all(out, "first_rank*.json")
    resumed = _load_all(out, "resumed_rank*_ws3.json")
    assert len(resumed) == 3
    counts = [len(r["train"]) for r in resumed.values()]
    assert counts == [6] * 3  # "pad": equal steps on every rank of the new layout, ceil((103 - 32) / 12)
    seen = [i for r in (*first.values(), *resumed.values()) for _, b in r["train"] for i in b]
    assert set(seen) == set(range(103)) and len(seen) == (8 + 18) * B  # one repeat
    assert_no_shm_left({**first, **resumed})


def test_source_error_fails_the_run_with_the_sample_index_and_traceback(tmp_path):
    loaders = {"train": Loader(pipeline, outputs=("images", "labels"), n=40, bad=13)}
    with pytest.raises(ray.train.TrainingFailedError) as info:
        fit(tmp_path, "error", {"loaders": loaders, "epochs": 1})
    text = str(info.value)  # Ray Train shows a snippet: the head and the tail of the traceback
    assert "SourceError" in text and "idx_in_epoch=13" in text and "record 13 is unreadable" in text
    assert "rank 1/2" in text  # global batch 3 is rank 1's
    err = info.value.worker_failures[1]  # the SourceError itself, with its fields
    assert isinstance(err, SourceError) and err.idx_in_epoch == 13 and err.epoch_idx == 0
    assert "Original traceback" in str(err) and "raise ValueError" in err.remote_traceback
    assert list(info.value.worker_failures) == [1]


def test_eight_workers_eight_loader_actors_equal_steps_exactly_once(tmp_path):
    """The width of an 8-GPU host (issue: scale-out on nvidia-h100-x8), on CPUs: 8 Train workers,
    8 loader actors, an awkward sample count (103 samples, batch 4 -> 25 global batches). Policy
    "drop": whole rounds of 8, exactly once (the 1 batch and 3 samples left over are not served)."""
    loaders = {"train": Loader(pipeline, outputs=("images", "labels"), shuffle=True, last_batch_policy="drop")}
    result, out = fit(tmp_path, "eight", {"loaders": loaders, "epochs": 2}, num_workers=8, cpu_per_worker=0.25)
    records = _load_all(out, "first_rank*.json")
    assert len(records) == 8
    for epoch in range(2):
        per_rank = train_labels(records, epoch)
        assert {len(b) for b in per_rank.values()} == {25 // 8}  # equal steps: 3 batches per rank
        flat = [i for batches in per_rank.values() for b in batches for i in b]
        assert len(flat) == len(set(flat)) == 8 * 3 * B and set(flat) <= set(range(103))
    assert len({p for r in records.values() for p in r["actor_pids"]}) == 8
    assert_no_shm_left(records)


VAL_N = 50  # 1 rank: 13 batches, 2 padded samples; 2 ranks: 7 rounds, 6 padded; 3 ranks: 5 rounds, 10 padded


def _val_sums(x, y, valid):
    """A fixed model's per-batch sums over the valid samples: (squared error, correct, count, sum of
    labels); float64, integers exact in it."""
    w = torch.arange(6, dtype=torch.float64) / 10 - 0.2
    score = x.double() @ w + 0.3
    err = (score - y.double()) ** 2
    correct = (score.floor().long() % 2) == (y % 2)
    v = valid.double()
    return torch.stack([(err * v).sum(), (correct.double() * v).sum(), v.sum(), (y.double() * v).sum()])


def val_loop(config):
    """Validation only: the "exact" loader's metric over the 3-rank layout (this run's), and over
    2 and 1 ranks (explicit rank/world_size: ranks outside a layout add zeros), each all-reduced
    over the 3 Train workers."""
    import torch.distributed as dist

    rank = ray.train.get_context().get_world_rank()
    loader = config["loaders"]["val"]
    its = {3: loader.iter_torch_batches()}
    its.update({ws: loader.iter_torch_batches(rank=rank, world_size=ws) for ws in (2, 1) if rank < ws})
    for it in its.values():
        it.actors  # noqa: B018 - start every layout's loader actor now: their start-ups overlap
    metrics, steps = {}, {}
    for ws in (3, 2, 1):
        total = torch.zeros(4, dtype=torch.float64)
        steps[ws] = 0
        for b in its.get(ws, ()):
            assert b["valid"].dtype == torch.bool and b["images"].shape == (B, 6)
            total += _val_sums(b["images"], b["labels"].ravel(), b["valid"])
            steps[ws] += 1
        dist.all_reduce(total)
        metrics[ws] = total.tolist()
    for it in its.values():
        it.close()
    _dump(config["out_dir"], f"val_rank{rank}.json", {"metrics": metrics, "steps": steps})
    ray.train.report({"done": 1})


def test_exact_validation_over_two_and_three_ranks_gives_the_one_rank_metric(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    loader = Loader(pipeline, outputs=("images", "labels"), n=VAL_N, shuffle=True, last_batch_policy="exact")
    TorchTrainer(
        val_loop,
        train_loop_config={"out_dir": str(out_dir), "loaders": {"val": loader}},
        scaling_config=ScalingConfig(num_workers=3, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="exact-val", storage_path=str(tmp_path / "storage")),
    ).fit()
    records = _load_all(str(out_dir), "val_rank*.json")
    assert len(records) == 3
    for ws, rounds in (("3", 5), ("2", 7), ("1", 13)):
        assert [r["steps"][ws] for r in records.values()] == [rounds] * int(ws) + [0] * (3 - int(ws))
    idx = torch.arange(VAL_N)
    one = _val_sums(idx[:, None].expand(VAL_N, 6).float(), idx, torch.ones(VAL_N, dtype=torch.bool)).tolist()
    assert one[2] == VAL_N and one[3] == VAL_N * (VAL_N - 1) // 2  # every sample, once
    for r in records.values():  # every rank holds the all-reduced sums
        for ws in ("3", "2", "1"):
            err, correct, count, label_sum = r["metrics"][ws]
            assert (correct, count, label_sum) == tuple(one[1:])  # exactly, whatever the layout
            assert err == pytest.approx(one[0], rel=1e-12)  # float sums, in another order
