"""`open_dataset`: the right reader for a path, pattern or URL, picked from its form.

| spec | reader |
|---|---|
| a list/tuple of paths or URLs; or a str with ``::``, a brace list/range (``{000..009}``, ``{a,b}``), a local glob (``*.tar``), or ending in ``.tar`` | `WebDatasetSource` |
| ``.../file_list.txt`` | `FileListSource` of its folder |
| a folder (or URL prefix) holding ``file_list.txt`` | `FileListSource` |
| any other folder (or URL prefix) | `ImageFolderSource` (class sub-folders) |

Local and fsspec URLs alike (``s3://``, ``gs://``, ``https://``; fsspec is the ``remote`` extra).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ._base import Reader
from ._retry import DEFAULT_RETRY, RetryPolicy
from ._storage import Storage, is_url, join_location, normalize_location
from .file_list import FILE_LIST, FileListSource
from .image_folder import ImageFolderSource
from .webdataset import WebDatasetSource

__all__ = ["open_dataset", "reader_for"]

_BRACES = re.compile(r"(?<!\\)\{[^{}]*(?:\.\.|,)[^{}]*\}")
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
_FORMS = (
    "a folder with a file_list.txt (\"name label\" lines), a class-folder tree (torchvision ImageFolder "
    "layout: root/<class>/<image>), tar shards ('shards/shard-{000000..000009}.tar', '::'-joined, a glob, "
    "or a list), or an fsspec URL of one of these (s3://, gs://, https://)"
)


def _looks_like_shards(spec: str) -> bool:
    if "::" in spec or _BRACES.search(spec):
        return True
    path = spec.split("?", 1)[0] if is_url(spec) else spec
    return path.lower().endswith(_TAR_SUFFIXES)


def reader_for(spec: str | os.PathLike | Sequence[str], storage: Storage | None = None) -> tuple[type[Reader], Any]:
    """``(reader class, its first argument)`` for ``spec`` (see the module docstring); checks that a
    folder exists, but reads no listing."""
    if not isinstance(spec, (str, os.PathLike)):
        if isinstance(spec, Sequence) and spec and all(isinstance(s, (str, os.PathLike)) for s in spec):
            return WebDatasetSource, [os.fspath(s) for s in spec]
        raise TypeError(f"open_dataset: expected a path, pattern, URL or a list of shard paths; got {type(spec).__name__}")
    text = os.fspath(spec)
    if not text:
        raise ValueError(f"open_dataset: empty data spec; give {_FORMS}")
    storage = storage or Storage()
    if not is_url(text) and glob.has_magic(text) and not _BRACES.search(text):
        matches = sorted(glob.glob(os.path.expanduser(text)))
        if not matches:
            raise FileNotFoundError(f"open_dataset: no file matches {text!r}")
        return WebDatasetSource, matches
    if _looks_like_shards(text):
        return WebDatasetSource, text
    where = normalize_location(text)
    if where.rstrip("/").rsplit("/", 1)[-1] == FILE_LIST:
        return FileListSource, where[: -len(FILE_LIST)].rstrip("/") or "/"
    if storage.isfile(join_location(where, FILE_LIST)):
        return FileListSource, where
    if storage.isdir(where):
        return ImageFolderSource, where
    raise FileNotFoundError(f"open_dataset: {text!r} is not there, or not a data set this package reads. Give {_FORMS}")


def open_dataset(
    spec: str | os.PathLike | Sequence[str],
    batch_size: int | None = None,
    limit: int | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
    **options: Any,
) -> Reader:
    """The reader for ``spec`` (see the module docstring), made with these arguments.

    ``options`` go to the reader picked (e.g. ``image_keys=`` for shards, ``extensions=`` for a
    folder tree); an option the picked reader does not take is a TypeError that says which it was.

    >>> open_dataset("demo-output/images", batch_size=16)            # doctest: +SKIP
    FileListSource(...)
    >>> open_dataset("s3://bucket/train-{000000..000146}.tar")       # doctest: +SKIP
    WebDatasetSource(...)
    """
    cls, arg = reader_for(spec, Storage(dict(storage_options or {}), retry))
    try:
        return cls(arg, batch_size, limit, storage_options=storage_options, retry=retry, **options)
    except TypeError as exc:
        if options and hasattr(exc, "add_note"):
            exc.add_note(f"open_dataset picked {cls.__name__} for {spec!r}")
        raise
