"""DALI's PyTorch iterators over ray_extsrc pipelines: a training loop written for
``nvidia.dali.plugin.pytorch`` runs with only its imports changed::

    from ray_extsrc.plugin.pytorch import DALIClassificationIterator, LastBatchPolicy

    it = DALIClassificationIterator(pipe, reader_name="Reader", last_batch_policy=LastBatchPolicy.PARTIAL)
    for epoch in range(epochs):
        for data in it:                       # one epoch per `for` (iter() resets, as in DALI)
            images, labels = data[0]["data"], data[0]["label"]
            ...

Each step yields a list with one dict per pipeline, ``{name: torch.Tensor}`` in ``output_map``
order. Epochs, ``size``, ``reader_name``, ``auto_reset``, ``reset()``, ``len()`` and the last-batch
policies are `ray_extsrc.plugin.base_iterator`'s (its docstring lists where they differ from DALI).

Tensors. A CPU output (`TensorListCPU`) becomes a CPU tensor sharing the batch's memory, which the
pipeline made for this batch alone (no copy). A GPU output (`TensorListGPU`) is copied, as DALI's
iterator copies it, into a tensor of torch's allocator on the pipeline's device, on torch's current
stream, after the batch's kernels (`ray_extsrc.gpu_handoff` says why a zero-copy hand-over is
unsafe). Outputs must have one shape across the batch (DALI's ``as_tensor()`` rule); a PARTIAL last
batch is a view of its first samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..gpu_handoff import GpuHandoff
from ..pipeline import Pipeline
from ..tensors import TensorListCPU, TensorListGPU
from ..transport import host_to_torch
from .base_iterator import LastBatchPolicy, _DaliBaseIterator

__all__ = ["DALIGenericIterator", "DALIClassificationIterator", "LastBatchPolicy"]


class DALIGenericIterator(_DaliBaseIterator):
    """DALI's general PyTorch iterator: every output of the pipelines, named by ``output_map``.

    pipelines: one `Pipeline` or a list (run in lock step: one per shard/GPU of this process).
    output_map: a name for each pipeline output, in order; distinct.
    size, reader_name, auto_reset, fill_last_batch (deprecated), last_batch_padded,
    last_batch_policy, prepare_first_batch: as DALI's (see `ray_extsrc.plugin.base_iterator`).
    dynamic_shape: accepted for backward compatibility and unused, as in DALI, whose iterators take
    each batch's shapes as they come (so does this one).
    """

    def __init__(
        self,
        pipelines: Pipeline | Sequence[Pipeline],
        output_map: Sequence[str],
        size: int = -1,
        reader_name: str | None = None,
        auto_reset: bool | str | None = False,
        fill_last_batch: bool | None = None,
        dynamic_shape: Any = False,
        last_batch_padded: bool = False,
        last_batch_policy: LastBatchPolicy = LastBatchPolicy.FILL,
        prepare_first_batch: bool = True,
    ) -> None:
        if isinstance(output_map, str) or not isinstance(output_map, Sequence):
            raise TypeError(f"output_map must be a list of names, one per pipeline output; got {output_map!r}")
        names = list(output_map)
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"output_map names must be str; got {name!r} in {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"output_map names should be distinct; got {names}")
        for i, pipe in enumerate(pipelines if isinstance(pipelines, (list, tuple)) else [pipelines]):
            outputs = getattr(pipe, "outputs", None)
            if outputs is not None and len(outputs) != len(names):
                raise ValueError(
                    f"output_map has {len(names)} names {names}, but pipeline {i} has {len(outputs)} outputs"
                )
        self.output_map = names
        self._output_categories = set(names)
        self._gpu = GpuHandoff()
        super().__init__(
            pipelines,
            size,
            reader_name,
            auto_reset,
            fill_last_batch,
            last_batch_padded,
            last_batch_policy,
            prepare_first_batch,
        )
        self._first_batch = None
        if self._prepare_first_batch:
            try:
                self._first_batch = DALIGenericIterator.__next__(self)
            except StopIteration:
                self._report_no_data_in_pipeline()
            # asking for it here is not consuming it (see __iter__)
            self._ever_consumed = False

    def __next__(self) -> list[dict[str, torch.Tensor]]:
        self._ever_consumed = True
        if self._first_batch is not None:
            batch, self._first_batch = self._first_batch, None
            return batch
        return [self._to_torch(k, outputs, keep) for k, (outputs, keep) in enumerate(self._fetch())]

    def _to_torch(self, k: int, outputs: tuple, keep: int | None) -> dict[str, torch.Tensor]:
        batch = {}
        for name, out in zip(self.output_map, outputs):
            try:
                if isinstance(out, TensorListGPU):
                    t = self._gpu.to_torch(out, stack=True)
                elif isinstance(out, TensorListCPU):
                    t = host_to_torch(out.as_array())
                else:
                    raise TypeError(f"expected a TensorListCPU or TensorListGPU pipeline output; got {type(out).__name__}")
            except Exception as e:
                e.add_note(f"in DALIGenericIterator: output {name!r} of pipeline {k}")
                raise
            batch[name] = t if keep is None else t[:keep]
        return batch


class DALIClassificationIterator(DALIGenericIterator):
    """DALI's iterator for classification: ``DALIGenericIterator(pipelines, ["data", "label"], ...)``
    for pipelines with two outputs, the images and their labels."""

    def __init__(
        self,
        pipelines: Pipeline | Sequence[Pipeline],
        size: int = -1,
        reader_name: str | None = None,
        auto_reset: bool | str | None = False,
        fill_last_batch: bool | None = None,
        dynamic_shape: Any = False,
        last_batch_padded: bool = False,
        last_batch_policy: LastBatchPolicy = LastBatchPolicy.FILL,
        prepare_first_batch: bool = True,
    ) -> None:
        super().__init__(
            pipelines,
            ["data", "label"],
            size,
            reader_name=reader_name,
            auto_reset=auto_reset,
            fill_last_batch=fill_last_batch,
            dynamic_shape=dynamic_shape,
            last_batch_padded=last_batch_padded,
            last_batch_policy=last_batch_policy,
            prepare_first_batch=prepare_first_batch,
        )
