"""One system of the R1 benchmark, in its own process: ``python -m ray_extsrc.bench._runner SYSTEM ...``.

Prints one ``BENCH-RESULT {json}`` line. Timing convention (the same for every system, as in
`_common`): an epoch runs from just before its first request to the handled end of
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

from ._common import BATCH, GpuMemory, cupy_pool_mb, emit, loader_ways, pipeline_epoch, timed, versions  # noqa: E402 - light
from ._report import multi_gpu, split_reader  # noqa: E402 - light (matplotlib loads only to draw)


def _torch_sync():
    import torch

    torch.cuda.synchronize()


# --- (a) ray_extsrc alone ---------------------------------------------------------------------------


def _reader_root(args) -> str:
    """What ``r1_pipeline(root=...)`` takes for ``args.reader``: the set's folder, or its shards."""
    if args.reader == "webdataset":
        from ._pipelines import r1_shards

        return r1_shards(args.root)  # written by the parent before the first round (see r1_main)
    return args.root


def run_extsrc(args) -> dict:
    from ._pipelines import r1_pipeline

    pipe = r1_pipeline(_reader_root(args), args.images, py_num_workers=args.workers, reader=args.reader,
                       **args.decoder)
    pipe.start_py_workers()  # fork before anything touches CUDA
    import cupy
    import torch

    pipe.build()
    gpu = GpuMemory()

    stages: dict[str, float] = {}

    def epoch():
        for images, _labels in pipeline_epoch(pipe):
            for k, v in pipe.last_timings.items():
                stages[k] = stages.get(k, 0.0) + v
            stages["batches"] = stages.get("batches", 0) + 1
            yield torch.from_dlpack(images.as_array())  # zero-copy

    try:
        recs = timed(epoch, args.epochs, args.warmup, gpu, lambda: cupy.cuda.Device().synchronize())
    finally:
        pipe.close()
    from ..fn._gpu import decode as gpu_decode

    nb = max(1, stages.pop("batches", 1))
    per_batch_ms = {k: round(1000 * v / nb, 2) for k, v in stages.items()}
    decode_stats = gpu_decode.stats_snapshot()
    db = max(1, decode_stats["batches"])
    per_batch_ms.update({f"decode_{k}": round(1000 * v / db, 2) for k, v in decode_stats.items() if k != "batches"})
    print(f"  per-batch ms: {per_batch_ms}", file=sys.stderr, flush=True)
    return {"records": recs, **gpu.report(),
            "cupy_pool_total_mb": cupy_pool_mb(), "per_batch_ms": per_batch_ms,
            "decoder_options": args.decoder, "py_num_workers": args.workers}


# --- (b) ray_extsrc inside Ray Train ---------------------------------------------------------------


def _train_loop(config):
    import torch

    from ray_extsrc.bench._common import CpuUse, GpuMemory, loader_pids, loader_report, timed

    it = config["loader"].iter_torch_batches()
    gpu = GpuMemory()
    cpu = CpuUse()

    def epoch():
        for batch in it:
            yield batch["images"]

    # the timed epochs' CPU use, by thread and by loader process
    on_epoch = cpu.start_at(config["warmup"], lambda: loader_pids(it))
    recs = timed(epoch, config["epochs"], config["warmup"], gpu, torch.cuda.synchronize, on_epoch=on_epoch)
    cpu.stop()
    # The loader actors are Ray workers, not this process's children: their trees (actor, zygote,
    # Python workers, janitor) are measured here, on the same node, while they still run.
    out = {"records": recs, **gpu.report(), "gpu_stage": getattr(it, "gpu_stage", None),
           "torch_max_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20), **loader_report(it),
           "cpu_use": cpu.report()}
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

    gpus = multi_gpu(args.base) or args.gpus
    ways = loader_ways(args.actors, args.gpu_stage or None, True)
    per_actor = max(1, args.workers // ways)  # --workers Python workers per GPU in all
    stage = {"gpu_stage": args.gpu_stage} if args.gpu_stage else {}  # else the Loader's default
    # the Loader before Ray, as a user's script does: the local cluster then inherits the
    # environment the Loader asks for (`cuda_work_queues.for_the_cluster`)
    loader = Loader(r1_pipeline, outputs=("images", "labels"), py_num_workers=per_actor,
                    actors_per_worker=ways, root=_reader_root(args), limit=args.images,
                    reader=args.reader, **stage, **args.decoder,
                    **({"prefetch_batches": args.prefetch} if args.prefetch else {}))
    ray.init(num_cpus=os.cpu_count(), num_gpus=gpus, include_dashboard=False, log_to_driver=True)
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
    res["actors_per_worker"] = ways
    res["gpus"] = gpus
    res["gpu_stage_requested"] = args.gpu_stage or "default"
    res["prefetch_batches"] = loader.prefetch_batches
    res["decoder_options"] = args.decoder
    return res


# --- (c) torch DataLoader + Pillow + torchvision v2 -------------------------------------------------


def run_torch(args) -> dict:
    import torch

    from ._torchvision import torch_loader

    loader = torch_loader(args.root, args.images, batch=BATCH, workers=args.torch_workers, pin_memory=True)
    gpu = GpuMemory()

    def epoch():
        for images, labels in loader:
            yield images.to("cuda", non_blocking=True).half()

    recs = timed(epoch, args.epochs, args.warmup, gpu, _torch_sync)
    return {"records": recs, **gpu.report(),
            "torch_max_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20),
            "num_workers": args.torch_workers}


# --- (d) Ray Data --------------------------------------------------------------------------------------


def _ray_data_augment(batch: dict) -> dict:
    import numpy as np
    import torch

    from ._torchvision import tv_transform

    tf = tv_transform()
    out = [tf(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)).numpy() for img in batch["image"]]
    return {"image": np.stack(out)}


def run_ray_data(args) -> dict:
    import ray

    ray.init(num_cpus=os.cpu_count(), num_gpus=1, include_dashboard=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    limit = min(args.images, args.ray_data_images or args.images)
    from ..readers import read_file_list

    files = [os.path.join(args.root, n) for n, _ in read_file_list(args.root)[:limit]]
    ds = ray.data.read_images(files, mode="RGB").map_batches(_ray_data_augment, batch_size=64)
    gpu = GpuMemory()

    def epoch():
        for batch in ds.iter_torch_batches(batch_size=BATCH, device="cuda", drop_last=True):
            yield batch["image"].half()

    # Warm-up epochs as for every other system: Ray Data's first epoch also starts its workers and
    # imports torch in each (on 2 CPUs here: 90 img/s in epoch 0, ~255 img/s after).
    recs = timed(epoch, args.epochs, args.warmup, gpu, _torch_sync)
    ray.shutdown()
    return {"records": recs, **gpu.report(), "images_limit": limit,
            "note": f"{limit} images"}


# --- (e) decode-only ceilings -----------------------------------------------------------------------


def _read_all(args) -> list[bytes]:
    from ..readers import read_file_list

    out = []
    for name, _ in read_file_list(args.root)[: args.images]:
        with open(os.path.join(args.root, name), "rb") as f:
            out.append(f.read())
    return out[: len(out) // BATCH * BATCH]


def _codec_decoder(kind: str, options) -> object:
    """An nvImageCodec decoder for backend ``kind``, made by the loader's own factory
    (`fn._gpu.decode.make_decoder`, with the `DecoderOptions`), so the backend table has one home."""
    from ..fn._gpu.decode import make_decoder

    return make_decoder(0, kind, options)


def run_nvimgcodec(args) -> dict:
    """Decode-only nvImageCodec. By default one decoder (its default backends) called batch by batch
    on the main thread. Variants, with the decoder op's option names (``--decoder``): ``backend``
    (which backends), ``split_share=S`` (each batch split between a hardware-engine-only decoder,
    share S, and a ``split_backend`` decoder, both at once in two threads), ``roi=1`` (decode the
    random-resized-crop regions only); and ``--inflight N`` (N batches decoding at once, each thread
    with its own decoder and stream)."""
    import collections
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch
    from nvidia import nvimgcodec

    from ..fn._random_crop_window import random_crop_window

    data = [np.frombuffer(b, np.uint8) for b in _read_all(args)]
    from ..fn.decoder_options import DecoderOptions

    opts = DecoderOptions(**args.decoder)
    roi = bool(args.decoder.get("roi", False))  # decode-only: whole images unless asked
    split, split_kind = opts.split_share, opts.split_backend

    def make(kind: str):
        return _codec_decoder(kind, opts)

    params = nvimgcodec.DecodeParams(apply_exif_orientation=False)
    gpu = GpuMemory()
    rng = np.random.default_rng(0)

    def code_stream(b):
        cs = nvimgcodec.CodeStream(b)
        if roi:
            y, x, h, w = random_crop_window(rng, cs.height, cs.width)
            cs = cs.get_sub_code_stream(image_idx=0, region=nvimgcodec.Region(y, x, y + h, x + w))
        return cs

    if not split and args.inflight <= 1:
        dec = make(opts.backend)
        stream = torch.cuda.current_stream().cuda_stream

        def epoch():
            for i in range(0, len(data), BATCH):
                yield dec.decode([code_stream(b) for b in data[i : i + BATCH]], params=params, cuda_stream=stream)
    else:
        local = threading.local()
        pool = ThreadPoolExecutor(max(1, args.inflight) * (2 if split else 1))

        def run(kind, chunk):
            if not hasattr(local, "stream"):
                local.stream, local.decs = torch.cuda.Stream(), {}
            dec = local.decs.get(kind) or local.decs.setdefault(kind, make(kind))
            images = dec.decode([code_stream(b) for b in chunk], params=params, cuda_stream=local.stream.cuda_stream)
            return images, local.stream.record_event()

        def submit(batch):
            if not split:
                return [pool.submit(run, opts.backend, batch)]
            k = round(split * len(batch))
            return [pool.submit(run, "hw", batch[:k]), pool.submit(run, split_kind, batch[k:])]

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
    return {"records": recs, **gpu.report(),
            "decoder_options": args.decoder,
            "note": f"files read into memory first; nvImageCodec backend={opts.backend}, "
                    f"options={opts.codec_option_text()!r}, roi={roi}, split={split} ({split_kind}), "
                    f"inflight={args.inflight}, batch 256"}


def run_tv_decode(args) -> dict:
    import torch
    from torchvision.io import decode_jpeg

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in _read_all(args)]
    gpu = GpuMemory()

    def epoch():
        for i in range(0, len(data), BATCH):
            yield decode_jpeg(data[i : i + BATCH], device="cuda")

    recs = timed(epoch, args.epochs, args.warmup, gpu, _torch_sync)
    return {"records": recs, **gpu.report(),
            "note": "files read into memory first; torchvision.io.decode_jpeg(device='cuda'), lists of 256"}


SYSTEMS = {
    "a": ("ray_extsrc", run_extsrc),
    "b": ("ray_extsrc_in_train", run_train),
    "c": ("torch_dataloader", run_torch),
    "d": ("ray_data", run_ray_data),
    "e1": ("decode_nvimgcodec", run_nvimgcodec),
    "e2": ("decode_torchvision", run_tv_decode),
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("system", help=f"one of {sorted(SYSTEMS)}, or bN: b on N GPUs (N Train workers); "
                   "a, b, bN + ':folder' or ':wds': the same images through ImageFolderSource or WebDatasetSource")
    p.add_argument("--root", required=True)
    p.add_argument("--images", type=int, default=8000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--torch-workers", type=int, default=15)
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--actors", type=int, default=0,
                   help="b: loader actors per Train worker (0: the Loader's default for its GPU stage)")
    p.add_argument("--prefetch", type=int, default=0, help="b, bN: Loader(prefetch_batches=N) (0: the Loader's default)")
    p.add_argument("--ray-data-images", type=int, default=0, help="d: a subset of the images (0: all)")
    p.add_argument("--gpu-stage", default="", choices=("", "auto", "consumer", "actor"),
                   help="b, bN: Loader(gpu_stage=...) (default: the Loader's default)")
    p.add_argument("--decoder", default="", metavar="NAME=VALUE,...",
                   help="decoder op arguments (DecoderOptions' fields), e.g. backend=hwload,hw_decoder_load=0.65")
    p.add_argument("--inflight", type=int, default=1, help="e1: batches decoding at once (threads)")
    p.add_argument("--switch-interval", type=float, default=0.0, help="sys.setswitchinterval(S) first (0: leave)")
    args = p.parse_args(argv)
    from ._pipelines import parse_decoder_options

    try:
        args.decoder = parse_decoder_options(args.decoder)
    except (TypeError, ValueError) as e:
        p.error(f"--decoder: {e}")
    if args.switch_interval:  # experiments: the GIL's switch interval (seconds)
        sys.setswitchinterval(args.switch_interval)
    try:
        args.base, args.reader = split_reader(args.system)
    except ValueError as e:
        p.error(str(e))
    n = multi_gpu(args.base)
    if n:
        name, fn_ = f"ray_extsrc_in_train_{n}gpus", run_train
    elif args.base in SYSTEMS:
        name, fn_ = SYSTEMS[args.base]
    else:
        p.error(f"unknown system {args.system!r}: one of {sorted(SYSTEMS)}, or bN (N GPUs), "
                "a/b/bN with a reader suffix (:folder, :wds)")
    if args.reader != "file_list":
        name = f"{name}_{args.reader}"
    t = time.perf_counter()
    res = fn_(args)
    res.update(system=name, key=args.system, wall_s=round(time.perf_counter() - t, 2),
               peak_rss_self_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               versions=versions())
    emit(res)


if __name__ == "__main__":
    main()
