"""The soft-attention layers: numeric gradients of every input, the sequence layer
against a loop of steps, grouped (beam) queries against one image copy per query,
and the contract every layer keeps (inputs untouched, dtype kept)."""
import numpy as np
import pytest

from rnncap.models import layers as L
from rnncap.backend import to_numpy

from gradcheck import check_gradients

N, T, W, H, D, A, LOC = 3, 4, 5, 4, 6, 5, 7


def _rand(r, *shape, scale=1.0):
    return r.standard_normal(shape) * scale


def _attention_args(r, M=N, k=1):
    return {"q": _rand(r, M * k, A), "proj": _rand(r, M, LOC, A), "a": _rand(r, M, LOC, D),
            "w": _rand(r, A)}


def _step_args(r, M=N, k=1):
    n = M * k
    return {"x": _rand(r, n, W), "prev_h": _rand(r, n, H), "prev_c": _rand(r, n, H),
            "a": _rand(r, M, LOC, D), "proj": _rand(r, M, LOC, A),
            "Wx": _rand(r, W, 4 * H, scale=0.5), "Wz": _rand(r, D, 4 * H, scale=0.5),
            "Wh": _rand(r, H, 4 * H + A + 1, scale=0.5), "bh": _rand(r, 4 * H + A + 1, scale=0.5),
            "w": _rand(r, A)}


def _seq_args(r):
    return {"x": _rand(r, N, T, W), "a": _rand(r, N, LOC, D), "proj": _rand(r, N, LOC, A),
            "h0": _rand(r, N, H), "c0": _rand(r, N, H),
            "Wx": _rand(r, W, 4 * H, scale=0.5), "Wz": _rand(r, D, 4 * H, scale=0.5),
            "Wh": _rand(r, H, 4 * H + A + 1, scale=0.5), "bh": _rand(r, 4 * H + A + 1, scale=0.5),
            "w": _rand(r, A)}


@pytest.mark.parametrize("k", [1, 3])
def test_soft_attention_gradients(k):
    r = np.random.default_rng(k)
    args = _attention_args(r, k=k)
    (z, alpha), cache = L.soft_attention_forward(**args)
    assert z.shape == (N * k, D) and alpha.shape == (N * k, LOC)
    np.testing.assert_allclose(alpha.sum(axis=1), 1.0)
    dz, dal = _rand(r, *z.shape), _rand(r, *alpha.shape)
    dq, dproj, da, dw = L.soft_attention_backward(dz, dal, cache)

    def f():
        (z, alpha), _ = L.soft_attention_forward(**args)
        return np.concatenate([z.ravel(), alpha.ravel()])

    check_gradients(f, args, {"q": dq, "proj": dproj, "a": da, "w": dw},
                    dout=np.concatenate([dz.ravel(), dal.ravel()]))


def test_soft_attention_by_hand():
    """Two locations, one query: alpha is the softmax of w . tanh(P_i + q)."""
    q = np.array([[0.5, -1.0]])
    proj = np.array([[[0.1, 0.2], [-0.3, 0.4]]])
    a = np.array([[[1.0, 0.0, 2.0], [0.0, 3.0, -1.0]]])
    w = np.array([1.5, -0.5])
    e = np.tanh(proj[0] + q[0]) @ w
    alpha = np.exp(e) / np.exp(e).sum()
    (z, got), _ = L.soft_attention_forward(q, proj, a, w)
    np.testing.assert_allclose(got[0], alpha, rtol=1e-12)
    np.testing.assert_allclose(z[0], alpha @ a[0], rtol=1e-12)


def test_grouped_queries_equal_one_image_copy_per_query():
    """k hypotheses per image attend to one copy of its map: the same as repeating it."""
    r = np.random.default_rng(5)
    args = _attention_args(r, k=3)
    (z, alpha), cache = L.soft_attention_forward(**args)
    rep = dict(args, proj=np.repeat(args["proj"], 3, axis=0), a=np.repeat(args["a"], 3, axis=0))
    (z1, alpha1), cache1 = L.soft_attention_forward(**rep)
    np.testing.assert_allclose(z, z1, rtol=1e-12)
    np.testing.assert_allclose(alpha, alpha1, rtol=1e-12)
    dz, dal = _rand(r, *z.shape), _rand(r, *alpha.shape)
    g, g1 = L.soft_attention_backward(dz, dal, cache), L.soft_attention_backward(dz, dal, cache1)
    np.testing.assert_allclose(g[0], g1[0], rtol=1e-10)
    np.testing.assert_allclose(g[1], g1[1].reshape(N, 3, LOC, A).sum(axis=1), rtol=1e-10)
    np.testing.assert_allclose(g[2], g1[2].reshape(N, 3, LOC, D).sum(axis=1), rtol=1e-10)


@pytest.mark.parametrize("k", [1, 2])
def test_attention_lstm_step_gradients(k):
    r = np.random.default_rng(10 + k)
    args = _step_args(r, k=k)
    h, c, alpha, cache = L.attention_lstm_step_forward(**args)
    dh, dc, dal = _rand(r, *h.shape), _rand(r, *c.shape), _rand(r, *alpha.shape)
    grads = L.attention_lstm_step_backward(dh, dc, dal, cache)
    names = ["x", "prev_h", "prev_c", "a", "proj", "Wx", "Wz", "Wh", "bh", "w"]

    def f():
        h, c, alpha, _ = L.attention_lstm_step_forward(**args)
        return np.concatenate([h.ravel(), c.ravel(), alpha.ravel()])

    check_gradients(f, args, dict(zip(names, grads)),
                    dout=np.concatenate([dh.ravel(), dc.ravel(), dal.ravel()]))


@pytest.mark.parametrize("lengths", [None, [4, 1, 3]])
def test_attention_lstm_sequence_gradients(lengths):
    r = np.random.default_rng(20)
    args = _seq_args(r)
    h, alpha, cache = L.attention_lstm_forward(**args, lengths=lengths)
    dh, dal = _rand(r, *h.shape), _rand(r, *alpha.shape)
    grads = L.attention_lstm_backward(dh, dal, cache)
    names = ["x", "a", "proj", "h0", "c0", "Wx", "Wz", "Wh", "bh", "w"]

    def f():
        h, alpha, _ = L.attention_lstm_forward(**args, lengths=lengths)
        return np.concatenate([h.ravel(), alpha.ravel()])

    check_gradients(f, args, dict(zip(names, grads)),
                    dout=np.concatenate([dh.ravel(), dal.ravel()]))


def test_sequence_layer_equals_loop_of_steps():
    r = np.random.default_rng(30)
    args = _seq_args(r)
    lengths = np.array([2, 4, 3])
    h, alpha, cache = L.attention_lstm_forward(**args, lengths=lengths)
    dh, dal = _rand(r, *h.shape), _rand(r, *alpha.shape)
    seq = L.attention_lstm_backward(dh, dal, cache)

    weights = {k: args[k] for k in ("Wx", "Wz", "Wh", "bh", "w")}
    for n in range(N):
        sl = slice(n, n + 1)
        ph, pc, caches = args["h0"][sl], args["c0"][sl], []
        for t in range(T):
            if t < lengths[n]:
                ph, pc, al, c = L.attention_lstm_step_forward(args["x"][sl, t], ph, pc, args["a"][sl],
                                                              args["proj"][sl], **weights)
                caches.append(c)
                np.testing.assert_allclose(h[n, t], ph[0], rtol=1e-12)
                np.testing.assert_allclose(alpha[n, t], al[0], rtol=1e-12)
            else:  # past the end: nothing computed, zeros out
                assert not h[n, t].any() and not alpha[n, t].any()
        # Backward by hand through the steps of this sequence.
        dph, dpc = np.zeros((1, H)), np.zeros((1, H))
        acc = None
        for t in range(lengths[n] - 1, -1, -1):
            g = L.attention_lstm_step_backward(dh[sl, t] + dph, dpc, dal[sl, t], caches[t])
            dph, dpc = g[1], g[2]
            np.testing.assert_allclose(seq[0][n, t], g[0][0], rtol=1e-9, atol=1e-12)
            acc = list(g) if acc is None else [x + y for x, y in zip(acc, g)]
        np.testing.assert_allclose(seq[1][n], acc[3][0], rtol=1e-9, atol=1e-12)   # da
        np.testing.assert_allclose(seq[2][n], acc[4][0], rtol=1e-9, atol=1e-12)   # dproj
        np.testing.assert_allclose(seq[3][n], dph[0], rtol=1e-9, atol=1e-12)      # dh0
        np.testing.assert_allclose(seq[4][n], dpc[0], rtol=1e-9, atol=1e-12)      # dc0


@pytest.mark.parametrize("k", [1, 2])
def test_attention_lstm_step_gradients_through_the_context(k):
    """A deep output layer reads the step's gated context: its gradient flows back too."""
    r = np.random.default_rng(50 + k)
    args = _step_args(r, k=k)
    h, c, alpha, cache = L.attention_lstm_step_forward(**args)
    ctx = L.attention_context(cache)
    assert ctx.shape == (N * k, D)
    dh, dc, dctx = _rand(r, *h.shape), _rand(r, *c.shape), _rand(r, *ctx.shape)
    grads = L.attention_lstm_step_backward(dh, dc, None, cache, dcontext=dctx)
    names = ["x", "prev_h", "prev_c", "a", "proj", "Wx", "Wz", "Wh", "bh", "w"]

    def f():
        h, c, _, cache = L.attention_lstm_step_forward(**args)
        return np.concatenate([h.ravel(), c.ravel(), L.attention_context(cache).ravel()])

    check_gradients(f, args, dict(zip(names, grads)),
                    dout=np.concatenate([dh.ravel(), dc.ravel(), dctx.ravel()]))


@pytest.mark.parametrize("lengths", [None, [4, 1, 3], [0, 2, 4]])
def test_attention_lstm_sequence_gradients_through_the_context(lengths):
    r = np.random.default_rng(60)
    args = _seq_args(r)
    h, alpha, cache = L.attention_lstm_forward(**args, lengths=lengths)
    ctx = L.attention_context(cache)
    assert ctx.shape == (N, T, D)
    if lengths is not None:  # past a sequence's end there is no context
        for n, length in enumerate(lengths):
            assert not ctx[n, length:].any() and ctx[n, :length].all()
    dh, dal, dctx = _rand(r, *h.shape), _rand(r, *alpha.shape), _rand(r, *ctx.shape)
    grads = L.attention_lstm_backward(dh, dal, cache, dcontext=dctx)
    names = ["x", "a", "proj", "h0", "c0", "Wx", "Wz", "Wh", "bh", "w"]

    def f():
        h, alpha, cache = L.attention_lstm_forward(**args, lengths=lengths)
        return np.concatenate([h.ravel(), alpha.ravel(), L.attention_context(cache).ravel()])

    check_gradients(f, args, dict(zip(names, grads)),
                    dout=np.concatenate([dh.ravel(), dal.ravel(), dctx.ravel()]))


def test_sequence_context_equals_the_steps_contexts():
    r = np.random.default_rng(70)
    args = _seq_args(r)
    h, alpha, cache = L.attention_lstm_forward(**args, lengths=[3, 4, 1])
    ctx = L.attention_context(cache)
    weights = {k: args[k] for k in ("Wx", "Wz", "Wh", "bh", "w")}
    ph, pc = args["h0"], args["c0"]
    for t in range(T):
        ph, pc, _, c = L.attention_lstm_step_forward(args["x"][:, t], ph, pc, args["a"], args["proj"], **weights)
        for n, length in enumerate([3, 4, 1]):
            if t < length:
                np.testing.assert_allclose(ctx[n, t], L.attention_context(c)[n], rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_attention_layers_keep_inputs_and_dtype(dtype):
    r = np.random.default_rng(40)
    args = {k: v.astype(dtype) for k, v in _seq_args(r).items()}
    before = {k: v.copy() for k, v in args.items()}
    h, alpha, cache = L.attention_lstm_forward(**args, lengths=[4, 2, 3])
    dh = _rand(r, *h.shape).astype(dtype)
    dal = _rand(r, *alpha.shape).astype(dtype)
    d_before = (dh.copy(), dal.copy())
    grads = L.attention_lstm_backward(dh, dal, cache)
    for k, v in args.items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    np.testing.assert_array_equal(dh, d_before[0])
    np.testing.assert_array_equal(dal, d_before[1])
    assert h.dtype == alpha.dtype == dtype
    assert all(to_numpy(g).dtype == dtype for g in grads)
