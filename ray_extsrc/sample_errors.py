"""The bad-sample policy: what happens when one sample's source or decoder fails.

``on_error="raise"`` (the default, as DALI): the sample's `SourceError` / `DecodeError` ends the
batch, naming the sample. ``on_error="skip"``: the sample is replaced by a *substitute*, another
sample of the same shard and epoch, so the batch stays full, every rank takes the same number of
steps, and a restart (or a resume at that batch) draws the same substitute:

* The substitute of sample ``idx`` (in epoch ``e``, attempt ``a``) is the sample at a slot drawn
  from ``(seed, e, idx, a)`` among the shard's slots of the epoch (`substitute_slot`); it takes the
  failed sample's place in the batch (its ``idx_in_batch`` and ``iteration``), with its own
  ``idx_in_epoch``, so its random augmentations are its own. If the substitute fails too, the next
  attempt draws another, up to ``max_attempts``.
* Every skip is counted (`SkipLog.count`, the loader's ``stats()["skipped_samples"]`` and the Ray
  metric ``ray_extsrc_skipped_samples``) and logged once, with its ``idx_in_epoch`` and error.
* ``max_error_rate`` bounds the skips of one epoch on one shard: more than ``max(1, rate x the
  shard's samples per epoch)`` (or, when the epoch's length is unknown, more than
  ``max(1, rate x the samples seen so far)`` once 100 have been seen) is a flood, and raises
  `TooManyBadSamplesError` naming the last ones. ``max_error_rate=0`` allows none (each bad
  sample is still named and counted, then the epoch fails).

Exactly-once then reads "every sample at most once, the skipped ones named" (`SkipLog.entries`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections import deque
from typing import Any

from .errors import RayExtSrcError, SampleError
from .sample_rng import derive_seed

__all__ = ["ON_ERROR", "ErrorPolicy", "SkipLog", "SkippedSample", "TooManyBadSamplesError", "substitute_slot"]

ON_ERROR = ("raise", "skip")
_SKIP_KEY = 0x534B4950  # "SKIP": the substitute draw's own stream, apart from every op's
_MIN_SEEN = 100  # with no epoch length, the rate is judged only once this many samples were seen

log = logging.getLogger("ray_extsrc")


class TooManyBadSamplesError(RayExtSrcError):
    """More samples failed in one epoch than ``max_error_rate`` allows under ``on_error="skip"``."""


@dataclasses.dataclass(frozen=True)
class ErrorPolicy:
    """``on_error`` ("raise" or "skip"), ``max_error_rate`` (the fraction of a shard's epoch that
    may be skipped before the epoch fails) and ``max_attempts`` (substitutes tried per failed
    sample). Validated here, so a bad value fails when the pipeline or Loader is made."""

    on_error: str = "raise"
    max_error_rate: float = 0.01
    max_attempts: int = 8

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}; got {self.on_error!r}")
        rate = self.max_error_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1 or math.isnan(rate):
            raise ValueError(f"max_error_rate must be a number in [0, 1]; got {rate!r}")
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"max_attempts must be an int >= 1; got {self.max_attempts!r}")

    @property
    def skip(self) -> bool:
        return self.on_error == "skip"


def substitute_slot(seed: int, epoch_idx: int, idx_in_epoch: int, attempt: int, num_slots: int) -> int:
    """The slot (``0 .. num_slots - 1``) whose sample replaces ``idx_in_epoch`` at ``attempt``: a
    function of its arguments alone, so every process and every restart draws the same."""
    if num_slots < 1:
        raise ValueError(f"substitute_slot: no slot to draw from (num_slots={num_slots})")
    return derive_seed(seed, _SKIP_KEY, epoch_idx, idx_in_epoch, attempt) % num_slots


@dataclasses.dataclass(frozen=True)
class SkippedSample:
    """One skip: which sample failed (``epoch_idx``, ``idx_in_epoch``), why, and its substitute."""

    epoch_idx: int
    idx_in_epoch: int
    error: str
    substitute: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class SkipLog:
    """The skips of one pipeline (one shard's process): counts them, logs each once, and enforces
    ``max_error_rate`` per epoch. Thread-safe (run-ahead threads report here)."""

    def __init__(self, policy: ErrorPolicy, name: str = "", keep: int = 1000) -> None:
        self.policy = policy
        self.name = name
        self.count = 0
        self.entries: deque[SkippedSample] = deque(maxlen=keep)  # the most recent, oldest first
        self._per_epoch: dict[int, int] = {}
        self._seen: set[tuple[int, int]] = set()
        self._lock = threading.Lock()

    def epoch_count(self, epoch_idx: int) -> int:
        return self._per_epoch.get(epoch_idx, 0)

    def record(
        self,
        error: SampleError,
        epoch_idx: int,
        idx_in_epoch: int,
        *,
        substitute: int | None,
        epoch_samples: int | None,
        seen_samples: int,
    ) -> SkippedSample:
        """Count one skip, log it once, and raise `TooManyBadSamplesError` past the epoch's budget
        (``epoch_samples``: the shard's samples per epoch, None if unknown; ``seen_samples``: how
        many it has produced so far this epoch)."""
        entry = SkippedSample(epoch_idx, idx_in_epoch, f"{type(error).__name__}: {_first_line(error)}", substitute)
        with self._lock:
            first = (epoch_idx, idx_in_epoch) not in self._seen
            if first:  # a replayed batch (restart, resume) reports the same skip again: count it once
                self._seen.add((epoch_idx, idx_in_epoch))
                self.count += 1
                self._per_epoch[epoch_idx] = self._per_epoch.get(epoch_idx, 0) + 1
                self.entries.append(entry)
            n = self._per_epoch.get(epoch_idx, 0)
        if first:
            log.warning("ray_extsrc%s: skipped sample idx_in_epoch=%d of epoch %d (%s); substitute: "
                        "idx_in_epoch=%s (on_error='skip', %d skipped this epoch)",
                        f" {self.name!r}" if self.name else "", idx_in_epoch, epoch_idx, entry.error,
                        substitute, n)
        budget = self.budget(epoch_samples, seen_samples)
        if budget is not None and n > budget:
            last = ", ".join(str(e.idx_in_epoch) for e in list(self.entries)[-10:] if e.epoch_idx == epoch_idx)
            raise TooManyBadSamplesError(
                f"{n} samples failed in epoch {epoch_idx}, more than max_error_rate="
                f"{self.policy.max_error_rate} allows ({budget} of "
                f"{epoch_samples if epoch_samples is not None else f'{seen_samples} seen'}); the last "
                f"idx_in_epoch: {last}; the last error: {entry.error}. Check the data (a corrupt "
                "shard, an unreachable bucket), or raise max_error_rate."
            ) from error
        return entry

    def budget(self, epoch_samples: int | None, seen_samples: int) -> int | None:
        """Skips one epoch may have, or None while there is no basis to judge yet."""
        rate = self.policy.max_error_rate
        if rate == 0:
            return 0
        if epoch_samples is not None:
            return max(1, math.floor(rate * epoch_samples))
        if seen_samples < _MIN_SEEN:
            return None
        return max(1, math.floor(rate * seen_samples))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"skipped_samples": self.count, "skipped": [e.to_dict() for e in self.entries]}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
