"""How fast each reader hands out samples: one process, random order, samples/s and MB/s.

A reader must never be what a pipeline waits for: a CPU worker decodes a few hundred R1 images per
second (~67 KB JPEGs), a GPU pipeline a few thousand. This reads ``--samples`` samples in a random
order (as a shuffled, sharded epoch asks for them) through ``source(sample_info)`` — exactly what a
forked worker calls — for the generated set as a file list, as a class-folder tree and as
WebDataset shards (written by `write_shards`), and with ``--remote`` also over HTTP (a local
Range-capable server) and S3 (moto's local server, needs ``moto[server]``). The data is in the page
cache and the servers are on 127.0.0.1: this measures the reader's own cost (and, remotely, the
per-request cost of the client stack), not a disk or a network.

    python examples/reader_speed.py [--images 2000] [--samples 2000] [--remote] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator

import numpy as np

from ray_extsrc.readers import FileListSource, ImageFolderSource, Reader, WebDatasetSource, get_filesystem, write_shards
from ray_extsrc.synthetic import R1, make_jpeg_dataset
from ray_extsrc.types import SampleInfo


def measure(reader: Reader, order: np.ndarray, repeat: int) -> tuple[float, float]:
    """Best of ``repeat`` passes over ``order``: (samples/s, MB/s)."""
    for i in order[:32]:  # warm-up: opens descriptors / makes this process's filesystem object
        reader(SampleInfo(int(i), 0, 0, 0))
    best = float("inf")
    nbytes = 0
    for _ in range(repeat):
        nbytes = 0
        t0 = time.perf_counter()
        for k, i in enumerate(order):
            data, _ = reader(SampleInfo(int(i), k % 256, 0, 0))
            nbytes += data.nbytes
        best = min(best, time.perf_counter() - t0)
    return len(order) / best, nbytes / best / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-output/reader-speed", help="where the data set and shards go")
    parser.add_argument("--images", type=int, default=2000, help="R1-like images to generate")
    parser.add_argument("--samples", type=int, default=2000, help="samples read per pass")
    parser.add_argument("--repeat", type=int, default=3, help="passes; the best is reported")
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--remote", action="store_true", help="also over a local HTTP server and a local S3 (moto)")
    parser.add_argument("--remote-samples", type=int, default=500,
                        help="samples per pass for the remote readers (moto copies a whole object per range read: slow)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    out = os.path.abspath(args.out)
    root = make_jpeg_dataset(os.path.join(out, "images"), dataclasses.replace(R1, num_images=args.images))
    pattern = write_shards(root, os.path.join(out, "shards"), samples_per_shard=args.samples_per_shard)
    shard_part = pattern[len(out):]  # "/shards/shard-{000000..0000NN}.tar"
    rng = np.random.default_rng(0)
    order = rng.integers(0, args.images, args.samples)

    makers = {
        "FileListSource, local": lambda: FileListSource(root),
        "ImageFolderSource, local": lambda: ImageFolderSource(root),  # the generated set is a class-folder tree too
        "WebDatasetSource, local": lambda: WebDatasetSource(pattern),
    }
    results = []
    with _remote(args.remote, out) as remote:
        if remote:
            http, s3 = remote
            index_dir = os.path.join(out, "remote-index")
            makers.update({
                "FileListSource, HTTP": lambda: FileListSource(http + "/images"),
                "WebDatasetSource, HTTP": lambda: WebDatasetSource(http + shard_part, index_dir=index_dir),
                "FileListSource, S3 (moto)": lambda: FileListSource("s3://bucket/images", storage_options=s3),
                "WebDatasetSource, S3 (moto)": lambda: WebDatasetSource("s3://bucket" + shard_part, storage_options=s3,
                                                                       index_dir=index_dir),
            })
        for name, make in makers.items():
            t0 = time.perf_counter()
            reader = make()
            made = time.perf_counter() - t0
            is_remote = "local" not in name
            rate, mbps = measure(reader, order[: args.remote_samples] if is_remote else order, args.repeat)
            results.append({"reader": name, "construct_s": round(made, 3), "samples_per_s": round(rate, 1),
                            "mb_per_s": round(mbps, 1)})
            print(f"{name:30s} made in {made:6.3f} s   {rate:9.0f} samples/s   {mbps:7.1f} MB/s", flush=True)
    base = results[0]["samples_per_s"]
    for r in results:
        r["vs_file_list_local"] = round(r["samples_per_s"] / base, 2)
    print("\n| reader | samples/s | MB/s | vs FileListSource, local |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['reader']} | {r['samples_per_s']:,.0f} | {r['mb_per_s']:,.0f} | {r['vs_file_list_local']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"images": args.images, "samples": args.samples, "repeat": args.repeat,
                       "cpus": len(os.sched_getaffinity(0)), "python": sys.version.split()[0], "results": results}, f, indent=2)
    return 0


@contextlib.contextmanager
def _remote(enabled: bool, folder: str) -> Iterator[tuple[str, dict] | None]:
    """With ``enabled``: a local HTTP server over ``folder`` and moto's S3 server holding its images
    and shards, each in a process of its own (so neither takes this one's CPU or GIL); yields
    (HTTP base URL, S3 storage_options). Otherwise yields None."""
    if not enabled:
        yield None
        return
    import socket
    import subprocess
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s3_port = s.getsockname()[1]
    http = subprocess.Popen([sys.executable, "-m", "ray_extsrc.readers.testing", folder],
                            stdout=subprocess.PIPE, text=True)
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = http.stdout.readline().strip()
        s3 = {"endpoint_url": f"http://127.0.0.1:{s3_port}", "key": "testing", "secret": "testing"}
        for _ in range(100):  # moto takes a second or two to import and listen
            try:
                urllib.request.urlopen(s3["endpoint_url"], timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        fs = get_filesystem("s3://", s3)
        fs.mkdir("bucket")
        for sub in ("images", "shards"):
            fs.put(os.path.join(folder, sub) + "/", f"bucket/{sub}", recursive=True)
        yield url, s3
    finally:
        for p in (http, moto):
            p.terminate()
            p.wait(10)


if __name__ == "__main__":
    sys.exit(main())
