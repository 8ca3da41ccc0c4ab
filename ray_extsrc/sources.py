"""Ready-made sources. `FileListSource` is the DALI tutorial's ``ExternalInputCallable``, reusable."""

from __future__ import annotations

import os

import numpy as np

from .types import SampleInfo

__all__ = ["FileListSource"]


class FileListSource:
    """``source(sample_info) -> (encoded bytes as a uint8 array, int32 label of shape (1,))``.

    Reads ``root/file_list.txt`` ("name label" lines, as the tutorial does). Stateless and
    picklable, so it works with ``parallel=True`` under fork and spawn; ``__len__`` lets sharded
    loaders agree on the epoch length up front.
    """

    def __init__(self, root: str | os.PathLike, batch_size: int, limit: int | None = None) -> None:
        from .synthetic import read_file_list

        self.root = os.fspath(root)
        self.batch_size = batch_size
        entries = read_file_list(self.root)[:limit]  # limit: only the first ``limit`` files
        self.files = [name for name, _ in entries]
        self.labels = [label for _, label in entries]
        self.full_iterations = len(self.files) // batch_size

    def __len__(self) -> int:
        return self.full_iterations * self.batch_size

    def __call__(self, sample_info: SampleInfo):
        if sample_info.iteration >= self.full_iterations:
            raise StopIteration
        i = sample_info.idx_in_epoch
        with open(os.path.join(self.root, self.files[i]), "rb") as f:
            data = np.frombuffer(f.read(), dtype=np.uint8)
        return data, np.int32([self.labels[i]])
