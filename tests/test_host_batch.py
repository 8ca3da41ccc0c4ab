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


def test_same_shape_columns_travel_as_one_array_and_come_back_as_they_were():
    import pickle

    from ray_extsrc.host_batch import StackedArrays, unpack_column

    boxes = [np.array([j, 2 * j, 3, 4, 5, 6, 1], np.int32) for j in range(5)]
    labels = [np.int32(7 * j) for j in range(5)]
    zero_d = [np.array(1.5 * j) for j in range(5)]
    mixed = [np.zeros(3, np.int32), np.zeros(4, np.int32)]  # shapes differ: a list, as before
    for col, values in ((pack_column(boxes), boxes), (pack_column(labels), labels), (pack_column(zero_d), zero_d)):
        assert isinstance(col, StackedArrays)
        back = unpack_column(pickle.loads(pickle.dumps(col, protocol=5)))
        assert [type(a) for a in back] == [type(a) for a in values]
        assert all(np.array_equal(a, b) and np.shape(a) == np.shape(b) and a.dtype == b.dtype for a, b in zip(back, values))
    packed = pack_column(boxes)
    boxes[0][0] = 99  # a private copy: the worker's slot may be reused at once
    assert unpack_column(packed)[0][0] == 0
    assert isinstance(pack_column(mixed), list)
    assert isinstance(pack_column([np.array([object()])] * 2), list)  # object arrays stay per sample


def test_the_batch_infos_pickle_as_one_array_and_equal_the_sample_infos():
    import pickle

    from ray_extsrc.host_batch import SampleInfos

    b = _batch()
    assert isinstance(b.infos, SampleInfos) and b.infos.rows.shape == (4, 4)
    expected = tuple(SampleInfo(idx_in_epoch=100 + j, idx_in_batch=j, iteration=3, epoch_idx=1) for j in range(4))
    back = pickle.loads(pickle.dumps(b, protocol=5))
    assert back.infos == expected and tuple(back.infos) == expected and list(back.infos) == list(expected)
    assert back.infos[-1] == expected[-1] and back.infos[1:3] == expected[1:3] and len(back.infos) == 4
    assert back.infos != expected[:3] and bool(back.infos)
    assert all(isinstance(x, SampleInfo) for x in back.infos)
    assert back.infos[0].idx_in_epoch == 100 and type(back.infos[0].idx_in_epoch) is int
