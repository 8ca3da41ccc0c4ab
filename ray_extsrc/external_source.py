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

    def __init__(
        self, spec: SourceSpec, layouts: tuple[str, ...] = (), bytes_per_sample_hint: int | None = None,
        instance_name: str | None = None,
    ) -> None:
        self.spec = spec
        #: DALI's ``name=``: how ``reader_name=`` of the framework iterators finds this source
        #: (``name`` itself is the op's type name, as for every op)
        self.instance_name = instance_name
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
    """DALI's ``fn.external_source``: the data a user's ``source`` produces, as graph nodes.

    Args:
        source: a per-sample callable ``source(sample_info)`` (``batch=False``, or ``parallel=True``
            with ``batch`` left out), a batch callable ``source(batch_info or iteration)``, or a
            stateful source that yields whole batches: an iterable, an iterator (a generator
            object included), or a generator function (called as ``source()``). Raising
            StopIteration ends the epoch. See `source` for the rules of each kind.
        num_outputs: the width of each sample (a tuple of that many arrays); None: one array.
        batch: whether ``source`` returns whole batches; an iterable/generator always does.
        parallel: run the source in Python worker processes (``py_num_workers`` of the pipeline;
            an iterable/generator gets one dedicated worker, as it is stateful).
        cycle: iterable/generator sources only (DALI's values; a callable given any ``cycle``,
            ``False`` included, is refused):

            * ``None`` (default), ``False`` or ``"no"`` — one pass over the data: at its end the
              epoch ends, and so does every later one (after ``reset()``, ``run()`` raises
              StopIteration again; the iterator is not restarted). Accepts any iterable, iterator
              or generator object.
            * ``True`` or ``"quiet"`` — wrap around: at the end of the data a fresh ``iter(source)``
              (or ``source()``) continues at once, and the epoch never ends from this source
              (another source's StopIteration, or ``reset()``, ends it).
            * ``"raise"`` — StopIteration at the end of the data; each new epoch starts a fresh
              ``iter(source)`` (or ``source()``).

            ``True``/``"quiet"``/``"raise"`` need a source that can start over: an iterable whose
            ``iter()`` returns a fresh iterator each time, or a generator function. An iterator or
            a generator object is refused (TypeError); pass the iterable or the generator function.
            With ``None`` and ``"quiet"`` the iterator keeps its place across ``reset()``: an epoch
            that ended early continues where it stopped (the same with ``parallel=True`` and
            ``False``). Semantics in full: `source`, NOTE [cycle].
        dtype, layout: per output (or one for all); outputs are checked against ``dtype``.
        bytes_per_sample_hint: shared memory to reserve per sample (parallel sources); default the
            pipeline's. Slots grow when a sample is larger.

    ``name`` names the source for ``reader_name=`` of the framework iterators
    (`ray_extsrc.plugin.pytorch`): the source's ``__len__`` is then the epoch.
    ``prefetch_queue_depth`` and ``no_copy`` are accepted for DALI compatibility and ignored (the
    pipeline's ``prefetch_queue_depth`` applies).
    """
    if device != "cpu":
        raise ValueError(f"external_source: only device='cpu' sources are supported; got {device!r}")
    spec = describe_source(
        source, num_outputs=num_outputs, batch=batch, batch_info=batch_info, parallel=parallel, dtype=dtype,
        cycle=cycle,
    )
    if bytes_per_sample_hint is not None and (
        not isinstance(bytes_per_sample_hint, int) or isinstance(bytes_per_sample_hint, bool) or bytes_per_sample_hint < 1
    ):
        raise ValueError(f"external_source: bytes_per_sample_hint must be a positive int; got {bytes_per_sample_hint!r}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"external_source: name must be a str; got {type(name).__name__}")
    op = ExternalSourceOp(spec, _layouts(layout, spec.width), bytes_per_sample_hint, instance_name=name)
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
