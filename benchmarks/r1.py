"""The R1 GPU benchmark (thin wrapper over ``ray_extsrc.bench``; ``ray-extsrc bench`` is the same).

    python benchmarks/r1.py --systems a,b,c,d,e1,e2 --rounds 2
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ray_extsrc.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
