"""ray_extsrc runner: parallel external source + CPU ops, one process per run.

Started by cpu_bench.py with the package's interpreter. Builds the same augmentation as the torch
baseline with DALI's op names (the pipeline below is the DALI tutorial's, with ``device="cpu"``):

    python benchmarks/_extsrc_runner.py --root DATA --batch-size 64 --workers 2 --epochs 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time

_T_START = time.perf_counter()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit, timed_epochs, versions  # noqa: E402
from ray_extsrc.sources import FileListSource  # noqa: E402

IMAGENET_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
IMAGENET_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="data set directory holding file_list.txt")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="py_num_workers")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="num_threads of the pipeline")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from ray_extsrc import fn, pipeline_def, types

    @pipeline_def(
        batch_size=args.batch_size,
        num_threads=args.threads,
        device_id=None,
        py_num_workers=args.workers,
        seed=args.seed,
        prefetch_queue_depth=2,
    )
    def train_pipe(root):
        jpegs, labels = fn.external_source(
            source=FileListSource(root, args.batch_size),
            num_outputs=2,
            batch=False,
            parallel=True,
            dtype=[types.UINT8, types.INT32],
        )
        images = fn.decoders.image_random_crop(
            jpegs, device="cpu", random_area=(0.08, 1.0), random_aspect_ratio=(3 / 4, 4 / 3)
        )
        images = fn.resize(images, resize_x=224, resize_y=224)
        images = fn.crop_mirror_normalize(
            images,
            mirror=fn.random.coin_flip(probability=0.5),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            dtype=types.FLOAT,
            output_layout="CHW",
        )
        return images, labels

    pipe = train_pipe(args.root)
    pipe.start_py_workers()
    pipe.build()

    def epoch():
        while True:
            try:
                images, labels = pipe.run()
            except StopIteration:
                pipe.reset()
                return
            labels.as_array()
            yield images.as_array()  # (B, 3, 224, 224) float32 in this process

    setup_s = time.perf_counter() - _T_START
    try:
        records = timed_epochs(
            epoch, epochs=args.epochs, warmup_epochs=args.warmup_epochs, batch_size=args.batch_size
        )
    finally:
        pipe.close()
    emit(
        {
            "system": "ray_extsrc",
            "description": "ray_extsrc parallel external source (per-sample FileListSource) + "
            "fn.decoders.image_random_crop(device='cpu') + fn.resize(224x224) + "
            "fn.crop_mirror_normalize(mirror=coin_flip, float32, CHW)",
            "interpreter": sys.executable,
            "versions": versions(["ray_extsrc", "numpy", "simplejpeg", "PIL"]),
            "num_threads": args.threads,
            "pid": os.getpid(),
            "setup_s": round(setup_s, 3),
            "epochs": records,
        }
    )


if __name__ == "__main__":
    main()
