"""Where a reader's bytes live — a local path or an fsspec URL — and reading them with retries.

`Storage` is what a reader holds: its ``storage_options`` (for fsspec) and its `RetryPolicy`, both
small and picklable. What it reads through is looked up per process, never pickled:

* local paths: plain ``open``/``os.pread``; a small per-process table of open file descriptors for
  range reads (tar shards), so a shard is opened once per worker process, not once per sample;
* URLs (``s3://``, ``gs://``, ``http(s)://``, ... anything fsspec knows): one fsspec filesystem
  object per (protocol, storage_options) per process, made on first use (`get_filesystem`).

NOTE [one filesystem per process, made after fork]: fsspec's async filesystems (s3fs, HTTP) run
their requests on an event loop in an I/O thread of the process that made them; a forked child has
the object but not the thread, and fsspec refuses to use such an object there ("not fork-safe").
So the table is keyed by the process: a forked worker that finds a table filled by its parent
starts an empty one and makes its own filesystem on its first read (its connections are then
reused for every later sample of that worker). The parent's objects are kept referenced in the
child but never used or closed there: closing one would try to talk to the parent's loop.

Range reads use ``end`` exclusive (fsspec's ``cat_file(path, start, end)``); a reply of the wrong
length is an error (a server that ignores ``Range`` sends the whole shard; a short one means the
file changed after it was indexed).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from ._errors import AccessDeniedError, ReadError, SampleNotFoundError
from ._retry import DEFAULT_RETRY, RetryPolicy, http_status

__all__ = [
    "Storage",
    "FileStat",
    "get_filesystem",
    "is_url",
    "normalize_location",
    "join_location",
    "describe_failure",
    "forget_filesystems",
]

_REMOTE_HINT = "pip install 'ray_extsrc[remote]'"


def is_url(location: str) -> bool:
    """Whether ``location`` names a remote object (``scheme://...``, other than ``file://``)."""
    head, sep, _ = location.partition("://")
    return bool(sep) and head.lower() != "file" and head.replace("+", "").replace("-", "").replace(".", "").isalnum()


def normalize_location(location: str | os.PathLike) -> str:
    """A URL as given (less a trailing ``/``); a local path (or ``file://`` URL) made absolute."""
    location = os.fspath(location)
    if not isinstance(location, str):
        raise TypeError(f"a path or URL must be a str or os.PathLike; got {type(location).__name__}")
    if is_url(location):
        return location.rstrip("/") if not location.endswith("://") else location
    if location.lower().startswith("file://"):
        location = location[len("file://") :]
    return os.path.abspath(os.path.expanduser(location))


def join_location(base: str, name: str) -> str:
    """``base/name`` for a URL or a local path (``name`` uses ``/``)."""
    if is_url(base):
        return base.rstrip("/") + "/" + name.lstrip("/")
    return os.path.join(base, *name.split("/"))


# -- one fsspec filesystem per (protocol, options) per process: see NOTE [one filesystem per process]

_fs_lock = threading.Lock()
_fs_pid = os.getpid()
_filesystems: dict[tuple[str, str], Any] = {}
_inherited: list[Any] = []  # a parent's filesystems, kept referenced in a forked child, never used


def _options_key(options: Mapping[str, Any] | None) -> str:
    return json.dumps(dict(options or {}), sort_keys=True, default=repr)


def get_filesystem(url: str, storage_options: Mapping[str, Any] | None = None):
    """The fsspec filesystem for ``url``'s protocol and these options, made once per process.

    >>> fs = get_filesystem("s3://bucket/shards/shard-000000.tar", {"anon": True})  # doctest: +SKIP
    >>> fs is get_filesystem("s3://other-bucket/x", {"anon": True})                 # doctest: +SKIP
    True
    """
    return _filesystem(url, storage_options or {}, _options_key(storage_options))


def _filesystem(url: str, options: Mapping[str, Any], options_key: str):
    global _fs_pid
    protocol = url.partition("://")[0].lower() if "://" in url else "file"
    key = (protocol, options_key)
    with _fs_lock:
        if _fs_pid != os.getpid():  # a forked child: its parent's objects must not be used here
            _inherited.extend(_filesystems.values())
            _filesystems.clear()
            _fs_pid = os.getpid()
        fs = _filesystems.get(key)
        if fs is None:
            fs = _filesystems[key] = _make_filesystem(protocol, options, url)
        return fs


def forget_filesystems() -> list[Any]:
    """Drop this process's table of filesystems (a fresh one is made on the next read); returns them."""
    with _fs_lock:
        dropped = list(_filesystems.values())
        _filesystems.clear()
        return dropped


# aiohttp's default is a 5-minute total timeout and none per socket read: a server that stops
# answering would hold a worker for minutes before the retry policy could act. A connection that
# takes 10 s, or a read that stalls for 60 s, is a transient error instead (retried). Options that
# set client_kwargs["timeout"] keep theirs.
_HTTP_CONNECT_TIMEOUT_S = 10.0
_HTTP_READ_TIMEOUT_S = 60.0


def _with_http_timeouts(options: dict[str, Any]) -> dict[str, Any]:
    client_kwargs = dict(options.get("client_kwargs") or {})
    if "timeout" in client_kwargs:
        return options
    try:
        import aiohttp
    except ImportError:  # fsspec will say that it needs aiohttp
        return options
    client_kwargs["timeout"] = aiohttp.ClientTimeout(
        total=None, sock_connect=_HTTP_CONNECT_TIMEOUT_S, sock_read=_HTTP_READ_TIMEOUT_S
    )
    return {**options, "client_kwargs": client_kwargs}


def _make_filesystem(protocol: str, options: Mapping[str, Any], url: str):
    try:
        import fsspec
    except ImportError:
        raise ImportError(f"reading {url} needs fsspec (and s3fs for s3://): {_REMOTE_HINT}") from None
    options = dict(options)
    if protocol in ("http", "https"):
        options = _with_http_timeouts(options)
    try:
        # skip_instance_cache: fsspec's own cache would hand this process an object made before a
        # fork; this module keeps one per process instead.
        return fsspec.filesystem(protocol, skip_instance_cache=True, **options)
    except ImportError as exc:
        raise ImportError(f"reading {url} needs fsspec's {protocol!r} backend ({exc}); for s3:// and "
                          f"http(s):// {_REMOTE_HINT}") from exc
    except ValueError as exc:
        if "Protocol not known" in str(exc):
            raise ValueError(f"{url}: fsspec knows no protocol {protocol!r}") from exc
        raise


# -- local file descriptors for range reads, per process


class _LocalFiles:
    """Open read-only descriptors for range reads (``os.pread``: no shared file offset, so threads
    may read one descriptor at once), at most ``capacity``, least recently used closed first."""

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._fds: OrderedDict[str, int] = OrderedDict()

    def pread(self, path: str, start: int, length: int) -> bytes:
        fd = self._fd(path)
        chunks, done = [], 0
        while done < length:
            chunk = os.pread(fd, length - done, start + done)
            if not chunk:
                break
            chunks.append(chunk)
            done += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _fd(self, path: str) -> int:
        with self._lock:
            if self._pid != os.getpid():
                self._forget()
            fd = self._fds.get(path)
            if fd is not None:
                self._fds.move_to_end(path)
                return fd
            fd = self._fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            while len(self._fds) > self.capacity:
                os.close(self._fds.popitem(last=False)[1])
            return fd

    def _forget(self) -> None:
        # A forked child's copies of its parent's descriptors: closing them here leaves the
        # parent's open.
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        self._pid = os.getpid()

    def after_fork(self) -> None:
        self._lock = threading.Lock()  # another thread may have held it at the fork


_local_files = _LocalFiles()


def _after_fork_in_child() -> None:
    global _fs_lock
    _fs_lock = threading.Lock()
    _local_files.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass(frozen=True)
class FileStat:
    """What says that a file changed: its size, and its mtime or ETag where the store gives one."""

    size: int | None
    mtime: str | None = None
    etag: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "mtime": self.mtime, "etag": self.etag}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FileStat:
        return cls(data.get("size"), data.get("mtime"), data.get("etag"))


def _first(info: Mapping[str, Any], *names: str) -> str | None:
    for name in names:
        value = info.get(name)
        if value not in (None, ""):
            return str(value)
    return None


@dataclass(frozen=True)
class Storage:
    """How a reader reaches its data: fsspec ``storage_options`` for URLs, and a retry policy.

    Picklable and small (a dict and four numbers); the filesystem objects and open descriptors it
    reads through live in per-process tables (see the module docstring).
    """

    storage_options: Mapping[str, Any] = field(default_factory=dict)
    retry: RetryPolicy = DEFAULT_RETRY

    def __post_init__(self) -> None:
        if not isinstance(self.storage_options, Mapping):
            raise TypeError(f"storage_options must be a dict of fsspec options; got {type(self.storage_options).__name__}")
        if not isinstance(self.retry, RetryPolicy):
            raise TypeError(f"retry must be a ray_extsrc.readers.RetryPolicy; got {type(self.retry).__name__}")
        object.__setattr__(self, "_key", _options_key(self.storage_options))  # once, not per sample

    def filesystem(self, url: str):
        return _filesystem(url, self.storage_options, self._key)

    # -- reads ---------------------------------------------------------------------------------

    def read(self, location: str, start: int | None = None, end: int | None = None, *,
             idx: int | None = None, context: str = "") -> bytes:
        """The bytes of ``location`` (``[start, end)`` if given), retried on transient errors.

        ``idx`` and ``context`` only make the error message say which sample and where in it.
        """
        expected = None if start is None else end - start

        def attempt() -> bytes:
            if is_url(location):
                data = self.filesystem(location).cat_file(location, start=start, end=end)
            elif start is None:
                with open(location, "rb") as f:
                    data = f.read()
            else:
                data = _local_files.pread(location, start, expected)
            if expected is not None and len(data) != expected:
                raise _wrong_length(location, start, end, len(data), is_url(location))
            return data

        return self.call(attempt, location, idx, context or (f"bytes {start}-{end}" if start is not None else ""))

    def read_text(self, location: str) -> str:
        return self.read(location).decode("utf-8")

    def stat(self, location: str) -> FileStat:
        def attempt() -> FileStat:
            if not is_url(location):
                st = os.stat(location)
                return FileStat(st.st_size, str(st.st_mtime_ns), None)
            fs = self.filesystem(location)
            fs.invalidate_cache(location)  # a listing cached earlier in this process may be stale
            info = fs.info(location)
            size = info.get("size")
            return FileStat(
                int(size) if size is not None else None,
                _first(info, "LastModified", "Last-Modified", "last_modified", "mtime", "updated", "modified"),
                _first(info, "ETag", "etag", "md5Hash", "generation"),
            )

        return self.call(attempt, location, None, "looking it up")

    def open(self, location: str) -> BinaryIO:
        """A file object for reading ``location`` front to back (indexing a shard)."""
        if not is_url(location):
            return self.call(lambda: open(location, "rb"), location, None, "open")
        fs = self.filesystem(location)
        return self.call(
            lambda: fs.open(location, "rb", block_size=8 << 20, cache_type="readahead"), location, None, "open"
        )

    def isdir(self, location: str) -> bool:
        if not is_url(location):
            return os.path.isdir(location)
        return self.call(lambda: self.filesystem(location).isdir(location), location, None, "isdir")

    def isfile(self, location: str) -> bool:
        if not is_url(location):
            return os.path.isfile(location)
        return self.call(lambda: self.filesystem(location).isfile(location), location, None, "isfile")

    def list_subdirs(self, location: str) -> list[str]:
        """Names of the folders directly inside remote ``location``."""
        fs = self.filesystem(location)
        entries = self.call(lambda: fs.ls(location, detail=True), location, None, "listing")
        return [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"]

    def find_files(self, location: str) -> list[str]:
        """Every file below remote ``location``, as ``/``-separated paths relative to it."""
        fs = self.filesystem(location)
        base = fs._strip_protocol(location).rstrip("/") + "/"
        paths = self.call(lambda: fs.find(location, withdirs=False), location, None, "listing")
        return [p[len(base):] for p in paths if p.startswith(base)]

    # -- errors ------------------------------------------------------------------------------

    def call(self, fn, location: str, idx: int | None = None, context: str = ""):
        """``fn()`` under this storage's retry policy; a final failure raises the `ReadError` that
        `describe_failure` makes for ``location`` (and sample ``idx``)."""
        started = time.monotonic()

        def on_error(exc: BaseException, attempts: int, transient: bool) -> BaseException:
            return describe_failure(exc, location, idx=idx, context=context, attempts=attempts,
                                    transient=transient, elapsed_s=time.monotonic() - started)

        return self.retry.call(fn, on_error)


def _wrong_length(location: str, start: int, end: int, got: int, remote: bool) -> ReadError:
    if remote and got > end - start:
        return ReadError(
            f"the server sent {got} bytes for the {end - start}-byte range {start}-{end}: it ignores HTTP "
            f"Range requests. Serve the data from a store that supports them (S3, GCS, nginx, ...) or "
            f"copy it to local disk", url=location,
        )
    return ReadError(
        f"read {got} of the {end - start} bytes at {start}-{end}: the file is shorter than its index "
        f"says, so it changed after it was indexed. Make the reader again: it re-indexes changed shards",
        url=location,
    )


def describe_failure(exc: BaseException, location: str, *, idx: int | None = None, context: str = "",
                     attempts: int = 1, transient: bool = False, elapsed_s: float = 0.0) -> ReadError:
    """The `ReadError` (or subclass) a failed read of ``location`` raises: the URL, the sample, the
    attempts, what the failure was and what to do."""
    where = f"sample idx_in_epoch={idx}: " if idx is not None else ""
    what = f"{location}" + (f" ({context})" if context else "")
    fields = dict(url=location, idx_in_epoch=idx, attempts=attempts, transient=transient)
    if isinstance(exc, ReadError):
        return type(exc)(f"{where}{what}: {exc}", **fields)
    status = http_status(exc)
    chain = [exc]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        nxt = chain[-1].__cause__ or chain[-1].__context__
        if nxt in chain:
            break
        chain.append(nxt)
    detail = f"{type(exc).__name__}: {exc}"
    code = f"HTTP {status}" if status is not None else None
    if status in (404, 410) or (status is None and any(isinstance(e, FileNotFoundError) for e in chain)):
        return SampleNotFoundError(
            f"{where}{what} was not found ({code or detail}). Check the path or URL; if the data set "
            f"changed since the reader was made, make it again (it lists and indexes anew)", **fields,
        )
    if status in (401, 403) or (status is None and any(isinstance(e, PermissionError) for e in chain)):
        return AccessDeniedError(
            f"{where}{what}: access denied ({code or detail}). Check the credentials the reader uses "
            f"(storage_options=..., or the store's environment variables such as AWS_ACCESS_KEY_ID / "
            f"AWS_PROFILE) and the bucket's or server's policy", **fields,
        )
    if transient:
        return ReadError(
            f"{where}{what}: still failing after {attempts} attempts over {elapsed_s:.1f} s "
            f"({code + ', ' if code else ''}{detail}). A transient error (connection, timeout, 5xx) "
            f"that did not clear: check the store and the network, or give the reader "
            f"retry=RetryPolicy(attempts=..., max_delay_s=...) to wait longer", **fields,
        )
    return ReadError(f"{where}{what}: {detail}", **fields)
