"""Pipeline arguments DALI has and we do not implement are refused by name; a GPU pipeline dropped
without close() gives back its hold on the process's GPU decode threads (issue 12 bugs 4 and 5)."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import ray_extsrc.fn as fn
import ray_extsrc.pipeline as pipeline_mod
from ray_extsrc import pipeline_def
from ray_extsrc.fn._gpu import decode

pytestmark = pytest.mark.timeout(60)


def _source(info):
    if info.iteration >= 2:
        raise StopIteration
    return np.zeros(4, np.uint8)


@pytest.mark.parametrize("arg", [{"set_affinity": True}, {"max_streams": 4}])
def test_unimplemented_pipeline_arguments_are_refused_by_name(arg):
    @pipeline_def(batch_size=2, py_num_workers=1)
    def p():
        return fn.external_source(_source, batch=False, parallel=True)

    with pytest.raises(ValueError, match=next(iter(arg))):
        p(**arg)


def test_defaults_of_those_arguments_are_accepted():
    @pipeline_def(batch_size=2, py_num_workers=1, set_affinity=False, max_streams=-1)
    def p():
        return fn.external_source(_source, batch=False, parallel=True)

    pipe = p()
    pipe.close()


def test_a_gpu_pipeline_dropped_without_close_releases_the_decode_threads(monkeypatch):
    # Plan as a GPU process would (the ops get their GPU placement) without running a GPU op:
    # building takes the hold on the decode threads; dropping the pipeline must give it back.
    monkeypatch.setattr(pipeline_mod, "gpu_available", lambda: True)

    @pipeline_def(batch_size=2, py_num_workers=1, device_id=0)
    def p():
        return fn.decoders.image(fn.external_source(_source, batch=False, parallel=True), device="mixed")

    before = decode._users
    pipe = p()
    pipe.build()
    assert decode._users == before + 1
    del pipe
    gc.collect()
    assert decode._users == before


@pytest.mark.parametrize("n", [0, -1, 1.5])
def test_py_num_workers_must_be_positive(n):
    @pipeline_def(batch_size=2)
    def p():
        return fn.external_source(_source, batch=False, parallel=True)

    with pytest.raises(ValueError, match="py_num_workers"):
        p(py_num_workers=n)


def test_outputs_carry_their_real_layout():
    simplejpeg = pytest.importorskip("simplejpeg")
    jpeg = np.frombuffer(simplejpeg.encode_jpeg(np.zeros((16, 16, 3), np.uint8)), np.uint8)

    def src(info):
        if info.iteration >= 1:
            raise StopIteration
        return jpeg, np.zeros((4, 4, 3), np.uint8), np.int32([0])

    @pipeline_def(batch_size=2, py_num_workers=1)
    def p():
        jpegs, raw, labels = fn.external_source(src, num_outputs=3, batch=False, parallel=True,
                                                layout=["", "HWC", ""])
        images = fn.decoders.image(jpegs)
        return (images, fn.resize(images, size=(8, 8)), fn.crop_mirror_normalize(images),
                fn.crop_mirror_normalize(images, output_layout="HWC"), fn.flip(raw), labels)

    pipe = p()
    outs = pipe.run()
    assert [o.layout() for o in outs] == ["HWC", "HWC", "CHW", "HWC", "HWC", ""]
    pipe.close()


def test_external_source_layout_must_match_the_outputs():
    @pipeline_def(batch_size=2, py_num_workers=1)
    def p():
        return fn.external_source(_source, num_outputs=1, batch=False, parallel=True, layout=["HWC", "CHW"])

    with pytest.raises(ValueError, match="layout"):
        p()


def _segment_bytes() -> int:
    import os

    from conftest import our_shm

    return max((os.stat(p).st_size for p in our_shm()), default=0)


@pytest.mark.allow_children
def test_bytes_per_sample_hint_of_a_source_sizes_the_shared_memory(monkeypatch):
    monkeypatch.setenv("RAY_EXTSRC_SHM", "devshm")  # segments as files, whose size can be read
    sizes = {}
    for hint in (4096, 4 << 20):
        @pipeline_def(batch_size=2, py_num_workers=1, bytes_per_sample_hint=1 << 20)
        def p():
            return fn.external_source(_source, batch=False, parallel=True, bytes_per_sample_hint=hint)

        pipe = p()
        pipe.run()
        sizes[hint] = _segment_bytes()
        pipe.close()
    # one task of 2 samples: a slot of 2 x the source's hint (not the pipeline's 1 MB)
    assert sizes[4096] < (1 << 20) <= 2 * (4 << 20) <= sizes[4 << 20]
    with pytest.raises(ValueError, match="bytes_per_sample_hint"):
        fn.external_source(_source, bytes_per_sample_hint=0)
