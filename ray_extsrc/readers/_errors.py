"""What a reader raises when it cannot get a sample's bytes.

    RayExtSrcError (ray_extsrc.errors)
     └── ReadError              reading failed; names the path/URL and the sample; also an OSError
          ├── SampleNotFoundError   the file/object/shard is not there (404, no such key, ENOENT);
          │                         also a FileNotFoundError
          └── AccessDeniedError     the store refused (401/403, access denied, EACCES);
                                    also a PermissionError

Every message says which path or URL, which sample (``idx_in_epoch``) when there is one, what was
tried (attempts), and what to do. The original exception is the ``__cause__``. Inside a pipeline the
worker reports it as a `ray_extsrc.SourceError` carrying this message and its traceback.
"""

from __future__ import annotations

from ..errors import RayExtSrcError

__all__ = ["ReadError", "SampleNotFoundError", "AccessDeniedError"]


class ReadError(RayExtSrcError, OSError):
    """Reading a sample (or a data set's listing or index) failed.

    ``url``: the path or URL read; ``idx_in_epoch``: the sample, or None for a listing/index read;
    ``attempts``: how many tries were made; ``transient``: whether the last error looked transient
    (a connection error, a timeout, a 5xx) — then retrying later may work.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        idx_in_epoch: int | None = None,
        attempts: int = 1,
        transient: bool = False,
    ) -> None:
        super().__init__(message)
        self.url = url
        self.idx_in_epoch = idx_in_epoch
        self.attempts = attempts
        self.transient = transient

    def __str__(self) -> str:  # OSError's own __str__ would print "[Errno ...]" forms of args
        return str(self.args[0]) if self.args else ""

    # OSError pickles as (cls, args, __dict__): the message travels in args, the fields in __dict__,
    # so the error keeps them when it crosses a process boundary.


class SampleNotFoundError(ReadError, FileNotFoundError):
    """The file, object or shard does not exist (HTTP 404/410, S3 NoSuchKey, ENOENT)."""


class AccessDeniedError(ReadError, PermissionError):
    """The store refused to serve it (HTTP 401/403, S3 AccessDenied, EACCES)."""
