"""``fn.external_source(cycle=...)`` for iterable and generator sources (issue 12, DALI parity).

Every rule runs in this process (``parallel=False``) and in a dedicated worker, forked and spawned
(real processes, real shared memory), and must give the same batches in the same order. Each
batch here is ``([2k, 2k+1], [pass, pass])``: ``k`` is its place in one pass over the data and
``pass`` counts the ``iter()`` calls on the iterable, so a test sees both where the data stands and
whether it was restarted. Rules: `ray_extsrc.source`, NOTE [cycle]; the pool's side: NOTE
[iterable across epochs] in `ray_extsrc.workers.pool`.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import sources
from ray_extsrc import WorkerDiedError, pipeline_def
from ray_extsrc.pipeline import external_source
from ray_extsrc.types import SampleInfo

# Each test starts at most two pools; a spawned zygote imports numpy and this module first (0.4 s
# here, a few seconds on a loaded 2-core CI machine). 60 s is a hang, not a slow machine.
pytestmark = pytest.mark.timeout(60)

# Sources: module-level, so they pickle by reference for py_start_method="spawn".


def _batch(k: int, p: int) -> tuple[list, list]:
    return [np.int64([2 * k]), np.int64([2 * k + 1])], [np.int64([p])] * 2


class Batches:
    """An iterable of ``n`` batches; each ``iter()`` starts a new pass, numbered from 0."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.passes = 0

    def __iter__(self):
        p, self.passes = self.passes, self.passes + 1
        return (_batch(k, p) for k in range(self.n))


def three_batches():
    for k in range(3):
        yield _batch(k, -1)


def takes_an_argument(n):
    yield from (_batch(k, -1) for k in range(n))


class GeneratorCall:
    """A callable object whose ``__call__`` is a generator function (DALI treats it as one)."""

    def __call__(self):
        yield from three_batches()


class Labels:
    """Per-sample: sample i is ``[i]``, for three batches of two, then StopIteration."""

    def __call__(self, info: SampleInfo):
        if info.iteration >= 3:
            raise StopIteration
        return np.int64([info.idx_in_epoch])


class TwoBatches:
    """A batch callable whose epoch is two batches (it ends the epoch at iteration 2)."""

    def __call__(self, iteration: int):
        if iteration >= 2:
            raise StopIteration
        return [np.int64([iteration])] * 2


# (parallel, py_start_method): in this process, in a forked worker, in a spawned one
RUNS = {"in-process": (False, "fork"), "fork": (True, "fork"), "spawn": (True, "spawn")}


@pytest.fixture(params=list(RUNS))
def run(request) -> tuple[bool, str]:
    return RUNS[request.param]


def pipe_of(source, cycle=None, *, run=(False, "fork"), depth=2):
    parallel, method = run

    @pipeline_def(batch_size=2, num_threads=1, py_num_workers=2, py_start_method=method, prefetch_queue_depth=depth)
    def pipe():
        return external_source(source=source, num_outputs=2, batch=True, parallel=parallel, cycle=cycle)

    p = pipe()
    p.build()
    return p


def batch_id(outs, col=0) -> tuple[int, int]:
    """(k, pass) of a batch made by `_batch`, read from outputs ``col`` and ``col + 1``."""
    labels = outs[col].as_array().ravel().tolist()
    passes = outs[col + 1].as_array().ravel().tolist()
    assert labels[1] == labels[0] + 1 and passes[0] == passes[1], (labels, passes)
    return labels[0] // 2, passes[0]


def take(p, n: int, col=0) -> tuple[list[tuple[int, int]], bool]:
    """Up to ``n`` batches of the current epoch; whether it ended (then reset() was called)."""
    got = []
    for _ in range(n):
        try:
            outs = p.run()
        except StopIteration:
            p.reset()
            return got, True
        got.append(batch_id(outs, col))
    return got, False


def epochs(p, count: int, cap: int = 12) -> list[list[tuple[int, int]]]:
    out = []
    for _ in range(count):
        got, ended = take(p, cap)
        assert ended, f"the epoch did not end within {cap} batches: {got}"
        out.append(got)
    return out


# -- cycle=None: one pass ----------------------------------------------------------------------


def test_no_cycle_is_one_pass_over_an_iterable(run):
    p = pipe_of(Batches(3), run=run)
    try:
        assert epochs(p, 3) == [[(0, 0), (1, 0), (2, 0)], [], []]  # not restarted after reset()
    finally:
        p.close()


ONE_SHOT = {
    "generator function": lambda: three_batches,
    "generator object": lambda: three_batches(),
    "iterator": lambda: iter(list(three_batches())),
}


@pytest.mark.parametrize("kind", list(ONE_SHOT))
@pytest.mark.parametrize(  # the three spellings are one rule: spawned once, with None
    "where,cycle", [(w, c) for w in RUNS for c in (None, False, "no") if w != "spawn" or c is None]
)
def test_no_cycle_takes_iterators_and_generators_once(where, cycle, kind):
    run = RUNS[where]
    source = ONE_SHOT[kind]()
    if kind == "generator object" and where == "spawn":
        with pytest.raises(TypeError, match=r"generator object cannot be pickled.*generator function"):
            pipe_of(source, cycle, run=run)
        return
    p = pipe_of(source, cycle, run=run)
    try:
        assert epochs(p, 2) == [[(0, -1), (1, -1), (2, -1)], []]
    finally:
        p.close()


def test_no_cycle_continues_where_an_early_reset_left_it(run):
    # the worker computed batches 1 and 2 ahead (prefetch_queue_depth=2): they go to the next epoch
    p = pipe_of(Batches(4), run=run, depth=2)
    try:
        assert take(p, 1) == ([(0, 0)], False)
        p.reset()
        assert epochs(p, 2) == [[(1, 0), (2, 0), (3, 0)], []]
    finally:
        p.close()


# -- cycle=True / "quiet": wrap around ---------------------------------------------------------


@pytest.mark.parametrize("cycle", [True, "quiet"])
def test_quiet_wraps_around_and_never_ends_the_epoch(cycle, run):
    p = pipe_of(Batches(3), cycle, run=run)
    try:
        got, ended = take(p, 8)
        assert not ended
        assert got == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1), (0, 2), (1, 2)]
        p.reset()  # ends this epoch; the data goes on where it stood
        assert take(p, 2) == ([(2, 2), (0, 3)], False)
    finally:
        p.close()


def test_quiet_generator_function_is_called_again():
    p = pipe_of(three_batches, True)
    try:
        assert take(p, 5) == ([(0, -1), (1, -1), (2, -1), (0, -1), (1, -1)], False)
    finally:
        p.close()


@pytest.mark.parametrize("parallel", [False, True])
def test_quiet_source_without_data_ends_the_epoch_instead_of_spinning(parallel):
    p = pipe_of(Batches(0), "quiet", run=(parallel, "fork"))
    try:
        assert epochs(p, 2) == [[], []]
    finally:
        p.close()


# -- cycle="raise": StopIteration, then a fresh iter() every epoch -----------------------------


def test_raise_restarts_an_iterable_every_epoch(run):
    p = pipe_of(Batches(3), "raise", run=run)
    try:
        assert epochs(p, 3) == [[(0, e), (1, e), (2, e)] for e in range(3)]
    finally:
        p.close()


GENERATOR_FUNCTIONS = {
    "function": three_batches,
    "callable object": GeneratorCall(),
    "partial": functools.partial(takes_an_argument, 3),
}


@pytest.mark.parametrize(  # one spawned case is enough here
    "where,kind", [(w, k) for w in RUNS for k in GENERATOR_FUNCTIONS if w != "spawn" or k == "callable object"]
)
def test_raise_calls_a_generator_function_again_every_epoch(where, kind):
    p = pipe_of(GENERATOR_FUNCTIONS[kind], "raise", run=RUNS[where])
    try:
        assert epochs(p, 2) == [[(0, -1), (1, -1), (2, -1)]] * 2
    finally:
        p.close()


def test_raise_restarts_after_an_early_reset(run):
    p = pipe_of(Batches(3), "raise", run=run, depth=2)
    try:
        assert take(p, 1) == ([(0, 0)], False)
        p.reset()
        assert epochs(p, 1) == [[(0, 1), (1, 1), (2, 1)]]
    finally:
        p.close()


# -- alongside callables in one pipeline -------------------------------------------------------


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_quiet_iterable_next_to_a_parallel_per_sample_source(method):
    # the per-sample source (in the workers) ends each epoch after 3 batches; the in-process
    # iterable wraps around and carries on from epoch to epoch
    @pipeline_def(batch_size=2, num_threads=1, py_num_workers=2, py_start_method=method)
    def pipe():
        x = external_source(source=Labels(), batch=False, parallel=True)
        it, passes = external_source(source=Batches(2), num_outputs=2, batch=True, cycle=True)
        return x, it, passes

    p = pipe()
    try:
        p.build()
        seen = []
        for e in range(2):
            got = []
            while True:
                try:
                    outs = p.run()
                except StopIteration:
                    p.reset()
                    break
                assert outs[0].as_array().ravel().tolist() == [2 * len(got), 2 * len(got) + 1]
                got.append(batch_id(outs, col=1))
            seen.append(got)
        assert seen == [[(0, 0), (1, 0), (0, 1)], [(1, 1), (0, 2), (1, 2)]]
    finally:
        p.close()


def _next_to_batch_callable(parallel: bool, cycle):
    # graph order: the iterable, then an in-process batch callable that ends each epoch at
    # iteration 2 -- the iterable's batch of that iteration was already taken, and is dropped
    # (as DALI does for the sources of an iteration that another source stopped)
    @pipeline_def(batch_size=2, num_threads=1, py_num_workers=1, prefetch_queue_depth=2)
    def pipe():
        it, passes = external_source(source=Batches(5), num_outputs=2, batch=True, parallel=parallel, cycle=cycle)
        return it, passes, external_source(source=TwoBatches(), batch=True)

    p = pipe()
    try:
        p.build()
        return epochs(p, 4)
    finally:
        p.close()


@pytest.mark.parametrize("cycle", [None, "quiet", "raise"])
def test_iterable_next_to_a_batch_callable_same_in_a_worker_and_in_process(cycle):
    expected = {
        None: [[(0, 0), (1, 0)], [(3, 0), (4, 0)], [], []],
        "quiet": [[(0, 0), (1, 0)], [(3, 0), (4, 0)], [(1, 1), (2, 1)], [(4, 1), (0, 2)]],
        "raise": [[(0, e), (1, e)] for e in range(4)],
    }[cycle]
    assert _next_to_batch_callable(False, cycle) == expected
    assert _next_to_batch_callable(True, cycle) == expected


@pytest.mark.parametrize("cycle", [None, "quiet"])
def test_in_process_iterable_next_to_a_parallel_batch_callable(cycle):
    # the batch callable (in a worker) stops iteration 2 before the in-process iterable is asked:
    # nothing of the iterable is dropped, and it goes on where it stood
    @pipeline_def(batch_size=2, num_threads=1, py_num_workers=1)
    def pipe():
        it, passes = external_source(source=Batches(5), num_outputs=2, batch=True, cycle=cycle)
        return it, passes, external_source(source=TwoBatches(), batch=True, parallel=True)

    p = pipe()
    try:
        p.build()
        expected = {
            None: [[(0, 0), (1, 0)], [(2, 0), (3, 0)], [(4, 0)], []],
            "quiet": [[(0, 0), (1, 0)], [(2, 0), (3, 0)], [(4, 0), (0, 1)], [(1, 1), (2, 1)]],
        }[cycle]
        assert epochs(p, 4) == expected
    finally:
        p.close()


# -- a worker death ----------------------------------------------------------------------------


def test_one_pass_iterable_whose_worker_died_stays_failed_after_reset(tmp_path):
    src = sources.SuicideIterable(batch_size=2, iterations=4, victim=1, marker=str(tmp_path / "killed"))

    @pipeline_def(batch_size=2, num_threads=1, py_num_workers=1, prefetch_queue_depth=2)
    def pipe():
        return external_source(source=src, parallel=True, batch=True)

    p = pipe()
    try:
        p.build()
        assert p.run()[0].as_array().ravel().tolist() == [0, 1]
        with pytest.raises(WorkerDiedError, match=r"cycle=None.*after reset\(\) too.*cycle='raise'"):
            p.run()
        p.reset()  # a fresh iterator would serve batch 0 again
        with pytest.raises(WorkerDiedError, match=r"cycle=None"):
            p.run()
        assert len(p.py_worker_pids) == 1  # the pool itself was made whole
    finally:
        p.close()


# -- what is refused, and how it is said ---------------------------------------------------------


def define(**kw):
    @pipeline_def(batch_size=2, num_threads=1)
    def pipe():
        return external_source(**kw)

    return pipe()


@pytest.mark.parametrize("bad", ["yes", "Raise", 1, 0, np.True_])
def test_invalid_cycle_values_are_named(bad):
    with pytest.raises(ValueError, match=r"cycle=.* is not valid; use None, False or 'no'.*'quiet'.*'raise'"):
        define(source=Batches(2), cycle=bad, batch=True)


@pytest.mark.parametrize("cycle", [True, "quiet", "raise"])
def test_cycling_a_generator_object_asks_for_the_function(cycle):
    expected = rf"cycle={cycle!r}.*generator object runs only once.*source=gen, not source=gen\(\)"
    with pytest.raises(TypeError, match=expected):
        define(source=three_batches(), cycle=cycle)


@pytest.mark.parametrize("cycle", [True, "raise"])
def test_cycling_an_iterator_asks_for_the_iterable(cycle):
    with pytest.raises(TypeError, match=r"cycle=.*list_iterator is an iterator.*the list, not iter\(list\)"):
        define(source=iter([_batch(0, 0)]), cycle=cycle)


@pytest.mark.parametrize("cycle", [False, "no", True, "raise"])
@pytest.mark.parametrize("kw", [dict(source=Labels(), batch=False), dict(source=TwoBatches(), batch=True)],
                         ids=["per-sample", "batch"])
def test_cycle_on_a_callable_is_refused_as_in_dali(kw, cycle):
    with pytest.raises(ValueError, match=r"cycle=.* applies only to an iterable or a generator function.*drop cycle="):
        define(**kw, cycle=cycle)


def test_generator_function_with_arguments_is_refused():
    with pytest.raises(TypeError, match=r"called with no arguments.*takes_an_argument\(n\) requires n.*partial"):
        define(source=takes_an_argument)
