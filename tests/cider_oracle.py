"""pycocoevalcap's CIDEr-D as the oracle for rnncap.evaluation.cider (tests and benchmarks/bench_cider.py).

Both sides get the same tokens: rnncap's token lists, and for the toolkit the same tokens
joined by single spaces (its ``precook`` splits on whitespace).
"""
from __future__ import annotations

import time
from collections import defaultdict

import numpy as np


def toolkit_cider(candidates, references):
    """The toolkit's ``Cider().compute_score``, as ``coco_metrics`` calls it: (mean, (n,))."""
    from pycocoevalcap.cider.cider import Cider

    gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(c)] for i, c in enumerate(candidates)}
    mean, scores = Cider().compute_score(gts, res)
    return float(mean), np.asarray(scores, dtype=np.float64)


def toolkit_cider_fixed_df(corpus, candidates, references):
    """The toolkit's CIDEr-D math with document frequencies and log(N) from ``corpus``:
    candidates[i] against references[i] (any references, in the corpus or not).

    ``CiderScorer`` takes df from the pairs it scores and N from their number, so: df
    from a scorer that holds the corpus reference sets (its own ``compute_doc_freq``),
    and the scored pairs padded with throw-away pairs up to N = len(corpus), which only
    adds rows to the output. Needs len(candidates) <= len(corpus).
    """
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    assert len(candidates) <= len(corpus)
    df_scorer = CiderScorer(n=4, sigma=6.0)
    for refs in corpus:
        df_scorer += (None, [" ".join(r) for r in refs])
    df_scorer.compute_doc_freq()
    scorer = CiderScorer(n=4, sigma=6.0)
    for cand, refs in zip(candidates, references):
        scorer += (" ".join(cand), [" ".join(r) for r in refs])
    for _ in range(len(corpus) - len(candidates)):
        scorer += ("pad", ["pad"])
    scorer.document_frequency = defaultdict(float, df_scorer.document_frequency)
    return np.asarray(scorer.compute_cider()[:len(candidates)], dtype=np.float64)


def time_against_toolkit(candidates, references, repeats=3):
    """Best-of-``repeats`` seconds for rnncap's ``cider_d`` and the toolkit on the same
    captions, and the largest per-image difference: dict."""
    from rnncap.evaluation.cider import cider_d

    t_ours = min(_seconds(lambda: cider_d(candidates, references)) for _ in range(repeats))
    t_kit = min(_seconds(lambda: toolkit_cider(candidates, references)) for _ in range(repeats))
    ours, kit = cider_d(candidates, references)[1], toolkit_cider(candidates, references)[1]
    return {"candidates": len(candidates), "rnncap_s": t_ours, "toolkit_s": t_kit,
            "speedup": t_kit / t_ours, "max_abs_diff": float(np.abs(ours - kit).max())}


def time_rewards(corpus, candidates, ref_ids, repeats=3):
    """Training-reward mode: seconds to build ``CiderD(corpus)`` once, best-of-``repeats``
    seconds for one ``score(candidates, ref_ids)``, and the toolkit's seconds for the
    same candidate-reference pairs (it cannot fix df, so its df come from those pairs:
    the same work, other idf): dict."""
    from rnncap.evaluation.cider import CiderD

    t0 = time.perf_counter()
    scorer = CiderD(corpus)
    build = time.perf_counter() - t0
    refs = [corpus[i] for i in ref_ids]
    t_ours = min(_seconds(lambda: scorer.score(candidates, ref_ids)) for _ in range(repeats))
    t_kit = min(_seconds(lambda: toolkit_cider(candidates, refs)) for _ in range(repeats))
    return {"corpus_sets": len(corpus), "candidates": len(candidates), "build_s": build,
            "score_s": t_ours, "toolkit_s": t_kit, "speedup": t_kit / t_ours}


def _seconds(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
