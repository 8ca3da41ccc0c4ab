"""CPU benchmark (``ray-extsrc bench --cpu``): torch DataLoader + torchvision v2 vs ray_extsrc's CPU
pipeline, same files, same work.

Each system runs in its own fresh interpreter (``python -m ray_extsrc.bench._cpu --run SYSTEM``),
interleaved (torch, ray_extsrc, torch, ray_extsrc, ...; ``--rounds`` pairs), ``--epochs`` timed
epochs per run after ``--warmup-epochs`` untimed ones. The report is the median images/s over all
timed epochs of a system, every raw epoch kept, and the ratio ray_extsrc / torch. The timing
convention is `_common`'s (benchmarks/README.md repeats it).

    ray-extsrc bench --cpu --torch-python /work/benchvenv/bin/python

Writes ``benchmarks/results/cpu-<date>.json`` (``--out``); data is generated once by
``ray_extsrc.synthetic`` into ``benchmarks/data/`` (git-ignored) and reused. The torch runner
imports torch, torchvision, Pillow and, of this package, only the file-list reader and the
helpers (NumPy is the one dependency its interpreter needs besides).
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

from ._common import cpu_model, emit, loadavg, parse_result, pipeline_epoch, result_stem, timed, versions

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"
SYSTEMS = ("torch", "ray_extsrc")
PROBES = {
    "torch": "import torch, torchvision; from torchvision.transforms import v2; import ray_extsrc.readers",
    "ray_extsrc": "from ray_extsrc import pipeline_def, fn, types; fn.external_source; fn.decoders.image_random_crop",
}
IMAGE_SHAPE = (3, 224, 224)


# --- the runners (one per fresh interpreter) ---------------------------------------------------------


def _checker(batch_size: int):
    def check(images, epoch: int) -> None:
        shape, dtype = tuple(images.shape), str(images.dtype)
        if shape != (batch_size, *IMAGE_SHAPE) or dtype not in ("float32", "torch.float32"):
            raise RuntimeError(f"epoch {epoch}: expected a float32 batch of shape {(batch_size, *IMAGE_SHAPE)}; "
                               f"got {dtype} {shape}")

    return check


def run_torch(args: argparse.Namespace) -> dict:
    """torch DataLoader + Pillow + torchvision v2 (`_torchvision`), no GPU: the collated batch's
    NumPy view in this process."""
    import torch

    from ._torchvision import torch_loader

    loader = torch_loader(args.root, None, batch=args.batch_size, workers=args.workers, pin_memory=False,
                          seed=args.seed)

    def epoch():
        for images, _labels in loader:
            yield images.numpy()

    setup_s = time.perf_counter() - args.t0
    records = timed(epoch, args.epochs, args.warmup_epochs, batch=args.batch_size, check=_checker(args.batch_size))
    return {"system": "torch",
            "description": "torch DataLoader + Pillow decode + torchvision.transforms.v2 (RandomResizedCrop(224, "
                           "antialias=True), RandomHorizontalFlip, ToImage, ToDtype(float32, scale=True), Normalize)",
            "torch_threads": torch.get_num_threads(),
            "multiprocessing_context": str(loader.multiprocessing_context or "default (fork on Linux)"),
            "setup_s": round(setup_s, 3), "records": records}


def run_extsrc(args: argparse.Namespace) -> dict:
    """The R1 pipeline (`_pipelines.r1_pipeline`) on the CPU: float32 CHW in this process."""
    from ._pipelines import r1_pipeline

    pipe = r1_pipeline(args.root, device="cpu", batch=args.batch_size, dtype="float32", batch_size=args.batch_size,
                       num_threads=args.threads, device_id=None, py_num_workers=args.workers, seed=args.seed)
    pipe.start_py_workers()
    pipe.build()

    def epoch():
        for images, labels in pipeline_epoch(pipe):
            labels.as_array()
            yield images.as_array()

    setup_s = time.perf_counter() - args.t0
    try:
        records = timed(epoch, args.epochs, args.warmup_epochs, batch=args.batch_size,
                        check=_checker(args.batch_size))
    finally:
        pipe.close()
    return {"system": "ray_extsrc",
            "description": "ray_extsrc parallel external source (per-sample FileListSource) + "
                           "fn.decoders.image_random_crop(device='cpu') + fn.resize(224x224) + "
                           "fn.crop_mirror_normalize(mirror=coin_flip, float32, CHW)",
            "num_threads": args.threads, "setup_s": round(setup_s, 3), "records": records}


def runner_main(argv: list[str]) -> int:
    t0 = time.perf_counter()
    p = argparse.ArgumentParser(prog="python -m ray_extsrc.bench._cpu --run")
    p.add_argument("system", choices=SYSTEMS)
    p.add_argument("--root", required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="ray_extsrc: num_threads of the pipeline")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.t0 = t0
    res = (run_torch if args.system == "torch" else run_extsrc)(args)
    res.update(interpreter=sys.executable, pid=os.getpid(), versions=versions())
    emit(res)
    return 0


# --- the orchestrator --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ray-extsrc bench --cpu", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    p.add_argument("--data-dir", type=Path, default=BENCHMARKS / "data", help="where data sets are generated")
    p.add_argument("--out", type=Path, help="result JSON path (default benchmarks/results/cpu-<date>.json)")
    p.add_argument("--no-save", action="store_true", help="print the table only")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per run")
    args = p.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for s in args.systems:
        if s not in SYSTEMS:
            p.error(f"--systems: unknown system {s!r}; choose from {sorted(SYSTEMS)}")
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
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
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
        "-m", "ray_extsrc.bench._cpu", "--run", system,
        "--root", str(root),
        "--batch-size", str(args.batch_size),
        "--workers", str(args.workers),
        "--epochs", str(args.epochs),
        "--warmup-epochs", str(args.warmup_epochs),
        "--seed", str(args.seed),
    ]  # fmt: skip
    print(f"-- round {round_idx}: {system} ({cmd[0]})", flush=True)
    load_before = loadavg()
    started = time.perf_counter()
    try:
        # stderr passes through (progress lines, tracebacks); stdout carries the result line.
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=child_env(), timeout=args.timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{system} run {round_idx} exceeded --timeout {args.timeout:.0f} s") from None
    wall = time.perf_counter() - started
    result = parse_result(proc.stdout)
    if proc.returncode != 0 or result is None:
        raise SystemExit(
            f"{system} run {round_idx} failed (exit status {proc.returncode}; its stderr is above).\n"
            f"command: {' '.join(cmd)}\nstdout tail:\n{proc.stdout[-2000:]}"
        )
    # Load averages bracket the run: other tenants of a shared machine show up here.
    result.update(round=round_idx, process_wall_s=round(wall, 3), loadavg_before=load_before, loadavg_after=loadavg())
    return result


def host_info() -> dict:
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
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "memory_gib": round(mem_kb / 2**20, 1) if mem_kb else None,
        "platform": platform.platform(),
        "hostname": platform.node(),
        "python": platform.python_version(),
        "orchestrator_python": sys.executable,
        "git_commit": commit,
        "load_average_at_start": loadavg(),
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
        epochs = [[e for e in r["records"] if "epoch" in e] for r in mine]
        timed = [e["images_per_s"] for run in epochs for e in run if not e["warmup"]]
        summary[system] = {
            "median_images_per_s": round(statistics.median(timed), 2) if timed else None,
            "timed_epochs_images_per_s": timed,
            "per_run_median_images_per_s": [
                round(statistics.median([e["images_per_s"] for e in run if not e["warmup"]]), 2) for run in epochs
            ],
            "warmup_epochs_images_per_s": [e["images_per_s"] for run in epochs for e in run if e["warmup"]],
            "median_first_batch_s": round(
                statistics.median([e["first_batch_s"] for run in epochs for e in run if not e["warmup"]]), 4
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
    return Path(f"{result_stem(BENCHMARKS / 'results', 'cpu', '')}.json")  # never overwrites a run


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--run"]:
        return runner_main(argv[1:])
    args = parse_args(argv)
    now = dt.datetime.now(dt.timezone.utc)
    for system in args.systems:
        reason = probe(system, interpreter(system, args))
        if reason is not None:
            raise SystemExit(f"cannot run {system}: {reason}")

    from ..synthetic import R1, make_jpeg_dataset

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
