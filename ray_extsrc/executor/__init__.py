"""How a planned pipeline runs its batches (`pipeline.Pipeline` drives it; `plan` decides what runs where).

::

    Positions ──► HostStage ───────────────► MainStage ──────────────► outputs
    (which       (workers' share from the    (CPU ops per sample on      (TensorListCPU/GPU,
     SampleInfos  pool, in-process sources;   threads, GPU ops through    or a HostBatch when
     a batch      HostBatch when the          GpuStage on the pipeline's  the pipeline stops
     holds)       pipeline stops here)        own stream)                 after the host stage)
                  └──────────── RunAhead: both, batch by batch, ahead of the consumer ─┘

* `positions`: `Positions`, one epoch of one shard layout: local iteration -> global batch ->
  `SampleInfo`s (shuffle, padding, probes).
* `host_stage`: `HostStage`, the worker pool driven ahead (submit, collect, release) and the
  in-process sources; `HostBatch` packing.
* `main_stage`: `MainStage`, the main-stage ops and the outputs' assembly.
* `gpu_stage`: `GpuStage`, GPU op evaluation, the pipeline's stream, fences. Imported lazily,
  only where a GPU op runs (CuPy loads there, inside its functions).
* `run_ahead`: `RunAhead`, a batch start to finish, in the caller's thread or computed ahead.
* `substitutes`: `Substitutes`, ``on_error="skip"``: which sample replaces a bad one, in the
  host stage (another of the shard) or the main stage (another of the batch).

Imports point down the data path: nothing here imports `pipeline` (or anything above it: the
actor, the Train side, Ray); `tests/test_imports.py` checks it.
"""

from __future__ import annotations

from .host_stage import HostStage
from .main_stage import MainStage
from .positions import Positions
from .run_ahead import EndOfEpoch, RunAhead

__all__ = ["EndOfEpoch", "HostStage", "MainStage", "Positions", "RunAhead"]
