"""Run the FineViT-VL benchmarks from a checkout: `python benchmarks/run.py [--quick] [--only a,b] [--threads N]`.

Same as `finevit-vl bench` (see `finevit_vl/bench.py`); results go to `benchmarks/results/` and
`benchmarks/BENCHMARKS.md`.
"""

import sys

from finevit_vl.bench import main


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
