"""The COCO metrics (through pycocoevalcap), perplexity and diversity.

Expected values are derived by hand in the comments. The toolkit's BLEU adds
tiny = 1e-15 to every matched count and small = 1e-9 to every guessed count, so "1"
and "0" hold to about 1e-9, not exactly.
"""
from __future__ import annotations

import json
import math
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from rnncap.evaluation import metrics
from rnncap.errors import DataError
from rnncap.evaluation.metrics import coco_metrics, diversity, perplexity, ptb_tokenize

JAVA = shutil.which("java")
needs_java = pytest.mark.skipif(JAVA is None, reason="Java not installed: the toolkit's PTB tokenizer and METEOR need it")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Two images for the hand-worked BLEU case.
REFS = {"img1": ["A dog runs on grass.", "a brown dog is running"],
        "img2": ["A cat sits on a mat", "The cat is sleeping"]}
CANDS = {"img1": "a dog runs on the grass", "img2": "a cat on a mat"}
# img1: candidate "a dog runs on the grass" (6 words); references of 5 and 5 words.
#   1-grams: a dog runs on grass match, "the" does not          -> 5/6
#   2-grams: a-dog dog-runs runs-on match; on-the the-grass not  -> 3/5
#   3-grams: a-dog-runs dog-runs-on match; 2 others not          -> 2/4
#   4-grams: a-dog-runs-on matches; 2 others not                 -> 1/3
#   closest reference length 5 < 6, so no brevity penalty.
#   BLEU-n = geometric mean of the first n precisions.
# img2: candidate "a cat on a mat" (5 words); references of 6 and 4 words.
#   1-grams: "a" twice, clipped by its count 2 in the first reference; cat on mat -> 5/5
#   2-grams: a-cat on-a a-mat match; cat-on does not             -> 3/4
#   3-grams: on-a-mat matches; a-cat-on cat-on-a do not          -> 1/3
#   4-grams: none match                                          -> 0/2
#   reference lengths 6 and 4 are equally close to 5; the toolkit takes the shorter,
#   4, so again no brevity penalty.
# Corpus BLEU pools the counts: matched (10, 6, 3, 1) of guessed (11, 9, 7, 5), and
# candidate length 11 >= reference length 5 + 4.
CORPUS_BLEU = [10 / 11, (10 / 11 * 6 / 9) ** (1 / 2), (10 / 11 * 6 / 9 * 3 / 7) ** (1 / 3),
               (10 / 11 * 6 / 9 * 3 / 7 * 1 / 5) ** (1 / 4)]
IMG1_BLEU = [5 / 6, (5 / 6 * 3 / 5) ** (1 / 2), (5 / 6 * 3 / 5 * 2 / 4) ** (1 / 3),
             (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** (1 / 4)]
IMG2_BLEU = [1.0, (3 / 4) ** (1 / 2), (3 / 4 * 1 / 3) ** (1 / 3)]


def check_hand_bleu(summary, per_image):
    for n in range(4):
        if summary is not None:
            assert summary[f"BLEU-{n + 1}"] == pytest.approx(CORPUS_BLEU[n], abs=1e-8)
        assert per_image["img1"][f"BLEU-{n + 1}"] == pytest.approx(IMG1_BLEU[n], abs=1e-8)
    for n in range(3):
        assert per_image["img2"][f"BLEU-{n + 1}"] == pytest.approx(IMG2_BLEU[n], abs=1e-8)
    assert per_image["img2"]["BLEU-4"] < 1e-3  # no 4-gram matches; only the toolkit's epsilons


def test_bleu_by_hand_pure_python():
    summary, per_image = coco_metrics(REFS, CANDS, java=False)
    check_hand_bleu(summary, per_image)
    assert set(summary) == set(metrics.METRICS) and summary["METEOR"] is None
    assert set(per_image) == {"img1", "img2"}


def test_cider_d_and_rouge_by_hand():
    # Two images, one reference each: "a dog runs" and "a cat sits".
    # Document frequencies over the 2 images: "a" occurs in both, so its idf is
    # log(2/2) = 0; every other n-gram occurs in one, idf log(2/1) = log 2.
    # Image a, candidate = reference "a dog runs": for n = 1, 2, 3 the tf-idf vectors
    # are equal (cosine 1); there are no 4-grams (empty vectors count 0); equal
    # lengths, so no Gaussian penalty. CIDEr-D = 10 * mean(1, 1, 1, 0) = 7.5.
    # Image b, candidate "a cat" vs "a cat sits":
    #   1-grams: cand {a: 0, cat: g}, ref {a: 0, cat: g, sits: g} (g = log 2):
    #            clipped dot g*g, norms g and sqrt(2) g -> cosine 1/sqrt(2)
    #   2-grams: cand {a-cat: g}, ref {a-cat: g, cat-sits: g}     -> 1/sqrt(2)
    #   3-, 4-grams: the candidate has none                       -> 0
    #   penalty exp(-delta^2 / (2 * 6^2)) with delta = 1 - 2 = -1 (the toolkit counts
    #   bigrams for the length, a difference of 1 either way).
    #   CIDEr-D = 10 * (2 / sqrt(2)) / 4 * exp(-1 / 72) = 3.48677
    # ROUGE-L (beta = 1.2): image a is 1; image b has LCS 2, precision 2/2, recall 2/3,
    #   F = (1 + 1.44) * 1 * (2/3) / (2/3 + 1.44 * 1) = 0.77215
    refs = {"a": ["a dog runs"], "b": ["a cat sits"]}
    cands = {"a": "a dog runs", "b": "a cat"}
    summary, per_image = coco_metrics(refs, cands, java=False)
    cider_b = 10 * (2 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert per_image["a"]["CIDEr"] == pytest.approx(7.5, abs=1e-9)
    assert per_image["b"]["CIDEr"] == pytest.approx(cider_b, abs=1e-9)
    assert summary["CIDEr"] == pytest.approx((7.5 + cider_b) / 2, abs=1e-9)
    rouge_b = 2.44 * (2 / 3) / (2 / 3 + 1.44)
    assert per_image["a"]["ROUGE-L"] == pytest.approx(1.0)
    assert per_image["b"]["ROUGE-L"] == pytest.approx(rouge_b, abs=1e-9)
    assert summary["ROUGE-L"] == pytest.approx((1 + rouge_b) / 2, abs=1e-9)
    # BLEU: a matches (3,2,1) of (3,2,1); b matches (2,1) of (2,1); no 4-grams guessed
    # at all. Candidate length 5 < reference length 6: brevity penalty exp(1 - 6/5).
    bp = math.exp(1 - 6 / 5)
    for n in (1, 2, 3):
        assert summary[f"BLEU-{n}"] == pytest.approx(bp, abs=1e-8)


def test_identical_caption_scores_one_and_unrelated_scores_zero():
    refs = {1: ["a man rides a red bike down the road", "someone cycling"],
            2: ["two children play in the snow", "kids playing outside in winter"]}
    same = {1: "A man rides a red bike down the road.", 2: "Kids playing outside in winter"}
    summary, per_image = coco_metrics(refs, same, java=False)
    for i in (1, 2):
        assert per_image[i]["BLEU-4"] == pytest.approx(1.0, abs=1e-8)
        assert per_image[i]["ROUGE-L"] == pytest.approx(1.0)
    assert summary["BLEU-4"] == pytest.approx(1.0, abs=1e-8)
    unrelated = {1: "zebra", 2: "purple elephants dance quietly"}
    summary, per_image = coco_metrics(refs, unrelated, java=False)
    for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert summary[key] == pytest.approx(0.0, abs=1e-8), key
        assert per_image[1][key] == pytest.approx(0.0, abs=1e-8), key


def test_bad_input_is_a_data_error():
    with pytest.raises(DataError, match="no reference"):
        coco_metrics({1: ["a dog"]}, {1: "a dog", 2: "a cat"}, java=False)
    with pytest.raises(DataError, match="no reference"):
        coco_metrics({1: []}, {1: "a dog"}, java=False)
    with pytest.raises(DataError, match="no captions"):
        coco_metrics({1: ["a dog"]}, {}, java=False)


def test_empty_and_punctuation_only_candidates_do_not_crash():
    summary, per_image = coco_metrics({1: ["a dog"], 2: ["a cat"]}, {1: "", 2: "..."}, java=False)
    assert summary["CIDEr"] == 0.0 and per_image[1]["ROUGE-L"] == 0.0


# ---- with and without Java ---------------------------------------------------------------

def test_no_java_says_so_once_and_still_scores(monkeypatch, capsys):
    monkeypatch.setattr(metrics.shutil, "which", lambda name, *a, **k: None)
    summary, per_image = coco_metrics(REFS, CANDS)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: Java not found") and "METEOR" in err[0]
    check_hand_bleu(summary, per_image)
    assert summary["METEOR"] is None and per_image["img1"]["METEOR"] is None
    assert summary["CIDEr"] > 0 and summary["ROUGE-L"] > 0


def _fake_java(tmp_path, script):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    java = bin_dir / "java"
    java.write_text("#!/bin/sh\n" + script)
    java.chmod(java.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def test_broken_java_falls_back_with_a_note(tmp_path, monkeypatch, capsys):
    bin_dir = _fake_java(tmp_path, "echo 'Error: broken JVM' >&2\nexit 1\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    summary, per_image = coco_metrics(REFS, CANDS)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "PTB tokenizer" in err[0] and "pure Python" in err[0], err
    check_hand_bleu(summary, per_image)
    assert summary["METEOR"] is None


@needs_java
def test_meteor_failure_is_reported_not_fatal(tmp_path, monkeypatch, capsys):
    # The PTB tokenizer runs on the real Java; the METEOR jar's JVM dies at once. The
    # toolkit's wrapper then fails while holding its lock; scoring must go on.
    bin_dir = _fake_java(tmp_path, f'case "$*" in *meteor*) exit 3;; esac\nexec {JAVA} "$@"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    summary, per_image = coco_metrics(REFS, CANDS)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: METEOR") and "skipped" in err[0], err
    check_hand_bleu(summary, per_image)
    assert summary["METEOR"] is None


@pytest.fixture(scope="module")
def java_scores():
    """One full toolkit run (PTB tokenizer + METEOR): the METEOR jar alone takes
    10-15 s of CPU to load its paraphrase table, so the module pays for it once."""
    if JAVA is None:
        pytest.skip("Java not installed")
    refs = dict(REFS, img3=["A bird flies over the sea", "a seagull above the water"],
                img4=["two men play chess", "men playing a board game"])
    cands = dict(CANDS, img3="a bird flies over the sea", img4="zebra stripes")
    return coco_metrics(refs, cands)


@needs_java
def test_java_path_with_meteor(java_scores, capsys):
    summary, per_image = java_scores
    check_hand_bleu(None, per_image)  # the corpus BLEU here pools img3 and img4 as well
    m = {i: per_image[i]["METEOR"] for i in per_image}
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in m.values())
    assert m["img3"] == pytest.approx(1.0, abs=1e-6)   # identical to a reference
    assert m["img4"] == pytest.approx(0.0, abs=1e-9)   # nothing in common
    assert m["img4"] < m["img2"] < m["img3"] and m["img1"] > 0.3
    assert 0.0 < summary["METEOR"] < 1.0
    # the other metrics agree with the pure-Python path on these plain captions
    refs = dict(REFS, img3=["A bird flies over the sea", "a seagull above the water"],
                img4=["two men play chess", "men playing a board game"])
    cands = dict(CANDS, img3="a bird flies over the sea", img4="zebra stripes")
    py_summary, _ = coco_metrics(refs, cands, java=False)
    for key in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert summary[key] == pytest.approx(py_summary[key], abs=1e-12)


# ---- the pure-Python tokenizer against the toolkit's ----------------------------------

TRICKY = [
    "A dog's ball (red) is \"big\".",
    "Don't stop, t-shirt & hat 3.5 $5 [x] {y} a/b dogs' U.S. e-mail...",
    "foo -- bar ; ok? yes!  wow!! what?!",
    "Mr. Smith's car at 10:30, 1,000 people",
    "can't won't gonna I'm we're they've she'll he'd cannot",
    "\u201cquoted\u201d \u2018single\u2019 dog\u2019s ball",
    "a dog.the cat. a man , a woman,a child; the letter \" P. \"",
    "A young boy slides on a Slip 'n' Slide .",
    "the dog is brown.",
    "",
]


def test_ptb_tokenize_examples():
    assert ptb_tokenize("A dog's ball (red) is \"big\".") == "a dog 's ball -lrb- red -rrb- is big"
    assert ptb_tokenize("Don't stop, can't!") == "do n't stop ca n't"
    assert ptb_tokenize("Mr. Smith wears a T-shirt in the U.S.") == "mr. smith wears a t-shirt in the u.s."
    assert ptb_tokenize("  ") == ""


@needs_java
def test_ptb_tokenize_matches_the_toolkit_tokenizer():
    refs = {i: [s] for i, s in enumerate(TRICKY)}
    gts, _ = metrics._ptb_tokenize_java(refs, {})
    for i, s in enumerate(TRICKY):
        assert ptb_tokenize(s) == gts[i][0], s


@pytest.mark.slow
@pytest.mark.flickr8k
@needs_java
def test_ptb_tokenize_agrees_on_flickr8k_captions():
    path = DATA / "flickr8k" / "captions.json"
    if not path.exists():
        pytest.skip(f"{path} not found")
    images = json.loads(path.read_text())["images"]
    caps = [c for im in images if im["split"] == "val" for c in im["captions"]]
    gts, _ = metrics._ptb_tokenize_java({i: [c] for i, c in enumerate(caps)}, {})
    differ = sum(ptb_tokenize(c) != gts[i][0] for i, c in enumerate(caps))
    assert differ <= len(caps) // 1000, differ


# ---- perplexity ----------------------------------------------------------------------------

def _captions(rng, n, T, vocab):
    caps = np.zeros((n, T + 1), dtype=np.int64)
    caps[:, 0] = 1
    for i in range(n):
        L = rng.integers(1, T)
        caps[i, 1:L + 1] = rng.integers(3, vocab, size=L)
        caps[i, L + 1] = 2
    return caps


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    from rnncap.models.model import CaptioningModel

    m = CaptioningModel(17, 4, 3, 5, dtype=np.float64, seed=0)
    m.params["W_vocab"][:] = 0.0  # every word equally likely
    rng = np.random.default_rng(0)
    caps = _captions(rng, 30, 8, 17)
    assert perplexity(m, rng.standard_normal((30, 4)), caps, batch_size=7) == pytest.approx(17.0)


def test_perplexity_is_per_token_nll():
    from rnncap.inference.decoding import sequence_log_prob
    from rnncap.models.model import CaptioningModel

    m = CaptioningModel(12, 4, 3, 6, cell_type="lstm", dtype=np.float64, seed=1,
                        label_smoothing=0.2, dropout=0.3)
    rng = np.random.default_rng(1)
    caps = _captions(rng, 25, 7, 12)
    feats = rng.standard_normal((5, 4))
    idx = rng.integers(0, 5, size=25)
    lp = sequence_log_prob(m, feats[idx], caps[:, 1:])
    tokens = np.count_nonzero(caps[:, 1:])
    want = math.exp(-lp.sum() / tokens)
    # neither label smoothing nor dropout nor the batching changes it
    for bs in (1, 4, 100):
        assert perplexity(m, feats, caps, image_idx=idx, batch_size=bs) == pytest.approx(want, rel=1e-10)
    assert perplexity(m, feats[idx], caps) == pytest.approx(want, rel=1e-10)
    assert m.label_smoothing == 0.2  # the model itself is untouched


# ---- diversity -----------------------------------------------------------------------------

def test_diversity_flags_a_model_that_says_the_same_thing():
    same = {i: "A dog runs on the grass." for i in range(10)}
    d = diversity(same)
    assert d["distinct_captions"] == 1 and d["top_caption_share"] == 1.0
    assert d["unique_image_fraction"] == 0.0 and d["distinct_fraction"] == 0.1
    assert d["vocab_used"] == 6 and d["mean_length"] == 6.0
    assert d["top_caption"] == "a dog runs on the grass"


def test_diversity_of_varied_captions():
    caps = {1: "a dog runs", 2: "a cat sleeps", 3: "A dog runs.", 4: "two birds fly away"}
    d = diversity(caps)
    # "a dog runs" twice (case and the full stop do not count), two others unique
    assert d["images"] == 4 and d["captions"] == 4
    assert d["distinct_captions"] == 3 and d["distinct_fraction"] == 0.75
    assert d["unique_image_fraction"] == 0.5
    assert d["top_caption"] == "a dog runs" and d["top_caption_share"] == 0.5
    assert d["vocab_used"] == 9  # a dog runs cat sleeps two birds fly away
    assert d["mean_length"] == pytest.approx((3 + 3 + 3 + 4) / 4)


def test_diversity_with_several_captions_per_image():
    d = diversity({1: ["a dog", "a dog runs"], 2: ["a cat", "a dog"]})
    assert d["captions"] == 4 and d["distinct_captions"] == 3
    assert d["unique_image_fraction"] == 0.0  # both images said "a dog"
    with pytest.raises(ValueError):
        diversity({})
