"""``fn.external_source`` — the op that brings a user's source into the graph — and its graph marker.

It lives next to `source` (which recognises and validates the source) and below `pipeline` and
`fn`, which both import it: the graph op is a marker with the source's spec and no computation.
"""

from __future__ import annotations

from typing import Any

from .graph import DataNode, OpNode, current_graph
from .source import SourceKind, SourceSpec, describe_source

__all__ = ["ExternalSourceOp", "external_source", "is_source", "is_parallel_sample_source", "output_layout"]


class ExternalSourceOp:
    """Graph marker for ``fn.external_source``: no computation of its own, just the source."""

    name = "external_source"
    device = "cpu"
    is_random = False

    def __init__(self, spec: SourceSpec, layouts: tuple[str, ...] = (), bytes_per_sample_hint: int | None = None) -> None:
        self.spec = spec
        self.bytes_per_sample_hint = bytes_per_sample_hint  # None: the pipeline's
        self.num_outputs = spec.width
        self.layouts = layouts or ("",) * spec.width  # per output, DALI's ``layout`` ("HWC", ...)


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
    bytes_per_sample_hint: int | None = None,
) -> DataNode | tuple[DataNode, ...]:
    """DALI's ``fn.external_source``: the data a user's ``source`` produces, as graph nodes."""
    if device != "cpu":
        raise ValueError(f"external_source: only device='cpu' sources are supported; got {device!r}")
    if cycle not in (None, False):
        raise ValueError(f"external_source: cycle={cycle!r} is not supported; end the epoch with StopIteration")
    spec = describe_source(
        source, num_outputs=num_outputs, batch=batch, batch_info=batch_info, parallel=parallel, dtype=dtype
    )
    if bytes_per_sample_hint is not None and (
        not isinstance(bytes_per_sample_hint, int) or isinstance(bytes_per_sample_hint, bool) or bytes_per_sample_hint < 1
    ):
        raise ValueError(f"external_source: bytes_per_sample_hint must be a positive int; got {bytes_per_sample_hint!r}")
    op = ExternalSourceOp(spec, _layouts(layout, spec.width), bytes_per_sample_hint)
    node = current_graph().add(op, (), {})
    node.outputs = [DataNode(node, i, "cpu") for i in range(spec.width)]
    return node.outputs[0] if num_outputs is None else tuple(node.outputs)


def _layouts(layout: Any, width: int) -> tuple[str, ...]:
    """DALI's ``layout``: one string for every output, or one per output."""
    if layout is None:
        return ("",) * width
    if isinstance(layout, str):
        return (layout,) * width
    layouts = tuple(layout)
    if len(layouts) != width or not all(isinstance(x, str) for x in layouts):
        raise ValueError(f"external_source: layout must be a str or {width} of them (one per output); got {layout!r}")
    return layouts


def output_layout(x: DataNode) -> str:
    """The layout of a node's output, as DALI names it: decoders give "HWC", an op with an
    ``output_layout`` gives that, a source the ``layout`` it was given, other ops their input's."""
    op = x.source.op
    if isinstance(op, ExternalSourceOp):
        return op.layouts[x.index]
    fixed = getattr(op, "output_layout", None)
    if isinstance(fixed, str):
        return fixed
    if op.name.startswith("decoders."):
        return "HWC"
    return output_layout(x.source.inputs[0]) if x.source.inputs else ""


def is_parallel_sample_source(node: OpNode) -> bool:
    return isinstance(node.op, ExternalSourceOp) and node.op.spec.parallel and node.op.spec.kind is SourceKind.SAMPLE


def is_source(node: OpNode) -> bool:
    return isinstance(node.op, ExternalSourceOp)
