"""One system of the R1 benchmark, in its own process: ``python -m ray_extsrc.bench._runner SYSTEM ...``.

Prints one ``BENCH-RESULT {json}`` line. Timing convention (the same for every system, as in
benchmarks/_common.py): an epoch runs from just before its first request to the handled end of
the epoch; images = full batches x 256; every batch ends as a CUDA tensor of shape (256, 3, 224,
224) in this process (float16 for the loaders, uint8 HWC images for decode-only), and the GPU is
synchronised once at the end of each epoch, so queued GPU work is inside the epoch's time.
Warm-up epochs run the same way and are kept apart.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

_T0 = time.perf_counter()  # before the imports below: start-up to first batch counts from here

from ._report import multi_gpu  # noqa: E402 - light (matplotlib loads only to draw)

RESULT_PREFIX = "BENCH-RESULT "
BATCH = 256


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _tree_rss_mb(root: int | None = None) -> float:
    """RSS of process ``root`` (default: this one) and all its descendants (shared pages are
    counted in each)."""
    me = os.getpid() if root is None else root
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    total, todo = 0.0, [me]
    while todo:
        p = todo.pop()
        total += _rss_mb(p)
        todo.extend(kids.get(p, []))
    return total


class _Gpu:
    """Peak GPU memory: device-wide used bytes (like nvidia-smi) sampled per batch."""

    def __init__(self) -> None:
        self.peak_used = 0

    def sample(self) -> None:
        import torch

        free, total = torch.cuda.mem_get_info()
        self.peak_used = max(self.peak_used, total - free)


def timed(make_epoch, epochs: int, warmup: int, gpu: _Gpu, sync) -> list[dict]:
    records = []
    for e in range(warmup + epochs):
        n, first, t0 = 0, None, time.perf_counter()
        for batch in make_epoch():
            if n == 0:
                first = time.perf_counter() - t0
                if e == 0:
                    records.append({"startup_to_first_batch_s": round(time.perf_counter() - _T0, 3)})
            n += 1
            if n % 8 == 1:
                gpu.sample()
        sync()
        dt = time.perf_counter() - t0
        rec = {"epoch": e, "warmup": e < warmup, "batches": n, "images": n * BATCH, "seconds": round(dt, 4),
               "first_batch_s": round(first or 0.0, 4), "images_per_s": round(n * BATCH / dt, 1),
               "tree_rss_mb": round(_tree_rss_mb(), 1)}
        records.append(rec)
        print(f"  epoch {e}{' (warm-up)' if e < warmup else ''}: {n * BATCH} img in {dt:.3f} s = "
              f"{n * BATCH / dt:.0f} img/s", file=sys.stderr, flush=True)
    return records


def _torch_sync():
    import torch

    torch.cuda.synchronize()


# --- (a) ray_extsrc alone ---------------------------------------------------------------------------


def run_extsrc(args) -> dict:
    from ._pipelines import r1_pipeline

    pipe = r1_pipeline(args.root, args.images, py_num_workers=args.workers)
    pipe.start_py_workers()  # fork before anything touches CUDA
    import cupy
    import torch

    pipe.build()
    gpu = _Gpu()

    stages: dict[str, float] = {}

    def epoch():
        while True:
            try:
                images, labels = pipe.run()
            except StopIteration:
                pipe.reset()
                return
            for k, v in pipe.last_timings.items():
                stages[k] = stages.get(k, 0.0) + v
            stages["batches"] = stages.get("batches", 0) + 1
            yield torch.from_dlpack(images.as_array())  # zero-copy

    try:
        recs = timed(epoch, args.epochs, args.warmup, gpu, lambda: cupy.cuda.Device().synchronize())
    finally:
        pipe.close()
    from ..fn._gpu import decode as gpu_decode

    pool = cupy.get_default_memory_pool()
    nb = max(1, stages.pop("batches", 1))
    per_batch_ms = {k: round(1000 * v / nb, 2) for k, v in stages.items()}
    db = max(1, gpu_decode.STATS["batches"])
    per_batch_ms.update({f"decode_{k}": round(1000 * v / db, 2) for k, v in gpu_decode.STATS.items() if k != "batches"})
    print(f"  per-batch ms: {per_batch_ms}", file=sys.stderr, flush=True)
    return {"records": recs, "gpu_peak_used_mb": round(gpu.peak_used / 2**20),
            "cupy_pool_total_mb": round(pool.total_bytes() / 2**20), "per_batch_ms": per_batch_ms,
            "env": {k: v for k, v in os.environ.items() if k.startswith("RAY_EXTSRC_")},
            "py_num_workers": args.workers}


# --- (b) ray_extsrc inside Ray Train ---------------------------------------------------------------


def _train_loop(config):
    import torch

    from ray_extsrc.bench import _runner as me

    it = config["loader"].iter_torch_batches()
    gpu = me._Gpu()

    def epoch():
        for batch in it:
            yield batch["images"]

    recs = me.timed(epoch, config["epochs"], config["warmup"], gpu, torch.cuda.synchronize)
    # The loader actors are Ray workers, not this process's children: their trees (actor, zygote,
    # Python workers, janitor) are measured here, on the same node, while they still run.
    loader_rss = sum(me._tree_rss_mb(it.describe(w)["pid"]) for w in range(it.ways))
    out = {"records": recs, "gpu_peak_used_mb": round(gpu.peak_used / 2**20),
           "torch_max_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20),
           "loader_tree_rss_mb": round(loader_rss, 1)}
    try:
        out["loader_stats"] = {k: v for k, v in it.stats().items() if isinstance(v, (int, float, str))}
    except Exception:
        pass
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    with open(f"{config['out']}.rank{rank}.json", "w") as f:
        json.dump(out, f)


def run_train(args) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..train import Loader
    from ._pipelines import r1_pipeline

    gpus = multi_gpu(args.system) or args.gpus
    per_actor = max(1, args.workers // args.actors)  # --workers Python workers per GPU in all
    ray.init(num_cpus=os.cpu_count(), num_gpus=gpus, include_dashboard=False, log_to_driver=True)
    loader = Loader(r1_pipeline, outputs=("images", "labels"), py_num_workers=per_actor,
                    actors_per_worker=args.actors, root=args.root, limit=args.images)
    out = f"/tmp/r1_train_{os.getpid()}"
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"loader": loader, "epochs": args.epochs, "warmup": args.warmup, "out": out},
        scaling_config=ScalingConfig(num_workers=gpus, use_gpu=True, resources_per_worker={"CPU": 1, "GPU": 1}),
        run_config=RunConfig(storage_path="/tmp/ray_results", name=f"r1_{os.getpid()}"),
    )
    trainer.fit()
    ranks = []
    for r in range(gpus):
        with open(f"{out}.rank{r}.json") as f:
            ranks.append(json.load(f))
    ray.shutdown()
    res = ranks[0]
    if gpus > 1:  # total throughput: all ranks' images over the slowest rank's time, per epoch
        total = []
        for recs in zip(*[r["records"] for r in ranks]):
            if "epoch" not in recs[0]:
                total.append(recs[0])
                continue
            secs = max(x["seconds"] for x in recs)
            imgs = sum(x["images"] for x in recs)
            total.append({**recs[0], "seconds": secs, "images": imgs, "images_per_s": round(imgs / secs, 1)})
        res = {**ranks[0], "records": total, "per_rank": ranks}
    res["py_num_workers"] = per_actor
    res["actors_per_worker"] = args.actors
    res["gpus"] = gpus
    return res


# --- (c) torch DataLoader + Pillow + torchvision v2 -------------------------------------------------


def _tv_transform():
    import torch
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip(), v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    ])


class _TorchFiles:
    def __init__(self, root: str, limit: int | None) -> None:
        from ..synthetic import read_file_list

        self.root = root
        self.entries = read_file_list(root)[:limit]
        self.transform = _tv_transform()

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int):
        from PIL import Image

        name, label = self.entries[i]
        with Image.open(os.path.join(self.root, name)) as im:
            rgb = im.convert("RGB")
        return self.transform(rgb), label


def run_torch(args) -> dict:
    import torch
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    loader = DataLoader(_TorchFiles(args.root, args.images), batch_size=BATCH, shuffle=False,
                        num_workers=args.torch_workers, drop_last=True, pin_memory=True,
                        persistent_workers=True, prefetch_factor=2)
    gpu = _Gpu()

    def epoch():
        for images, labels in loader:
            yield images.to("cuda", non_blocking=True).half()

    recs = timed(epoch, args.epochs, args.warmup, gpu, _torch_sync)
    return {"records": recs, "gpu_peak_used_mb": round(gpu.peak_used / 2**20),
            "torch_max_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20),
            "num_workers": args.torch_workers}


# --- (d) Ray Data --------------------------------------------------------------------------------------


def _ray_data_augment(batch: dict) -> dict:
    import numpy as np
    import torch

    tf = _tv_transform()
    out = [tf(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)).numpy() for img in batch["image"]]
    return {"image": np.stack(out)}


def run_ray_data(args) -> dict:
    import ray

    ray.init(num_cpus=os.cpu_count(), num_gpus=1, include_dashboard=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    limit = min(args.images, args.ray_data_images or args.images)
    files = [os.path.join(args.root, n) for n, _ in __import__("ray_extsrc.synthetic", fromlist=["x"]).read_file_list(args.root)[:limit]]
    ds = ray.data.read_images(files, mode="RGB").map_batches(_ray_data_augment, batch_size=64)
    gpu = _Gpu()

    def epoch():
        for batch in ds.iter_torch_batches(batch_size=BATCH, device="cuda", drop_last=True):
            yield batch["image"].half()

    # Warm-up epochs as for every other system: Ray Data's first epoch also starts its workers and
    # imports torch in each (on 2 CPUs here: 90 img/s in epoch 0, ~255 img/s after).
    recs = timed(epoch, args.epochs, args.warmup, gpu, _torch_sync)
    ray.shutdown()
    return {"records": recs, "gpu_peak_used_mb": round(gpu.peak_used / 2**20), "images_limit": limit,
            "note": f"{limit} images"}


# --- (e) decode-only ceilings -----------------------------------------------------------------------


def _read_all(args) -> list[bytes]:
    from ..synthetic import read_file_list

    out = []
    for name, _ in read_file_list(args.root)[: args.images]:
        with open(os.path.join(args.root, name), "rb") as f:
            out.append(f.read())
    return out[: len(out) // BATCH * BATCH]


def run_nvimgcodec(args) -> dict:
    """Decode-only nvImageCodec. By default one decoder (its default backends) called batch by batch
    on the main thread. Variants: ``--codec-backend`` (which backends), ``--split S`` (each batch
    split between a hardware-engine-only decoder, share S, and a ``--split-kind`` decoder, both at
    once in two threads), ``--inflight N`` (N batches decoding at once, each thread with its own
    decoder and stream)."""
    import collections
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch
    from nvidia import nvimgcodec

    from ..fn._crop_window import random_crop_window

    data = [np.frombuffer(b, np.uint8) for b in _read_all(args)]
    K = nvimgcodec.BackendKind

    def make(kind: str):
        kw = {"options": args.codec_options} if args.codec_options else {}
        backends = {
            "default": None, "hw": [nvimgcodec.Backend(K.HW_GPU_ONLY)], "cuda": [nvimgcodec.Backend(K.GPU_ONLY)],
            "hybrid": [nvimgcodec.Backend(K.HYBRID_CPU_GPU)],
            "hwload": [nvimgcodec.Backend(K.HW_GPU_ONLY, load_hint=args.hw_load), nvimgcodec.Backend(K.GPU_ONLY),
                       nvimgcodec.Backend(K.HYBRID_CPU_GPU)],
        }[kind]
        if backends:
            kw["backends"] = backends
        return nvimgcodec.Decoder(**kw)

    params = nvimgcodec.DecodeParams(apply_exif_orientation=False)
    gpu = _Gpu()
    rng = np.random.default_rng(0)

    def code_stream(b):
        cs = nvimgcodec.CodeStream(b)
        if args.roi:
            y, x, h, w = random_crop_window(rng, cs.height, cs.width)
            cs = cs.get_sub_code_stream(image_idx=0, region=nvimgcodec.Region(y, x, y + h, x + w))
        return cs

    if not args.split and args.inflight <= 1:
        dec = make(args.codec_backend)
        stream = torch.cuda.current_stream().cuda_stream

        def epoch():
            for i in range(0, len(data), BATCH):
                yield dec.decode([code_stream(b) for b in data[i : i + BATCH]], params=params, cuda_stream=stream)
    else:
        local = threading.local()
        pool = ThreadPoolExecutor(max(1, args.inflight) * (2 if args.split else 1))

        def run(kind, chunk):
            if not hasattr(local, "stream"):
                local.stream, local.decs = torch.cuda.Stream(), {}
            dec = local.decs.get(kind) or local.decs.setdefault(kind, make(kind))
            images = dec.decode([code_stream(b) for b in chunk], params=params, cuda_stream=local.stream.cuda_stream)
            return images, local.stream.record_event()

        def submit(batch):
            if not args.split:
                return [pool.submit(run, args.codec_backend, batch)]
            k = round(args.split * len(batch))
            return [pool.submit(run, "hw", batch[:k]), pool.submit(run, args.split_kind, batch[k:])]

        def epoch():
            pending = collections.deque()
            for i in range(0, len(data), BATCH):
                pending.append(submit(data[i : i + BATCH]))
                if len(pending) >= max(1, args.inflight):
                    yield _join(pending.popleft())
            while pending:
                yield _join(pending.popleft())

        def _join(futs):
            out = []
            for f in futs:
                images, ev = f.result()
                torch.cuda.current_stream().wait_event(ev)
                out.extend(images)
            return out

    recs = timed(epoch, args.epochs, args.warmup, gpu, _torch_sync)
    return {"records": recs, "gpu_peak_used_mb": round(gpu.peak_used / 2**20),
            "note": f"files read into memory first; nvImageCodec backend={args.codec_backend}, "
                    f"options={args.codec_options!r}, roi={args.roi}, split={args.split} ({args.split_kind}), "
                    f"inflight={args.inflight}, batch 256"}


def run_tv_decode(args) -> dict:
    import torch
    from torchvision.io import decode_jpeg

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in _read_all(args)]
    gpu = _Gpu()

    def epoch():
        for i in range(0, len(data), BATCH):
            yield decode_jpeg(data[i : i + BATCH], device="cuda")

    recs = timed(epoch, args.epochs, args.warmup, gpu, _torch_sync)
    return {"records": recs, "gpu_peak_used_mb": round(gpu.peak_used / 2**20),
            "note": "files read into memory first; torchvision.io.decode_jpeg(device='cuda'), lists of 256"}


SYSTEMS = {
    "a": ("ray_extsrc", run_extsrc),
    "b": ("ray_extsrc_in_train", run_train),
    "c": ("torch_dataloader", run_torch),
    "d": ("ray_data", run_ray_data),
    "e1": ("decode_nvimgcodec", run_nvimgcodec),
    "e2": ("decode_torchvision", run_tv_decode),
}


def _versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in ("ray_extsrc", "torch", "torchvision", "cupy", "ray", "numpy", "PIL"):
        m = sys.modules.get(name)
        out[name] = getattr(m, "__version__", None) if m else None
    try:
        from nvidia import nvimgcodec

        out["nvimgcodec"] = getattr(nvimgcodec, "__version__", None)
    except Exception:
        pass
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("system", help=f"one of {sorted(SYSTEMS)}, or bN: b on N GPUs (N Train workers)")
    p.add_argument("--root", required=True)
    p.add_argument("--images", type=int, default=8000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--torch-workers", type=int, default=15)
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--actors", type=int, default=3, help="b: loader actors per Train worker")
    p.add_argument("--ray-data-images", type=int, default=0, help="d: a subset of the images (0: all)")
    p.add_argument("--codec-options", default="", help="e1: nvImageCodec decoder options")
    p.add_argument("--codec-backend", default="default", choices=("default", "hw", "cuda", "hybrid", "hwload"))
    p.add_argument("--hw-load", type=float, default=0.65, help="e1 hwload: the hardware engine's load hint")
    p.add_argument("--split", type=float, default=0.0, help="e1: hardware-engine share of a batch split in two")
    p.add_argument("--split-kind", default="cuda", choices=("cuda", "hybrid", "default"))
    p.add_argument("--inflight", type=int, default=1, help="e1: batches decoding at once (threads)")
    p.add_argument("--roi", action="store_true", help="e1: decode random-resized-crop regions only")
    args = p.parse_args(argv)
    if os.environ.get("BENCH_SWITCH_INTERVAL"):  # experiments: the GIL's switch interval (seconds)
        sys.setswitchinterval(float(os.environ["BENCH_SWITCH_INTERVAL"]))
    n = multi_gpu(args.system)
    if n:
        name, fn_ = f"ray_extsrc_in_train_{n}gpus", run_train
    elif args.system in SYSTEMS:
        name, fn_ = SYSTEMS[args.system]
    else:
        p.error(f"unknown system {args.system!r}: one of {sorted(SYSTEMS)}, or bN (N GPUs)")
    t = time.perf_counter()
    res = fn_(args)
    res.update(system=name, key=args.system, wall_s=round(time.perf_counter() - t, 2),
               peak_rss_self_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               versions=_versions())
    sys.stdout.write(RESULT_PREFIX + json.dumps(res) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
