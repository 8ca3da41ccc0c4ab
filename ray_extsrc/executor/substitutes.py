"""`Substitutes`: carries out ``on_error="skip"`` (the rules are `sample_errors`') for one pipeline.

Two places a sample can fail, two kinds of substitute, both drawn from ``(seed, epoch, idx,
attempt)`` so a rerun, a restart and a resume draw the same:

* In the host stage (the source, or an op the workers run): the failed slot gets another sample
  of the same shard and epoch (`for_host`): a slot drawn among the shard's slots of the epoch
  (``epoch_length x batch_size``; the batch's own slots when the epoch's length is unknown), whose
  sample index takes the failed slot's place (its ``idx_in_batch`` and ``iteration``). The batch's
  host stage then runs again with the new SampleInfos, so the substitute is a whole sample: all
  its outputs, its own per-sample random draws.
* In the main stage (a decoder in this process, or the consumer's GPU stage, which has only the
  batch at hand): the failed slot becomes a copy of another slot of the same batch (`for_main`),
  every column and its SampleInfo, so its label follows its image; the main stage runs again.
  The actor stage and the consumer stage make the very same choice, so both give the same batches.

A failure that names no sample (a batch source, a programming error such as a wrong dtype) is not
a bad sample and is raised as it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from ..errors import DecodeError, SampleError, SourceError
from ..sample_errors import ErrorPolicy, SkipLog, SkippedSample, substitute_slot
from ..types import SampleInfo
from .positions import Positions

__all__ = ["Substitutes", "SKIPPABLE", "with_rows"]

#: what a bad sample raises (a SharedMemoryError or a WorkerDiedError is not the sample's fault)
SKIPPABLE = (SourceError, DecodeError)


class Substitutes:
    """The bad-sample policy of one pipeline: `SkipLog` and the draws (see the module docstring)."""

    def __init__(self, policy: ErrorPolicy, seed: int, name: str = "") -> None:
        self.policy = policy
        self.seed = seed
        self.log = SkipLog(policy, name)

    @property
    def enabled(self) -> bool:
        return self.policy.skip

    def failed_slots(self, error: BaseException, infos: Sequence[SampleInfo]) -> list[int]:
        """The batch slots holding the sample ``error`` names; raises ``error`` when it is not a
        bad sample this policy replaces."""
        idx = getattr(error, "idx_in_epoch", None)
        slots = [j for j, info in enumerate(infos) if info.idx_in_epoch == idx] if idx is not None else []
        if not self.enabled or not isinstance(error, SKIPPABLE) or not slots:
            raise error
        return slots

    def _attempt(self, idx: int, tried: dict[int, int]) -> int:
        n = tried.get(idx, 0)
        if n >= self.policy.max_attempts:
            return -1
        tried[idx] = n + 1
        return n

    def for_host(
        self, error: SampleError, at: Positions, i: int, infos: tuple[SampleInfo, ...], tried: dict[int, int],
    ) -> tuple[tuple[SampleInfo, ...], list[SkippedSample]]:
        """Batch i's SampleInfos with the sample ``error`` names replaced by one from the shard."""
        b = len(infos)
        length = at.epoch_length
        out = list(infos)
        entries = []
        for j in self.failed_slots(error, infos):
            bad = infos[j]
            sub = self._draw_host(error, at, i, bad, tried, length, b)
            out[j] = SampleInfo(sub, bad.idx_in_batch, bad.iteration, bad.epoch_idx)
            entries.append(self._record(error, bad, sub, at, i, b))
        return tuple(out), entries

    def _draw_host(self, error, at, i, bad, tried, length, b) -> int:
        while True:
            attempt = self._attempt(bad.idx_in_epoch, tried)
            if attempt < 0:
                raise _exhausted(error, bad, self.policy.max_attempts)
            slots = length * b if length is not None else b
            s = substitute_slot(self.seed, bad.epoch_idx, bad.idx_in_epoch, attempt, slots)
            k, j = (s // b, s % b) if length is not None else (i, s)
            sub = at.sample_infos(k)[j].idx_in_epoch
            if sub != bad.idx_in_epoch:
                return sub

    def run_main(
        self, run: Callable[[tuple[SampleInfo, ...], dict], tuple], infos: tuple[SampleInfo, ...], env: dict,
        at: Positions | None, i: int, skipped: list[SkippedSample],
    ) -> tuple:
        """``run(infos, env)`` (batch i's main stage, which adds its ops' outputs to the env it is
        given); a sample that fails there becomes a copy of another of the batch (`for_main`) and the
        stage runs again. Adds the skips to ``skipped``; raises the error as it is when the policy
        does not replace it. The actor's `RunAhead` and a consumer's `Pipeline.run_device` both
        run their main stage through here, so both make the same choice."""
        tried: dict[int, int] = {}
        while True:
            try:
                return run(infos, dict(env))  # the stage adds entries only: env stays the sources'
            except SKIPPABLE as e:
                pairs, entries = self.for_main(e, infos, tried, at, i)
                skipped.extend(entries)
                infos, env = with_rows(infos, env, pairs)

    def for_main(
        self, error: SampleError, infos: Sequence[SampleInfo], tried: dict[int, int], at: Positions | None, i: int,
    ) -> tuple[list[tuple[int, int]], list[SkippedSample]]:
        """Slot pairs ``(j, k)``: slot j becomes a copy of slot k of the same batch."""
        failed = self.failed_slots(error, infos)
        others = [k for k in range(len(infos)) if k not in failed]
        pairs, entries = [], []
        for j in failed:
            bad = infos[j]
            attempt = self._attempt(bad.idx_in_epoch, tried)
            if attempt < 0 or not others:
                raise _exhausted(error, bad, self.policy.max_attempts)
            k = others[substitute_slot(self.seed, bad.epoch_idx, bad.idx_in_epoch, attempt, len(others))]
            pairs.append((j, k))
            entries.append(self._record(error, bad, infos[k].idx_in_epoch, at, i, len(infos)))
        return pairs, entries

    def _record(self, error, bad: SampleInfo, sub: int, at: Positions | None, i: int, b: int) -> SkippedSample:
        length = at.epoch_length if at is not None else None
        return self.log.record(
            error, bad.epoch_idx, bad.idx_in_epoch, substitute=sub,
            epoch_samples=length * b if length is not None else None, seen_samples=(i + 1) * b,
        )


def with_rows(infos: Sequence[SampleInfo], env: dict, pairs: Sequence[tuple[int, int]]) -> tuple[tuple, dict]:
    """``infos`` and a copy of ``env`` (op id -> output -> per-sample list) with slot j a copy of
    slot k for each pair (j keeps its place in the batch)."""
    out_infos = list(infos)
    out_env = {op: {o: list(v) for o, v in outs.items()} for op, outs in env.items()}
    for j, k in pairs:
        out_infos[j] = dataclasses.replace(infos[k], idx_in_batch=infos[j].idx_in_batch)
        for outs in out_env.values():
            for v in outs.values():
                if len(v) == len(infos):
                    v[j] = v[k]
    return tuple(out_infos), out_env


def _exhausted(error: SampleError, bad: SampleInfo, attempts: int) -> SampleError:
    error.args = (f"{error.args[0] if error.args else error} [on_error='skip': no usable substitute for "
                  f"idx_in_epoch={bad.idx_in_epoch} after {attempts} attempts]",)
    return error
