"""The per-sample source the ray_extsrc benchmark runner feeds its pipeline.

Written like the DALI tutorial's ``ExternalInputCallable``: a stateless function of ``sample_info``
that reads one encoded JPEG and its label. It lives in its own module (not in the runner script,
which runs as ``__main__``) so that it pickles by reference when workers are spawned rather than
forked.
"""

from __future__ import annotations

import os

import numpy as np

from _common import read_file_list


class FileListSource:
    """``source(sample_info) -> (encoded JPEG bytes as uint8 array, int32 label of shape (1,))``."""

    def __init__(self, root: str, batch_size: int) -> None:
        self.root = root
        self.batch_size = batch_size
        self.files, self.labels = read_file_list(root)
        self.full_iterations = len(self.files) // batch_size

    def __len__(self) -> int:
        return self.full_iterations * self.batch_size

    def __call__(self, sample_info):
        if sample_info.iteration >= self.full_iterations:
            raise StopIteration
        idx = sample_info.idx_in_epoch
        with open(os.path.join(self.root, self.files[idx]), "rb") as f:
            encoded = np.frombuffer(f.read(), dtype=np.uint8)
        return encoded, np.int32([self.labels[idx]])
