"""Decoder-configuration sweep behind the R1 numbers: ``python -m ray_extsrc.bench._variants ROOT OUT``.

Runs decode-only nvImageCodec variants (options, backends, region-of-interest) and the ray_extsrc
loader (system a) under several decoder settings, each in its own process, prints one line per
variant, writes ``OUT/variants.json``, and writes ``OUT/best.env`` (``export`` lines) with the
fastest loader settings, which the main benchmark then runs with.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

DECODE = {
    "e1 default": [],
    "e1 fancy": ["--codec-options", ":fancy_upsampling=1"],
    "e1 roi": ["--roi"],
    "e1 roi fancy": ["--roi", "--codec-options", ":fancy_upsampling=1"],
    "e1 roi hw-only": ["--roi", "--codec-backend", "hw"],
}
LOADER = {
    "a roi fancy chunk128": {"RAY_EXTSRC_NVIMGCODEC_OPTIONS": ":fancy_upsampling=1", "RAY_EXTSRC_DECODE_CHUNK": "128"},
    "a roi chunk128": {"RAY_EXTSRC_NVIMGCODEC_OPTIONS": "", "RAY_EXTSRC_DECODE_CHUNK": "128"},
    "a roi chunk256": {"RAY_EXTSRC_NVIMGCODEC_OPTIONS": "", "RAY_EXTSRC_DECODE_CHUNK": "256"},
    "a full chunk128": {"RAY_EXTSRC_NVIMGCODEC_OPTIONS": "", "RAY_EXTSRC_DECODE_CHUNK": "128", "RAY_EXTSRC_GPU_ROI": "0"},
}


def _run(system: str, root: str, extra: list[str], env: dict[str, str]) -> dict | None:
    cmd = [sys.executable, "-m", "ray_extsrc.bench._runner", system, "--root", root, "--epochs", "2", "--warmup", "1", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("BENCH-RESULT ")]
    if not lines:
        print(p.stderr[-1500:])
        return None
    res = json.loads(lines[-1][len("BENCH-RESULT "):])
    res["median"] = statistics.median(x["images_per_s"] for x in res["records"] if "epoch" in x and not x["warmup"])
    return res


def main(root: str, out: str) -> None:
    results = {}
    for name, extra in DECODE.items():
        r = _run("e1", root, extra, {})
        results[name] = r
        print(f"{name:<24} {r['median'] if r else 'FAILED':>10}", flush=True)
    best, best_v = None, -1.0
    for name, env in LOADER.items():
        r = _run("a", root, [], env)
        results[name] = r
        print(f"{name:<24} {r['median'] if r else 'FAILED':>10} {r.get('per_batch_ms') if r else ''}", flush=True)
        if r and r["median"] > best_v:
            best, best_v = name, r["median"]
    with open(os.path.join(out, "variants.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "best.env"), "w") as f:
        for k, v in (LOADER[best] if best else {}).items():
            f.write(f"export {k}='{v}'\n")
    print(f"best loader settings: {best}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
