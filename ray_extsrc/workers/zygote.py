"""The zygote: a small process started before CUDA that forks every worker of one pool.

Why: a worker that dies after the parent has initialised CUDA must be replaced, and forking the
parent then is unsafe (see `_cuda`). The zygote is forked (``py_start_method="fork"``) or spawned as
a fresh interpreter (``"spawn"``) while the parent is still CUDA-free, holds the worker program,
and forks a worker whenever the parent asks (`SpawnWorker`, with the worker's task socket, result
pipe and status page passed over SCM_RIGHTS), answering `WorkerSpawned`. It is single-threaded, so
its forks are safe. It reaps its workers, so it alone knows how a dead one ended: when a
`SpawnWorker` replaces a dead worker, the answer carries that worker's exit status (killed by
SIGBUS, SIGKILL, ...), which the parent uses to say why it died (`pool` NOTE [shutdown and faults]).

Lifetime: it exits when its control socket closes (the pool closed, or the parent died), after
terminating and reaping every worker it forked; if the parent died, it also unlinks the parent's
/dev/shm segments (the devshm backend), which nobody else would. It ignores SIGINT: Ctrl-C is the parent's to
handle. Parent side: `pool.WorkerPool`.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import socket
import sys
import time
import warnings

from .messages import SpawnWorker, WorkerSpawned
from .shm import unlink_segments
from .worker import WorkerArgs, worker_main

__all__ = ["run_forked", "zygote_main"]

_MAX_CTL_MESSAGE = 1 << 16
_KILL_GRACE_S = 2.0  # workers exit on SIGTERM at once unless stuck in user code
# The parent asks for a replacement once the dead worker's result pipe reads EOF; the kernel
# closes a dying process's files just before it becomes reapable, so this is a formality.
_EXIT_WAIT_S = 1.0


def _reap(children: set[int], exits: dict[int, int | None]) -> None:
    for pid in list(children):
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done, status = pid, None
        if done:
            children.discard(pid)
            exits[pid] = None if status is None else os.waitstatus_to_exitcode(status)


def _exit_of(pid: int, children: set[int], exits: dict[int, int | None]) -> int | None:
    """How worker ``pid`` (dead, or about to be) ended; None if unknown."""
    deadline = time.monotonic() + _EXIT_WAIT_S
    while pid in children and time.monotonic() < deadline:
        time.sleep(0.002)
        _reap(children, exits)
    return exits.pop(pid, None)


def _terminate(children: set[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in children:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + _KILL_GRACE_S
        while children and time.monotonic() < deadline:
            _reap(children, {})
            time.sleep(0.01)
        if not children:
            return


def zygote_main(ctl: socket.socket, program: object) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    owner = os.getppid()
    children: set[int] = set()
    exits: dict[int, int | None] = {}  # reaped workers' exit codes, until a SpawnWorker asks
    try:
        while True:
            ready, _, _ = select.select([ctl], [], [], 0.5)
            _reap(children, exits)
            if not ready:
                continue
            try:
                data, fds, _, _ = socket.recv_fds(ctl, _MAX_CTL_MESSAGE, 3)
            except OSError:
                return
            if not data:
                return  # the pool closed its end, or the parent died
            msg = pickle.loads(data)
            if not isinstance(msg, SpawnWorker) or len(fds) != 3:
                for fd in fds:
                    os.close(fd)
                continue
            replaced_exit = _exit_of(msg.replaces, children, exits) if msg.replaces else None
            if len(exits) > 1024:  # workers nobody asked about (cannot happen; bound it anyway)
                exits.clear()
            with warnings.catch_warnings():
                # Python 3.12 warns when the forking process has threads: here only native pools
                # (OpenBLAS) that register their own fork handlers; this loop holds no locks.
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    ctl.close()
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    worker_main(WorkerArgs(msg.worker_id, fds[0], fds[1], fds[2], program))
                except BaseException:  # noqa: BLE001 - the worker must never return into the zygote loop
                    code = 1
                finally:
                    os._exit(code)
            for fd in fds:
                os.close(fd)
            children.add(pid)
            ctl.send(pickle.dumps(WorkerSpawned(msg.worker_id, pid, replaced_exit)))
    finally:
        _terminate(children)
        if os.getppid() != owner:
            # The owner died without closing the pool (kill -9): its segments, which only it would
            # have unlinked, go now. Never while it lives: its other pools use the same prefix.
            unlink_segments(owner)


def run_forked(ctl_fd: int, program: object) -> None:
    """Body of a zygote forked from the parent. Never returns."""
    code = 0
    try:
        # Drop every descriptor inherited from the parent but stdio and our control socket, so the
        # parent's other pipes (other pools, Ray's sockets) do not stay open through us.
        os.closerange(3, ctl_fd)
        os.closerange(ctl_fd + 1, 1 << 16)
        zygote_main(socket.socket(fileno=ctl_fd), program)
    except BaseException:  # noqa: BLE001
        code = 1
    finally:
        os._exit(code)


def _spawned_entry() -> None:
    """``python -m ray_extsrc.workers.zygote CTL_FD``: the program comes pickled on stdin."""
    ctl_fd = int(sys.argv[1])
    stdin = sys.stdin.buffer
    sys.path[:] = pickle.load(stdin)  # the parent's import path, so its modules unpickle here
    program = pickle.load(stdin)
    stdin.close()
    zygote_main(socket.socket(fileno=ctl_fd), program)


if __name__ == "__main__":
    _spawned_entry()
