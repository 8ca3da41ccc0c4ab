"""`GpuStage`: running a pipeline's GPU ops — the glue between `main_stage.MainStage` and the ops' ``run_gpu``.

`GpuStage.run_op` evaluates one GPU (or "mixed") op node for a whole batch, `assemble` turns its
output into a `TensorListGPU`. Imported lazily by `main_stage` (only where a GPU op runs), so CuPy
loads only here. (It lived in ``fn/_gpu_exec.py``; it is the executor's, not an op.)

Streams. Each pipeline owns one non-blocking CUDA stream (made on first use, on the process's
current device: the pipeline's ``device_id`` is the visible device index). Every GPU op of the
pipeline enqueues on it and nothing here waits for it: the host returns as soon as the work is
queued, so the next batch's host work (gathering samples, Huffman decoding) overlaps this batch's
kernels. `assemble` makes the consumer's streams (CuPy's current stream and the legacy default
stream, which torch uses unless told otherwise) wait on an event recorded after the last kernel,
so any GPU consumer, and ``as_cpu()``, see finished data without the loader blocking.

Random decisions. The `SampleContext` of sample j is built exactly as `plan.Evaluator` builds
it (seed = op seed or pipeline seed, op key = node id, epoch, idx from the batch's SampleInfo), so a
GPU op draws the same crop boxes as its CPU twin.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..fn._gpu.ptrbatch import PREP_ARG, PtrBatch
from ..graph import DataNode, OpNode, SampleContexts
from ..host_batch import PackedSamples, Rows
from ..tensors import TensorListGPU
from ..types import SampleInfo

__all__ = ["GpuStage", "assemble", "consumer_fence"]

_local = threading.local()  # the stream of the pipeline this thread ran last (for `assemble`)


class GpuStage:
    """One pipeline's GPU ops: its stream (see the module docstring) and `run_op`.

    ``prep_of`` maps a GPU op's id to the output of its per-sample host step run in the workers
    (`plan.Plan.prep_of`).
    """

    def __init__(self, device_id: int | None, seed: int, prep_of: Mapping[int, DataNode]) -> None:
        self._device_id = device_id
        self._seed = seed
        self._prep_of = prep_of
        self._stream: Any = None

    @property
    def device_index(self) -> int:
        """The CUDA device this stage runs on (its ``device_id``; 0 where that is not a visible device)."""
        import cupy

        device_id = self._device_id if isinstance(self._device_id, int) else 0
        return device_id if device_id < cupy.cuda.runtime.getDeviceCount() else 0

    @property
    def stream(self) -> Any:
        """The pipeline's own non-blocking stream (created on first use)."""
        if self._stream is None:
            from ..fn._gpu.streams import loader_stream  # kept alive forever: see its docstring

            self._stream = loader_stream(self.device_index)
        return self._stream

    def _contexts(self, node: OpNode, infos: Sequence[SampleInfo]) -> SampleContexts:
        # the epoch comes from the batch's SampleInfo: a consumer-side GPU stage runs batches made
        # by a loader actor, whatever epoch its own (never run) pipeline object is at; each context
        # is made only if the op asks for it (`graph.SampleContexts`)
        return SampleContexts(node, self._seed, infos)

    def wait_fence(self, fence: Any) -> None:
        """Make the pipeline's stream wait for ``fence`` (see `pipeline.Pipeline.consumer_fence`)."""
        stream = self.stream
        for ev in fence:
            stream.wait_event(ev)

    def run_op(self, node: OpNode, infos: Sequence[SampleInfo], env: dict) -> dict[int, Any]:
        """Evaluate ``node`` for the batch; return ``{output index: per-sample list or dense batch}``."""
        op = node.op
        stream = self.stream
        _local.stream = stream
        with stream:
            if op.device == "mixed":  # decoders: encoded bytes stay on the host (packed samples as
                # they are: the decoder reads their buffer's offsets, `host_batch.PackedSamples`)
                inputs = [_as_list(env[x.source.op_id][x.index]) for x in node.inputs]
            else:
                inputs = [_to_gpu(env[x.source.op_id][x.index], stream) for x in node.inputs]
            args = {k: _host_values(env[x.source.op_id][x.index]) for k, x in node.arg_inputs.items()}
            prep = self._prep_of.get(node.op_id)
            if prep is not None:  # the op's per-sample host step, done in the workers
                args[PREP_ARG] = env[prep.source.op_id][prep.index]
            if not getattr(op, "accepts_ptr_batch", False):
                inputs = [x.to_list() if isinstance(x, PtrBatch) else x for x in inputs]
            ctxs = self._contexts(node, infos)
            try:
                out = op.run_gpu(inputs, args, ctxs, stream)
            except Exception as e:
                if not any(n.startswith("in fn.") for n in getattr(e, "__notes__", [])):
                    e.add_note(f"in fn.{op.name} (op #{node.op_id}, device={op.device!r}) for a batch of "
                               f"{len(infos)} samples starting at idx_in_epoch="
                               f"{infos[0].idx_in_epoch if infos else '?'}")
                raise
        outs = out if isinstance(out, tuple) else (out,)
        return {k: v for k, v in enumerate(outs)}


def consumer_fence() -> Any:
    """An event after all work the consumer queued so far on the streams it uses (the legacy
    default stream, which torch uses unless told otherwise, and CuPy's current stream)."""
    import cupy

    ev = cupy.cuda.Stream.null.record()
    cur = cupy.cuda.get_current_stream()
    return (ev, cur.record()) if cur.ptr != 0 else (ev,)


def _to_gpu(data: Any, stream: Any) -> Any:
    """A node's output for a GPU op: CuPy data stays, host samples are copied to the device."""
    import cupy

    if isinstance(data, PtrBatch):
        return data
    if isinstance(data, cupy.ndarray):
        return data  # a dense batch from an earlier GPU op
    out = []
    for a in data:
        if isinstance(a, cupy.ndarray):
            out.append(a)
        else:
            out.append(cupy.asarray(np.ascontiguousarray(a)))  # under `with stream`: on our stream
    return out


def _as_list(data: Any) -> list:
    return data if isinstance(data, PackedSamples) else list(data)


def _host_values(data: Any) -> Sequence:
    """Per-sample argument values as host scalars/arrays (they come from CPU random ops); a
    `Rows` column (one host array) as it is, without a per-sample list."""
    if isinstance(data, Rows):
        return data
    import cupy

    if isinstance(data, cupy.ndarray):
        return list(cupy.asnumpy(data))
    return [cupy.asnumpy(a) if isinstance(a, cupy.ndarray) else a for a in data]


def assemble(data: Any, layout: str = "", *, order_consumer: bool = True) -> TensorListGPU:
    """A GPU op's output as the pipeline's batch output (dense when the op made one array).

    Orders the consumer after this thread's pipeline stream without blocking the host (see the
    module docstring). With ``order_consumer=False`` (a GPU stage in a background thread of the
    consumer's own process) nothing is made to wait here — the legacy default stream is shared by
    every thread, and waiting on it now would hold back the training step queued meanwhile — and
    the consumer waits on the output's ``ready_event`` when it takes the batch.
    """
    import cupy

    stream = getattr(_local, "stream", None)
    ev = None
    if stream is not None:
        ev = stream.record()
        if order_consumer:
            cur = cupy.cuda.get_current_stream()
            cur.wait_event(ev)
            if cur.ptr != 0:
                cupy.cuda.Stream.null.wait_event(ev)
        from ..fn._gpu import decode

        decode.batch_enqueued(ev)  # the batch's decoded images may go once the GPU passes ev
    if isinstance(data, PtrBatch):
        data = data.to_list()
    elif not isinstance(data, cupy.ndarray):
        data = list(data)
    out = TensorListGPU(data, layout)
    out.ready_event = ev  # recorded after the batch's last kernel (None if no kernel ran here)
    return out
