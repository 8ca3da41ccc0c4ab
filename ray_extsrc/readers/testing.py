"""Local servers for trying the remote readers without a network: HTTP with Range, and S3 (moto).

`LocalHTTPServer` serves a folder on 127.0.0.1 with what a shard reader needs and Python's
``http.server.SimpleHTTPRequestHandler`` lacks: ``Range: bytes=a-b`` requests (206 Partial
Content, 416 when unsatisfiable), ``ETag``/``Last-Modified``, HTTP/1.1 keep-alive. It logs every
request and can answer chosen requests with an error status first (`LocalHTTPServer.fail`), to see
retries and error messages at work. `local_s3_server` runs moto's S3 server in a thread
(``pip install 'moto[server]'``) and yields the ``storage_options`` that reach it through s3fs.

    with LocalHTTPServer("/data/shards") as http:
        src = WebDatasetSource(http.url + "/shard-{000000..000003}.tar")

Used by the tests (tests/test_readers_remote.py) and examples/reader_speed.py. From a shell (the
server then has a process of its own; it prints its URL and serves until interrupted)::

    python -m ray_extsrc.readers.testing /data/shards [--port 8000]
"""

from __future__ import annotations

import argparse
import contextlib
import email.utils
import http.server
import io
import mimetypes
import os
import re
import socket
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

__all__ = ["LocalHTTPServer", "LoggedRequest", "local_s3_server", "stop_fsspec_io", "main"]

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str  # URL path, unquoted, without the query
    range: str | None  # the Range header as sent
    status: int


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one connection serves a worker's many range reads
    # Headers and body go out in separate writes: with Nagle's algorithm on, the body then waits for
    # the client's delayed ACK (~40 ms) on every keep-alive request.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's name
        pass  # the request log below is the record; stderr stays quiet

    def _log(self, status: int) -> None:
        path = urllib.parse.unquote(self.path.split("?", 1)[0])
        with self.server.lock:
            self.server.log.append(LoggedRequest(self.command, path, self.headers.get("Range"), status))

    def send_head(self):
        path = urllib.parse.unquote(self.path.split("?", 1)[0])
        injected = self.server.take_fault(self.command, path)
        if injected is not None:
            self._log(injected)
            self.send_error(injected)
            return None
        local = self.translate_path(self.path)
        if os.path.isdir(local):
            self._log(200)
            return super().send_head()  # the folder's HTML listing
        try:
            f = open(local, "rb")
        except OSError:
            self._log(404)
            self.send_error(404, "File not found")
            return None
        with f:
            st = os.fstat(f.fileno())
            size = st.st_size
            start, end = 0, size  # [start, end)
            status = 200
            header = self.headers.get("Range")
            if header:
                m = _RANGE.match(header.strip())
                if m is None or not (m.group(1) or m.group(2)):  # multi-range or malformed: ignore it (RFC 9110)
                    header = None
                else:
                    a, b = m.group(1), m.group(2)
                    if a:
                        start, end = int(a), min(size, int(b) + 1) if b else size
                    else:  # suffix range: the last b bytes
                        start, end = max(0, size - int(b)), size
                    if start >= size or start >= end:
                        self._log(416)
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{size}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return None
                    status = 206
            f.seek(start)
            body = f.read(end - start)
        self._log(status)
        self.send_response(status)
        self.send_header("Content-Type", mimetypes.guess_type(local)[0] or "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{size:x}-{st.st_mtime_ns:x}"')
        self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        return io.BytesIO(body)


class _Server(http.server.ThreadingHTTPServer):
    # Handler threads are joined at close: a keep-alive connection's thread waits for the client's
    # next request, so close() first shuts the open connections down.
    daemon_threads = False
    block_on_close = True

    def __init__(self, address, handler) -> None:
        super().__init__(address, handler)
        self.lock = threading.Lock()
        self.log: list[LoggedRequest] = []
        self.faults: dict[tuple[str, str], list[int]] = {}
        self.connections: set[socket.socket] = set()

    def get_request(self):
        conn, addr = super().get_request()
        with self.lock:
            self.connections.add(conn)
        return conn, addr

    def shutdown_request(self, request) -> None:
        with self.lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def server_close(self) -> None:
        with self.lock:
            open_now = list(self.connections)
        for conn in open_now:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        super().server_close()

    def take_fault(self, method: str, path: str) -> int | None:
        with self.lock:
            pending = self.faults.get((method, path))
            return pending.pop(0) if pending else None


class LocalHTTPServer:
    """A Range-capable HTTP server over ``directory`` on 127.0.0.1, in a thread; a context manager.

    ``url``: ``http://127.0.0.1:PORT``; ``requests``: the requests served so far (`LoggedRequest`).
    """

    def __init__(self, directory: str | os.PathLike, port: int = 0) -> None:
        self.directory = os.fspath(directory)
        self._server = _Server(("127.0.0.1", port), partial(_RangeHandler, directory=self.directory))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> list[LoggedRequest]:
        with self._server.lock:
            return list(self._server.log)

    def clear_log(self) -> None:
        with self._server.lock:
            self._server.log.clear()

    def fail(self, path: str, *statuses: int, method: str = "GET") -> None:
        """Answer the next ``len(statuses)`` ``method`` requests for URL path ``path`` (``/a/b.tar``)
        with these statuses, in order, before serving it again."""
        with self._server.lock:
            self._server.faults.setdefault((method, path), []).extend(statuses)

    def start(self) -> LocalHTTPServer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, name="local-http", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> LocalHTTPServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def local_s3_server() -> Iterator[dict[str, str]]:
    """Run moto's S3 server on 127.0.0.1 (a free port) in a thread; yields s3fs ``storage_options``.

    >>> with local_s3_server() as opts:                      # doctest: +SKIP
    ...     fs = get_filesystem("s3://", opts); fs.mkdir("bucket"); fs.put(local_dir, "bucket/set", recursive=True)
    """
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise ImportError("local_s3_server needs moto's server: pip install 'moto[server]'") from None
    import logging

    # werkzeug logs every request to stderr; a reader's range reads are thousands of them.
    werkzeug = logging.getLogger("werkzeug")
    level = werkzeug.level
    werkzeug.setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
    finally:
        server.stop()
        werkzeug.setLevel(level)


def stop_fsspec_io(timeout_s: float = 5.0) -> None:
    """Close the readers' filesystems in this process and stop fsspec's I/O thread (and its loop's
    executor thread), so the process has no threads of fsspec's left: for a test's teardown.

    Every fsspec async filesystem of the process runs on that one loop, so call it only when none
    is in use any more; the readers make new ones (and fsspec a new loop) on their next read.
    """
    import gc

    from ._storage import forget_filesystems

    del forget_filesystems()[:]
    gc.collect()  # their finalizers close the client sessions, on the loop that is still running
    try:
        import asyncio

        import fsspec.asyn as fsspec_asyn
    except ImportError:
        return
    loop, thread = fsspec_asyn.loop[0], fsspec_asyn.iothread[0]
    if loop is None or thread is None or not thread.is_alive():
        return
    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(loop.shutdown_default_executor(), loop).result(timeout_s)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout_s)
    if not thread.is_alive():
        loop.close()
    fsspec_asyn.reset_lock()  # fsspec makes a new loop and thread on its next use


def main(argv: list[str] | None = None) -> int:
    """``python -m ray_extsrc.readers.testing DIR [--port P]``: serve DIR until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m ray_extsrc.readers.testing",
                                     description="Serve a folder on 127.0.0.1 over HTTP with Range requests.")
    parser.add_argument("directory")
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    args = parser.parse_args(argv)
    server = LocalHTTPServer(args.directory, args.port)
    print(server.url, flush=True)
    try:
        server._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
