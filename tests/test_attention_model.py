"""The attention captioner: numerical gradients of every parameter (with dropout,
label smoothing, the doubly stochastic penalty and per-token weights), purity, the
decoder contract (step = training forward, beam search with one copy of each map,
attention weights), the backends, checkpoints, and a memorisation run."""
from __future__ import annotations

import numpy as np
import pytest

from gradcheck import check_gradients, rel_error
from rnncap.models.attention import AttentionCaptioningModel, AttentionState
from rnncap.backend import to_device, to_numpy
from rnncap.inference.decoding import beam_search, greedy_decode, sequence_log_prob

from test_model import NULL, fifty_captions, memorise, small_batch

V, D, W, H, A, LOC = 11, 6, 4, 5, 3, 4


def small_attention_model(dtype=np.float64, seed=0, jitter=0.1, **kw):
    m = AttentionCaptioningModel(V, D, W, H, attention_dim=A, dtype=dtype, seed=seed, **kw)
    r = np.random.default_rng(seed + 100)
    for k, v in m.params.items():
        m.params[k] = (v + jitter * r.standard_normal(v.shape)).astype(dtype)
    return m


def small_maps(seed=1, N=3, T=5):
    feats, caps = small_batch(seed=seed, N=N, T=T, V=V, D=D)
    maps = np.random.default_rng(seed + 7).standard_normal((N, LOC, D))
    return maps, caps


def copy_model(m, xp):
    c = AttentionCaptioningModel.from_config(m.config())
    c.params = {k: to_device(v.copy(), xp) for k, v in m.params.items()}
    return c


def test_params_names_and_shapes():
    m = AttentionCaptioningModel(V, D, W, H, attention_dim=A, seed=0)
    shapes = {k: v.shape for k, v in m.params.items()}
    assert shapes == {"W_init": (D, 2 * H), "b_init": (2 * H,), "W_att": (D, A), "w_att": (A,),
                      "W_embed": (V, W), "Wx": (W, 4 * H), "Wz": (D, 4 * H),
                      "Wh": (H, 4 * H + A + 1), "bh": (4 * H + A + 1,), "W_vocab": (H, V),
                      "b_vocab": (V,)}
    assert all(v.dtype == np.float32 for v in m.params.values())
    same = AttentionCaptioningModel(V, D, W, H, attention_dim=A, seed=0)
    assert all((same.params[k] == v).all() for k, v in m.params.items())


CONFIGS = {"plain": {"attention_reg": 0.0}, "penalty": {"attention_reg": 1.0},
           "dropout": {"dropout": 0.3, "attention_reg": 0.5}, "smoothing": {"label_smoothing": 0.1},
           "deep-output": {"deep_output": True},
           "deep-output-dropout": {"deep_output": True, "dropout": 0.3, "attention_reg": 0.5}}


def test_deep_output_params_and_config():
    m = AttentionCaptioningModel(V, D, W, H, attention_dim=A, seed=0, deep_output=True)
    shapes = {k: v.shape for k, v in m.params.items()}
    assert {k: shapes[k] for k in ("Wo_x", "Wo_h", "Wo_z", "b_o")} == {
        "Wo_x": (W, H), "Wo_h": (H, H), "Wo_z": (D, H), "b_o": (H,)}
    assert len(shapes) == 15 and shapes["W_vocab"] == (H, V)
    again = AttentionCaptioningModel.from_config(m.config())
    assert again.deep_output and set(again.params) == set(m.params)
    # the layer only adds: the other parameters are the plain model's for the same seed
    plain = AttentionCaptioningModel(V, D, W, H, attention_dim=A, seed=0)
    assert not plain.deep_output and "Wo_h" not in plain.params
    for k, v in plain.params.items():
        np.testing.assert_array_equal(m.params[k], v, err_msg=k)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_model_gradients(config, xp):
    host = small_attention_model(**CONFIGS[config])
    dev = copy_model(host, xp)
    maps, caps = small_maps()

    def loss_of(m):
        m.rng = np.random.default_rng(1234)
        return m.loss(maps, caps)

    loss_dev, grads_dev = loss_of(dev)
    loss_host, grads_host = loss_of(host)
    assert loss_dev == pytest.approx(loss_host, rel=1e-12)
    grads = {k: to_numpy(g) for k, g in grads_dev.items()}
    assert set(grads) == set(host.params)
    for k in grads:
        assert rel_error(grads[k], grads_host[k]) < 1e-12, k
    check_gradients(lambda: loss_of(host)[0], host.params, grads)


def test_token_weights_gradients():
    """The policy-gradient path (rnncap.training.scst): any-signed weights per target."""
    m = small_attention_model()
    maps, caps = small_maps()
    w = np.random.default_rng(3).standard_normal(caps[:, 1:].shape) * (caps[:, 1:] != NULL)
    loss, grads = m.loss(maps, caps, token_weights=w)
    check_gradients(lambda: m.loss(maps, caps, token_weights=w)[0], m.params, grads)


def test_penalty_is_the_doubly_stochastic_term():
    """loss(lambda) - loss(0) = lambda * sum_n sum_i (1 - sum_t alpha_nti)^2 / N over real steps."""
    m = small_attention_model(attention_reg=0.0)
    maps, caps = small_maps()
    base, _ = m.loss(maps, caps)
    m.attention_reg = 0.7
    with_penalty, _ = m.loss(maps, caps)
    # alpha at every step, from the decoder's step (teacher forcing)
    state = m.init_state(maps)
    total = np.zeros((len(maps), LOC))
    for t in range(caps.shape[1] - 1):
        _, state = m.step(caps[:, t], state)
        total += state.alpha * (caps[:, t + 1] != NULL)[:, None]
    want = 0.7 * ((1 - total) ** 2).sum() / len(maps)
    assert with_penalty - base == pytest.approx(want, rel=1e-9)


def test_loss_never_writes_into_inputs_or_params():
    m = small_attention_model(dropout=0.2)
    maps, caps = small_maps()
    before = ({k: v.copy() for k, v in m.params.items()}, maps.copy(), caps.copy())
    m.loss(maps, caps)
    greedy_decode(m, maps, max_length=6)
    beam_search(m, maps, beam_size=3, max_length=6)
    assert all((before[0][k] == v).all() for k, v in m.params.items())
    assert (before[1] == maps).all() and (before[2] == caps).all()


def _teacher_forced_scores(m, maps, caps):
    """The vocabulary scores of the training forward, without dropout."""
    from rnncap.models import layers as L

    p = m.params
    x, _ = L.word_embedding_forward(caps[:, :-1], p["W_embed"])
    h, _, _ = m._recur(maps, x, caps[:, 1:] != NULL, len(maps))
    return h @ p["W_vocab"] + p["b_vocab"]


@pytest.mark.parametrize("deep", [False, True])
def test_step_follows_the_training_forward(deep):
    m = small_attention_model(deep_output=deep)
    maps, caps = small_maps()
    want = _teacher_forced_scores(m, maps, caps)
    state = m.init_state(maps)
    for t in range(caps.shape[1] - 1):
        scores, state = m.step(caps[:, t], state)
        live = caps[:, t + 1] != NULL
        np.testing.assert_allclose(scores[live], want[live, t], rtol=1e-10, atol=1e-12)
        assert isinstance(state, AttentionState)
        np.testing.assert_allclose(state.alpha.sum(axis=1), 1.0)


def test_beam_search_keeps_one_copy_of_each_map_and_matches_log_probs():
    m = small_attention_model()
    maps, _ = small_maps(N=4)
    k = 3
    seen = []
    step = m.step

    def spy(words, state):
        seen.append((state.a.shape[0], state.h.shape[0]))
        return step(words, state)

    m.step = spy
    hyps = beam_search(m, maps, beam_size=k, max_length=6, n_best=2, return_attention=True)
    assert all(n_maps == 4 and rows == 4 * k for n_maps, rows in seen)  # maps once, k rows each
    for n, hs in enumerate(hyps):
        lp = sequence_log_prob(m, maps[n:n + 1].repeat(len(hs), 0), [h.ids for h in hs])
        np.testing.assert_allclose([h.logprob for h in hs], lp, rtol=1e-9)
        for h in hs:
            assert h.attention.shape == (len(h.ids), LOC)
            np.testing.assert_allclose(h.attention.sum(axis=1), 1.0, rtol=1e-6)
    # beam 1 is greedy, with the same attention weights
    m.step = step
    ids, alphas = greedy_decode(m, maps, max_length=6, return_attention=True)
    one = beam_search(m, maps, beam_size=1, max_length=6, return_attention=True)
    for n, (h,) in enumerate(one):
        np.testing.assert_array_equal(h.ids, ids[n, :len(h.ids)])
        np.testing.assert_allclose(h.attention, alphas[n, :len(h.ids)], rtol=1e-6)
        assert not alphas[n, len(h.ids):].any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backend_matches_numpy(dtype, xp):
    host = small_attention_model(dtype=dtype)
    dev = copy_model(host, xp)
    maps, caps = small_maps()
    lh, gh = host.loss(maps.astype(dtype), caps)
    ld, gd = dev.loss(xp.asarray(maps.astype(dtype)), xp.asarray(caps))
    assert ld == pytest.approx(lh, rel=1e-5 if dtype == np.float32 else 1e-12)
    for k in gh:
        assert rel_error(to_numpy(gd[k]), gh[k]) < (1e-5 if dtype == np.float32 else 1e-12), k
    np.testing.assert_array_equal(greedy_decode(dev, xp.asarray(maps), max_length=6),
                                  greedy_decode(host, maps, max_length=6))


def test_rejects_pooled_features():
    m = small_attention_model()
    with pytest.raises(ValueError, match="spatial maps"):
        m.loss(np.zeros((3, D)), np.ones((3, 4), np.int64))
    with pytest.raises(ValueError, match="attention_dim"):
        AttentionCaptioningModel(V, D, W, H, attention_dim=0)


def test_memorises_fifty_captions():
    """50 random captions (4-8 words, V = 1000) for 50 random 16 x 64 maps; H=256,
    W=128, A=128, Adam lr 5e-3, float32. The loss must fall under 0.5 within 150
    iterations, and greedy sampling must then give back every caption."""
    Vb, Db, Wb, Hb, N, Lb = 1000, 64, 128, 256, 50, 16
    r = np.random.default_rng(0)
    maps = r.standard_normal((N, Lb, Db)).astype(np.float32)
    lengths, caps = fifty_captions(r, Vb, N)
    # No doubly stochastic penalty: its floor is (L - T)^2 / L per caption, not 0.
    model = AttentionCaptioningModel(Vb, Db, Wb, Hb, attention_dim=128, attention_reg=0.0,
                                     dtype=np.float32, seed=0)
    memorise(model, maps, caps, lengths, 5e-3, 150, 0.5, "attention")


def test_perplexity_leaves_the_penalty_and_smoothing_out():
    from rnncap.evaluation.metrics import perplexity

    maps, caps = small_maps()
    with_terms = small_attention_model(attention_reg=1.0, label_smoothing=0.2)
    plain = small_attention_model(attention_reg=0.0)
    assert with_terms.loss(maps, caps, train=False)[0] != plain.loss(maps, caps, train=False)[0]
    assert perplexity(with_terms, maps, caps) == pytest.approx(perplexity(plain, maps, caps), rel=1e-12)
    assert with_terms.attention_reg == 1.0 and with_terms.label_smoothing == 0.2  # untouched


def test_resume_is_bitwise_exact_for_the_attention_model(tmp_path):
    """k steps, checkpoint, resume, m more == k+m steps (dropout on, stop mid-epoch):
    the checkpoint rebuilds the attention model and its dropout generator."""
    from test_train import make_trainer, resume_trainer, toy_problem

    from rnncap.config import TrainConfig

    feats, caps, idx, vocab = toy_problem()
    maps = np.random.default_rng(5).standard_normal((len(feats), LOC, feats.shape[1])).astype(np.float32)
    data = (maps, caps, idx)
    base = dict(lr=1e-2, batch_size=8, epochs=4, seed=7, lr_decay=0.9)

    def model():
        return AttentionCaptioningModel(len(vocab), maps.shape[2], 6, 10, attention_dim=5, seed=3, dropout=0.3)

    ref = model()
    make_trainer(ref, data, vocab, tmp_path / "ref", TrainConfig(**base, max_iters=11)).fit()
    t1 = make_trainer(model(), data, vocab, tmp_path / "a", TrainConfig(**base, max_iters=5))
    t1.fit()
    t2 = resume_trainer(tmp_path / "a" / "last.npz", data, tmp_path / "a", TrainConfig(**base, max_iters=11))
    assert isinstance(t2.model, AttentionCaptioningModel) and t2.iteration == 5
    t2.fit()
    for name in ref.params:
        assert np.array_equal(ref.params[name], t2.model.params[name]), name


def test_decoders_on_no_images_return_nothing():
    """An empty batch (an evaluation with ``--report-images 0``) decodes to empty
    results, not a reshape error."""
    from rnncap.inference.decoding import beam_search, greedy_decode, sample_decode

    m = small_attention_model()
    none = np.zeros((0, LOC, D))
    assert beam_search(m, none, beam_size=2, max_length=4, return_attention=True) == []
    assert greedy_decode(m, none, max_length=4).shape == (0, 4)
    assert sample_decode(m, none, max_length=4, rng=0).shape == (0, 4)
