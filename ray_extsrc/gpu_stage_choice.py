"""Where a Train worker's GPU stage runs: ``Loader(gpu_stage=...)``, ``"auto"`` resolved per worker.

``"consumer"``: in the Train worker's own process (`consumer_stage`); ``"actor"``: in the loader
actors, delivered by CUDA IPC (`transport`). `resolve_gpu_stage` says which one ``"auto"`` is and
why; `mps_daemon_running` is the one fact about the node it looks at.
"""

from __future__ import annotations

import os

__all__ = ["GPU_STAGES", "default_actors_per_worker", "mps_daemon_running", "resolve_gpu_stage"]

#: The values of ``Loader(gpu_stage=...)``.
GPU_STAGES = ("auto", "consumer", "actor")


def mps_daemon_running() -> bool:
    """Whether a CUDA MPS control daemon serves this process's GPU clients (its pipe directory
    exists): then separate processes' kernels do run concurrently, and the actor-side GPU stage
    keeps its extra host parallelism without taking turns with the step."""
    pipe_dir = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    return os.path.exists(os.path.join(pipe_dir, "control"))


def resolve_gpu_stage(requested: str, has_gpu: bool) -> str:
    """``Loader(gpu_stage=...)`` for one Train worker. ``"auto"`` is the stage that won the training
    benchmark (``ray-extsrc bench --train``) for a Train worker with a GPU: on an H200, 2026-12-02,
    in one run, ResNet-50 ran at 0.875x of synthetic fed by the consumer stage and 0.79x by the
    actor stage; ResNet-18 at 0.62x and 0.63x (benchmarks/results/train-2026-12-02-h200-*.json),
    and the consumer stage adds less GPU memory (one CUDA context per GPU). So ``"auto"`` is
    ``"consumer"`` there — unless a CUDA MPS daemon runs (`mps_daemon_running`): then the actors'
    kernels run concurrently with the step instead of taking turns, which is what the actor stage
    lacked. A Train worker without a GPU gets ``"actor"`` (the actors run the whole pipeline)."""
    if requested != "auto":
        return requested
    return "consumer" if has_gpu and not mps_daemon_running() else "actor"


def default_actors_per_worker(gpu_stage: str, has_gpu: bool) -> int:
    """``Loader(actors_per_worker=None)`` for a Train worker whose GPU stage is ``gpu_stage``
    (resolved): 3 where the actors run the GPU stage on a GPU, else 1.

    An actor running the GPU stage drives nvImageCodec and the kernels from Python in one process,
    which tops out well below what the GPU decodes (R1 on an H100: one ~9k img/s, three ~22k). An
    actor that stops after the host stage only collects its workers' samples and packs them, and
    one of them kept up with the consumer stage: R1 in Train on an H200 (2026-12-07, one run), one
    actor x 12 workers 31.1k img/s, three x 4 31.3k, two x 6 31.9k — and each actor is a process
    of ~300 MB with its own zygote (loader host RSS 1.58 GB with one, 2.46 GB with three). In the
    training benchmark on an H100 the same day, one actor fed ResNet-50 at 0.978x and ResNet-18 at
    0.942x of synthetic (three: 0.978x and 0.929-0.940x, hours before), with 1.89-1.90 GB of host
    RSS above synthetic against 2.88-2.95 GB."""
    return 3 if has_gpu and gpu_stage == "actor" else 1
