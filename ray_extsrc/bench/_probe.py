"""Probe: why a training step fed by the consumer-side GPU stage (`Loader(gpu_stage="consumer")`)
runs slower than the same step on a synthetic batch. One process, no Ray: the R1 host batches are
made first (before CUDA, with the pipeline's forked workers), then replayed into a
`ConsumerStage` next to a torchvision model's training step, under several settings.

    ray-extsrc bench --probe --data /tmp/r1 --model resnet18 --out out/probe.json
    python benchmarks/probe_consumer_stage.py ...     (the same, from a checkout)

Each phase prints one JSON line: images/s of the step (or of the stage alone), the main thread's
CPU time per step (a step whose CPU time nears its wall time is bound by Python), and the stage
threads' CPU time per batch. ``--pyspy`` also samples the process with py-spy (``--gil``: only
the thread holding the GIL) during the first fed phase, as collapsed stacks.
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

__all__ = ["ThreadClock", "host_batches", "kernel_times", "main"]

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ray-extsrc bench --probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="/tmp/r1-probe")
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warm", type=int, default=15)
    ap.add_argument("--phases", default="alone,prio")
    ap.add_argument("--configs", default="", help="decoder options per stage, ';'-separated (see --decoder)")
    ap.add_argument("--pyspy", action="store_true")
    ap.add_argument("--out", default="out/probe.json")
    args = ap.parse_args(argv)

    from ray_extsrc.synthetic import R1, make_jpeg_dataset
    import dataclasses

    spec = dataclasses.replace(R1, num_images=args.images) if args.images != R1.num_images else R1
    root = str(make_jpeg_dataset(args.data, spec, progress=False))
    t = time.perf_counter()
    hbs = host_batches(root, min(16, args.images // BATCH))
    print(json.dumps({"host_batches": len(hbs), "s": round(time.perf_counter() - t, 2)}), flush=True)

    import torch

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
                **extra) -> dict:
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
            spy = [subprocess.Popen(["py-spy", "record", "--pid", str(os.getpid()), "--duration", "6", "--rate", "250",
                                     "--format", "raw", "--threads", *flags, "-o", f"out/pyspy-{name}{tag}.txt"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                   for flags, tag in (((), ""), (("--gil",), "-gil"))]
            time.sleep(1.0)
        c0, t0 = time.thread_time(), time.perf_counter()
        for _ in range(args.steps):
            x, y = next(it)
            if train:
                step(x, y)
        torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
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
        if hasattr(it, "close"):
            it.close()
        results.append(rec)
        print(json.dumps(rec), flush=True)
        return rec

    def make_stage(threads: int = 2, **decoder) -> tuple[ConsumerStage, ThreadClock]:
        stage = ConsumerStage(r1_pipeline, {"root": root, "batch": BATCH, **decoder}, dev, "probe")
        if threads != 2:
            stage._threads.shutdown()
            from concurrent.futures import ThreadPoolExecutor

            stage._threads = ThreadPoolExecutor(threads, thread_name_prefix="probe-stage")
        clock = ThreadClock()
        stage._run = clock.wrap(stage._run)
        return stage, clock

    from ray_extsrc.bench._pipelines import parse_decoder_options
    from ray_extsrc.fn._gpu import decode

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
    hp = torch.cuda.Stream(device=dev, priority=torch.cuda.Stream.priority_range()[1])
    if "kernels" in args.phases:
        kernel_times(make_stage, fed, args.steps)
    for model_name in args.model.split(","):
        model = build_model(model_name).to(dev, memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        current.update(model=model, opt=opt)
        args.model_now = model_name
        measure("synthetic", synthetic())
        for n, spec in enumerate(configs):
            cfg, *extras = spec.split("|")
            extra = dict(e.split("=") for e in extras if "=" in e)
            threads, depth = int(extra.get("threads", 2)), int(extra.get("depth", 3))
            decode.loader_stream = high_priority_stream if "hiprio" in extras else low_priority_stream
            stage, clock = make_stage(threads, **parse_decoder_options(cfg))
            cfg = spec
            if model_name == args.model.split(",")[0] and "alone" in args.phases:
                measure("stage_alone", fed(stage, depth), train=False, clock=clock, decoder=cfg)
            measure("fed", fed(stage, depth), clock=clock, pyspy=args.pyspy and n == 0, decoder=cfg)
            if "prio" in args.phases:
                with torch.cuda.stream(hp):
                    measure("fed_step_high_priority", fed(stage, depth), clock=clock, decoder=cfg,
                            priority=hp.priority)
            stage.close()
        if "prio" in args.phases:
            with torch.cuda.stream(hp):
                measure("synthetic_high_priority", synthetic())
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), "results": results}, f,
                  indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
