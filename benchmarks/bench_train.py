"""The training-step and decoding benchmark of rnncap against PyTorch.

Same as ``rnncap bench``; every option passes through, e.g.

    python benchmarks/bench_train.py --batch-sizes 50,128 --repeats 15 --json out.json

See docs/performance.md for the method and the recorded figures.
"""
import sys

from rnncap.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
