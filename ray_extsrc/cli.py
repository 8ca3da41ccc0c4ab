"""``ray-extsrc``: the demo, data generation and the benchmarks.

    ray-extsrc demo [--out DIR] [--data SPEC] [--epochs N] [--images N] [--batch-size B] [--workers W]
    ray-extsrc gen-data OUT_DIR --preset {small,r1} [...]
    ray-extsrc shards DATA OUT_DIR [--samples-per-shard N] [--prefix P] [--shuffle-seed S]
    ray-extsrc bench [...]          (the R1 benchmark: see benchmarks/README.md)
    ray-extsrc bench --train resnet50,resnet18 [...]   (the training benchmark)
    ray-extsrc bench --cpu [...]    (torch DataLoader vs ray_extsrc on the CPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings
from collections.abc import Sequence

from .readers import open_dataset

__all__ = ["main", "demo", "shards"]

_DATA_HELP = (
    "the data set: a folder with file_list.txt, a class-folder tree (ImageFolder layout), WebDataset "
    "shards ('shards/shard-{000000..000009}.tar'), or an fsspec URL of one of these (s3://, gs://, "
    "https://; pip install 'ray_extsrc[remote]')"
)


def _demo_pipelines(data: str, batch_size: int, workers: int):
    from . import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=2, device_id=0, py_num_workers=workers, seed=1234)
    def training_pipeline():
        jpegs, labels = fn.external_source(
            source=open_dataset(data, batch_size), num_outputs=2, batch=False, parallel=True,
            dtype=[types.UINT8, types.INT32],
        )
        images = fn.decoders.image_random_crop(jpegs, device="mixed")
        images = fn.resize(images, resize_x=224, resize_y=224)
        images = fn.brightness_contrast(images, contrast=fn.random.uniform(range=(1, 3.0)))
        images = fn.flip(images, horizontal=fn.random.coin_flip())
        return images, labels

    @pipeline_def(batch_size=batch_size, num_threads=2, device_id=0, py_num_workers=workers, seed=1234)
    def validation_pipeline():
        jpegs, labels = fn.external_source(
            source=open_dataset(data, batch_size), num_outputs=2, batch=False, parallel=True,
            dtype=[types.UINT8, types.INT32],
        )
        images = fn.decoders.image(jpegs, device="mixed")
        images = fn.resize(images, resize_shorter=256)
        images = fn.crop(images, crop=(224, 224))
        images = fn.brightness_contrast(images, contrast=1.5)
        return images, labels

    return training_pipeline(), validation_pipeline()


def demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .display import save_grid
    from .pipeline import NoGPUWarning
    from .synthetic import SMALL, make_jpeg_dataset

    out = os.path.abspath(args.out)
    if args.data is None:
        spec = dataclasses.replace(SMALL, num_images=args.images)
        data = str(make_jpeg_dataset(os.path.join(out, "images"), spec, progress=False))
        print(f"data: {spec.num_images} JPEGs in {data}")
    else:
        data = args.data
        try:  # fail here, before any worker starts, if the spec is wrong
            probe = open_dataset(data)
        except (OSError, ValueError, ImportError) as exc:
            print(f"ray-extsrc demo: --data {data}: {exc}", file=sys.stderr)
            return 2
        print(f"data: {type(probe).__name__}: {probe.num_samples} samples from {data}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NoGPUWarning)
        train, val = _demo_pipelines(data, args.batch_size, args.workers)
        pipes = {"train": train, "val": val}
        for p in pipes.values():  # fork every pipeline's workers before anything touches CUDA
            p.start_py_workers()
        for p in pipes.values():
            p.build()
    for w in caught:
        print(f"note: {w.message}")
    try:
        first: dict[str, tuple] = {}
        for epoch in range(args.epochs):
            for name, p in pipes.items():
                n, t0 = 0, time.perf_counter()
                with tqdm(total=p.epoch_size(), desc=f"epoch {epoch} {name}", unit="batch", leave=False) as bar:
                    while True:
                        try:
                            outs = p.run()
                        except StopIteration:
                            p.reset()
                            break
                        first.setdefault(name, outs)
                        n += len(outs[0])
                        bar.update()
                dt = time.perf_counter() - t0
                print(f"epoch {epoch} {name:5s}: {n} images in {dt:.2f} s = {n / dt:8.1f} images/s")
        for name, (images, labels) in first.items():
            count = min(len(images), 8)
            path = save_grid(
                [images.as_cpu().at(i) for i in range(count)],
                os.path.join(out, f"{name}_batch.png"),
                columns=4,
                captions=[f"label {int(labels.at(i)[0])}" for i in range(count)],
            )
            print(f"wrote {path}")
    finally:
        for p in pipes.values():
            p.close()
    return 0


def shards(args: argparse.Namespace) -> int:
    from .readers import write_shards

    try:
        pattern = write_shards(
            args.data, args.out_dir, samples_per_shard=args.samples_per_shard, prefix=args.prefix,
            shuffle_seed=args.shuffle_seed, progress=sys.stderr.isatty(),
        )
    except (OSError, ValueError, ImportError) as exc:
        print(f"ray-extsrc shards: {exc}", file=sys.stderr)
        return 2
    print(pattern)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # every flag (--help too) belongs to the benchmark's own parser
        from .bench import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="ray-extsrc", description="DALI-style parallel external source on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the tutorial's two pipelines on a generated JPEG set (or on --data)")
    d.add_argument("--out", default="demo-output", help="folder for the data set and the PNG grids")
    d.add_argument("--data", help=_DATA_HELP + "; default: a generated set of --images JPEGs in OUT/images")
    d.add_argument("--epochs", type=int, default=3)
    d.add_argument("--images", type=int, default=256, help="size of the generated set (without --data)")
    d.add_argument("--batch-size", type=int, default=16)
    d.add_argument("--workers", type=int, default=2, help="py_num_workers per pipeline")
    s = sub.add_parser("shards", help="write a data set as WebDataset tar shards (indexed) and print their pattern")
    s.add_argument("data", help=_DATA_HELP)
    s.add_argument("out_dir", help="local folder for the shards")
    s.add_argument("--samples-per-shard", type=int, default=1000)
    s.add_argument("--prefix", default="shard", help="shards are PREFIX-000000.tar, ...")
    s.add_argument("--shuffle-seed", type=int, help="shuffle samples across shards with this seed (default: keep the order)")
    g = sub.add_parser("gen-data", help="generate a deterministic JPEG set (see ray_extsrc.synthetic)")
    g.add_argument("rest", nargs=argparse.REMAINDER)
    b = sub.add_parser("bench", help="the R1 benchmark against the peers; --train MODELS: the training "
                                     "benchmark; --cpu: the CPU benchmark (see benchmarks/README.md)")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo(args)
    if args.command == "shards":
        return shards(args)
    if args.command == "gen-data":
        from .synthetic import main as gen_main

        return gen_main(args.rest)
    from .bench import main as bench_main

    return bench_main(args.rest)


if __name__ == "__main__":
    sys.exit(main())
