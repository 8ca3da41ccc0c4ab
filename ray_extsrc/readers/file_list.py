"""The DALI tutorial's file-list layout: ``root/file_list.txt``, one "relative/name label" line per file.

`read_file_list` parses it exactly as the tutorial's ``ExternalInputCallable`` does; `FileListSource`
is that callable, reusable: ``source(sample_info) -> (encoded bytes as uint8, int32 label of shape (1,))``.
`ray_extsrc.synthetic` writes data sets in this layout.
"""

from __future__ import annotations

import os

import numpy as np

from ..types import SampleInfo

__all__ = ["FILE_LIST", "FileListSource", "read_file_list"]

#: The listing's file name inside a data-set root.
FILE_LIST = "file_list.txt"


def read_file_list(root: str | os.PathLike) -> list[tuple[str, int]]:
    """``[(relative name, label), ...]`` from ``root/file_list.txt``, parsed the DALI-tutorial way."""
    with open(os.path.join(os.fspath(root), FILE_LIST)) as f:
        return [(name, int(label)) for name, label in (line.rstrip().split(" ") for line in f if line.strip())]


class FileListSource:
    """``source(sample_info) -> (encoded bytes as a uint8 array, int32 label of shape (1,))``.

    Reads ``root/file_list.txt`` ("name label" lines, as the tutorial does); ``limit`` keeps only the
    first ``limit`` files. With ``batch_size`` the epoch is ``len(files) // batch_size`` full
    batches, as in the tutorial (``StopIteration`` at ``iteration >= full_iterations``); without it,
    the epoch is every file once (``StopIteration`` at ``idx_in_epoch >= len(files)``; the pipeline
    keeps only full batches). Stateless and picklable, so it works with ``parallel=True`` under fork
    and spawn; ``__len__`` lets sharded loaders agree on the epoch length up front.
    """

    def __init__(self, root: str | os.PathLike, batch_size: int | None = None, limit: int | None = None) -> None:
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"FileListSource: batch_size must be a positive int or None; got {batch_size!r}")
        self.root = os.fspath(root)
        self.batch_size = batch_size
        entries = read_file_list(self.root)[:limit]
        self.files = [name for name, _ in entries]
        self.labels = [label for _, label in entries]
        self.full_iterations = len(self.files) // batch_size if batch_size is not None else None

    def __len__(self) -> int:
        if self.batch_size is None:
            return len(self.files)
        return self.full_iterations * self.batch_size

    def __call__(self, sample_info: SampleInfo):
        if self.full_iterations is not None and sample_info.iteration >= self.full_iterations:
            raise StopIteration
        i = sample_info.idx_in_epoch
        if i >= len(self.files):
            raise StopIteration
        with open(os.path.join(self.root, self.files[i]), "rb") as f:
            data = np.frombuffer(f.read(), dtype=np.uint8)
        return data, np.int32([self.labels[i]])
