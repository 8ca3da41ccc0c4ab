"""Decoder-configuration sweep behind the R1 numbers:
``python -m ray_extsrc.bench._variants ROOT OUT [NAME,NAME,... [EPOCHS]]``.

Runs decode-only nvImageCodec variants (backends, a batch split between two decoders, batches in
flight) and the ray_extsrc loader (systems a, b) under several decoder settings (the decoder op's
arguments), each in its own process (or several copies at once, to see whether one process is
the bound), prints one line per variant and writes ``OUT/variants.json``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from ._common import parse_result, timed_rates

# name -> (system, decoder op arguments (DecoderOptions' fields), extra runner args, copies run at once).
# Decoder settings travel as op arguments (``--decoder``), never as environment variables.
VARIANTS: dict[str, tuple[str, dict[str, object], list[str], int]] = {
    "e1 default": ("e1", {}, [], 1),
    "e1 hw": ("e1", {"backend": "hw"}, [], 1),
    "e1 cuda": ("e1", {"backend": "cuda"}, [], 1),
    "e1 hybrid": ("e1", {"backend": "hybrid"}, [], 1),
    "e1 hwload .65": ("e1", {"backend": "hwload", "hw_decoder_load": 0.65}, [], 1),
    "e1 split .65 cuda": ("e1", {"split_share": 0.65, "split_backend": "cuda"}, [], 1),
    "e1 split .65 hybrid": ("e1", {"split_share": 0.65, "split_backend": "hybrid"}, [], 1),
    "e1 inflight 2": ("e1", {}, ["--inflight", "2"], 1),
    "e1 inflight 2 split .65": ("e1", {"split_share": 0.65, "split_backend": "cuda"}, ["--inflight", "2"], 1),
    "e1 default x2 procs": ("e1", {}, [], 2),
    # hybrid_huffman_threshold=0: the CUDA decoder's share Huffman-decoded on the GPU, not the CPU
    "e1 hybrid h0": ("e1", {"backend": "hybrid", "hybrid_huffman_threshold": 0}, [], 1),
    "e1 hwload .7 h0": ("e1", {"backend": "hwload", "hw_decoder_load": 0.7, "hybrid_huffman_threshold": 0}, [], 1),
    "e1 split .6 hybrid h0": ("e1", {"split_share": 0.6, "split_backend": "hybrid", "hybrid_huffman_threshold": 0},
                              [], 1),
    "e2": ("e2", {}, [], 1),
    "a threads 1": ("a", {"decode_threads": 1}, [], 1),
    "a threads 2": ("a", {"decode_threads": 2}, [], 1),
    "a split .65 hybrid": ("a", {"split_share": 0.65, "split_backend": "hybrid"}, [], 1),
    "a hwload .65": ("a", {"backend": "hwload", "hw_decoder_load": 0.65}, [], 1),
    "a switch 0.5 ms": ("a", {}, ["--switch-interval", "0.0005"], 1),
    "a 6 workers": ("a", {}, ["--workers", "6"], 1),
    "a x2 procs 6 workers": ("a", {}, ["--workers", "6"], 2),
    "a x3 procs 4 workers": ("a", {}, ["--workers", "4"], 3),
    "b": ("b", {}, [], 1),
    "b consumer": ("b", {}, ["--gpu-stage", "consumer"], 1),
    "b actor": ("b", {}, ["--gpu-stage", "actor"], 1),
    "b decode threads 1": ("b", {"decode_threads": 1}, [], 1),
    "b hwload .7 h0": ("b", {"backend": "hwload", "hw_decoder_load": 0.7, "hybrid_huffman_threshold": 0}, [], 1),
    "b split .6 hybrid h0": ("b", {"split_share": 0.6, "split_backend": "hybrid", "hybrid_huffman_threshold": 0}, [], 1),
    "b2": ("b2", {}, [], 1),
    "b2 codec threads 4": ("b2", {"cpu_threads": 4}, [], 1),
    "b2 decode threads 1": ("b2", {"decode_threads": 1}, [], 1),
}


def decoder_arg(options: dict[str, object]) -> list[str]:
    """``{"backend": "hw", "decode_threads": 1}`` -> ``["--decoder", "backend=hw,decode_threads=1"]``."""
    return ["--decoder", ",".join(f"{k}={v}" for k, v in options.items())] if options else []


def _median(res: dict) -> float:
    vals = timed_rates(res)
    return statistics.median(vals) if vals else 0.0


def _run(system: str, root: str, options: dict[str, object], extra: list[str], copies: int,
         epochs: int) -> dict | None:
    cmd = [sys.executable, "-m", "ray_extsrc.bench._runner", system, "--root", root, "--epochs", str(epochs),
           "--warmup", "1", *decoder_arg(options), *extra]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(copies)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        res = parse_result(out)
        if res is None:
            print(err[-2000:])
            return None
        results.append(res)
    res = results[0]
    res["median"] = sum(_median(r) for r in results)  # copies at once: the sum of their rates
    res["copies"] = [_median(r) for r in results]
    return res


def main(root: str, out: str, only: str = "", epochs: str = "") -> None:
    """Each variant named in ``only`` (comma-separated; all if empty) for ``epochs`` timed epochs
    (default: 3 decode-only, 2 otherwise)."""
    results = {}
    names = [n for n in VARIANTS if not only or n in only.split(",")]
    for name in names:
        system, options, extra, copies = VARIANTS[name]
        t = time.perf_counter()
        r = _run(system, root, options, extra, copies, int(epochs) if epochs else (3 if system[:1] == "e" else 2))
        results[name] = r
        extra_info = (r.get("per_batch_ms") or r.get("copies")) if r else ""
        print(f"{name:<26} {round(r['median']) if r else 'FAILED':>8}  {extra_info}  "
              f"gpu {r.get('gpu_peak_used_mb') if r else '-'} MB  ({time.perf_counter() - t:.0f} s)", flush=True)
    with open(os.path.join(out, "variants.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:5])
