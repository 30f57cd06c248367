"""The decoding rules: no <END> after a bad ending, no word after itself, optional
trigram blocking; the same rules in every decoder, counted by the defect figures."""
from __future__ import annotations

import numpy as np
import pytest

from rnncap.config import DecodeConfig, decode_config
from rnncap.data.vocab import Vocab, bad_endings
from rnncap.evaluation.metrics import defects, diversity
from rnncap.inference.decoding import (Rules, allowed, beam_search, greedy_decode, rules_for,
                                       sample_decode)
from rnncap.models.model import CaptioningModel

V, D = 9, 6
END = 2


def test_allowed_forbids_each_rule_and_nothing_else():
    scores = np.zeros((3, V))
    history = np.array([[4, 5, 6, 4, 5],      # pair (4, 5) seen before: 6 would repeat (4, 5, 6)
                        [7, 8, 3, 7, 7],      # last word 7 twice: 7 again is a repeat
                        [4, 5, 4, 5, 8]])     # 8 is a bad ending
    rules = Rules(bad_endings=(8,), no_repeat=True, block_trigrams=True)
    out = allowed(scores, history, END, banned=(0,), rules=rules)
    forbidden = {(r, w) for r, w in zip(*np.nonzero(np.isinf(out)))}
    assert forbidden == {(0, 0), (1, 0), (2, 0),          # banned everywhere
                         (0, 5), (1, 7), (2, 8),          # no word right after itself
                         (0, 6),                          # trigram (4, 5, 6) again
                         (2, END)}                        # <END> after a bad ending
    assert not np.isinf(scores).any()                      # the input is untouched
    # Without trigram blocking, the trigram is allowed; without rules only the ban stays.
    out = allowed(scores, history, END, rules=rules._replace(block_trigrams=False))
    assert not np.isinf(out[0, 6])
    assert allowed(scores, history, END) is scores
    # At the first step there is no history: nothing to forbid.
    assert allowed(scores, history[:, :0], END, rules=rules) is scores


def peaked_model(seed=0):
    m = CaptioningModel(V, D, 5, 8, cell_type="lstm", dtype=np.float64, seed=seed)
    m.params["W_vocab"] = m.params["W_vocab"] * 3.0
    return m


def stutter_model():
    """A model that wants to say word 4 forever: every decoder stutters without rules."""
    m = peaked_model()
    m.params["W_vocab"][:] = 0.0
    m.params["b_vocab"][:] = 0.0
    m.params["b_vocab"][4] = 5.0
    m.params["b_vocab"][5] = 3.0
    m.params["b_vocab"][END] = 1.0
    return m


def _has_defect(row, bad=()):
    row = [int(w) for w in row if w not in (0,)]
    words = row[:row.index(END)] if END in row else row
    repeat = any(a == b for a, b in zip(words, words[1:]))
    tri = list(zip(words, words[1:], words[2:]))
    ended_badly = END in row and bool(words) and words[-1] in bad
    return repeat or len(set(tri)) < len(tri) or ended_badly


def _decoders(model, f, rules):
    yield greedy_decode(model, f, max_length=12, banned=(0, 1, 3), rules=rules)
    yield sample_decode(model, f, max_length=12, rng=0, banned=(0, 1, 3), rules=rules)
    hyps = beam_search(model, f, beam_size=3, max_length=12, banned=(0, 1, 3), rules=rules, n_best=3)
    for h in hyps:
        for hyp in h:
            yield [hyp.ids]


def test_every_decoder_follows_the_rules():
    model, f = stutter_model(), np.random.default_rng(0).standard_normal((4, D))
    # Without rules: "4 4 4 ...".
    assert (greedy_decode(model, f, max_length=6)[:, :3] == 4).all()
    rules = Rules(bad_endings=(5,), no_repeat=True, block_trigrams=True)
    for out in _decoders(model, f, rules):
        for row in out:
            assert not _has_defect(row, bad=(5,)), row
    # Random models too: the rules hold whatever the model prefers.
    for seed in range(4):
        model = peaked_model(seed)
        for out in _decoders(model, f, rules):
            for row in out:
                assert not _has_defect(row, bad=(5,)), row


def test_beam_logprob_stays_the_models_under_rules():
    from rnncap.inference.decoding import sequence_log_prob

    model, f = stutter_model(), np.random.default_rng(1).standard_normal((2, D))
    rules = Rules(bad_endings=(5,), no_repeat=True, block_trigrams=True)
    for n, hyps in enumerate(beam_search(model, f, beam_size=3, max_length=8, rules=rules, n_best=2)):
        for h in hyps:
            assert h.logprob == pytest.approx(sequence_log_prob(model, f[n:n + 1], [h.ids])[0], abs=1e-9)


def test_bad_endings_from_training_captions():
    caps = ["a dog runs on the grass", "a man in a red shirt", "the dog is red",
            "a dog in the water", "two dogs in the snow"] + ["a red ball in the grass"] * 200
    vocab = Vocab.build(caps)
    bad = bad_endings(caps, vocab)
    # "a", "in", "the", "ball" never end one; "red" ends 1 of 202 uses (< 1 in 100).
    assert {"a", "in", "the", "ball", "red", "on"} <= set(bad)
    assert not {"grass", "shirt", "water", "snow"} & set(bad)
    # Whole captions count: the last word of a long caption is where the person stopped.
    assert "snow" not in bad_endings(["a b c snow"], Vocab.build(["a b c snow"]))


def test_rules_for_a_decode_config():
    vocab = Vocab.build(["a dog on grass"])
    cfg = DecodeConfig(bad_endings=["a", "on", "unknown"])
    r = rules_for(vocab, cfg)
    assert r == Rules(tuple(sorted(vocab.word_to_idx[w] for w in ("a", "on"))), True, True)
    assert rules_for(vocab, DecodeConfig(rules=False, block_trigrams=True, bad_endings=["a"])) == \
        Rules((), False, True)
    # A checkpoint from before the rules: the no-repeat rule and trigram blocking, no list.
    assert rules_for(vocab, decode_config({"decode": {"beam_size": 3, "length_norm": 0.5}})) == \
        Rules((), True, True)


def test_defect_counts():
    caps = ["a a dog is jumping", "two dogs pulling a sled sled",
            "a crowd of people in front of a crowd of people", "a man in front of a",
            "a dog runs on the grass"]
    d = defects(caps, bad_endings=["a", "of"])
    assert d == {"repeated_words": 2, "repeated_trigrams": 1, "mid_phrase_endings": 1}
    assert "mid_phrase_endings" not in defects(caps)
    div = diversity({i: c for i, c in enumerate(caps)}, bad_endings=["a"])
    assert div["repeated_words"] == 2 and div["mid_phrase_endings"] == 1
