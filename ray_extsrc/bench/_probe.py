"""Probe: why a training step fed by the consumer-side GPU stage (`Loader(gpu_stage="consumer")`)
runs slower than the same step on a synthetic batch. One process, no Ray: the R1 host batches are
made first (before CUDA, with the pipeline's forked workers), then replayed into a
`ConsumerStage` next to a torchvision model's training step, under several settings.

    ray-extsrc bench --probe --data /tmp/r1 --model resnet18 --out out/probe.json
    python benchmarks/probe_consumer_stage.py ...     (the same, from a checkout)

Each phase prints one JSON line: images/s of the step (or of the stage alone), the main thread's
CPU time per step (a step whose CPU time nears its wall time is bound by Python), and the stage
threads' CPU time per batch. ``--pyspy`` also samples the process with py-spy (``--gil``: only
the thread holding the GIL) during the first fed phase, as collapsed stacks (``--nonblocking``: the
process is not paused, so the phase's speed stays near comparable and a sample can be torn; give
that phase ``--steps`` enough to outlast py-spy's 6 s). ``--phases interfere`` times the synthetic
step beside each of `DISTURBANCES` (``--disturb``) instead of beside the stage, to tell which kind
of work in the same process slows it. ``--phases ownstream`` also runs the step on a torch stream of
its own (not the legacy default stream, which every blocking stream in the process syncs with);
``profile`` records a torch.profiler trace of the first fed phases and says why the step's stream
sat idle (`gap_causes`); ``--summarize TRACE...`` prints that summary for saved traces;
``--backward-gil DEVICE`` counts how often a backward pass takes the GIL (`backward_gil`), and the
``backward_gil`` phase times it beside the real consumer stage too.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import threading
import time
import types as pytypes
import warnings
from typing import Any

__all__ = ["DISTURBANCES", "Disturbance", "ThreadClock", "cpu_by_thread", "disturbance_work", "backward_gil", "gap_causes", "launching_threads", "host_batches", "kernel_times", "main", "set_sched_flag", "summarize_trace", "thread_ticks"]

BATCH = 256


def host_batches(root: str, n: int) -> list:
    """``n`` R1 batches after the host stage (the loader actor's half), made before CUDA starts."""
    from ray_extsrc.bench._pipelines import r1_pipeline

    pipe = r1_pipeline(root=root, batch=BATCH, device_id=0)
    pipe.serve_host_stage()
    pipe.build()
    out = [pipe.run()[0] for _ in range(n)]
    pipe.close()
    return out


def kernel_times(make_stage, fed, steps: int) -> None:
    """GPU milliseconds per batch of the stage's resize and crop-mirror-normalize kernels (CUDA
    events around each call, on the GPU with nothing else running), and the stage's wall time."""
    import cupy

    from ray_extsrc.fn._gpu import kernels, ops

    marks: dict[str, list] = {"resize": [], "crop_mirror_normalize": []}

    def timed(name, fn):
        def run(*a, **k):
            s = cupy.cuda.get_current_stream()
            e0 = s.record()
            out = fn(*a, **k)
            marks[name].append((e0, s.record()))
            return out
        return run

    saved = {n: getattr(kernels, n) for n in marks}
    for n in marks:
        setattr(ops.kernels, n, timed(n, saved[n]))
    try:
        stage, _ = make_stage(2)
        it = fed(stage, 1)  # one batch at a time: the events bracket that batch's kernels only
        for _ in range(5):
            next(it)
        for n in marks:
            marks[n].clear()
        t0 = time.perf_counter()
        for _ in range(steps):
            next(it)
        cupy.cuda.Device().synchronize()
        wall = time.perf_counter() - t0
        rec = {"phase": "stage_kernels", "images_per_s": round(steps * BATCH / wall)}
        for n, pairs in marks.items():
            ms = [cupy.cuda.get_elapsed_time(a, b) for a, b in pairs]
            rec[f"{n}_gpu_ms_per_batch"] = round(sum(ms) / max(1, len(ms)), 3)
        print(json.dumps(rec), flush=True)
        it.close()
        stage.close()
    finally:
        for n, fn in saved.items():
            setattr(kernels, n, fn)


_SYNCING = ("Synchronize", "cudaFree", "cudaMalloc", "cudaHostAlloc", "cudaMallocHost", "cudaFreeHost",
            "cudaHostRegister", "cudaHostUnregister", "cuMemAlloc", "cuMemFree", "cuMemHostAlloc", "cuMemFreeHost",
            "cuStreamSynchronize", "cuEventSynchronize", "cuCtxSynchronize", "cudaMemcpy ", "cuMemcpyDtoH_v2",
            "cuMemcpyHtoD_v2")


def summarize_trace(trace: dict, step_stream: int | None = None) -> dict:
    """What a torch.profiler chrome trace says about the GPU: busy milliseconds per stream (the
    union of its kernels, copies and sets), how long the step's stream (the busiest one, unless
    given) sat idle inside the window, the top kernels of every other stream, and the host calls
    that can stall the device or the calling thread (synchronisations, allocations), by thread."""
    ev = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    gpu = [e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not gpu:
        return {"error": "no GPU activity in the trace"}
    by_stream: dict[int, list] = collections.defaultdict(list)
    for e in gpu:
        by_stream[int(e.get("args", {}).get("stream", -1))].append((e["ts"], e["ts"] + e["dur"], e))

    def union(iv: list) -> list:  # the merged [start, end] spans of the intervals
        out: list = []
        for a, b, _ in sorted(iv, key=lambda t: t[0]):
            if out and a <= out[-1][1]:
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
        return out

    def busy(spans: list) -> float:
        return sum(b - a for a, b in spans)

    t0 = min(a for iv in by_stream.values() for a, _, _ in iv)
    t1 = max(b for iv in by_stream.values() for _, b, _ in iv)
    streams = {}
    for s, iv in by_stream.items():
        kinds = collections.Counter()
        for a, b, e in iv:
            kinds[e["cat"]] += b - a
        streams[s] = {"busy_ms": round(busy(union(iv)) / 1e3, 2), "events": len(iv), **{f"{k}_ms": round(v / 1e3, 2) for k, v in kinds.items()}}
    if step_stream is None:
        step_stream = max(streams, key=lambda s: streams[s]["busy_ms"])
    spans = union(by_stream[step_stream])
    gaps = sorted((b[0] - a[1] for a, b in zip(spans, spans[1:])), reverse=True)
    others = {}
    for s, iv in by_stream.items():
        if s == step_stream:
            continue
        top = collections.Counter()
        for a, b, e in iv:
            top[e["name"][:80]] += b - a
        others[s] = [(n, round(d / 1e3, 2)) for n, d in top.most_common(6)]
    calls: dict[str, dict] = collections.defaultdict(lambda: {"n": 0, "ms": 0.0})
    for e in ev:
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and any(k in e["name"] for k in _SYNCING):
            c = calls[f"{e['name']} @tid {e.get('tid')}"]
            c["n"] += 1
            c["ms"] = round(c["ms"] + e["dur"] / 1e3, 2)
    return {"window_ms": round((t1 - t0) / 1e3, 2), "step_stream": step_stream,
            "launching_threads": launching_threads(ev, by_stream[step_stream]),
            "step_stream_idle_ms": round(((t1 - t0) - busy(spans)) / 1e3, 2),
            "step_stream_gap_causes": gap_causes(ev, by_stream, step_stream, spans),
            "step_stream_top_gaps_ms": [round(g / 1e3, 2) for g in gaps[:10]],
            "step_stream_gaps_over_0.2ms": sum(1 for g in gaps if g > 200),
            "streams": streams, "other_streams_top": others,
            "stalling_calls": dict(sorted(calls.items(), key=lambda kv: -kv[1]["ms"])[:25])}


def launching_threads(ev: list, step_ops: list, top: int = 6) -> dict:
    """The host threads that queued the step's GPU work, and how long their CUDA API calls took:
    per thread, the calls' count and total milliseconds, and the most frequent calls with their
    mean microseconds. Fed and synthetic side by side tell a slower driver (the same calls take
    longer: contention inside the CUDA driver) from a thread that is late between its calls (the
    GIL, a descheduled thread)."""
    corr = {e.get("args", {}).get("correlation") for _, _, e in step_ops}
    tids = {e.get("tid") for e in ev if e.get("cat") in ("cuda_runtime", "cuda_driver")
            and e.get("args", {}).get("correlation") in corr}
    out = {}
    for tid in sorted(tids, key=str):
        calls = [e for e in ev if e.get("tid") == tid and e.get("cat") in ("cuda_runtime", "cuda_driver")]
        by_name: dict[str, list] = collections.defaultdict(list)
        for e in calls:
            by_name[e["name"]].append(e["dur"])
        common = sorted(by_name.items(), key=lambda kv: -len(kv[1]))[:top]
        out[f"tid {tid}"] = {"calls": len(calls), "ms": round(sum(e["dur"] for e in calls) / 1e3, 2),
                             "mean_us": {k: round(sum(v) / len(v), 2) for k, v in common},
                             "p90_us": {k: round(sorted(v)[int(0.9 * (len(v) - 1))], 2) for k, v in common}}
    return out


def gap_causes(ev: list, by_stream: dict, step_stream: int, spans: list, min_us: float = 20.0) -> dict:
    """Why the step's stream sat idle, gap by gap (gaps over ``min_us``), from the launch that
    ended each gap (matched to the GPU op by the trace's ``correlation`` id):

    * ``host_late``: that launch returned after the stream had gone idle — the GPU waited for the
      host thread to queue work (the GIL, a lock, a wait for the batch, Python time);
    * ``device_wait``: the work was queued before the gap began and still did not start — a
      dependency on the device (an event wait, an implicit sync with the legacy default stream,
      another stream's work holding the resources it needs);
    * ``unmatched``: no launch found for it.

    For each cause: the gaps' count and milliseconds; for ``host_late``, the launching thread's
    lateness by the CPU op it ran in (what the host was doing); for ``device_wait``, the other
    streams' ops that ended within 20 us before the step's stream resumed.
    """
    launches = {}
    for e in ev:
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {}):
            launches[e["args"]["correlation"]] = e
    ops = [e for e in ev if e.get("cat") in ("cpu_op", "user_annotation", "python_function")]
    first_after = {}  # span start -> the earliest GPU op on the step's stream starting there
    for a, _, e in by_stream[step_stream]:
        if a not in first_after or e["ts"] < first_after[a]["ts"]:
            first_after[a] = e
    out: dict[str, dict] = {k: {"n": 0, "ms": 0.0} for k in ("host_late", "device_wait", "unmatched")}
    late_in: collections.Counter = collections.Counter()
    late_outer: collections.Counter = collections.Counter()  # by (thread, outermost CPU op)
    ended_before: collections.Counter = collections.Counter()
    for prev, nxt in zip(spans, spans[1:]):
        gap = nxt[0] - prev[1]
        if gap <= min_us:
            continue
        op = first_after.get(nxt[0])
        launch = launches.get(op.get("args", {}).get("correlation")) if op else None
        if launch is None:
            kind = "unmatched"
        elif launch["ts"] + launch["dur"] > prev[1]:
            kind = "host_late"
            tid = launch.get("tid")
            inside = [o for o in ops if o.get("tid") == tid and o["ts"] <= launch["ts"] <= o["ts"] + o["dur"]]
            name = min(inside, key=lambda o: o["dur"])["name"][:60] if inside else "(no CPU op)"
            outer = max(inside, key=lambda o: o["dur"])["name"][:60] if inside else "(no CPU op)"
            late = min(gap, launch["ts"] + launch["dur"] - prev[1])
            late_in[name] += late
            late_outer[f"tid {tid}: {outer}"] += late
        else:
            kind = "device_wait"
            for s, iv in by_stream.items():
                if s != step_stream:
                    for _, b, e in iv:
                        if nxt[0] - 20 <= b <= nxt[0]:
                            ended_before[f"{s}: {e['name'][:60]}"] += 1
        out[kind]["n"] += 1
        out[kind]["ms"] = round(out[kind]["ms"] + gap / 1e3, 2)
    out["host_late"]["late_by_cpu_op_ms"] = {k: round(v / 1e3, 2) for k, v in late_in.most_common(8)}
    # the autograd engine's device thread runs the backward ops ("autograd::engine::evaluate_function")
    out["host_late"]["late_by_thread_and_outer_op_ms"] = {k: round(v / 1e3, 2) for k, v in late_outer.most_common(10)}
    out["device_wait"]["other_streams_ended_just_before"] = dict(ended_before.most_common(8))
    return out


def thread_ticks() -> dict[int, tuple[str, int]]:
    """Every thread of this process: ``{tid: (name, CPU clock ticks so far)}`` (/proc, user + system)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        name = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2:].split()
        out[int(tid)] = (name, int(fields[11]) + int(fields[12]))
    return out


def cpu_by_thread(before: dict, after: dict, wall: float) -> dict:
    """Cores used over ``wall`` seconds: the whole process, and by thread name (summed over the
    threads of that name; how many there were, and how many used any CPU)."""
    hz = os.sysconf("SC_CLK_TCK")
    groups: dict[str, list] = collections.defaultdict(lambda: [0.0, 0, 0])
    total = 0.0
    for tid, (name, ticks) in after.items():
        used = (ticks - before.get(tid, (name, 0))[1]) / hz / wall
        g = groups[name]
        g[0] += used
        g[1] += 1
        g[2] += used > 0.01
        total += used
    top = sorted(groups.items(), key=lambda kv: -kv[1][0])[:8]
    return {"process_cores": round(total, 2), "threads": len(after),
            "by_name": {n: {"cores": round(c, 2), "threads": k, "busy": b} for n, (c, k, b) in top}}


class ThreadClock:
    """CPU seconds used by the stage's threads (each thread adds its own ``thread_time`` deltas)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cpu = 0.0
        self.batches = 0

    def wrap(self, fn):
        def run(*a, **k):
            t = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                with self.lock:
                    self.cpu += time.thread_time() - t
                    self.batches += 1
        return run


#: `interfere` phase: what runs beside the synthetic step, in two threads (see `Disturbance`).
DISTURBANCES = ("numpy", "python", "cuda_api", "decode", "decode_reuse", "native_decode", "stage")


class Disturbance:
    """Work run in ``threads`` background threads beside the training step, to tell apart what
    slows the step's host side: memory bandwidth and cores (``numpy``: large copies, no GIL), the
    GIL (``python``: a pure-Python loop), the CUDA driver (``cuda_api``: stream-ordered
    malloc/free and event waits, as nvImageCodec makes per image), nvImageCodec alone
    (``decode``: one batch decoded over and over; ``decode_reuse``: into the same images each
    time; ``native_decode``: through `native_decode`'s one C call, which holds no GIL, so what it
    costs the step is the GPU and the CUDA driver, not the GIL), or the whole consumer stage
    without the hand-over (``stage``). ``rate`` is the work's
    iterations per second while it ran."""

    def __init__(self, kind: str, work, threads: int = 2) -> None:
        self.kind, self.work, self.stop = kind, work, threading.Event()
        self.count = 0
        self.lock = threading.Lock()
        self.warm = threading.Barrier(threads + 1)
        self.threads = [threading.Thread(target=self._loop, name=f"probe-{kind}", daemon=True) for _ in range(threads)]

    def _loop(self) -> None:
        state: dict = {}
        self.work(state)  # the first iteration builds what the work needs (decoders, streams): untimed
        self.warm.wait()
        try:
            while not self.stop.is_set():
                self.work(state)
                with self.lock:
                    self.count += 1
        finally:  # newest first: images before the stream they were decoded on, before their decoder
            for k in reversed(list(state)):
                del state[k]

    def __enter__(self):
        for t in self.threads:
            t.start()
        self.warm.wait(timeout=120)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)
        self.rate = round(self.count / (time.perf_counter() - self.t0), 1)


def disturbance_work(kind: str, hbs: list, make_stage) -> tuple:
    """``(work(state), cleanup)`` for `Disturbance` ``kind`` (one of `DISTURBANCES`)."""
    import numpy as np

    if kind not in DISTURBANCES:
        raise ValueError(f"disturbance {kind!r}: one of {DISTURBANCES}")
    if kind == "numpy":
        a, b = np.ones(1 << 25, np.uint8), np.zeros(1 << 25, np.uint8)
        return (lambda st: np.copyto(b, a)), None
    if kind == "python":
        return (lambda st: sum(range(20000))), None
    import cupy

    if kind == "cuda_api":
        def api(st):
            if "s" not in st:
                st["s"] = cupy.cuda.Stream(non_blocking=True)
            s, rt = st["s"], cupy.cuda.runtime
            for _ in range(64):  # one image's worth of nvImageCodec's stream-ordered calls
                rt.freeAsync(rt.mallocAsync(1 << 19, s.ptr), s.ptr)
            s.record().synchronize()
        return api, None
    if kind in ("decode", "decode_reuse"):
        from ray_extsrc.fn._gpu.decode import _decode_params, make_decoder
        from ray_extsrc.host_batch import PackedBytes

        col = next(c for outs in hbs[0].columns.values() for c in outs.values() if isinstance(c, PackedBytes))
        data = col.samples()

        def dec(st):
            if "d" not in st:
                st["d"], st["s"] = make_decoder(0, "default"), cupy.cuda.Stream(non_blocking=True)
            kw = {"params": _decode_params(), "cuda_stream": st["s"].ptr}
            if kind == "decode_reuse" and st.get("imgs"):
                kw["images"] = st["imgs"]
            imgs = st["d"].decode(data, **kw)
            st["s"].synchronize()  # the images may be decoded into again (or freed) now
            st["imgs"] = imgs if kind == "decode_reuse" and all(i is not None for i in imgs) else None
        return dec, None
    if kind == "native_decode":
        from ray_extsrc.fn._gpu.decode import _host_addresses, backend_set, batch_layout
        from ray_extsrc.fn._gpu.native_decode import NativeDecoder
        from ray_extsrc.fn.decoder_options import DecoderOptions
        from ray_extsrc.host_batch import PackedBytes, StackedArrays

        col = next(c for outs in hbs[0].columns.values() for c in outs.values() if isinstance(c, PackedBytes))
        samples = col.samples()
        prep = next((c.data for outs in hbs[0].columns.values() for c in outs.values()
                     if isinstance(c, StackedArrays) and c.data.ndim == 2 and c.data.shape[1] == 7), None)
        if prep is None:  # the workers' [y, x, h, w, H, W, ok] rows: made only on a GPU node
            raise RuntimeError("native_decode: the host batches carry no decode prep rows (made without a GPU?)")
        ok = np.flatnonzero(prep[:, 6] == 1)
        src, lengths, keep = _host_addresses(samples, ok)
        hw = prep[ok][:, 4:6].astype(np.int32)
        starts, total = batch_layout(hw)
        opts = DecoderOptions()

        def native(st):
            if "d" not in st:
                st["d"] = NativeDecoder(0, backend_set(opts.backend, opts) or [], opts.cpu_threads, opts.codec_option_text())
                st["s"] = cupy.cuda.Stream(non_blocking=True)
                st["buf"] = cupy.empty(max(1, total), np.uint8)
                st["keep"] = keep
            dst = np.uint64(st["buf"].data.ptr) + starts
            st["d"].decode(src, lengths, dst, hw, st["s"].ptr)  # GIL released in the call
            st["s"].synchronize()
        return native, None
    if kind == "stage":
        stage, _ = make_stage(2)
        k = [0]

        def run(st):
            reply = pytypes.SimpleNamespace(end=False, outputs=(hbs[k[0] % len(hbs)],), skipped=())
            k[0] += 1
            stage.submit(lambda r=reply: r).result()
        return run, stage.close
    raise AssertionError(kind)


def backward_gil(device: str = "cpu", steps: int = 20, size: int = 32, beside: dict | None = None) -> list[dict]:
    """How often a backward pass waits for the GIL: the median backward time of a small residual
    conv net (Python ``forward``, as torchvision's), eager and TorchScript, alone and beside a
    pure-Python thread that never blocks. Such a thread gives the GIL up only when the switch
    interval forces it, so each time the backward takes the GIL it waits about one interval: the
    difference, over the interval, counts those takes. On a GPU the backward runs in torch's
    autograd device thread (the thread the consumer stage's GIL holds delay, see the README);
    on the CPU in the calling thread, with one intra-op thread (run it on an idle machine of two
    cores or more). No CUDA needed for ``device="cpu"``.

    ``beside``: more work to time the backward beside, ``{name: factory}``, each factory giving a
    context manager that runs the work while it is open (a `Disturbance`, e.g. the real consumer
    stage: ``--phases backward_gil`` on the GPU machine); each adds ``backward_ms_beside_<name>``."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
            self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.b1(self.c1(x)))
            return torch.relu(x + self.b2(self.c2(y)))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.blocks = nn.Sequential(*[Block(8) for _ in range(8)])
            self.fc = nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.blocks(torch.relu(self.stem(x))).mean((2, 3)))

    dev = torch.device(device)
    x = torch.randn(2, 3, size, size, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    stop = threading.Event()

    def spin() -> None:  # pure Python: gives the GIL up only when the switch interval forces it
        while not stop.is_set():
            sum(range(1000))

    def median_ms(m: Any) -> float:
        times = []
        for _ in range(steps):
            y = m(x).sum()
            sync()
            t = time.perf_counter()
            y.backward()
            sync()
            times.append(time.perf_counter() - t)
        return round(sorted(times)[len(times) // 2] * 1e3, 3)

    out = []
    interval_ms = sys.getswitchinterval() * 1e3
    # one intra-op thread: on the CPU the backward then needs one core and the spinning thread
    # another, so (on an idle machine with two or more) the difference is the GIL, not core sharing
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for kind in ("eager", "torchscript"):
            torch.manual_seed(0)
            m = Net().to(dev)
            if kind == "torchscript":  # forward in C++: no Python object per activation
                with warnings.catch_warnings():  # deprecated in torch 2.13, still the plainest control
                    warnings.simplefilter("ignore", DeprecationWarning)
                    m = torch.jit.script(m)
            median_ms(m)  # warm-up (and TorchScript's profiling runs)
            alone = median_ms(m)
            stop.clear()
            th = threading.Thread(target=spin, name="probe-spin", daemon=True)
            th.start()
            time.sleep(0.05)
            try:
                spun = median_ms(m)
            finally:
                stop.set()
                th.join()
            rec = {"phase": "backward_gil", "device": str(dev), "model": kind, "backward_ms_alone": alone,
                   "backward_ms_beside_python_thread": spun, "switch_interval_ms": interval_ms,
                   "gil_takes_per_backward": round((spun - alone) / interval_ms, 1)}
            for name, factory in (beside or {}).items():
                with factory():
                    rec[f"backward_ms_beside_{name}"] = median_ms(m)
            out.append(rec)
    finally:
        torch.set_num_threads(threads)
    return out


#: CUctx_flags scheduling values (cuda.h)
_SCHED_FLAGS = {"auto": 0, "spin": 1, "yield": 2, "blocking": 4}


def set_sched_flag(kind: str, device: int = 0) -> None:
    """Set how CUDA threads of this process wait for the GPU on ``device`` (``spin``, ``yield``,
    ``blocking``) through the driver API, before anything has started the device's primary
    context; raises if it already runs (then the flag would not apply) or the driver refuses."""
    import ctypes

    cuda = ctypes.CDLL("libcuda.so.1")
    flags, active = ctypes.c_uint(), ctypes.c_int()
    for call, args in (("cuInit", (0,)), ("cuDevicePrimaryCtxGetState", (device, ctypes.byref(flags), ctypes.byref(active)))):
        rc = getattr(cuda, call)(*args)
        if rc:
            raise RuntimeError(f"{call} failed: CUresult {rc}")
    if active.value:
        raise RuntimeError("the device's primary context already runs: its scheduling flag cannot change now")
    rc = cuda.cuDevicePrimaryCtxSetFlags(device, _SCHED_FLAGS[kind])
    if rc:
        raise RuntimeError(f"cuDevicePrimaryCtxSetFlags failed: CUresult {rc}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ray-extsrc bench --probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="/tmp/r1-probe")
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warm", type=int, default=15)
    ap.add_argument("--phases", default="alone,prio")
    ap.add_argument("--configs", default="",
                    help="stages to run, ';'-separated: decoder options (see --decoder), then '|'-separated "
                         "settings: threads=N, depth=N, cores=N (the stage's CPUs), si=S (switch interval), "
                         "hiprio (decode streams at high priority), eagerctx, pin / nopin (encoded bytes through page-locked "
                         "memory or not; default: as the Loader), nodecode (decode the "
                         "first batch only and give its images to every batch: the stage without nvImageCodec)")
    ap.add_argument("--disturb", default=",".join(DISTURBANCES),
                    help="with --phases interfere: what runs beside the synthetic step (see Disturbance)")
    ap.add_argument("--sched", choices=sorted(_SCHED_FLAGS),
                    help="how the process's CUDA threads wait for the GPU (the primary context's scheduling "
                         "flag, set before CUDA starts; default: the driver's choice, spinning on a machine "
                         "with more cores than contexts)")
    ap.add_argument("--queues-after-init", action="store_true",
                    help="set CUDA_DEVICE_MAX_CONNECTIONS=32 after torch.cuda.is_available() (cuInit) and before "
                         "the context is made: whether the driver still reads it then (the 2026-12-03 run, "
                         "recorded as widen_work_queues 'set': no gain)")
    ap.add_argument("--pyspy", action="store_true")
    ap.add_argument("--out", default="out/probe.json")
    ap.add_argument("--summarize", nargs="+", metavar="TRACE",
                    help="only print `summarize_trace` of these saved chrome traces (.json or .json.gz)")
    ap.add_argument("--backward-gil", metavar="DEVICE", help="only run `backward_gil` on DEVICE (cpu, cuda)")
    args = ap.parse_args(argv)
    if args.backward_gil:
        for rec in backward_gil(args.backward_gil):
            print(json.dumps(rec))
        return 0
    if args.summarize:
        import gzip

        for path in args.summarize:
            with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
                print(json.dumps({"trace": os.path.basename(path), **summarize_trace(json.load(f))}))
        return 0

    from ray_extsrc.synthetic import R1, make_jpeg_dataset
    import dataclasses

    spec = dataclasses.replace(R1, num_images=args.images) if args.images != R1.num_images else R1
    root = str(make_jpeg_dataset(args.data, spec, progress=False))
    t = time.perf_counter()
    hbs = host_batches(root, min(16, args.images // BATCH))
    print(json.dumps({"host_batches": len(hbs), "s": round(time.perf_counter() - t, 2)}), flush=True)

    if args.sched:  # after the host batches: their forked workers must start before CUDA does
        set_sched_flag(args.sched)
    import torch

    queues_after_init = None
    if args.queues_after_init:  # as in a Train worker: the driver started (is_available), no context yet
        from ray_extsrc.cuda_work_queues import ENV, QUEUES

        torch.cuda.is_available()
        queues_after_init = os.environ.setdefault(ENV, str(QUEUES))
        print(json.dumps({"queues_after_init": queues_after_init}), flush=True)

    from ray_extsrc.bench._train import build_model
    from ray_extsrc.consumer_stage import ConsumerStage
    from ray_extsrc.bench._pipelines import r1_pipeline

    dev = torch.device("cuda", 0)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(x, y):
        model, opt = current["model"], current["opt"]
        x = x.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
        y = y.reshape(-1).long()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    g = torch.Generator(device="cpu").manual_seed(0)
    xs = torch.randn(BATCH, 3, 224, 224, generator=g).to(dev, torch.float16)
    ys = torch.randint(0, 1000, (BATCH,), generator=g).to(dev)
    results: list[dict] = []
    current: dict = {}

    def synthetic():
        while True:
            yield xs, ys

    def fed(stage: ConsumerStage, depth: int):
        pending: collections.deque = collections.deque()
        k = 0

        def submit():
            nonlocal k
            reply = pytypes.SimpleNamespace(end=False, outputs=(hbs[k % len(hbs)],))
            k += 1
            pending.append(stage.submit(lambda r=reply: r))

        for _ in range(depth):
            submit()
        while True:
            _, outputs = pending.popleft().result()
            images, labels = stage.to_torch(outputs)
            submit()
            yield images, labels

    def measure(name: str, feed, train: bool = True, clock: ThreadClock | None = None, pyspy: bool = False,
                profile: bool = False, **extra) -> dict:
        it = iter(feed)
        for _ in range(args.warm):
            x, y = next(it)
            if train:
                step(x, y)
        torch.cuda.synchronize()
        if clock is not None:
            clock.cpu, clock.batches = 0.0, 0
        spy = None
        if pyspy:
            spy = [subprocess.Popen(["py-spy", "record", "--pid", str(os.getpid()), "--duration", "6", "--rate", "500", "--nonblocking",
                                     "--format", "raw", "--threads", *flags, "-o", f"out/pyspy-{name}{tag}.txt"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                   for flags, tag in (((), ""), (("--gil",), "-gil"))]
            time.sleep(1.0)
        ticks0 = thread_ticks()
        c0, t0 = time.thread_time(), time.perf_counter()
        for _ in range(args.steps):
            x, y = next(it)
            if train:
                step(x, y)
        torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
        extra["cpu"] = cpu_by_thread(ticks0, thread_ticks(), wall)
        rec = {"phase": name, "model": args.model_now, "images_per_s": round(args.steps * BATCH / wall),
               "ms_per_step": round(1000 * wall / args.steps, 2), "main_cpu_ms_per_step": round(1000 * cpu / args.steps, 2),
               **extra}
        if clock is not None and clock.batches:
            rec["stage_cpu_ms_per_batch"] = round(1000 * clock.cpu / clock.batches, 2)
        if spy:
            for p in spy:
                try:
                    _, err = p.communicate(timeout=30)
                    if p.returncode:
                        rec.setdefault("pyspy_error", []).append(err.decode()[-400:])
                except subprocess.TimeoutExpired:
                    p.kill()
        if profile:  # after the timed steps: the profiler's own cost stays out of the figures above
            rec["trace"] = profiled(it, name, train)
        if hasattr(it, "close"):
            it.close()
        results.append(rec)
        print(json.dumps(rec), flush=True)
        return rec

    def profiled(it, name: str, train: bool) -> dict:
        """torch.profiler over 12 more steps of ``it``; the chrome trace goes to out/, its summary
        (`summarize_trace`) into the phase's record."""
        from torch.profiler import ProfilerActivity, profile as tprofile

        with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(12):
                x, y = next(it)
                if train:
                    step(x, y)
            torch.cuda.synchronize()
        path = os.path.join(os.path.dirname(args.out) or ".", f"trace-{args.model_now}-{name}.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            summary = summarize_trace(json.load(f))
        subprocess.run(["gzip", "-f", path], check=False)
        print(json.dumps({"phase": name, "model": args.model_now, "trace": summary}), flush=True)
        return summary

    from ray_extsrc.executor import gpu_stage as _gpu_stage

    lazy_contexts = _gpu_stage.GpuStage._contexts

    def eager_contexts(self, node, infos):  # the "eagerctx" setting: every context made up front
        return list(lazy_contexts(self, node, infos))

    def make_stage(threads: int = 2, cores: int = 0, pin: bool | None = None, **decoder) -> tuple[ConsumerStage, ThreadClock]:
        # pin None: the Loader's default (`ConsumerStage`'s pin_host_bytes), as the Train bench runs it
        stage = ConsumerStage(r1_pipeline, {"root": root, "batch": BATCH, **decoder}, dev, "probe", pin_host_bytes=pin)
        if threads != 2:
            stage._threads.shutdown()
            from concurrent.futures import ThreadPoolExecutor

            stage._threads = ThreadPoolExecutor(threads, thread_name_prefix="probe-stage")
        clock = ThreadClock()
        run = stage._run
        if cores:  # the stage's threads (and the decode threads and nvImageCodec's, which they
            # start and which inherit the mask) on the last `cores` CPUs only
            mask = set(sorted(os.sched_getaffinity(0))[-cores:])

            def pinned(*a, _run=stage._run, **k):
                if os.sched_getaffinity(0) != mask:
                    os.sched_setaffinity(0, mask)
                return _run(*a, **k)
            run = pinned
        stage._run = clock.wrap(run)
        return stage, clock

    from ray_extsrc.bench._pipelines import parse_decoder_options
    from ray_extsrc.fn._gpu import decode

    real_decode_prepared = decode._decode_prepared
    def decoded_once(*a, _first: list = [], **k):  # the "nodecode" setting (see --configs)
        if not _first:  # held here for the rest of the run, never given back to an image pool
            _first.append(real_decode_prepared(*a, **k))
            _first[0].owners.escaped = True
        return _first[0]

    low_priority_stream = decode.loader_stream

    def high_priority_stream(device_id: int):
        """A decode stream at the device's highest priority (the probe's "hiprio" setting)."""
        import cupy

        with cupy.cuda.Device(device_id):
            s = cupy.cuda.Stream(non_blocking=True, priority=-5)  # CUDA clamps to its range
        keep.append(s)
        return s

    keep: list = []

    configs = [c for c in args.configs.split(";")]
    default_switch = sys.getswitchinterval()
    hp = torch.cuda.Stream(device=dev, priority=torch.cuda.Stream.priority_range()[1])
    own = torch.cuda.Stream(device=dev)  # the "ownstream" phase: the step on a stream of its own
    if "kernels" in args.phases:
        kernel_times(make_stage, fed, args.steps)
    if "backward_gil" in args.phases:  # the backward pass beside the real consumer stage (and a spinner)
        work, cleanup = disturbance_work("stage", hbs, make_stage)
        nat, _ = disturbance_work("native_decode", hbs, make_stage)
        for rec in backward_gil("cuda", beside={"stage": lambda: Disturbance("stage", work),
                                                "native_decode": lambda: Disturbance("native_decode", nat)}):
            results.append(rec)
            print(json.dumps(rec), flush=True)
        if cleanup is not None:
            cleanup()
    for model_name in args.model.split(","):
        model = build_model(model_name).to(dev, memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        current.update(model=model, opt=opt)
        args.model_now = model_name
        measure("synthetic", synthetic(), profile="profile" in args.phases)
        if "interfere" in args.phases and model_name == args.model.split(",")[0]:
            for kind in filter(None, args.disturb.split(",")):
                work, cleanup = disturbance_work(kind, hbs, make_stage)
                with Disturbance(kind, work) as d:
                    rec = measure(f"synthetic_beside_{kind}", synthetic())
                rec["disturbance_per_s"] = d.rate
                print(json.dumps({"phase": rec["phase"], "disturbance_per_s": d.rate}), flush=True)
                if cleanup is not None:
                    cleanup()
        for n, spec in enumerate(configs):
            cfg, *extras = spec.split("|")
            extra = dict(e.split("=") for e in extras if "=" in e)
            threads, depth = int(extra.get("threads", 2)), int(extra.get("depth", 3))
            cores = int(extra.get("cores", 0))
            decode.loader_stream = high_priority_stream if "hiprio" in extras else low_priority_stream
            sys.setswitchinterval(float(extra.get("si", default_switch)))
            _gpu_stage.GpuStage._contexts = eager_contexts if "eagerctx" in extras else lazy_contexts
            decode._decode_prepared = decoded_once if "nodecode" in extras else real_decode_prepared
            pin = True if "pin" in extras else False if "nopin" in extras else None
            stage, clock = make_stage(threads, cores, pin, **parse_decoder_options(cfg))
            cfg = spec
            if model_name == args.model.split(",")[0] and "alone" in args.phases:
                measure("stage_alone", fed(stage, depth), train=False, clock=clock, decoder=cfg,
                        pyspy=args.pyspy and n == 0)
            rec = measure("fed", fed(stage, depth), clock=clock, pyspy=args.pyspy and n == 0, decoder=cfg,
                          profile="profile" in args.phases and n == 0)
            free, total = torch.cuda.mem_get_info(dev)
            pool = decode._pools.get(dev.index or 0)
            rec["device_used_mb"] = round((total - free) / 2**20)
            if pool is not None:  # batches decoded into reused images / into new ones, free images
                rec["image_pool"] = {"taken": pool.taken, "missed": pool.missed, "free": len(pool.free)}
            print(json.dumps({k: rec[k] for k in ("phase", "decoder", "device_used_mb", "image_pool") if k in rec}),
                  flush=True)
            if "prio" in args.phases:
                with torch.cuda.stream(hp):
                    measure("fed_step_high_priority", fed(stage, depth), clock=clock, decoder=cfg,
                            priority=hp.priority)
            if "ownstream" in args.phases:  # off the legacy default stream: no implicit syncs with
                # the blocking streams of any library in the process
                with torch.cuda.stream(own):
                    measure("fed_step_own_stream", fed(stage, depth), clock=clock, decoder=cfg,
                            profile="profile" in args.phases and n == 0)
            stage.close()
        if "prio" in args.phases:
            with torch.cuda.stream(hp):
                measure("synthetic_high_priority", synthetic())
        if "ownstream" in args.phases:
            with torch.cuda.stream(own):
                measure("synthetic_own_stream", synthetic())
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        cuda_env = {k: v for k, v in os.environ.items() if k.startswith("CUDA_") and k != "CUDA_VISIBLE_DEVICES"}
        json.dump({"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), "sched": args.sched, "queues_after_init": queues_after_init,
                   "cuda_env": cuda_env, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
