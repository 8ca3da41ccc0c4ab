"""DALI's PyTorch iterators over real pipelines (forked workers for parallel sources, in-process
sources otherwise): epochs by the pipeline, by ``size`` and by ``reader_name``; every last-batch
policy with and without ``last_batch_padded`` on an epoch that batches do not divide, one and two
shards; auto_reset, reset(), len(), several pipelines in one iterator; the tutorial-style loop.

Samples carry their own index, so every test checks exactly which samples each step returns.
The worked example throughout: N=10 samples, batch size 4.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import ray_extsrc.fn as fn
from ray_extsrc import Pipeline, pipeline_def
from ray_extsrc.plugin.base_iterator import LastBatchPolicy as BaseLastBatchPolicy
from ray_extsrc.plugin.pytorch import DALIClassificationIterator, DALIGenericIterator, LastBatchPolicy

# each test builds a few small pipelines (~0.1 s each with forked workers); 60 s is the loaded
# 2-core CI machine's margin for the slowest (the example's JPEG decoding)
pytestmark = pytest.mark.timeout(60)

N, B = 10, 4
FILL, DROP, PARTIAL = LastBatchPolicy.FILL, LastBatchPolicy.DROP, LastBatchPolicy.PARTIAL
# pipelines that serve their last round (last_batch_policy "pad"/"exact", `ray_extsrc.sharding`)
HAS_PAD = "last_batch_policy" in inspect.signature(Pipeline.__init__).parameters
needs_pad = pytest.mark.skipif(not HAS_PAD, reason="this Pipeline has no last_batch_policy (it drops its last round)")


class Stream:
    """An endless per-sample source over ``n`` samples, as a DALI reader streams: positions past
    the end wrap around. ``data`` is (sample, epoch_idx), ``label`` 100 + sample."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, info):
        i = info.idx_in_epoch % self.n
        return np.int64([i, info.epoch_idx]), np.int32([100 + i])


class Sized(Stream):
    """``n`` samples, then StopIteration; ``__len__`` tells the pipeline (and reader_name) so."""

    def __len__(self) -> int:
        return self.n

    def __call__(self, info):
        if info.idx_in_epoch >= self.n:
            raise StopIteration
        return super().__call__(info)


@pytest.fixture
def make():
    """make(source, shards=1, shard_id=0, parallel=True, name=None, last=None) -> a pipeline, closed
    after the test; ``last`` is the pipeline's own last_batch_policy ("drop", "pad", "exact")."""
    made = []

    def factory(source, *, shards=1, shard_id=0, parallel=True, name=None, batch_size=B, last=None):
        @pipeline_def(batch_size=batch_size, py_num_workers=2, num_shards=shards, shard_id=shard_id)
        def pipe():
            return fn.external_source(source, num_outputs=2, batch=False, parallel=parallel, name=name)

        p = pipe() if last is None else pipe(last_batch_policy=last)
        made.append(p)
        return p

    yield factory
    for p in made:
        p.close()


def sized_iterator(*args, **kwargs):
    """An iterator with size=: DALI warns that reader_name is the accurate way; so do we."""
    with pytest.warns(UserWarning, match="reader_name"):
        return DALIGenericIterator(*args, **kwargs)


def one_epoch(it) -> list[list[list[int]]]:
    """The samples of each step of one epoch: [step][pipeline] -> sample indices."""
    return [[d["data"][:, 0].tolist() for d in step] for step in it]


def epochs_of(step: list) -> set[int]:
    return {int(e) for d in step for e in d["data"][:, 1]}


# -- size=: the pipelines are endless streams, the iterator counts (DALI's legacy mode) ------------

SIZE_ONE_PIPELINE = {
    FILL: [[[0, 1, 2, 3]], [[4, 5, 6, 7]], [[8, 9, 0, 1]]],
    PARTIAL: [[[0, 1, 2, 3]], [[4, 5, 6, 7]], [[8, 9]]],
    DROP: [[[0, 1, 2, 3]], [[4, 5, 6, 7]]],
}
# two pipelines, shards 0 and 1 of 2: step i serves global batches 2i and 2i+1; DALI's PARTIAL
# returns exactly `size` samples, so its last step holds only the first pipeline's dict
SIZE_TWO_PIPELINES = {
    FILL: [[[0, 1, 2, 3], [4, 5, 6, 7]], [[8, 9, 0, 1], [2, 3, 4, 5]]],
    PARTIAL: [[[0, 1, 2, 3], [4, 5, 6, 7]], [[8, 9]]],
    DROP: [[[0, 1, 2, 3], [4, 5, 6, 7]]],
}


@pytest.mark.parametrize("parallel", [True, False], ids=["forked", "in-process"])
@pytest.mark.parametrize("padded", [False, True], ids=["wrap", "padded"])
@pytest.mark.parametrize("policy", [FILL, DROP, PARTIAL], ids=lambda p: p.name)
@pytest.mark.parametrize("shards", [1, 2])
def test_size_counts_samples_over_the_pipelines(make, shards, policy, padded, parallel):
    pipes = [make(Stream(N), shards=shards, shard_id=r, parallel=parallel) for r in range(shards)]
    it = sized_iterator(pipes, ["data", "label"], size=N, last_batch_policy=policy, last_batch_padded=padded)
    expected = (SIZE_ONE_PIPELINE if shards == 1 else SIZE_TWO_PIPELINES)[policy]
    assert it.size == N
    assert len(it) == len(expected)
    first = one_epoch(it)
    assert first == expected
    # the next `for` resets (as DALI's iter() does); every pipeline restarts its epoch at sample 0,
    # so the next epoch is the same for both last_batch_padded values (see base_iterator)
    steps = list(it)
    assert [[d["data"][:, 0].tolist() for d in s] for s in steps] == expected
    assert all(epochs_of(s) == {1} for s in steps)


def test_size_per_shard_in_one_pipeline_per_process(make):
    # DDP style: each rank's iterator holds its own shard's pipeline and size is that shard's share;
    # this shows why DALI recommends reader_name: shard 1's last batch repeats a sample (2) and
    # sample 9 is never returned, because size cannot say where a shard's samples lie
    got = []
    for r in range(2):
        it = sized_iterator(make(Stream(N), shards=2, shard_id=r), ["data", "label"], size=5, last_batch_policy=PARTIAL)
        assert len(it) == 2
        got.append(one_epoch(it))
    assert got == [[[[0, 1, 2, 3]], [[8]]], [[[4, 5, 6, 7]], [[2]]]]


def test_size_larger_than_what_the_pipeline_serves_is_refused(make):
    with pytest.warns(UserWarning, match="reader_name"), pytest.raises(ValueError, match=r"needs 10 batches .* epoch_size\(\) is 2"):
        DALIGenericIterator(make(Sized(N)), ["data", "label"], size=4 * N, last_batch_policy=DROP)


def test_a_pipeline_that_ends_before_size_is_an_error_not_a_silent_short_epoch(make):
    class Short(Stream):  # no __len__: the iterator learns of the end only when it comes
        def __call__(self, info):
            if info.idx_in_epoch >= 6:
                raise StopIteration
            return super().__call__(info)

    it = sized_iterator(make(Short(N)), ["data", "label"], size=N)
    next(it)
    with pytest.raises(ValueError, match="ended its epoch .* after 1 batches"):
        next(it)


@needs_pad
@pytest.mark.parametrize("padded", [False, True], ids=["wrap", "padded"])
@pytest.mark.parametrize(("policy", "last"), [(FILL, [8, 9, 0, 1]), (PARTIAL, [8, 9])], ids=["FILL", "PARTIAL"])
def test_size_over_a_pipeline_that_pads_its_last_round(make, policy, last, padded):
    it = sized_iterator(make(Sized(N), last="pad"), ["data", "label"], size=N, last_batch_policy=policy, last_batch_padded=padded)
    assert one_epoch(it) == [[[0, 1, 2, 3]], [[4, 5, 6, 7]], [last]]
    assert one_epoch(it) == [[[0, 1, 2, 3]], [[4, 5, 6, 7]], [last]]


@pytest.mark.parametrize("policy", [FILL, PARTIAL], ids=lambda p: p.name)
def test_size_past_a_pipeline_that_drops_its_last_round_is_refused(make, policy):
    fix = "last_batch_policy='pad'" if HAS_PAD else "cannot serve them"
    with pytest.warns(UserWarning, match="reader_name"), pytest.raises(ValueError, match=fix):
        DALIGenericIterator(make(Sized(N)), ["data", "label"], size=N, last_batch_policy=policy)


# -- reader_name: the named source's __len__ is the epoch, the pipelines' shards split it ----------

# per shard; shard r serves global batches r, r+R, ...; the tail is global batch E*R + r
READER = {
    (1, FILL): [[[[0, 1, 2, 3]], [[4, 5, 6, 7]], [[8, 9, 0, 1]]]],
    (1, PARTIAL): [[[[0, 1, 2, 3]], [[4, 5, 6, 7]], [[8, 9]]]],
    (1, DROP): [[[[0, 1, 2, 3]], [[4, 5, 6, 7]]]],
    (2, FILL): [[[[0, 1, 2, 3]], [[8, 9, 0, 1]]], [[[4, 5, 6, 7]], [[2, 3, 4, 5]]]],
    (2, PARTIAL): [[[[0, 1, 2, 3]], [[8, 9]]], [[[4, 5, 6, 7]], [[]]]],
    (2, DROP): [[[[0, 1, 2, 3]]], [[[4, 5, 6, 7]]]],
}
READER_SIZE = {(1, FILL): 12, (1, PARTIAL): 12, (1, DROP): 10, (2, FILL): 8, (2, PARTIAL): 8, (2, DROP): 5}


def _reader_case(policy, last):
    return pytest.param(policy, last, marks=() if last == "drop" else needs_pad, id=f"{policy.name}-{last}")


@pytest.mark.parametrize(
    ("policy", "last"),
    [_reader_case(DROP, "drop"), _reader_case(DROP, "pad"), _reader_case(FILL, "pad"), _reader_case(FILL, "exact"),
     _reader_case(PARTIAL, "pad"), _reader_case(PARTIAL, "exact")],
)
@pytest.mark.parametrize("shards", [1, 2])
def test_reader_name_epoch_per_shard(make, shards, policy, last):
    got = []
    for r in range(shards):  # one iterator per rank, as in DDP
        pipe = make(Sized(N), shards=shards, shard_id=r, parallel=r == 0, name="Reader", last=None if last == "drop" else last)
        it = DALIGenericIterator(pipe, ["data", "label"], reader_name="Reader", last_batch_policy=policy)
        assert it.size == READER_SIZE[shards, policy]
        assert len(it) == len(READER[shards, policy][r])  # equal on every rank: DDP stays in step
        got.append([one_epoch(it), one_epoch(it)])
    assert [e[0] for e in got] == READER[shards, policy]
    assert [e[1] for e in got] == READER[shards, policy]


@needs_pad
def test_reader_name_with_two_pipelines_in_one_iterator(make):
    pipes = [make(Sized(N), shards=2, shard_id=r, name="Reader", last="exact") for r in range(2)]
    it = DALIGenericIterator(pipes, ["data", "label"], reader_name="Reader", last_batch_policy=PARTIAL)
    assert len(it) == 2
    assert one_epoch(it) == [[[0, 1, 2, 3], [4, 5, 6, 7]], [[8, 9], []]]


@pytest.mark.parametrize("policy", [FILL, DROP, PARTIAL], ids=lambda p: p.name)
def test_reader_name_when_the_batches_divide_the_epoch(make, policy):
    pipes = [make(Sized(16), shards=2, shard_id=r, name="Reader") for r in range(2)]
    it = DALIGenericIterator(pipes, ["data", "label"], reader_name="Reader", last_batch_policy=policy)
    assert (len(it), it.size) == (2, 8)
    assert one_epoch(it) == [[[0, 1, 2, 3], [4, 5, 6, 7]], [[8, 9, 10, 11], [12, 13, 14, 15]]]


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("policy", [FILL, PARTIAL], ids=lambda p: p.name)
def test_reader_name_over_a_pipeline_that_drops_its_last_round_says_how_to_fix_it(make, policy, shards):
    fix = "last_batch_policy='pad'" if HAS_PAD else "cannot serve them"
    pipe = make(Sized(N), name="Reader", shards=shards)
    with pytest.raises(ValueError, match=fix):
        DALIGenericIterator(pipe, ["data", "label"], reader_name="Reader", last_batch_policy=policy)


def test_reader_name_refusals(make):
    with pytest.raises(ValueError, match="not both"):
        DALIGenericIterator(make(Sized(N)), ["data", "label"], reader_name="Reader", size=N)
    with pytest.raises(ValueError, match="last_batch_padded"):
        DALIGenericIterator(make(Sized(N)), ["data", "label"], reader_name="Reader", last_batch_padded=True)
    with pytest.raises(ValueError, match="__len__"):
        DALIGenericIterator(make(Stream(N), name="Reader"), ["data", "label"], reader_name="Reader", last_batch_policy=DROP)

    class One(Sized):  # one output: (sample, epoch_idx)
        def __call__(self, info):
            return super().__call__(info)[0]

    @pipeline_def(batch_size=B)
    def two_readers():
        a = fn.external_source(One(N), batch=False, name="A")
        b = fn.external_source(One(N), batch=False, name="B")
        return a, b

    pipe = two_readers()
    try:
        if any(hasattr(n.op, "instance_name") for n in pipe.graph.nodes):
            it = DALIGenericIterator(pipe, ["a", "b"], reader_name="B", last_batch_policy=DROP)
            assert len(it) == 2
            with pytest.raises(ValueError, match="'Nope'"):
                DALIGenericIterator(pipe, ["a", "b"], reader_name="Nope", last_batch_policy=DROP)
        else:  # this fn.external_source drops name=: two sized sources cannot be told apart
            with pytest.raises(ValueError, match="only source with __len__; it has 2"):
                DALIGenericIterator(pipe, ["a", "b"], reader_name="B", last_batch_policy=DROP)
    finally:
        pipe.close()


# -- the pipeline's own epoch (size=-1), auto_reset, reset(), len() --------------------------------


@pytest.mark.parametrize("parallel", [True, False], ids=["forked", "in-process"])
def test_without_size_the_source_ends_the_epoch(make, parallel):
    it = DALIGenericIterator(make(Sized(N), parallel=parallel), ["data", "label"], last_batch_policy=PARTIAL)
    assert it.size == -1
    assert len(it) == 2  # the pipeline's epoch_size() (DALI says 0)
    assert one_epoch(it) == [[[0, 1, 2, 3]], [[4, 5, 6, 7]]]
    with pytest.raises(StopIteration):
        next(it)  # stays ended until reset
    it.reset()
    step = next(it)
    assert step[0]["data"][:, 0].tolist() == [0, 1, 2, 3] and epochs_of(step) == {1}


@needs_pad
@pytest.mark.parametrize(("last", "tail"), [("pad", [8, 9, 0, 1]), ("exact", [8, 9])])
def test_without_size_the_pipelines_last_round_is_returned_as_it_marks_it(make, last, tail):
    # DALI returns a pipeline's batches as they come, a source's short last batch included;
    # an "exact" pipeline's padding is what a DALI source would not have returned
    it = DALIGenericIterator(make(Sized(N), last=last), ["data", "label"])
    assert len(it) == 3
    assert one_epoch(it) == [[[0, 1, 2, 3]], [[4, 5, 6, 7]], [tail]]


@pytest.mark.parametrize("auto_reset", [True, "yes"])
def test_auto_reset_starts_the_next_epoch_itself(make, auto_reset):
    with pytest.warns(UserWarning):
        it = DALIGenericIterator(make(Stream(N)), ["data", "label"], size=8, auto_reset=auto_reset)
    assert [next(it)[0]["data"][:, 0].tolist() for _ in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(StopIteration):
        next(it)
    step = next(it)  # no reset() called
    assert step[0]["data"][:, 0].tolist() == [0, 1, 2, 3] and epochs_of(step) == {1}


@pytest.mark.parametrize("auto_reset", [False, "no", None])
def test_without_auto_reset_the_epoch_stays_ended(make, auto_reset):
    it = DALIGenericIterator(make(Sized(8)), ["data", "label"], auto_reset=auto_reset)
    assert len(one_epoch(it)) == 2
    for _ in range(2):
        with pytest.raises(StopIteration):
            next(it)
    it.reset()
    assert next(it)[0]["data"][:, 1].tolist() == [1, 1, 1, 1]


def test_auto_reset_values_outside_dalis_are_refused(make):
    with pytest.raises(ValueError, match="auto_reset"):
        DALIGenericIterator(make(Sized(N)), ["data", "label"], auto_reset="sometimes")


def test_auto_reset_with_the_pipelines_own_epoch(make):
    it = DALIGenericIterator(make(Sized(8)), ["data", "label"], auto_reset=True)
    assert len(one_epoch(it)) == 2
    step = next(it)
    assert epochs_of(step) == {1}


def test_reset_in_the_middle_of_an_epoch_is_ignored_as_in_dali(make, caplog):
    with pytest.warns(UserWarning):
        it = DALIGenericIterator(make(Stream(N)), ["data", "label"], size=N)
    assert next(it)[0]["data"][:, 0].tolist() == [0, 1, 2, 3]
    with caplog.at_level(logging.WARNING, logger="ray_extsrc.plugin.base_iterator"):
        it.reset()
    assert "does not support resetting while epoch is not finished" in caplog.text
    assert next(it)[0]["data"][:, 0].tolist() == [4, 5, 6, 7]


def test_reset_without_size_restarts_at_once(make):
    # with the pipeline's own epoch DALI always resets (the pipeline may stop anywhere)
    it = DALIGenericIterator(make(Sized(N)), ["data", "label"])
    next(it)
    it.reset()
    step = next(it)
    assert step[0]["data"][:, 0].tolist() == [0, 1, 2, 3] and epochs_of(step) == {1}


@pytest.mark.parametrize("prepare", [True, False])
def test_prepare_first_batch_runs_the_first_batch_when_the_iterator_is_made(make, prepare):
    pipe = make(Sized(N))
    it = DALIGenericIterator(pipe, ["data", "label"], prepare_first_batch=prepare)
    assert pipe.position()["consumed_batches"] == (1 if prepare else 0)
    iter(it)  # a fresh iterator is not reset by iter(), its buffered batch stays
    assert one_epoch(it) == [[[0, 1, 2, 3]], [[4, 5, 6, 7]]]


def test_no_data_for_a_full_batch_is_reported(make):
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="no data in the pipeline"):
        DALIGenericIterator(make(Stream(N)), ["data", "label"], size=3, last_batch_policy=DROP)


# -- outputs -----------------------------------------------------------------------------------------


def test_classification_iterator_yields_data_and_label(make):
    it = DALIClassificationIterator(make(Sized(N)), last_batch_policy=DROP)
    step = next(it)
    assert isinstance(step, list) and len(step) == 1 and list(step[0]) == ["data", "label"]
    data, label = step[0]["data"], step[0]["label"]
    assert isinstance(data, torch.Tensor) and data.device.type == "cpu"
    assert (data.dtype, tuple(data.shape), label.dtype, tuple(label.shape)) == (torch.int64, (B, 2), torch.int32, (B, 1))
    assert label[:, 0].tolist() == [100 + i for i in data[:, 0].tolist()]


def test_output_map_names_in_order_and_last_partial_batch_is_a_view(make):
    with pytest.warns(UserWarning):
        it = DALIGenericIterator(make(Stream(N)), ["x", "y"], size=N, last_batch_policy=PARTIAL)
    steps = list(it)
    assert [list(s[0]) for s in steps] == [["x", "y"]] * 3
    assert [tuple(s[0]["y"].shape) for s in steps] == [(4, 1), (4, 1), (2, 1)]


def test_arguments_dali_refuses_or_we_do_not_implement(make):
    pipe = make(Sized(N))
    with pytest.raises(ValueError, match="distinct"):
        DALIGenericIterator(pipe, ["a", "a"])
    with pytest.raises(ValueError, match="2 outputs"):
        DALIGenericIterator(pipe, ["only"])
    with pytest.raises(TypeError, match="output_map"):
        DALIGenericIterator(pipe, "data")
    with pytest.raises(ValueError, match="LastBatchPolicy"):
        DALIGenericIterator(pipe, ["data", "label"], last_batch_policy="PARTIAL")
    with pytest.raises(ValueError, match="size cannot be 0"):
        DALIGenericIterator(pipe, ["data", "label"], size=0)
    with pytest.raises(ValueError, match="one pipeline only"):
        DALIGenericIterator([pipe, make(Sized(N))], ["data", "label"])
    with pytest.raises(ValueError, match="same batch_size"):
        DALIGenericIterator([pipe, make(Sized(N), batch_size=2)], ["data", "label"], reader_name="R", last_batch_policy=DROP)
    with pytest.raises(TypeError, match="Pipeline"):
        DALIGenericIterator(["not a pipeline"], ["data", "label"])
    with pytest.raises(TypeError, match="unexpected keyword"):
        DALIGenericIterator(pipe, ["data", "label"], enable_checkpointing=True)
    it = DALIGenericIterator(pipe, ["data", "label"], dynamic_shape=True)  # DALI: backward compatibility only
    with pytest.raises(ValueError, match="checkpoint"):
        it.checkpoints()


@pytest.mark.parametrize(("fill", "policy"), [(True, FILL), (False, PARTIAL)])
def test_fill_last_batch_is_deprecated_and_mapped(make, fill, policy):
    with pytest.warns(FutureWarning, match="fill_last_batch"), pytest.warns(UserWarning, match="reader_name"):
        it = DALIGenericIterator(make(Stream(N)), ["data", "label"], size=N, fill_last_batch=fill)
    assert one_epoch(it) == SIZE_ONE_PIPELINE[policy]


def test_last_batch_policy_is_one_enum_for_both_modules():
    assert LastBatchPolicy is BaseLastBatchPolicy
    assert [p.name for p in LastBatchPolicy] == ["FILL", "DROP", "PARTIAL"]


# -- a DALI tutorial-style loop --------------------------------------------------------------------


def test_tutorial_loop_over_two_epochs(make):
    pipe = make(Sized(N), name="Reader")
    it = DALIClassificationIterator(pipe, reader_name="Reader", last_batch_policy=DROP, auto_reset=True)
    seen = []
    for epoch in range(2):
        for i, data in enumerate(it):
            labels = data[0]["label"].squeeze(-1).long()
            seen.append((epoch, i, (labels - 100).tolist()))
    assert seen == [(0, 0, [0, 1, 2, 3]), (0, 1, [4, 5, 6, 7]), (1, 0, [0, 1, 2, 3]), (1, 1, [4, 5, 6, 7])]


def test_the_example_trains_on_the_synthetic_jpegs(tmp_path):
    path = Path(__file__).resolve().parent.parent / "examples" / "dali_pytorch_iterator.py"
    spec = importlib.util.spec_from_file_location("dali_pytorch_iterator", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # NoGPUWarning: "mixed" decoding on the CPU
        result = example.main(["--data", str(tmp_path / "images"), "--epochs", "2", "--images", "40"])
    assert result["steps"] == [5, 5]  # 40 images, batch 8, PARTIAL: every image once per epoch
    assert result["samples"] == [40, 40]


# -- GPU outputs -------------------------------------------------------------------------------------


def _gpu_ok() -> bool:
    from ray_extsrc.gpu_probe import gpu_available

    if not gpu_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _image(info):
    return ((np.arange(6 * 5 * 3).reshape(6, 5, 3) + info.idx_in_epoch) % 256).astype(np.uint8)


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ok(), reason="needs a GPU with CuPy and a CUDA build of torch")
def test_gpu_outputs_are_cuda_tensors_ordered_after_the_pipeline():
    @pipeline_def(batch_size=B, device_id=0, py_num_workers=1)
    def pipe():
        images = fn.external_source(_image, batch=False, parallel=True, layout="HWC")
        return fn.flip(images, horizontal=1, device="gpu"), images

    p = pipe()
    try:
        with pytest.warns(UserWarning, match="reader_name"):
            it = DALIGenericIterator(p, ["gpu", "cpu"], size=3 * B, last_batch_policy=PARTIAL)
        side = torch.cuda.Stream()
        for k in range(3):
            # the batch is taken on torch's default stream, then on a side stream: either way a
            # kernel queued right after it on that stream sees the finished batch
            with torch.cuda.stream(side) if k == 1 else contextlib.nullcontext():
                step = next(it)
                copy = step[0]["gpu"].clone()
            torch.cuda.synchronize()
            g, c = step[0]["gpu"], step[0]["cpu"]
            assert (g.device.type, g.device.index, c.device.type) == ("cuda", 0, "cpu")
            assert g.dtype == torch.uint8 and tuple(g.shape) == (B, 6, 5, 3)
            assert torch.equal(copy.cpu(), c.flip(2)) and torch.equal(g.cpu(), c.flip(2))
        with pytest.raises(StopIteration):
            next(it)
    finally:
        p.close()
