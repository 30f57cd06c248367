"""Ensembles: several captioners decoding as one model through the decoders' contract,
in every decoder and every command that captions."""
from __future__ import annotations

import json

import numpy as np
import pytest

from rnncap.inference.decoding import (Rules, beam_search, greedy_decode, log_softmax, sample_decode,
                                       sequence_log_prob)
from rnncap.inference.ensemble import Ensemble, MemberFeatures
from rnncap.models.attention import AttentionCaptioningModel
from rnncap.models.transformer import TransformerCaptioningModel
from rnncap.models.model import CaptioningModel

V, D, L = 11, 6, 4
BANNED = (0, 1, 3)


def h0_model(seed, dtype=np.float64):
    m = CaptioningModel(V, D, 5, 8, cell_type="lstm", dtype=dtype, seed=seed)
    m.params["W_vocab"] = m.params["W_vocab"] * 3.0
    return m


def att_model(seed, dtype=np.float64):
    m = AttentionCaptioningModel(V, D, 5, 8, attention_dim=7, dtype=dtype, seed=seed)
    m.params["W_vocab"] = m.params["W_vocab"] * 3.0
    return m


def transformer_model(seed, dtype=np.float64):
    # A Transformer over the same maps (one memory token per location).
    m = TransformerCaptioningModel(V, D, embed_dim=8, num_heads=2, num_layers=2, ffn_dim=12,
                                   locations=L, dtype=dtype, seed=seed, dropout=0.0)
    m.params["W_vocab"] = m.params["W_vocab"] * 3.0
    return m


def pooled(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, D))


def maps(n, seed=0):
    return np.random.default_rng(seed + 1).standard_normal((n, L, D))


def decode_all(model, f, rules=None):
    """Greedy ids, sampled ids, beam hypotheses (ids, logprob) and their log-probability."""
    g = greedy_decode(model, f, max_length=8, banned=BANNED, rules=rules)
    s = sample_decode(model, f, max_length=8, rng=7, banned=BANNED, rules=rules)
    hyps = beam_search(model, f, beam_size=3, max_length=8, n_best=2, banned=BANNED, rules=rules)
    return g, s, [[(h.ids, h.logprob) for h in hs] for hs in hyps], sequence_log_prob(model, f, g)


def assert_same_decoding(a, b):
    g1, s1, h1, lp1 = a
    g2, s2, h2, lp2 = b
    np.testing.assert_array_equal(g1, g2)
    np.testing.assert_array_equal(s1, s2)
    for x, y in zip(h1, h2):
        assert [list(i) for i, _ in x] == [list(i) for i, _ in y]
        np.testing.assert_allclose([p for _, p in x], [p for _, p in y], atol=1e-9)
    np.testing.assert_allclose(lp1, lp2, atol=1e-9)


@pytest.mark.parametrize("kind", ["h0", "attention"])
@pytest.mark.parametrize("rules", [None, Rules((5,), True, True)])
def test_an_ensemble_of_one_decodes_exactly_like_the_model(kind, rules):
    model, f = (h0_model(0), pooled(20)) if kind == "h0" else (att_model(0), maps(20))
    for average in ("logprob", "prob"):
        assert_same_decoding(decode_all(Ensemble([model], average=average), f, rules),
                             decode_all(model, f, rules))


@pytest.mark.parametrize("average", ["logprob", "prob"])
def test_copies_of_one_model_decode_like_it(average):
    model, f = h0_model(1), pooled(20, seed=1)
    assert_same_decoding(decode_all(Ensemble([model, model, model], average=average), f),
                         decode_all(model, f))


def test_the_average_is_the_members_mean_distribution():
    a, b = h0_model(2), att_model(3)
    f = MemberFeatures([pooled(5), maps(5)])
    words = np.array([4, 5, 6, 7, 8])
    (sa, _), (sb, _) = a.step(words, a.init_state(f.arrays[0])), b.step(words, b.init_state(f.arrays[1]))
    pa, pb = np.exp(log_softmax(sa, np)), np.exp(log_softmax(sb, np))
    ens = Ensemble([a, b], average="prob")
    scores, _ = ens.step(words, ens.init_state(f))
    np.testing.assert_allclose(np.exp(scores), (pa + pb) / 2, rtol=1e-10)
    ens = Ensemble([a, b], average="logprob")
    scores, _ = ens.step(words, ens.init_state(f))
    geo = np.sqrt(pa * pb)
    np.testing.assert_allclose(np.exp(log_softmax(scores, np)), geo / geo.sum(axis=1, keepdims=True),
                               rtol=1e-10)


def test_members_of_mixed_kinds_decode_through_every_decoder():
    # An h0 LSTM on pooled features, an attention LSTM and a Transformer on maps;
    # enough images that the decoders split them into shards run side by side.
    ens = Ensemble([h0_model(4), att_model(5), transformer_model(6)], average="logprob")
    f = MemberFeatures([pooled(40, seed=4), maps(40, seed=4), maps(40, seed=4)])
    g, s, hyps, lp = decode_all(ens, f, Rules((5,), True, False))
    # Each image decodes as it does alone: rows do not interact (and shards add up).
    np.testing.assert_array_equal(g[7:8], greedy_decode(ens, f[7:8], max_length=8, banned=BANNED,
                                                        rules=Rules((5,), True, False)))
    # Beam scores are the ensemble's own log-probability of its captions.
    for n in (0, 13, 39):
        for ids, logprob in hyps[n]:
            assert logprob == pytest.approx(sequence_log_prob(ens, f[n:n + 1], [ids])[0], abs=1e-9)
    assert g.shape == s.shape == (40, 8)
    # And it differs from either member alone (the average is not one of them).
    alone = greedy_decode(ens.members[0], f.arrays[0], max_length=8, banned=BANNED)
    assert not np.array_equal(g, alone)


def test_bad_ensembles_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        Ensemble([])
    with pytest.raises(ValueError, match="average"):
        Ensemble([h0_model(0)], average="median")
    other = CaptioningModel(V + 1, D, 5, 8, seed=0)
    with pytest.raises(ValueError, match="vocabulary size"):
        Ensemble([h0_model(0), other], names=["a.npz", "b.npz"])
    with pytest.raises(ValueError, match="dropout"):
        ens = Ensemble([h0_model(0)])
        ens.step(np.array([1]), ens.init_state(pooled(1)), masks=(None, None))


# ---- checkpoints, commands and the server ----------------------------------------------

@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Three checkpoints on one synthetic dataset: two h0 LSTMs on pooled Lite0
    features (one encoder identity), one attention LSTM on the block map (another),
    plus one with another vocabulary; and feature caches of both kinds."""
    from rnncap.checkpoint import save_checkpoint
    from rnncap.cli import main
    from rnncap.data import synth
    from rnncap.data.datasets import load_dataset
    from rnncap.encoding.features import read_identity
    from rnncap.training.train import dataset_vocab
    from rnncap.config import DataConfig, DecodeConfig, to_dict
    from rnncap.data.vocab import Vocab

    tmp = tmp_path_factory.mktemp("ensemble")
    data = synth.write_dataset(tmp / "data", 12, seed=1, image_size=64)
    assert main(["features", "--data", str(data), "--out", str(tmp / "pooled.h5"), "--quiet"]) == 0
    assert main(["features", "--data", str(data), "--out", str(tmp / "maps.h5"), "--maps", "block",
                 "--quiet"]) == 0
    dataset = load_dataset(str(data))
    vocab = dataset_vocab(dataset, DataConfig(min_count=1))
    configs = {"data": {"captions": str(data), "max_length": 12},
               "decode": to_dict(DecodeConfig(beam_size=2, bad_endings=["a", "the"]))}
    out = {"data": data, "pooled": tmp / "pooled.h5", "maps": tmp / "maps.h5", "ckpts": {}}
    pooled_id, maps_id = read_identity(tmp / "pooled.h5"), read_identity(tmp / "maps.h5")
    for name, model, ident, voc in (
            ("h0a", CaptioningModel(len(vocab), 1280, 8, 16, seed=1), pooled_id, vocab),
            ("h0b", CaptioningModel(len(vocab), 1280, 8, 16, seed=2), pooled_id, vocab),
            ("att", AttentionCaptioningModel(len(vocab), 320, 8, 16, attention_dim=8, seed=3), maps_id, vocab),
            ("other", CaptioningModel(len(vocab) + 1, 1280, 8, 16, seed=4), pooled_id,
             Vocab(list(vocab.idx_to_word) + ["zebra"]))):
        model.params["W_vocab"] = model.params["W_vocab"] * 20.0  # peaked, so members disagree
        path = tmp / f"{name}.npz"
        save_checkpoint(path, model, voc, encoder=ident, configs=configs)
        out["ckpts"][name] = path
    out["photos"] = [str(p) for p in sorted((tmp / "data" / "images").glob("*.png"))[:3]]
    return out


def test_captioner_encodes_each_photo_once_per_encoder(members, monkeypatch):
    from rnncap.encoding.encoders import Encoder
    from rnncap.inference.sample import Captioner

    c = members["ckpts"]
    cap = Captioner.from_checkpoint([c["h0a"], c["h0b"], c["att"]])
    assert isinstance(cap.model, Ensemble) and cap.model.average == "logprob"
    assert cap.decode.beam_size == 2 and cap.decode.bad_endings == ["a", "the"]
    calls = []
    real = Encoder.encode
    monkeypatch.setattr(Encoder, "encode", lambda self, ims, **kw: calls.append(self.pooling) or real(self, ims, **kw))
    captions = cap.caption_many(members["photos"])
    assert sorted(calls) == ["block-map", "mean"]  # two identities, two encodings
    assert all(isinstance(c, str) and c for c in captions)
    # The same captions as decoding the members' own features by hand.
    feats = cap.features(members["photos"])
    assert [a.shape[1:] for a in feats.arrays] == [(1280,), (1280,), (49, 320)]
    want = [cap.vocab.decode(h[0].ids) for h in beam_search(
        cap.model, feats, beam_size=2, max_length=13, length_norm=cap.decode.length_norm,
        banned=cap.vocab.never_generated, rules=cap.rules)]
    assert captions == want
    # One checkpoint stays a plain model.
    assert not isinstance(Captioner.from_checkpoint(c["h0a"]).model, Ensemble)


def test_caption_command_takes_several_checkpoints(members, capsys):
    from rnncap.cli import main
    from rnncap.inference.sample import Captioner

    c = members["ckpts"]
    assert main(["caption", *members["photos"], "--checkpoint", str(c["h0a"]), str(c["att"]),
                 "--ensemble", "prob", "--json"]) == 0
    got = [r["caption"] for r in json.loads(capsys.readouterr().out)]
    assert got == Captioner.from_checkpoint([c["h0a"], c["att"]], average="prob").caption_many(members["photos"])


def test_a_vocabulary_mismatch_is_one_line_naming_both_files(members, capsys):
    from rnncap.cli import main

    c = members["ckpts"]
    assert main(["caption", members["photos"][0], "--checkpoint", str(c["h0a"]), str(c["other"])]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(c["h0a"]) in err and str(c["other"]) in err and "different vocabularies" in err


def test_evaluate_matches_feature_caches_to_members(members, tmp_path, capsys):
    from rnncap.cli import main

    c = members["ckpts"]
    common = ["--data", str(members["data"]), "--split", "train", "--no-meteor", "--json"]
    assert main(["evaluate", "--checkpoint", str(c["att"]), str(c["h0a"]), "--features", str(members["pooled"]),
                 str(members["maps"]), "--out", str(tmp_path / "e"), *common]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {"CIDEr", "repeated_words", "repeated_trigrams", "mid_phrase_endings"} <= set(summary)
    assert "perplexity" not in summary  # an ensemble has no single likelihood
    run = json.loads((tmp_path / "e" / "metrics.json").read_text())["run"]
    assert run["checkpoint"] == [str(c["att"]), str(c["h0a"])] and run["ensemble"] == "logprob"
    # A member whose encoder made none of the caches: one line naming it.
    assert main(["evaluate", "--checkpoint", str(c["att"]), str(c["h0a"]), "--features", str(members["pooled"]),
                 "--out", str(tmp_path / "f"), *common]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(c["att"]) in err and "block-map" in err


def test_evaluate_with_and_without_the_rules(members, tmp_path, capsys):
    from rnncap.cli import main

    c = members["ckpts"]
    common = ["--checkpoint", str(c["h0a"]), "--data", str(members["data"]), "--split", "train",
              "--features", str(members["pooled"]), "--no-meteor", "--json", "--beam", "1"]
    results = {}
    for flags in (["--no-rules"], ["--rules", "--block-trigrams"]):
        assert main(["evaluate", *common, *flags, "--out", str(tmp_path / flags[0])]) == 0
        results[flags[0]] = json.loads(capsys.readouterr().out)
        run = json.loads((tmp_path / flags[0] / "metrics.json").read_text())["run"]
        assert run["rules"] is (flags[0] == "--rules")
    # This peaked random model stutters without the rules and never with them.
    assert results["--no-rules"]["repeated_words"] > 0
    assert results["--rules"]["repeated_words"] == results["--rules"]["repeated_trigrams"] == 0
    assert results["--rules"]["mid_phrase_endings"] == 0


def test_server_and_page_show_the_members(members):
    from fastapi.testclient import TestClient

    from rnncap.inference.sample import Captioner
    from rnncap.inference.serve import create_app, describe_checkpoint

    c = members["ckpts"]
    paths = [c["h0a"], c["att"]]
    cap = Captioner.from_checkpoint(paths)
    client = TestClient(create_app(cap, info=describe_checkpoint(paths, average="logprob")))
    m = client.get("/api/model").json()
    assert m["model"] == "ensemble" and m["ensemble"] == "logprob"
    assert [x["checkpoint"] for x in m["members"]] == ["h0a.npz", "att.npz"]
    assert [x["model"] for x in m["members"]] == ["h0", "attention"]
    assert [x["encoder"]["pooling"] for x in m["members"]] == ["mean", "block-map"]
    with open(members["photos"][0], "rb") as f:
        r = client.post("/api/caption", files=[("image", f)])
    assert r.status_code == 200
    assert r.json()["photos"][0]["captions"][0]["caption"] == cap.caption(members["photos"][0])
    # The page renders the members from /api/model, one line each.
    js = client.get("/static/app.js").text
    assert "m.members ? describeEnsemble(m)" in js and "m.members.map" in js


def test_photos_after_several_checkpoints_get_a_clear_line(members, capsys):
    from rnncap.cli import main

    c = members["ckpts"]
    assert main(["caption", "--checkpoint", str(c["h0a"]), members["photos"][0]]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "before --checkpoint" in err
