"""Train a tiny CNN with Ray Train on JPEGs decoded and augmented by ray_extsrc loader actors.

Each Ray Train worker gets its own loader actor on its node (on its GPU, when it has one) running a
DALI-style pipeline: a parallel external source reading JPEG files in forked Python workers, then
decode + random crop + resize + flip + normalize. Same script on a laptop and on a cluster::

    python examples/ray_train.py --epochs 2 --num-workers 2                 # CPU, a couple of minutes
    python examples/ray_train.py --epochs 5 --num-workers 4 --use-gpu       # GPUs: decode on the GPU
    ray job submit --working-dir . -- python examples/ray_train.py --num-workers 4 --use-gpu

The data set is synthetic (`ray_extsrc.synthetic`): each loader actor generates it on its own node
the first time (idempotent, locked), so no shared file system is needed for the data. Checkpoints
(model + loader position) do need storage all nodes reach on a multi-node cluster: ``--storage-path``.
Kill the run mid-epoch and start it again with the same ``--name`` and ``--storage-path``: it resumes
at the next unconsumed batch.

The synthetic images carry their label as a colour tint (``labels_visible=True``), so the network
has something to learn: validation accuracy climbs well above chance (10 %) within a few epochs.
Training pads its last round of batches (``last_batch_policy="pad"``, the default: every image
each epoch, equal steps on every rank); validation uses ``"exact"``, whose ``batch["valid"]`` mask
leaves the padding out, so the accuracy summed over ranks is the one a single process would get.
For real data, ``--train-data`` / ``--val-data`` take what `ray_extsrc.readers.open_dataset` reads: a
folder with a ``file_list.txt`` ("name label" lines), a class-folder tree (ImageFolder), WebDataset
shards (``shards/train-{000000..000146}.tar``) or an ``s3://``/``gs://``/``https://`` URL of one of
these (``pip install 'ray_extsrc[remote]'`` on the cluster); the number of classes comes from the
data. Every node must reach that path or URL.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile

from ray_extsrc import fn, pipeline_def, types
from ray_extsrc.readers import FileListSource, open_dataset

MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
NUM_CLASSES = 10


def jpeg_files(root: str, num_images: int, seed: int, data: str | None = None) -> FileListSource:
    """Per-sample source, the DALI tutorial's ``ExternalInputCallable``: (encoded JPEG, label).

    Made in the loader actor: ``data`` (a path or URL, see the module docstring) when given, else
    the synthetic set, which the actor first generates on its node if it is not there (idempotent,
    locked); every file is read once per epoch.
    """
    if data is not None:
        return open_dataset(data)
    from ray_extsrc import synthetic

    spec = dataclasses.replace(
        synthetic.SMALL, num_images=num_images, seed=seed, num_classes=NUM_CLASSES, labels_visible=True
    )
    synthetic.make_jpeg_dataset(root, spec, progress=False)
    return FileListSource(root)


@pipeline_def(batch_size=32, num_threads=2, py_num_workers=2)
def training_pipeline(root: str, num_images: int, image_size: int = 64, decoder_device: str = "mixed",
                      data: str | None = None):
    jpegs, labels = fn.external_source(
        source=jpeg_files(root, num_images, seed=0, data=data), num_outputs=2, batch=False, parallel=True
    )
    images = fn.decoders.image_random_crop(jpegs, device=decoder_device, output_type=types.RGB)
    images = fn.resize(images, size=(image_size, image_size))
    images = fn.crop_mirror_normalize(
        images, mirror=fn.random.coin_flip(), mean=MEAN, std=STD, dtype=types.FLOAT, output_layout="CHW"
    )
    return images, labels


@pipeline_def(batch_size=32, num_threads=2, py_num_workers=2)
def validation_pipeline(root: str, num_images: int, image_size: int = 64, decoder_device: str = "mixed",
                      data: str | None = None):
    jpegs, labels = fn.external_source(
        source=jpeg_files(root, num_images, seed=1, data=data), num_outputs=2, batch=False, parallel=True
    )
    images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB)
    images = fn.resize(images, size=(image_size, image_size))
    images = fn.crop_mirror_normalize(images, mean=MEAN, std=STD, dtype=types.FLOAT, output_layout="CHW")
    return images, labels


def tiny_cnn(num_classes: int = NUM_CLASSES):
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes),
    )


def train_loop_per_worker(config):
    import json

    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    model = ray.train.torch.prepare_model(tiny_cnn(config.get("num_classes", NUM_CLASSES)))
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # restarted after a failure, or resumed run: model and loader position
        with ckpt.as_directory() as d:
            model.load_state_dict(torch.load(os.path.join(d, "model.pt"), map_location="cpu"))
            with open(os.path.join(d, "loader.json")) as f:
                state = json.load(f)
    train_it = config["loaders"]["train"].iter_torch_batches(state=state)
    val_it = config["loaders"]["val"].iter_torch_batches()

    for epoch in range(train_it.epoch_idx, config["epochs"]):
        model.train()
        train_loss, seen = 0.0, 0
        for batch in train_it:  # one epoch (or its rest, after a resume)
            images, labels = batch["images"], batch["labels"].view(-1).long()  # int32 labels
            loss = loss_fn(model(images), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            train_loss += loss.item() * len(labels)
            seen += len(labels)

        model.eval()
        correct = torch.zeros(2, device=train_it.device)  # (right, total), summed over ranks below
        with torch.no_grad():
            for batch in val_it:
                valid = batch["valid"]  # False on the samples that only pad the last round
                pred = model(batch["images"]).argmax(dim=1)
                correct[0] += ((pred == batch["labels"].view(-1)) & valid).sum()
                correct[1] += valid.sum()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(correct)

        stats = train_it.stats()
        metrics = {
            "epoch": epoch,
            "train_loss": train_loss / max(seen, 1),
            "val_accuracy": (correct[0] / correct[1].clamp(min=1)).item(),
            "samples_per_s": stats["samples_per_s"],
            "delivery_s": stats["delivery_s"],
            "worker_wait_s": stats["worker_wait_s"],
            "main_ops_s": stats["main_ops_s"],
            "transport": stats["transport"],
        }
        if ray.train.get_context().get_world_rank() == 0:
            with tempfile.TemporaryDirectory() as d:
                torch.save(model.state_dict(), os.path.join(d, "model.pt"))
                with open(os.path.join(d, "loader.json"), "w") as f:
                    json.dump(train_it.state_dict(), f)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)
        print(f"[rank {train_it.rank}] {metrics}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=2, help="Ray Train workers (one GPU each with --use-gpu)")
    parser.add_argument("--use-gpu", action="store_true", help="train on GPUs and decode/augment on them")
    parser.add_argument("--batch-size", type=int, default=32, help="per Train worker")
    parser.add_argument("--py-num-workers", type=int, default=2, help="forked Python workers per loader actor")
    parser.add_argument("--train-images", type=int, default=1024)
    parser.add_argument("--val-images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "ray_extsrc_example"))
    parser.add_argument("--storage-path", default=None, help="checkpoints; shared storage (s3://, NFS) on a cluster")
    parser.add_argument("--name", default="ray_extsrc_tiny_cnn")
    parser.add_argument("--train-data", default=None, help="a path or URL for open_dataset (default: synthetic)")
    parser.add_argument("--val-data", default=None, help="the same for validation (default: synthetic)")
    args = parser.parse_args(argv)
    num_classes = NUM_CLASSES
    if args.train_data is not None:
        labels = open_dataset(args.train_data).labels  # read here, before any actor starts
        num_classes = int(max(labels)) + 1
        print(f"train data: {len(labels)} samples, {num_classes} classes from {args.train_data}")

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray_extsrc.train import Loader

    ray.init()  # a laptop starts a local Ray; under `ray job submit` this joins the cluster
    common = dict(
        image_size=args.image_size,
        decoder_device="mixed" if args.use_gpu else "cpu",
        batch_size=args.batch_size,
        py_num_workers=args.py_num_workers,
    )
    loaders = {
        "train": Loader(
            training_pipeline, outputs=("images", "labels"), name="train", shuffle=True,
            root=os.path.join(args.data_dir, "train"), num_images=args.train_images, data=args.train_data, **common,
        ),
        "val": Loader(
            validation_pipeline, outputs=("images", "labels"), name="val", last_batch_policy="exact",
            root=os.path.join(args.data_dir, "val"), num_images=args.val_images, data=args.val_data, **common,
        ),
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"loaders": loaders, "epochs": args.epochs, "lr": args.lr, "num_classes": num_classes},
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu),
        run_config=RunConfig(
            name=args.name, storage_path=args.storage_path, failure_config=FailureConfig(max_failures=2)
        ),
    )
    result = trainer.fit()
    print("final metrics:", result.metrics)


if __name__ == "__main__":
    main()
