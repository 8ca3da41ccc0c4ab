"""What every benchmark runner shares: the epoch timing convention and the result line.

Standard library only: this module is imported by runners living in *different* virtual
environments (the torch baseline runs under its own interpreter, see benchmarks/README.md).

Timing convention (identical for every system; benchmarks/README.md repeats it):

* An epoch is timed from just before its first request (``iter(loader)`` for torch, the first
  ``pipe.run()`` for ray_extsrc) to the moment its end-of-epoch signal has been handled
  (``StopIteration`` from the torch iterator; ``StopIteration`` from ``pipe.run()`` followed by
  ``pipe.reset()``). The first batch's latency is inside the epoch; so is exactly one reset per
  epoch for each system (torch's persistent-worker iterator resets inside ``iter()``).
* Only full batches exist (``drop_last=True`` / the source's ``full_iterations``); images counted
  = batches x batch size, and every batch is materialised as a float32 (B, 3, 224, 224) array in
  the runner's main process before it counts.
* The first ``warmup_epochs`` epochs run the same way but are kept apart from the timed ones: they
  absorb one-time costs (worker fork, lazy imports, first touches of the page cache).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

RESULT_PREFIX = "BENCH-RESULT "
IMAGE_SHAPE = (3, 224, 224)


def timed_epochs(
    make_epoch: Callable[[], Iterator[Any]],
    *,
    epochs: int,
    warmup_epochs: int,
    batch_size: int,
) -> list[dict]:
    """Run ``warmup_epochs + epochs`` epochs; one record per epoch.

    ``make_epoch()`` returns an iterator of *materialised* image batches for one epoch (objects with
    ``.shape`` and ``.dtype``); it is called inside the timed region, so whatever it does to start the
    epoch is counted.
    """
    records = []
    for epoch in range(warmup_epochs + epochs):
        batches = 0
        first_batch_s = None
        t0 = time.perf_counter()
        for images in make_epoch():
            if batches == 0:
                first_batch_s = time.perf_counter() - t0
                _check_batch(images, batch_size, epoch)
            batches += 1
        seconds = time.perf_counter() - t0
        if batches == 0:
            raise RuntimeError(f"epoch {epoch} produced no batches (fewer images than one batch of {batch_size}?)")
        images_done = batches * batch_size
        records.append(
            {
                "epoch": epoch,
                "warmup": epoch < warmup_epochs,
                "batches": batches,
                "images": images_done,
                "seconds": round(seconds, 6),
                "first_batch_s": round(first_batch_s, 6),
                "images_per_s": round(images_done / seconds, 3),
            }
        )
        print(
            f"[{'warm-up' if epoch < warmup_epochs else 'timed'}] epoch {epoch}: {images_done} images "
            f"in {seconds:.3f} s = {images_done / seconds:.1f} img/s (first batch {first_batch_s:.3f} s)",
            file=sys.stderr,
            flush=True,
        )
    return records


def _check_batch(images: Any, batch_size: int, epoch: int) -> None:
    shape = tuple(images.shape)
    dtype = str(images.dtype)
    if shape != (batch_size, *IMAGE_SHAPE) or dtype not in ("float32", "torch.float32"):
        raise RuntimeError(
            f"epoch {epoch}: expected a float32 batch of shape {(batch_size, *IMAGE_SHAPE)}; "
            f"got {dtype} {shape}"
        )


def read_file_list(root: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The DALI tutorial's parsing of ``root/file_list.txt``: ``(relative paths, labels)``."""
    with open(root.rstrip("/") + "/file_list.txt") as f:
        file_label = [line.rstrip().split(" ") for line in f if line.strip()]
    files, labels = zip(*file_label)
    return files, tuple(int(label) for label in labels)


def versions(modules: Iterable[str]) -> dict[str, str | None]:
    """``{module: __version__}`` for the modules this runner imported (None when absent)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in modules:
        module = sys.modules.get(name)
        out[name] = getattr(module, "__version__", None) if module is not None else None
    return out


def emit(result: dict) -> None:
    """Print the runner's result as the one line the orchestrator (cpu_bench.py) parses."""
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()
