"""Decoder-configuration sweep behind the R1 numbers: ``python -m ray_extsrc.bench._variants ROOT OUT``.

Runs decode-only nvImageCodec variants (backends, a batch split between two decoders, batches in
flight) and the ray_extsrc loader (system a) under several settings, each in its own process (or
several copies at once, to see whether one process is the bound), prints one line per variant and
writes ``OUT/variants.json``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from ._report import timed_rates

# name -> (system, extra runner args, environment, copies run at once)
VARIANTS: dict[str, tuple[str, list[str], dict[str, str], int]] = {
    "e1 default": ("e1", [], {}, 1),
    "e1 hw": ("e1", ["--codec-backend", "hw"], {}, 1),
    "e1 cuda": ("e1", ["--codec-backend", "cuda"], {}, 1),
    "e1 hybrid": ("e1", ["--codec-backend", "hybrid"], {}, 1),
    "e1 hwload .65": ("e1", ["--codec-backend", "hwload", "--hw-load", "0.65"], {}, 1),
    "e1 split .65 cuda": ("e1", ["--split", "0.65"], {}, 1),
    "e1 split .65 hybrid": ("e1", ["--split", "0.65", "--split-kind", "hybrid"], {}, 1),
    "e1 inflight 2": ("e1", ["--inflight", "2"], {}, 1),
    "e1 inflight 2 split .65": ("e1", ["--inflight", "2", "--split", "0.65"], {}, 1),
    "e1 default x2 procs": ("e1", [], {}, 2),
    "a threads 1": ("a", [], {"RAY_EXTSRC_DECODE_THREADS": "1"}, 1),
    "a threads 2": ("a", [], {"RAY_EXTSRC_DECODE_THREADS": "2"}, 1),
    "a split .65 cuda": ("a", [], {"RAY_EXTSRC_HW_SHARE": "0.65"}, 1),
    "a split .65 hybrid": ("a", [], {"RAY_EXTSRC_HW_SHARE": "0.65", "RAY_EXTSRC_SPLIT_KIND": "hybrid"}, 1),
    "a hwload .65": ("a", [], {"RAY_EXTSRC_DECODER": "hwload"}, 1),
    "a switch 0.5 ms": ("a", [], {"BENCH_SWITCH_INTERVAL": "0.0005"}, 1),
    "a 6 workers": ("a", ["--workers", "6"], {}, 1),
    "a x2 procs 6 workers": ("a", ["--workers", "6"], {}, 2),
    "a x3 procs 4 workers": ("a", ["--workers", "4"], {}, 3),
    "b": ("b", [], {}, 1),
    "b decode threads 1": ("b", [], {"RAY_EXTSRC_DECODE_THREADS": "1"}, 1),
    "b2": ("b2", [], {}, 1),
    "b2 codec threads 4": ("b2", [], {"RAY_EXTSRC_NVIMGCODEC_THREADS": "4"}, 1),
    "b2 decode threads 1": ("b2", [], {"RAY_EXTSRC_DECODE_THREADS": "1"}, 1),
}


def _median(res: dict) -> float:
    vals = timed_rates(res)
    return statistics.median(vals) if vals else 0.0


def _run(system: str, root: str, extra: list[str], env: dict[str, str], copies: int, epochs: int) -> dict | None:
    cmd = [sys.executable, "-m", "ray_extsrc.bench._runner", system, "--root", root, "--epochs", str(epochs),
           "--warmup", "1", *extra]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **env}) for _ in range(copies)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        lines = [ln for ln in out.splitlines() if ln.startswith("BENCH-RESULT ")]
        if not lines:
            print(err[-2000:])
            return None
        results.append(json.loads(lines[-1][len("BENCH-RESULT "):]))
    res = results[0]
    res["median"] = sum(_median(r) for r in results)  # copies at once: the sum of their rates
    res["copies"] = [_median(r) for r in results]
    return res


def main(root: str, out: str, only: str = "") -> None:
    results = {}
    names = [n for n in VARIANTS if not only or n in only.split(",")]
    for name in names:
        system, extra, env, copies = VARIANTS[name]
        t = time.perf_counter()
        r = _run(system, root, extra, env, copies, 2 if system != "e1" else 3)
        results[name] = r
        extra_info = (r.get("per_batch_ms") or r.get("copies")) if r else ""
        print(f"{name:<26} {round(r['median']) if r else 'FAILED':>8}  {extra_info}  "
              f"gpu {r.get('gpu_peak_used_mb') if r else '-'} MB  ({time.perf_counter() - t:.0f} s)", flush=True)
    with open(os.path.join(out, "variants.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:4])
