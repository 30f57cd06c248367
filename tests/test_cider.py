"""rnncap.evaluation.cider against the COCO toolkit's CIDEr-D (pycocoevalcap), to 1e-6.

Both sides always get the same tokens (the toolkit gets them joined by spaces).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pycocoevalcap")
from cider_oracle import toolkit_cider, toolkit_cider_fixed_df  # noqa: E402

from rnncap.evaluation.cider import CiderD, cider_d  # noqa: E402
from rnncap.errors import DataError  # noqa: E402

FLICKR8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k" / "captions.json"


def _random_caption(rng, vocab, lo=0, hi=14):
    return [vocab[j] for j in rng.integers(0, len(vocab), size=int(rng.integers(lo, hi + 1)))]


def _random_sets(seed, n_images=None):
    """Random captions over a small vocabulary (so words repeat and n-grams are shared),
    1-6 references per image, lengths 0-14 words, some 1-word candidates."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{j}" for j in range(int(rng.integers(2, 25)))] + ["<END>"]
    n = n_images or int(rng.integers(2, 40))
    refs = [[_random_caption(rng, vocab, lo=1) for _ in range(int(rng.integers(1, 7)))] for _ in range(n)]
    cands = []
    for i in range(n):
        kind = rng.integers(0, 4)
        if kind == 0:
            cands.append(_random_caption(rng, vocab, 1, 1))           # one word
        elif kind == 1:
            cands.append(list(refs[i][0]))                              # an exact reference
        else:
            cands.append(_random_caption(rng, vocab, 0, 14))
    return cands, refs


# ---- hand-derived cases ---------------------------------------------------------------

def test_hand_derived_scores():
    # Two images, N = 2, so a word in one image's references has idf log(2/1) = log 2.
    # Image 0: candidate "a b" = its one reference "a b". Orders 1 and 2: identical
    #   vectors, cosine 1; orders 3 and 4: no n-grams, 0. Lengths equal (1 bigram each).
    #   CIDEr-D = 10 * (1 + 1 + 0 + 0) / 4 = 5.
    # Image 1: candidate "c c" against "c d". Unigrams: h = {c: 2 log 2}, r = {c: log 2,
    #   d: log 2}; clipped dot = min(2 log 2, log 2) * log 2 = log(2)^2; |h| = 2 log 2,
    #   |r| = sqrt(2) log 2, cosine 1 / (2 sqrt 2). The bigram "c c" is in no reference
    #   (df 0, weight log 2) and matches nothing: 0. CIDEr-D = 10 / (4 * 2 sqrt 2).
    cands = [["a", "b"], ["c", "c"]]
    refs = [[["a", "b"]], [["c", "d"]]]
    mean, per = cider_d(cands, refs)
    expected = [5.0, 10 / (8 * math.sqrt(2))]
    np.testing.assert_allclose(per, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(toolkit_cider(cands, refs)[1], expected, rtol=0, atol=1e-12)
    assert mean == pytest.approx(np.mean(expected))


def test_length_penalty_hand_derived():
    # Candidate "a" against reference "a b": one word shorter (the toolkit counts 0 bigrams
    # against 1, the same difference), so the unigram cosine is multiplied by exp(-1 / 72).
    # Unigrams h = {a: w}, r = {a: w, b: w} with w = log 2: cosine = w^2 / (w * sqrt(2) w)
    # = 1 / sqrt 2. Image 1 only makes N = 2.
    mean, per = cider_d([["a"], ["z"]], [[["a", "b"]], [["z", "y"]]])
    assert toolkit_cider([["a"], ["z"]], [[["a", "b"]], [["z", "y"]]])[1][0] == pytest.approx(per[0], abs=1e-12)
    assert per[0] == pytest.approx(10 / 4 * math.exp(-1 / 72) / math.sqrt(2), abs=1e-12)


def test_fixed_corpus_hand_derived():
    # Corpus of 4 reference sets; "dog" is in 2 of them, "runs" in 1, "dog runs" in 1.
    corpus = [[["dog", "runs"]], [["dog", "sits"]], [["cat"]], [["bird"]]]
    scorer = CiderD(corpus)
    assert scorer.document_frequency(["dog"]) == 2
    assert scorer.document_frequency(["dog", "runs"]) == 1
    assert scorer.document_frequency(["unseen"]) == 0
    # "dog runs" against set 0 ("dog runs"): weights dog log(4/2), runs log 4, "dog runs"
    # log 4; identical vectors, so cosine 1 in orders 1 and 2: 10 * 2 / 4 = 5.
    assert scorer.score([["dog", "runs"]], [0])[0] == pytest.approx(5.0, abs=1e-12)
    # "dog" against set 0: unigram dot = log(2)^2; |h| = log 2, |r| = sqrt(log(2)^2 +
    # log(4)^2) = sqrt(5) log 2; cosine 1/sqrt(5); lengths 0 and 1 bigrams: exp(-1/72).
    assert scorer.score([["dog"]], [0])[0] == pytest.approx(10 / 4 / math.sqrt(5) * math.exp(-1 / 72),
                                                            abs=1e-12)


# ---- against the toolkit on random sets -------------------------------------------------

@pytest.mark.parametrize("seed", range(40))
def test_equals_the_toolkit_on_random_sets(seed):
    cands, refs = _random_sets(seed)
    mean, per = cider_d(cands, refs)
    kit_mean, kit = toolkit_cider(cands, refs)
    assert per.shape == (len(cands),)
    np.testing.assert_allclose(per, kit, rtol=0, atol=1e-6)
    assert mean == pytest.approx(kit_mean, abs=1e-6)


def test_equals_coco_metrics_cider():
    """The scorer coco_metrics reports (pure-Python tokenisation path), on its own tokens."""
    from rnncap.evaluation.metrics import coco_metrics, ptb_tokenize

    rng = np.random.default_rng(7)
    words = "a dog runs on the grass cat sits mat red ball , .".split()
    refs = {i: [" ".join(rng.choice(words, size=int(rng.integers(2, 9)))) for _ in range(3)]
            for i in range(12)}
    cands = {i: " ".join(rng.choice(words, size=int(rng.integers(1, 9)))) for i in range(12)}
    _, per_image = coco_metrics(refs, cands, java=False, meteor=False)
    _, per = cider_d([ptb_tokenize(cands[i]).split() for i in range(12)],
                     [[ptb_tokenize(r).split() for r in refs[i]] for i in range(12)])
    np.testing.assert_allclose(per, [per_image[i]["CIDEr"] for i in range(12)], rtol=0, atol=1e-6)


def test_edge_cases_against_the_toolkit():
    refs = [[["a", "a", "a"], ["a"]], [["b"]], [["a", "b", "a", "b", "a"]], [["c", "d", "e", "f", "g"]]]
    for cands in ([[], ["b"], ["a"], ["c"]],                          # an empty candidate
                  [["a"], ["b"], ["a", "b", "a", "b", "a"], ["x", "y"]],  # unseen words
                  [["a"] * 20, ["b", "b"], ["b", "a"], ["c", "d", "e", "f", "g"]]):
        np.testing.assert_allclose(cider_d(cands, refs)[1], toolkit_cider(cands, refs)[1], rtol=0,
                                   atol=1e-6)


def test_captions_without_words():
    cands, refs = [[], ["a"], []], [[[]], [[], ["a"]], [["b"]]]
    np.testing.assert_allclose(cider_d(cands, refs)[1], toolkit_cider(cands, refs)[1], rtol=0, atol=1e-12)
    assert cider_d([[], []], [[[]], [[]]])[1].tolist() == [0.0, 0.0]
    assert CiderD([[[]]]).score([["a"]], [[["a"]]]).tolist() == [0.0]


def test_a_single_image_scores_zero_like_the_toolkit():
    # N = 1: every reference n-gram has idf log(1/1) = 0, so all reference vectors vanish.
    assert cider_d([["a", "b"]], [[["a", "b"]]])[1].tolist() == [0.0]
    assert toolkit_cider([["a", "b"]], [[["a", "b"]]])[1].tolist() == [0.0]


# ---- fixed document frequencies ---------------------------------------------------------

@pytest.mark.parametrize("seed", range(12))
def test_fixed_corpus_equals_the_toolkit_math_with_the_corpus_df(seed):
    corpus_cands, corpus = _random_sets(seed, n_images=30)
    scorer = CiderD(corpus)
    # With candidates for every corpus image, fixed df is exactly the toolkit's behaviour.
    np.testing.assert_allclose(scorer.score(corpus_cands, np.arange(30)), toolkit_cider(corpus_cands, corpus)[1],
                               rtol=0, atol=1e-6)
    # K = 3 samples for each of 8 images (repeated ids), as training rewards use it.
    rng = np.random.default_rng(seed + 100)
    vocab = sorted({w for refs in corpus for r in refs for w in r}) + ["never-seen"]
    ids = np.repeat(rng.choice(30, size=8, replace=False), 3)
    cands = [_random_caption(rng, vocab, 1, 12) for _ in ids]
    got = scorer.score(cands, ids)
    kit = toolkit_cider_fixed_df(corpus, cands, [corpus[i] for i in ids])
    np.testing.assert_allclose(got, kit, rtol=0, atol=1e-6)
    # The same references passed as token lists take the other path, same numbers.
    np.testing.assert_allclose(scorer.score(cands, [corpus[i] for i in ids]), got, rtol=0, atol=1e-12)
    # References outside the corpus (n-grams the corpus lacks have df 0).
    other = [[_random_caption(rng, vocab, 1, 10) for _ in range(int(rng.integers(1, 5)))] for _ in ids]
    np.testing.assert_allclose(scorer.score(cands, other), toolkit_cider_fixed_df(corpus, cands, other),
                               rtol=0, atol=1e-6)


def test_the_general_sort_gives_the_same_scores(monkeypatch):
    """More distinct tokens than the 16-bit unigram sort takes: the general path."""
    import rnncap.evaluation.cider

    cands, refs = _random_sets(5, n_images=30)
    fast = cider_d(cands, refs)[1]
    monkeypatch.setattr(rnncap.evaluation.cider, "_RADIX_TOKENS", 0)
    np.testing.assert_array_equal(cider_d(cands, refs)[1], fast)
    np.testing.assert_allclose(cider_d(cands, refs)[1], toolkit_cider(cands, refs)[1], rtol=0, atol=1e-6)


def test_scores_do_not_depend_on_the_batch():
    cands, refs = _random_sets(3, n_images=20)
    scorer = CiderD(refs)
    whole = scorer.score(cands, np.arange(20))
    one_by_one = [scorer.score([c], [i])[0] for i, c in enumerate(cands)]
    np.testing.assert_allclose(whole, one_by_one, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(scorer.score(cands, np.arange(20)), whole)  # nothing cached wrongly
    np.testing.assert_array_equal(scorer.score(cands[::-1], np.arange(20)[::-1]), whole[::-1])
    assert scorer.score([], np.zeros(0, dtype=int)).shape == (0,)


def test_bad_input_is_refused():
    with pytest.raises(DataError, match="2 candidates but 1"):
        cider_d([["a"], ["b"]], [[["a"]]])
    with pytest.raises(DataError, match="no captions"):
        cider_d([], [])
    with pytest.raises(DataError, match="reference set 1"):
        cider_d([["a"], ["b"]], [[["a"]], []])
    with pytest.raises(TypeError, match="token lists"):
        cider_d(["a dog"], [[["a", "dog"]]])
    scorer = CiderD([[["a"]], [["b"]]])
    with pytest.raises(IndexError):
        scorer.score([["a"]], [2])
    with pytest.raises(DataError, match="reference ids"):
        scorer.score([["a"]], [0, 1])


# ---- real captions ----------------------------------------------------------------------

def _flickr8k_val():
    if not FLICKR8K.exists():
        pytest.skip(f"{FLICKR8K} not found")
    from rnncap.data.vocab import tokenize

    images = [im for im in json.loads(FLICKR8K.read_text())["images"] if im["split"] == "val"]
    return [[tokenize(c) for c in im["captions"]] for im in images]


@pytest.mark.flickr8k
def test_equals_the_toolkit_on_flickr8k_val():
    """One human caption of each val image against the other four (1,000 images)."""
    val = _flickr8k_val()
    cands, refs = [caps[0] for caps in val], [caps[1:] for caps in val]
    mean, per = cider_d(cands, refs)
    kit_mean, kit = toolkit_cider(cands, refs)
    np.testing.assert_allclose(per, kit, rtol=0, atol=1e-6)
    assert mean == pytest.approx(kit_mean, abs=1e-6)
    assert 0.5 < mean < 1.2  # a human caption scores about 0.8 here (docs/metrics.md)


@pytest.mark.flickr8k
def test_fixed_corpus_on_flickr8k_val_with_end_tokens():
    """Rewards' setting: df from all val references (with "<END>"), 3 captions each of
    200 images scored against their own 5 references."""
    val = [[caps + ["<END>"] for caps in im] for im in _flickr8k_val()]
    scorer = CiderD(val)
    ids = np.repeat(np.arange(0, 1000, 5), 3)
    cands = [val[(i + 1) % 1000][k % 5] for k, i in enumerate(ids)]  # another image's captions
    cands[::7] = [val[i][0] for i in ids[::7]]                        # and some of its own
    got = scorer.score(cands, ids)
    np.testing.assert_allclose(got, toolkit_cider_fixed_df(val, cands, [val[i] for i in ids]), rtol=0,
                               atol=1e-6)
