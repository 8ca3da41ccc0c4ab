"""Readers on local data: ImageFolder order and labels, shard names, tar indexes and their cache,
the shard writer, open_dataset, pickling, errors, and the readers inside forked, sharded pipelines.

Remote reads (HTTP with Range, S3 through moto) are in test_readers_remote.py.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from ray_extsrc import fn, pipeline_def, types
from ray_extsrc.readers import (
    FileListSource,
    ImageFolderSource,
    ReadError,
    RetryPolicy,
    SampleNotFoundError,
    WebDatasetSource,
    expand_urls,
    is_transient,
    open_dataset,
    write_shards,
)
from ray_extsrc.synthetic import SMALL, make_jpeg_dataset

pytestmark = pytest.mark.timeout(60)

PER_SHARD = 20  # SMALL's 64 images -> shards of 20, 20, 20, 4


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """The generated set three ways: its file list, a class-folder tree copy, and tar shards."""
    base = tmp_path_factory.mktemp("readers")
    root = make_jpeg_dataset(base / "list", SMALL, progress=False)
    tree = base / "tree"
    shutil.copytree(root, tree, ignore=shutil.ignore_patterns("*.txt", "*.json", ".*"))
    pattern = write_shards(root, base / "shards", samples_per_shard=PER_SHARD)
    files = FileListSource(root)
    truth = {files.files[i]: ((root / files.files[i]).read_bytes(), files.labels[i]) for i in range(len(files))}
    return {"root": root, "tree": tree, "pattern": pattern, "truth": truth, "base": base}


def _by_digest(truth: dict) -> dict[str, tuple[str, int]]:
    return {hashlib.sha256(data).hexdigest(): (name, label) for name, (data, label) in truth.items()}


def _write(path: Path, data: bytes = b"\xff\xd8 not really a jpeg") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _tar(path: Path, members: list[tuple[str, bytes | None]]) -> Path:
    """A tar with these members in this order; ``None`` data makes a directory entry."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


# -- ImageFolder ------------------------------------------------------------------------------------


def tricky_tree(root: Path) -> list[tuple[str, int]]:
    """A tree that exercises every ImageFolder rule; returns torchvision's (path, label) list for it.

    Rules (torchvision.datasets.folder): classes = sorted directory names under root (hidden ones
    too; case-sensitive order); files kept by case-insensitive extension; within a class,
    sorted(os.walk(...)) — folders in string order, so "b/sub" comes before "b/sub-x" although
    "b/sub-x/..." < "b/sub/..." as full paths — and each folder's files sorted.
    """
    for name in [
        ".hidden/h.jpg", "Z/q.bmp", "a/1.jpg", "a/deep/er/2.webp", "b/x.jpg", "b/a.JPG", "b/notes.txt",
        "b/sub/y.PNG", "b/sub-x/w.jpg", "b/sub2/z.jpeg", "stray.jpg",
    ]:
        _write(root / name)
    return [
        (".hidden/h.jpg", 0), ("Z/q.bmp", 1), ("a/1.jpg", 2), ("a/deep/er/2.webp", 2),
        ("b/a.JPG", 3), ("b/x.jpg", 3), ("b/sub/y.PNG", 3), ("b/sub-x/w.jpg", 3), ("b/sub2/z.jpeg", 3),
    ]


def test_image_folder_orders_and_labels_like_torchvision(tmp_path):
    expected = tricky_tree(tmp_path)
    src = ImageFolderSource(tmp_path)
    assert src.classes == [".hidden", "Z", "a", "b"]
    assert src.class_to_idx == {".hidden": 0, "Z": 1, "a": 2, "b": 3}
    assert [(src.sample_name(i), int(src.targets[i])) for i in range(len(src))] == expected
    assert src.samples[0] == (str(tmp_path / ".hidden" / "h.jpg"), 0)
    assert len(ImageFolderSource(tmp_path, limit=3)) == 3
    assert len(ImageFolderSource(tmp_path, batch_size=4)) == 8  # 9 samples, 2 full batches


def test_image_folder_matches_torchvision_when_installed(tmp_path):
    datasets = pytest.importorskip("torchvision.datasets")
    tricky_tree(tmp_path)
    theirs = datasets.ImageFolder(str(tmp_path), loader=lambda p: p)
    ours = ImageFolderSource(tmp_path)
    assert ours.classes == theirs.classes
    assert ours.samples == theirs.samples


def test_image_folder_refuses_empty_classes_like_torchvision(tmp_path):
    with pytest.raises(FileNotFoundError, match="Couldn't find any class folder"):
        ImageFolderSource(tmp_path)
    _write(tmp_path / "cat" / "1.jpg")
    (tmp_path / "dog").mkdir()
    _write(tmp_path / "dog" / "readme.txt")
    with pytest.raises(FileNotFoundError, match="Found no valid file for the classes dog"):
        ImageFolderSource(tmp_path)
    src = ImageFolderSource(tmp_path, allow_empty=True)
    assert src.classes == ["cat", "dog"] and len(src) == 1
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        ImageFolderSource(tmp_path / "nope")


def test_image_folder_reads_the_generated_set(data):
    src = ImageFolderSource(data["tree"])
    assert len(src) == SMALL.num_images
    for i in range(len(src)):
        assert src.read_sample(i) == data["truth"][src.sample_name(i)]


# -- shard names and tar indexes ------------------------------------------------------------------


def test_expand_urls_as_webdataset(monkeypatch):
    assert expand_urls("s3://b/shard-{000000..000002}.tar") == [f"s3://b/shard-{i:06d}.tar" for i in range(3)]
    assert expand_urls("a-{0..1}.tar::b-{x,y}.tar") == ["a-0.tar", "a-1.tar", "b-x.tar", "b-y.tar"]
    monkeypatch.setenv("WDS_BUCKET", "my-bucket")
    assert expand_urls("s3://${BUCKET}/s{1..2}.tar") == ["s3://my-bucket/s1.tar", "s3://my-bucket/s2.tar"]
    braceexpand = pytest.importorskip("braceexpand")
    for pattern in ["{07..10}", "{a..g..2}", "{4..1}", "{2..-1}", "python{2.{5..7},3.{2,3}}", "{,x}y", "{}",
                    r"{1\{2,3}", "{-05..3}", "{Z..a}", "x{0..10..4}y{a,b}"]:
        assert expand_urls(pattern) == list(braceexpand.braceexpand(pattern)), pattern
    with pytest.raises(ValueError, match="unbalanced"):
        expand_urls("shard-{0..3.tar")


def test_shards_hold_the_data_set_and_match_the_webdataset_package(data):
    src = WebDatasetSource(data["pattern"])
    assert len(src.shards) == 4 and len(src) == SMALL.num_images
    names = FileListSource(data["root"]).files
    for i in range(len(src)):  # write_shards keeps the file list's order
        assert src.read_sample(i) == data["truth"][names[i]]
    assert src.shard_of(21) == (src.shards[1], 1)
    wds = pytest.importorskip("webdataset")
    theirs = list(wds.WebDataset(data["pattern"], shardshuffle=False))
    assert [s["__key__"] for s in theirs] == [n.rsplit(".", 1)[0] for n in names]
    assert all(s["jpg"] == src.read_sample(i)[0] and int(s["cls"]) == src.read_sample(i)[1] for i, s in enumerate(theirs))


def test_members_are_grouped_by_key_as_webdataset_does(tmp_path):
    png = b"\x89PNG\r\n\x1a\n" + b"p" * 40
    shard = _tar(tmp_path / "g.tar", [
        ("__meta__", b"{}"),             # metadata: skipped
        ("dir", None),                   # not a regular file: skipped
        ("noext", b"x"),                 # no extension: skipped
        ("a.jpg", b"A" * 100), ("a.cls", b"3"),
        ("sub/b.PNG", png), ("sub/b.cls", b"7\n"),      # key keeps its folder; extensions lower-cased
        ("c.x.jpeg", b"C" * 70), ("c.cls", b" 5 "),     # key ends at the first dot: "c", ext "x.jpeg"
        ("d.jpeg", b"D" * 70), ("d.jpg", b"d" * 50), ("d.cls", b"1"),  # jpg comes first in image_keys
        ("a.jpg", b"E" * 10), ("a.cls", b"9"),          # a key seen again later: another sample
    ])
    src = WebDatasetSource(str(shard), image_keys=("jpg", "jpeg", "png", "x.jpeg"), index_dir=tmp_path / "idx")
    got = [src.read_sample(i) for i in range(len(src))]
    assert got == [(b"A" * 100, 3), (png, 7), (b"C" * 70, 5), (b"d" * 50, 1), (b"E" * 10, 9)]
    assert [src.sample_name(i) for i in (1, 2)] == ["g/000001.png", "g/000002.x.jpeg"]
    wds = pytest.importorskip("webdataset")
    theirs = list(wds.WebDataset(str(shard), shardshuffle=False))
    assert [s["__key__"] for s in theirs] == ["a", "sub/b", "c", "d", "a"]
    assert theirs[2]["x.jpeg"] == b"C" * 70 and theirs[1]["png"] == png


def test_labels_and_images_that_are_missing_are_refused_up_front(tmp_path):
    shard = _tar(tmp_path / "m.tar", [("a.jpg", b"A"), ("a.cls", b"1"), ("b.jpg", b"B"), ("c.cls", b"2")])
    with pytest.raises(ValueError, match=r"1 samples have no image member \(.jpg/.jpeg/.png\), e.g. 'c' in .*m.tar"):
        WebDatasetSource(str(shard), index_dir=tmp_path)
    shard = _tar(tmp_path / "n.tar", [("a.jpg", b"A"), ("a.cls", b"1"), ("b.jpg", b"B"), ("b.cls", b"two")])
    with pytest.raises(ValueError, match=r"1 samples have no integer .cls member .*'b' in"):
        WebDatasetSource(str(shard), index_dir=tmp_path)
    src = WebDatasetSource(str(shard), label_key=None, index_dir=tmp_path)
    assert [src.read_sample(i) for i in range(2)] == [(b"A", -1), (b"B", -1)]


def test_bad_shards_are_named(tmp_path):
    dup = _tar(tmp_path / "dup.tar", [("x.jpg", b"1"), ("x.jpg", b"2")])
    with pytest.raises(ReadError, match=r"dup.tar \(indexing the tar\): member 'x.jpg': duplicate file name"):
        WebDatasetSource(str(dup), index_dir=tmp_path)
    raw = _tar(tmp_path / "ok.tar", [("x.jpg", b"1"), ("x.cls", b"0")]).read_bytes()
    (tmp_path / "z.tar.gz").write_bytes(gzip.compress(raw))
    with pytest.raises(ReadError, match="gzip-compressed tar: reading a sample by its offset needs an uncompressed tar"):
        WebDatasetSource(str(tmp_path / "z.tar.gz"), index_dir=tmp_path)
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(ReadError, match="junk.tar .*not a readable tar file"):
        WebDatasetSource(str(tmp_path / "junk.tar"), index_dir=tmp_path)
    with pytest.raises(SampleNotFoundError, match=r"missing-00000\d.tar \(looking it up\) was not found"):
        WebDatasetSource(str(tmp_path / "missing-{000000..000001}.tar"), index_dir=tmp_path)


def test_index_is_cached_next_to_the_shard_and_rebuilt_when_it_changes(tmp_path, data):
    shards = tmp_path / "shards"
    shutil.copytree(data["base"] / "shards", shards, ignore=shutil.ignore_patterns("*.json"))
    pattern = str(shards / "shard-{000000..000003}.tar")
    index0 = shards / "shard-000000.tar.ray_extsrc-index.json"
    assert not index0.exists()
    first = WebDatasetSource(pattern)
    built = index0.stat().st_mtime_ns
    assert index0.read_text().startswith('{"format":"ray_extsrc.tar-index","version":1')
    again = WebDatasetSource(pattern)  # valid: loaded, not rewritten
    assert index0.stat().st_mtime_ns == built and again.read_sample(5) == first.read_sample(5)
    # Same size, new mtime: rebuilt.
    os.utime(shards / "shard-000000.tar", ns=(1, 1))
    WebDatasetSource(pattern)
    assert index0.stat().st_mtime_ns != built
    # Rewritten with other content: rebuilt, and the new content is what is read.
    _tar(shards / "shard-000000.tar", [("k.jpg", b"new bytes"), ("k.cls", b"4")])
    changed = WebDatasetSource(pattern)
    assert len(changed) == SMALL.num_images - PER_SHARD + 1 and changed.read_sample(0) == (b"new bytes", 4)
    # index_dir: kept there instead (named by a hash of the shard's path), nothing next to the data.
    idx = tmp_path / "elsewhere"
    WebDatasetSource(str(shards / "shard-000001.tar"), index_dir=idx)
    assert [p.name.endswith("-shard-000001.tar.ray_extsrc-index.json") for p in idx.iterdir()] == [True]


@pytest.mark.parametrize("why", ["read-only folder", "name taken"])
def test_index_goes_to_the_cache_dir_when_it_cannot_sit_next_to_the_shard(tmp_path, data, monkeypatch, why):
    if why == "read-only folder" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    shards = tmp_path / "ro"
    shutil.copytree(data["base"] / "shards", shards, ignore=shutil.ignore_patterns("*.json"))
    monkeypatch.setenv("RAY_EXTSRC_CACHE_DIR", str(tmp_path / "cache"))
    if why == "name taken":  # a folder where the index file would go: it cannot be written there
        (shards / "shard-000002.tar.ray_extsrc-index.json").mkdir()
    else:
        shards.chmod(0o555)
    try:
        first = WebDatasetSource(str(shards / "shard-000002.tar"))
        again = WebDatasetSource(str(shards / "shard-000002.tar"))
    finally:
        shards.chmod(0o755)
    assert not [p for p in shards.glob("*.json") if p.is_file()]
    cached = list((tmp_path / "cache" / "shard-index").glob("*-shard-000002.tar.ray_extsrc-index.json"))
    assert len(cached) == 1 and again.read_sample(3) == first.read_sample(3)


def test_write_shards_is_deterministic_and_can_shuffle(tmp_path, data):
    a = write_shards(data["tree"], tmp_path / "a", samples_per_shard=30, prefix="train")
    b = write_shards(ImageFolderSource(data["tree"]), tmp_path / "b", samples_per_shard=30, prefix="train")
    assert a.endswith("a/train-{000000..000002}.tar") and b.endswith("b/train-{000000..000002}.tar")
    for k in range(3):
        assert (tmp_path / "a" / f"train-{k:06d}.tar").read_bytes() == (tmp_path / "b" / f"train-{k:06d}.tar").read_bytes()
    shuffled = WebDatasetSource(write_shards(data["tree"], tmp_path / "c", samples_per_shard=30, shuffle_seed=1))
    plain = WebDatasetSource(a)
    assert sorted(shuffled.labels.tolist()) == sorted(plain.labels.tolist())
    assert shuffled.labels.tolist() != plain.labels.tolist()
    with pytest.raises(ValueError, match="writes local files"):
        write_shards(data["tree"], "s3://bucket/shards")


# -- open_dataset ---------------------------------------------------------------------------------


def test_open_dataset_picks_the_reader_from_the_spec(data, tmp_path):
    root, tree, pattern = str(data["root"]), str(data["tree"]), data["pattern"]
    shards = sorted(str(p) for p in (data["base"] / "shards").glob("*.tar"))
    cases = {
        root: FileListSource,
        os.path.join(root, "file_list.txt"): FileListSource,
        tree: ImageFolderSource,
        pattern: WebDatasetSource,
        shards[0]: WebDatasetSource,
        str(data["base"] / "shards" / "*.tar"): WebDatasetSource,
        "::".join(shards[:2]): WebDatasetSource,
    }
    for spec, cls in cases.items():
        reader = open_dataset(spec, batch_size=8)
        assert type(reader) is cls, spec
        assert reader.batch_size == 8
    assert len(open_dataset(shards)) == SMALL.num_images
    assert len(open_dataset(pattern, limit=10)) == 10
    with pytest.raises(FileNotFoundError, match="is not there, or not a data set .*class-folder tree"):
        open_dataset(str(tmp_path / "nothing-here"))
    with pytest.raises(TypeError, match="image_keys") as info:
        open_dataset(tree, image_keys=("jpg",))
    assert "open_dataset picked ImageFolderSource" in "".join(getattr(info.value, "__notes__", []))


# -- pickling, errors, retry classification --------------------------------------------------------


@pytest.mark.parametrize("kind", ["file_list", "image_folder", "webdataset"])
def test_readers_pickle_small_and_without_sample_bytes(data, kind):
    reader = {"file_list": lambda: FileListSource(data["root"]), "image_folder": lambda: ImageFolderSource(data["tree"]),
              "webdataset": lambda: WebDatasetSource(data["pattern"])}[kind]()
    blob = pickle.dumps(reader)
    # a listing (names ~15 bytes) or an index (17 bytes) per sample, plus a constant
    assert len(blob) < 4096 + 48 * len(reader), len(blob)
    some_jpeg = next(iter(data["truth"].values()))[0]
    assert some_jpeg[600:664] not in blob
    copy = pickle.loads(blob)
    assert [copy.read_sample(i) for i in range(0, len(copy), 7)] == [reader.read_sample(i) for i in range(0, len(reader), 7)]


def test_a_missing_file_names_the_path_and_the_sample(tmp_path, data):
    tree = tmp_path / "tree"
    shutil.copytree(data["tree"], tree)
    src = ImageFolderSource(tree, retry=RetryPolicy(attempts=3, initial_delay_s=5.0))
    victim = tree / src.sample_name(9)
    victim.unlink()
    with pytest.raises(SampleNotFoundError) as info:
        src.read_sample(9)  # not retried: a 5 s wait would time the test out
    message = str(info.value)
    assert f"sample idx_in_epoch=9: {victim} was not found" in message and "make it again" in message
    assert info.value.idx_in_epoch == 9 and info.value.url == str(victim) and info.value.attempts == 1
    again = pickle.loads(pickle.dumps(info.value))
    assert isinstance(again, FileNotFoundError) and str(again) == message and again.idx_in_epoch == 9


class _Status(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def _wrapped(inner: BaseException, outer: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer from exc
    except BaseException as exc:
        return exc


def test_transient_errors_are_told_apart_from_permanent_ones():
    transient = [ConnectionResetError(), TimeoutError(), OSError(errno.EIO, "io"), _Status(503), _Status(429),
                 _wrapped(_Status(500), FileNotFoundError("fsspec wraps HEAD failures so"))]
    permanent = [FileNotFoundError(), PermissionError(), _Status(404), _Status(403), ValueError("bad"),
                 _wrapped(_Status(404), OSError(errno.EIO, "wrapped"))]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in permanent] == [False] * len(permanent)
    policy = RetryPolicy(attempts=4, initial_delay_s=0.1, multiplier=2, max_delay_s=0.3)
    assert [0.05 <= policy.delay(k) <= 0.1 * 2 ** (k - 1) for k in (1, 2)] == [True, True]
    assert 0.15 <= policy.delay(3) <= 0.3 and policy.delay(9) <= 0.3
    with pytest.raises(ValueError, match="attempts must be an int >= 1; got 0"):
        RetryPolicy(attempts=0)


# -- inside pipelines --------------------------------------------------------------------------------


def run_sharded(source, num_shards: int = 2, batch_size: int = 4, shuffle: bool = True,
                start_method: str = "fork") -> list[list[tuple[str, int]]]:
    """Every rank's epoch as [(sha256 of the bytes, label), ...], from forked (or spawned) workers."""

    @pipeline_def(batch_size=batch_size, num_threads=1, py_num_workers=2, seed=3, shuffle=shuffle,
                  py_start_method=start_method)
    def pipe():
        return fn.external_source(source=source, num_outputs=2, batch=False, parallel=True,
                                  dtype=[types.UINT8, types.INT32])

    pipes = [pipe(num_shards=num_shards, shard_id=r) for r in range(num_shards)]
    try:
        for p in pipes:
            p.start_py_workers()
        for p in pipes:
            p.build()
        per_rank = []
        for p in pipes:
            got = []
            while True:
                try:
                    jpegs, labels = p.run()
                except StopIteration:
                    break
                got += [(hashlib.sha256(jpegs.at(i).tobytes()).hexdigest(), int(labels.at(i)[0])) for i in range(len(jpegs))]
            per_rank.append(got)
        return per_rank
    finally:
        for p in pipes:
            p.close()


@pytest.mark.parametrize("kind,start_method", [("image_folder", "fork"), ("webdataset", "fork"), ("webdataset", "spawn")])
def test_readers_in_sharded_pipelines_give_every_sample_once(data, kind, start_method):
    source = ImageFolderSource(data["tree"]) if kind == "image_folder" else WebDatasetSource(data["pattern"])
    per_rank = run_sharded(source, start_method=start_method)
    assert [len(r) for r in per_rank] == [32, 32]  # 64 samples, batches of 4, 2 ranks
    truth = _by_digest(data["truth"])
    seen = [digest for rank in per_rank for digest, _ in rank]
    assert sorted(seen) == sorted(truth)  # every sample, once
    assert all(label == truth[digest][1] for rank in per_rank for digest, label in rank)


# -- the command line and the example ----------------------------------------------------------------


@pytest.mark.timeout(120)
def test_cli_writes_shards_and_the_demo_reads_them(tmp_path, data):
    env = {**os.environ, "RAY_EXTSRC_CACHE_DIR": str(tmp_path / "cache")}
    made = subprocess.run(
        [sys.executable, "-m", "ray_extsrc.cli", "shards", str(data["tree"]), str(tmp_path / "s"), "--samples-per-shard", "16"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert made.returncode == 0, made.stderr
    pattern = made.stdout.strip().splitlines()[-1]
    assert pattern == str(tmp_path / "s" / "shard-{000000..000003}.tar")
    demo = subprocess.run(
        [sys.executable, "-m", "ray_extsrc.cli", "demo", "--out", str(tmp_path / "out"), "--data", pattern,
         "--epochs", "1", "--batch-size", "8"],
        capture_output=True, text=True, timeout=100, env=env,
    )
    assert demo.returncode == 0, demo.stderr
    assert "WebDatasetSource: 64 samples" in demo.stdout and demo.stdout.count("images/s") == 2
    assert (tmp_path / "out" / "train_batch.png").exists()
