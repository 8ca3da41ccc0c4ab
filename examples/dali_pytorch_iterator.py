"""A DALI-style PyTorch training loop on ray_extsrc: DALIClassificationIterator over synthetic JPEGs.

The loop is the one DALI's PyTorch examples write; only the imports differ::

    from ray_extsrc import fn, pipeline_def, types                  # was: from nvidia.dali import ...
    from ray_extsrc.plugin.pytorch import DALIClassificationIterator, LastBatchPolicy
                                                                   # was: from nvidia.dali.plugin.pytorch import ...

The reader is the tutorial's file-list source (`ray_extsrc.readers.FileListSource`) given
``name="Reader"``: its ``__len__`` is the epoch, as a DALI reader's is for ``reader_name``. Runs on a
CPU (decoding with simplejpeg) or a GPU (``device="mixed"``: nvImageCodec)::

    python examples/dali_pytorch_iterator.py [--data DIR] [--epochs 3] [--images 64] [--batch-size 8]

The images carry their label as a colour tint, so validation accuracy rises above chance (10 %).
With ``--images`` that ``--batch-size`` does not divide, LastBatchPolicy.PARTIAL needs the epoch's
last, partial batch, which pipelines serve when made with ``last_batch_policy="pad"`` or
``"exact"``; the iterator says so if they drop it.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
import torch.nn as nn

from ray_extsrc import fn, pipeline_def, types
from ray_extsrc.gpu_probe import gpu_available
from ray_extsrc.plugin.pytorch import DALIClassificationIterator, LastBatchPolicy
from ray_extsrc.readers import FileListSource
from ray_extsrc.synthetic import SMALL, make_jpeg_dataset

MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
NUM_CLASSES = 10
IMAGE_SIZE = 32


@pipeline_def(num_threads=2, py_num_workers=2)
def training_pipeline(root: str, decoder: str):
    jpegs, labels = fn.external_source(
        source=FileListSource(root), num_outputs=2, batch=False, parallel=True,
        dtype=[types.UINT8, types.INT32], name="Reader",
    )
    images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
    images = fn.resize(images, size=(IMAGE_SIZE, IMAGE_SIZE))
    images = fn.crop_mirror_normalize(
        images, mirror=fn.random.coin_flip(), mean=MEAN, std=STD, dtype=types.FLOAT, output_layout="CHW"
    )
    return images, labels


@pipeline_def(num_threads=2, py_num_workers=2)
def validation_pipeline(root: str, decoder: str):
    jpegs, labels = fn.external_source(
        source=FileListSource(root), num_outputs=2, batch=False, parallel=True,
        dtype=[types.UINT8, types.INT32], name="Reader",
    )
    images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
    images = fn.resize(images, size=(IMAGE_SIZE, IMAGE_SIZE))
    images = fn.crop_mirror_normalize(images, mean=MEAN, std=STD, dtype=types.FLOAT, output_layout="CHW")
    return images, labels


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(32, NUM_CLASSES),
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="demo-output/dali-iterator/images", help="where the JPEG set is (made if missing)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=SMALL.num_images)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    spec = dataclasses.replace(SMALL, num_images=args.images, num_classes=NUM_CLASSES, labels_visible=True)
    root = str(make_jpeg_dataset(args.data, spec, progress=False))
    use_gpu = gpu_available()  # asks without initialising CUDA: the workers fork first
    decoder, device_id = ("mixed", 0) if use_gpu else ("cpu", None)
    train_pipe = training_pipeline(root, decoder, batch_size=args.batch_size, device_id=device_id, seed=0)
    val_pipe = validation_pipeline(root, decoder, batch_size=args.batch_size, device_id=device_id, seed=1)
    for pipe in (train_pipe, val_pipe):
        pipe.start_py_workers()  # fork before anything touches CUDA

    # ---- the DALI loop, as written for nvidia.dali.plugin.pytorch ----------------------------------
    train_loader = DALIClassificationIterator(
        train_pipe, reader_name="Reader", last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True
    )
    val_loader = DALIClassificationIterator(
        val_pipe, reader_name="Reader", last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True
    )
    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    torch.manual_seed(0)
    model = tiny_cnn().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    result: dict = {"steps": [], "samples": [], "accuracy": []}
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        model.train()
        steps = samples = 0
        for i, data in enumerate(train_loader):
            images = data[0]["data"].to(device, non_blocking=True)
            labels = data[0]["label"].squeeze(-1).long().to(device, non_blocking=True)
            loss = criterion(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps, samples = i + 1, samples + labels.numel()
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for data in val_loader:
                images = data[0]["data"].to(device)
                labels = data[0]["label"].squeeze(-1).long().to(device)
                correct += int((model(images).argmax(1) == labels).sum())
                total += labels.numel()
        accuracy = correct / max(total, 1)
        print(
            f"epoch {epoch}: {steps}/{len(train_loader)} steps, {samples} images, loss {loss.item():.3f}, "
            f"val accuracy {accuracy:.2f} ({total} images), {time.perf_counter() - t0:.1f} s"
        )
        result["steps"].append(steps)
        result["samples"].append(samples)
        result["accuracy"].append(accuracy)
    # ---- end of the DALI loop ----------------------------------------------------------------------

    for pipe in (train_pipe, val_pipe):
        pipe.close()
    return result


if __name__ == "__main__":
    main()
