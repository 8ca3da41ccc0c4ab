"""Torch baseline runner: DataLoader + Pillow + torchvision transforms v2, one process per run.

Started by cpu_bench.py, possibly with another interpreter (``--torch-python``), so it imports only
torch, torchvision, Pillow and ``_common`` (standard library) -- never ray_extsrc.

    python benchmarks/_torch_baseline.py --root DATA --batch-size 64 --workers 2 --epochs 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time

_T_START = time.perf_counter()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit, read_file_list, timed_epochs, versions  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="data set directory holding file_list.txt")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    import torchvision  # noqa: F401  (imported for its version, recorded below)
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision.transforms import v2

    class FileListDataset(Dataset):
        """The same files and labels, in the same order, as the ray_extsrc source reads."""

        def __init__(self, root: str) -> None:
            self.root = root
            self.files, self.labels = read_file_list(root)
            self.transform = v2.Compose(
                [
                    v2.RandomResizedCrop(224, antialias=True),
                    v2.RandomHorizontalFlip(),
                    v2.ToImage(),
                    v2.ToDtype(torch.float32, scale=True),
                    v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
                ]
            )

        def __len__(self) -> int:
            return len(self.files)

        def __getitem__(self, i: int):
            with Image.open(os.path.join(self.root, self.files[i])) as im:
                rgb = im.convert("RGB")
            return self.transform(rgb), self.labels[i]

    torch.manual_seed(args.seed)
    dataset = FileListDataset(args.root)
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=False,  # ray_extsrc.sources.FileListSource reads in file-list order too
        num_workers=args.workers,
        drop_last=True,
        pin_memory=False,  # no GPU on the CPU benchmark machine
        persistent_workers=args.workers > 0,  # like ray_extsrc's py workers: started once, kept
        prefetch_factor=2 if args.workers > 0 else None,  # ~ prefetch_queue_depth=2
    )

    def epoch():
        for images, labels in loader:
            # The collated batch already lives in this process (shared memory from the worker);
            # take the same NumPy view the ray_extsrc side gets from as_array().
            yield images.numpy()

    setup_s = time.perf_counter() - _T_START
    records = timed_epochs(epoch, epochs=args.epochs, warmup_epochs=args.warmup_epochs, batch_size=args.batch_size)
    emit(
        {
            "system": "torch",
            "description": "torch DataLoader + Pillow decode + torchvision.transforms.v2 "
            "(RandomResizedCrop(224, antialias=True), RandomHorizontalFlip, ToImage, "
            "ToDtype(float32, scale=True), Normalize)",
            "interpreter": sys.executable,
            "versions": versions(["torch", "torchvision", "PIL", "numpy"]),
            "torch_threads": torch.get_num_threads(),
            "multiprocessing_context": str(loader.multiprocessing_context or "default (fork on Linux)"),
            "pid": os.getpid(),
            "setup_s": round(setup_s, 3),
            "epochs": records,
        }
    )


if __name__ == "__main__":
    main()
