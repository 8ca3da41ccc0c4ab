"""Which global batch each shard serves at each local iteration, and how long an epoch is.

R shards (one per loader actor / Train worker), batch size B, N samples per epoch (the source's
``__len__``, when it has one). Shard r at local iteration i serves global batch
``g = base + i*R + r``; its *slots* are ``p = g*B .. g*B + B-1``. ``base`` is the number of global
batches already consumed before a restart with a different R (elastic resume): the rest of the
epoch is dealt out again over the new shards. A round is the R batches of one local iteration.

Every shard must yield the same number of batches per epoch (DDP would hang otherwise), so the
epoch has whole rounds. What happens to the samples of a last round that R does not fill is the
*last-batch policy* (``last_batch_policy``, as DALI's iterators name it: their ``FILL`` is
``"pad"``, ``DROP`` is ``"drop"``, and ``"exact"`` marks what ``PARTIAL`` would cut off, so batch
shapes stay fixed; torch's samplers call it ``drop_last``). With ``S = base*B`` the first slot of
this layout:

* ``"drop"``: ``(N//B - base) // R`` local iterations; the global batches that do not fill a whole
  round, and the samples of a partial last batch, are not served (like ``drop_last=True``).
* ``"pad"``: ``ceil((N - S) / (R*B))`` local iterations, every batch full: slot p serves epoch
  position ``p mod N``. Slots ``p < N`` are the epoch's own positions, once each; the fewer than
  ``R*B`` slots past N (all in the last round) wrap to the epoch's first positions, as torch's
  ``DistributedSampler(drop_last=False)`` pads. So every sample is served at least once, the
  extras are fewer than one round, and they are a function of (N, B, R, base) alone: a restart pads
  the same way (with the same R, the resumed rounds line up with the ones it replaces).
* ``"exact"``: the slots and positions of ``"pad"``, but a slot past N is marked as padding: batch
  g's first ``valid_samples(g)`` = ``clamp(N - g*B, 0, B)`` samples are its own, the rest padding.
  Across ranks every sample is valid exactly once, so sums and counts over the valid samples
  (all-reduced over ranks) equal the one-rank result.

A checkpoint taken mid-epoch has ``consumed_batches*B < N`` under any policy (extras live only in
the last round), so a resumed layout, whatever its R, starts at the first position not yet served:
"drop" stays exactly-once, "exact" exactly-once for the valid samples and "pad" at-least-once
across the resume (its extras, again fewer than one round of the new R, repeat the epoch's start).

Without N (a source with no ``__len__``), the end is only learnt from ``StopIteration``, so
``"pad"`` cannot know where to wrap and behaves as ``"drop"``; ``"exact"`` is refused (see
`pipeline`). Each shard learns the end from a probe: local iteration i exists for all shards iff
the last sample of global batch ``base + i*R + R-1`` exists (StopIteration is monotonic within an
epoch).

Several loader actors can serve one shard in turn (``ways`` > 1, one Python process each, so their
main stages run in parallel): way k of shard r serves the shard's batches n = k, k + ways,
k + 2*ways, ... of the layout above, i.e. at its local iteration i the global batch
``base + (i*ways + k)*R + r``. The shard as a whole still sees ``g = base + n*R + r``, so its
consumer's position, the epoch length, the padding and resumes are the same for any number of ways.

An optional shuffle maps epoch positions to sample indices with a permutation drawn from
(seed, epoch), identical on every shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .sample_rng import derive_seed

__all__ = ["LAST_BATCH_POLICIES", "ShardLayout", "check_last_batch_policy", "epoch_permutation"]

#: What a layout does with the samples of a last round that R shards do not fill (module docstring).
LAST_BATCH_POLICIES = ("drop", "pad", "exact")


def check_last_batch_policy(policy: object, where: str) -> str:
    """``policy`` if it is one of `LAST_BATCH_POLICIES`, else a ValueError that quotes it."""
    if policy not in LAST_BATCH_POLICIES:
        raise ValueError(
            f"{where}: last_batch_policy must be one of {LAST_BATCH_POLICIES} ('drop': whole rounds "
            f"only; 'pad': complete the last round from the epoch's start; 'exact': the same, with the "
            f"padding marked per sample); got {policy!r}"
        )
    return policy  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class ShardLayout:
    num_shards: int = 1
    shard_id: int = 0
    base: int = 0  # global batches of this epoch consumed before the current layout took over
    ways: int = 1  # loader actors serving this shard in turn
    way: int = 0  # which of them this is
    last_batch_policy: str = "drop"  # see the module docstring

    def __post_init__(self) -> None:
        if not isinstance(self.num_shards, int) or self.num_shards < 1:
            raise ValueError(f"num_shards must be a positive int; got {self.num_shards!r}")
        if not isinstance(self.shard_id, int) or not 0 <= self.shard_id < self.num_shards:
            raise ValueError(f"shard_id must be in [0, {self.num_shards}); got {self.shard_id!r}")
        if self.base < 0:
            raise ValueError(f"base must be >= 0; got {self.base!r}")
        if not isinstance(self.ways, int) or self.ways < 1:
            raise ValueError(f"ways must be a positive int; got {self.ways!r}")
        if not isinstance(self.way, int) or not 0 <= self.way < self.ways:
            raise ValueError(f"way must be in [0, {self.ways}); got {self.way!r}")
        check_last_batch_policy(self.last_batch_policy, "ShardLayout")

    @property
    def pads(self) -> bool:
        """Whether the last round is completed (``"pad"``, ``"exact"``) rather than dropped."""
        return self.last_batch_policy != "drop"

    def shard_iteration(self, i: int) -> int:
        """The shard's own iteration served at this way's local iteration ``i``."""
        return i * self.ways + self.way

    def global_batch(self, i: int) -> int:
        return self.base + self.shard_iteration(i) * self.num_shards + self.shard_id

    def probe_batch(self, i: int) -> int | None:
        """The global batch whose existence decides whether local iteration i exists for all shards
        (only asked when the number of samples is unknown)."""
        last = self.base + self.shard_iteration(i) * self.num_shards + self.num_shards - 1
        return None if last == self.global_batch(i) else last

    def shard_length(self, num_samples: int, batch_size: int) -> int:
        """Batches each shard (all its ways together) serves per epoch."""
        if self.pads:
            rest = max(0, num_samples - self.base * batch_size)
            return -(-rest // (self.num_shards * batch_size))
        full_batches = num_samples // batch_size
        return max(0, full_batches - self.base) // self.num_shards

    def epoch_length(self, num_samples: int, batch_size: int) -> int:
        """Local iterations of this way of this shard per epoch."""
        n = self.shard_length(num_samples, batch_size)
        return max(0, n - self.way + self.ways - 1) // self.ways

    def positions(self, g: int, num_samples: int | None, batch_size: int) -> np.ndarray:
        """The epoch positions global batch ``g``'s slots serve (int64, one per sample): slot p
        serves p, or, past the epoch's end under a padding policy, ``p mod num_samples``."""
        slots = np.arange(g * batch_size, (g + 1) * batch_size, dtype=np.int64)
        if self.pads and num_samples:
            return slots % num_samples
        return slots

    def valid_samples(self, g: int, num_samples: int | None, batch_size: int) -> int:
        """How many of global batch ``g``'s samples are its own (the first ones); the rest are
        padding. ``batch_size`` unless a padding policy reached past the epoch's end."""
        if not self.pads or num_samples is None:
            return batch_size
        return min(batch_size, max(0, num_samples - g * batch_size))

    def consumed_after(self, local_iterations: int) -> int:
        """Global batches consumed (by all shards together) once every shard did ``local_iterations``
        (with several ways: once every way of every shard did)."""
        return self.base + local_iterations * self.ways * self.num_shards


def epoch_permutation(seed: int, epoch_idx: int, num_samples: int) -> np.ndarray:
    """Position -> sample index for one epoch; the same on every shard and after a restart."""
    rng = np.random.Generator(np.random.Philox(derive_seed(seed, 0x5348554646, epoch_idx)))
    return rng.permutation(num_samples)
