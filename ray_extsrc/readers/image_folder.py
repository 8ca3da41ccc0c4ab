"""An ImageNet-style folder tree: ``root/<class>/**/<image>``, labelled exactly as torchvision's ImageFolder.

Classes are the folders directly under ``root``, sorted by name (``os.scandir`` entries that are
directories, hidden ones included); class ``k`` of that sorted list has label ``k``. The samples of
a class are the files anywhere below its folder whose name ends (case-insensitively) with one of
``extensions`` (torchvision's ``IMG_EXTENSIONS`` by default), in ``sorted(os.walk(class_dir,
followlinks=True))`` order with each folder's files sorted, classes in label order. So sample ``i``
and its label are those of ``torchvision.datasets.ImageFolder(root).samples[i]``; a class without
an image is an error (``FileNotFoundError``), as there, unless ``allow_empty=True``.

``root`` may be an fsspec URL (``s3://bucket/imagenet/train``): the tree is then listed once with
``fs.find`` (S3 has no folders, only key prefixes; a "folder" is a prefix followed by ``/``) and
ordered the same way. Listing happens when the reader is made; the listing is kept as one UTF-8
blob plus offsets (about the names' length plus 12 bytes per sample when pickled).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ._base import Reader, check_count
from ._retry import DEFAULT_RETRY, RetryPolicy
from ._storage import Storage, is_url, join_location, normalize_location

__all__ = ["IMG_EXTENSIONS", "ImageFolderSource", "find_classes", "list_image_folder"]

#: torchvision.datasets.folder.IMG_EXTENSIONS, the files ImageFolder keeps.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _has_extension(name: str, extensions: tuple[str, ...]) -> bool:
    return name.lower().endswith(extensions)


def find_classes(root: str, storage: Storage | None = None) -> tuple[list[str], dict[str, int]]:
    """``(classes, class_to_idx)``: the folders directly under ``root``, sorted; as torchvision's."""
    if is_url(root):
        classes = sorted((storage or Storage()).list_subdirs(root))
    else:
        classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"Couldn't find any class folder in {root}.")
    return classes, {name: i for i, name in enumerate(classes)}


def _local_samples(root: str, classes: Sequence[str], extensions: tuple[str, ...]) -> Iterable[tuple[str, int]]:
    # torchvision.datasets.folder.make_dataset, with names relative to root.
    for label, cls in enumerate(classes):
        class_dir = os.path.join(root, cls)
        if not os.path.isdir(class_dir):
            continue
        for dirpath, _, fnames in sorted(os.walk(class_dir, followlinks=True)):
            rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
            for fname in sorted(fnames):
                if _has_extension(fname, extensions):
                    yield f"{rel}/{fname}", label


def _remote_samples(root: str, classes: Sequence[str], extensions: tuple[str, ...],
                    storage: Storage) -> Iterable[tuple[str, int]]:
    # os.walk's order, from a flat listing: files grouped by their folder, folders in string order
    # (sorted(os.walk(...)) compares the walk's tuples, whose first item, the folder, is unique),
    # each folder's files sorted.
    index = {cls: label for label, cls in enumerate(classes)}
    by_dir: dict[str, list[str]] = {}
    for path in storage.find_files(root):
        folder, _, fname = path.rpartition("/")
        if folder and _has_extension(fname, extensions):
            by_dir.setdefault(folder, []).append(fname)
    for label, cls in enumerate(classes):
        prefix = cls + "/"
        folders = sorted(d for d in by_dir if d == cls or d.startswith(prefix))
        for d in folders:
            for fname in sorted(by_dir[d]):
                yield f"{d}/{fname}", index[cls]


def list_image_folder(
    root: str | os.PathLike,
    extensions: Sequence[str] = IMG_EXTENSIONS,
    *,
    allow_empty: bool = False,
    storage: Storage | None = None,
) -> tuple[list[str], list[tuple[str, int]]]:
    """``(classes, [(relative path, label), ...])`` of a folder tree, in ImageFolder's order."""
    root = normalize_location(root)
    exts = tuple(e.lower() for e in extensions)
    storage = storage or Storage()
    if not storage.isdir(root):
        raise FileNotFoundError(f"ImageFolderSource: {root} is not a folder (or, for a URL, a prefix with objects under it)")
    classes, _ = find_classes(root, storage)
    if is_url(root):
        samples = list(_remote_samples(root, classes, exts, storage))
    else:
        samples = list(_local_samples(root, classes, exts))
    empty = set(classes) - {classes[label] for _, label in samples}
    if empty and not allow_empty:
        raise FileNotFoundError(
            f"Found no valid file for the classes {', '.join(sorted(empty))}. "
            f"Supported extensions are: {', '.join(exts)} (in {root}; allow_empty=True keeps such classes)"
        )
    return classes, samples


class ImageFolderSource(Reader):
    """``source(sample_info) -> (encoded bytes, int32 label of shape (1,))`` over a class-folder tree.

    ``classes``/``class_to_idx``/``targets`` are ImageFolder's; ``batch_size``, ``limit`` (the first
    ``limit`` samples in ImageFolder's order), the epoch and ``__len__`` are as for `FileListSource`.
    ``extensions``: file endings to keep (case-insensitive). ``storage_options``/``retry``: see
    `FileListSource`.

    >>> src = ImageFolderSource("/data/imagenet/train", batch_size=256)   # doctest: +SKIP
    >>> src.classes[:2], len(src)                                         # doctest: +SKIP
    (['n01440764', 'n01443537'], 1281024)
    """

    def __init__(
        self,
        root: str | os.PathLike,
        batch_size: int | None = None,
        limit: int | None = None,
        *,
        extensions: Sequence[str] = IMG_EXTENSIONS,
        allow_empty: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        check_count("ImageFolderSource: batch_size", batch_size)
        check_count("ImageFolderSource: limit", limit, minimum=0)
        if isinstance(extensions, str) or not all(isinstance(e, str) for e in extensions):
            raise TypeError(f"ImageFolderSource: extensions must be a sequence of str such as ('.jpg',); got {extensions!r}")
        self.root = normalize_location(root)
        self.storage = Storage(dict(storage_options or {}), retry)
        self.classes, samples = list_image_folder(self.root, extensions, allow_empty=allow_empty, storage=self.storage)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        samples = samples[:limit]
        encoded = [name.encode("utf-8") for name, _ in samples]
        self._names = b"".join(encoded)
        self._ends = np.cumsum([len(e) for e in encoded], dtype=np.int64) if encoded else np.zeros(0, np.int64)
        self.targets = np.array([label for _, label in samples], dtype=np.int32)
        self._set_length(len(samples), batch_size)

    def sample_name(self, i: int) -> str:
        start = int(self._ends[i - 1]) if i else 0
        return self._names[start : int(self._ends[i])].decode("utf-8")

    def read_sample(self, i: int) -> tuple[bytes, int]:
        return self.storage.read(join_location(self.root, self.sample_name(i)), idx=i), int(self.targets[i])

    @property
    def labels(self) -> np.ndarray:
        """Every sample's label (int32), as ``targets`` (the name the other readers use)."""
        return self.targets

    @property
    def samples(self) -> list[tuple[str, int]]:
        """``[(path or URL, label), ...]``, as ImageFolder's ``samples`` (built on each access)."""
        return [(join_location(self.root, self.sample_name(i)), int(self.targets[i])) for i in range(self._num_samples)]
