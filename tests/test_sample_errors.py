"""The bad-sample policy's rules on their own (`sample_errors`); the pipeline and Loader paths that
use them are in tests/test_bad_samples.py."""

from __future__ import annotations

import logging

import pytest

from ray_extsrc.errors import DecodeError, SourceError
from ray_extsrc.sample_errors import ErrorPolicy, SkipLog, TooManyBadSamplesError, substitute_slot

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("kwargs, match", [
    ({"on_error": "ignore"}, "on_error must be one of"),
    ({"max_error_rate": 1.5}, "max_error_rate"),
    ({"max_error_rate": float("nan")}, "max_error_rate"),
    ({"max_error_rate": True}, "max_error_rate"),
    ({"max_attempts": 0}, "max_attempts"),
])
def test_bad_settings_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ErrorPolicy(**kwargs)


def test_the_substitute_is_a_function_of_seed_epoch_sample_and_attempt():
    draws = [substitute_slot(7, 2, 41, a, 1000) for a in range(8)]
    assert draws == [substitute_slot(7, 2, 41, a, 1000) for a in range(8)]  # every process, every restart
    assert len(set(draws)) > 4 and all(0 <= d < 1000 for d in draws)  # attempts draw different slots
    assert substitute_slot(7, 3, 41, 0, 1000) != substitute_slot(7, 2, 41, 0, 1000) or \
        substitute_slot(8, 2, 41, 0, 1000) != substitute_slot(7, 2, 41, 0, 1000)
    spread = {substitute_slot(0, 0, i, 0, 10) for i in range(200)}
    assert spread == set(range(10))
    with pytest.raises(ValueError, match="no slot"):
        substitute_slot(0, 0, 0, 0, 0)


def test_each_skip_is_counted_and_logged_once_with_its_index_and_error(caplog):
    log = SkipLog(ErrorPolicy("skip", max_error_rate=0.5), name="train")
    err = DecodeError("sample idx_in_epoch=5: not a JPEG\nmore detail", idx_in_epoch=5)
    with caplog.at_level(logging.WARNING, logger="ray_extsrc"):
        log.record(err, 0, 5, substitute=17, epoch_samples=100, seen_samples=10)
        log.record(err, 0, 5, substitute=17, epoch_samples=100, seen_samples=10)  # the same batch replayed
    assert log.count == 1 and log.epoch_count(0) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "ray_extsrc 'train': skipped sample idx_in_epoch=5 of epoch 0 (DecodeError: sample idx_in_epoch=5: "
        "not a JPEG); substitute: idx_in_epoch=17 (on_error='skip', 1 skipped this epoch)"]
    snap = log.snapshot()
    assert snap["skipped_samples"] == 1
    assert snap["skipped"] == [{"epoch_idx": 0, "idx_in_epoch": 5, "error": "DecodeError: sample idx_in_epoch=5: "
                                "not a JPEG", "substitute": 17}]


def test_a_flood_past_max_error_rate_fails_the_epoch_naming_the_samples():
    log = SkipLog(ErrorPolicy("skip", max_error_rate=0.02))
    for i in range(2):  # 2% of 100: two skips are within budget
        log.record(SourceError(f"boom {i}"), 3, i, substitute=50, epoch_samples=100, seen_samples=i)
    with pytest.raises(TooManyBadSamplesError, match=r"3 samples failed in epoch 3.*idx_in_epoch: 0, 1, 2") as e:
        log.record(SourceError("boom 2"), 3, 2, substitute=50, epoch_samples=100, seen_samples=2)
    assert isinstance(e.value.__cause__, SourceError)
    log.record(SourceError("next epoch"), 4, 0, substitute=1, epoch_samples=100, seen_samples=0)  # a new budget


def test_without_an_epoch_length_the_rate_is_judged_on_the_samples_seen():
    log = SkipLog(ErrorPolicy("skip", max_error_rate=0.01))
    for i in range(5):  # too early to judge: fewer than 100 samples seen
        log.record(SourceError("x"), 0, i, substitute=None, epoch_samples=None, seen_samples=10 + i)
    with pytest.raises(TooManyBadSamplesError, match="max_error_rate=0.01"):
        log.record(SourceError("x"), 0, 99, substitute=None, epoch_samples=None, seen_samples=200)
    assert SkipLog(ErrorPolicy("skip", max_error_rate=0.001)).budget(10, 0) == 1  # a rate > 0 allows one
    assert SkipLog(ErrorPolicy("skip", max_error_rate=0.0)).budget(10, 0) == 0
