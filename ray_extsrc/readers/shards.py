"""Writing a data set as WebDataset tar shards (`write_shards`), e.g. to move a folder tree to S3.

Each sample becomes two consecutive members, ``<key>.cls`` (the label as decimal text, as
webdataset's writer stores an int) and ``<key>.<ext>`` (the encoded bytes as they are), where the
key is the sample's relative name without its extension (dots in its basename become ``_``, since
webdataset's key ends at the first dot). Members have fixed metadata (mtime 0, mode 0444, no
owner), so the same data set in the same order gives byte-identical shards. Each shard is written
to a temporary name and renamed, then indexed (`WebDatasetSource`'s index, next to it).

    ray-extsrc shards demo-output/images /data/shards --samples-per-shard 1000
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tarfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._base import Reader, check_count
from ._storage import Storage, is_url
from ._tar_index import load_or_build

__all__ = ["write_shards"]


def _key_and_ext(name: str, data: bytes) -> tuple[str, str]:
    """``cls/img.v2.JPEG`` -> (``cls/img_v2``, ``jpeg``); no extension: sniffed (PNG, else jpg)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.rpartition(".")
    if not dot or not stem:
        stem, ext = base, ("png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "jpg")
    stem = stem.replace(".", "_")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    dataset: Reader | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    samples_per_shard: int = 1000,
    prefix: str = "shard",
    shuffle_seed: int | None = None,
    progress: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write ``dataset`` as tar shards ``out_dir/<prefix>-000000.tar, ...``; returns their brace pattern.

    dataset: a reader (`FileListSource`, `ImageFolderSource`, `WebDatasetSource`), or what
        `open_dataset` accepts (a folder with ``file_list.txt``, a class-folder tree, shards, a URL).
    samples_per_shard: samples per shard (the last may have fewer).
    shuffle_seed: None keeps the data set's order (an ImageFolder's is class by class); a seed
        shuffles samples across shards (``numpy.random.default_rng(seed).permutation``), which
        matters to readers that stream shards in order (webdataset's own); `WebDatasetSource`
        reads any sample in any order and does not need it.

    >>> pattern = write_shards("demo-output/images", "/tmp/shards", samples_per_shard=16)  # doctest: +SKIP
    >>> WebDatasetSource(pattern)                                                         # doctest: +SKIP
    """
    check_count("write_shards: samples_per_shard", samples_per_shard, allow_none=False)
    if not isinstance(prefix, str) or not prefix or "/" in prefix or "{" in prefix:
        raise ValueError(f"write_shards: prefix must be a plain file-name prefix; got {prefix!r}")
    out = os.fspath(out_dir)
    if is_url(out):
        raise ValueError(f"write_shards writes local files; got {out!r}: write them locally, then copy them "
                         f"(e.g. `aws s3 cp --recursive`, `gsutil -m cp`, or fsspec's put)")
    if isinstance(dataset, Reader):
        reader = dataset
    else:
        from ._open import open_dataset

        reader = open_dataset(dataset, storage_options=storage_options)
    n = reader.num_samples
    if n == 0:
        raise ValueError(f"write_shards: {dataset!r} has no samples")
    order = np.arange(n) if shuffle_seed is None else np.random.default_rng(shuffle_seed).permutation(n)
    num_shards = math.ceil(n / samples_per_shard)
    os.makedirs(out, exist_ok=True)
    bar = None
    if progress:
        with contextlib.suppress(ImportError):
            from tqdm import tqdm

            bar = tqdm(total=n, unit="sample", desc=f"shards -> {out}", leave=False)
    storage = Storage()
    try:
        for s in range(num_shards):
            path = os.path.join(out, f"{prefix}-{s:06d}.tar")
            tmp = f"{path}.{os.getpid()}.tmp"
            try:
                with tarfile.open(tmp, "w") as tar:
                    for i in order[s * samples_per_shard : (s + 1) * samples_per_shard]:
                        data, label = reader.read_sample(int(i))
                        key, ext = _key_and_ext(reader.sample_name(int(i)), data)
                        _member(tar, f"{key}.cls", str(int(label)).encode("ascii"))
                        _member(tar, f"{key}.{ext}", data)
                        if bar is not None:
                            bar.update()
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            load_or_build(os.path.abspath(path), storage)
    finally:
        if bar is not None:
            bar.close()
    return os.path.join(out, f"{prefix}-{{{0:06d}..{num_shards - 1:06d}}}.tar")
