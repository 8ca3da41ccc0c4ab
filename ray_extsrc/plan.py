"""The execution plan of a pipeline: which ops run in the Python workers, which in the main stage,
on which device — fixed once, when the workers start (before CUDA, since fork happens there).

`make_plan` is a pure function of the graph and a few pipeline settings; it returns a frozen `Plan`.
The only changes it asks of the graph's ops (a source's batch size, a CPU decoder's reduced DCT
scale) are listed in the plan and made by `Plan.apply_to_ops`, which the pipeline calls.

* the *worker stage* is every op that can run next to a parallel per-sample source: the sources
  themselves and each CPU op fed only by them (random ops included: their draws depend only on
  (seed, op, epoch, sample), so a worker computes the same value the main process would). A whole
  CPU pipeline therefore runs in the workers and only finished samples cross shared memory; a GPU
  op's per-sample host step (``op.worker_prep``: JPEG header, crop box) runs there too;
* the *main stage* is the rest (GPU ops, ops on non-parallel sources), run per batch by the
  pipeline: CPU ops on a thread pool of ``num_threads``, GPU ops batched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import SampleError
from .external_source import is_parallel_sample_source, is_source
from .graph import DataNode, OpNode, SampleContext
from .source import SourceKind, SourceSpec
from .types import BatchInfo, SampleInfo
from .workers.messages import TASK_BATCH, TASK_ITER, TASK_SAMPLES

__all__ = ["Plan", "make_plan", "Evaluator", "WorkerPrep", "WorkerProgram"]


class Evaluator:
    """Evaluates a list of graph nodes for one sample (worker stage, or main-stage CPU ops)."""

    def __init__(self, nodes: Sequence[OpNode], seed: int) -> None:
        self.nodes = list(nodes)
        self.seed = seed

    def run(self, info: SampleInfo, env: dict[int, tuple], epoch_idx: int) -> dict[int, tuple]:
        for node in self.nodes:
            if is_source(node):
                env[node.op_id] = node.op.spec.call_sample(info)
                continue
            inputs = [env[x.source.op_id][x.index] for x in node.inputs]
            args = {k: env[x.source.op_id][x.index] for k, x in node.arg_inputs.items()}
            ctx = SampleContext.of(node, self.seed, epoch_idx, info)
            try:
                out = node.op.run_cpu(inputs, args, ctx)
            except SampleError:
                raise
            except Exception as e:
                e.add_note(f"in fn.{node.op.name} (op #{node.op_id}) for sample idx_in_epoch={info.idx_in_epoch}")
                raise
            env[node.op_id] = out if isinstance(out, tuple) else (out,)
        return env


class WorkerPrep:
    """The per-sample CPU step of a GPU op (``op.worker_prep``: header parsing, crop boxes, ...),
    run in the workers so the GPU op's host side only gathers arrays."""

    device = "cpu"
    num_outputs = 1
    is_random = True

    def __init__(self, op: Any) -> None:
        self.op = op
        self.name = f"{op.name}[prep]"
        self.seed = op.seed

    def run_cpu(self, inputs, arg_inputs, ctx):
        return self.op.worker_prep(inputs, arg_inputs, ctx)




class WorkerProgram:
    """What the pool's workers run (see `workers.worker.WorkerProgram`)."""

    def __init__(self, kind: str, evaluator: Evaluator, exports: Sequence[DataNode], source: SourceSpec | None) -> None:
        self.kind = kind
        self.evaluator = evaluator
        self.exports = [(x.source.op_id, x.index) for x in exports]
        self.source = source

    def run_sample(self, info: SampleInfo) -> tuple[np.ndarray, ...]:
        env = self.evaluator.run(info, {}, info.epoch_idx)
        return tuple(env[op_id][i] for op_id, i in self.exports)

    def run_batch(self, info: BatchInfo) -> list[tuple[np.ndarray, ...]]:
        return self.source.call_batch(info)

    def start_epoch(self, epoch_idx: int) -> None:
        self.source.start_epoch(epoch_idx)

    def next_batch(self, info: BatchInfo) -> list[tuple[np.ndarray, ...]]:
        return self.source.next_batch(info)


@dataclass(frozen=True)
class Plan:
    """See the module docstring. Node lists are in graph order."""

    use_gpu: bool
    device: Mapping[int, str]  # op id -> "cpu" | "gpu" (where it runs)
    cpu_fallback: tuple[str, ...]  # GPU ops that run on the CPU, for the pipeline's warning
    exports: tuple[DataNode, ...]  # worker-stage outputs the main stage (or the outputs) read
    prep_of: Mapping[int, DataNode]  # GPU op id -> its worker-side prep output
    main_nodes: tuple[OpNode, ...]
    main_cpu: bool  # the main stage has CPU ops (a thread pool is needed)
    main_eval: Evaluator  # the main stage's CPU ops
    program: WorkerProgram | None  # what the workers run (None: no parallel source)
    num_samples: int | None  # samples per epoch, when every source knows its length
    has_iterable: bool
    gpu_main: bool  # the main stage has GPU ops
    run_ahead: bool  # the main stage runs ahead in a background thread (exec_async)
    ahead_depth: int  # batches computed ahead at once
    batch_size: int
    downscale: Mapping[int, Any] = field(default_factory=dict)  # CPU decoder op id -> target size or None

    def apply_to_ops(self, nodes: Sequence[OpNode]) -> None:
        """Tell the ops what the plan decided: every source its batch size, CPU random-crop
        decoders whether they may decode at a reduced DCT scale."""
        for n in nodes:
            if is_source(n):
                n.op.spec.batch_size = self.batch_size
            if n.op_id in self.downscale:
                n.op.downscale_target = self.downscale[n.op_id]


def make_plan(
    nodes: Sequence[OpNode], outputs: Sequence[DataNode], *, use_gpu: bool, batch_size: int, seed: int,
    exec_async: bool,
) -> Plan:
    """The plan for a graph (see the module docstring). Raises ValueError for graphs it cannot run."""
    if not outputs:
        raise ValueError("the pipeline has no outputs: return them from the @pipeline_def function")
    device: dict[int, str] = {}
    fallback = []
    for node in nodes:
        dev = node.op.device
        if dev in ("gpu", "mixed") and (not use_gpu or getattr(node.op, "run_gpu", None) is None):
            fallback.append(f"fn.{node.op.name}(device={dev!r})")
            dev = "cpu"
        device[node.op_id] = "cpu" if dev == "cpu" else "gpu"
    parallel_sample = [n for n in nodes if is_parallel_sample_source(n)]
    parallel_batch = [n for n in nodes if is_source(n) and n.op.spec.parallel and n.op.spec.kind is not SourceKind.SAMPLE]
    if parallel_batch and (parallel_sample or len(parallel_batch) > 1):
        raise ValueError(
            "a pipeline may have either per-sample parallel sources, or one batch/iterable "
            "parallel source; split the others into another pipeline or make them parallel=False"
        )
    worker_ids: set[int] = set()
    if parallel_sample:
        for node in nodes:
            deps = [x.source.op_id for x in (*node.inputs, *node.arg_inputs.values())]
            if is_parallel_sample_source(node) or (
                not is_source(node) and device[node.op_id] == "cpu" and all(d in worker_ids for d in deps)
            ):
                worker_ids.add(node.op_id)
    elif parallel_batch:
        worker_ids.add(parallel_batch[0].op_id)
    used_by_main = [
        x for n in nodes if n.op_id not in worker_ids for x in (*n.inputs, *n.arg_inputs.values())
    ] + list(outputs)
    exports: list[DataNode] = []
    for x in used_by_main:
        if x.source.op_id in worker_ids and x not in exports:
            exports.append(x)
    prep_of: dict[int, DataNode] = {}
    worker_nodes = [n for n in nodes if n.op_id in worker_ids]
    if parallel_sample:
        for n in nodes:
            deps = [x.source.op_id for x in (*n.inputs, *n.arg_inputs.values())]
            if (
                n.op_id not in worker_ids and device[n.op_id] == "gpu"
                and hasattr(n.op, "worker_prep") and deps and all(d in worker_ids for d in deps)
            ):
                prep = OpNode(WorkerPrep(n.op), n.inputs, dict(n.arg_inputs), op_id=-1 - n.op_id, rng_key=n.op_id)
                prep.outputs = [DataNode(prep, 0, "cpu")]
                worker_nodes.append(prep)
                exports.append(prep.outputs[0])
                prep_of[n.op_id] = prep.outputs[0]
    main_nodes = tuple(n for n in nodes if n.op_id not in worker_ids)
    if parallel_sample:
        program: WorkerProgram | None = WorkerProgram(TASK_SAMPLES, Evaluator(worker_nodes, seed), exports, None)
    elif parallel_batch:
        spec = parallel_batch[0].op.spec
        kind = TASK_ITER if spec.kind is SourceKind.ITERABLE else TASK_BATCH
        program = WorkerProgram(kind, Evaluator([], seed), exports, spec)
    else:
        program = None
    gpu_main = any(device[n.op_id] == "gpu" for n in main_nodes)
    # In-process sources stay on one thread (batch callables and iterables are stateful); GPU main
    # stages run two batches at once: one batch's decode (a blocking call in its own thread)
    # overlaps the other's gathering and kernels.
    in_process = any(is_source(n) and not n.op.spec.parallel for n in nodes)
    return Plan(
        use_gpu=use_gpu,
        device=device,
        cpu_fallback=tuple(fallback),
        exports=tuple(exports),
        prep_of=prep_of,
        main_nodes=main_nodes,
        main_cpu=any(device[n.op_id] == "cpu" and not is_source(n) for n in main_nodes),
        main_eval=Evaluator([n for n in main_nodes if device[n.op_id] == "cpu" and not is_source(n)], seed),
        program=program,
        num_samples=_known_num_samples([n for n in nodes if is_source(n)]),
        has_iterable=any(is_source(n) and n.op.spec.kind is SourceKind.ITERABLE for n in nodes),
        gpu_main=gpu_main,
        # Main stage ahead in a background thread (DALI's exec_async/exec_pipelined): batch i+1's
        # decode/augment overlaps the consumer's work on batch i.
        run_ahead=exec_async and any(not is_source(n) for n in main_nodes),
        ahead_depth=2 if gpu_main and not in_process else 1,
        batch_size=batch_size,
        downscale=_downscaled_decode(nodes, outputs, device),
    )


def _downscaled_decode(nodes: Sequence[OpNode], outputs: Sequence[DataNode], device: Mapping[int, str]) -> dict:
    """A CPU random-crop decoder whose only consumer resizes to a fixed size may decode at a
    reduced DCT scale (cheaper, and the resize hides it): that size, per decoder (None: full)."""
    consumers: dict[int, list[OpNode]] = {}
    for n in nodes:
        for x in (*n.inputs, *n.arg_inputs.values()):
            consumers.setdefault(x.source.op_id, []).append(n)
    out_ids = {x.source.op_id for x in outputs}
    targets = {}
    for n in nodes:
        if not hasattr(n.op, "downscale_target") or device[n.op_id] != "cpu" or n.op_id in out_ids:
            continue
        users = consumers.get(n.op_id, [])
        ok = len(users) == 1 and device[users[0].op_id] == "cpu"
        targets[n.op_id] = getattr(users[0].op, "fixed_output_size", None) if ok else None
    return targets


def _known_num_samples(sources: Sequence[OpNode]) -> int | None:
    """Samples per epoch, when every source is per-sample and knows its length (``__len__``)."""
    lengths = []
    for n in sources:
        if n.op.spec.kind is not SourceKind.SAMPLE:
            return None
        try:
            lengths.append(len(n.op.spec.source))
        except TypeError:
            return None
    return min(lengths) if lengths else None
