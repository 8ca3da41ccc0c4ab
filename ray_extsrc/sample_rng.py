"""Counter-based randomness keyed by (seed, op, epoch_idx, idx_in_epoch).

Every random decision an op makes for a sample (crop box, flip, contrast, ...) is drawn from a
Philox stream whose key is (pipeline seed, op key) and whose counter starts at
(epoch_idx, idx_in_epoch). The same sample therefore gets the same decision in whichever worker,
with however many workers, after a restart, on a different shard layout, on CPU or on GPU.

The two low counter words are left at zero so a sample's own draws advance them without ever
running into the next sample's stream (Philox increments the lowest word first).

The streams, not the ops: `fn.random` holds DALI's random ops (``uniform``, ``coin_flip``, ...),
which draw from here like every other op's random decision.
"""

from __future__ import annotations

import numpy as np

__all__ = ["sample_rng", "derive_seed"]

_MASK64 = (1 << 64) - 1


def sample_rng(seed: int, op_key: int, epoch_idx: int, idx_in_epoch: int) -> np.random.Generator:
    """Return the generator for one sample of one op. Cheap (~10 µs); create one per use."""
    key = np.array([seed & _MASK64, op_key & _MASK64], dtype=np.uint64)
    counter = np.array([0, 0, idx_in_epoch & _MASK64, epoch_idx & _MASK64], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key, counter=counter))


def derive_seed(seed: int, *path: int) -> int:
    """A 63-bit seed derived deterministically from ``seed`` and a path of integers."""
    ss = np.random.SeedSequence([seed & _MASK64, *[p & _MASK64 for p in path]])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
