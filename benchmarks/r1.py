"""Shim: ``python benchmarks/r1.py ...`` = ``ray-extsrc bench ...`` (the code is in ``ray_extsrc.bench``).

    python benchmarks/r1.py --systems a,b,c,d,e1,e2 --rounds 2
    python benchmarks/r1.py --train resnet50,resnet18
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ray_extsrc.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
