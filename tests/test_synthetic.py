"""ray_extsrc.synthetic: deterministic, cached, DALI-tutorial-shaped JPEG data sets."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from ray_extsrc.synthetic import (
    R1,
    SMALL,
    DatasetSpec,
    dataset_content_hash,
    main,
    make_jpeg_dataset,
    read_file_list,
    render_image,
)

pytestmark = pytest.mark.timeout(120)

TINY = dataclasses.replace(SMALL, num_images=12)


def _tutorial_file_list(root: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    # Verbatim the parsing in DALI's parallel external source tutorial (ExternalInputCallable).
    with open(str(root) + "/file_list.txt") as f:
        file_label = [line.rstrip().split(" ") for line in f if line != ""]
        files, labels = zip(*file_label)
    return files, labels


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {name: (root / name).read_bytes() for name, _ in read_file_list(root)}


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_jpeg_dataset(tmp_path_factory.mktemp("small"), SMALL, progress=False)


def test_small_generates_quickly(tmp_path: Path) -> None:
    started = time.perf_counter()
    make_jpeg_dataset(tmp_path, SMALL, progress=False)
    elapsed = time.perf_counter() - started
    # ~0.3 s on the 2-core dev machine; the bound leaves room for a loaded CI runner.
    assert elapsed < 5.0, f"SMALL took {elapsed:.2f} s"


def test_file_list_parses_the_dali_tutorial_way(small_root: Path) -> None:
    files, labels = _tutorial_file_list(small_root)
    assert len(files) == SMALL.num_images
    assert len(set(files)) == len(files)
    assert all(0 <= int(label) < SMALL.num_classes for label in labels)
    assert len({int(label) for label in labels}) > 1
    for name in files:
        assert (small_root / name).is_file()
        assert np.fromfile(str(small_root) + "/" + name, dtype=np.uint8)[:2].tolist() == [0xFF, 0xD8]


def test_images_decode_with_sizes_in_range(small_root: Path) -> None:
    for name, _ in read_file_list(small_root):
        data = (small_root / name).read_bytes()
        height, width, colorspace, subsampling = simplejpeg.decode_jpeg_header(data)
        assert SMALL.width[0] <= width <= SMALL.width[1]
        assert SMALL.height[0] <= height <= SMALL.height[1]
        assert (colorspace, subsampling) == ("YCbCr", "420")
        rgb = simplejpeg.decode_jpeg(data)
        assert rgb.shape == (height, width, 3)
        with Image.open(io.BytesIO(data)) as im:
            assert im.size == (width, height) and im.mode == "RGB"


def test_manifest_records_spec_and_hash(small_root: Path) -> None:
    manifest = json.loads((small_root / "manifest.json").read_text())
    assert DatasetSpec.from_dict(manifest["spec"]) == SMALL
    assert manifest["num_files"] == SMALL.num_images
    assert manifest["content_sha256"] == dataset_content_hash(small_root)
    assert manifest["file_list_sha256"] == hashlib.sha256((small_root / "file_list.txt").read_bytes()).hexdigest()
    assert set(manifest["versions"]) == {"numpy", "pillow", "simplejpeg"}


def test_deterministic_across_runs_and_process_counts(tmp_path: Path, small_root: Path) -> None:
    again = make_jpeg_dataset(tmp_path / "again", SMALL, progress=False, processes=1)
    assert _file_bytes(again) == _file_bytes(small_root)
    assert (again / "file_list.txt").read_bytes() == (small_root / "file_list.txt").read_bytes()
    assert dataset_content_hash(again) == dataset_content_hash(small_root)
    # A pool of forked workers writes the same bytes as one process.
    pooled = make_jpeg_dataset(tmp_path / "pooled", TINY, progress=False, processes=2)
    single = make_jpeg_dataset(tmp_path / "single", TINY, progress=False, processes=1)
    assert dataset_content_hash(pooled) == dataset_content_hash(single)
    # The first images of a larger set are the images of a smaller one (same seed).
    assert _file_bytes(single).items() <= _file_bytes(small_root).items()


# Spawn starts multiprocessing's resource_tracker, which outlives the test by design.
@pytest.mark.allow_children
def test_deterministic_with_spawned_pool_from_a_threaded_caller(tmp_path: Path) -> None:
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)  # a threaded caller gets spawn, not fork
    other.start()
    try:
        spawned = make_jpeg_dataset(tmp_path / "spawned", TINY, progress=False, processes=2)
    finally:
        stop.set()
        other.join()
    single = make_jpeg_dataset(tmp_path / "single", TINY, progress=False, processes=1)
    assert dataset_content_hash(spawned) == dataset_content_hash(single)


def test_seed_changes_content() -> None:
    a, _ = render_image(TINY, 0)
    b, _ = render_image(dataclasses.replace(TINY, seed=1), 0)
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_content_is_not_flat() -> None:
    rgb, _ = render_image(R1, 0)
    y = rgb.astype(np.float32).mean(axis=2)
    assert y.std() > 20  # large-scale structure
    assert np.abs(np.diff(y, axis=1)).mean() > 2  # fine detail / grain
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 10_000  # many colours


def test_cache_hit_is_fast_and_untouched(small_root: Path) -> None:
    mtimes = {p: p.stat().st_mtime_ns for p in small_root.rglob("*")}
    started = time.perf_counter()
    assert make_jpeg_dataset(small_root, SMALL, progress=False) == small_root
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5, f"cache hit took {elapsed:.3f} s"  # ~1 ms: stats only, no hashing
    assert {p: p.stat().st_mtime_ns for p in small_root.rglob("*")} == mtimes


def test_incomplete_directory_is_regenerated(tmp_path: Path) -> None:
    root = make_jpeg_dataset(tmp_path, TINY, progress=False)
    expected = dataset_content_hash(root)
    victim = root / read_file_list(root)[3][0]
    victim.unlink()
    make_jpeg_dataset(root, TINY, progress=False)
    assert victim.is_file()
    assert dataset_content_hash(root) == expected
    # Interrupted run: no manifest yet.
    (root / "manifest.json").unlink()
    make_jpeg_dataset(root, TINY, progress=False)
    assert json.loads((root / "manifest.json").read_text())["content_sha256"] == expected


def test_different_spec_replaces_only_its_own_files(tmp_path: Path) -> None:
    root = make_jpeg_dataset(tmp_path, TINY, progress=False)
    old_names = {name for name, _ in read_file_list(root)}
    keep = root / "notes.txt"
    keep.write_text("not ours")
    smaller = dataclasses.replace(TINY, num_images=5, seed=7)
    make_jpeg_dataset(root, smaller, progress=False)
    new_names = {name for name, _ in read_file_list(root)}
    assert len(new_names) == 5
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*.jpg")}
    assert on_disk == new_names
    assert old_names - new_names  # something was really removed
    assert keep.read_text() == "not ours"
    assert DatasetSpec.from_dict(json.loads((root / "manifest.json").read_text())["spec"]) == smaller


def test_r1_statistics_on_a_subset(tmp_path: Path) -> None:
    # R1 minus num_images: 40 images (~0.7 s) instead of 8,000. The subset's mean is 68.6 KB;
    # all 8,000 average 67.1 KB (sd 12.6 KB).
    spec = dataclasses.replace(R1, num_images=40)
    root = make_jpeg_dataset(tmp_path, spec, progress=False, processes=1)
    sizes, widths, heights = [], [], []
    for name, _ in read_file_list(root):
        data = (root / name).read_bytes()
        height, width, _, subsampling = simplejpeg.decode_jpeg_header(data)
        assert subsampling == "420"
        assert b"\xff\xc0" in data[:4096] and b"\xff\xc2" not in data[:4096]  # baseline, not progressive
        sizes.append(len(data))
        widths.append(width)
        heights.append(height)
    mean_kb = np.mean(sizes) / 1000
    assert 60 <= mean_kb <= 75, f"mean file size {mean_kb:.1f} KB outside R1's 60-75 KB band"
    assert R1.width[0] <= min(widths) and max(widths) <= R1.width[1]
    assert R1.height[0] <= min(heights) and max(heights) <= R1.height[1]
    assert max(widths) - min(widths) > 100 and max(heights) - min(heights) > 80  # sizes really vary


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_images": 0}, "num_images must be >= 1; got 0"),
        ({"quality": 101}, "quality must be in 1..100; got 101"),
        ({"subsampling": "420"}, "subsampling must be one of"),
        ({"width": (300, 200)}, "got (300, 200)"),
        ({"num_classes": 0}, "num_classes must be in 1..1000; got 0"),
    ],
)
def test_spec_validation_quotes_bad_value(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        dataclasses.replace(SMALL, **changes)


def test_spec_validation_types() -> None:
    with pytest.raises(TypeError, match="got '10' \\(str\\)"):
        dataclasses.replace(SMALL, num_images="10")
    with pytest.raises(TypeError, match="pair of ints"):
        dataclasses.replace(SMALL, width=(1.5, 2))


def test_main_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path), "--preset", "small", "--images", "6", "--no-progress"]) == 0
    assert "6 images" in capsys.readouterr().out
    assert len(read_file_list(tmp_path)) == 6


def test_concurrent_callers_generate_once(tmp_path: Path) -> None:
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(make_jpeg_dataset(tmp_path, TINY, progress=False, processes=1)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)  # TINY takes ~0.1 s; 60 s only guards against a lock never released
    assert results == [tmp_path] * 3
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["content_sha256"] == dataset_content_hash(tmp_path)
    assert len(list(tmp_path.rglob("*.jpg"))) == TINY.num_images


def test_visible_labels_can_be_learned_and_are_the_same_across_seeds(tmp_path):
    """labels_visible tints each image with its class colour, the same palette for every seed
    (train and validation sets): a nearest-centroid classifier on mean colours beats chance."""
    import simplejpeg

    def mean_colours(seed):
        spec = dataclasses.replace(SMALL, num_images=200, seed=seed, labels_visible=True)
        root = make_jpeg_dataset(tmp_path / f"s{seed}", spec, progress=False)
        rows = read_file_list(root)
        x = np.array([simplejpeg.decode_jpeg((root / name).read_bytes()).reshape(-1, 3).mean(0) for name, _ in rows])
        return x, np.array([label for _, label in rows])

    x_train, y_train = mean_colours(0)
    x_val, y_val = mean_colours(1)
    centroids = np.array([x_train[y_train == c].mean(0) for c in range(SMALL.num_classes)])
    pred = np.argmin(((x_val[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == y_val).mean() > 0.5  # chance is 0.1
    assert dataclasses.replace(SMALL).labels_visible is False  # benchmark sets stay label-independent
