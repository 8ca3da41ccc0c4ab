"""The R1 benchmark (``ray-extsrc bench``): ray_extsrc's GPU loader against its peers on one GPU.

Workload (shared/ANCHORS.md): the 8,000 synthetic R1 JPEGs (`synthetic.R1`), batch 256,
random-resized-crop 224, horizontal flip p=0.5, ImageNet normalisation, float16 CHW on the GPU.
Systems, each in its own fresh process (see `_runner`), interleaved round by round (A B C ... A B C):

    a   ray_extsrc pipeline alone (py_num_workers=12, decoders.image_random_crop(device="mixed"))
    b   the same pipeline behind ray_extsrc.train.Loader inside a Ray Train TorchTrainer worker
        (``--actors`` loader actors per worker, ``--workers`` Python workers per GPU in all)
    bN  as b with N GPUs (b2, b8, ...): N Train workers, each with its own loader actors; total
        img/s (all ranks' images over the slowest rank's time), per rank in the JSON
    c   torch DataLoader + Pillow + torchvision v2, 15 workers, pin_memory, copy to GPU
    d   Ray Data read_images + the same torchvision augmentation in map_batches ->
        iter_torch_batches(device="cuda")  (with a warm-up epoch like the others; until session 2's
        run it was timed on one cold epoch of 2,048 images, which measured mostly its start-up)
    e1  decode-only ceiling: nvImageCodec batched decode (default backends) of the files in memory
    e2  decode-only ceiling: torchvision.io.decode_jpeg(device="cuda"), lists of 256
    a:folder, a:wds (also b:..., bN:...)  as a, b, bN with the same images read through
        `readers.ImageFolderSource` (the class-folder tree) or `readers.WebDatasetSource` (the set
        written once as 500-sample tar shards next to it), instead of the file list

    python -m ray_extsrc.bench --rounds 2 --out benchmarks/results   # + bN where N >= 2 GPUs are visible

The other benchmarks of ``ray-extsrc bench`` (same code home, same helpers in `_common`):

    ray-extsrc bench --train resnet50,resnet18 [...]   the training step fed by each loader (`_train`)
    ray-extsrc bench --cpu [...]                       torch DataLoader vs ray_extsrc on the CPU (`_cpu`)
    ray-extsrc bench --probe [...]                     the consumer stage next to a training step, in one
                                                       process without Ray, phase by phase (`_probe`)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ._common import device_name, gpu_count, parse_result, result_stem
from ._report import chart, split_reader, table, timed_rates

__all__ = ["main", "r1_main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``ray-extsrc bench``: the R1 benchmark; with ``--train`` the training benchmark, with ``--cpu``
    the CPU benchmark, with ``--probe`` the consumer-stage probe (each with its own flags:
    ``--train x --help``, ``--cpu --help``, ``--probe --help``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--cpu" in argv:
        from ._cpu import main as cpu_main

        argv.remove("--cpu")
        return cpu_main(argv)
    if "--probe" in argv:
        from ._probe import main as probe_main

        argv.remove("--probe")
        return probe_main(argv)
    if any(a == "--train" or a.startswith("--train=") for a in argv):
        from ._train import main as train_main

        return train_main(argv)
    return r1_main(argv)


def r1_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ray-extsrc bench", description=__doc__.split("\n\n")[0],
                                epilog="--train MODELS: the training benchmark; --cpu: the CPU benchmark; --probe: the consumer-stage probe")
    p.add_argument("--data", default="/tmp/r1", help="where the R1 set is (generated if missing)")
    p.add_argument("--images", type=int, default=8000)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per run (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs before them (default 1)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved runs per system (default 2)")
    p.add_argument("--systems", default="",
                   help="default: a,a:folder,a:wds,b,c,d,e1,e2, and bN with N >= 2 GPUs visible")
    p.add_argument("--gpus", type=int, default=1, help="Train workers for system b (total throughput)")
    p.add_argument("--workers", type=int, default=12,
                   help="ray_extsrc's Python workers per GPU (a: py_num_workers; b: split over the actors)")
    p.add_argument("--actors", type=int, default=0,
                   help="b, bN: loader actors per Train worker (default 0: the Loader's default for its GPU stage)")
    p.add_argument("--gpu-stage", default="", choices=("", "auto", "consumer", "actor"),
                   help="b, bN: Loader(gpu_stage=...) (default: the Loader's own default)")
    p.add_argument("--decoder", default="", metavar="NAME=VALUE,...",
                   help="decoder op arguments for a, b, e1 (DecoderOptions' fields), e.g. decode_threads=1")
    p.add_argument("--torch-workers", type=int, default=15)
    p.add_argument("--ray-data-images", type=int, default=0, help="Ray Data on a subset (0: all images)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per system run")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)

    from ..synthetic import R1, make_jpeg_dataset
    import dataclasses

    t = time.perf_counter()
    spec = dataclasses.replace(R1, num_images=args.images)
    root = str(make_jpeg_dataset(args.data, spec, progress=False))
    print(f"data: {args.images} R1 images in {root} ({time.perf_counter() - t:.1f} s)", flush=True)
    if not args.systems:
        n = gpu_count()
        args.systems = f"a,a:folder,a:wds,b,{f'b{n},' if n >= 2 else ''}c,d,e1,e2"
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for s in systems:
        try:
            split_reader(s)
        except ValueError as e:
            p.error(str(e))
    if any(split_reader(s)[1] == "webdataset" for s in systems):
        from ._pipelines import r1_shards

        t = time.perf_counter()
        print(f"shards: {r1_shards(root)} ({time.perf_counter() - t:.1f} s)", flush=True)
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    errors: dict[str, list[str]] = {}
    for r in range(args.rounds):
        for s in systems:
            cmd = [sys.executable, "-m", "ray_extsrc.bench._runner", s, "--root", root,
                   "--images", str(args.images), "--epochs", str(args.epochs), "--warmup", str(args.warmup),
                   "--workers", str(args.workers), "--torch-workers", str(args.torch_workers),
                   "--gpus", str(args.gpus), "--actors", str(args.actors),
                   "--ray-data-images", str(args.ray_data_images)]
            if s[:1] == "b" and args.gpu_stage:
                cmd += ["--gpu-stage", args.gpu_stage]
            if args.decoder and (s in ("a", "e1") or s[:1] == "b"):
                cmd += ["--decoder", args.decoder]
            print(f"round {r} system {s}: running", flush=True)
            t = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired as e:
                errors.setdefault(s, []).append(f"timeout after {args.timeout} s")
                print(f"  TIMEOUT; stderr tail: {(e.stderr or b'')[-2000:]!r}", flush=True)
                continue
            res = parse_result(proc.stdout)
            if proc.returncode != 0 or res is None:
                errors.setdefault(s, []).append(proc.stderr[-3000:])
                print(f"  FAILED rc={proc.returncode}\n{proc.stderr[-3000:]}", flush=True)
                continue
            res["round"] = r
            runs[s].append(res)
            timed = timed_rates(res)
            print(f"  {res['system']}: {[round(v) for v in timed]} img/s ({time.perf_counter() - t:.1f} s)", flush=True)
    summary = {}
    for s, rs in runs.items():
        vals = [v for res in rs for v in timed_rates(res)]
        if not vals and rs:  # a run with --warmup 0
            vals = [x["images_per_s"] for res in rs for x in res["records"] if "epoch" in x]
        firsts = [x["startup_to_first_batch_s"] for res in rs for x in res["records"] if "startup_to_first_batch_s" in x]
        if vals:
            summary[s] = {
                "system": rs[0]["system"], "median_images_per_s": statistics.median(vals), "epochs": vals,
                "startup_to_first_batch_s": statistics.median(firsts) if firsts else None,
                "gpu_peak_used_mb": max(res.get("gpu_peak_used_mb", 0) for res in rs),
                "tree_rss_mb": max(x.get("tree_rss_mb", 0) for res in rs for x in res["records"]),
                # b, bN: rank 0's loader actors with their workers (not in tree_rss_mb, see _runner)
                "loader_tree_rss_mb": max(res.get("loader_tree_rss_mb", 0) for res in rs),
                "peak_rss_self_mb": max(res.get("peak_rss_self_mb", 0) for res in rs),
            }
    device = device_name()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    stem = result_stem(args.out, "r1", device)
    doc = {"date": dt.datetime.now().isoformat(timespec="seconds"), "device": device, "host": platform.node(),
           "cpus": os.cpu_count(), "args": vars(args), "summary": summary, "runs": runs, "errors": errors}
    Path(f"{stem}.json").write_text(json.dumps(doc, indent=1))
    print(table(summary))
    try:
        chart(summary, f"{stem}.png", title=f"R1 ({args.images} JPEGs, batch 256) on {device.split(',')[0]}")
    except Exception as e:  # the chart is a convenience; the JSON and the table are the result
        print(f"chart not written: {e}")
    print(f"wrote {stem}.json")
    return 0 if not errors else 1
