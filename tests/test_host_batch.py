"""`HostBatch` as a consumer-side GPU stage reads it, and the in-batch substitute it gets under
``on_error="skip"`` (`executor.substitutes.with_rows` on the batch's env)."""

from __future__ import annotations

import numpy as np
import pytest

from ray_extsrc.executor.substitutes import with_rows
from ray_extsrc.host_batch import HostBatch, pack_column
from ray_extsrc.types import SampleInfo

pytestmark = pytest.mark.timeout(30)


def _batch() -> HostBatch:
    infos = tuple(SampleInfo(idx_in_epoch=100 + j, idx_in_batch=j, iteration=3, epoch_idx=1) for j in range(4))
    encoded = [np.full(5 + j, j, np.uint8) for j in range(4)]
    labels = [np.array([10 * j], np.int32) for j in range(4)]
    return HostBatch(1, 3, infos, {7: {0: pack_column(encoded), 1: pack_column(labels)}})


def test_a_row_becomes_a_copy_of_another_in_every_column_keeping_its_place():
    b = _batch()
    env = b.env()
    infos, got = with_rows(b.infos, env, [(2, 0)])
    assert [x.tolist() for x in got[7][0]] == [[0] * 5, [1] * 6, [0] * 5, [3] * 8]
    assert [int(x[0]) for x in got[7][1]] == [0, 10, 0, 30]  # the label follows its image
    assert infos[2] == SampleInfo(idx_in_epoch=100, idx_in_batch=2, iteration=3, epoch_idx=1)
    assert infos[:2] == b.infos[:2] and infos[3] == b.infos[3]
    assert [x.tolist() for x in env[7][0]][2] == [2] * 7  # the env it was given is untouched
    assert [x.tolist() for x in b.env()[7][0]][2] == [2] * 7
