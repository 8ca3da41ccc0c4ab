"""Argument plumbing shared by the ``fn.*`` ops.

A public ``fn.x(...)`` call gets each keyword either as a constant or as a `DataNode` (a per-sample
value, e.g. ``mirror=fn.random.coin_flip()``). `split_args` routes the two: constants go to the
op's constructor, DataNodes to `graph.add_op`, and the constructor sees the `PER_SAMPLE` marker in
their place, so it knows the argument was given without having its value yet. At run time
`sample_arg` picks the per-sample value out of ``arg_inputs``.

Validation helpers raise ``ValueError``/``TypeError`` quoting the bad value, prefixed ``fn.<op>:``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .. import types
from ..graph import DataNode, add_op


class _PerSample:
    """Stands in, inside an op, for an argument whose value arrives per sample in ``arg_inputs``."""

    _instance: _PerSample | None = None

    def __new__(cls) -> _PerSample:  # a singleton, so `is PER_SAMPLE` survives pickling
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __reduce__(self):
        return (_PerSample, ())

    def __repr__(self) -> str:
        return "<per-sample>"


PER_SAMPLE = _PerSample()


def reject_unsupported(op_name: str, unsupported: Mapping[str, Any], supported: Sequence[str]) -> None:
    """Refuse keyword arguments DALI knows but we do not implement (never swallow them)."""
    if unsupported:
        names = ", ".join(repr(k) for k in sorted(unsupported))
        raise TypeError(
            f"fn.{op_name}: unsupported argument(s) {names}; ray_extsrc implements only "
            f"{', '.join(supported)}"
        )


def build(
    op_cls: type, inputs: tuple, device: str | None, seed: int | None,
    unsupported: Mapping[str, Any], per_sample_ok: Sequence[str], args: dict[str, Any],
    also_supported: Sequence[str] = (),
) -> Any:
    """The body of a public ``fn.x(...)``: refuse unknown kwargs by name, route DataNode arguments
    to ``add_op``, construct the op. ``also_supported`` names arguments the public function
    handled itself (they only appear in the refusal message)."""
    reject_unsupported(op_cls.name, unsupported, ("device", "seed", *args, *also_supported))
    if device is None:  # as in DALI: an op on GPU data runs on the GPU unless told otherwise
        device = "gpu" if any(x.device == "gpu" for x in inputs if isinstance(x, DataNode)) else "cpu"
    consts, nodes = split_args(op_cls.name, per_sample_ok, **args)
    return add_op(op_cls(device, seed, **consts), *inputs, **nodes)


def split_args(
    op_name: str, per_sample_ok: Sequence[str], **kwargs: Any
) -> tuple[dict[str, Any], dict[str, DataNode]]:
    """Split keyword values into constants (for the op) and DataNodes (for ``add_op``)."""
    consts: dict[str, Any] = {}
    nodes: dict[str, DataNode] = {}
    for k, v in kwargs.items():
        if isinstance(v, DataNode):
            if k not in per_sample_ok:
                raise TypeError(
                    f"fn.{op_name}: argument {k!r} must be a constant, not a DataNode ({v.name})"
                )
            nodes[k] = v
            consts[k] = PER_SAMPLE
        else:
            consts[k] = v
    return consts, nodes


def sample_arg(op_name: str, name: str, const: Any, arg_inputs: Mapping[str, Any]) -> Any:
    """The value of ``name`` for this sample: the per-sample input if there is one, else ``const``."""
    if name in arg_inputs:
        return arg_inputs[name]
    if const is PER_SAMPLE:
        raise ValueError(
            f"fn.{op_name}: argument {name!r} was given as a DataNode but no per-sample value "
            "arrived for it (arg_inputs is missing the key)"
        )
    return const


def sample_scalar(op_name: str, name: str, const: Any, arg_inputs: Mapping[str, Any]) -> float:
    """Like `sample_arg` for a scalar argument: a per-sample value must hold exactly one number."""
    value = sample_arg(op_name, name, const, arg_inputs)
    if isinstance(value, (int, float)):
        return float(value)
    a = np.asarray(value)
    if a.size != 1:
        raise ValueError(
            f"fn.{op_name}: per-sample argument {name!r} must hold one value; got shape {a.shape}"
        )
    return float(a.reshape(()))


def number(op_name: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"fn.{op_name}: {name} must be a number; got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"fn.{op_name}: {name} must be finite; got {value!r}")
    return value


def flag(op_name: str, name: str, value: Any) -> float:
    """A DALI int-as-bool argument (``mirror``, ``horizontal``): a number or a bool."""
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    return number(op_name, name, value)


def positive(op_name: str, name: str, value: Any) -> float:
    v = number(op_name, name, value)
    if v <= 0:
        raise ValueError(f"fn.{op_name}: {name} must be > 0; got {value!r}")
    return v


def unit_interval(op_name: str, name: str, value: Any) -> float:
    v = number(op_name, name, value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"fn.{op_name}: {name} must be in [0, 1]; got {value!r}")
    return v


def numbers(op_name: str, name: str, value: Any, length: int | None = None) -> tuple[float, ...]:
    """A scalar or a sequence of numbers, as a tuple; ``length`` checks the count."""
    seq = [value] if np.isscalar(value) else list(np.asarray(value, dtype=object).reshape(-1))
    out = tuple(number(op_name, name, v) for v in seq)
    if length is not None and len(out) != length:
        raise ValueError(f"fn.{op_name}: {name} must have {length} values; got {value!r}")
    if not out:
        raise ValueError(f"fn.{op_name}: {name} must not be empty; got {value!r}")
    return out


def range_pair(op_name: str, name: str, value: Any) -> tuple[float, float]:
    """A ``(lo, hi)`` pair with lo <= hi; a single number means ``(v, v)``."""
    vals = numbers(op_name, name, value)
    if len(vals) == 1:
        vals = (vals[0], vals[0])
    if len(vals) != 2 or vals[0] > vals[1]:
        raise ValueError(
            f"fn.{op_name}: {name} must be a (min, max) pair with min <= max; got {value!r}"
        )
    return vals[0], vals[1]


def boolean(op_name: str, name: str, value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"fn.{op_name}: {name} must be a bool; got {value!r}")


def choice(op_name: str, name: str, value: Any, allowed: Sequence[Any]) -> Any:
    if value not in allowed:
        raise ValueError(f"fn.{op_name}: {name} must be one of {tuple(allowed)}; got {value!r}")
    return value


def dtype(op_name: str, name: str, value: Any, allowed: Sequence[np.dtype] | None = None) -> np.dtype:
    try:
        dt = types.to_numpy_dtype(value)
    except TypeError as exc:
        raise TypeError(f"fn.{op_name}: {name}: {exc}") from None
    if allowed is not None and dt not in allowed:
        names = ", ".join(str(a) for a in allowed)
        raise ValueError(f"fn.{op_name}: {name} must be one of ({names}); got {value!r}")
    return dt


def enum_value(op_name: str, name: str, value: Any, enum_type: type) -> Any:
    """Accept an enum member or its string value (``types.RGB`` or ``"RGB"``)."""
    if isinstance(value, enum_type):
        return value
    for member in enum_type:
        if isinstance(value, str) and value.lower() in (member.value.lower(), member.name.lower()):
            return member
    allowed = ", ".join(f"types.{m.name}" for m in enum_type)
    raise ValueError(f"fn.{op_name}: {name} must be one of {allowed}; got {value!r}")


def round_half_away(x: float) -> int:
    """C's ``std::round``: halves go away from zero (Python's ``round`` goes to even)."""
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


def saturate(values: np.ndarray, dt: np.dtype, xp: Any = np) -> np.ndarray:
    """Round (to nearest) and clamp float ``values`` into integer type ``dt``; pass floats through
    (``values != 0`` for bool). ``xp``: the array module of ``values`` (NumPy, or CuPy on the GPU).

    Rounds half to even (``rint``), as DALI's GPU kernels do; DALI's CPU kernels round halves
    away from zero. The difference only shows on exact .5 values.
    """
    dt = np.dtype(dt)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return xp.clip(xp.rint(values), info.min, info.max).astype(dt)
    if dt.kind == "b":
        return values != 0
    return values.astype(dt, copy=False)


def resample_dtype(op_name: str, in_dtype: np.dtype, requested: np.dtype | None) -> np.dtype:
    """The output type of a resampling op (``fn.resize``, ``fn.random_resized_crop``): the input's,
    or float32 when asked; anything else is refused naming both."""
    out = in_dtype if requested is None else requested
    if out != in_dtype and out != np.float32:
        raise ValueError(f"fn.{op_name}: dtype must be the input type ({in_dtype}) or float32; got {out}")
    return out


def numeric_dtype(op_name: str, value: Any, default: Any) -> np.dtype:
    """An op's ``dtype`` argument (``default`` when None) as a NumPy dtype, refused unless integer
    or float."""
    out = dtype(op_name, "dtype", default if value is None else value)
    if out.kind not in "iuf":
        raise ValueError(f"fn.{op_name}: dtype must be numeric; got {value!r}")
    return out
