"""The R1 benchmark's report: ratios against the peers and the multi-GPU scaling line (CPU only)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from ray_extsrc.bench._report import multi_gpu, table
from ray_extsrc.bench._common import rss_mb as _rss_mb, tree_rss_mb as _tree_rss_mb

pytestmark = pytest.mark.timeout(60)


def _row(system: str, rate: float) -> dict:
    return {"system": system, "median_images_per_s": rate, "epochs": [rate], "startup_to_first_batch_s": 1.0,
            "gpu_peak_used_mb": 100, "tree_rss_mb": 10.0}


def test_table_gives_each_ratio_and_the_scaling_per_gpu():
    summary = {
        "b": _row("ray_extsrc_in_train", 24000), "b8": _row("ray_extsrc_in_train_8gpus", 172800),
        "c": _row("torch_dataloader", 2400), "d": _row("ray_data", 1200),
        "e1": _row("decode_nvimgcodec", 16000), "e2": _row("decode_torchvision", 20000),
    }
    out = table(summary)
    assert "ray_extsrc_in_train / best decode-only: 1.20x" in out  # the faster decode-only peer
    assert "ray_extsrc_in_train / torch DataLoader: 10.00x" in out
    assert "ray_extsrc_in_train / Ray Data: 20.00x" in out
    assert "8 GPUs / 1 GPU (in Train): 7.20x (21,600 img/s per GPU)" in out
    assert out.index("ray_extsrc_in_train ") < out.index("ray_extsrc_in_train_8gpus") < out.index("torch_dataloader")


def test_system_names_for_several_gpus():
    assert [multi_gpu(s) for s in ("b", "b1", "b2", "b8", "bx", "e1")] == [0, 0, 2, 8, 0, 0]
    p = subprocess.run([sys.executable, "-m", "ray_extsrc.bench._runner", "zz", "--root", "/nonexistent"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "unknown system 'zz'" in p.stderr


def test_tree_rss_counts_a_process_and_its_descendants():
    child = subprocess.Popen([sys.executable, "-c", "import sys; b = bytearray(64 << 20); sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 5
        while _rss_mb(child.pid) < 64 and time.monotonic() < deadline:  # until it holds its 64 MB
            time.sleep(0.05)
        me = os.getpid()
        assert _tree_rss_mb(me) >= _rss_mb(me) + _rss_mb(child.pid) - 1
        assert 64 <= _tree_rss_mb(child.pid) < _tree_rss_mb(me)
    finally:
        child.communicate(b"", timeout=30)


def test_tree_pss_counts_pages_a_forked_child_shares_once():
    from ray_extsrc.bench._common import pss_mb, tree_pss_mb

    if pss_mb(os.getpid()) == 0:
        pytest.skip("this kernel gives no /proc/PID/smaps_rollup")
    code = ("import os, sys\n"
            "b = bytearray(os.urandom(1 << 20) * 96)\n"  # 96 MB of touched pages, then a fork shares them
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    sys.stdin.read(); os._exit(0)\n"
            "print('ready', flush=True); sys.stdin.read(); os.waitpid(pid, 0)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert parent.stdout.readline().strip() == b"ready"
        time.sleep(0.2)
        rss, pss = _tree_rss_mb(parent.pid), tree_pss_mb(parent.pid)
        assert rss >= 2 * 96  # the shared 96 MB in both processes
        assert 96 <= pss < rss - 80  # ... once
    finally:
        parent.communicate(b"", timeout=30)


def _spin(seconds: float, then: threading.Event | None = None) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
    if then is not None:
        then.wait(30)  # alive until measured: a thread that has ended is gone from /proc


def test_cpu_use_gives_each_thread_and_each_depth_of_a_process_tree_its_cpu_seconds():
    from ray_extsrc.bench._common import CpuUse, thread_cpu_s

    # a process that spins 0.4 s of CPU in a forked child (depth 1) and 0.3 s in a thread of its
    # own (named "spinner" for the kernel), and waits with both alive
    code = ("import os, sys, threading, time, ctypes\n"
            "def spin(s):\n"
            "    end = time.thread_time() + s\n"
            "    while time.thread_time() < end: pass\n"
            "spun = threading.Event()\n"
            "def named():\n"
            "    ctypes.CDLL(None).prctl(15, b'spinner', 0, 0, 0)\n"  # PR_SET_NAME
            "    spin(0.3); spun.set(); time.sleep(60)\n"
            "sys.stdin.readline()\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    spin(0.4); print('child', flush=True); sys.stdin.read(); os._exit(0)\n"
            "threading.Thread(target=named, daemon=True).start(); spun.wait()\n"
            "print('done', flush=True); sys.stdin.read(); os.waitpid(pid, 0)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    cpu = CpuUse()
    assert cpu.report() == {}  # not started
    release = threading.Event()
    mine = threading.Thread(target=_spin, args=(0.3, release), name="bench-test-spinner")
    try:
        cpu.start([child.pid])
        mine.start()
        child.stdin.write(b"go\n")
        child.stdin.flush()
        assert {child.stdout.readline().strip() for _ in range(2)} == {b"done", b"child"}  # both spun
        mine_spun = time.monotonic() + 10
        while thread_cpu_s().get("bench-test-spinner", 0.0) < 0.25 and time.monotonic() < mine_spun:
            time.sleep(0.02)
        cpu.stop()
        rep = cpu.report()
    finally:
        release.set()
        child.communicate(b"", timeout=30)
        mine.join()
    assert rep["wall_s"] >= 0.3
    assert 0.25 <= rep["self"]["bench-test-spinner"] <= rep["wall_s"] + 0.05  # a Python thread by its name
    assert 0.25 <= rep["actor0"]["spinner"] < 0.6  # another process's thread by the kernel's name
    assert 0.35 <= rep["actor0_tree_by_depth"]["1"] < 0.8  # the forked child, depth 1
    assert list(rep["self"].values()) == sorted(rep["self"].values(), reverse=True)
    assert thread_cpu_s(2**22 + 12345) == {}  # no such process
    # as `timed`'s hook: starts before the first timed epoch only; pids that fail: this process alone
    hooked = CpuUse()
    hook = hooked.start_at(1, lambda: 1 / 0)
    hook(0)
    hooked.stop()
    assert hooked.report() == {}  # not started before epoch 1
    hook(1)
    hooked.stop()
    assert "self" in hooked.report() and "actor0" not in hooked.report()


def test_table_counts_the_loader_actors_memory_for_train_systems():
    row = {**_row("ray_extsrc_in_train", 24000), "tree_rss_mb": 800.0, "loader_tree_rss_mb": 1500.0}
    line = [ln for ln in table({"b": row}).splitlines() if ln.startswith("ray_extsrc_in_train ")][0]
    assert line.split()[-1] == "2300"


def test_reader_suffixes_name_the_reader_and_are_refused_elsewhere():
    from ray_extsrc.bench._report import split_reader

    assert split_reader("a") == ("a", "file_list")
    assert split_reader("a:wds") == ("a", "webdataset")
    assert split_reader("b2:folder") == ("b2", "image_folder")
    for bad in ("c:wds", "a:zip", "e1:folder"):
        with pytest.raises(ValueError, match="reader suffix"):
            split_reader(bad)
    p = subprocess.run([sys.executable, "-m", "ray_extsrc.bench._runner", "d:wds", "--root", "/nonexistent"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "a reader suffix goes on a, b or bN" in p.stderr


def test_table_sets_each_reader_against_the_file_list_of_the_same_run():
    summary = {"a": _row("ray_extsrc", 20000), "a:wds": _row("ray_extsrc_webdataset", 19000),
               "a:folder": _row("ray_extsrc_image_folder", 20400)}
    out = table(summary)
    assert "ray_extsrc_webdataset / ray_extsrc: 0.95x" in out
    assert "ray_extsrc_image_folder / ray_extsrc: 1.02x" in out
    assert out.index("ray_extsrc ") < out.index("ray_extsrc_image_folder") < out.index("ray_extsrc_webdataset")


def test_r1_pipeline_reads_the_same_samples_through_every_reader(tmp_path):
    """The bench's a:folder and a:wds run the R1 pipeline on the very images of the file list (CPU)."""
    import dataclasses

    import numpy as np

    from ray_extsrc.bench._pipelines import r1_pipeline, r1_shards
    from ray_extsrc.synthetic import SMALL, make_jpeg_dataset

    root = str(make_jpeg_dataset(tmp_path / "r1", dataclasses.replace(SMALL, num_images=24), progress=False))
    pattern = r1_shards(root, samples_per_shard=10)
    assert pattern == r1_shards(root)  # written once, then reused
    assert len(os.listdir(root + "-shards")) >= 3
    from ray_extsrc.bench._pipelines import READERS

    images = {}
    for reader, where in (("file_list", root), ("image_folder", root), ("webdataset", pattern)):
        pipe = r1_pipeline(where, None, device="cpu", size=32, batch=8, dtype="float32", reader=reader,
                           batch_size=8, py_num_workers=2, device_id=None)
        with pipe:
            pipe.build()
            images[reader] = np.stack([np.asarray(pipe.run()[0].as_tensor()) for _ in range(3)])
        assert images[reader].shape == (3, 8, 3, 32, 32)
        with pytest.raises(StopIteration):  # 24 images: three batches, then the epoch ends
            pipe.run()
    # the shards keep the file list's order, so the same crops of the same images come out
    np.testing.assert_array_equal(images["file_list"], images["webdataset"])
    # the folder tree is sorted by class: the same files, in another order
    listed = [READERS[r](root if r != "webdataset" else pattern) for r in READERS]
    encoded = [sorted(bytes(src.read_sample(i)[0]) for i in range(len(src))) for src in listed]
    assert encoded[0] == encoded[1] == encoded[2] and len(encoded[0]) == 24


def test_summarize_trace_merges_overlaps_finds_the_step_streams_gaps_and_stalling_calls():
    from ray_extsrc.bench._probe import summarize_trace

    def gpu(ts, dur, stream, name="k", cat="kernel"):
        return {"ph": "X", "cat": cat, "ts": ts, "dur": dur, "name": name, "args": {"stream": stream}}

    trace = {"traceEvents": [
        gpu(0, 400, 7), gpu(300, 300, 7), gpu(1000, 500, 7),  # stream 7: [0, 600] and [1000, 1500]
        gpu(100, 50, 20, "resize"), gpu(700, 200, 20, "copy", "gpu_memcpy"),
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 10, "dur": 2000, "tid": 5},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 10, "dur": 9000, "tid": 5},
        {"ph": "i", "cat": "kernel", "ts": 0, "name": "instant"},
    ]}
    out = summarize_trace(trace)
    assert out["step_stream"] == 7  # the busiest stream
    assert out["window_ms"] == 1.5
    assert out["streams"][7]["busy_ms"] == 1.1 and out["streams"][7]["events"] == 3
    assert out["step_stream_idle_ms"] == 0.4 and out["step_stream_top_gaps_ms"] == [0.4]
    assert out["step_stream_gaps_over_0.2ms"] == 1
    assert out["streams"][20] == {"busy_ms": 0.25, "events": 2, "kernel_ms": 0.05, "gpu_memcpy_ms": 0.2}
    assert out["other_streams_top"][20] == [("copy", 0.2), ("resize", 0.05)]
    assert out["stalling_calls"] == {"cudaStreamSynchronize @tid 5": {"n": 1, "ms": 2.0}}  # a launch is not one
    assert summarize_trace({"traceEvents": []}) == {"error": "no GPU activity in the trace"}


def test_gap_causes_tells_a_late_launch_from_work_that_waited_on_the_device():
    from ray_extsrc.bench._probe import summarize_trace

    def gpu(ts, dur, stream, corr, name="k"):
        return {"ph": "X", "cat": "kernel", "ts": ts, "dur": dur, "name": name,
                "args": {"stream": stream, "correlation": corr}}

    def launch(ts, corr, tid=5):
        return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 10, "tid": tid,
                "args": {"correlation": corr}}

    trace = {"traceEvents": [
        gpu(0, 600, 7, 1), launch(0, 1),
        # gap 1 (600 -> 1000): its kernel was launched at 900, inside aten::conv: the host was late
        gpu(1000, 500, 7, 2), launch(900, 2), {"ph": "X", "cat": "cpu_op", "name": "aten::conv", "ts": 850, "dur": 100, "tid": 5},
        # gap 2 (1500 -> 2000): launched at 100, long before; a decode copy ended at 1990
        gpu(2000, 500, 7, 3), launch(100, 3), gpu(1700, 290, 30, 9, "nvjpeg copy"),
        gpu(2600, 100, 7, 4),  # gap 3 (100 us) and no launch for it
        gpu(2710, 100, 7, 5),  # gap 4 (10 us): under the threshold, not counted
    ]}
    causes = summarize_trace(trace)["step_stream_gap_causes"]
    assert causes["host_late"]["n"] == 1 and causes["host_late"]["ms"] == 0.4
    assert causes["host_late"]["late_by_cpu_op_ms"] == {"aten::conv": 0.31}  # returned at 910: 310 us late
    assert causes["host_late"]["late_by_thread_and_outer_op_ms"] == {"tid 5: aten::conv": 0.31}
    assert causes["device_wait"]["n"] == 1 and causes["device_wait"]["ms"] == 0.5
    assert causes["device_wait"]["other_streams_ended_just_before"] == {"30: nvjpeg copy": 1}
    assert causes["unmatched"] == {"n": 1, "ms": 0.1}


def test_launching_threads_times_the_cuda_calls_of_the_threads_that_fed_the_step():
    from ray_extsrc.bench._probe import summarize_trace

    def gpu(ts, stream, corr):
        return {"ph": "X", "cat": "kernel", "ts": ts, "dur": 50, "name": "k", "args": {"stream": stream, "correlation": corr}}

    def call(ts, dur, tid, corr=None, name="cudaLaunchKernel"):
        return {"ph": "X", "cat": "cuda_runtime", "name": name, "ts": ts, "dur": dur, "tid": tid,
                "args": {} if corr is None else {"correlation": corr}}

    trace = {"traceEvents": [
        gpu(100, 7, 1), gpu(200, 7, 2), gpu(300, 7, 3), gpu(400, 7, 4), gpu(150, 30, 9),
        call(0, 4, 5, 1), call(10, 8, 5, 2), call(20, 30, 6, 3), call(30, 10, 6, 4),
        call(40, 100, 6, name="cudaEventQuery"),
        call(50, 20, 8, 9),  # a decode thread: its launch went to another stream, so it is not listed
    ]}
    out = summarize_trace(trace)["launching_threads"]
    assert set(out) == {"tid 5", "tid 6"}
    assert out["tid 5"] == {"calls": 2, "ms": 0.01, "mean_us": {"cudaLaunchKernel": 6.0}, "p90_us": {"cudaLaunchKernel": 4}}
    assert out["tid 6"]["calls"] == 3 and out["tid 6"]["ms"] == 0.14
    assert out["tid 6"]["mean_us"] == {"cudaLaunchKernel": 20.0, "cudaEventQuery": 100.0}


def test_backward_gil_times_eager_and_torchscript_backward_alone_and_beside_a_python_thread():
    pytest.importorskip("torch")
    from ray_extsrc.bench._probe import backward_gil

    from ray_extsrc.bench._probe import Disturbance, disturbance_work

    work, _ = disturbance_work("numpy", [], None)
    recs = backward_gil("cpu", steps=3, size=8, beside={"numpy": lambda: Disturbance("numpy", work)})
    assert [r["model"] for r in recs] == ["eager", "torchscript"]
    for r in recs:
        assert r["backward_ms_alone"] > 0 and r["backward_ms_beside_python_thread"] > 0
        assert r["backward_ms_beside_numpy"] > 0
        assert r["gil_takes_per_backward"] == round((r["backward_ms_beside_python_thread"] - r["backward_ms_alone"])
                                                    / r["switch_interval_ms"], 1)
    assert not any(t.name in ("probe-spin", "probe-numpy") for t in threading.enumerate())  # all stopped


def test_probe_disturbance_runs_its_work_in_threads_until_stopped_and_reports_a_rate():
    from ray_extsrc.bench._probe import Disturbance, disturbance_work

    work, cleanup = disturbance_work("python", [], None)
    assert cleanup is None
    with Disturbance("python", work, threads=2) as d:
        time.sleep(0.3)
    assert d.count > 0 and d.rate > 0
    assert not any(t.is_alive() for t in d.threads)
    n = d.count
    time.sleep(0.1)
    assert d.count == n  # stopped: nothing runs after the block
    with pytest.raises(ValueError, match="one of"):
        disturbance_work("nonsense", [], None)



def test_every_decoder_sweep_variant_names_a_system_and_valid_decoder_options():
    """`bench._variants`: each variant's decoder settings pass `DecoderOptions` as the runner's
    ``--decoder`` text, and its system is one the runner knows; bad ones fail here, not on a GPU."""
    from ray_extsrc.bench._pipelines import parse_decoder_options
    from ray_extsrc.bench._runner import SYSTEMS
    from ray_extsrc.bench._variants import VARIANTS, decoder_arg

    for name, (system, options, _extra, copies) in VARIANTS.items():
        assert (system in SYSTEMS or (system[:1] == "b" and system[1:].isdigit())) and copies >= 1, name
        args = decoder_arg(options)
        assert parse_decoder_options(args[1] if args else "") == options, name
    assert VARIANTS["b split .6 hybrid h0"][1]["hybrid_huffman_threshold"] == 0
