"""Retrying reads that fail for a moment: which errors are transient, and how long to wait.

Transient (retried): connection errors (refused, reset, closed early), timeouts, HTTP 5xx, 408 and
429, S3's SlowDown/ServiceUnavailable/InternalError, and OS errors such as EIO/ETIMEDOUT/EAGAIN (a
network file system hiccup). Permanent (raised at once): everything else, in particular 404/403
and their S3/OS forms (no such key, access denied, ENOENT, EACCES): waiting does not make a
missing object appear, and the sooner the error names the URL and the sample, the sooner it is
fixed.

The decision reads the whole exception chain (``__cause__``/``__context__``): fsspec and s3fs wrap
the HTTP client's error (which carries the status) in a plain ``OSError`` or ``FileNotFoundError``;
an HTTP status anywhere in the chain decides first, then the exception types.

Backoff: attempt k (from 1) that failed waits ``min(max_delay_s, initial_delay_s * multiplier**(k-1))``
times a random factor in [0.5, 1] (jitter, so forked workers that failed together do not retry in
lockstep; `random` is reseeded in every forked child). With the defaults: 5 attempts, waits of about
0.1, 0.2, 0.4, 0.8 s, so a store that recovers within ~1.5 s is never noticed.
"""

from __future__ import annotations

import errno
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from ._errors import ReadError

__all__ = ["RetryPolicy", "DEFAULT_RETRY", "NO_RETRY", "is_transient", "http_status"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a reader retries a transient error (see the module docstring for which errors are).

    attempts: tries in all, >= 1 (1: no retry).
    initial_delay_s: the wait after the first failure.
    multiplier: each further wait is this many times the previous one.
    max_delay_s: no wait is longer than this.
    """

    attempts: int = 5
    initial_delay_s: float = 0.1
    multiplier: float = 2.0
    max_delay_s: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or isinstance(self.attempts, bool) or self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be an int >= 1; got {self.attempts!r}")
        for name in ("initial_delay_s", "multiplier", "max_delay_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"RetryPolicy.{name} must be a number >= 0; got {value!r}")
        if self.multiplier < 1:
            raise ValueError(f"RetryPolicy.multiplier must be >= 1; got {self.multiplier!r}")

    def delay(self, failed_attempt: int) -> float:
        """Seconds to wait after attempt ``failed_attempt`` (1-based) failed, jitter included."""
        base = min(self.max_delay_s, self.initial_delay_s * self.multiplier ** (failed_attempt - 1))
        return base * random.uniform(0.5, 1.0)

    def call(self, fn: Callable[[], T], on_error: Callable[[BaseException, int, bool], BaseException]) -> T:
        """``fn()``, retried on transient errors; a final failure becomes ``on_error(exc, attempts, transient)``,
        raised from ``exc``."""
        attempt = 1
        while True:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified right below, never swallowed
                transient = is_transient(exc)
                if not transient or attempt >= self.attempts:
                    raise on_error(exc, attempt, transient) from exc
                time.sleep(self.delay(attempt))
                attempt += 1


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(attempts=1)

_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EIO", "EAGAIN", "EBUSY", "EINTR", "ETIMEDOUT", "ECONNRESET", "ECONNREFUSED", "ECONNABORTED",
        "EPIPE", "ENETDOWN", "ENETUNREACH", "ENETRESET", "EHOSTUNREACH", "EHOSTDOWN", "EREMOTEIO",
        "ESTALE",
    )
    if hasattr(errno, name)
)
_PERMANENT_TYPES = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
# Transient errors of the HTTP/S3 client libraries, by class name so that none of them is imported
# here (aiohttp, botocore, urllib3, http.client): any class of this name in the error's MRO counts.
_TRANSIENT_CLASS_NAMES = frozenset(
    {
        "ClientConnectionError", "ClientOSError", "ServerDisconnectedError", "ClientPayloadError",
        "ServerTimeoutError", "ConnectionTimeoutError", "SocketTimeoutError", "FSTimeoutError",
        "IncompleteRead", "RemoteDisconnected", "EndpointConnectionError", "ConnectTimeoutError",
        "ReadTimeoutError", "ConnectionClosedError", "ResponseStreamingError", "ProtocolError",
        "HTTPClientError", "TimeoutError",
    }
)
_TRANSIENT_S3_CODES = frozenset(
    {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling"}
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def http_status(exc: BaseException) -> int | None:
    """The HTTP status an error (or one it wraps) carries: aiohttp's ``.status``, urllib's ``.code``,
    botocore's ``response["ResponseMetadata"]["HTTPStatusCode"]``; None if there is none."""
    for e in _chain(exc):
        for attr in ("status", "status_code", "code"):
            value = getattr(e, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
                return value
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            value = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(value, int):
                return value
    return None


def _s3_code(exc: BaseException) -> str | None:
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            if code:
                return str(code)
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether retrying ``exc`` later may succeed (see the module docstring)."""
    if isinstance(exc, ReadError):  # ours: it knows
        return exc.transient
    status = http_status(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    code = _s3_code(exc)
    if code is not None:
        return code in _TRANSIENT_S3_CODES
    chain = list(_chain(exc))
    if any(isinstance(e, _PERMANENT_TYPES) for e in chain):
        return False
    for e in chain:
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if any(cls.__name__ in _TRANSIENT_CLASS_NAMES for cls in type(e).__mro__):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
    return False
