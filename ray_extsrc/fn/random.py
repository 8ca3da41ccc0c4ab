"""``fn.random.*``: per-sample random values, drawn from ``ctx.rng()`` (keyed by seed, op, epoch and
sample), so every worker and device draws the same value for the same sample.

Without ``shape`` each sample gets a 0-d array (one value), as in DALI; ``fn.random.normal`` may
instead take a positional input whose shape the output copies (DALI's ``shape_like``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .. import types
from ..graph import DataNode, Operator, SampleContext, add_op
from . import _args
from ._args import PER_SAMPLE

__all__ = ["uniform", "coin_flip", "normal", "Uniform", "CoinFlip", "Normal"]


def _shape(op: str, shape: Any) -> tuple[int, ...]:
    if shape is None:
        return ()
    dims = [shape] if np.isscalar(shape) else list(shape)
    if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise ValueError(
            f"fn.{op}: shape must be a non-negative int or a sequence of them; got {shape!r}"
        )
    return tuple(int(d) for d in dims)


class Uniform(Operator):
    """``fn.random.uniform``: values uniform in ``[range[0], range[1])``, or picked uniformly from
    the discrete ``values``; converted to ``dtype`` (rounded and clamped for integer types)."""

    name = "random.uniform"
    is_random = True

    def __init__(
        self, device: str = "cpu", seed: int | None = None, *, range: Any = (-1.0, 1.0),
        shape: Any = None, values: Any = None, dtype: Any = types.FLOAT,
    ) -> None:
        super().__init__(device, seed)
        self.range = _args.range_pair(self.name, "range", range)
        self.values = None if values is None else np.asarray(_args.numbers(self.name, "values", values))
        self.shape = _shape(self.name, shape)
        self.dtype = _args.numeric_dtype(self.name, dtype, types.FLOAT)

    def run_cpu(
        self, inputs: Sequence[np.ndarray], arg_inputs: Mapping[str, np.ndarray], ctx: SampleContext
    ) -> np.ndarray:
        rng = ctx.rng()
        if self.values is not None:
            drawn = self.values[rng.integers(0, self.values.size, size=self.shape)]
        else:
            drawn = rng.uniform(self.range[0], self.range[1], size=self.shape)
        out = _args.saturate(np.asarray(drawn, np.float64), self.dtype)
        lo, hi = self.range
        if self.values is None and self.dtype.kind == "f" and hi > lo:
            # Keep the interval half-open after rounding float64 draws to a narrower float type.
            out = np.minimum(out, np.nextafter(self.dtype.type(hi), self.dtype.type(lo)))
        return np.asarray(out)  # fresh, hence C-contiguous; 0-d stays 0-d (ascontiguousarray would not)


class CoinFlip(Operator):
    """``fn.random.coin_flip``: 1 with ``probability``, else 0 (DALI's default dtype is INT32)."""

    name = "random.coin_flip"
    is_random = True
    _DTYPES = (np.dtype(np.int32), np.dtype(np.uint8), np.dtype(np.bool_))

    def __init__(
        self, device: str = "cpu", seed: int | None = None, *, probability: Any = 0.5,
        shape: Any = None, dtype: Any = types.INT32,
    ) -> None:
        super().__init__(device, seed)
        self.probability = probability if probability is PER_SAMPLE else _args.unit_interval(
            self.name, "probability", probability
        )
        self.shape = _shape(self.name, shape)
        dtype = types.INT32 if dtype is None else dtype  # None = DALI's default
        self.dtype = _args.dtype(self.name, "dtype", dtype, self._DTYPES)

    def run_cpu(
        self, inputs: Sequence[np.ndarray], arg_inputs: Mapping[str, np.ndarray], ctx: SampleContext
    ) -> np.ndarray:
        p = _args.sample_scalar(self.name, "probability", self.probability, arg_inputs)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"fn.{self.name}: probability must be in [0, 1]; got {p} for this sample")
        return np.asarray(ctx.rng().random(self.shape) < p).astype(self.dtype)


class Normal(Operator):
    """``fn.random.normal``: ``mean + stddev * N(0, 1)`` per element, converted to ``dtype`` (rounded
    and clamped for integer types). ``mean`` and ``stddev`` may be per-sample DataNodes."""

    name = "random.normal"
    is_random = True

    def __init__(
        self, device: str = "cpu", seed: int | None = None, *, mean: Any = 0.0, stddev: Any = 1.0,
        shape: Any = None, dtype: Any = types.FLOAT, shape_like: bool = False,
    ) -> None:
        super().__init__(device, seed)
        self.mean = mean if mean is PER_SAMPLE else _args.number(self.name, "mean", mean)
        self.stddev = stddev if stddev is PER_SAMPLE else _args.number(self.name, "stddev", stddev)
        if isinstance(self.stddev, float) and self.stddev < 0:
            raise ValueError(f"fn.{self.name}: stddev must be >= 0; got {stddev!r}")
        if shape_like and shape is not None:
            raise ValueError(
                f"fn.{self.name}: give either shape or a shape_like input, not both; got shape={shape!r}"
            )
        self.shape = _shape(self.name, shape)
        #: the output takes the shape of the op's positional input
        self.shape_like = shape_like
        self.dtype = _args.numeric_dtype(self.name, dtype, types.FLOAT)

    def run_cpu(
        self, inputs: Sequence[np.ndarray], arg_inputs: Mapping[str, np.ndarray], ctx: SampleContext
    ) -> np.ndarray:
        mean = _args.sample_scalar(self.name, "mean", self.mean, arg_inputs)
        stddev = _args.sample_scalar(self.name, "stddev", self.stddev, arg_inputs)
        if stddev < 0:
            raise ValueError(f"fn.{self.name}: stddev must be >= 0; got {stddev} for this sample")
        shape = np.shape(inputs[0]) if self.shape_like else self.shape
        drawn = ctx.rng().standard_normal(size=shape) * stddev + mean
        return np.asarray(_args.saturate(np.asarray(drawn, np.float64), self.dtype))


def uniform(
    *, range: Any = (-1.0, 1.0), shape: Any = None, values: Any = None, dtype: Any = types.FLOAT,
    device: str = "cpu", seed: int | None = None, **unsupported: Any,
) -> DataNode:
    """Per-sample uniform random values (DALI's ``fn.random.uniform``)."""
    supported = ("range", "shape", "values", "dtype", "device", "seed")
    _args.reject_unsupported(Uniform.name, unsupported, supported)
    consts, nodes = _args.split_args(
        Uniform.name, (), range=range, shape=shape, values=values, dtype=dtype
    )
    return add_op(Uniform(device, seed, **consts), **nodes)


def coin_flip(
    *, probability: Any = 0.5, shape: Any = None, dtype: Any = types.INT32, device: str = "cpu",
    seed: int | None = None, **unsupported: Any,
) -> DataNode:
    """Per-sample Bernoulli draws (DALI's ``fn.random.coin_flip``)."""
    supported = ("probability", "shape", "dtype", "device", "seed")
    _args.reject_unsupported(CoinFlip.name, unsupported, supported)
    consts, nodes = _args.split_args(
        CoinFlip.name, ("probability",), probability=probability, shape=shape, dtype=dtype
    )
    return add_op(CoinFlip(device, seed, **consts), **nodes)


def normal(
    shape_like: DataNode | None = None, *, mean: Any = 0.0, stddev: Any = 1.0, shape: Any = None,
    dtype: Any = types.FLOAT, device: str = "cpu", seed: int | None = None, **unsupported: Any,
) -> DataNode:
    """Per-sample normally distributed values (DALI's ``fn.random.normal``): one value, ``shape``
    values, or as many as the positional ``shape_like`` input has elements (in its shape)."""
    supported = ("shape_like", "mean", "stddev", "shape", "dtype", "device", "seed")
    _args.reject_unsupported(Normal.name, unsupported, supported)
    consts, nodes = _args.split_args(
        Normal.name, ("mean", "stddev"), mean=mean, stddev=stddev, shape=shape, dtype=dtype
    )
    inputs = () if shape_like is None else (shape_like,)
    return add_op(Normal(device, seed, shape_like=shape_like is not None, **consts), *inputs, **nodes)
