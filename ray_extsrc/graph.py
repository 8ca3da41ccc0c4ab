"""The op graph a pipeline definition builds: data nodes, operators, and the per-sample context.

A ``@pipeline_def`` function runs once, inside the pipeline being constructed; every ``fn.*`` call
it makes appends an `OpNode` to that pipeline's graph (through `add_op`) and returns `DataNode`
handles to the op's outputs. The executor (`pipeline.py`) later evaluates the graph per batch.

Contract for an op implementation (a subclass of `Operator`, see ``fn/``):

* ``__init__(self, device, **args)`` validates its constant arguments at once and raises
  ``ValueError``/``TypeError`` quoting the bad value.
* ``run_cpu(inputs, arg_inputs, ctx)`` computes one sample on the CPU with NumPy:
  ``inputs`` are the sample's positional inputs (NumPy arrays), ``arg_inputs`` the per-sample values
  of arguments given as data nodes (e.g. ``contrast=fn.random.uniform(...)``), ``ctx`` a
  `SampleContext`. Returns one array, or a tuple for ops with several outputs.
* ``run_gpu(inputs, arg_inputs, ctxs, stream)`` (optional) computes a whole batch on the GPU:
  ``inputs`` is a list (one per positional input) of per-sample lists, likewise ``arg_inputs``;
  ``ctxs`` the samples' contexts. Ops without it run their CPU implementation.

Randomness must come only from ``ctx.rng()``, so decisions depend on (seed, op, epoch, sample)
alone, never on which worker or device runs the op.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .sample_rng import sample_rng

__all__ = ["DataNode", "OpNode", "Operator", "SampleContext", "SampleContexts", "Graph", "add_op", "current_graph", "graph_scope"]

DEVICES = ("cpu", "gpu", "mixed")


@dataclass(frozen=True, slots=True)
class SampleContext:
    """Where one sample stands, and the keys of its random stream."""

    seed: int
    op_key: int
    epoch_idx: int
    idx_in_epoch: int
    idx_in_batch: int
    iteration: int

    def rng(self) -> np.random.Generator:
        return sample_rng(self.seed, self.op_key, self.epoch_idx, self.idx_in_epoch)

    @classmethod
    def of(cls, node: OpNode, pipeline_seed: int, epoch_idx: int, info: Any) -> SampleContext:
        """The context of sample ``info`` (a SampleInfo) for ``node``: the op's own seed if it has
        one, and its random-stream key (``rng_key`` for a worker-side prep step of a GPU op). Every
        device builds contexts here, so CPU and GPU draw the same crop boxes and flips."""
        return cls(
            seed=node.op.seed if node.op.seed is not None else pipeline_seed,
            op_key=node.op_id if node.rng_key is None else node.rng_key,
            epoch_idx=epoch_idx,
            idx_in_epoch=info.idx_in_epoch,
            idx_in_batch=info.idx_in_batch,
            iteration=info.iteration,
        )


class SampleContexts(Sequence):
    """The `SampleContext` of each sample of a batch for one op, each made when first asked for.

    A GPU op gets one for its batch (``ctxs`` of ``run_gpu``); the vectorised ops and the
    decoders' fast path never look at most of them, and making 256 contexts per op per batch in
    a consumer-side GPU stage costs GIL time that the training step in the same process waits
    for. Indexing (and iteration) gives the same contexts `SampleContext.of` would.
    """

    def __init__(self, node: OpNode, pipeline_seed: int, infos: Sequence[Any]) -> None:
        self._node, self._seed, self._infos = node, pipeline_seed, infos
        self._made: dict[int, SampleContext] = {}

    def __len__(self) -> int:
        return len(self._infos)

    def __getitem__(self, j: Any) -> Any:
        if isinstance(j, slice):
            return [self[k] for k in range(*j.indices(len(self)))]
        if j < 0:
            j += len(self)
        ctx = self._made.get(j)
        if ctx is None:
            info = self._infos[j]  # IndexError past the end, as a list would
            ctx = self._made[j] = SampleContext.of(self._node, self._seed, info.epoch_idx, info)
        return ctx


class Operator:
    """Base of every op. Subclasses set ``name`` and implement ``run_cpu`` (and maybe ``run_gpu``)."""

    name: ClassVar[str] = "operator"
    num_outputs: ClassVar[int] = 1
    #: Ops that draw random numbers; their op key (and a user ``seed=``) matter.
    is_random: ClassVar[bool] = False
    #: Devices this op accepts; "mixed" only for decoders (CPU input, GPU output).
    devices: ClassVar[tuple[str, ...]] = ("cpu", "gpu")

    def __init__(self, device: str = "cpu", seed: int | None = None) -> None:
        if device not in self.devices:
            raise ValueError(
                f"fn.{self.name}: device must be one of {self.devices}; got {device!r}"
            )
        self.device = device
        self.seed = seed

    def run_cpu(
        self, inputs: Sequence[np.ndarray], arg_inputs: Mapping[str, np.ndarray], ctx: SampleContext
    ) -> np.ndarray | tuple[np.ndarray, ...]:
        raise NotImplementedError

    # Optional: def run_gpu(self, inputs, arg_inputs, ctxs, stream) -> list | tuple[list, ...]
    run_gpu = None

    def __repr__(self) -> str:
        return f"fn.{self.name}(device={self.device!r})"


@dataclass(eq=False)
class OpNode:
    op: Any  # Operator, or the external-source marker from pipeline.py
    inputs: tuple[DataNode, ...]
    arg_inputs: dict[str, DataNode]
    op_id: int
    outputs: list[DataNode] = field(default_factory=list)
    #: key of the op's random streams when it differs from op_id (a worker-side prep step of a
    #: GPU op draws exactly what the op itself would)
    rng_key: int | None = None

    @property
    def name(self) -> str:
        return self.op.name


@dataclass(eq=False)
class DataNode:
    """A handle to one output of an op in a pipeline graph (DALI's ``DataNode``)."""

    source: OpNode
    index: int
    device: str  # "cpu" or "gpu": where the data lives

    @property
    def name(self) -> str:
        return f"{self.source.name}[{self.index}]#{self.source.op_id}"

    def __repr__(self) -> str:
        return f"DataNode({self.name}, device={self.device!r})"

    # DALI allows arithmetic on data nodes; we keep the graph small and refuse it clearly.
    def __bool__(self) -> bool:
        raise TypeError(
            "a DataNode has no truth value while the pipeline is being defined; "
            "conditionals on data are not supported by ray_extsrc"
        )


class Graph:
    """The ops of one pipeline, in definition order (which is a topological order)."""

    def __init__(self) -> None:
        self.nodes: list[OpNode] = []

    def add(self, op: Any, inputs: Sequence[DataNode], arg_inputs: Mapping[str, DataNode]) -> OpNode:
        node = OpNode(op=op, inputs=tuple(inputs), arg_inputs=dict(arg_inputs), op_id=len(self.nodes))
        self.nodes.append(node)
        return node


_local = threading.local()


def current_graph() -> Graph:
    graph = getattr(_local, "graph", None)
    if graph is None:
        raise RuntimeError(
            "fn.* ops can only be called inside a pipeline definition "
            "(a function decorated with @pipeline_def, or inside `with pipe:`)"
        )
    return graph


class graph_scope:
    """Makes ``graph`` the one ``fn.*`` calls add to, for the duration of a ``with`` block."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.previous: Graph | None = None

    def __enter__(self) -> Graph:
        self.previous = getattr(_local, "graph", None)
        _local.graph = self.graph
        return self.graph

    def __exit__(self, *exc: object) -> None:
        _local.graph = self.previous


def add_op(op: Operator, *inputs: Any, **arg_values: Any) -> DataNode | tuple[DataNode, ...]:
    """Append ``op`` to the current graph; return its output node(s).

    ``inputs`` must be DataNodes. Keyword values that are DataNodes become per-sample argument
    inputs (e.g. ``contrast=fn.random.uniform(...)``); other keyword values must already have been
    consumed by ``op.__init__`` and are rejected here.
    """
    graph = current_graph()
    for i, x in enumerate(inputs):
        if not isinstance(x, DataNode):
            raise TypeError(
                f"fn.{op.name}: positional input {i} must be the output of another op "
                f"(a DataNode); got {type(x).__name__}"
            )
    arg_inputs = {}
    for k, v in arg_values.items():
        if not isinstance(v, DataNode):
            raise TypeError(f"fn.{op.name}: argument {k!r} is not a DataNode; pass constants to the op")
        arg_inputs[k] = v
    node = graph.add(op, inputs, arg_inputs)
    out_device = "cpu" if op.device == "cpu" else "gpu"
    node.outputs = [DataNode(node, i, out_device) for i in range(op.num_outputs)]
    if op.device == "cpu":
        for x in (*inputs, *arg_inputs.values()):
            if x.device == "gpu":
                raise ValueError(
                    f"fn.{op.name}(device='cpu') got GPU data from {x.name}; "
                    "data can move CPU -> GPU but not back inside a pipeline"
                )
    return node.outputs[0] if op.num_outputs == 1 else tuple(node.outputs)
