"""Where a Train worker's GPU stage runs: ``Loader(gpu_stage=...)``, ``"auto"`` resolved per worker.

``"consumer"``: in the Train worker's own process (`consumer_stage`); ``"actor"``: in the loader
actors, delivered by CUDA IPC (`transport`). `resolve_gpu_stage` says which one ``"auto"`` is and
why; `mps_daemon_running` is the one fact about the node it looks at.
"""

from __future__ import annotations

import os

__all__ = ["GPU_STAGES", "mps_daemon_running", "resolve_gpu_stage"]

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
