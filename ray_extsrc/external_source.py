"""``fn.external_source`` — the op that brings a user's source into the graph — and its graph marker.

It lives next to `source` (which recognises and validates the source) and below `pipeline` and
`fn`, which both import it: the graph op is a marker with the source's spec and no computation.
"""

from __future__ import annotations

from typing import Any

from .graph import DataNode, OpNode, current_graph
from .source import SourceKind, SourceSpec, describe_source

__all__ = ["ExternalSourceOp", "external_source", "is_source", "is_parallel_sample_source"]


class ExternalSourceOp:
    """Graph marker for ``fn.external_source``: no computation of its own, just the source."""

    name = "external_source"
    device = "cpu"
    is_random = False

    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        self.num_outputs = spec.width


def external_source(
    source: Any = None,
    num_outputs: int | None = None,
    *,
    batch: bool | None = None,
    batch_info: bool = False,
    parallel: bool = False,
    dtype: Any = None,
    device: str = "cpu",
    layout: Any = None,
    cycle: Any = None,
    name: str | None = None,
    prefetch_queue_depth: int | None = None,
    no_copy: bool | None = None,
) -> DataNode | tuple[DataNode, ...]:
    """DALI's ``fn.external_source``: the data a user's ``source`` produces, as graph nodes."""
    if device != "cpu":
        raise ValueError(f"external_source: only device='cpu' sources are supported; got {device!r}")
    if cycle not in (None, False):
        raise ValueError(f"external_source: cycle={cycle!r} is not supported; end the epoch with StopIteration")
    spec = describe_source(
        source, num_outputs=num_outputs, batch=batch, batch_info=batch_info, parallel=parallel, dtype=dtype
    )
    node = current_graph().add(ExternalSourceOp(spec), (), {})
    node.outputs = [DataNode(node, i, "cpu") for i in range(spec.width)]
    return node.outputs[0] if num_outputs is None else tuple(node.outputs)


def is_parallel_sample_source(node: OpNode) -> bool:
    return isinstance(node.op, ExternalSourceOp) and node.op.spec.parallel and node.op.spec.kind is SourceKind.SAMPLE


def is_source(node: OpNode) -> bool:
    return isinstance(node.op, ExternalSourceOp)
