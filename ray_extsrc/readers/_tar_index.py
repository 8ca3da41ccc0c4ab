"""The sample index of one tar shard: where each member's bytes are, grouped into samples by key.

Built once by reading the tar's headers (Python's ``tarfile``; for a local shard only the headers
are read, the data is seeked over; a remote shard is streamed through once), then cached as JSON.

Grouping follows webdataset (``tariterators.tar_file_iterator`` + ``group_by_keys``): regular
files only, metadata members (``__...__``) skipped, each member split into ``key.extension`` at the
first dot of its basename (`split_member`), extensions lower-cased, consecutive members with the
same key form one sample, and an extension seen twice in one sample is an error (webdataset raises
``ValueError: duplicate file name in tar file`` there too).

Index file (JSON, format ``ray_extsrc.tar-index`` version 1)::

    {"format": "ray_extsrc.tar-index", "version": 1,
     "shard": "/data/shard-000000.tar",                   # where it was indexed from (informational)
     "stat": {"size": 104857600, "mtime": "1733..." | null, "etag": "\"9b2c...\"" | null},
     "keys": ["n01440764_10026", ...],                    # one per sample, in tar order
     "members": {"jpg": {"offset": [1536, ...], "size": [110031, ...]},   # -1 where a sample lacks it
                 "cls": {"offset": [...], "size": [...]}},
     "ints": {"cls": [0, ...]}}                           # small members (<= 64 bytes) holding an integer

``offset`` is the member's data offset in the tar (``TarInfo.offset_data``); so the sample's bytes
are ``shard[offset : offset + size]``: one ``pread`` locally, one HTTP range request remotely.

Where it is cached, and when it is rebuilt: see `load_or_build`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ._errors import ReadError
from ._shard_names import is_meta_member, split_member
from ._storage import FileStat, Storage, is_url

__all__ = [
    "INDEX_FORMAT",
    "INDEX_VERSION",
    "INDEX_SUFFIX",
    "ShardIndex",
    "build_index",
    "load_or_build",
    "index_cache_dir",
    "index_locations",
]

INDEX_FORMAT = "ray_extsrc.tar-index"
INDEX_VERSION = 1
#: An index kept next to its local shard is named ``<shard>`` + this.
INDEX_SUFFIX = ".ray_extsrc-index.json"
# Members this small are read while indexing and kept when they hold an integer (``.cls`` labels),
# so reading a sample's label costs nothing.
_SMALL_MEMBER = 64
_COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


@dataclass
class ShardIndex:
    """One shard's samples: ``keys[n]`` is sample n; ``members[ext]`` its (offsets, sizes), -1 if absent;
    ``ints[ext][n]`` the integer a small member holds, or None."""

    shard: str
    stat: FileStat
    keys: list[str] = field(default_factory=list)
    members: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    ints: dict[str, list[int | None]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": INDEX_FORMAT,
                "version": INDEX_VERSION,
                "shard": self.shard,
                "stat": self.stat.to_dict(),
                "keys": self.keys,
                "members": {ext: {"offset": o.tolist(), "size": s.tolist()} for ext, (o, s) in self.members.items()},
                "ints": self.ints,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> ShardIndex:
        data = json.loads(text)
        if data.get("format") != INDEX_FORMAT or data.get("version") != INDEX_VERSION:
            raise ValueError(f"not a {INDEX_FORMAT} version {INDEX_VERSION} index")
        n = len(data["keys"])
        members = {
            ext: (np.asarray(col["offset"], dtype=np.int64), np.asarray(col["size"], dtype=np.int64))
            for ext, col in data["members"].items()
        }
        if any(len(o) != n or len(s) != n for o, s in members.values()):
            raise ValueError("columns of different lengths")
        return cls(data["shard"], FileStat.from_dict(data["stat"]), list(data["keys"]), members, dict(data["ints"]))


# -- building


def _tar_members(shard: str, storage: Storage) -> Iterator[tuple[str, int, int, bytes | None]]:
    """``(name, data offset, size, bytes if small)`` of each regular member, in tar order."""
    with storage.open(shard) as f:
        head = f.read(6)
        for magic, kind in _COMPRESSED_MAGIC.items():
            if head.startswith(magic):
                raise ReadError(
                    f"a {kind}-compressed tar: reading a sample by its offset needs an "
                    f"uncompressed tar. Decompress it (e.g. `gunzip -k`) or re-write the shards with "
                    f"ray_extsrc.readers.write_shards", url=shard,
                )
        if is_url(shard):
            f.seek(0)
            mode = "r|"  # a stream: one pass front to back, no seeks back over remote data
        else:
            f.seek(0)
            mode = "r:"  # random access: only the headers are read, the data is seeked over
        try:
            with tarfile.open(fileobj=f, mode=mode) as tar:
                for info in tar:
                    if not info.isreg():
                        continue
                    small = None
                    if info.size <= _SMALL_MEMBER:
                        small = tar.extractfile(info).read()
                    yield info.name, info.offset_data, info.size, small
                    if mode == "r|":
                        tar.members = []  # a stream's members list would grow with the shard
        except tarfile.TarError as exc:
            raise ReadError(f"not a readable tar file ({type(exc).__name__}: {exc})", url=shard) from exc


def _as_int(data: bytes | None) -> int | None:
    if data is None:
        return None
    try:
        return int(data)
    except ValueError:
        return None


def build_index(shard: str, storage: Storage, stat: FileStat | None = None) -> ShardIndex:
    """Read ``shard``'s tar headers and group its members into samples (see the module docstring)."""
    stat = stat if stat is not None else storage.stat(shard)
    keys: list[str] = []
    columns: dict[str, tuple[list[int], list[int]]] = {}
    ints: dict[str, list[int | None]] = {}
    current: set[str] = set()
    for name, offset, size, small in _tar_members(shard, storage):
        if is_meta_member(name):
            continue
        parts = split_member(name)
        if parts is None:
            continue
        key, ext = parts[0], parts[1].lower()
        if not keys or key != keys[-1]:
            keys.append(key)
            current = set()
        if ext in current:
            raise ReadError(
                f"member {name!r}: duplicate file name in tar file (a second .{ext} for key "
                f"{key!r}; webdataset refuses it too). Give each sample's files one key and distinct "
                f"extensions", url=shard,
            )
        current.add(ext)
        n = len(keys) - 1
        offsets, sizes = columns.setdefault(ext, ([], []))
        if len(offsets) < n:  # samples before this one lacked this extension
            offsets.extend([-1] * (n - len(offsets)))
            sizes.extend([-1] * (n - len(sizes)))
        offsets.append(offset)
        sizes.append(size)
        value = _as_int(small)
        if value is not None:
            col = ints.setdefault(ext, [])
            col.extend([None] * (n - len(col)))
            col.append(value)
    n = len(keys)
    members = {}
    for ext, (offsets, sizes) in columns.items():
        offsets.extend([-1] * (n - len(offsets)))
        sizes.extend([-1] * (n - len(sizes)))
        members[ext] = (np.asarray(offsets, dtype=np.int64), np.asarray(sizes, dtype=np.int64))
    for col in ints.values():
        col.extend([None] * (n - len(col)))
    return ShardIndex(shard, stat, keys, members, ints)


# -- caching


def index_cache_dir() -> str:
    """Where indexes go when they cannot sit next to their shard: ``$RAY_EXTSRC_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/ray_extsrc``, else ``~/.cache/ray_extsrc``; then ``shard-index/``."""
    base = os.environ.get("RAY_EXTSRC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ray_extsrc"
    )
    return os.path.join(base, "shard-index")


def _cache_name(shard: str) -> str:
    digest = hashlib.sha256(shard.encode("utf-8")).hexdigest()[:16]
    return f"{digest}-{shard.rstrip('/').rsplit('/', 1)[-1]}{INDEX_SUFFIX}"


def index_locations(shard: str, index_dir: str | None = None) -> list[str]:
    """Where ``shard``'s index is looked for, in order; it is written to the first that takes it.

    ``index_dir`` given: only there. Otherwise a local shard's index sits next to it
    (``<shard>.ray_extsrc-index.json``), else in `index_cache_dir`; a remote shard's in the cache
    dir (named by a hash of its URL, so two data sets with the same shard names do not collide).
    """
    if index_dir is not None:
        return [os.path.join(os.fspath(index_dir), _cache_name(shard))]
    cached = os.path.join(index_cache_dir(), _cache_name(shard))
    if is_url(shard):
        return [cached]
    return [shard + INDEX_SUFFIX, cached]


def _load_valid(paths: list[str], stat: FileStat) -> ShardIndex | None:
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                index = ShardIndex.from_json(f.read())
        except (OSError, ValueError, KeyError, TypeError):
            continue  # absent, unreadable or not ours: look further, or rebuild
        if index.stat == stat:
            return index
    return None


def _save(index: ShardIndex, paths: list[str]) -> str | None:
    text = index.to_json()
    for path in paths:
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)  # atomic: a reader never sees half an index
            return path
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return None


@contextlib.contextmanager
def _build_lock(shard: str, index_dir: str | None) -> Iterator[None]:
    """One process per machine builds a shard's index; the others wait for it, then load it.

    A local shard is its own lock (``flock`` on the shard, opened read-only: no file is added
    anywhere); a remote shard's lock file sits where its index goes (``index_dir``, else the cache
    dir), under ``locks/``. Without fcntl, or where the lock cannot be taken, there is no lock and
    concurrent builders each build (to the same result).
    """
    try:
        import fcntl

        if is_url(shard):
            lock_dir = os.path.join(index_dir if index_dir is not None else index_cache_dir(), "locks")
            os.makedirs(lock_dir, exist_ok=True)
            f = open(os.path.join(lock_dir, _cache_name(shard) + ".lock"), "a")
        else:
            f = open(shard, "rb")
    except (ImportError, OSError):
        yield
        return
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError:  # a file system without locks
            locked = False
        else:
            locked = True
        try:
            yield
        finally:
            if locked:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def load_or_build(shard: str, storage: Storage, index_dir: str | None = None) -> ShardIndex:
    """``shard``'s index: loaded from its cache if still valid, else built and cached (where: see
    `index_locations`; one builder per machine at a time: see `_build_lock`).

    Valid means: same format version, and the shard's current size, mtime and ETag (whichever the
    store reports; ``os.stat`` locally, ``fs.info`` remotely: S3 and HTTP give an ETag and a
    Last-Modified) equal those recorded when it was built. So a rewritten shard is re-indexed the
    next time a reader is made; the check costs one ``stat``/HEAD per shard. An index that cannot be
    written anywhere is rebuilt in memory each time (and still used).
    """
    stat = storage.stat(shard)
    paths = index_locations(shard, index_dir)
    index = _load_valid(paths, stat)
    if index is not None:
        return index
    with _build_lock(shard, index_dir):
        index = _load_valid(paths, stat)  # built by another process while this one waited
        if index is None:
            index = storage.call(lambda: build_index(shard, storage, stat), shard, context="indexing the tar")
            _save(index, paths)
    return index
