"""``fn.normalize``: ``out = scale * (in - mean) / stddev + shift``, per sample, with DALI's
names, defaults and formulas (its ``normalize.h`` / ``normalize_utils.h``).

* ``mean``/``stddev`` not given are computed from the sample over the reduced axes (``axes``,
  ``axis_names``, else every axis; with a per-sample ``mean``/``stddev`` tensor and no axes, the
  axes where that tensor has extent 1). Given ones are scalars, or per-sample tensors (DataNodes)
  with extent 1 in the reduced axes and the input's extent elsewhere.
* The computed variance is ``sum((x - mean)**2) / (N - ddof)``; ``epsilon`` is added to the
  variance (also to a given ``stddev`` squared). Without ``epsilon`` a zero standard deviation
  maps to 0 (the output is ``shift`` there) instead of dividing by zero, and ``N <= ddof`` gives
  ``shift`` everywhere, as in DALI.
* Integer output types are rounded and clamped.

Both devices run `Normalize.normalize_batch` (NumPy or CuPy, float64): the GPU reduces in another
order, so its float32 results may differ from the CPU's in the last bit.

Only per-sample normalization: ``batch=True`` (statistics across the whole batch) needs the batch
at once, which a per-sample op does not see, and is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .. import types
from ..external_source import output_layout as _node_layout
from ..graph import DataNode, Operator, SampleContext
from . import _args
from ._args import PER_SAMPLE
from ._warp import saturate

__all__ = ["normalize", "Normalize"]

_DTYPES = tuple(
    np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.float32)
)


class Normalize(Operator):
    """``fn.normalize`` for one sample; see the module docstring."""

    name = "normalize"

    def __init__(
        self, device: str = "cpu", seed: int | None = None, *, mean: Any = None, stddev: Any = None,
        axes: Any = None, axis_names: str | None = None, batch: bool = False, scale: Any = 1.0,
        shift: Any = 0.0, epsilon: Any = 0.0, ddof: int = 0, dtype: Any = types.FLOAT,
    ) -> None:
        super().__init__(device, seed)
        if _args.boolean(self.name, "batch", batch):
            raise ValueError(
                f"fn.{self.name}: batch=True (statistics across the batch) is not supported by "
                "ray_extsrc: its ops run per sample; use batch=False"
            )
        self.mean = self._param("mean", mean)
        self.stddev = self._param("stddev", stddev)
        if isinstance(self.stddev, float) and self.stddev == 0 and not epsilon:
            raise ValueError(f"fn.{self.name}: stddev must not be 0 unless epsilon > 0; got {stddev!r}")
        if axes is not None and axis_names is not None:
            raise ValueError(
                f"fn.{self.name}: axes and axis_names are mutually exclusive; got axes={axes!r}, "
                f"axis_names={axis_names!r}"
            )
        both_scalar = isinstance(self.mean, float) and isinstance(self.stddev, float)
        if both_scalar and (axes is not None or axis_names is not None):
            raise ValueError(
                f"fn.{self.name}: axes/axis_names must not be given when mean and stddev are both "
                f"scalars; got axes={axes!r}, axis_names={axis_names!r}"
            )
        self.axes: tuple[int, ...] | None = None
        if axes is not None:
            dims = [axes] if np.isscalar(axes) else list(axes)
            if not dims or not all(isinstance(a, (int, np.integer)) and not isinstance(a, bool) and a >= 0 for a in dims):
                raise ValueError(f"fn.{self.name}: axes must be one or more axis indices >= 0; got {axes!r}")
            if len(set(dims)) != len(dims):
                raise ValueError(f"fn.{self.name}: axes must not repeat an axis; got {axes!r}")
            self.axes = tuple(sorted(int(a) for a in dims))
        if axis_names is not None and (not isinstance(axis_names, str) or not axis_names):
            raise ValueError(f"fn.{self.name}: axis_names must be a non-empty layout string; got {axis_names!r}")
        self.axis_names = axis_names
        self.scale = _args.number(self.name, "scale", scale)
        self.shift = _args.number(self.name, "shift", shift)
        self.epsilon = _args.number(self.name, "epsilon", epsilon)
        if self.epsilon < 0:
            raise ValueError(f"fn.{self.name}: epsilon must be >= 0; got {epsilon!r}")
        if not isinstance(ddof, (int, np.integer)) or isinstance(ddof, bool) or ddof < 0:
            raise ValueError(f"fn.{self.name}: ddof must be an int >= 0; got {ddof!r}")
        self.ddof = int(ddof)
        self.dtype = _args.dtype(self.name, "dtype", types.FLOAT if dtype is None else dtype, _DTYPES)

    def _param(self, name: str, value: Any) -> Any:
        if value is None or value is PER_SAMPLE:
            return value
        if not np.isscalar(value) and np.asarray(value).size != 1:
            raise ValueError(
                f"fn.{self.name}: a constant {name} must be a scalar (as in DALI); got {value!r}. "
                f"Pass per-sample tensors as a DataNode"
            )
        return _args.number(self.name, name, np.asarray(value).reshape(()).item())

    def bind_layout(self, layout: str) -> None:
        """Resolve ``axis_names`` against the input's ``layout`` (known when the graph is built)."""
        if self.axis_names is None:
            return
        missing = [c for c in self.axis_names if c not in layout]
        if not layout or missing:
            raise ValueError(
                f"fn.{self.name}: axis_names={self.axis_names!r} needs an input layout that has "
                f"those axes; the input's layout is {layout!r}. Give axes=... instead, or set the "
                "layout of the source (fn.external_source(layout=...))"
            )
        self.axes = tuple(sorted({layout.index(c) for c in self.axis_names}))

    def check_input(self, x: Any) -> Any:
        """Refuse an input type DALI's normalize does not take (NumPy or CuPy: reads ``dtype``)."""
        if x.dtype not in _DTYPES:
            names = ", ".join(str(t) for t in _DTYPES)
            raise TypeError(f"fn.{self.name}: input type must be one of ({names}); got {x.dtype}")
        if self.axis_names is not None and self.axes is None:
            raise ValueError(f"fn.{self.name}: axis_names={self.axis_names!r} was not resolved (bind_layout)")
        return x

    def plan(self, shape: tuple[int, ...], arg_inputs: Mapping[str, Any]) -> tuple[Any, Any, tuple[int, ...]]:
        """``(mean, stddev, axes)`` of a sample of ``shape``: the given mean/stddev (None when
        computed; a float, or a host float64 array of the reduced shape) and the reduced axes,
        checked against the shape. Host work, shared by both devices."""
        mean = self._sample_param("mean", self.mean, arg_inputs)
        stddev = self._sample_param("stddev", self.stddev, arg_inputs)
        axes = self._reduced_axes(shape, mean, stddev)
        reduced = tuple(1 if d in axes else n for d, n in enumerate(shape))
        for name, p in (("mean", mean), ("stddev", stddev)):
            if isinstance(p, np.ndarray) and p.shape != reduced:
                raise ValueError(
                    f"fn.{self.name}: per-sample {name} has shape {p.shape}; for an input of shape "
                    f"{shape} reduced over axes {list(axes)} it must be {reduced}"
                )
        return mean, stddev, axes

    def run_cpu(
        self, inputs: Sequence[np.ndarray], arg_inputs: Mapping[str, np.ndarray], ctx: SampleContext
    ) -> np.ndarray:
        x = self.check_input(np.asarray(inputs[0]))
        mean, stddev, axes = self.plan(x.shape, arg_inputs)
        batch_param = [None if p is None else p if isinstance(p, float) else p[None] for p in (mean, stddev)]
        return self.normalize_batch(np, x[None], *batch_param, axes)[0]

    def normalize_batch(self, xp: Any, xb: Any, mean: Any, stddev: Any, axes: tuple[int, ...]) -> Any:
        """Normalize a dense batch ``xb`` (B, *shape) of samples over their ``axes`` (sample axis
        indices), in float64, with ``xp`` = NumPy or CuPy (the GPU path runs this function).

        ``mean``/``stddev``: None (computed per sample), a float (one for all), or an array of
        shape (B, *reduced) (NumPy arrays are moved to ``xp``)."""
        shape = tuple(xb.shape[1:])
        red = tuple(a + 1 for a in axes)
        mean, stddev = (p if p is None or isinstance(p, float) else xp.asarray(p, np.float64) for p in (mean, stddev))
        xf = xb.astype(np.float64)
        if mean is None:
            mean = xf.mean(axis=red, keepdims=True) if xb.size else 0.0
        centred = xf - mean
        inv = self._inv_stddev(xp, centred, red, stddev, shape, axes)
        out = centred * inv + self.shift
        return xp.ascontiguousarray(saturate(xp, out.astype(np.float32), self.dtype))

    def run_gpu(
        self, inputs: Sequence[Any], arg_inputs: Mapping[str, Any], ctxs: Sequence[SampleContext], stream: Any
    ) -> Any:
        """One batch on the GPU: `normalize_batch` with CuPy reductions (float64), the whole dense
        batch at once when its per-sample arguments stack; see `_gpu.ops.normalize`."""
        from ._gpu import ops

        return ops.normalize(self, inputs, arg_inputs, ctxs, stream)

    def _sample_param(self, name: str, const: Any, arg_inputs: Mapping[str, Any]) -> Any:
        if const is None:
            return None
        v = _args.sample_arg(self.name, name, const, arg_inputs)
        if isinstance(v, float):
            return v
        a = np.asarray(v, np.float64)
        return float(a.reshape(())) if a.size == 1 else a  # one value per sample: a scalar

    def _reduced_axes(self, shape: tuple[int, ...], mean: Any, stddev: Any) -> tuple[int, ...]:
        ndim = len(shape)
        if self.axes is not None:
            bad = [a for a in self.axes if a >= ndim]
            if bad:
                raise ValueError(
                    f"fn.{self.name}: axis index {bad[0]} is out of range 0..{ndim - 1} for a "
                    f"sample of shape {shape}"
                )
            return self.axes
        tensor = mean if isinstance(mean, np.ndarray) else stddev if isinstance(stddev, np.ndarray) else None
        if tensor is None:
            return tuple(range(ndim))
        if tensor.ndim != ndim:
            raise ValueError(
                f"fn.{self.name}: per-sample mean/stddev of shape {tensor.shape} must have the "
                f"input's {ndim} dimensions (input shape {shape})"
            )
        return tuple(d for d in range(ndim) if tensor.shape[d] == 1)

    def _inv_stddev(
        self, xp: Any, centred: Any, red: tuple[int, ...], stddev: Any, shape: tuple, axes: tuple[int, ...]
    ) -> Any:
        """``scale / stddev`` (with ``epsilon`` added to the variance), 0 where that divides by 0;
        ``red`` are the batch array's reduced axes (``axes`` + 1)."""
        eps, scale = self.epsilon, self.scale
        if stddev is not None:
            if isinstance(stddev, float):  # one value for the batch: a host float
                if eps:
                    return float(scale / np.sqrt(stddev * stddev + eps))
                return scale / stddev if stddev != 0 else 0.0  # keeps the sign, as DALI
            if eps:
                return scale / xp.sqrt(stddev * stddev + eps)
            return xp.where(stddev != 0, scale / xp.where(stddev != 0, stddev, 1.0), 0.0)
        n = math.prod(shape[a] for a in axes)
        ssq = xp.square(centred).sum(axis=red, keepdims=True)
        if n > self.ddof:
            var = ssq / (n - self.ddof)
        elif eps == 0:  # DALI: no degrees of freedom left and nothing to regularise: out = shift
            return 0.0
        else:
            var = xp.zeros_like(ssq)
        if eps:
            return scale / xp.sqrt(var + eps)
        return xp.where(var != 0, scale / xp.sqrt(xp.where(var != 0, var, 1.0)), 0.0)


def normalize(
    data: Any, *, mean: Any = None, stddev: Any = None, axes: Any = None, axis_names: str | None = None,
    batch: bool = False, scale: Any = 1.0, shift: Any = 0.0, epsilon: Any = 0.0, ddof: int = 0,
    dtype: Any = types.FLOAT, device: str | None = None, seed: int | None = None, **unsupported: Any,
) -> Any:
    """Normalize each sample: ``scale * (in - mean) / stddev + shift`` (DALI's ``fn.normalize``);
    ``mean``/``stddev`` may be per-sample DataNodes, or computed from the sample when omitted."""
    args = dict(mean=mean, stddev=stddev, axes=axes, axis_names=axis_names, batch=batch,
                scale=scale, shift=shift, epsilon=epsilon, ddof=ddof, dtype=dtype)
    out = _args.build(Normalize, (data,), device, seed, unsupported, ("mean", "stddev"), args)
    out.source.op.bind_layout(_node_layout(data) if isinstance(data, DataNode) else "")
    return out
