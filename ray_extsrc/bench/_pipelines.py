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
from ..readers import FileListSource, ImageFolderSource, WebDatasetSource

#: what ``reader=`` names: the R1 set through each reader (its ``root`` is the set's folder, for
#: "webdataset" its shards' brace pattern, see `r1_shards`)
READERS = {"file_list": FileListSource, "image_folder": ImageFolderSource, "webdataset": WebDatasetSource}

IMAGENET_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
IMAGENET_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
_DTYPES = {"float16": types.FLOAT16, "float32": types.FLOAT}


@pipeline_def(batch_size=256, num_threads=2, device_id=0, py_num_workers=12, seed=0, prefetch_queue_depth=2)
def r1_pipeline(root: str, limit: int | None = None, device: str = "gpu", size: int = 224, batch: int = 256,
                dtype: str = "float16", reader: str = "file_list", **decoder: Any):
    """``batch`` is the file source's batch (its epoch = full batches); give the pipeline the same
    ``batch_size``. ``device="cpu"`` decodes with libjpeg-turbo on the CPU (the decoder keyword
    arguments are then checked but unused). ``reader``: one of `READERS`, the same images read
    from the file list, as a class-folder tree, or from WebDataset shards."""
    if reader not in READERS:
        raise ValueError(f"reader={reader!r}: one of {sorted(READERS)}")
    jpegs, labels = fn.external_source(
        source=READERS[reader](root, batch, limit), num_outputs=2, batch=False, parallel=True,
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


def r1_shards(root: str, samples_per_shard: int = 500) -> str:
    """The R1 set at ``root`` as WebDataset shards in ``root + "-shards"`` (written once, in file-list
    order, then reused); returns their brace pattern."""
    import os
    import shutil

    from ..readers import write_shards

    out = root.rstrip("/") + "-shards"
    marker = os.path.join(out, "PATTERN")
    if os.path.exists(marker):
        with open(marker) as f:
            return f.read().strip()
    shutil.rmtree(out, ignore_errors=True)  # a set written only in part (no marker yet)
    pattern = write_shards(FileListSource(root), out, samples_per_shard=samples_per_shard)
    with open(marker, "w") as f:  # last: its presence means every shard and index is complete
        f.write(pattern)
    return pattern


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
