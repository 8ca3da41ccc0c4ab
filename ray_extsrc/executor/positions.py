"""`Positions`: which samples each local batch of one epoch of one shard holds.

The glue between a pipeline's local iterations and the `SampleInfo`s its sources see (the
formulas are `sharding`'s): local iteration i of this way of this shard serves global batch
``g = layout.global_batch(i)``; slot j of that batch holds epoch position ``q`` (``g*B + j``, or,
past the end under a padding policy, the position it repeats), and its SampleInfo carries that
position's own ``idx_in_batch = q % B`` and ``iteration = q // B``, so a repeat is the very sample
(and augmentation) served at q. With ``shuffle`` a position maps to a sample index through the
epoch's permutation (`sharding.epoch_permutation`), the same on every shard.

Frozen: a pipeline makes a new one when it moves (``reset``, ``skip_to``), and the run-ahead
machinery only ever sees whole ones.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..sharding import ShardLayout, epoch_permutation
from ..types import SampleInfo

__all__ = ["Positions"]


@dataclass(frozen=True)
class Positions:
    """One epoch's positions for one shard layout (see the module docstring)."""

    layout: ShardLayout
    epoch_idx: int
    batch_size: int
    num_samples: int | None  # samples per epoch, when every source knows its length (`plan.Plan`)
    shuffle: bool = False
    seed: int = 0

    @property
    def epoch_length(self) -> int | None:
        """Local iterations of this epoch, if the number of samples is known."""
        if self.num_samples is None:
            return None
        return self.layout.epoch_length(self.num_samples, self.batch_size)

    @property
    def shard_length(self) -> int | None:
        """Batches the whole shard (all its ways) serves this epoch, if the number of samples is known."""
        if self.num_samples is None:
            return None
        return self.layout.shard_length(self.num_samples, self.batch_size)

    def global_batch(self, i: int) -> int:
        return self.layout.global_batch(i)

    @functools.cached_property
    def _permutation(self) -> np.ndarray:
        return epoch_permutation(self.seed, self.epoch_idx, self.num_samples)

    def sample_index(self, position: int) -> int:
        if not self.shuffle:
            return position
        return int(self._permutation[position])

    def infos_of_global(self, g: int, only_last: bool = False) -> tuple[SampleInfo, ...]:
        """The SampleInfos of global batch g (see the module docstring)."""
        b = self.batch_size
        if only_last:  # a probe: asked only when the epoch's length is unknown (no padding)
            return (SampleInfo(self.sample_index(g * b + b - 1), b - 1, g, self.epoch_idx),)
        positions = self.layout.positions(g, self.num_samples, b).tolist()
        return tuple(SampleInfo(self.sample_index(q), q % b, q // b, self.epoch_idx) for q in positions)

    def sample_infos(self, i: int) -> tuple[SampleInfo, ...]:
        """The SampleInfos of local iteration i."""
        return self.infos_of_global(self.global_batch(i))

    def probe(self, i: int) -> tuple[SampleInfo, ...]:
        """See `sharding`: without __len__, a shard learns the epoch's end from the last shard's batch."""
        if self.epoch_length is not None:
            return ()
        g = self.layout.probe_batch(i)
        return () if g is None else self.infos_of_global(g, only_last=True)

    def valid_samples(self, i: int) -> int:
        """How many samples of local batch i are its own (the first ones; see `sharding`)."""
        return self.layout.valid_samples(self.global_batch(i), self.num_samples, self.batch_size)
