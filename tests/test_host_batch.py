"""`HostBatch` as a consumer-side GPU stage reads it, and the in-batch substitute it gets under
``on_error="skip"`` (`executor.substitutes.with_rows` on the batch's env)."""

from __future__ import annotations

import numpy as np
import pytest

from ray_extsrc.executor.substitutes import with_rows
from ray_extsrc.host_batch import HostBatch, PackedBytes, Rows, StackedArrays, pack_column, unpack_column
from ray_extsrc.tensors import assemble_cpu
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
    assert isinstance(env[7][1], Rows) and isinstance(got[7][1], list)  # read-only rows: a list is changed
    assert env[7][1].array[:, 0].tolist() == [0, 10, 20, 30]


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


def _columns() -> dict[str, list]:
    return {
        "boxes": [np.array([j, 2 * j, 3, 4], np.int32) for j in range(5)],
        "labels": [np.int64(7 * j) for j in range(5)],  # NumPy scalars
        "zero_d": [np.array(1.5 * j) for j in range(5)],  # 0-d arrays stay 0-d arrays
        "images": [np.full((2, 3, 3), j, np.uint8) for j in range(5)],
    }


def _old_samples(col: StackedArrays) -> list:
    """What `StackedArrays.samples` gave before `Rows`."""
    d = col.data
    return list(d) if col.scalars else [d[j, ...] for j in range(len(d))]


def _same(got, want) -> bool:
    return len(got) == len(want) and all(
        type(a) is type(b) and np.shape(a) == np.shape(b) and a.dtype == b.dtype and np.array_equal(a, b)
        for a, b in zip(got, want))


@pytest.mark.parametrize("name", list(_columns()))
def test_a_stacked_column_reads_as_rows_giving_the_items_the_list_gave(name):
    import pickle

    col = pack_column(_columns()[name])
    rows, old = unpack_column(col), _old_samples(col)
    assert isinstance(col, StackedArrays) and isinstance(rows, Rows)
    assert rows.array is col.data and rows.scalars == col.scalars == (name == "labels")
    assert len(rows) == 5 and rows
    assert _same(list(rows), old) and _same([x for x in rows], old) and _same(rows[:], old)
    assert _same([rows[j] for j in range(5)], old) and _same([rows[j] for j in range(-5, 0)], old)
    assert _same([rows[np.int64(j)] for j in range(5)], old)
    assert isinstance(rows[1:4], list) and _same(rows[1:4], old[1:4]) and _same(rows[::-2], old[::-2])
    assert rows[7:] == [] and _same(list(reversed(rows)), old[::-1])
    if not rows.scalars:
        assert all(np.shares_memory(x, col.data) for x in rows)  # views, as before
    with pytest.raises(IndexError):
        rows[5]
    with pytest.raises(TypeError):
        rows[0] = old[1]  # read-only: whoever changes a column makes a list of it
    back = pickle.loads(pickle.dumps(rows, protocol=5))
    assert isinstance(back, Rows) and _same(list(back), old) and back.scalars == rows.scalars


@pytest.mark.parametrize("name", list(_columns()))
def test_assemble_cpu_of_rows_is_the_stacked_copy_the_list_gave(name):
    col = pack_column(_columns()[name])
    rows = unpack_column(col)
    got, want = assemble_cpu(rows, "HWC"), assemble_cpu(_old_samples(col), "HWC")
    assert got.is_dense and want.is_dense and got.layout() == "HWC"
    a, b = got.as_array(), want.as_array()
    assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    assert not np.shares_memory(a, col.data)  # a private copy: the batch's buffer is not kept
    fortran = assemble_cpu(Rows(np.asfortranarray(col.data), col.scalars)).as_array()
    assert fortran.flags.c_contiguous and np.array_equal(fortran, b)  # laid out as np.stack lays it out
    empty = assemble_cpu(Rows(col.data[:0], col.scalars))
    assert not empty.is_dense and len(empty) == 0  # as an empty list gives


def test_packed_bytes_samples_are_the_same_views():
    values = [np.arange(n, dtype=np.uint8) for n in (3, 0, 5, 1)]
    col = pack_column(values)
    assert isinstance(col, PackedBytes)
    got = col.samples()
    o = col.offsets
    want = [col.data[o[j]: o[j + 1]] for j in range(len(col))]  # before: NumPy-scalar bounds
    assert _same(got, want) and _same(got, values) and isinstance(got, list)
    assert all(np.shares_memory(a, col.data) for a in got if a.size)


def test_packed_samples_are_read_only_views_that_name_their_buffer():
    import pickle

    from ray_extsrc.host_batch import PackedSamples

    values = [np.arange(n, dtype=np.uint8) for n in (3, 0, 5)]
    column = pack_column(values)
    samples = column.samples()
    assert isinstance(samples, PackedSamples) and samples.packed is column
    assert all(np.shares_memory(s, column.data) for s in samples if s.size)
    assert [s.tolist() for s in samples] == [v.tolist() for v in values]
    for change in (lambda s: s.__setitem__(0, values[0]), lambda s: s.append(values[0]), lambda s: s.sort()):
        with pytest.raises(TypeError, match="read-only"):
            change(samples)
    copy = list(samples)
    copy[0] = values[2]  # a copy is an ordinary list
    back = pickle.loads(pickle.dumps(samples))
    assert type(back) is list and [s.tolist() for s in back] == [v.tolist() for v in values]


def test_the_decoder_takes_packed_addresses_from_the_offsets():
    from ray_extsrc.fn._gpu.decode import _host_addresses

    values = [np.arange(n, dtype=np.uint8) for n in (3, 7, 1, 5)]
    samples = pack_column(values).samples()
    ok = np.array([0, 1, 3])
    src, lengths, _ = _host_addresses(samples, ok)
    assert lengths.tolist() == [3, 7, 5]
    assert src.tolist() == [samples[j].ctypes.data for j in ok]
    # any other sequence: one sample at a time, the same answer
    src2, lengths2, keep = _host_addresses(list(samples), ok)
    assert src2.tolist() == src.tolist() and lengths2.tolist() == lengths.tolist() and len(keep) == 3
    src3, lengths3, _ = _host_addresses([v.tobytes() for v in values], ok)
    assert lengths3.tolist() == [3, 7, 5]


def test_a_sample_info_pickles_as_its_four_fields_and_stays_frozen():
    import copy
    import dataclasses
    import pickle
    import pickletools

    info = SampleInfo(idx_in_epoch=70, idx_in_batch=6, iteration=4, epoch_idx=2)
    for proto in (2, 5):
        data = pickle.dumps(info, protocol=proto)
        ops = {op.name for op, _, _ in pickletools.genops(data)}
        assert "BUILD" not in ops  # constructed from its ints: no state set afterwards, object by object
        back = pickle.loads(data)
        assert back == info and type(back) is SampleInfo and hash(back) == hash(info)
    assert copy.deepcopy(info) == info and copy.copy(info) == info
    with pytest.raises(dataclasses.FrozenInstanceError):
        back.iteration = 5


def test_bytes_are_packed_into_the_room_given_and_other_columns_ignore_it():
    from ray_extsrc.host_batch import packed_size

    encoded = [np.full(5 + j, j, np.uint8) for j in range(4)]
    labels = [np.int64(j) for j in range(4)]
    assert packed_size(encoded) == 26 and packed_size(labels) is None and packed_size([]) is None
    room = np.zeros(40, np.uint8)
    col = pack_column(encoded, room)
    assert isinstance(col, PackedBytes) and col.data.base is room and np.shares_memory(col.data, room)
    assert [x.tolist() for x in col.samples()] == [a.tolist() for a in encoded] and room[26:].tolist() == [0] * 14
    assert isinstance(pack_column(labels, room), StackedArrays)  # not bytes: packed as before
    with pytest.raises(ValueError, match="at least 26 bytes"):
        pack_column(encoded, np.zeros(25, np.uint8))
