"""Pipelines with ops, end to end on real workers: determinism, fallbacks, errors, the tutorial."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from ray_extsrc import DecodeError, NoGPUWarning, fn, pipeline_def, types
from ray_extsrc.readers import FileListSource
from ray_extsrc.synthetic import SMALL, make_jpeg_dataset

pytestmark = pytest.mark.timeout(120)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory):
    return str(make_jpeg_dataset(tmp_path_factory.mktemp("jpegs"), dataclasses.replace(SMALL, num_images=48), progress=False))


class KillOnce(FileListSource):
    """FileListSource whose worker kill -9s itself at one sample, once."""

    def __init__(self, root, batch_size, victim, marker):
        super().__init__(root, batch_size)
        self.victim, self.marker = victim, marker

    def __call__(self, info):
        if info.idx_in_epoch == self.victim and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(info)


def augmenting_pipeline(source, *, parallel=True, **kw):
    @pipeline_def(batch_size=8, num_threads=2, seed=42, **kw)
    def pipe():
        jpegs, labels = fn.external_source(
            source=source, num_outputs=2, batch=False, parallel=parallel, dtype=[types.UINT8, types.INT32]
        )
        images = fn.decoders.image_random_crop(jpegs, random_area=(0.2, 1.0))
        images = fn.resize(images, resize_x=64, resize_y=64)
        images = fn.brightness_contrast(images, contrast=fn.random.uniform(range=(0.5, 1.5)))
        images = fn.crop_mirror_normalize(
            images, mirror=fn.random.coin_flip(), mean=[128.0] * 3, std=[64.0] * 3, dtype=types.FLOAT16
        )
        return images, labels

    return pipe()


def run_epochs(p, epochs=2):
    out = []
    try:
        for _ in range(epochs):
            while True:
                try:
                    images, labels = p.run()
                except StopIteration:
                    p.reset()
                    break
                out.append((images.as_array().copy(), labels.as_array().ravel().copy()))
    finally:
        p.close()
    return out


def test_same_sample_same_augmentation_whatever_the_workers(jpeg_dir, tmp_path):
    ref = run_epochs(augmenting_pipeline(FileListSource(jpeg_dir, 8), parallel=False))
    assert ref[0][0].shape == (8, 3, 64, 64) and ref[0][0].dtype == np.float16
    assert len(ref) == 12  # 6 batches x 2 epochs
    # the second epoch draws new crops/flips/contrasts for the same samples
    assert not np.array_equal(ref[0][0], ref[6][0]) and np.array_equal(ref[0][1], ref[6][1])
    for workers, method in [(1, "fork"), (3, "fork"), (2, "spawn")]:
        got = run_epochs(augmenting_pipeline(FileListSource(jpeg_dir, 8), py_num_workers=workers, py_start_method=method))
        for (a, la), (b, lb) in zip(ref, got):
            assert np.array_equal(la, lb) and np.array_equal(a, b), (workers, method)
    # ... and after a worker is killed mid-epoch and its samples replayed
    src = KillOnce(jpeg_dir, 8, victim=19, marker=str(tmp_path / "killed"))
    got = run_epochs(augmenting_pipeline(src, py_num_workers=3))
    assert (tmp_path / "killed").exists()
    for (a, la), (b, lb) in zip(ref, got):
        assert np.array_equal(la, lb) and np.array_equal(a, b)


def test_corrupt_jpeg_names_the_sample(jpeg_dir, tmp_path):
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(jpeg_dir, root)
    name = FileListSource(str(root), 8).files[11]
    data = (root / name).read_bytes()
    (root / name).write_bytes(data[: len(data) // 2])  # truncated
    p = augmenting_pipeline(FileListSource(str(root), 8), py_num_workers=2)
    try:
        p.run()
        with pytest.raises(DecodeError, match=r"idx_in_epoch=11") as info:
            p.run()
        assert info.value.idx_in_epoch == 11
    finally:
        p.close()


def test_gpu_ops_without_gpu_run_on_cpu_after_one_warning(jpeg_dir, monkeypatch):
    monkeypatch.setattr("ray_extsrc.pipeline._warned_no_gpu", False)

    @pipeline_def(batch_size=4, num_threads=1, device_id=0, py_num_workers=2, seed=1)
    def pipe(device):
        jpegs, labels = fn.external_source(source=FileListSource(jpeg_dir, 4), num_outputs=2, batch=False, parallel=True)
        images = fn.decoders.image(jpegs, device=device)
        return fn.resize(images, resize_x=32, resize_y=32), labels

    with pytest.warns(NoGPUWarning, match=r"decoders.image\(device='mixed'\).*resize\(device='gpu'\).*CPU"):
        gpu = pipe("mixed")
        gpu.start_py_workers()
    cpu = pipe("cpu")
    try:
        cpu.start_py_workers()
        a, b = gpu.run()[0], cpu.run()[0]
        assert np.array_equal(a.as_array(), b.as_array())
    finally:
        gpu.close()
        cpu.close()


def test_tutorial_port_runs_and_saves_grids(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", "parallel_external_source_fork.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=100,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "batch_0.png").stat().st_size > 1000 and (tmp_path / "batch_1.png").exists()
    assert "labels: train" in proc.stdout


def test_demo_cli(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ray_extsrc.cli", "demo", "--out", str(tmp_path), "--images", "64", "--epochs", "2"],
        capture_output=True, text=True, timeout=100,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("images/s") == 4
    assert (tmp_path / "train_batch.png").exists() and (tmp_path / "val_batch.png").exists()
