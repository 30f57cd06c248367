"""Example val photos with their attention maps, drawn at random, as Markdown for
docs/attention.md: the caption, and for each word its 7x7 map in text (0-9, the
word's own maximum = 9). Photos are Flickr8k's and are not committed; the figures
can be drawn locally with `rnncap caption PHOTO --attention OUT.png`.

    .venv/bin/python experiments/attention_examples.py runs/f8k/att-block-s0/best.npz --n 4 --seed 12
"""
import argparse
from pathlib import Path

import numpy as np

from rnncap.data.datasets import load_dataset
from rnncap.inference.sample import Captioner

ROOT = Path(__file__).resolve().parents[1]
# Maps are shown for the first content words; function words are listed with their peak only.
FUNCTION_WORDS = {"a", "an", "the", "of", "in", "on", "is", "are", "and", "with", "at", "to", "his",
                  "her", "its", "their", "while", "for", "into", "through", "near", "by", "from"}


def text_map(m):
    m = np.asarray(m) / max(float(np.max(m)), 1e-12)
    return "\n".join(" ".join(str(int(v * 9.999)) for v in row) for row in m)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/flickr8k/captions.json"))
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--seed", type=int, default=12)
    args = p.parse_args()
    val = load_dataset(args.data)["val"]
    picks = np.random.default_rng(args.seed).choice(len(val), size=args.n, replace=False)
    cap = Captioner.from_checkpoint(args.checkpoint)
    print(f"Drawn at random from the 1,000 val photos (numpy default_rng({args.seed}).choice); "
          f"beam and length normalisation: the checkpoint's ({cap.decode.beam_size}, {cap.decode.length_norm}).\n")
    for k in picks:
        caption, maps = cap.caption(val.image_paths[k], return_attention=True)
        print(f"**{val.image_ids[k]}**: \"{caption}\"  (a reference: \"{val.references[k][0]}\")\n")
        words = caption.split()
        peaks = [np.unravel_index(np.argmax(m), m.shape) for m in maps]
        print("peak (row, column) and weight per word: " + ", ".join(
            f"{w} ({r},{c}) {m.max():.2f}" for w, (r, c), m in zip(words, peaks, maps)) + "\n")
        shown = [i for i, w in enumerate(words) if w not in FUNCTION_WORDS][:3]
        print("| " + " | ".join(f"`{words[i]}`" for i in shown) + " |\n|" + "---|" * len(shown))
        rows = [text_map(maps[i]).split("\n") for i in shown]
        for line in zip(*rows):
            print("| " + " | ".join(f"`{x}`" for x in line) + " |")
        print()


if __name__ == "__main__":
    main()
