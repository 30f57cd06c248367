"""Where the attention model's training step spends its time: cProfile of
``AttentionCaptioningModel._loss_rows`` on one BLAS thread (one shard's work), at the
bench's "attention" size. Thin: the batch and the model come from rnncap.bench.workloads.

    .venv/bin/python benchmarks/profile_attention.py [N]
"""
import cProfile
import pstats
import sys

import numpy as np

from rnncap.bench.workloads import SIZES, build_rnncap, make_batch
from rnncap.models.model import _one_blas_thread

N = int(sys.argv[1]) if len(sys.argv) > 1 else 64
dims = SIZES["attention"]
features, captions = make_batch(N, dims)
model = build_rnncap(dims, seed=0)
with _one_blas_thread(np):
    model._loss_rows(features, captions, [None, None], N)  # warm-up
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(5):
        model._loss_rows(features, captions, [None, None], N)
    prof.disable()
stats = pstats.Stats(prof)
print(f"N={N}, 5 calls of _loss_rows on one BLAS thread, {dims}")
stats.sort_stats("tottime").print_stats(12)
