"""WebDataset tar shards, read by random access: sample ``idx_in_epoch`` is one range read of one shard.

``WebDatasetSource("/data/shard-{000000..000146}.tar")`` (or ``s3://bucket/shard-{...}.tar``,
``https://host/shard-{...}.tar``, a ``::``-joined list, or a list of paths/URLs) expands the shard
names as webdataset does (`expand_urls`), indexes each shard once (`_tar_index`: member offsets and
sizes grouped by key, cached next to a local shard or in the cache dir, rebuilt when the shard's
size/mtime/ETag change), and then reads sample i as ``shard[offset : offset + size]``: ``os.pread``
on a descriptor kept open per worker process, or an HTTP range request (fsspec ``cat_file(url,
start, end)``) through one filesystem object per worker process.

Samples are numbered shard by shard in tar order, so index i is the i-th sample webdataset would
yield from the unshuffled shard list; sharding and shuffling are the pipeline's (it asks for any
index in any order), not the shard list's. The image is the first of ``image_keys`` a sample has;
the label is the integer text of its ``label_key`` member (``.cls``), read once while indexing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ._base import Reader, check_count
from ._retry import DEFAULT_RETRY, RetryPolicy
from ._shard_names import expand_urls
from ._storage import Storage, normalize_location
from ._tar_index import ShardIndex, load_or_build

__all__ = ["WebDatasetSource", "IMAGE_KEYS"]

#: Extensions taken as the image, first present wins (webdataset's ``to_tuple("jpg;jpeg;png", ...)``).
IMAGE_KEYS = ("jpg", "jpeg", "png")
_MISSING_SHOWN = 3


class WebDatasetSource(Reader):
    """``source(sample_info) -> (encoded image bytes, int32 label of shape (1,))`` from tar shards.

    urls: a shard spec (brace pattern, ``::``-joined, ``${VAR}`` from ``WDS_VAR``) or a sequence of
        paths/URLs, local or fsspec (``pip install 'ray_extsrc[remote]'``).
    batch_size, limit: as for `FileListSource` (``limit``: the first ``limit`` samples).
    image_keys: extensions tried in order for the image (lower case, without the dot).
    label_key: extension of the integer label member; None: every label is -1.
    index_dir: keep the shard indexes there instead of next to the shards / in the cache dir.
    storage_options, retry: see `FileListSource`.
    index_threads: shards indexed (or their indexes checked) at once when the reader is made.

    Every sample must have an image and (unless ``label_key=None``) an integer label; a data set
    where some do not is refused when the reader is made, naming the first such samples.

    >>> src = WebDatasetSource("/data/imagenet/train-{000000..000146}.tar", batch_size=256)  # doctest: +SKIP
    >>> src = WebDatasetSource("s3://bucket/train-{000000..000146}.tar",
    ...                        storage_options={"endpoint_url": "http://minio:9000"})       # doctest: +SKIP
    """

    def __init__(
        self,
        urls: str | os.PathLike | Sequence[str | os.PathLike],
        batch_size: int | None = None,
        limit: int | None = None,
        *,
        image_keys: Sequence[str] = IMAGE_KEYS,
        label_key: str | None = "cls",
        index_dir: str | os.PathLike | None = None,
        storage_options: Mapping[str, Any] | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        index_threads: int = 8,
    ) -> None:
        check_count("WebDatasetSource: batch_size", batch_size)
        check_count("WebDatasetSource: limit", limit, minimum=0)
        check_count("WebDatasetSource: index_threads", index_threads, allow_none=False)
        if isinstance(image_keys, str) or not image_keys or not all(isinstance(k, str) and k for k in image_keys):
            raise TypeError(f"WebDatasetSource: image_keys must be a non-empty sequence of extensions such as "
                            f"('jpg', 'png'); got {image_keys!r}")
        if label_key is not None and (not isinstance(label_key, str) or not label_key):
            raise TypeError(f"WebDatasetSource: label_key must be an extension such as 'cls', or None; got {label_key!r}")
        self.shards = _shard_list(urls)
        self.image_keys = tuple(k.lower().lstrip(".") for k in image_keys)
        self.label_key = label_key.lower().lstrip(".") if label_key is not None else None
        self.index_dir = os.fspath(index_dir) if index_dir is not None else None
        self.storage = Storage(dict(storage_options or {}), retry)

        indexes = self._indexes(index_threads)
        self._compose(indexes, limit, batch_size)

    # -- construction ----------------------------------------------------------------------------

    def _indexes(self, threads: int) -> list[ShardIndex]:
        def one(shard: str) -> ShardIndex:
            return load_or_build(shard, self.storage, self.index_dir)

        if threads == 1 or len(self.shards) == 1:
            return [one(s) for s in self.shards]
        # Index reads are I/O (stat/HEAD, tar headers, a remote stream): threads overlap them.
        # The pool is gone before the reader is returned, so no thread outlives the constructor.
        with ThreadPoolExecutor(max_workers=min(threads, len(self.shards)), thread_name_prefix="wds-index") as pool:
            return list(pool.map(one, self.shards))

    def _compose(self, indexes: list[ShardIndex], limit: int | None, batch_size: int | None) -> None:
        offsets, sizes, labels, exts, counts = [], [], [], [], []
        no_image: list[str] = []
        no_label: list[str] = []
        n_no_image = n_no_label = 0
        for index in indexes:
            n = len(index)
            off = np.full(n, -1, dtype=np.int64)
            size = np.full(n, -1, dtype=np.int64)
            ext = np.zeros(n, dtype=np.uint8)
            for k in reversed(range(len(self.image_keys))):  # earlier keys win: written last
                col = index.members.get(self.image_keys[k])
                if col is not None:
                    have = col[0] >= 0
                    off[have], size[have], ext[have] = col[0][have], col[1][have], k
            missing = np.flatnonzero(off < 0)
            n_no_image += len(missing)
            no_image.extend(f"{index.keys[j]!r} in {index.shard}" for j in missing[: _MISSING_SHOWN - len(no_image)])
            if self.label_key is None:
                lab = np.full(n, -1, dtype=np.int64)
            else:
                values = index.ints.get(self.label_key, [None] * n)
                bad = [j for j, v in enumerate(values) if v is None]
                n_no_label += len(bad)
                no_label.extend(f"{index.keys[j]!r} in {index.shard}" for j in bad[: _MISSING_SHOWN - len(no_label)])
                lab = np.array([v if v is not None else -1 for v in values], dtype=np.int64)
            offsets.append(off)
            sizes.append(size)
            labels.append(lab)
            exts.append(ext)
            counts.append(n)
        if n_no_image:
            raise ValueError(
                f"WebDatasetSource: {n_no_image} samples have no image member (.{'/.'.join(self.image_keys)}), "
                f"e.g. {', '.join(no_image)}. Name the image's extension in image_keys=(...)"
            )
        if n_no_label:
            raise ValueError(
                f"WebDatasetSource: {n_no_label} samples have no integer .{self.label_key} member "
                f"(a small member holding an integer such as b'3'), e.g. {', '.join(no_label)}. Name the "
                f"label's extension in label_key=..., or pass label_key=None"
            )
        total = sum(counts)
        if total == 0:
            raise ValueError(f"WebDatasetSource: no samples in {len(self.shards)} shards ({self.shards[0]}, ...)")

        def cat(parts: list[np.ndarray], dtype) -> np.ndarray:
            return np.concatenate(parts).astype(dtype, copy=False)

        size_all = cat(sizes, np.int64)
        label_all = cat(labels, np.int64)
        if size_all.max() >= 2**31 or label_all.min() < -(2**31) or label_all.max() >= 2**31:
            raise ValueError("WebDatasetSource: a member of 2 GiB or more, or a label outside int32")
        keep = total if limit is None else min(limit, total)
        # Kept per sample (and pickled): 8 + 4 + 4 + 1 bytes; the keys stay in the index files.
        self._offsets = cat(offsets, np.int64)[:keep].copy()
        self._sizes = size_all.astype(np.int32)[:keep].copy()
        self._labels = label_all.astype(np.int32)[:keep].copy()
        self._exts = cat(exts, np.uint8)[:keep].copy()
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._set_length(keep, batch_size)

    # -- reading ---------------------------------------------------------------------------------

    def _locate(self, i: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self._starts, i, side="right")) - 1
        return shard, i - int(self._starts[shard])

    def read_sample(self, i: int) -> tuple[bytes, int]:
        shard, n = self._locate(i)
        start = int(self._offsets[i])
        end = start + int(self._sizes[i])
        data = self.storage.read(
            self.shards[shard], start, end, idx=i,
            context=f"sample {n} of the shard, .{self.image_keys[self._exts[i]]} at bytes {start}-{end}",
        )
        return data, int(self._labels[i])

    def sample_name(self, i: int) -> str:
        shard, n = self._locate(i)
        stem = self.shards[shard].rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0]
        return f"{stem}/{n:06d}.{self.image_keys[self._exts[i]]}"

    @property
    def labels(self) -> np.ndarray:
        """Every sample's label (int32), in index order."""
        return self._labels

    def shard_of(self, i: int) -> tuple[str, int]:
        """``(shard path or URL, sample number within it)`` of sample ``i``."""
        self._check_index(i)
        shard, n = self._locate(i)
        return self.shards[shard], n


def _shard_list(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    if isinstance(urls, (str, os.PathLike)):
        names = expand_urls(os.fspath(urls))
    elif isinstance(urls, Sequence) and all(isinstance(u, (str, os.PathLike)) for u in urls):
        names = [os.fspath(u) for u in urls]
    else:
        raise TypeError(f"WebDatasetSource: urls must be a shard spec (str) or a list of paths/URLs; got {urls!r:.100}")
    if not names:
        raise ValueError(f"WebDatasetSource: {urls!r} names no shard")
    return [normalize_location(n) for n in names]
