"""Self-critical training: the per-token weights of the model loss (numerical
gradients), the SCST objective (its gradient, the leave-one-out baseline, the
rewards), and the stage end to end (exact resume, selection on val CIDEr)."""
from __future__ import annotations

import numpy as np
import pytest

from gradcheck import check_gradients
from test_model import END, NULL, START, small_batch, small_model
from test_robustness import trained  # noqa: F401  (a fixture: a tiny dataset and a cross-entropy run)


# ---- token weights in the model loss ------------------------------------------------

@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_token_weights_of_the_mask_give_the_usual_loss_without_smoothing(cell):
    feats, caps = small_batch()
    plain = small_model(cell)
    smoothed = small_model(cell, label_smoothing=0.2)
    w = (caps[:, 1:] != NULL).astype(np.float64)
    l0, g0 = plain.loss(feats, caps)
    l1, g1 = smoothed.loss(feats, caps, token_weights=w)  # smoothing does not apply
    l2, _ = smoothed.loss(feats, caps)
    assert l1 == pytest.approx(l0, rel=1e-12) and abs(l2 - l0) > 1e-3
    for k in g0:
        np.testing.assert_allclose(g1[k], g0[k], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_token_weights_scale_each_position(cell):
    """loss = sum w * -log p / N: from the per-caption log-probabilities of the
    decoders' own ``sequence_log_prob`` (through ``step``, another code path)."""
    from rnncap.inference.decoding import sequence_log_prob

    feats, caps = small_batch(N=4)
    m = small_model(cell)
    length = (caps[:, 1:] != NULL).sum(axis=1)
    scale = np.array([0.5, -2.0, 1.5, 3.0])
    w = (caps[:, 1:] != NULL) * scale[:, None]
    loss, _ = m.loss(feats, caps, token_weights=w)
    lp = sequence_log_prob(m, feats, [c[1:1 + n] for c, n in zip(caps, length)])
    assert loss == pytest.approx(-(scale * lp).sum() / len(caps), rel=1e-10)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_token_weight_gradients(cell, dropout):
    """Signed weights, a zero weight on a real word and a nonzero weight on a <NULL>
    target (sampled captions may say <NULL>): every parameter against centred
    differences."""
    feats, caps = small_batch(N=4)
    m = small_model(cell, dropout=dropout)
    w = np.random.default_rng(5).standard_normal(caps[:, 1:].shape)
    w[0, 1] = 0.0
    caps[2, -1] = NULL
    w[2, -1] = 0.7

    def loss_of():
        m.rng = np.random.default_rng(1234)
        return m.loss(feats, caps, token_weights=w)

    _, grads = loss_of()
    check_gradients(lambda: loss_of()[0], m.params, grads)


def test_token_weights_on_a_sharded_batch_match_one_shard():
    """A batch large enough to be split into shards gives the same loss and
    gradients as the rows one at a time, summed."""
    from rnncap.models import model as M

    feats, caps = small_batch(N=160)
    if len(M._shards(160, np)) < 2:
        pytest.skip("no batch sharding here (threadpoolctl missing or one BLAS thread)")
    m = small_model("lstm")
    w = np.random.default_rng(2).standard_normal(caps[:, 1:].shape) * (caps[:, 1:] != NULL)
    loss, grads = m.loss(feats, caps, token_weights=w)
    old = M._MIN_SHARD_ROWS
    try:
        M._MIN_SHARD_ROWS = 10 ** 9  # one shard
        loss1, grads1 = m.loss(feats, caps, token_weights=w)
    finally:
        M._MIN_SHARD_ROWS = old
    assert loss == pytest.approx(loss1, rel=1e-10)
    for k in grads:
        np.testing.assert_allclose(grads[k], grads1[k], rtol=1e-8, atol=1e-12)


def test_token_weights_of_the_wrong_shape_are_refused():
    feats, caps = small_batch()
    with pytest.raises(ValueError, match="token_weights"):
        small_model("rnn").loss(feats, caps, token_weights=np.ones((4, 3)))


# ---- the SCST objective ----------------------------------------------------------------

def tiny_vocab(V=11):
    from rnncap.data.vocab import Vocab

    return Vocab.from_words(["<NULL>", "<START>", "<END>", "<UNK>"] + [f"w{i}" for i in range(4, V)])


def tiny_scorer(vocab, n_images, seed=3):
    """A CIDEr-D scorer over n_images reference sets of random words (with <END>)."""
    from rnncap.evaluation.cider import CiderD
    from rnncap.training.scst import reward_references

    r = np.random.default_rng(seed)
    refs = [[" ".join(r.choice(vocab.idx_to_word[4:], size=int(r.integers(2, 5)))) for _ in range(3)]
            for _ in range(n_images)]
    return CiderD(reward_references(refs, "<END>")), refs


def objective_for(model, scorer, **kw):
    from rnncap.training.scst import ScstObjective

    return ScstObjective(model, tiny_vocab(), scorer, max_length=6, rng=np.random.default_rng(7), **kw)


def redraw(objective, features, state):
    """The captions the objective drew from the generator ``state``: the same draw again."""
    objective.rng.bit_generator.state = state
    return objective.draw(np.repeat(features, objective.samples, axis=0))


def attention_model(seed=0, jitter=0.1):
    """The attention model at the size of ``small_model`` (L=4 locations, A=3), with
    its attention penalty on (the policy gradient must leave it out), moved off its
    initialisation."""
    from rnncap.models.attention import AttentionCaptioningModel

    m = AttentionCaptioningModel(11, 6, 4, 5, attention_dim=3, attention_reg=2.0, dtype=np.float64, seed=seed)
    r = np.random.default_rng(seed + 100)
    for k, v in m.params.items():
        m.params[k] = (v + jitter * r.standard_normal(v.shape)).astype(np.float64)
    return m


@pytest.mark.parametrize("dropout", [0.0, 0.4])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "attention"])
def test_scst_gradient_is_the_policy_gradient(cell, dropout):
    """grads of the objective = d/dparams of -mean_samples (r - b) log p(sample), where
    log p comes from ``sequence_log_prob`` (through ``step``: another code path than
    the loss) and b is the leave-one-out mean computed here by hand; the samples and
    rewards are held fixed while the parameters move (centred differences). The
    attention model goes through the same objective (its spatial maps (N, L, D)).
    With dropout while sampling, log p is that of the masks the captions were drawn
    with, applied by ``step``."""
    from rnncap.inference.decoding import sequence_log_prob

    if cell == "attention":
        m = attention_model()
        feats = np.random.default_rng(4).standard_normal((3, 4, 6))
    else:
        m = small_model(cell)
        feats, _ = small_batch(N=3)
    scorer, _ = tiny_scorer(tiny_vocab(), 3)
    obj = objective_for(m, scorer, samples=4, dropout=dropout)
    images = np.array([2, 0, 1])
    state = obj.rng.bit_generator.state
    loss, grads = obj.loss(feats, images)

    ids, masks = redraw(obj, feats, state)
    if dropout:
        assert masks[0].shape == (12, 6, m.wordvec_dim) and masks[1].shape == (12, 6, m.hidden_dim)
        assert 0.2 < (masks[1] == 0).mean() < 0.6
    else:
        assert masks is None
    rewards = scorer.score(obj.tokens(ids, obj.lengths(ids)), np.repeat(images, 4)).reshape(3, 4)
    base = np.array([[np.mean(np.delete(row, k)) for k in range(4)] for row in rewards])
    adv = (rewards - base).reshape(-1)
    assert np.abs(adv).max() > 0  # the check below has something to check
    assert obj.stats()["reward"] == pytest.approx(rewards.mean())
    rep = np.repeat(feats, 4, axis=0)

    def surrogate():
        return -(adv * sequence_log_prob(m, rep, ids, masks=masks)).sum() / len(ids)

    assert loss == pytest.approx(surrogate(), rel=1e-9)
    check_gradients(surrogate, m.params, grads)


# ---- the rules inside the policy gradient ------------------------------------------------

RULES = dict(bad_endings=(5, 6), no_repeat=True, block_trigrams=True)


def transformer_model():
    """The Transformer of its own tests (spatial memory), moved off its initialisation."""
    from test_transformer_model import LOC, small_transformer

    return small_transformer(L=LOC, dropout=0.0)


def kind_and_features(kind, N=3):
    if kind == "attention":
        return attention_model(), np.random.default_rng(4).standard_normal((N, 4, 6))
    if kind == "transformer":
        m = transformer_model()
        return m, np.random.default_rng(4).standard_normal((N, m.locations, m.input_dim))
    return small_model(kind), small_batch(N=N)[0]


def ruled_log_prob(model, features, ids, rules):
    """(N,) log-probability of each decoded caption under the distribution a decoder
    with ``rules`` draws from: at every step the softmax over the allowed words only.
    Step by step through ``init_state``/``step`` and ``allowed`` (not the loss)."""
    from rnncap.inference.decoding import allowed

    state = model.init_state(features)
    words = np.full(len(ids), model.start_id)
    total = np.zeros(len(ids))
    live = np.ones(len(ids), dtype=bool)
    for t in range(ids.shape[1]):
        scores, state = model.step(words, state)
        scores = allowed(np.asarray(scores, np.float64), ids[:, :t], model.end_id, (), rules)
        logp = scores - scores.max(axis=1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
        total += np.where(live, logp[np.arange(len(ids)), ids[:, t]], 0.0)
        live &= ids[:, t] != model.end_id
        words = ids[:, t]
    return total


@pytest.mark.parametrize("kind", ["rnn", "lstm", "attention", "transformer"])
def test_forbidden_words_leave_the_loss_softmax(kind):
    """``loss(forbidden=forbidden_in(...))`` is -sum w log q with q the renormalised
    distribution over the allowed words, for every kind of model: against the
    step-by-step log-probabilities, and its gradients against centred differences."""
    from rnncap.inference.decoding import Rules, forbidden_in, sample_decode

    m, feats = kind_and_features(kind, N=6)
    m = m.likelihood_only()  # the attention penalty is a term of the model's own
    rules = Rules(**RULES)
    ids = sample_decode(m, feats, max_length=6, rng=np.random.default_rng(3), rules=rules)
    forbidden = forbidden_in(ids, m.end_id, rules=rules)
    assert len(forbidden[0]) > 10  # the rules did forbid words in these captions
    lengths = np.where((ids == END).any(axis=1), (ids == END).argmax(axis=1) + 1, ids.shape[1])
    w = (np.arange(6)[None, :] < lengths[:, None]) * np.linspace(-1.0, 2.0, len(ids))[:, None]
    caps = np.concatenate([np.full((len(ids), 1), START), ids], axis=1)
    loss, grads = m.loss(feats, caps, train=False, token_weights=w, forbidden=forbidden)
    per_caption = w[:, 0]
    want = -(per_caption * ruled_log_prob(m, feats, ids, rules)).sum() / len(ids)
    plain, _ = m.loss(feats, caps, train=False, token_weights=w)
    assert loss == pytest.approx(want, rel=1e-10)
    assert abs(plain - want) > 1e-3  # without them the loss is another one
    check_gradients(lambda: m.loss(feats, caps, train=False, token_weights=w, forbidden=forbidden)[0],
                    m.params, grads)


def test_forbidding_every_other_word_leaves_nothing_to_learn():
    from rnncap.inference.decoding import forbidden_in

    m = small_model("lstm")
    feats, caps = small_batch(N=4)
    out = caps[:, 1:]
    n, t = np.nonzero(out != NULL)
    others = [(a, b, v) for a, b in zip(n, t) for v in range(11) if v != out[a, b]]
    forbidden = tuple(np.array(x) for x in zip(*others))
    loss, grads = m.loss(feats, caps, forbidden=forbidden)
    assert loss == pytest.approx(0.0, abs=1e-12)
    assert all(np.abs(g).max() < 1e-12 for g in grads.values())
    with pytest.raises(ValueError, match="forbidden"):
        m.loss(feats, caps, forbidden=(np.array([9]), np.array([0]), np.array([4])))
    smoothed = small_model("lstm", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label smoothing"):
        smoothed.loss(feats, caps, forbidden=forbidden)
    assert smoothed.likelihood_only().loss(feats, caps, forbidden=forbidden)[0] == pytest.approx(0.0, abs=1e-12)
    assert all(len(a) == 0 for a in forbidden_in(np.array([[4, 2, 0]]), END))  # no rules: nothing


def test_forbidden_words_on_a_sharded_batch_match_one_shard():
    from rnncap.inference.decoding import Rules, forbidden_in
    from rnncap.models import model as M

    feats, caps = small_batch(N=160)
    if len(M._shards(160, np)) < 2:
        pytest.skip("no batch sharding here (threadpoolctl missing or one BLAS thread)")
    m = small_model("lstm")
    w = np.random.default_rng(2).standard_normal(caps[:, 1:].shape) * (caps[:, 1:] != NULL)
    n, t, v = forbidden_in(caps[:, 1:], END, rules=Rules(bad_endings=(5,), no_repeat=True, block_trigrams=True))
    own = caps[n, t + 1] == v  # these random captions break the rules now and then
    with pytest.raises(ValueError, match="own target"):
        m.loss(feats, caps, token_weights=w, forbidden=(n, t, v))
    forbidden = (n[~own], t[~own], v[~own])
    assert len(forbidden[0]) > 100 and forbidden[0].max() >= 80  # entries in the second shard
    loss, grads = m.loss(feats, caps, token_weights=w, forbidden=forbidden)
    old = M._MIN_SHARD_ROWS
    try:
        M._MIN_SHARD_ROWS = 10 ** 9  # one shard
        loss1, grads1 = m.loss(feats, caps, token_weights=w, forbidden=forbidden)
    finally:
        M._MIN_SHARD_ROWS = old
    plain, _ = m.loss(feats, caps, token_weights=w)
    assert loss == pytest.approx(loss1, rel=1e-10) and abs(loss - plain) > 1e-3
    for k in grads:
        np.testing.assert_allclose(grads[k], grads1[k], rtol=1e-8, atol=1e-12)


def test_forbidden_in_is_what_each_step_of_the_decoder_forbade():
    """For captions drawn under rules: at each step before <END>, the forbidden words
    are exactly the -inf entries ``allowed`` makes for that history; none after <END>;
    and the drawn word was never one of them."""
    from rnncap.inference.decoding import Rules, allowed, forbidden_in, sample_decode

    m = small_model("lstm")
    feats, _ = small_batch(N=8)
    rules = Rules(**RULES)
    ids = sample_decode(m, feats, max_length=6, rng=np.random.default_rng(9), rules=rules, banned=(0, 1, 3))
    n, t, w = forbidden_in(ids, END, banned=(0, 1, 3), rules=rules)
    for step in range(ids.shape[1]):
        mask = np.isneginf(allowed(np.zeros((len(ids), 11)), ids[:, :step], END, (0, 1, 3), rules))
        before_end = ~(ids[:, :step] == END).any(axis=1)
        want = {(a, b) for a, b in zip(*np.nonzero(mask)) if before_end[a]}
        got = {(a, b) for a, s_, b in zip(n, t, w) if s_ == step}
        assert got == want
        assert not mask[np.arange(len(ids)), ids[:, step]][before_end].any()


def test_ruled_scst_gradient_is_the_policy_gradient_of_what_it_draws():
    """With rules, grads of the objective = d/dparams of -mean (r - b) log q(sample),
    q the renormalised distribution the sampler drew from (centred differences)."""
    from rnncap.inference.decoding import Rules

    m = small_model("lstm")
    feats, _ = small_batch(N=3)
    scorer, _ = tiny_scorer(tiny_vocab(), 3)
    rules = Rules(**RULES)
    obj = objective_for(m, scorer, samples=4, rules=rules)
    images = np.array([2, 0, 1])
    state = obj.rng.bit_generator.state
    loss, grads = obj.loss(feats, images)
    ids, _ = redraw(obj, feats, state)
    rewards = scorer.score(obj.tokens(ids, obj.lengths(ids)), np.repeat(images, 4)).reshape(3, 4)
    base = np.array([[np.mean(np.delete(row, k)) for k in range(4)] for row in rewards])
    adv = (rewards - base).reshape(-1)
    assert np.abs(adv).max() > 0
    rep = np.repeat(feats, 4, axis=0)

    def surrogate():
        return -(adv * ruled_log_prob(m, rep, ids, rules)).sum() / len(ids)

    assert loss == pytest.approx(surrogate(), rel=1e-9)
    check_gradients(surrogate, m.params, grads)


def test_scst_weights_cover_the_words_up_to_end_and_nothing_after():
    """The captions handed to the model loss: <START> + the sample; weight (r - b) on
    every word up to and including <END>, 0 after it."""
    m = small_model("lstm")
    feats, _ = small_batch(N=2)
    scorer, _ = tiny_scorer(tiny_vocab(), 2)
    obj = objective_for(m, scorer, samples=3)
    seen = {}
    real_loss = m.loss

    def spy(features, captions, train=True, token_weights=None, **kw):
        seen.update(captions=captions, weights=token_weights, train=train)
        return real_loss(features, captions, train=train, token_weights=token_weights, **kw)

    m.loss = spy
    state = obj.rng.bit_generator.state
    obj.loss(feats, np.array([0, 1]))
    ids, _ = redraw(obj, feats, state)
    caps, w = seen["captions"], seen["weights"]
    assert seen["train"] is False  # the samples were drawn without dropout
    assert (caps[:, 0] == START).all() and np.array_equal(caps[:, 1:], ids)
    for row, wrow in zip(ids, w):
        ends = np.flatnonzero(row == END)
        n = ends[0] + 1 if len(ends) else len(row)
        assert np.all(wrow[n:] == 0) and len(set(wrow[:n])) == 1
        assert (row[n:] == NULL).all()


class FixedScorer:
    """Rewards by caption length (a stand-in for CIDEr-D that makes baselines easy to
    check); records what it scored."""

    def __init__(self):
        self.calls = []

    def score(self, candidates, refs):
        self.calls.append((candidates, np.asarray(refs)))
        return np.array([float(len(c)) for c in candidates])


def test_leave_one_out_and_greedy_baselines():
    from rnncap.inference.decoding import greedy_decode

    m = small_model("rnn", jitter=0.5)
    feats, _ = small_batch(N=2)
    for baseline in ("mean", "greedy"):
        scorer = FixedScorer()
        obj = objective_for(m, scorer, samples=3, baseline=baseline)
        seen = {}
        real_loss = m.loss
        m.loss = lambda f, c, train=True, token_weights=None: (seen.update(w=token_weights)
                                                                or real_loss(f, c, train, token_weights))
        obj.loss(feats, np.array([1, 0]))
        del m.loss
        r = np.array([float(len(c)) for c in scorer.calls[0][0]]).reshape(2, 3)
        assert np.array_equal(scorer.calls[0][1], [1, 1, 1, 0, 0, 0])  # each sample vs its image
        if baseline == "mean":
            b = (r.sum(axis=1, keepdims=True) - r) / 2
        else:
            g = greedy_decode(m, feats, max_length=6, banned=tiny_vocab().never_generated)
            b = np.array([float(n) for n in obj.lengths(g)])[:, None]
            assert np.array_equal(scorer.calls[1][1], [1, 0])
            assert obj.stats()["greedy_reward"] == pytest.approx(b.mean())
        np.testing.assert_allclose(seen["w"][:, 0], (r - b).reshape(-1))


def test_end_is_a_scored_word():
    from rnncap.training.scst import reward_references

    assert reward_references([["A dog runs.", "a cat"]], "<END>") == [
        [["a", "dog", "runs", "<END>"], ["a", "cat", "<END>"]]]
    scorer, refs = tiny_scorer(tiny_vocab(), 6)  # df needs several images to say anything
    words = refs[0][0].split()
    full, unended = scorer.score([words + ["<END>"], words], [0, 0])
    assert full > unended  # saying <END> where the references do pays


def test_objective_arguments_are_checked():
    from rnncap.training.scst import ScstObjective

    with pytest.raises(ValueError, match="baseline"):
        ScstObjective(small_model("rnn"), tiny_vocab(), FixedScorer(), baseline="best")
    with pytest.raises(ValueError, match="at least 2 samples"):
        ScstObjective(small_model("rnn"), tiny_vocab(), FixedScorer(), samples=1)
    with pytest.raises(ValueError, match="dropout"):
        ScstObjective(small_model("rnn"), tiny_vocab(), FixedScorer(), dropout=1.0)


# ---- the stage through `rnncap train --scst` ------------------------------------------

@pytest.fixture()
def xe_checkpoint(trained):
    """A tiny dataset (9 train, 3 val images), its features and a cross-entropy run
    (test_robustness's ``trained``)."""
    tmp, _, _, out = trained
    return tmp, out / "best.npz"


@pytest.mark.parametrize("sample_dropout,ema", [(0.0, None), (0.3, None), (0.0, 0.6)])
def test_scst_stage_checkpoints_and_resumes_exactly(xe_checkpoint, sample_dropout, ema):
    """2 epochs of 3 updates straight, against 2 updates, a stop and --resume: bitwise
    the same parameters, rewards and sampling-generator state (with dropout while
    sampling too: its masks come from the saved generator; with a moving average of
    the weights, it too)."""
    from rnncap.checkpoint import load_checkpoint
    from rnncap.cli import main
    from rnncap.training.scst import STAGE_DEFAULTS

    tmp, init = xe_checkpoint
    tmp = tmp / f"resume-d{sample_dropout}-e{ema}"
    common = ["--epochs", "2", "--batch-size", "4", "--lr", "1e-2", "--samples", "3", "--beam", "2",
              "--sample-dropout", str(sample_dropout), "--quiet"] + (["--ema", str(ema)] if ema else [])
    assert main(["train", "--scst", "--init", str(init), "--out", str(tmp / "a"), *common]) == 0
    assert main(["train", "--scst", "--init", str(init), "--out", str(tmp / "b"), *common,
                 "--max-iters", "2"]) == 0
    stopped = load_checkpoint(tmp / "b" / "last.npz")
    assert stopped.train_state["iteration"] == 2 and stopped.train_state["epoch"] == 0  # mid-epoch
    assert main(["train", "--resume", str(tmp / "b" / "last.npz"), "--max-iters", "6", "--quiet"]) == 0

    a, b = load_checkpoint(tmp / "a" / "last.npz"), load_checkpoint(tmp / "b" / "last.npz")
    assert a.train_state["iteration"] == b.train_state["iteration"] == 6
    for k in a.model.params:
        assert np.array_equal(a.model.params[k], b.model.params[k]), k
    assert a.history["train_reward"] == b.history["train_reward"] and len(a.history["train_reward"]) == 6
    assert a.train_state["sample_rng"] == b.train_state["sample_rng"]
    ema = STAGE_DEFAULTS["ema"] if ema is None else ema
    assert ("ema" in a.train_state) == ("ema" in b.train_state) == (ema > 0)
    for k in a.train_state.get("ema", {}):
        assert np.array_equal(a.train_state["ema"][k], b.train_state["ema"][k]), k

    train = a.configs["train"]
    assert train["stage"] == "scst" and train["init"] == str(init) and train["samples"] == 3
    assert train["temperature"] == 0.5  # the h0 models' default
    assert train["sample_dropout"] == sample_dropout and train["ema"] == ema
    start = load_checkpoint(init)
    # decoding defaults: --beam as given, the length normalisation of --init
    assert {k: a.configs["decode"][k] for k in ("beam_size", "length_norm")} == \
        {"beam_size": 2, "length_norm": start.configs["decode"]["length_norm"]}
    # The words that cannot end a caption come with the --init checkpoint, as its rules.
    assert a.configs["decode"]["bad_endings"] == start.configs["decode"]["bad_endings"] != []
    best = load_checkpoint(tmp / "a" / "best.npz").train_state["best"]
    assert best["val_cider"] >= 0 and "epoch" in best
    assert start.configs["train"]["stage"] == "xe"


def test_scst_keeps_the_start_when_no_epoch_beats_it(xe_checkpoint):
    """The starting model is epoch 0 on val: with a learning rate that wrecks the model,
    best.npz stays the --init parameters (its output layer at the stage's temperature)."""
    from rnncap.checkpoint import load_checkpoint
    from rnncap.cli import main

    tmp, init = xe_checkpoint
    assert main(["train", "--scst", "--init", str(init), "--out", str(tmp / "s"), "--epochs", "1",
                 "--batch-size", "4", "--lr", "1e-2", "--average", "0", "--quiet"]) == 0
    best = load_checkpoint(tmp / "s" / "best.npz")
    last = load_checkpoint(tmp / "s" / "last.npz")
    if best.train_state["best"]["epoch"] == 0:  # the --init model at the stage's temperature
        t = best.configs["train"]["temperature"]
        for k, v in load_checkpoint(init).model.params.items():
            assert np.array_equal(best.model.params[k], v / t if k in ("W_vocab", "b_vocab") else v), k
    else:  # epoch 1 was better on val: then it is what best.npz holds
        for k in last.model.params:
            assert np.array_equal(best.model.params[k], last.model.params[k]), k


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_scst_temperature_starts_from_the_sharpened_softmax(xe_checkpoint, temperature):
    """--temperature T: the policy starts as softmax(scores / T), the output layer
    divided by T (an update too small to move anything shows the start); recorded."""
    from rnncap.checkpoint import load_checkpoint
    from rnncap.cli import main

    tmp, init = xe_checkpoint
    out = tmp / f"t{temperature}"
    assert main(["train", "--scst", "--init", str(init), "--out", str(out), "--epochs", "1",
                 "--batch-size", "4", "--lr", "1e-9", "--temperature", str(temperature), "--quiet"]) == 0
    start, last = load_checkpoint(init).model.params, load_checkpoint(out / "last.npz")
    assert last.configs["train"]["temperature"] == temperature
    for k, v in start.items():
        want = v / temperature if k in ("W_vocab", "b_vocab") else v
        np.testing.assert_allclose(last.model.params[k], want, rtol=0, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("argv,needle", [
    (["--scst"], "--init"),
    (["--scst", "--init", "x.npz", "--resume", "y.npz"], "--resume alone"),
])
def test_scst_command_errors_are_one_line(argv, needle, capsys):
    from rnncap.cli import main

    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["1", "-0.1", "2.5"])
def test_the_moving_averages_decay_must_be_below_one(value, capsys):
    from rnncap.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--scst", "--init", "x.npz", "--ema", value])
    assert e.value.code == 2
    assert "argument --ema: must be a number in [0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_the_draw_does_not_depend_on_the_thread_count(dropout):
    """Groups of SAMPLE_GROUP images, each from its own generator: one worker thread or
    several, the same captions (and the same dropout masks)."""
    from concurrent.futures import ThreadPoolExecutor

    from rnncap.training.scst import SAMPLE_GROUP

    m = small_model("lstm", jitter=0.5)
    feats = np.random.default_rng(0).standard_normal((2 * SAMPLE_GROUP + 3, 6))
    scorer, _ = tiny_scorer(tiny_vocab(), 2)
    a, b = (objective_for(m, scorer, samples=2, dropout=dropout) for _ in range(2))
    b._pool = ThreadPoolExecutor(1)
    rep = np.repeat(feats, 2, axis=0)
    (ids_a, masks_a), (ids_b, masks_b) = a.draw(rep), b.draw(rep)
    assert ids_a.shape == (len(rep), 6) and np.array_equal(ids_a, ids_b)
    if dropout:
        assert all(np.array_equal(x, y) for x, y in zip(masks_a, masks_b))
        assert masks_a[1].shape == (len(rep), 6, m.hidden_dim)
    assert len({tuple(r) for r in ids_a}) > len(rep) // 2  # draws, not one caption repeated
    assert a.rng.bit_generator.state == b.rng.bit_generator.state


def test_the_draw_splits_a_batch_into_even_groups(monkeypatch):
    """25 images: two groups of 12 and 13 (not 16 and 9: two cores would wait on the
    larger); 32: two of 16; 33: three of 11. Each group is one sample_decode call."""
    import rnncap.inference.decoding as decoding

    real, sizes = decoding.sample_decode, []

    def spy(model, features, **kw):
        sizes.append(len(features))
        return real(model, features, **kw)

    monkeypatch.setattr(decoding, "sample_decode", spy)
    m = small_model("lstm", jitter=0.5)
    scorer, _ = tiny_scorer(tiny_vocab(), 2)
    obj = objective_for(m, scorer, samples=2)
    for n, want in [(25, [24, 26]), (32, [32, 32]), (33, [22, 22, 22]), (5, [10])]:
        sizes.clear()
        ids, _ = obj.draw(np.repeat(np.random.default_rng(n).standard_normal((n, 6)), 2, axis=0))
        assert sorted(sizes) == want and len(ids) == 2 * n


@pytest.mark.parametrize("baseline", ["mean", "greedy"])
def test_samples_and_greedy_baseline_follow_the_rules(baseline):
    # A model that wants to say w4 forever: without rules its samples stutter; with the
    # checkpoint's rules neither the samples nor the greedy baseline may.
    from rnncap.inference.decoding import Rules

    model = small_model("lstm")
    model.params["W_vocab"][:] = 0.0
    model.params["b_vocab"][:] = -2.0
    model.params["b_vocab"][4] = 6.0
    model.params["b_vocab"][5] = 4.0
    rules = Rules(bad_endings=(5,), no_repeat=True, block_trigrams=True)
    feats = np.random.default_rng(0).standard_normal((3, model.input_dim))
    scorer = FixedScorer()
    plain = objective_for(model, FixedScorer(), samples=3, baseline=baseline)
    plain.loss(feats, np.arange(3))
    ruled = objective_for(model, scorer, samples=3, baseline=baseline, rules=rules)
    ruled.loss(feats, np.arange(3))

    def defective(words):
        body = [w for w in words if w != "<END>"]
        tri = list(zip(body, body[1:], body[2:]))
        return (any(a == b for a, b in zip(body, body[1:])) or len(set(tri)) < len(tri)
                or (words[-1:] == ["<END>"] and body[-1:] == ["w5"]))

    assert any(defective(c) for c in plain.scorer.calls[0][0])
    scored = [c for candidates, _ in scorer.calls for c in candidates]  # samples (and greedy)
    assert len(scored) == 9 + (3 if baseline == "greedy" else 0)
    assert not any(defective(c) for c in scored)


@pytest.mark.parametrize("flag", [None, "--sample-rules", "--no-sample-rules"])
def test_the_stage_samples_under_the_rules_only_when_asked(xe_checkpoint, monkeypatch, flag):
    """Off by default (val's choice): the objective gets no rules and the checkpoint
    records sample_rules false; --sample-rules hands it the --init checkpoint's rules.
    The checkpoint's decoding rules are the same either way."""
    from rnncap.checkpoint import load_checkpoint
    from rnncap.cli import main
    from rnncap.training import scst

    seen = []
    real_init = scst.ScstObjective.__init__

    def spy(self, *a, **kw):
        seen.append(kw.get("rules"))
        real_init(self, *a, **kw)

    monkeypatch.setattr(scst.ScstObjective, "__init__", spy)
    tmp, init = xe_checkpoint
    out = tmp / f"rules-{flag}"
    args = ["train", "--scst", "--init", str(init), "--out", str(out), "--max-iters", "1",
            "--batch-size", "4", "--samples", "2", "--quiet"] + ([flag] if flag else [])
    assert main(args) == 0
    on = flag == "--sample-rules"
    ckpt = load_checkpoint(out / "last.npz")
    assert ckpt.configs["train"]["sample_rules"] is on
    assert (seen[0] is not None) is on
    if on:
        assert seen[0].no_repeat and len(seen[0].bad_endings) > 0
    assert ckpt.configs["decode"]["rules"] is True
