"""The Transformer captioner: numerical gradients of every parameter (pooled and
spatial memory, dropout on fixed masks, label smoothing, per-token weights), the
decoder contract (cached steps = the whole forward pass, beam search with one copy of
each image's memory, attention maps), purity, checkpoints, exact resume, the
data-parallel trainer, and a memorisation run."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from gradcheck import check_gradients, rel_error
from rnncap.inference.decoding import beam_search, greedy_decode, sequence_log_prob
from rnncap.models.layers import dropout_mask
from rnncap.models.transformer import TransformerCaptioningModel, TransformerState

from test_model import NULL, fifty_captions, memorise, small_batch

V, D, E, NH, F, LOC = 11, 6, 4, 2, 6, 3


def small_transformer(L=0, dtype=np.float64, seed=0, jitter=0.1, layers=2, **kw):
    m = TransformerCaptioningModel(V, D, E, NH, layers, F, locations=L, dtype=dtype, seed=seed, **kw)
    r = np.random.default_rng(seed + 100)
    for k, v in m.params.items():  # off the initialisation: no gradient is 0 by construction
        m.params[k] = (v + jitter * r.standard_normal(v.shape)).astype(dtype)
    return m


def small_inputs(L=0, seed=1, N=3, T=5):
    feats, caps = small_batch(seed=seed, N=N, T=T, V=V, D=D)
    if L:
        feats = np.random.default_rng(seed + 7).standard_normal((N, L, D))
    return feats, caps


def test_params_names_and_shapes():
    m = TransformerCaptioningModel(V, D, E, NH, 2, F, locations=LOC, seed=0)
    shapes = {k: v.shape for k, v in m.params.items()}
    assert shapes["W_mem"] == (D, E) and shapes["pos_mem"] == (LOC, E) and shapes["W_embed"] == (V, E)
    assert shapes["l1_self_W_in"] == (E, 3 * E) and shapes["l0_W1"] == (E, F) and shapes["W_vocab"] == (E, V)
    assert len(shapes) == 6 + 2 * 18
    assert all(v.dtype == np.float32 for v in m.params.values())
    # the course's initialisation: weights N(0, 0.02), biases 0, layer norms the identity
    assert abs(m.params["l0_W1"].std() - 0.02) < 0.01 and not m.params["l0_b1"].any()
    assert (m.params["l1_norm2_g"] == 1).all() and not m.params["l1_norm2_b"].any()
    assert "pos_mem" not in TransformerCaptioningModel(V, D, E, NH, 1, F, seed=0).params
    with pytest.raises(ValueError, match="divide"):
        TransformerCaptioningModel(V, D, 6, 4, 1, F)


CONFIGS = {"pooled": dict(L=0), "spatial": dict(L=LOC),
           "dropout": dict(L=LOC, dropout=0.3), "smoothing": dict(L=0, label_smoothing=0.1, dropout=0.2)}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_model_gradients(config):
    kw = dict(CONFIGS[config])
    m = small_transformer(**kw)
    feats, caps = small_inputs(kw["L"])

    def loss():
        m.rng = np.random.default_rng(1234)  # the same dropout masks every call
        return m.loss(feats, caps)

    _, grads = loss()
    assert set(grads) == set(m.params)
    check_gradients(lambda: loss()[0], m.params, grads)


def test_token_weights_and_explicit_masks_gradients():
    """The policy-gradient path (any-signed weights per target) with dropout on given masks."""
    m = small_transformer(L=LOC, dropout=0.3)
    feats, caps = small_inputs(LOC)
    N, T = caps.shape[0], caps.shape[1] - 1
    w = np.random.default_rng(3).standard_normal((N, T)) * (caps[:, 1:] != NULL)
    r = np.random.default_rng(4)
    masks = tuple(dropout_mask(s, 0.3, r, np.float64) for s in m._mask_shapes(N, T))
    _, grads = m.loss(feats, caps, token_weights=w, masks=masks)
    check_gradients(lambda: m.loss(feats, caps, token_weights=w, masks=masks)[0], m.params, grads)
    # the masks drawn by the model are these when its generator is in the same state
    m.rng = np.random.default_rng(4)
    assert m.loss(feats, caps, token_weights=w)[0] == m.loss(feats, caps, token_weights=w, masks=masks)[0]
    m.rng = np.random.default_rng(4)
    np.testing.assert_equal(m._draw_masks(N, T, 0.3), masks)
    with pytest.raises(ValueError, match="masks must be"):
        m.loss(feats, caps, masks=masks[:3])


def test_loss_is_summed_over_time_and_averaged_over_the_batch():
    """rnncap's convention; the course's mean over all N*T positions is this / T."""
    m = small_transformer(L=0)
    feats, caps = small_inputs(0)
    s = m.scores(feats, caps[:, :-1])
    logp = s - np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True)) - s.max(-1, keepdims=True)
    y = caps[:, 1:]
    want = -sum(logp[i, t, y[i, t]] for i in range(y.shape[0]) for t in range(y.shape[1]) if y[i, t] != NULL)
    assert m.loss(feats, caps, train=False)[0] == pytest.approx(want / y.shape[0], rel=1e-12)


def test_loss_never_writes_into_inputs_or_params():
    m = small_transformer(L=LOC, dropout=0.2)
    feats, caps = small_inputs(LOC)
    before = ({k: v.copy() for k, v in m.params.items()}, feats.copy(), caps.copy())
    m.loss(feats, caps)
    state = m.init_state(feats)
    m.step(caps[:, 0], state)
    for k, v in m.params.items():
        np.testing.assert_array_equal(v, before[0][k], err_msg=k)
    np.testing.assert_array_equal(feats, before[1])
    np.testing.assert_array_equal(caps, before[2])


@pytest.mark.parametrize("L", [0, LOC])
def test_cached_steps_equal_the_full_forward_pass(L):
    m = small_transformer(L=L)
    feats, caps = small_inputs(L, N=4, T=6)
    want = m.scores(feats, caps[:, :-1])
    state = m.init_state(feats)
    for t in range(caps.shape[1] - 1):
        assert isinstance(state, TransformerState) and state.t == t
        scores, state = m.step(caps[:, t], state)
        np.testing.assert_allclose(scores, want[:, t], rtol=1e-10, atol=1e-12)
        assert state.keys[0].shape == (4, t + 1, E)
        np.testing.assert_allclose(state.alpha.sum(axis=1), 1.0)


def test_beam_search_keeps_one_copy_of_each_memory_and_matches_log_probs():
    m = small_transformer(L=LOC)
    feats, _ = small_inputs(LOC, N=4)
    k, seen, step = 3, [], m.step

    def spy(words, state):
        seen.append((state.memory_kv[0][0].shape[0], state.keys[0].shape[0]))
        return step(words, state)

    m.step = spy
    hyps = beam_search(m, feats, beam_size=k, max_length=6, n_best=2, return_attention=True)
    assert seen and all(n_mem == 4 and rows == 4 * k for n_mem, rows in seen)
    m.step = step
    for n, hs in enumerate(hyps):
        lp = sequence_log_prob(m, feats[n:n + 1].repeat(len(hs), 0), [h.ids for h in hs])
        np.testing.assert_allclose([h.logprob for h in hs], lp, rtol=1e-9)
        for h in hs:
            assert h.attention.shape == (len(h.ids), LOC)
    ids, alphas = greedy_decode(m, feats, max_length=6, return_attention=True)
    one = beam_search(m, feats, beam_size=1, max_length=6, return_attention=True)
    for n, (h,) in enumerate(one):
        np.testing.assert_array_equal(h.ids, ids[n, :len(h.ids)])
        np.testing.assert_allclose(h.attention, alphas[n, :len(h.ids)], rtol=1e-6)


def test_step_refuses_dropout_masks_and_wrong_features():
    m = small_transformer(L=LOC)
    feats, caps = small_inputs(LOC)
    with pytest.raises(ValueError, match="without dropout masks"):
        m.step(caps[:, 0], m.init_state(feats), masks=(None, None))
    with pytest.raises(ValueError, match="spatial maps"):
        m.loss(feats[:, 0], caps)
    with pytest.raises(ValueError, match=r"features must be \(N, 6\)"):
        small_transformer(L=0).loss(feats, caps)


def test_checkpoint_round_trip(tmp_path):
    from rnncap.checkpoint import load_checkpoint, save_checkpoint
    from rnncap.data.vocab import Vocab

    m = small_transformer(L=LOC, dtype=np.float32, dropout=0.1, label_smoothing=0.1)
    vocab = Vocab.build([["w%d" % i for i in range(V - 4)]], min_count=1)
    assert len(vocab) == V
    save_checkpoint(tmp_path / "m.npz", m, vocab)
    back = load_checkpoint(tmp_path / "m.npz")
    assert type(back.model) is TransformerCaptioningModel and back.meta["model_class"] == "TransformerCaptioningModel"
    assert back.model.config() == m.config()
    for k, v in m.params.items():
        np.testing.assert_array_equal(back.model.params[k], v)


def test_resume_is_bitwise_exact_for_the_transformer(tmp_path):
    """k steps, checkpoint, resume, m more == k+m steps (dropout on, stop mid-epoch,
    and mid-warm-up: the learning rate's warm-up factor is counted over the whole run)."""
    from test_train import make_trainer, resume_trainer, toy_problem

    from rnncap.config import TrainConfig

    feats, caps, idx, vocab = toy_problem()
    maps = np.random.default_rng(5).standard_normal((len(feats), LOC, feats.shape[1])).astype(np.float32)
    data = (maps, caps, idx)
    base = dict(lr=1e-2, batch_size=8, epochs=4, seed=7, lr_decay=0.9, warmup=8)

    def model():
        return TransformerCaptioningModel(len(vocab), maps.shape[2], 8, 2, 2, 16, locations=LOC, seed=3,
                                          dropout=0.3)

    ref = model()
    make_trainer(ref, data, vocab, tmp_path / "ref", TrainConfig(**base, max_iters=11)).fit()
    t1 = make_trainer(model(), data, vocab, tmp_path / "a", TrainConfig(**base, max_iters=5))
    t1.fit()
    t2 = resume_trainer(tmp_path / "a" / "last.npz", data, tmp_path / "a", TrainConfig(**base, max_iters=11))
    assert isinstance(t2.model, TransformerCaptioningModel) and t2.iteration == 5
    assert t2._warmup() == 6 / 8  # the 6th update of 8 warm-up updates
    t2.fit()
    assert t2._warmup() == 1.0
    for name in ref.params:
        assert np.array_equal(ref.params[name], t2.model.params[name]), name


def test_data_parallel_ranks_train_like_one_process_with_dropout():
    """Two DataParallel ranks (threads) give one process's parameters and dropout
    generator state: the model draws every mask per row, with the batch first."""
    from test_distributed import ThreadComm, toy

    from rnncap.config import TrainConfig
    from rnncap.training.distributed import DataParallel
    from rnncap.training.train import Trainer

    data = toy()
    cfg = TrainConfig(optimizer="adam", lr=1e-2, batch_size=8, epochs=2, seed=7, clip_norm=1.0)

    def model():
        return TransformerCaptioningModel(20, 8, 8, 2, 1, 16, seed=3, dropout=0.3)

    ref = model()
    Trainer(ref, data, cfg, val=data, progress=False, log=lambda m: None).fit()
    shared = ThreadComm.shared_state(2)
    models, errors = [model(), model()], []

    def rank_main(r):
        try:
            Trainer(DataParallel(models[r], ThreadComm(r, shared)), data, cfg, val=data,
                    progress=False, log=lambda m: None).fit()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            shared["barrier"].abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    for name, want in ref.params.items():
        assert np.array_equal(models[1].params[name], models[0].params[name]), name
        np.testing.assert_allclose(models[0].params[name], want, rtol=1e-4, atol=2e-6, err_msg=name)
    assert all(m.rng.bit_generator.state == ref.rng.bit_generator.state for m in models)


def test_memorises_fifty_captions():
    """50 random captions (4-8 words, V = 1000) for 50 random 16 x 64 maps; E 128,
    4 heads, 2 layers, FFN 256, Adam lr 1e-3, float32, no dropout. The loss must fall
    under 0.5, and greedy sampling must then give back every caption."""
    Vb, Db, N, Lb = 1000, 64, 50, 16
    r = np.random.default_rng(0)
    maps = r.standard_normal((N, Lb, Db)).astype(np.float32)
    lengths, caps = fifty_captions(r, Vb, N)
    model = TransformerCaptioningModel(Vb, Db, 128, 4, 2, 256, locations=Lb, dtype=np.float32, seed=0,
                                       dropout=0.0)
    memorise(model, maps, caps, lengths, 1e-3, 300, 0.5, "transformer")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backend_matches_numpy(dtype, xp):
    """The same loss, gradients and greedy captions on the array module under test
    (CuPy where a GPU is usable) as on NumPy."""
    from rnncap.backend import to_device, to_numpy

    host = small_transformer(L=LOC, dtype=dtype, dropout=0.0)
    dev = TransformerCaptioningModel.from_config(host.config())
    dev.params = {k: to_device(v.copy(), xp) for k, v in host.params.items()}
    feats, caps = small_inputs(LOC)
    feats = feats.astype(dtype)
    lh, gh = host.loss(feats, caps)
    ld, gd = dev.loss(xp.asarray(feats), xp.asarray(caps))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert ld == pytest.approx(lh, rel=tol)
    for k in gh:
        assert rel_error(to_numpy(gd[k]), gh[k]) < tol, k
    np.testing.assert_array_equal(greedy_decode(dev, xp.asarray(feats), max_length=6),
                                  greedy_decode(host, feats, max_length=6))
