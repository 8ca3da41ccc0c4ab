"""More hardware work queues for the CUDA context a consumer-side GPU stage shares with the step.

Why. A CUDA context feeds the GPU through a fixed set of hardware work queues ("connections"),
``CUDA_DEVICE_MAX_CONNECTIONS`` of them (1 to 32; 8 when unset), and every stream of the context
is mapped onto one of them. nvJPEG's hardware decoder, behind nvImageCodec, runs a batch on dozens
of internal streams (a torch.profiler trace on an H200, 2026-12-03: about 100 streams, each with a
host-to-device copy and a colour-conversion kernel per image). In a Train worker whose GPU stage
runs in its own process (``gpu_stage="consumer"``), the training step's stream then shares its
queue with a dozen of them, and the step's launches get slower: in the probe (one process, H200,
ResNet-18, bf16, batch 256) the mean ``cudaLaunchKernel`` of the step's two launching threads went
from 7.3-9.7 us on synthetic data to 14.7 us fed by the stage; the fed step ran at 10.8-11.4k img/s
with 8 queues and 11.3-12.3k with 32 (synthetic 13.1-13.2k)
(benchmarks/results/probe-consumer-2026-12-03-h200-work-queues.json). In Ray Train (same day,
ResNet-50 / ResNet-18 against synthetic): 0.953x / 0.835x with 8, 0.975x / 0.876x with 32
(benchmarks/results/train-2026-12-03-h200-session11-*queues.json).

What. The driver reads the variable when it initialises (``cuInit``: set later in the same
process, after ``torch.cuda.is_available()``, it gave no gain in the probe, 9.1k / 10.0k img/s),
so it must be in a process's environment when it starts. A Ray Train worker has initialised CUDA,
and made its context, before the train loop runs; so the variable has to come from the cluster:

* `for_the_cluster` (called by `Loader`, on the driver): when Ray is not running yet, it puts
  ``CUDA_DEVICE_MAX_CONNECTIONS=32`` in the driver's environment, which the local cluster that
  ``ray.init()`` or ``trainer.fit()`` then starts, and every Train worker and loader actor in it,
  inherit. This is the default path: nothing to configure.
* With Ray already running (``ray.init()`` before the `Loader`, or a cluster started by
  ``ray start`` / KubeRay), set it in the cluster's environment: ``ray.init(runtime_env={"env_vars":
  {"CUDA_DEVICE_MAX_CONNECTIONS": "32"}})``, or in the nodes' environment (cluster/README.md).
* `widen_work_queues` (called by `LoaderIterator` with the consumer-side stage) reports, in the
  iterator's ``stats()["cuda_work_queues"]``, whether this worker got it, sets it when CUDA has not
  started in the process, and otherwise warns once with the two ways above.

A value the user set (say ``1``, for Megatron-style ordering of communication and compute) is kept.
"""

from __future__ import annotations

import logging
import os

from .workers._cuda import cuda_initialized

__all__ = ["ENV", "QUEUES", "for_the_cluster", "widen_work_queues"]

#: the CUDA driver's variable, and the value we ask for (its maximum)
ENV = "CUDA_DEVICE_MAX_CONNECTIONS"
QUEUES = 32

_log = logging.getLogger(__name__)
_warned: list[bool] = []


def for_the_cluster() -> str | None:
    """On the driver, before Ray starts: put ``CUDA_DEVICE_MAX_CONNECTIONS=32`` in this process's
    environment for the local cluster that ``ray.init()`` will start to inherit. Returns ``"set"``,
    ``"env:<value>"`` (already set: kept), or None when Ray already runs (its processes keep the
    environment they started with)."""
    import ray

    user = os.environ.get(ENV)
    if user is not None:
        return f"env:{user}"
    if ray.is_initialized():
        return None
    os.environ[ENV] = str(QUEUES)
    return "set"


def widen_work_queues() -> str:
    """In a Train worker with the consumer-side stage: ``"env:<value>"`` when the variable is in
    the environment (set by the cluster, `for_the_cluster`, or the user: it applies if it was there
    when the process started, which is the case for a Ray worker), ``"set"`` when CUDA has not
    started in this process yet (it is set now and applies), else ``"too_late"`` (warned once)."""
    user = os.environ.get(ENV)
    if user is not None:
        return f"env:{user}"
    if cuda_initialized():
        if not _warned:
            _warned.append(True)
            _log.warning(
                "ray_extsrc: this Train worker started CUDA with %s unset (8 hardware work queues), so the GPU "
                "decoder's streams share queues with the training step and slow its launches (ResNet-18 on an "
                "H200, one process: 10.8k vs 11.3-12.3k img/s with %d). Make the Loader before Ray starts (it then "
                "sets %s=%d for the local cluster), or set it in the cluster's environment: "
                "ray.init(runtime_env={'env_vars': {'%s': '%d'}}), or on every node (see cluster/README.md).",
                ENV, QUEUES, ENV, QUEUES, ENV, QUEUES)
        return "too_late"
    os.environ[ENV] = str(QUEUES)
    return "set"
