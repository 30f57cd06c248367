"""Self-critical training: the per-token weights of the model loss (numerical
gradients), the SCST objective (its gradient, the leave-one-out baseline, the
rewards), and the stage end to end (exact resume, selection on val CIDEr)."""
from __future__ import annotations

import numpy as np
import pytest

from gradcheck import check_gradients
from rnncap.model import CaptioningModel

NULL, START, END = 0, 1, 2


def small_model(cell, dtype=np.float64, seed=0, jitter=0.1, **kw):
    """V=11, D=6, W=4, H=5, every parameter moved off its initialisation."""
    m = CaptioningModel(11, 6, 4, 5, cell_type=cell, dtype=dtype, seed=seed, **kw)
    r = np.random.default_rng(seed + 100)
    for k, v in m.params.items():
        m.params[k] = (v + jitter * r.standard_normal(v.shape)).astype(dtype)
    return m


def small_batch(seed=1, N=4, T=5, V=11, D=6):
    r = np.random.default_rng(seed)
    feats = r.standard_normal((N, D))
    caps = np.full((N, T + 1), NULL, dtype=np.int64)
    caps[:, 0] = START
    for i, n in enumerate([T - 1, 1] + list(r.integers(1, T, size=N - 2))):
        caps[i, 1:n + 1] = r.integers(3, V, size=n)
        caps[i, n + 1] = END
    return feats, caps


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
    from rnncap.decoding import sequence_log_prob

    feats, caps = small_batch()
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
    feats, caps = small_batch()
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
    from rnncap import model as M

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
