"""The R1 workload as a ray_extsrc pipeline: per-sample file source, GPU random-resized-crop 224,
flip p=0.5, ImageNet normalisation, float16 CHW, batch 256. Module-level (picklable by reference),
so Ray Train's loader actors and spawned workers can import it."""

from __future__ import annotations

from .. import fn, pipeline_def, types
from ..sources import FileListSource

IMAGENET_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
IMAGENET_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


@pipeline_def(batch_size=256, num_threads=2, device_id=0, py_num_workers=12, seed=0, prefetch_queue_depth=2)
def r1_pipeline(root: str, limit: int | None = None, device: str = "gpu"):
    jpegs, labels = fn.external_source(
        source=FileListSource(root, 256, limit), num_outputs=2, batch=False, parallel=True,
        dtype=[types.UINT8, types.INT32],
    )
    images = fn.decoders.image_random_crop(jpegs, device="mixed" if device == "gpu" else "cpu")
    images = fn.resize(images, resize_x=224, resize_y=224)
    images = fn.crop_mirror_normalize(
        images, mirror=fn.random.coin_flip(probability=0.5), mean=IMAGENET_MEAN, std=IMAGENET_STD,
        dtype=types.FLOAT16, output_layout="CHW",
    )
    return images, labels
