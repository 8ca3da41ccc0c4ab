"""Which global batch each shard serves at each local iteration, and how long an epoch is.

R shards (one per loader actor / Train worker), batch size B. Shard r at local iteration i serves
global batch ``g = base + i*R + r``; its samples are at positions ``g*B .. g*B + B-1`` of the epoch.
``base`` is the number of global batches already consumed before a restart with a different R
(elastic resume): the rest of the epoch is dealt out again over the new shards, still exactly once.

Every shard must yield the same number of batches per epoch (DDP would hang otherwise), so an epoch
has ``(full_batches - base) // R`` local iterations: the global batches that do not fill a whole
round of R are dropped, like a sampler's ``drop_last``. When the source has no ``__len__``, each
shard learns the end from a probe: local iteration i exists for all shards iff the last sample of
global batch ``base + i*R + R-1`` exists (StopIteration is monotonic within an epoch).

Several loader actors can serve one shard in turn (``ways`` > 1, one Python process each, so their
main stages run in parallel): way k of shard r serves the shard's batches n = k, k + ways,
k + 2*ways, ... of the layout above, i.e. at its local iteration i the global batch
``base + (i*ways + k)*R + r``. The shard as a whole still sees ``g = base + n*R + r``, so its
consumer's position, the epoch length and resumes are the same for any number of ways.

An optional shuffle maps epoch positions to sample indices with a permutation drawn from
(seed, epoch), identical on every shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .random import derive_seed

__all__ = ["ShardLayout", "epoch_permutation"]


@dataclass(frozen=True, slots=True)
class ShardLayout:
    num_shards: int = 1
    shard_id: int = 0
    base: int = 0  # global batches of this epoch consumed before the current layout took over
    ways: int = 1  # loader actors serving this shard in turn
    way: int = 0  # which of them this is

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

    def shard_iteration(self, i: int) -> int:
        """The shard's own iteration served at this way's local iteration ``i``."""
        return i * self.ways + self.way

    def global_batch(self, i: int) -> int:
        return self.base + self.shard_iteration(i) * self.num_shards + self.shard_id

    def probe_batch(self, i: int) -> int | None:
        """The global batch whose existence decides whether local iteration i exists for all shards."""
        last = self.base + self.shard_iteration(i) * self.num_shards + self.num_shards - 1
        return None if last == self.global_batch(i) else last

    def shard_length(self, num_samples: int, batch_size: int) -> int:
        """Batches each shard (all its ways together) serves per epoch."""
        full_batches = num_samples // batch_size
        return max(0, full_batches - self.base) // self.num_shards

    def epoch_length(self, num_samples: int, batch_size: int) -> int:
        """Local iterations of this way of this shard per epoch."""
        n = self.shard_length(num_samples, batch_size)
        return max(0, n - self.way + self.ways - 1) // self.ways

    def consumed_after(self, local_iterations: int) -> int:
        """Global batches consumed (by all shards together) once every shard did ``local_iterations``
        (with several ways: once every way of every shard did)."""
        return self.base + local_iterations * self.ways * self.num_shards


def epoch_permutation(seed: int, epoch_idx: int, num_samples: int) -> np.ndarray:
    """Position -> sample index for one epoch; the same on every shard and after a restart."""
    rng = np.random.Generator(np.random.Philox(derive_seed(seed, 0x5348554646, epoch_idx)))
    return rng.permutation(num_samples)
