"""rnncap's NumPy CIDEr-D against the COCO toolkit's (pycocoevalcap) on Flickr8k captions.

    python benchmarks/bench_cider.py [--repeats 3]

Toolkit mode: each of the 5,000 val captions scored against the other four captions of
its image (5,000 candidates, df over those reference sets), same tokens on both sides;
prints both times, the ratio and the largest per-caption difference. Reward mode: df
fixed from the 6,000 train images' references (with "<END>"), one call scoring 1,000
images x 5 captions against their references, and the toolkit on the same pairs.
See docs/metrics.md ("CIDEr-D in NumPy") for the recorded figures.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
from cider_oracle import time_against_toolkit, time_rewards  # noqa: E402

from rnncap.data.vocab import tokenize  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "flickr8k" / "captions.json"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA), help="Flickr8k captions.json (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    images = json.loads(Path(args.data).read_text())["images"]
    split = {s: [[tokenize(c) for c in im["captions"]] for im in images if im["split"] == s]
             for s in ("train", "val")}
    val = split["val"]
    cands = [caps[k] for caps in val for k in range(len(caps))]
    refs = [caps[:k] + caps[k + 1:] for caps in val for k in range(len(caps))]
    r = time_against_toolkit(cands, refs, repeats=args.repeats)
    print(f"toolkit mode, {r['candidates']} candidates: rnncap {r['rnncap_s'] * 1e3:.1f} ms, "
          f"pycocoevalcap {r['toolkit_s'] * 1e3:.0f} ms, ratio {r['speedup']:.1f}x, "
          f"max |diff| {r['max_abs_diff']:.1e}")
    train = [[c + ["<END>"] for c in caps] for caps in split["train"]]
    ids = np.repeat(np.arange(1000), 5)  # 1,000 images x 5 "samples": other images' captions
    samples = [train[(i + 1) % len(train)][k % 5] for k, i in enumerate(ids)]
    w = time_rewards(train, samples, ids, repeats=args.repeats)
    print(f"reward mode, df from {w['corpus_sets']} train images (built once in {w['build_s']:.2f} s), "
          f"{w['candidates']} candidates: rnncap {w['score_s'] * 1e3:.1f} ms, pycocoevalcap "
          f"{w['toolkit_s'] * 1e3:.0f} ms on the same pairs, ratio {w['speedup']:.1f}x")

if __name__ == "__main__":
    main()
