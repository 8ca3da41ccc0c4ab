"""Shim: ``python benchmarks/cpu_bench.py ...`` = ``ray-extsrc bench --cpu ...`` (code: ``ray_extsrc.bench._cpu``)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ray_extsrc.bench._cpu import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
