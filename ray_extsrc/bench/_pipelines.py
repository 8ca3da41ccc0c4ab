"""The R1 workload as a ray_extsrc pipeline: per-sample file source, random-resized-crop, flip p=0.5,
ImageNet normalisation, CHW, batch 256 (float16 224 x 224 on the GPU by default). Module-level
(picklable by reference), so Ray Train's loader actors and spawned workers can import it.

Decoder settings are arguments of the decoder op (`ray_extsrc.fn.decoder_options.DecoderOptions`'s
fields: ``backend``, ``hw_decoder_load``, ``split_share``, ``split_backend``, ``decode_threads``,
``cpu_threads``, ``roi``, ``chunk``, ``codec_options``, ...): `r1_pipeline` forwards its extra
keyword arguments to ``fn.decoders.image_random_crop``; nothing is read from the environment.
"""

from __future__ import annotations

from typing import Any

from .. import fn, pipeline_def, types
from ..readers import FileListSource

IMAGENET_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
IMAGENET_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
_DTYPES = {"float16": types.FLOAT16, "float32": types.FLOAT}


@pipeline_def(batch_size=256, num_threads=2, device_id=0, py_num_workers=12, seed=0, prefetch_queue_depth=2)
def r1_pipeline(root: str, limit: int | None = None, device: str = "gpu", size: int = 224, batch: int = 256,
                dtype: str = "float16", **decoder: Any):
    """``batch`` is the file source's batch (its epoch = full batches); give the pipeline the same
    ``batch_size``. ``device="cpu"`` decodes with libjpeg-turbo on the CPU (the decoder keyword
    arguments are then checked but unused)."""
    jpegs, labels = fn.external_source(
        source=FileListSource(root, batch, limit), num_outputs=2, batch=False, parallel=True,
        dtype=[types.UINT8, types.INT32],
    )
    images = fn.decoders.image_random_crop(jpegs, device="mixed" if device == "gpu" else "cpu",
                                           random_area=(0.08, 1.0), random_aspect_ratio=(3 / 4, 4 / 3), **decoder)
    images = fn.resize(images, resize_x=size, resize_y=size)
    images = fn.crop_mirror_normalize(
        images, mirror=fn.random.coin_flip(probability=0.5), mean=IMAGENET_MEAN, std=IMAGENET_STD,
        dtype=_DTYPES[dtype], output_layout="CHW",
    )
    return images, labels


def parse_decoder_options(text: str) -> dict[str, Any]:
    """``"backend=hw,decode_threads=1"`` -> ``{"backend": "hw", "decode_threads": 1}``: keyword
    arguments for the decoder op, typed after `DecoderOptions`' fields and validated by it."""
    import dataclasses

    from ..fn.decoder_options import DecoderOptions

    kinds = {f.name: type(getattr(DecoderOptions(), f.name)) for f in dataclasses.fields(DecoderOptions)}
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, raw = item.partition("=")
        if not sep or name not in kinds:
            raise ValueError(f"decoder option {item!r}: expected NAME=VALUE with NAME one of {sorted(kinds)}")
        kind = kinds[name]
        out[name] = raw.lower() in ("1", "true", "yes") if kind is bool else kind(raw)
    DecoderOptions(**out)  # validated here, before any process starts
    return out
