"""The encoder's fast path against the plain path it replaced, in one run: images/s of
`rnncap features` (224-pixel photos, batch 32), of encoding full-size photo files and,
with a checkpoint, of captioning them (decode included), with the ratios.

    python benchmarks/bench_encode.py [--checkpoint CKPT] [--profile] [--repeats 3] [--json out.json]

The logic lives in rnncap.bench.encode; see docs/performance.md ("The encoder").
"""
import sys

from rnncap.bench.encode import main

if __name__ == "__main__":
    sys.exit(main())
