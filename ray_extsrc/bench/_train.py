"""The training benchmark (``ray-extsrc bench --train resnet50,resnet18``): a real training step inside
a Ray Train worker, fed by each loader; training images/s and the ratio to a synthetic feed.

The step (shared/ANCHORS.md, T1): a torchvision model with no weights (``tiny``: a one-conv net for
the CPU smoke test), channels_last, bf16 autocast, SGD (lr 0.1, momentum 0.9), cross-entropy with the
batch's labels, batch 256 of R1 images (224 x 224 float16 CHW, ImageNet-normalised, from
`_pipelines.r1_pipeline`; cast to bf16 for the model). One TorchTrainer worker (1 GPU). Untimed
warm-up first: ``--warmup`` epochs, and more until at least ``--warmup-steps`` (20) steps ran; then
``--epochs`` timed epochs, each ended by a device synchronisation.

Feeds, each in its own run (its own process, Ray instance and TorchTrainer), interleaved model by
model and round by round:

    synthetic          one random batch already on the device, reused every step (the upper bound)
    extsrc-consumer    ray_extsrc.train.Loader(r1_pipeline, gpu_stage="consumer"): GPU stage in the
                       Train worker's own process and CUDA context
    extsrc-actor       the same with gpu_stage="actor": GPU stage in the loader actors, CUDA IPC
    extsrc-auto        the Loader's default gpu_stage ("auto")
    extsrc-consumer-store  extsrc-consumer with its host batches through Ray's object store instead of
                       the loader actors' shared-memory rings (RAY_EXTSRC_HOST_RING=0, `host_ring`)
    torch              torch DataLoader + Pillow + torchvision v2 (`_torchvision`), pin_memory

The Train worker makes its feed (for ray_extsrc: ``iter_torch_batches()``, which starts the loader
actors) before it builds the model, as the Loader's docs advise. Per run: every epoch's img/s; GPU
memory in use on the device (all processes) before the feed and the model, its peak, and the peak
above synthetic's for the same model (the loader's share), and where the Train worker's sits
(torch's peak reserved, the CuPy pool of the consumer-side stage); host RSS and PSS of the Train worker's
process tree and of the loader actors' trees; seconds from ``trainer.fit()`` to the first batch,
from making the feed to its first batch, and above synthetic's; for ray_extsrc, seconds from
making the feed to its first batch being ready (``ready s``: the loader's own start-up, while the
model is built) and each start-up milestone (`LoaderIterator.startup_report`). Writes
``benchmarks/results/train-<date>-<device>.json`` and ``.png`` and prints a table.

    ray-extsrc bench --train resnet50,resnet18 --images 8000 --epochs 2 --warmup 1 --rounds 1
    ray-extsrc bench --train tiny --device cpu --feeds synthetic,extsrc-auto ...   (the CPU smoke test)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._common import (
    CpuUse, GpuMemory, cpu_model, cupy_pool_mb, device_name, emit, loadavg, loader_pids, loader_report, loader_ways,
    parse_result, result_stem, timed, timed_rates, versions,
)

FEEDS = ("synthetic", "extsrc-consumer", "extsrc-actor", "extsrc-auto", "torch", "extsrc-consumer-store")
_STAGE = {"extsrc-consumer": "consumer", "extsrc-actor": "actor", "extsrc-auto": None, "extsrc-consumer-store": "consumer"}
_ENV = {"extsrc-consumer-store": {"RAY_EXTSRC_HOST_RING": "0"}}  # set before Ray starts: its workers inherit it
DEFAULT_FEEDS = tuple(f for f in FEEDS if f not in _ENV)  # the A/B controls run when named
NUM_CLASSES = 1000
STEP = {"optimizer": "SGD(lr=0.1, momentum=0.9)", "autocast": "bfloat16", "memory_format": "channels_last",
        "loss": "cross_entropy(labels)", "weights": None, "num_classes": NUM_CLASSES,
        "input": "float16 CHW normalised, cast to bfloat16"}


# --- inside the Train worker -----------------------------------------------------------------------------


def build_model(name: str) -> Any:
    import torch

    if name == "tiny":  # the CPU smoke test's model: one conv, one linear layer
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, NUM_CLASSES))
    import torchvision

    return getattr(torchvision.models, name)(weights=None, num_classes=NUM_CLASSES)


def _feed(config: dict, dev: Any) -> tuple[Any, Any, Any, Any]:
    """(make_epoch, close, describe, loader_pids) for ``config["feed"]``: make_epoch() yields
    (images, labels); loader_pids() the loader actors' pids (none for the other feeds)."""
    import torch

    feed, batch, size, steps = config["feed"], config["batch"], config["size"], config["steps_per_epoch"]
    if feed == "synthetic":
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(batch, 3, size, size, generator=g).to(dev, torch.float16)
        y = torch.randint(0, 10, (batch,), generator=g).to(dev)

        def epoch():
            for _ in range(steps):
                yield x, y

        return epoch, lambda: None, lambda: {}, list
    if feed == "torch":
        from ._torchvision import torch_loader

        loader = torch_loader(config["root"], config["images"], batch=batch, workers=config["torch_workers"],
                              pin_memory=dev.type == "cuda", size=size)

        def epoch():
            for images, labels in loader:
                yield images.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)

        return epoch, lambda: None, lambda: {"num_workers": config["torch_workers"]}, list
    it = config["loader"].iter_torch_batches()

    def epoch():
        for b in it:
            yield b["images"], b["labels"]

    def describe() -> dict:
        out: dict[str, Any] = {"gpu_stage": getattr(it, "gpu_stage", None), "ways": it.ways,
                               "cuda_work_queues": getattr(it, "cuda_work_queues", None)}
        # the loader actors are Ray workers, not this process's children; their rings: ``host_rings``
        out.update(loader_report(it))
        return out

    return epoch, it.close, describe, lambda: loader_pids(it)


def train_worker(config: dict) -> None:
    """The body of the TorchTrainer worker: model, step, feed, timed epochs; rank 0 writes
    ``config["out"]``."""
    import torch

    gpu_on = config["device"] == "gpu"
    dev = torch.device("cuda", torch.cuda.current_device()) if gpu_on else torch.device("cpu")
    torch.manual_seed(0)
    gpu = GpuMemory()
    gpu.mark()  # before the feed and the model: the loader's share is the peak above synthetic's
    # the feed first, as the Loader's docs say: its actors start while the model is built
    made_after_fit = time.time() - config["fit_t0"]
    epoch_fn, close, describe, pids = _feed(config, dev)
    model = build_model(config["model"]).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(x: Any, y: Any) -> None:
        x = x.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
        y = y.reshape(-1).long()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def epoch():
        for x, y in epoch_fn():
            step(x, y)
            yield None

    sync = torch.cuda.synchronize if gpu_on else None
    steps = config["steps_per_epoch"]
    warmup = max(config["warmup"], math.ceil(config["warmup_steps"] / max(1, steps)))
    cpu = CpuUse()  # the timed epochs' CPU use, by thread and by loader process
    try:
        recs = timed(epoch, config["epochs"], warmup, gpu, sync, batch=config["batch"],
                     first_batch_clock=lambda: time.time() - config["fit_t0"], on_epoch=cpu.start_at(warmup, pids))
        cpu.stop()
        info = {**describe(), "cpu_use": cpu.report(), **(_pools_mb(torch) if gpu_on else {})}
    finally:
        close()
    out = {"records": recs, **gpu.report(), "warmup_epochs": warmup, "steps_per_epoch": steps,
           # what this Train worker's CUDA got (`cuda_work_queues`: the Loader, made before Ray, sets it)
           "cuda_device_max_connections": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"),
           "feed_made_after_fit_s": round(made_after_fit, 3),
           "train_worker_tree_rss_mb": max(r.get("tree_rss_mb", 0) for r in recs),
           "train_worker_tree_pss_mb": max(r.get("tree_pss_mb", 0) for r in recs), **info}
    if gpu_on:
        out["torch_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        with open(config["out"], "w") as f:
            json.dump(out, f)


def _pools_mb(torch: Any) -> dict[str, int]:
    """Where this process's GPU memory sits, to set beside the device's peak: torch's caching
    allocator at its peak, and CuPy's pool (the consumer-side stage's buffers) as it ends the run."""
    out = {"torch_max_reserved_mb": round(torch.cuda.max_memory_reserved() / 2**20)}
    pool = cupy_pool_mb()
    if pool is not None:
        out["cupy_pool_total_mb"] = pool
    return out


def _loop(config: dict) -> None:  # module-level, so Ray pickles it by reference
    from ray_extsrc.bench import _train

    _train.train_worker(config)


def run_one(args: argparse.Namespace) -> dict:
    """One (model, feed) run in this process: Ray, the Loader where the feed needs one, a
    TorchTrainer with one worker."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..train import Loader
    from ._pipelines import parse_decoder_options, r1_pipeline

    gpu_on = args.device == "gpu"
    loader = None
    os.environ.update(_ENV.get(args.feed, {}))
    ways = loader_ways(args.actors, _STAGE.get(args.feed), gpu_on)
    if args.feed in _STAGE:  # before Ray, as a user's script does (see _runner.run_train)
        stage = {"gpu_stage": _STAGE[args.feed]} if _STAGE[args.feed] else {}
        loader = Loader(r1_pipeline, outputs=("images", "labels"), py_num_workers=max(1, args.workers // ways),
                        actors_per_worker=ways, root=args.root, limit=args.images, size=args.size,
                        batch=args.batch, batch_size=args.batch, device=args.device, **stage,
                        **parse_decoder_options(args.decoder))
    ray.init(num_cpus=args.num_cpus or os.cpu_count(), num_gpus=1 if gpu_on else 0, include_dashboard=False,
             log_to_driver=True)
    out = os.path.join(tempfile.gettempdir(), f"ray_extsrc_train_{os.getpid()}.json")
    config = {"model": args.model, "feed": args.feed, "loader": loader, "root": args.root, "images": args.images,
              "batch": args.batch, "size": args.size, "steps_per_epoch": args.images // args.batch,
              "epochs": args.epochs, "warmup": args.warmup, "warmup_steps": args.warmup_steps,
              "torch_workers": args.torch_workers, "device": args.device, "out": out}
    resources = {"CPU": 1, "GPU": 1} if gpu_on else {"CPU": 1}
    config["fit_t0"] = time.time()  # the trainer is built and fit at once: "from trainer.fit()"
    trainer = TorchTrainer(_loop, train_loop_config=config,
                           scaling_config=ScalingConfig(num_workers=1, use_gpu=gpu_on, resources_per_worker=resources),
                           run_config=RunConfig(storage_path=os.path.join(tempfile.gettempdir(), "ray_results"),
                                                name=f"train_bench_{os.getpid()}"))
    trainer.fit()
    with open(out) as f:
        res = json.load(f)
    os.unlink(out)
    ray.shutdown()
    res.update(model=args.model, feed=args.feed, actors_per_worker=ways if loader else None,
               py_num_workers=max(1, args.workers // ways) if loader else None,
               gpu_stage_requested=_STAGE.get(args.feed) or ("default" if loader else None))
    return res


# --- the orchestrator ----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ray-extsrc bench --train", description=__doc__.split("\n\n")[0])
    p.add_argument("--train", required=True, metavar="MODELS", help="torchvision models, e.g. resnet50,resnet18 (or tiny)")
    p.add_argument("--feeds", default=",".join(DEFAULT_FEEDS),
                   help=f"a subset of {','.join(FEEDS)} (default: {','.join(DEFAULT_FEEDS)})")
    p.add_argument("--device", default="gpu", choices=("gpu", "cpu"), help="cpu: a CPU TorchTrainer (smoke test)")
    p.add_argument("--data", default="/tmp/r1", help="where the R1 set is (generated if missing)")
    p.add_argument("--spec", default="r1", choices=("r1", "small"), help="the data set's image sizes (synthetic.R1/SMALL)")
    p.add_argument("--images", type=int, default=8000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=224, help="training image side")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs first (at least --warmup-steps steps)")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--workers", type=int, default=12, help="ray_extsrc's Python workers per GPU, split over --actors")
    p.add_argument("--actors", type=int, default=0,
                   help="loader actors per Train worker (default 0: the Loader's default for the feed's GPU stage)")
    p.add_argument("--torch-workers", type=int, default=15)
    p.add_argument("--decoder", default="", metavar="NAME=VALUE,...", help="decoder op arguments (DecoderOptions)")
    p.add_argument("--mps", action="store_true", help="run a CUDA MPS daemon for the whole run (needs root)")
    p.add_argument("--num-cpus", type=int, default=0, help="Ray's CPUs (0: all)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    p.add_argument("--out", default="benchmarks/results")
    return p


class Mps:
    """A CUDA MPS control daemon for this run: pipe and log directories of its own, exported to
    every child (runners, Ray, the Train worker and the loader actors inherit them)."""

    def __init__(self) -> None:
        if os.geteuid() != 0:
            raise SystemExit("--mps: starting nvidia-cuda-mps-control needs root")
        self.pipe = tempfile.mkdtemp(prefix="mps-pipe-")
        self.log = tempfile.mkdtemp(prefix="mps-log-")
        os.environ["CUDA_MPS_PIPE_DIRECTORY"] = self.pipe
        os.environ["CUDA_MPS_LOG_DIRECTORY"] = self.log
        subprocess.run(["nvidia-cuda-mps-control", "-d"], check=True)
        print(f"MPS daemon started (pipe {self.pipe}, log {self.log})", flush=True)

    def stop(self) -> None:
        subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, timeout=60)
        print("MPS daemon stopped", flush=True)


def _loader_ready_s(startup: dict) -> float | None:
    """Seconds from making a ray_extsrc feed to its first batch being ready in the Train worker,
    before the training loop asks for it (the model is built meanwhile): the consumer-side stage's
    first decoded batch, else the loader actors' first batch (`LoaderIterator.startup_report`)."""
    return startup.get("first_decoded", startup.get("actor_first_batch"))


def _summary(runs: list[dict]) -> dict:
    summary: dict[str, dict] = {}
    for res in runs:
        s = summary.setdefault(f"{res['model']}/{res['feed']}", {
            "model": res["model"], "feed": res["feed"], "epochs": [], "per_round_median": [], "first_batch_s": [],
            "feed_to_first_batch_s": [], "loader_ready_s": [],
            "gpu_peak_used_mb": None, "gpu_added_peak_mb": None, "train_worker_tree_rss_mb": 0.0,
            "loader_tree_rss_mb": 0.0, "train_worker_tree_pss_mb": 0.0, "loader_tree_pss_mb": 0.0,
            "gpu_stage": res.get("gpu_stage"), "cuda_work_queues": res.get("cuda_work_queues")})
        rates = timed_rates(res)
        s["epochs"] += rates
        s["per_round_median"].append(statistics.median(rates) if rates else None)
        firsts = [x["startup_to_first_batch_s"] for x in res["records"] if "startup_to_first_batch_s" in x]
        s["first_batch_s"] += firsts
        if "feed_made_after_fit_s" in res:  # from making the feed (the Loader's iterator) to its first batch
            s["feed_to_first_batch_s"].extend(round(f - res["feed_made_after_fit_s"], 3) for f in firsts)
        ready = _loader_ready_s(res.get("startup") or {})
        if ready is not None:
            s["loader_ready_s"].append(ready)
        for k in ("gpu_peak_used_mb", "gpu_added_peak_mb"):
            if res.get(k) is not None:
                s[k] = max(s[k] or 0, res[k])
        for k in ("train_worker_tree_rss_mb", "loader_tree_rss_mb", "train_worker_tree_pss_mb", "loader_tree_pss_mb"):
            s[k] = max(s[k], res.get(k, 0))
    for s in summary.values():
        s["median_images_per_s"] = statistics.median(s["epochs"]) if s["epochs"] else None
        s["startup_to_first_batch_s"] = statistics.median(s["first_batch_s"]) if s["first_batch_s"] else None
        if s["feed_to_first_batch_s"]:
            s["feed_to_first_batch_median_s"] = statistics.median(s["feed_to_first_batch_s"])
        s["loader_ready_median_s"] = statistics.median(s["loader_ready_s"]) if s["loader_ready_s"] else None
        s["host_rss_mb"] = round(s["train_worker_tree_rss_mb"] + s["loader_tree_rss_mb"], 1)
        # the same processes with shared pages counted once (0 where the kernel gives no PSS)
        s["host_pss_mb"] = round(s["train_worker_tree_pss_mb"] + s["loader_tree_pss_mb"], 1)
    for s in summary.values():
        syn = summary.get(f"{s['model']}/synthetic")
        if syn and syn["median_images_per_s"] and s["median_images_per_s"] is not None:
            s["ratio_to_synthetic"] = round(s["median_images_per_s"] / syn["median_images_per_s"], 4)
            s["ratio_to_synthetic_per_round"] = [
                round(a / b, 4) if a and b else None for a, b in zip(s["per_round_median"], syn["per_round_median"])]
            if s["gpu_peak_used_mb"] is not None and syn["gpu_peak_used_mb"] is not None:
                s["gpu_peak_above_synthetic_mb"] = s["gpu_peak_used_mb"] - syn["gpu_peak_used_mb"]
            s["host_rss_above_synthetic_mb"] = round(s["host_rss_mb"] - syn["host_rss_mb"], 1)
            s["host_pss_above_synthetic_mb"] = round(s["host_pss_mb"] - syn["host_pss_mb"], 1)
            first, syn_first = s["startup_to_first_batch_s"], syn["startup_to_first_batch_s"]
            if first is not None and syn_first is not None:
                s["first_batch_above_synthetic_s"] = round(first - syn_first, 3)
        else:
            s["ratio_to_synthetic"] = None
    return summary


def table(summary: dict) -> str:
    head = (f"{'model/feed':<28}{'img/s':>9}{'vs syn':>8}{'epochs (img/s)':>26}{'1st batch s':>12}{'feed->1st':>10}"
            f"{'ready s':>8}{'GPU peak MB':>12}{'+vs syn':>9}{'host RSS MB':>12}{'host PSS MB':>12}{'stage':>10}")
    rows = [head]
    for k, s in summary.items():
        eps = " ".join(f"{v:.0f}" for v in s["epochs"])
        ratio = f"{s['ratio_to_synthetic']:.3f}" if s.get("ratio_to_synthetic") is not None else "-"
        med = f"{s['median_images_per_s']:.0f}" if s["median_images_per_s"] is not None else "-"
        first = f"{s['startup_to_first_batch_s']:.1f}" if s["startup_to_first_batch_s"] is not None else "-"
        peak = s["gpu_peak_used_mb"] if s["gpu_peak_used_mb"] is not None else "-"
        above = s.get("gpu_peak_above_synthetic_mb", "-")
        feed1 = f"{s['feed_to_first_batch_median_s']:.1f}" if s.get("feed_to_first_batch_median_s") is not None else "-"
        ready = f"{s['loader_ready_median_s']:.1f}" if s.get("loader_ready_median_s") is not None else "-"
        rows.append(f"{k:<28}{med:>9}{ratio:>8}{eps[:24]:>26}{first:>12}{feed1:>10}{ready:>8}{peak!s:>12}{above!s:>9}"
                    f"{s['host_rss_mb']:>12.0f}{s.get('host_pss_mb', 0):>12.0f}{s.get('gpu_stage') or '-':>10}")
    return "\n".join(rows)


def chart(summary: dict, path: str, title: str) -> bool:
    """Training img/s per feed, one panel per model, each bar labelled with its ratio to synthetic.
    False (and a printed note) where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no chart written (the JSON and the table are the result)")
        return False
    models = list(dict.fromkeys(s["model"] for s in summary.values()))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 0.5 * len(FEEDS) + 2), squeeze=False)
    for ax, m in zip(axes[0], models):
        rows = [s for s in summary.values() if s["model"] == m and s["median_images_per_s"] is not None][::-1]
        bars = ax.barh([s["feed"] for s in rows], [s["median_images_per_s"] for s in rows], color="#4c72b0")
        for bar, s in zip(bars, rows):
            r = s.get("ratio_to_synthetic")
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                    f" {s['median_images_per_s']:,.0f}" + (f" ({r:.2f}x)" if r is not None else ""), va="center")
        ax.set_title(m)
        ax.set_xlabel("training images/s (median of timed epochs)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--run"]:
        return runner_main(argv[1:])
    args = _parser().parse_args(argv)
    models = [m.strip() for m in args.train.split(",") if m.strip()]
    feeds = [f.strip() for f in args.feeds.split(",") if f.strip()]
    bad = [f for f in feeds if f not in FEEDS]
    if bad or not models:
        _parser().error(f"--feeds: unknown {bad}; one of {FEEDS}" if bad else "--train: no model named")
    if args.images < args.batch:
        _parser().error(f"--images ({args.images}) must be at least one batch ({args.batch})")
    from ..synthetic import R1, SMALL, make_jpeg_dataset

    t = time.perf_counter()
    spec = dataclasses.replace(R1 if args.spec == "r1" else SMALL, num_images=args.images)
    root = str(make_jpeg_dataset(args.data, spec, progress=False))
    print(f"data: {args.images} {args.spec} images in {root} ({time.perf_counter() - t:.1f} s)", flush=True)
    mps = Mps() if args.mps else None
    runs: list[dict] = []
    errors: dict[str, list[str]] = {}
    device = device_name() if args.device == "gpu" else f"cpu {cpu_model() or platform.machine()}"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    stem = result_stem(args.out, "train", device)

    def write(complete: bool) -> dict:
        # after every run, so a run stopped from outside (a time limit) keeps what it measured
        doc = {"benchmark": "train", "date": dt.datetime.now().isoformat(timespec="seconds"), "device": device,
               "host": platform.node(), "cpus": os.cpu_count(), "mps": bool(mps),
               "mps_dirs": {"pipe": mps.pipe, "log": mps.log} if mps else None, "step": STEP,
               "args": {**vars(args), "models": models, "feeds": feeds}, "data": {"root": root, "spec": spec.to_dict()},
               "complete": complete, "summary": _summary(runs), "runs": runs, "errors": errors}
        Path(f"{stem}.json").write_text(json.dumps(doc, indent=1))
        return doc

    try:
        for r in range(args.rounds):
            for model in models:
                for feed in feeds:
                    res = _run(args, root, model, feed, r, errors)
                    if res is not None:
                        runs.append(res)
                    write(complete=False)
    finally:
        if mps is not None:
            mps.stop()
    summary = write(complete=True)["summary"]
    print(table(summary))
    try:
        if chart(summary, f"{stem}.png", title=f"training step ({args.batch} x {args.size}^2, bf16) on "
                                               f"{device.split(',')[0]}{' with MPS' if mps else ''}"):
            print(f"wrote {stem}.png")
    except Exception as e:  # noqa: BLE001 - the chart is a convenience
        print(f"chart not written: {e}")
    print(f"wrote {stem}.json")
    return 0 if not errors else 1


def _run(args: argparse.Namespace, root: str, model: str, feed: str, r: int, errors: dict) -> dict | None:
    cmd = [sys.executable, "-m", "ray_extsrc.bench._train", "--run", model, feed, "--root", root,
           "--images", str(args.images), "--batch", str(args.batch), "--size", str(args.size),
           "--epochs", str(args.epochs), "--warmup", str(args.warmup), "--warmup-steps", str(args.warmup_steps),
           "--workers", str(args.workers), "--actors", str(args.actors), "--torch-workers", str(args.torch_workers),
           "--device", args.device, "--num-cpus", str(args.num_cpus), "--decoder", args.decoder]
    key = f"{model}/{feed}"
    print(f"round {r} {key}: running", flush=True)
    t, load = time.perf_counter(), loadavg()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired as e:
        errors.setdefault(key, []).append(f"timeout after {args.timeout} s")
        tail = e.stderr[-2000:] if isinstance(e.stderr, str) else (e.stderr or b"")[-2000:]
        print(f"  TIMEOUT; stderr tail: {tail!r}", flush=True)
        return None
    res = parse_result(proc.stdout)
    if proc.returncode != 0 or res is None:
        errors.setdefault(key, []).append(proc.stderr[-4000:])
        print(f"  FAILED rc={proc.returncode}\n{proc.stderr[-4000:]}", flush=True)
        return None
    res.update(round=r, process_wall_s=round(time.perf_counter() - t, 2), loadavg_before=load, loadavg_after=loadavg())
    print(f"  {key}: {[round(v) for v in timed_rates(res)]} img/s, stage {res.get('gpu_stage')}, "
          f"{res['process_wall_s']:.0f} s", flush=True)
    return res


def runner_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m ray_extsrc.bench._train --run")
    p.add_argument("model")
    p.add_argument("feed", choices=FEEDS)
    for name, kind, default in (("--root", str, None), ("--images", int, 8000), ("--batch", int, 256),
                                ("--size", int, 224), ("--epochs", int, 2), ("--warmup", int, 1),
                                ("--warmup-steps", int, 20), ("--workers", int, 12), ("--actors", int, 0),
                                ("--torch-workers", int, 15), ("--num-cpus", int, 0), ("--decoder", str, "")):
        p.add_argument(name, type=kind, default=default, required=default is None)
    p.add_argument("--device", default="gpu", choices=("gpu", "cpu"))
    args = p.parse_args(argv)
    t = time.perf_counter()
    res = run_one(args)
    res.update(wall_s=round(time.perf_counter() - t, 2), versions=versions(), pid=os.getpid())
    emit(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
