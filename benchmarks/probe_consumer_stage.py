"""Shim: ``python benchmarks/probe_consumer_stage.py ...`` = ``ray-extsrc bench --probe ...`` (code: ``ray_extsrc.bench._probe``)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ray_extsrc.bench._probe import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
