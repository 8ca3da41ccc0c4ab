"""Readers over real servers on 127.0.0.1: HTTP with Range requests (`LocalHTTPServer`, a thread of
this process) and S3 (moto's server, through s3fs). Nothing is mocked on the reader's side: bytes
cross a socket, errors come back as status codes.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import threading
import urllib.error
import urllib.request

import pytest

from ray_extsrc import SourceError, fn, pipeline_def, types
from ray_extsrc.readers import (
    AccessDeniedError,
    FileListSource,
    ImageFolderSource,
    ReadError,
    RetryPolicy,
    SampleNotFoundError,
    WebDatasetSource,
    get_filesystem,
    open_dataset,
    write_shards,
)
from ray_extsrc.readers.testing import LocalHTTPServer, local_s3_server, stop_fsspec_io
from ray_extsrc.synthetic import SMALL, make_jpeg_dataset
from test_readers import run_sharded, tricky_tree

pytest.importorskip("fsspec")
pytest.importorskip("s3fs")
pytestmark = pytest.mark.timeout(60)

FAST = RetryPolicy(attempts=3, initial_delay_s=0.01, max_delay_s=0.02)
SHARDS = "/shards/shard-{000000..000003}.tar"


@pytest.fixture(scope="module", autouse=True)
def no_threads_left():
    """After the module (its servers are stopped first): no thread of fsspec's or the servers' is
    left in this process. Later tests depend on it: a process with threads makes, for instance,
    ray_extsrc.synthetic pick a spawned pool, whose resource tracker outlives the test."""
    before = {t.ident for t in threading.enumerate()}
    yield
    stop_fsspec_io()
    left = [t.name for t in threading.enumerate() if t.ident not in before]
    assert not left, f"threads left behind: {left}"


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    """The generated set (file list, shards) under one folder, and the truth to check reads against."""
    base = tmp_path_factory.mktemp("served")
    root = make_jpeg_dataset(base / "data" / "list", SMALL, progress=False)
    write_shards(root, base / "data" / "shards", samples_per_shard=20)
    tricky_tree(base / "data" / "tricky")
    files = FileListSource(root)
    truth = [((root / files.files[i]).read_bytes(), files.labels[i]) for i in range(len(files))]
    return {"dir": base / "data", "truth": truth, "names": files.files, "index_dir": base / "index"}


@pytest.fixture(scope="module")
def http(served):
    with LocalHTTPServer(served["dir"]) as server:
        yield server


@pytest.fixture(scope="module")
def s3(served):
    with local_s3_server() as options:
        fs = get_filesystem("s3://", options)
        fs.mkdir("bucket")
        fs.put(str(served["dir"]) + "/", "bucket/data", recursive=True)
        yield options


def _digests(truth) -> dict[str, int]:
    return {hashlib.sha256(data).hexdigest(): label for data, label in truth}


# -- the test server itself --------------------------------------------------------------------------


def test_local_http_server_answers_range_requests(http, served):
    path = "/list/file_list.txt"
    whole = (served["dir"] / "list" / "file_list.txt").read_bytes()

    def get(headers):
        request = urllib.request.Request(http.url + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, b""

    assert get({})[0::2] == (200, whole)
    status, headers, body = get({"Range": "bytes=10-19"})
    assert (status, body, headers["Content-Range"]) == (206, whole[10:20], f"bytes 10-19/{len(whole)}")
    assert get({"Range": "bytes=-5"})[0::2] == (206, whole[-5:])
    assert get({"Range": f"bytes={len(whole)}-"})[0] == 416


# -- HTTP --------------------------------------------------------------------------------------------


def test_webdataset_over_http_reads_only_the_samples_bytes(http, served, tmp_path):
    src = WebDatasetSource(http.url + SHARDS, index_dir=tmp_path)
    http.clear_log()
    assert [src.read_sample(i) for i in range(len(src))] == served["truth"]
    log = http.requests
    assert len(log) == len(src) and {(r.method, r.status) for r in log} == {("GET", 206)}
    assert all(r.range and r.range.startswith("bytes=") for r in log)
    # Made again: the cached index is checked (HEAD: size, ETag) and used, the shards are not read.
    http.clear_log()
    again = WebDatasetSource(http.url + SHARDS, index_dir=tmp_path)
    assert {r.method for r in http.requests} == {"HEAD"} and again.read_sample(63) == served["truth"][63]


def test_http_index_is_rebuilt_when_the_shard_changes(tmp_path, served):
    shutil.copytree(served["dir"] / "shards", tmp_path / "shards")
    with LocalHTTPServer(tmp_path) as server:
        url = server.url + "/shards/shard-000001.tar"
        assert len(WebDatasetSource(url, index_dir=tmp_path / "idx")) == 20
        # rewrite it with 2 samples from another shard: new size, mtime and ETag
        write_shards(WebDatasetSource(str(tmp_path / "shards" / "shard-000003.tar"), limit=2), tmp_path / "new",
                     prefix="x")
        os.replace(tmp_path / "new" / "x-000000.tar", tmp_path / "shards" / "shard-000001.tar")
        server.clear_log()
        changed = WebDatasetSource(url, index_dir=tmp_path / "idx")
        assert len(changed) == 2 and changed.read_sample(1) == served["truth"][61]
        # re-indexed: the shard streamed from its start (fsspec reads it in blocks, by range)
        assert any(r.method == "GET" and (r.range or "bytes=0-").startswith("bytes=0-") for r in server.requests)


def test_a_transient_503_is_retried(http, served, tmp_path):
    src = WebDatasetSource(http.url + SHARDS, index_dir=tmp_path, retry=FAST)
    http.fail("/shards/shard-000001.tar", 503, 503)
    http.clear_log()
    assert src.read_sample(25) == served["truth"][25]
    assert [r.status for r in http.requests] == [503, 503, 206]


def test_a_503_that_persists_raises_after_the_attempts(http, tmp_path):
    src = WebDatasetSource(http.url + SHARDS, index_dir=tmp_path, retry=FAST)
    http.fail("/shards/shard-000001.tar", 503, 503, 503)
    with pytest.raises(ReadError) as info:
        src.read_sample(25)
    message = str(info.value)
    assert message.startswith(f"sample idx_in_epoch=25: {http.url}/shards/shard-000001.tar (sample 5 of the shard")
    assert "still failing after 3 attempts" in message and "HTTP 503" in message and "RetryPolicy" in message
    assert info.value.transient and info.value.attempts == 3


def test_404_and_403_raise_clear_errors_at_once(http, tmp_path):
    src = WebDatasetSource(http.url + SHARDS, index_dir=tmp_path, retry=FAST)
    url = http.url + "/shards/shard-000002.tar"
    http.fail("/shards/shard-000002.tar", 404)
    http.clear_log()
    with pytest.raises(SampleNotFoundError) as info:
        src.read_sample(47)
    assert f"sample idx_in_epoch=47: {url} (sample 7 of the shard" in str(info.value) and "was not found" in str(info.value)
    assert len(http.requests) == 1  # not retried
    http.fail("/shards/shard-000002.tar", 403)
    with pytest.raises(AccessDeniedError, match=r"sample idx_in_epoch=41: .*shard-000002.tar .*access denied \(HTTP 403\)"):
        src.read_sample(41)
    with pytest.raises(SampleNotFoundError, match=r"/shards/nope.tar \(looking it up\) was not found"):
        WebDatasetSource(http.url + "/shards/nope.tar", index_dir=tmp_path, retry=FAST)


def test_a_server_that_went_away_is_retried_then_reported(served):
    with LocalHTTPServer(served["dir"]) as server:
        url = server.url
        src = FileListSource(url + "/list", retry=FAST)
        assert src.read_sample(0) == served["truth"][0]
    with pytest.raises(ReadError) as info:  # connection refused: transient, so retried
        src.read_sample(1)
    assert info.value.transient and info.value.attempts == 3
    assert str(info.value).startswith(f"sample idx_in_epoch=1: {url}/list/{served['names'][1]}: still failing after 3 attempts")


def test_file_list_over_http(http, served):
    src = open_dataset(http.url + "/list", batch_size=8)
    assert isinstance(src, FileListSource) and len(src) == 64
    assert [src.read_sample(i) for i in range(0, 64, 9)] == served["truth"][::9]


def test_one_filesystem_per_process_made_anew_after_fork(http, served, tmp_path):
    src = WebDatasetSource(http.url + SHARDS, index_dir=tmp_path)
    fs = get_filesystem(http.url)
    assert get_filesystem(http.url + "/other") is fs and src.read_sample(3) == served["truth"][3]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the parent's filesystem (and its I/O thread) must not be used here
        code = 1
        try:
            os.close(read_end)
            ok = get_filesystem(http.url) is not fs and src.read_sample(30) == served["truth"][30]
            os.write(write_end, b"ok" if ok else b"no")
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        answer = os.read(read_end, 2)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    assert answer == b"ok"


# -- S3 (moto) ---------------------------------------------------------------------------------------


def test_readers_over_s3(s3, served, tmp_path):
    shards = WebDatasetSource("s3://bucket/data" + SHARDS, storage_options=s3, index_dir=tmp_path)
    assert [shards.read_sample(i) for i in range(len(shards))] == served["truth"]
    listed = open_dataset("s3://bucket/data/list", storage_options=s3)
    assert isinstance(listed, FileListSource) and listed.read_sample(63) == served["truth"][63]
    # The same tree read locally and from S3 (no folders there, only key prefixes): same order, labels.
    local, remote = ImageFolderSource(served["dir"] / "tricky"), ImageFolderSource("s3://bucket/data/tricky", storage_options=s3)
    assert remote.classes == local.classes
    assert [(remote.sample_name(i), int(remote.targets[i])) for i in range(len(remote))] == \
        [(local.sample_name(i), int(local.targets[i])) for i in range(len(local))]
    assert remote.read_sample(4) == local.read_sample(4)
    assert len(pickle.dumps(shards)) < 4096 + 48 * len(shards)
    with pytest.raises(SampleNotFoundError, match=r"s3://bucket/data/shards/shard-000009.tar \(looking it up\) was not found"):
        WebDatasetSource("s3://bucket/data/shards/shard-000009.tar", storage_options=s3, index_dir=tmp_path)


@pytest.mark.parametrize("where", ["s3-shards", "http-file-list"])
def test_remote_readers_in_forked_sharded_pipelines_give_every_sample_once(where, s3, http, served, tmp_path):
    if where == "s3-shards":
        source = WebDatasetSource("s3://bucket/data" + SHARDS, storage_options=s3, index_dir=tmp_path)
    else:
        source = FileListSource(http.url + "/list")
    per_rank = run_sharded(source)
    assert [len(r) for r in per_rank] == [32, 32]
    truth = _digests(served["truth"])
    assert sorted(d for rank in per_rank for d, _ in rank) == sorted(truth)
    assert all(label == truth[d] for rank in per_rank for d, label in rank)


def test_in_a_pipeline_a_503_is_waited_out_and_a_404_names_the_url_and_sample(http, served):
    names = served["names"]
    source = FileListSource(http.url + "/list", retry=FAST)
    http.fail(f"/list/{names[2]}", 503, 503)
    http.fail(f"/list/{names[9]}", 404)

    @pipeline_def(batch_size=4, num_threads=1, py_num_workers=2, seed=1)
    def pipe():
        return fn.external_source(source=source, num_outputs=2, batch=False, parallel=True,
                                  dtype=[types.UINT8, types.INT32])

    p = pipe()
    try:
        p.start_py_workers()
        p.build()
        jpegs, labels = p.run()  # samples 0-3: sample 2 answered 503 twice, then was served
        assert jpegs.at(2).tobytes() == served["truth"][2][0]
        p.run()  # 4-7
        with pytest.raises(SourceError) as info:
            p.run()  # 8-11: sample 9 is gone
    finally:
        p.close()
    assert info.value.idx_in_epoch == 9
    assert f"sample idx_in_epoch=9: {http.url}/list/{names[9]} was not found" in str(info.value)
