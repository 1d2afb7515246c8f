"""CPU benchmark script: the same as `python -m lstmfast bench` (see lstmfast/bench.py)."""

import sys

from lstmfast import bench

if __name__ == "__main__":
    bench.main(sys.argv[1:])
