"""CPU benchmark: torch DataLoader + torchvision v2 vs ray_extsrc's CPU pipeline, same files, same work.

Each system runs in its own fresh interpreter, interleaved (torch, ray_extsrc, torch, ray_extsrc,
...; ``--rounds`` pairs), ``--epochs`` timed epochs per run after ``--warmup-epochs`` untimed ones.
The report is the median images/s over all timed epochs of a system, every raw epoch kept, and
the ratio ray_extsrc / torch. The timing convention is in ``_common.py`` and README.md.

    /work/venv/bin/python benchmarks/cpu_bench.py --torch-python /work/benchvenv/bin/python

Writes ``benchmarks/results/cpu-<date>.json`` (``--out``); data is generated once by
``ray_extsrc.synthetic`` into ``benchmarks/data/`` (git-ignored) and reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # run as a script from a checkout, without installing the package
    sys.path.insert(0, str(REPO))

from ray_extsrc.synthetic import R1, make_jpeg_dataset  # noqa: E402

sys.path.insert(0, str(HERE))
from _common import RESULT_PREFIX  # noqa: E402

RUNNERS = {"torch": HERE / "_torch_baseline.py", "ray_extsrc": HERE / "_extsrc_runner.py"}
PROBES = {
    "torch": "import torch, torchvision; from torchvision.transforms import v2",
    "ray_extsrc": "from ray_extsrc import pipeline_def, fn, types; fn.external_source; fn.decoders.image_random_crop",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=1024, help="images in the R1-like data set (default 1024)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader num_workers = py_num_workers (default 2)")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per run (default 3)")
    p.add_argument("--warmup-epochs", type=int, default=1, help="untimed epochs before them (default 1)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved runs per system (default 2: A B A B)")
    p.add_argument("--seed", type=int, default=0, help="data-set seed and loaders' augmentation seed")
    p.add_argument(
        "--torch-python",
        default=sys.executable,
        help="interpreter for the torch baseline; needs torch + torchvision (default: this one)",
    )
    p.add_argument("--systems", default="torch,ray_extsrc", help="comma-separated subset of: torch,ray_extsrc")
    p.add_argument("--data-dir", type=Path, default=HERE / "data", help="where data sets are generated")
    p.add_argument("--out", type=Path, help="result JSON path (default benchmarks/results/cpu-<date>.json)")
    p.add_argument("--no-save", action="store_true", help="print the table only")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per run")
    args = p.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for s in args.systems:
        if s not in RUNNERS:
            p.error(f"--systems: unknown system {s!r}; choose from {sorted(RUNNERS)}")
    if args.warmup_epochs < 0:
        p.error(f"--warmup-epochs must be >= 0; got {args.warmup_epochs}")
    for name in ("images", "batch_size", "epochs", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.workers < 1:
        p.error(f"--workers must be >= 1 (parallel external source needs workers); got {args.workers}")
    if args.images < args.batch_size:
        p.error(f"--images ({args.images}) must be at least one batch (--batch-size {args.batch_size})")
    return args


def interpreter(system: str, args: argparse.Namespace) -> str:
    return args.torch_python if system == "torch" else sys.executable


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(HERE), env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def probe(system: str, python: str) -> str | None:
    """None if ``python`` can import what the system needs, else the reason it cannot."""
    proc = subprocess.run([python, "-c", PROBES[system]], capture_output=True, text=True, env=child_env())
    if proc.returncode == 0:
        return None
    last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    hint = {
        "torch": "pass --torch-python with an interpreter that has torch + torchvision (benchmarks/README.md)",
        "ray_extsrc": "the ray_extsrc pipeline API is not importable from this interpreter",
    }[system]
    return f"{python}: {last}; {hint}"


def run_one(system: str, root: Path, args: argparse.Namespace, round_idx: int) -> dict:
    cmd = [
        interpreter(system, args),
        str(RUNNERS[system]),
        "--root", str(root),
        "--batch-size", str(args.batch_size),
        "--workers", str(args.workers),
        "--epochs", str(args.epochs),
        "--warmup-epochs", str(args.warmup_epochs),
        "--seed", str(args.seed),
    ]  # fmt: skip
    print(f"-- round {round_idx}: {system} ({cmd[0]})", flush=True)
    load_before = _loadavg()
    started = time.perf_counter()
    try:
        # stderr passes through (progress lines, tracebacks); stdout carries the result line.
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=child_env(), timeout=args.timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{system} run {round_idx} exceeded --timeout {args.timeout:.0f} s") from None
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(
            f"{system} run {round_idx} failed (exit status {proc.returncode}; its stderr is above).\n"
            f"command: {' '.join(cmd)}\nstdout tail:\n{proc.stdout[-2000:]}"
        )
    result = json.loads(lines[-1][len(RESULT_PREFIX) :])
    # Load averages bracket the run: other tenants of a shared machine show up here.
    result.update(round=round_idx, process_wall_s=round(wall, 3), loadavg_before=load_before, loadavg_after=_loadavg())
    return result


def _loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def host_info() -> dict:
    cpu_model = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = None
    try:
        mem_kb = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal")))
    except (OSError, StopIteration, ValueError):
        mem_kb = None
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "cpu_model": cpu_model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "memory_gib": round(mem_kb / 2**20, 1) if mem_kb else None,
        "platform": platform.platform(),
        "hostname": platform.node(),
        "python": platform.python_version(),
        "orchestrator_python": sys.executable,
        "git_commit": commit,
        "load_average_at_start": _loadavg(),
    }


def package_versions() -> dict[str, str | None]:
    """Versions installed for the orchestrator's interpreter (= the ray_extsrc runner's).

    Read from package metadata, without importing. Each run also records the versions its own
    interpreter imported (``runs[i]["versions"]``): the torch baseline may use another venv.
    """
    from importlib import metadata

    out: dict[str, str | None] = {}
    for dist in ("numpy", "pillow", "simplejpeg", "ray", "torch", "torchvision"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def summarize(runs: list[dict], systems: list[str]) -> dict:
    summary = {}
    for system in systems:
        mine = [r for r in runs if r["system"] == system]
        timed = [e["images_per_s"] for r in mine for e in r["epochs"] if not e["warmup"]]
        summary[system] = {
            "median_images_per_s": round(statistics.median(timed), 2) if timed else None,
            "timed_epochs_images_per_s": timed,
            "per_run_median_images_per_s": [
                round(statistics.median([e["images_per_s"] for e in r["epochs"] if not e["warmup"]]), 2) for r in mine
            ],
            "warmup_epochs_images_per_s": [e["images_per_s"] for r in mine for e in r["epochs"] if e["warmup"]],
            "median_first_batch_s": round(
                statistics.median([e["first_batch_s"] for r in mine for e in r["epochs"] if not e["warmup"]]), 4
            )
            if timed
            else None,
            "setup_s": [r["setup_s"] for r in mine],
        }
    return summary


def print_table(summary: dict, ratio: float | None, round_ratios: list[float]) -> None:
    print()
    print(f"{'system':<12} {'median img/s':>12} {'min':>8} {'max':>8} {'first batch s':>14}  timed epochs (img/s)")
    for system, s in summary.items():
        timed = s["timed_epochs_images_per_s"]
        print(
            f"{system:<12} {s['median_images_per_s']:>12.1f} {min(timed):>8.1f} {max(timed):>8.1f} "
            f"{s['median_first_batch_s']:>14.3f}  {' '.join(f'{v:.0f}' for v in timed)}"
        )
    if ratio is not None:
        print(f"\nray_extsrc / torch (medians): {ratio:.3f}; per round: {', '.join(f'{r:.3f}' for r in round_ratios)}")


def result_path(args: argparse.Namespace, now: dt.datetime) -> Path:
    if args.out is not None:
        return args.out
    results = HERE / "results"
    base = f"cpu-{now:%Y-%m-%d}"
    path, n = results / f"{base}.json", 2
    while path.exists():  # never overwrite an earlier run of the same day
        path, n = results / f"{base}-{n}.json", n + 1
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    now = dt.datetime.now(dt.timezone.utc)
    for system in args.systems:
        reason = probe(system, interpreter(system, args))
        if reason is not None:
            raise SystemExit(f"cannot run {system}: {reason}")

    spec = dataclasses.replace(R1, num_images=args.images, seed=args.seed)
    root = args.data_dir / f"r1-like-{args.images}-seed{args.seed}"
    started = time.perf_counter()
    make_jpeg_dataset(root, spec)
    manifest = json.loads((root / "manifest.json").read_text())
    print(
        f"data: {root} ({manifest['num_files']} images, mean {manifest['mean_bytes'] / 1000:.1f} KB; "
        f"ready in {time.perf_counter() - started:.1f} s)",
        flush=True,
    )

    runs = []
    for round_idx in range(args.rounds):
        for system in args.systems:  # interleaved: A B A B ...
            runs.append(run_one(system, root, args, round_idx))

    summary = summarize(runs, args.systems)
    ratio, round_ratios = None, []
    if {"torch", "ray_extsrc"} <= summary.keys():
        ratio = round(summary["ray_extsrc"]["median_images_per_s"] / summary["torch"]["median_images_per_s"], 4)
        # Each round's two runs ran back to back, so their ratio cancels slow drifts of the machine.
        round_ratios = [
            round(e / t, 4)
            for t, e in zip(
                summary["torch"]["per_run_median_images_per_s"], summary["ray_extsrc"]["per_run_median_images_per_s"]
            )
        ]
    print_table(summary, ratio, round_ratios)

    report = {
        "benchmark": "cpu_bench",
        "date": now.isoformat(timespec="seconds"),
        "host": host_info(),
        "orchestrator_package_versions": package_versions(),
        "config": {
            "images": args.images,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "epochs": args.epochs,
            "warmup_epochs": args.warmup_epochs,
            "rounds": args.rounds,
            "seed": args.seed,
            "systems": args.systems,
            "order": "interleaved A B A B, each run in a fresh interpreter",
            "torch_python": args.torch_python,
            "timing": "per epoch: first request -> end-of-epoch signal handled (one reset included); "
            "first-batch latency included; full batches only; warm-up epochs excluded from medians",
        },
        "dataset": {
            "root": str(root),
            "spec": spec.to_dict(),
            "manifest": {k: v for k, v in manifest.items() if k != "spec"},
        },
        "summary": summary,
        "ratio_ray_extsrc_over_torch": ratio,
        "ratio_per_round": round_ratios,
        "runs": runs,
    }
    if not args.no_save:
        path = result_path(args, now)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
