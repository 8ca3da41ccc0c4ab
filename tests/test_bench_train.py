"""The training benchmark (``ray-extsrc bench --train``), end to end on the CPU: a tiny model in a
real Ray Train CPU TorchTrainer with one worker, fed by a synthetic batch and by ray_extsrc's Loader
(CPU pipeline), each in its own process; the JSON has per-feed rates and ratios."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest

from ray_extsrc.bench._train import _summary, table

pytestmark = pytest.mark.timeout(180)


def _run(model: str, feed: str, rates: list[float], r: int = 0, **extra) -> dict:
    recs = [{"startup_to_first_batch_s": 2.0}, {"epoch": 0, "warmup": True, "images_per_s": 1.0}]
    recs += [{"epoch": i + 1, "warmup": False, "images_per_s": v} for i, v in enumerate(rates)]
    return {"model": model, "feed": feed, "round": r, "records": recs, "train_worker_tree_rss_mb": 500.0, **extra}


def test_summary_gives_each_feed_its_ratio_to_synthetic_of_the_same_model():
    runs = [_run("resnet50", "synthetic", [4000, 5000], gpu_peak_used_mb=10000),
            _run("resnet50", "extsrc-consumer", [3600, 4400], gpu_peak_used_mb=11500, loader_tree_rss_mb=700.0),
            _run("resnet18", "synthetic", [12000], gpu_peak_used_mb=6000),
            _run("resnet18", "torch", [2400], gpu_peak_used_mb=6200)]
    s = _summary(runs)
    assert s["resnet50/extsrc-consumer"]["ratio_to_synthetic"] == pytest.approx(0.8889, abs=1e-4)
    assert s["resnet50/extsrc-consumer"]["gpu_peak_above_synthetic_mb"] == 1500
    assert s["resnet50/extsrc-consumer"]["host_rss_mb"] == 1200.0
    assert s["resnet18/torch"]["ratio_to_synthetic"] == pytest.approx(0.2)
    assert s["resnet18/synthetic"]["ratio_to_synthetic"] == 1.0
    assert "resnet50/extsrc-consumer" in table(s)


def test_cpu_training_benchmark_end_to_end(tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "ray_extsrc.bench", "--train", "tiny", "--device", "cpu",
           "--feeds", "synthetic,extsrc-auto", "--spec", "small", "--images", "32", "--batch", "8", "--size", "32",
           "--epochs", "2", "--warmup", "1", "--warmup-steps", "2", "--workers", "1", "--actors", "1",
           "--num-cpus", "2", "--data", str(tmp_path / "data"), "--out", str(out), "--timeout", "120"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=170)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    [path] = out.glob("train-*.json")
    doc = json.loads(path.read_text())
    assert doc["device"].startswith("cpu") and doc["date"] and doc["mps"] is False and doc["complete"] is True
    assert doc["step"]["optimizer"] == "SGD(lr=0.1, momentum=0.9)"
    for key in ("tiny/synthetic", "tiny/extsrc-auto"):
        s = doc["summary"][key]
        assert len(s["epochs"]) == 2 and all(v > 0 for v in s["epochs"]), s
        assert s["median_images_per_s"] > 0 and s["startup_to_first_batch_s"] > 0
        assert s["ratio_to_synthetic"] > 0
    assert doc["summary"]["tiny/synthetic"]["ratio_to_synthetic"] == 1.0
    assert doc["summary"]["tiny/extsrc-auto"]["loader_tree_rss_mb"] > 0
    from ray_extsrc.bench._common import pss_mb

    if pss_mb(os.getpid()) > 0:  # a kernel with smaps_rollup: PSS beside RSS, shared pages split
        s = doc["summary"]["tiny/extsrc-auto"]
        assert 0 < s["loader_tree_pss_mb"] <= s["loader_tree_rss_mb"] and 0 < s["host_pss_mb"] <= s["host_rss_mb"]
    assert doc["summary"]["tiny/extsrc-auto"]["gpu_stage"] == "actor"  # a CPU Train worker: the actors' stage
    run = [r for r in doc["runs"] if r["feed"] == "extsrc-auto"][0]
    assert run["warmup_epochs"] == 1 and run["steps_per_epoch"] == 4
    # the feed is made before the model: its first batch is timed from there too, and against synthetic's
    for key in ("tiny/synthetic", "tiny/extsrc-auto"):
        assert 0 < doc["summary"][key]["feed_to_first_batch_median_s"] < doc["summary"][key]["startup_to_first_batch_s"]
    assert "first_batch_above_synthetic_s" in doc["summary"]["tiny/extsrc-auto"]
    # the Loader is made before Ray starts, so its Train worker inherits 32 CUDA work queues; the
    # synthetic feed's cluster (no Loader) keeps the environment it had
    synthetic = [r for r in doc["runs"] if r["feed"] == "synthetic"][0]
    assert run["cuda_device_max_connections"] == "32", run.get("cuda_device_max_connections")
    assert synthetic["cuda_device_max_connections"] == os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
    assert "host_rings" not in run and "host_rings_error" not in run  # the actors' stage: no ring asked
    stats = run["loader_stats"]
    assert 0 <= stats["startup_actors_requested_s"] < stats["startup_first_batch_s"]
    # where the start-up went (`LoaderIterator.startup_report`), milestone by milestone, in order
    up = run["startup"]
    order = ["actor_process_started", "actor_init_began", "actor_workers_started", "actor_ready", "actor_first_batch"]
    assert [up[k] for k in order] == sorted(up[k] for k in order), up
    assert -5 < up["actor_process_started"] and up["actor_first_batch"] <= up["first_batch"] < 60, up
    assert doc["summary"]["tiny/extsrc-auto"]["loader_ready_median_s"] == up["actor_first_batch"]  # actor stage
    assert doc["summary"]["tiny/synthetic"]["loader_ready_median_s"] is None and "ready s" in p.stdout
    # each process of the loader actor's tree: the actor, its zygote (and janitor), its one worker
    depths = sorted(q["depth"] for q in run["loader_processes"])
    assert depths[0] == 0 and depths.count(2) == 1 and all(q["rss_mb"] > 0 for q in run["loader_processes"]), depths
    assert "tiny/synthetic" in p.stdout and "vs syn" in p.stdout
    # where the CPU went over the timed epochs: the Train worker's threads, the loader actor's, and
    # its tree by depth (its one Python worker at depth 2)
    # (this run's timed epochs last ~0.05 s, under the 0.01 s shown: `test_cpu_use_...` checks the figures)
    use = run["cpu_use"]
    assert use["wall_s"] > 0 and {"self", "actor0", "actor0_tree_by_depth"} <= set(use), use
    assert set(use["actor0_tree_by_depth"]) <= {"1", "2"}, use
    assert synthetic["cpu_use"]["wall_s"] > 0 and "actor0" not in synthetic["cpu_use"]


def test_bench_dispatches_train_and_cpu_and_rejects_unknown_feeds():
    p = subprocess.run([sys.executable, "-m", "ray_extsrc.bench", "--train", "tiny", "--feeds", "nope"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "unknown ['nope']" in p.stderr
    p = subprocess.run([sys.executable, "-m", "ray_extsrc.bench", "--cpu", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "ray-extsrc bench --cpu" in p.stdout


@pytest.mark.gpu
@pytest.mark.timeout(540)  # five feeds, each a Ray Train run of ~40 s on an H100, plus the data
def test_gpu_training_benchmark_every_feed(tmp_path):
    pytest.importorskip("torchvision")
    pytest.importorskip("cupy")
    from ray_extsrc.train import Loader

    if "gpu_stage" not in inspect.signature(Loader).parameters:
        pytest.skip("Loader has no gpu_stage yet")
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "ray_extsrc.bench", "--train", "resnet18", "--images", "1024", "--epochs", "1",
           "--warmup", "1", "--warmup-steps", "2", "--workers", "4", "--actors", "2", "--torch-workers", "4",
           "--data", str(tmp_path / "data"), "--out", str(out), "--timeout", "170"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=510)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    [path] = out.glob("train-*.json")
    doc = json.loads(path.read_text())
    summary = doc["summary"]
    assert set(summary) == {f"resnet18/{f}" for f in ("synthetic", "extsrc-consumer", "extsrc-actor", "extsrc-auto",
                                                      "torch")}
    # where the Train worker's GPU memory sits: torch's cache, and the consumer-side stage's CuPy pool
    consumer = [r for r in doc["runs"] if r["feed"] == "extsrc-consumer"][0]
    assert consumer["torch_max_reserved_mb"] >= consumer["torch_max_allocated_mb"] > 0
    assert consumer["cupy_pool_total_mb"] > 0, consumer
    assert summary["resnet18/extsrc-consumer"]["gpu_stage"] == "consumer"
    assert summary["resnet18/extsrc-actor"]["gpu_stage"] == "actor"
    assert all(s["ratio_to_synthetic"] > 0 and s["gpu_peak_used_mb"] > 0 for s in summary.values())


def test_the_benchmarks_split_their_workers_over_the_actors_the_loader_makes(monkeypatch, tmp_path):
    from ray_extsrc.bench._common import loader_ways

    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))  # no MPS daemon: "auto" is the consumer stage
    assert loader_ways(0, "consumer", True) == 1 and loader_ways(0, None, True) == 1
    assert loader_ways(0, "actor", True) == 3 and loader_ways(0, None, False) == 1
    assert loader_ways(2, "consumer", True) == 2  # --actors N: N
