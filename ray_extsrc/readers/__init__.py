"""Readers: ready-made per-sample sources that read a data set where it lives, one module per format.

* `file_list` — DALI's external-source tutorial layout: ``root/file_list.txt`` of "name label"
  lines, each naming an encoded file under ``root``; `FileListSource` is the tutorial's
  ``ExternalInputCallable``, reusable.
* `image_folder` — an ImageNet-style tree ``root/<class>/<image>``; `ImageFolderSource` labels
  samples exactly as torchvision's ``ImageFolder``.
* `webdataset` — WebDataset tar shards (``shard-{000000..000099}.tar``); `WebDatasetSource` indexes
  each shard once (cached) and reads a sample as one range read.
* `shards` — `write_shards`: any of the above written as WebDataset shards.
* `open_dataset(spec)` — the right reader for a folder, a shard pattern or a URL.
* `testing` — local servers to try the remote readers on: HTTP with Range requests, S3 (moto).

Every reader takes local paths and fsspec URLs (``s3://``, ``gs://``, ``https://``, ...; ``pip
install 'ray_extsrc[remote]'``), has ``__len__``, answers any ``idx_in_epoch`` in any order (so
sharding, shuffling and resuming work), pickles small (its listing or index as arrays: no bytes,
no open files, no filesystem objects; those are made lazily in each worker process), retries
transient errors with exponential backoff (`RetryPolicy`) and raises a `ReadError` naming the URL
and the sample otherwise.

A reader is a plain source (see `ray_extsrc.source`): it knows nothing of pipelines, workers or Ray,
and never imports the test-data generator (`ray_extsrc.synthetic` imports the readers instead).
"""

from ._base import Reader
from ._errors import AccessDeniedError, ReadError, SampleNotFoundError
from ._open import open_dataset
from ._retry import DEFAULT_RETRY, NO_RETRY, RetryPolicy, is_transient
from ._shard_names import expand_urls
from ._storage import get_filesystem
from ._tar_index import index_cache_dir
from .file_list import FILE_LIST, FileListSource, read_file_list
from .image_folder import IMG_EXTENSIONS, ImageFolderSource
from .shards import write_shards
from .webdataset import WebDatasetSource

__all__ = [
    "Reader",
    "FILE_LIST",
    "FileListSource",
    "read_file_list",
    "IMG_EXTENSIONS",
    "ImageFolderSource",
    "WebDatasetSource",
    "expand_urls",
    "write_shards",
    "open_dataset",
    "RetryPolicy",
    "DEFAULT_RETRY",
    "NO_RETRY",
    "is_transient",
    "ReadError",
    "SampleNotFoundError",
    "AccessDeniedError",
    "get_filesystem",
    "index_cache_dir",
]
