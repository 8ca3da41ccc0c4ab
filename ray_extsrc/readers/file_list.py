"""The DALI tutorial's file-list layout: ``root/file_list.txt``, one "relative/name label" line per file.

`read_file_list` parses it exactly as the tutorial's ``ExternalInputCallable`` does; `FileListSource`
is that callable, reusable: ``source(sample_info) -> (encoded bytes as uint8, int32 label of shape (1,))``.
``root`` may be a local folder or any fsspec URL (``s3://bucket/set``, ``https://host/set``): the
listing and the files are then read through fsspec (``pip install 'ray_extsrc[remote]'``).
`ray_extsrc.synthetic` writes data sets in this layout.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ._base import Reader, check_count
from ._retry import DEFAULT_RETRY, RetryPolicy
from ._storage import Storage, is_url, join_location, normalize_location

__all__ = ["FILE_LIST", "FileListSource", "read_file_list", "parse_file_list"]

#: The listing's file name inside a data-set root.
FILE_LIST = "file_list.txt"


def parse_file_list(text: str) -> list[tuple[str, int]]:
    """``[(relative name, label), ...]`` from a file list's text, parsed the DALI-tutorial way."""
    return [(name, int(label)) for name, label in (line.rstrip().split(" ") for line in text.splitlines() if line.strip())]


def read_file_list(root: str | os.PathLike, storage: Storage | None = None) -> list[tuple[str, int]]:
    """``[(relative name, label), ...]`` from ``root/file_list.txt`` (a folder or a URL)."""
    root = os.fspath(root)
    if not is_url(root):
        with open(os.path.join(root, FILE_LIST)) as f:
            return parse_file_list(f.read())
    return parse_file_list((storage or Storage()).read_text(join_location(root, FILE_LIST)))


class FileListSource(Reader):
    """``source(sample_info) -> (encoded bytes as a uint8 array, int32 label of shape (1,))``.

    Reads ``root/file_list.txt`` ("name label" lines, as the tutorial does); ``limit`` keeps only the
    first ``limit`` files. With ``batch_size`` the epoch is ``len(files) // batch_size`` full
    batches, as in the tutorial (``StopIteration`` at ``iteration >= full_iterations``); without it,
    the epoch is every file once (``StopIteration`` at ``idx_in_epoch >= len(files)``; the pipeline
    keeps only full batches). Stateless and picklable, so it works with ``parallel=True`` under fork
    and spawn; ``__len__`` lets sharded loaders agree on the epoch length up front.

    ``root`` may be an fsspec URL; ``storage_options`` go to fsspec (e.g. ``{"anon": True}`` or an
    ``endpoint_url`` for s3), ``retry`` says how transient errors are retried.

    >>> src = FileListSource("demo-output/images", batch_size=16)            # doctest: +SKIP
    >>> src = FileListSource("s3://bucket/images", storage_options={"anon": True})  # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | os.PathLike,
        batch_size: int | None = None,
        limit: int | None = None,
        *,
        storage_options: Mapping[str, Any] | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        check_count("FileListSource: batch_size", batch_size)
        check_count("FileListSource: limit", limit, minimum=0)
        self.root = normalize_location(root) if is_url(os.fspath(root)) else os.fspath(root)
        self.storage = Storage(dict(storage_options or {}), retry)
        entries = read_file_list(self.root, self.storage)[:limit]
        self.files = [name for name, _ in entries]
        self.labels = [label for _, label in entries]
        self._set_length(len(self.files), batch_size)

    def read_sample(self, i: int) -> tuple[bytes, int]:
        return self.storage.read(join_location(self.root, self.files[i]), idx=i), self.labels[i]

    def sample_name(self, i: int) -> str:
        return self.files[i]
