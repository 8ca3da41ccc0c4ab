"""Whole-tensor ops: ``fn.cast`` (element type) and ``fn.transpose`` (axis order and layout), with
DALI's names and semantics.

``fn.cast`` converts like DALI's ``ConvertSat``: floats to integers are rounded to nearest and
clamped to the target range (halves to even, as in `_args.saturate`), integers are clamped,
anything to ``bool`` is ``value != 0``.

``fn.transpose``: output dimension ``i`` is input dimension ``perm[i]`` (``np.transpose``). The
output layout is the input layout permuted the same way (``transpose_layout=True``, the default),
the input layout unchanged (``transpose_layout=False``), or ``output_layout`` when given; it is
fixed when the graph is built, from the layout the input node declares.

Both have GPU twins (``run_gpu``, CuPy) with results equal to the CPU's: cast runs the same
`saturate_cast` on device arrays, transpose one contiguous copy of the permuted view.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..external_source import output_layout as _node_layout
from ..graph import DataNode, Operator, SampleContext
from . import _args

__all__ = ["cast", "transpose", "Cast", "Transpose", "saturate_cast"]

_CAST_DTYPES = tuple(
    np.dtype(t) for t in (
        np.bool_, np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32,
        np.int64, np.float16, np.float32, np.float64,
    )
)


def saturate_cast(x: Any, dt: np.dtype, xp: Any = np) -> Any:
    """``x`` as ``dt`` the way DALI's ``ConvertSat`` converts (module docstring); ``xp`` is NumPy
    or CuPy (the GPU path runs this same function on device arrays)."""
    if not hasattr(x, "dtype"):
        x = xp.asarray(x)
    dt = np.dtype(dt)
    if dt.kind == "b":
        return x != 0
    if x.dtype.kind == "b":
        return x.astype(dt)
    if dt.kind == "f":
        big = float(np.finfo(dt).max)
        src_max = float(np.finfo(x.dtype).max if x.dtype.kind == "f" else np.iinfo(x.dtype).max)
        if src_max > big:  # saturate (float16 from int32, float32 from float64, ...), never inf
            return xp.clip(x.astype(np.float64), -big, big).astype(dt)
        return x.astype(dt)
    info = np.iinfo(dt)
    if x.dtype.kind in "iu":
        src = np.iinfo(x.dtype)
        if src.min >= info.min and src.max <= info.max:
            return x.astype(dt)  # widening: exact
        # clip in the source type: both bounds are representable there
        lo, hi = max(info.min, src.min), min(info.max, src.max)
        return xp.clip(x, x.dtype.type(lo), x.dtype.type(hi)).astype(dt)
    r = xp.nan_to_num(xp.rint(x.astype(np.float64)), nan=0.0)
    too_big = r >= float(info.max)  # float64 rounds 2**63 - 1 (2**64 - 1) up: set those exactly
    top = float(info.max) if float(info.max) <= info.max else np.nextafter(float(info.max), 0.0)
    out = xp.clip(r, float(info.min), top).astype(dt)
    return xp.where(too_big, xp.asarray(np.array(info.max, dt)), out)  # exact: no float detour


class Cast(Operator):
    """``fn.cast``: convert to ``dtype`` with rounding and saturation."""

    name = "cast"

    def __init__(self, device: str = "cpu", seed: int | None = None, *, dtype: Any = None) -> None:
        super().__init__(device, seed)
        if dtype is None:
            raise TypeError(f"fn.{self.name}: dtype is required (e.g. types.FLOAT)")
        self.dtype = _args.dtype(self.name, "dtype", dtype, _CAST_DTYPES)

    def run_cpu(
        self, inputs: Sequence[np.ndarray], arg_inputs: Mapping[str, np.ndarray], ctx: SampleContext
    ) -> np.ndarray:
        x = self.check_input(np.asarray(inputs[0]))
        return np.ascontiguousarray(saturate_cast(x, self.dtype))

    def check_input(self, x: Any) -> Any:
        """Refuse a source type ConvertSat does not take (NumPy or CuPy: reads ``dtype``)."""
        if x.dtype not in _CAST_DTYPES:
            raise TypeError(f"fn.{self.name}: cannot cast from {x.dtype}")
        return x

    #: the conversion for NumPy or CuPy arrays (``xp=``); the GPU path calls it on device arrays
    convert = staticmethod(saturate_cast)

    def run_gpu(
        self, inputs: Sequence[Any], arg_inputs: Mapping[str, Any], ctxs: Sequence[SampleContext], stream: Any
    ) -> Any:
        """One batch on the GPU: `saturate_cast` with CuPy, on the dense batch at once (equal
        results to the CPU: the same IEEE conversions), see `_gpu.ops.cast`."""
        from ._gpu import ops

        return ops.cast(self, inputs, arg_inputs, ctxs, stream)


class Transpose(Operator):
    """``fn.transpose``: reorder dimensions, ``out.shape[i] = in.shape[perm[i]]``."""

    name = "transpose"

    def __init__(
        self, device: str = "cpu", seed: int | None = None, *, perm: Any = None,
        transpose_layout: bool = True, output_layout: str | None = None,
    ) -> None:
        super().__init__(device, seed)
        if perm is None:
            raise TypeError(f"fn.{self.name}: perm is required (e.g. perm=[2, 0, 1] for HWC -> CHW)")
        p = [perm] if np.isscalar(perm) else list(perm)
        ok = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in p)
        if not ok or sorted(int(v) for v in p) != list(range(len(p))):
            raise ValueError(
                f"fn.{self.name}: perm must be a permutation of 0..ndim-1; got {perm!r}"
            )
        self.perm = tuple(int(v) for v in p)
        self.transpose_layout = _args.boolean(self.name, "transpose_layout", transpose_layout)
        if output_layout is not None and not isinstance(output_layout, str):
            raise TypeError(f"fn.{self.name}: output_layout must be a string; got {output_layout!r}")
        if output_layout and len(output_layout) != len(self.perm):
            raise ValueError(
                f"fn.{self.name}: output_layout {output_layout!r} has {len(output_layout)} axes but "
                f"perm has {len(self.perm)}"
            )
        self.requested_layout = output_layout or None
        #: the output's layout (read by `external_source.output_layout`); set by `resolve_layout`
        self.output_layout = output_layout or ""

    def resolve_layout(self, input_layout: str) -> str:
        """The output layout for an input of ``input_layout`` (DALI's rules, module docstring)."""
        if self.requested_layout:
            return self.requested_layout
        if not self.transpose_layout:
            return input_layout
        if len(input_layout) != len(self.perm):
            return ""  # unknown (or mismatched) input layout: DALI leaves the output's empty
        return "".join(input_layout[p] for p in self.perm)

    def run_cpu(
        self, inputs: Sequence[np.ndarray], arg_inputs: Mapping[str, np.ndarray], ctx: SampleContext
    ) -> np.ndarray:
        x = self.check_input(np.asarray(inputs[0]))
        return np.ascontiguousarray(np.transpose(x, self.perm))

    def check_input(self, x: Any) -> Any:
        """Refuse a sample whose rank is not perm's (NumPy or CuPy: reads ``ndim``/``shape``)."""
        if x.ndim != len(self.perm):
            raise ValueError(
                f"fn.{self.name}: perm {list(self.perm)} has {len(self.perm)} axes but the sample "
                f"has {x.ndim} (shape {x.shape})"
            )
        return x

    def run_gpu(
        self, inputs: Sequence[Any], arg_inputs: Mapping[str, Any], ctxs: Sequence[SampleContext], stream: Any
    ) -> Any:
        """One batch on the GPU: one contiguous copy of the permuted view (of the whole dense
        batch at once), see `_gpu.ops.transpose`."""
        from ._gpu import ops

        return ops.transpose(self, inputs, arg_inputs, ctxs, stream)


def cast(
    data: Any, *, dtype: Any = None, device: str | None = None, seed: int | None = None,
    **unsupported: Any,
) -> Any:
    """Convert to ``dtype`` with rounding and saturation (DALI's ``fn.cast``)."""
    return _args.build(Cast, (data,), device, seed, unsupported, (), dict(dtype=dtype))


def transpose(
    data: Any, *, perm: Any = None, transpose_layout: bool = True, output_layout: str | None = None,
    device: str | None = None, seed: int | None = None, **unsupported: Any,
) -> Any:
    """Reorder the dimensions by ``perm`` (DALI's ``fn.transpose``); the layout follows."""
    args = dict(perm=perm, transpose_layout=transpose_layout, output_layout=output_layout)
    out = _args.build(Transpose, (data,), device, seed, unsupported, (), args)
    op = out.source.op
    op.output_layout = op.resolve_layout(_node_layout(data) if isinstance(data, DataNode) else "")
    return out
