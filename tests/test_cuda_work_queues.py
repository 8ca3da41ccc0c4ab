"""`cuda_work_queues`: CUDA_DEVICE_MAX_CONNECTIONS for the processes that run the consumer-side GPU
stage. On this CPU machine CUDA never starts, so the real check answers "not started" and the
variable is set; "too late" (CUDA started) is tested with that one answer given here, and for real
on a GPU in tests/gpu/test_gpu_ops.py. The driver side is checked end to end: a local Ray cluster
started after the Loader was made gives its workers the variable."""

from __future__ import annotations

import logging
import os

import pytest

from ray_extsrc import cuda_work_queues as cwq
from ray_extsrc.workers._cuda import cuda_initialized

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(cwq.ENV, raising=False)  # restored after the test
    monkeypatch.setattr(cwq, "_warned", [])


@pytest.mark.skipif(cuda_initialized(), reason="CUDA already runs in this test process")
def test_before_cuda_starts_it_sets_32_queues(no_env):
    assert cwq.widen_work_queues() == "set"
    assert os.environ[cwq.ENV] == "32"
    assert not cuda_initialized()  # asking did not start the driver
    assert cwq.widen_work_queues() == "env:32"  # a second iterator finds it set


def test_a_value_the_user_set_is_kept(no_env, monkeypatch):
    monkeypatch.setenv(cwq.ENV, "1")  # e.g. Megatron-style ordering of communication and compute
    assert cwq.widen_work_queues() == "env:1"
    assert os.environ[cwq.ENV] == "1"


def test_after_cuda_started_it_warns_once_and_changes_nothing(no_env, monkeypatch, caplog):
    monkeypatch.setattr(cwq, "cuda_initialized", lambda: True)
    with caplog.at_level(logging.WARNING, logger=cwq.__name__):
        assert cwq.widen_work_queues() == "too_late"
        assert cwq.widen_work_queues() == "too_late"
    assert cwq.ENV not in os.environ
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "Make the Loader before Ray starts" in msg and "runtime_env={'env_vars': {'CUDA_DEVICE_MAX_CONNECTIONS': '32'}}" in msg


@pytest.mark.timeout(120)
def test_a_loader_made_before_ray_starts_gives_the_local_cluster_32_queues(no_env):
    import ray

    from ray_extsrc import fn, pipeline_def
    from ray_extsrc.train import Loader

    @pipeline_def(batch_size=2)
    def pipe():
        return fn.external_source(lambda info: [0], batch=False)

    if ray.is_initialized():
        ray.shutdown()
    Loader(pipe)
    assert os.environ[cwq.ENV] == "32"
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        env_of_a_worker = ray.get(ray.remote(lambda: os.environ.get(cwq.ENV)).remote())
        assert env_of_a_worker == "32"
        del os.environ[cwq.ENV]
        Loader(pipe)  # Ray runs already: nothing to give it, nothing set
        assert cwq.ENV not in os.environ
        assert cwq.for_the_cluster() is None
    finally:
        ray.shutdown()


def test_an_actor_stage_loader_leaves_the_environment_alone(no_env):
    from ray_extsrc import fn, pipeline_def
    from ray_extsrc.train import Loader

    @pipeline_def(batch_size=2)
    def pipe():
        return fn.external_source(lambda info: [0], batch=False)

    Loader(pipe, gpu_stage="actor")
    assert cwq.ENV not in os.environ
