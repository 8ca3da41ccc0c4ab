"""The torch baseline's data path, one copy for every benchmark (R1 systems c and d, the CPU
benchmark, the training benchmark's ``torch`` feed): Pillow decode + torchvision transforms v2
(``RandomResizedCrop(size, antialias=True)``, ``RandomHorizontalFlip``, ``ToImage``,
``ToDtype(float32, scale=True)``, ``Normalize(ImageNet)``) over the data set's ``file_list.txt``
in file-list order. Needs torch, torchvision and Pillow; imports them only when used."""

from __future__ import annotations

import os
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def tv_transform(size: int = 224) -> Any:
    import torch
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


class TorchFiles:
    """A map-style ``torch.utils.data.Dataset``: ``(transformed image, label)`` per file of
    ``root/file_list.txt`` (the first ``limit``), in the order ray_extsrc's `FileListSource` reads."""

    def __init__(self, root: str, limit: int | None = None, size: int = 224) -> None:
        from ..readers import read_file_list

        self.root = root
        self.entries = read_file_list(root)[:limit]
        self.transform = tv_transform(size)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int):
        from PIL import Image

        name, label = self.entries[i]
        with Image.open(os.path.join(self.root, name)) as im:
            rgb = im.convert("RGB")
        return self.transform(rgb), label


def torch_loader(root: str, limit: int | None, *, batch: int, workers: int, pin_memory: bool, size: int = 224,
                 seed: int = 0) -> Any:
    """The baseline's DataLoader: no shuffle, full batches, persistent workers, prefetch 2."""
    import torch
    from torch.utils.data import DataLoader

    torch.manual_seed(seed)
    return DataLoader(TorchFiles(root, limit, size), batch_size=batch, shuffle=False, num_workers=workers,
                      drop_last=True, pin_memory=pin_memory, persistent_workers=workers > 0,
                      prefetch_factor=2 if workers > 0 else None)
