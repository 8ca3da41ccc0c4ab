"""`HostStage`: a batch's host side — the workers' share and the in-process sources.

For local iteration i (of the epoch and layout in `Positions`), `collect` submits the batches up to
``i + prefetch_queue_depth`` to the worker pool (so the workers run ahead of the consumer) and
waits for batch i's samples: read-only views into shared memory, which stay reserved until
`release` (call it once the main stage has read them). `run_sources` adds the in-process
(``parallel=False``) sources; `pack` copies everything out of the slots into a `HostBatch`, for a
pipeline that stops here (`Pipeline.serve_host_stage`).

The pool is driven from the run-ahead threads as well as the caller's, hence one lock around it.
The pool itself belongs to the pipeline (started by ``start_py_workers``, closed by ``close``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import SourceError
from ..external_source import is_source
from ..host_batch import HostBatch, pack_column, packed_size
from ..plan import Plan
from ..source import SourceKind, chunk_samples
from ..types import BatchInfo, SampleInfo
from ..workers import WorkerPool
from ..workers.messages import TASK_SAMPLES
from ..workers.pool import Chunk
from .positions import Positions

__all__ = ["HostStage", "Env", "Buffers"]

#: op id -> output index -> per-sample values (what a batch's stages read and add to)
Env = dict[int, dict[int, Any]]
#: given the sizes of a batch's byte columns, a writable uint8 array of at least that size for
#: each (views of one place the batch's bytes may stay in), or None: `pack` makes its own
Buffers = Callable[[list[int]], Sequence[np.ndarray] | None]


class HostStage:
    """The host side of each batch of one pipeline (see the module docstring)."""

    def __init__(
        self, plan: Plan, pool: WorkerPool | None, positions: Positions, iteration: int, *,
        prefetch_queue_depth: int, py_num_workers: int, buffers: Buffers | None = None,
    ) -> None:
        self._plan = plan
        self._buffers = buffers  # where `pack` puts byte columns (`Pipeline.serve_host_stage`)
        self._pool = pool
        self._lock = threading.Lock()  # the pool is driven from the ahead threads
        self._prefetch = prefetch_queue_depth
        self._py_num_workers = py_num_workers
        self._positions = positions
        self._submitted = iteration  # local iterations submitted to the pool

    @property
    def positions(self) -> Positions:
        """The epoch and layout served now (see `move`)."""
        return self._positions

    def move(self, positions: Positions, iteration: int) -> None:
        """Serve ``positions`` from local ``iteration`` on; the pool's batches of the old place are
        dropped. The caller makes sure no batch is being computed meanwhile."""
        if self._pool is not None:
            self._pool.discard()
        self._positions = positions
        self._submitted = iteration

    def collect(self, i: int, infos: tuple[SampleInfo, ...] | None = None) -> tuple[Env, float]:
        """Batch i's worker outputs (``{op id: {index: samples}}``), and the workers' compute seconds.

        ``infos``: batch i again, for these SampleInfos instead of its own (after its first try
        failed: the bad-sample policy's substitutes, `substitutes`)."""
        env: Env = {}
        if self._pool is None:
            return env, 0.0
        with self._lock:
            if infos is None:
                self._submit_ahead(i)
            else:
                at = self._positions
                # the probe too: without __len__ it is what tells this batch that the epoch ended
                self._pool.submit(self._key(i), at.epoch_idx, at.global_batch(i), self._chunks(infos, at.probe(i)))
            samples = self._pool.collect(self._key(i))[: self._plan.batch_size]  # minus the probe, if any
            compute_s = self._pool.last_compute_s
        for k, x in enumerate(self._plan.exports):
            env.setdefault(x.source.op_id, {})[x.index] = [s[k] for s in samples]
        return env, compute_s

    def release(self, i: int) -> None:
        """Free batch i's shared-memory slots (its samples must not be read after this)."""
        if self._pool is not None:
            with self._lock:
                self._pool.release(self._key(i))

    def _key(self, i: int) -> tuple[int, int]:
        return (self._positions.epoch_idx, i)

    def _submit_ahead(self, i: int) -> None:
        at = self._positions
        last = i + self._prefetch
        if at.epoch_length is not None:
            last = min(last, at.epoch_length)
        while self._submitted < last:
            k = self._submitted
            g = at.global_batch(k)
            if self._plan.program.kind == TASK_SAMPLES:
                chunks = self._chunks(at.sample_infos(k), at.probe(k))
            else:
                chunks = [Chunk(self._plan.program.kind, batch=BatchInfo(g, at.epoch_idx))]
            self._pool.submit((at.epoch_idx, k), at.epoch_idx, g, chunks)
            self._submitted += 1

    def _chunks(self, infos: tuple[SampleInfo, ...], probe: tuple[SampleInfo, ...]) -> list[Chunk]:
        chunks = [Chunk(TASK_SAMPLES, samples=c) for c in chunk_samples(infos, self._py_num_workers)]
        if probe:
            chunks.append(Chunk(TASK_SAMPLES, samples=probe))
        return chunks

    def run_sources(
        self, i: int, env: Env, infos: tuple[SampleInfo, ...] | None = None, *, name_failures: bool = False,
    ) -> None:
        """Batch i of the in-process (``parallel=False``) sources, into ``env`` (for ``infos``, if
        given: see `collect`). ``name_failures``: a per-sample source's exception becomes a
        `SourceError` naming the sample (the bad-sample policy needs to know which)."""
        at = self._positions
        infos = at.sample_infos(i) if infos is None else infos
        g = at.global_batch(i)
        for node in self._plan.main_nodes:
            if is_source(node):
                spec = node.op.spec
                if spec.kind is SourceKind.SAMPLE:
                    for info in at.probe(i):
                        spec.call_sample(info)  # raises StopIteration past the end
                    rows = [_call_named(spec, info) if name_failures else spec.call_sample(info) for info in infos]
                elif spec.kind is SourceKind.BATCH:
                    rows = spec.call_batch(BatchInfo(g, at.epoch_idx))
                else:
                    if i == 0:
                        spec.start_epoch(at.epoch_idx)
                    rows = spec.next_batch(BatchInfo(g, at.epoch_idx))
                env[node.op_id] = {k: [r[k] for r in rows] for k in range(spec.width)}

    def pack(self, i: int, env: Env, infos: tuple[SampleInfo, ...] | None = None) -> HostBatch:
        """Batch i after the host stage, copied out of the workers' slots (see `host_batch`): its
        byte columns into the buffers ``buffers`` gives, where it gives them (else fresh ones)."""
        sizes = {(op_id, k): packed_size(v) for op_id, outs in env.items() for k, v in outs.items()}
        sizes = {key: n for key, n in sizes.items() if n is not None}
        out = {}
        if sizes and self._buffers is not None:
            given = self._buffers(list(sizes.values()))
            if given is not None:
                out = dict(zip(sizes, given))
        columns = {op_id: {k: pack_column(v, out.get((op_id, k))) for k, v in outs.items()} for op_id, outs in env.items()}
        infos = self._positions.sample_infos(i) if infos is None else infos
        return HostBatch(self._positions.epoch_idx, i, infos, columns)


def _call_named(spec: Any, info: SampleInfo) -> Any:
    try:
        return spec.call_sample(info)
    except StopIteration:
        raise
    except Exception as e:  # noqa: BLE001 - named and re-raised, or replaced under on_error="skip"
        raise SourceError(
            f"{type(e).__name__} was raised for sample idx_in_epoch={info.idx_in_epoch}, "
            f"iteration={info.iteration}, epoch_idx={info.epoch_idx} by an in-process source: {e}",
            idx_in_epoch=info.idx_in_epoch, iteration=info.iteration, epoch_idx=info.epoch_idx,
        ) from e
