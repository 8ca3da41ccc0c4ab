"""What every benchmark of ``ray-extsrc bench`` shares: the epoch timer, the result line, memory
probes, version lookup and the result file's name. One copy of each, for the R1 runner (`_runner`),
the CPU benchmark (`_cpu`) and the training benchmark (`_train`).

Standard library only at import time (torch loads lazily, in `GpuMemory`), so a runner under
another interpreter (the CPU benchmark's torch baseline) needs nothing of the package's own
dependencies beyond NumPy.

Timing convention (identical for every system; benchmarks/README.md repeats it): an epoch is timed
from just before its first request (``iter(loader)``, the first ``pipe.run()``) to the moment its
end-of-epoch signal has been handled; the first batch's latency is inside the epoch, and so is one
``sync()`` at its end (the GPU's queued work). Only full batches count: images = batches x batch
size. The first ``warmup`` epochs run the same way and are kept apart (``"warmup": true``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

#: Start of this process's benchmark (the first import of this module): start-up to first batch
#: counts from here.
T0 = time.perf_counter()
#: The one line a runner prints for the orchestrator: ``BENCH-RESULT {json}``.
RESULT_PREFIX = "BENCH-RESULT "
BATCH = 256


def emit(result: dict) -> None:
    """Print a runner's result as the line the orchestrators parse (`parse_result`)."""
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


def parse_result(stdout: str) -> dict | None:
    """The last result line of a runner's stdout, or None."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    return json.loads(lines[-1][len(RESULT_PREFIX):]) if lines else None


def timed_rates(result: dict) -> list[float]:
    """Images/s of one run's timed (not warm-up) epochs."""
    return [x["images_per_s"] for x in result["records"] if "epoch" in x and not x["warmup"]]


def _proc_mb(path: str, key: str) -> float:
    """The kB figure of line ``key`` in a /proc file, in MB; 0 where the file or line is missing."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def rss_mb(pid: int) -> float:
    return _proc_mb(f"/proc/{pid}/status", "VmRSS:")


def pss_mb(pid: int) -> float:
    """Proportional set size: each page the process maps, divided by how many processes map it
    (``/proc/PID/smaps_rollup``); 0 where the kernel does not say."""
    return _proc_mb(f"/proc/{pid}/smaps_rollup", "Pss:")


def tree_rss_mb(root: int | None = None) -> float:
    """RSS of process ``root`` (default: this one) and all its descendants (shared pages are
    counted in each)."""
    return _tree_mb(root, rss_mb)


def tree_pss_mb(root: int | None = None) -> float:
    """PSS of process ``root`` (default: this one) and all its descendants: pages shared between
    them (a zygote's, forked workers' copy-on-write pages) are counted once in all, unlike
    `tree_rss_mb`. Pages shared with processes outside the tree count only in part."""
    return _tree_mb(root, pss_mb)


def _stat_fields(stat_path: str) -> list[str]:
    """The fields of a /proc ``stat`` file after the command name (``fields[0]`` is the state,
    field 3 of proc(5)); the name, in parentheses, may hold spaces."""
    with open(stat_path) as f:
        return f.read().rsplit(")", 1)[1].split()


def _children() -> dict[int, list[int]]:
    """ppid -> pids, from /proc."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(_stat_fields(f"/proc/{d}/stat")[1])
                kids.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def _tree(root: int) -> list[tuple[int, int]]:
    """(pid, depth) of process ``root`` (depth 0) and all its descendants."""
    kids, out, todo = _children(), [], [(root, 0)]
    while todo:
        p, depth = todo.pop()
        out.append((p, depth))
        todo.extend((k, depth + 1) for k in kids.get(p, []))
    return out


def _tree_mb(root: int | None, of: Any) -> float:
    """``of(pid)`` summed over process ``root`` (default: this one) and all its descendants."""
    return sum(of(p) for p, _ in _tree(os.getpid() if root is None else root))


def tree_breakdown(root: int) -> list[dict]:
    """Each process of ``root``'s tree: pid, depth (0: ``root``; for a loader actor 1 is its zygote
    and janitor, 2 its Python workers), name, RSS and PSS in MB."""
    out = []
    for p, depth in _tree(root):
        try:
            with open(f"/proc/{p}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        out.append({"pid": p, "depth": depth, "name": name, "rss_mb": round(rss_mb(p), 1), "pss_mb": round(pss_mb(p), 1)})
    return out


def _cpu_s(stat_path: str) -> float:
    """User + system CPU seconds from a /proc ``stat`` file (a process's or a thread's); 0 if gone."""
    try:
        fields = _stat_fields(stat_path)
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def thread_cpu_s(pid: int | None = None) -> dict[str, float]:
    """CPU seconds (user + system) the threads of process ``pid`` (default: this one) have used, by
    thread name: in this process a Python thread goes by its ``threading`` name, any other thread
    (C/CUDA threads, or those of another process) by the kernel's name; threads of one name are
    summed. {} where /proc cannot be read."""
    pid = os.getpid() if pid is None else pid
    names = {t.native_id: t.name for t in threading.enumerate()} if pid == os.getpid() else {}
    out: dict[str, float] = {}
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return out
    for tid in tids:
        name = names.get(tid)
        if name is None:
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    name = f.read().strip()
            except OSError:
                continue
        out[name] = out.get(name, 0.0) + _cpu_s(f"/proc/{pid}/task/{tid}/stat")
    return out


class CpuUse:
    """Where the CPU went in a timed region: `start` and `stop` around it; `report` gives the wall
    seconds, this process's threads (`thread_cpu_s`), each loader actor's threads, and each actor
    tree's processes by depth (1: zygote and janitor, 2: Python workers), as CPU seconds. A thread
    near the wall time was busy all along; Python threads of one process that add up to about the
    wall time together share the GIL to its limit."""

    def __init__(self) -> None:
        self._t = self._wall = 0.0
        self._pids: list[int] = []
        self._before: dict[str, Any] = {}
        self._after: dict[str, Any] = {}

    def _snapshot(self, pids: list[int]) -> dict[str, Any]:
        snap: dict[str, Any] = {"self": thread_cpu_s()}
        for i, pid in enumerate(pids):
            snap[f"actor{i}"] = thread_cpu_s(pid)
            depth: dict[str, float] = {}
            for p, d in _tree(pid):
                if d:
                    depth[str(d)] = depth.get(str(d), 0.0) + _cpu_s(f"/proc/{p}/stat")
            snap[f"actor{i}_tree_by_depth"] = depth
        return snap

    def start_at(self, first_timed: int, pids: Callable[[], list[int]]) -> Callable[[int], None]:
        """An ``on_epoch`` hook for `timed` that starts this before epoch ``first_timed``, with the
        loader actors' ``pids()`` (none where that raises: these are figures, not the result)."""

        def hook(epoch: int) -> None:
            if epoch == first_timed:
                try:
                    got = pids()
                except Exception:  # noqa: BLE001 - this process's threads only
                    got = []
                self.start(got)

        return hook

    def start(self, pids: list[int]) -> None:
        self._pids = pids
        self._before = self._snapshot(pids)
        self._t = time.perf_counter()

    def stop(self) -> None:
        if self._before:
            self._wall = time.perf_counter() - self._t
            self._after = self._snapshot(self._pids)

    def report(self) -> dict[str, Any]:
        """``{"wall_s": W, "self": {thread: s}, "actor0": {...}, "actor0_tree_by_depth": {...}}``,
        each dict largest first and without threads under 0.01 s; {} if `start` was not called."""
        if not self._after:
            return {}
        out: dict[str, Any] = {"wall_s": round(self._wall, 3)}
        for key, after in self._after.items():
            before = self._before.get(key, {})
            delta = {k: round(v - before.get(k, 0.0), 2) for k, v in after.items()}
            out[key] = dict(sorted(((k, v) for k, v in delta.items() if v >= 0.01), key=lambda kv: -kv[1]))
        return out


def cupy_pool_mb() -> int | None:
    """MB held by CuPy's default memory pool in this process (used and cached blocks); None where
    CuPy was never imported here."""
    if "cupy" not in sys.modules:
        return None
    import cupy

    return round(cupy.get_default_memory_pool().total_bytes() / 2**20)


def loader_pids(it: Any) -> list[int]:
    """The pids of a `LoaderIterator`'s loader actors: Ray workers, not the caller's children, so
    their trees (zygote, Python workers) are measured by pid (on the caller's node)."""
    return [it.describe(w)["pid"] for w in range(it.ways)]


def loader_ways(actors: int, gpu_stage: str | None, has_gpu: bool) -> int:
    """Loader actors per Train worker for a run: ``actors`` (the ``--actors`` option), or with 0 the
    Loader's own default for the stage it will run (``gpu_stage`` None: its ``"auto"``), so the
    ``--workers`` Python workers are split over the actors it really makes."""
    if actors:
        return actors
    from ..gpu_stage_choice import default_actors_per_worker, resolve_gpu_stage

    return default_actors_per_worker(resolve_gpu_stage(gpu_stage or "auto", has_gpu), has_gpu)


def loader_report(it: Any) -> dict:
    """Host memory, start-up and stats of a `LoaderIterator`'s loader actors, for a result: the RSS
    and PSS of their trees, each process of the first actor's tree (`tree_breakdown`),
    `LoaderIterator.startup_report`, the numbers and names of `LoaderIterator.stats`
    (``loader_stats``) and each actor's host-ring counts (``host_rings``, when it has a ring). Call
    while they run, on their node."""
    out: dict[str, Any] = {}
    try:
        pids = loader_pids(it)
        out["loader_tree_rss_mb"] = round(sum(tree_rss_mb(pid) for pid in pids), 1)
        out["loader_tree_pss_mb"] = round(sum(tree_pss_mb(pid) for pid in pids), 1)
        out["loader_processes"] = tree_breakdown(pids[0])
    except Exception as e:  # noqa: BLE001 - figures, not the result
        out["loader_tree_rss_error"] = repr(e)
    try:
        out["startup"] = it.startup_report()
    except Exception as e:  # noqa: BLE001
        out["startup_error"] = repr(e)
    try:
        out["loader_stats"] = {k: v for k, v in it.stats().items() if isinstance(v, (int, float, str))}
    except Exception:  # noqa: BLE001
        pass
    try:  # consumer-side GPU stage: how the host batches' bytes went (`host_ring.HostRing.stats`)
        rings = [it.describe(w)["host_ring"] for w in range(len(it.actors))]
        if any(rings):
            out["host_rings"] = rings
    except Exception as e:  # noqa: BLE001
        out["host_rings_error"] = repr(e)
    return out


def pipeline_epoch(pipe: Any) -> Iterator[tuple]:
    """One epoch of a built pipeline's outputs; `reset()` at its end, for the next epoch."""
    while True:
        try:
            outputs = pipe.run()
        except StopIteration:
            pipe.reset()
            return
        yield outputs


class GpuMemory:
    """Device-wide GPU memory in use (like nvidia-smi: every process's), sampled on demand; a no-op
    without CUDA. ``base`` (set by `mark`) is the figure before the loader started."""

    def __init__(self) -> None:
        self.peak_used = 0
        self.base: int | None = None
        try:
            import torch

            self._on = torch.cuda.is_available()
        except ImportError:
            self._on = False

    def used(self) -> int:
        if not self._on:
            return 0
        import torch

        free, total = torch.cuda.mem_get_info()
        return total - free

    def sample(self) -> None:
        self.peak_used = max(self.peak_used, self.used())

    def mark(self) -> None:
        self.base = self.used()

    def report(self) -> dict[str, Any]:
        if not self._on:
            return {"gpu_peak_used_mb": None}
        out: dict[str, Any] = {"gpu_peak_used_mb": round(self.peak_used / 2**20)}
        if self.base is not None:
            out["gpu_used_before_loader_mb"] = round(self.base / 2**20)
            out["gpu_added_peak_mb"] = round((self.peak_used - self.base) / 2**20)
        return out


def timed(
    make_epoch: Callable[[], Iterator[Any]],
    epochs: int,
    warmup: int,
    gpu: GpuMemory | None = None,
    sync: Callable[[], None] | None = None,
    *,
    batch: int = BATCH,
    check: Callable[[Any, int], None] | None = None,
    t0: float | None = None,
    first_batch_clock: Callable[[], float] | None = None,
    on_epoch: Callable[[int], None] | None = None,
) -> list[dict]:
    """Run ``warmup + epochs`` epochs of ``make_epoch()`` (called inside the timed region); one
    record per epoch, after one ``{"startup_to_first_batch_s": ...}`` record (from ``t0``, default
    this module's import; ``first_batch_clock`` replaces that figure, e.g. seconds since
    ``trainer.fit()``). ``check(batch, epoch)`` sees each epoch's first batch; ``on_epoch(e)`` is
    called before each epoch (before its clock starts)."""
    records: list[dict] = []
    for e in range(warmup + epochs):
        if on_epoch is not None:
            on_epoch(e)
        n, first, start = 0, None, time.perf_counter()
        for item in make_epoch():
            if n == 0:
                first = time.perf_counter() - start
                if check is not None:
                    check(item, e)
                if e == 0:
                    since = first_batch_clock() if first_batch_clock else time.perf_counter() - (T0 if t0 is None else t0)
                    records.append({"startup_to_first_batch_s": round(since, 3)})
            n += 1
            if gpu is not None and n % 8 == 1:
                gpu.sample()
        if sync is not None:
            sync()
        secs = time.perf_counter() - start
        if n == 0:
            raise RuntimeError(f"epoch {e} produced no batches (fewer images than one batch of {batch}?)")
        rec = {"epoch": e, "warmup": e < warmup, "batches": n, "images": n * batch, "seconds": round(secs, 4),
               "first_batch_s": round(first or 0.0, 4), "images_per_s": round(n * batch / secs, 1),
               "tree_rss_mb": round(tree_rss_mb(), 1), "tree_pss_mb": round(tree_pss_mb(), 1)}
        records.append(rec)
        print(f"  epoch {e}{' (warm-up)' if e < warmup else ''}: {n * batch} img in {secs:.3f} s = "
              f"{n * batch / secs:.0f} img/s (first batch {first or 0.0:.3f} s)", file=sys.stderr, flush=True)
    return records


_VERSIONED = ("ray_extsrc", "torch", "torchvision", "cupy", "ray", "numpy", "PIL", "simplejpeg")


def versions(modules: Iterable[str] = _VERSIONED) -> dict[str, str | None]:
    """``{module: __version__}`` of the modules this process imported (None when not imported),
    plus nvImageCodec's where it is installed."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in modules:
        m = sys.modules.get(name)
        out[name] = getattr(m, "__version__", None) if m else None
    if "nvidia.nvimgcodec" in sys.modules:
        out["nvimgcodec"] = getattr(sys.modules["nvidia.nvimgcodec"], "__version__", None)
    return out


def gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        return sum(1 for line in out.splitlines() if line.startswith("GPU "))
    except Exception:
        return 0


def device_name() -> str:
    """``"NVIDIA H200, 580.xx"`` (name, driver) from nvidia-smi, else the CPU's model name."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        if out:
            return out.splitlines()[0]
    except Exception:
        pass
    return f"cpu {cpu_model() or platform.machine()}"


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def result_stem(out_dir: str | os.PathLike, kind: str, device: str) -> Path:
    """``out_dir/<kind>-<date>-<device tag>`` (no suffix); a second run the same day gets ``-2``, ...
    so that no earlier result is overwritten. An empty ``device`` leaves the tag out."""
    tag = device.split(",")[0].replace("NVIDIA ", "").replace(" ", "-").replace("(R)", "").lower()
    tag = "".join(c for c in tag if c.isalnum() or c in "-_.")[:40]
    base = Path(out_dir) / f"{kind}-{dt.date.today().isoformat()}{'-' + tag if tag else ''}"
    stem, n = base, 2
    while Path(f"{stem}.json").exists():
        stem, n = Path(f"{base}-{n}"), n + 1
    return stem
