"""`MainStage`: a batch's main-stage ops, after the host stage, and the pipeline's outputs.

The main stage is what `plan.make_plan` left out of the workers: CPU ops fed by in-process
sources (run per sample on a thread pool of ``num_threads``, through the plan's `plan.Evaluator`)
and GPU ops (run for the whole batch by `gpu_stage`, on the pipeline's own stream), in graph
order; then each pipeline output is assembled into a `TensorListCPU` or `TensorListGPU`. It runs in
the pipeline's process (`Pipeline.run`), or in a consumer's, on host batches a twin pipeline made
(`Pipeline.run_device`).

While a main stage with GPU ops is open it holds the process's GPU decoders
(`fn._gpu.decode.retain`), released by `close` or when it is garbage-collected without it.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import LifecycleError
from ..external_source import is_source, output_layout
from ..graph import DataNode
from ..plan import Plan
from ..tensors import TensorListCPU, TensorListGPU, assemble_cpu
from ..types import SampleInfo
from .host_stage import Env

__all__ = ["MainStage"]


class MainStage:
    """The main-stage ops of one pipeline, one batch per `run` (see the module docstring)."""

    def __init__(
        self, plan: Plan, outputs: Sequence[DataNode], *, seed: int, device_id: int | None, num_threads: int,
    ) -> None:
        self._plan = plan
        self._outputs = tuple(outputs)
        self._threads: ThreadPoolExecutor | None = None
        if plan.main_cpu:
            self._threads = ThreadPoolExecutor(num_threads, thread_name_prefix="ray_extsrc")
        self._gpu: Any = None  # gpu_stage.GpuStage, when the main stage has GPU ops
        self._gpu_release: weakref.finalize | None = None
        if plan.gpu_main:
            from ..fn._gpu import decode  # GPU modules load lazily, only on GPU machines
            from . import gpu_stage

            self._gpu = gpu_stage.GpuStage(device_id, seed, plan.prep_of)
            decode.retain()  # the process's GPU decoders live while a GPU pipeline is open
            self._gpu_release = weakref.finalize(self, decode.release)

    def warm_up(self) -> list:
        """Start making the GPU decoders of this stage's decode ops now, in their threads, without
        waiting (`fn._gpu.decode.warm_up`); returns the futures (none without GPU decode ops)."""
        if self._gpu is None:
            return []
        from ..fn._gpu import decode

        seen: set = set()
        futures: list = []
        for node in self._plan.main_nodes:
            options = getattr(node.op, "decoder_options", None)
            if options is None or self._plan.device.get(node.op_id) != "gpu" or options in seen:
                continue
            seen.add(options)
            futures += decode.warm_up(self._gpu.device_index, options)
        return futures

    def wait_fence(self, fence: Any) -> None:
        """Make this stage's GPU work wait for ``fence`` (see `Pipeline.consumer_fence`)."""
        self._gpu.wait_fence(fence)

    def run(
        self, infos: Sequence[SampleInfo], env: Env, *, epoch_idx: int, order_consumer: bool = True,
    ) -> tuple[TensorListCPU | TensorListGPU, ...]:
        """The main-stage ops for one batch (CPU ops on the thread pool, then GPU ops), assembled.

        ``epoch_idx`` is the epoch of a batch without samples (else the samples' SampleInfos say).
        """
        cpu_nodes = {n.op_id for n in self._plan.main_eval.nodes}
        if cpu_nodes:
            self._run_cpu(infos, env, infos[0].epoch_idx if infos else epoch_idx)
        for node in self._plan.main_nodes:
            if node.op_id in cpu_nodes or is_source(node):
                continue
            env[node.op_id] = self._gpu.run_op(node, infos, env)
        if self._gpu is not None:
            from ..fn._gpu.ptrbatch import PtrBatch

            for x in self._outputs:  # every output's views first: the first output's event may free
                data = env[x.source.op_id][x.index]  # the decoded images for reuse (`ptrbatch.Held`)
                if isinstance(data, PtrBatch):
                    env[x.source.op_id][x.index] = data.to_list()
        return tuple(self._assemble(x, env, order_consumer) for x in self._outputs)

    def _run_cpu(self, infos: Sequence[SampleInfo], env: Env, epoch_idx: int) -> None:
        main_eval = self._plan.main_eval

        def one(j: int) -> dict[int, tuple]:
            sample_env = {op_id: _row(outs, j) for op_id, outs in env.items()}
            return main_eval.run(infos[j], sample_env, epoch_idx)

        if self._threads is None:  # made with the stage when it has CPU ops; gone after close()
            raise LifecycleError("the pipeline is closed")
        results = list(self._threads.map(one, range(len(infos))))
        for node in main_eval.nodes:
            env[node.op_id] = {
                k: [r[node.op_id][k] for r in results] for k in range(node.op.num_outputs)
            }

    def _assemble(self, x: DataNode, env: Env, order_consumer: bool = True) -> TensorListCPU | TensorListGPU:
        data = env[x.source.op_id][x.index]
        layout = output_layout(x)
        if self._plan.device.get(x.source.op_id) == "gpu":
            from . import gpu_stage

            return gpu_stage.assemble(data, layout, order_consumer=order_consumer)
        return assemble_cpu(data, layout)

    def close(self) -> None:
        """Stop the thread pool and let go of the GPU decoders. Idempotent."""
        if self._threads is not None:
            self._threads.shutdown(wait=True, cancel_futures=True)
            self._threads = None
        if self._gpu_release is not None:
            self._gpu_release()  # runs decode.release() once
            self._gpu_release = None


def _row(outs: dict[int, list], j: int) -> tuple:
    """Sample j of a node's outputs; outputs nobody downstream needs stay None."""
    return tuple(outs[k][j] if k in outs else None for k in range(max(outs) + 1))
