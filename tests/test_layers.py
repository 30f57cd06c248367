"""Layer tests: numerical gradients for every input of every layer, purity (no
layer writes into its arguments), dtype, the array backends, and the sequence
layers against a loop of their step layers.

Gradient checks use float64, small seeded random shapes, centred differences and the
element-wise guarded relative error of ``gradcheck.rel_error`` (tolerance 1e-6).
The analytic side runs on the backend under test (``xp``); the numerical side and
the reference results are host NumPy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

from gradcheck import check_gradients, rel_error
from rnncap.models import layers as L
from rnncap.backend import to_device, to_numpy


# ----------------------------------------------------------------------------------
# Shapes and layer specifications
# ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shapes:
    N: int
    T: int
    D: int
    H: int
    M: int


def random_shapes(seed):
    r = np.random.default_rng(seed)
    N, T, D, H, M = (int(v) for v in r.integers(1, [5, 6, 6, 6, 6], endpoint=True))
    return Shapes(N, T, D, H, M)


# Three seeded random shapes plus the degenerate N = T = 1 case.
SHAPES = [random_shapes(s) for s in (0, 1, 2)] + [Shapes(1, 1, 2, 3, 1)]
SHAPE_IDS = [f"N{s.N}T{s.T}D{s.D}H{s.H}" for s in SHAPES]

DROP_P = 0.3
DROP_SEED = 7


def _dropout_fixed(x, seed):
    # A fresh generator per call: the same mask for every evaluation.
    return L.dropout_forward(x, DROP_P, np.random.default_rng(seed))


@dataclass
class Spec:
    """A forward/backward pair and how to make inputs for it.

    ``make(rng, shapes)`` returns (args, wrt, dout_shapes): the forward's positional
    arguments by name (float64 host arrays or plain values), the names whose
    gradients ``backward`` returns (in its order), and one upstream gradient shape
    per array output of ``forward``.
    """
    forward: Callable
    backward: Callable
    make: Callable


def _n(r, *shape, scale=1.0):
    return r.standard_normal(shape) * scale


def _make_affine(r, s):
    # x with two trailing dims checks the flattening to D = d1*d2.
    return ({"x": _n(r, s.N, 2, s.D), "w": _n(r, 2 * s.D, s.M, scale=0.5), "b": _n(r, s.M)},
            ["x", "w", "b"], [(s.N, s.M)])


def _make_temporal_affine(r, s):
    return ({"x": _n(r, s.N, s.T, s.D), "w": _n(r, s.D, s.M, scale=0.5), "b": _n(r, s.M)},
            ["x", "w", "b"], [(s.N, s.T, s.M)])


def _make_rnn_step(r, s):
    return ({"x": _n(r, s.N, s.D), "prev_h": _n(r, s.N, s.H, scale=0.5),
             "Wx": _n(r, s.D, s.H, scale=0.4), "Wh": _n(r, s.H, s.H, scale=0.4),
             "b": _n(r, s.H, scale=0.3)},
            ["x", "prev_h", "Wx", "Wh", "b"], [(s.N, s.H)])


def _make_rnn(r, s):
    return ({"x": _n(r, s.N, s.T, s.D), "h0": _n(r, s.N, s.H, scale=0.5),
             "Wx": _n(r, s.D, s.H, scale=0.4), "Wh": _n(r, s.H, s.H, scale=0.4),
             "b": _n(r, s.H, scale=0.3)},
            ["x", "h0", "Wx", "Wh", "b"], [(s.N, s.T, s.H)])


def _make_lstm_step(r, s):
    H4 = 4 * s.H
    return ({"x": _n(r, s.N, s.D), "prev_h": _n(r, s.N, s.H, scale=0.5),
             "prev_c": _n(r, s.N, s.H, scale=0.5),
             "Wx": _n(r, s.D, H4, scale=0.4), "Wh": _n(r, s.H, H4, scale=0.4),
             "b": _n(r, H4, scale=0.3)},
            ["x", "prev_h", "prev_c", "Wx", "Wh", "b"], [(s.N, s.H), (s.N, s.H)])


def _make_lstm(r, s):
    H4 = 4 * s.H
    return ({"x": _n(r, s.N, s.T, s.D), "h0": _n(r, s.N, s.H, scale=0.5),
             "Wx": _n(r, s.D, H4, scale=0.4), "Wh": _n(r, s.H, H4, scale=0.4),
             "b": _n(r, H4, scale=0.3)},
            ["x", "h0", "Wx", "Wh", "b"], [(s.N, s.T, s.H)])


def _make_embedding(r, s):
    V, T = 7, s.T + 2
    ids = r.integers(0, 5, size=(s.N, T))  # ids 5 and 6 never used: their rows get 0
    ids[0, 0] = ids[-1, -1] = ids[0, 1] = 3  # a repeated id, whatever the draw
    return ({"x": ids, "W": _n(r, V, s.D)}, ["W"], [(s.N, T, s.D)])


def _make_dropout(r, s):
    return ({"x": _n(r, s.N, s.T, s.D), "seed": DROP_SEED}, ["x"], [(s.N, s.T, s.D)])


SPECS = {
    "affine": Spec(L.affine_forward, L.affine_backward, _make_affine),
    "temporal_affine": Spec(L.temporal_affine_forward, L.temporal_affine_backward,
                            _make_temporal_affine),
    "rnn_step": Spec(L.rnn_step_forward, L.rnn_step_backward, _make_rnn_step),
    "rnn": Spec(L.rnn_forward, L.rnn_backward, _make_rnn),
    "lstm_step": Spec(L.lstm_step_forward, L.lstm_step_backward, _make_lstm_step),
    "lstm": Spec(L.lstm_forward, L.lstm_backward, _make_lstm),
    "word_embedding": Spec(L.word_embedding_forward, L.word_embedding_backward,
                           _make_embedding),
    "dropout": Spec(_dropout_fixed, L.dropout_backward, _make_dropout),
}


def _on(xp, value):
    return to_device(value, xp) if isinstance(value, np.ndarray) else value


def _as_tuple(grads):
    return grads if isinstance(grads, tuple) else (grads,)


def run(spec, xp, args, douts):
    """Forward and backward on backend ``xp``; returns host copies of the outputs and
    the gradients (copies: later calls cannot change them)."""
    res = spec.forward(*(_on(xp, v) for v in args.values()))
    outs, cache = res[:-1], res[-1]
    grads = _as_tuple(spec.backward(*(_on(xp, d) for d in douts), cache))
    return [np.array(to_numpy(o)) for o in outs], [np.array(to_numpy(g)) for g in grads]


def make_case(name, shapes, seed=0, dtype=np.float64):
    r = np.random.default_rng(seed)
    args, wrt, dout_shapes = SPECS[name].make(r, shapes)
    args = {k: (v.astype(dtype) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v)
            for k, v in args.items()}
    douts = [r.standard_normal(sh).astype(dtype) for sh in dout_shapes]
    return args, wrt, douts


# ----------------------------------------------------------------------------------
# Numerical gradient checks: every input of every layer
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shapes", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("name", list(SPECS))
def test_gradients(name, shapes, xp):
    spec = SPECS[name]
    args, wrt, douts = make_case(name, shapes, seed=SHAPES.index(shapes))
    _, grads = run(spec, xp, args, douts)
    assert len(grads) == len(wrt)

    def f():  # all outputs, flattened, on the host
        outs = spec.forward(*args.values())[:-1]
        return np.concatenate([o.ravel() for o in outs])

    dout = np.concatenate([d.ravel() for d in douts])
    check_gradients(f, {k: args[k] for k in wrt}, dict(zip(wrt, grads)), dout=dout)


@pytest.mark.parametrize("upstream", ["h", "c"])
def test_lstm_step_gradients_one_upstream(upstream):
    """Each of dnext_h and dnext_c alone: the other path must contribute nothing."""
    spec = SPECS["lstm_step"]
    args, wrt, (dh, dc) = make_case("lstm_step", SHAPES[0], seed=3)
    if upstream == "h":
        dc = np.zeros_like(dc)
    else:
        dh = np.zeros_like(dh)
    _, grads = run(spec, np, args, [dh, dc])
    f = lambda: np.concatenate([o.ravel() for o in spec.forward(*args.values())[:2]])
    check_gradients(f, {k: args[k] for k in wrt}, dict(zip(wrt, grads)),
                    dout=np.concatenate([dh.ravel(), dc.ravel()]))


def test_embedding_repeated_ids_sum_and_unused_rows_are_zero():
    args, _, (dout,) = make_case("word_embedding", SHAPES[0])
    _, (dW,) = run(SPECS["word_embedding"], np, args, [dout])
    ids = args["x"]
    expected = np.zeros_like(args["W"])
    for (n, t), i in np.ndenumerate(ids):  # the slow, obvious way
        expected[i] += dout[n, t]
    np.testing.assert_allclose(dW, expected, rtol=1e-12, atol=1e-12)
    assert not dW[5:].any()


def _softmax_case(r, N=3, T=4, V=6, scale=2.0):
    x = r.standard_normal((N, T, V)) * scale
    y = r.integers(0, V, size=(N, T))
    mask = r.random((N, T)) > 0.4
    mask[0, 0], mask[-1, -1] = True, False  # at least one of each
    return x, y, mask


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.35])
def test_temporal_softmax_loss_gradient(label_smoothing, xp):
    x, y, mask = _softmax_case(np.random.default_rng(11))
    loss_dev, dx_dev = L.temporal_softmax_loss(to_device(x, xp), to_device(y, xp),
                                               to_device(mask, xp), label_smoothing)
    loss, dx = L.temporal_softmax_loss(x, y, mask, label_smoothing)
    assert abs(loss_dev - loss) <= 1e-12 * abs(loss)
    f = lambda: L.temporal_softmax_loss(x, y, mask, label_smoothing)[0]
    check_gradients(f, {"x": x}, {"x": to_numpy(dx_dev)})
    # Masked positions contribute neither loss nor gradient.
    assert not dx[~mask].any()


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_temporal_softmax_loss_value(label_smoothing):
    """Against the definition, written the slow way with an explicit log-softmax."""
    x, y, mask = _softmax_case(np.random.default_rng(5), V=5)
    N, T, V = x.shape
    expected = 0.0
    for n in range(N):
        for t in range(T):
            if mask[n, t]:
                logp = x[n, t] - np.log(np.sum(np.exp(x[n, t])))
                target = np.full(V, label_smoothing / V)
                target[y[n, t]] += 1.0 - label_smoothing
                expected -= target @ logp
    loss, _ = L.temporal_softmax_loss(x, y, mask, label_smoothing)
    assert loss == pytest.approx(expected / N, rel=1e-12)


def test_temporal_softmax_loss_all_masked_is_zero():
    x, y, mask = _softmax_case(np.random.default_rng(0))
    loss, dx = L.temporal_softmax_loss(x, y, np.zeros_like(mask))
    assert loss == 0.0 and not dx.any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_temporal_softmax_loss_huge_scores_are_stable(dtype, label_smoothing):
    """Scores of +-1e4 overflow a naive exp; loss and gradient must stay finite and
    right: the target's log-probability is about -(gap to the max score)."""
    N, T, V = 2, 3, 5
    x = np.zeros((N, T, V), dtype=dtype)
    x[..., 0] = 1e4
    x[..., 1] = -1e4
    y = np.full((N, T), 1)  # the most unlikely word
    mask = np.ones((N, T), dtype=bool)
    loss, dx = L.temporal_softmax_loss(x, y, mask, label_smoothing)
    assert np.isfinite(loss) and np.all(np.isfinite(dx))
    assert dx.dtype == dtype
    if label_smoothing == 0.0:
        assert loss == pytest.approx(T * 2e4, rel=1e-6)
    # Correct targets on the same huge scores: loss ~ 0, not NaN.
    y0 = np.zeros((N, T), dtype=np.int64)
    loss0, dx0 = L.temporal_softmax_loss(x, y0, mask)
    assert np.isfinite(loss0) and 0.0 <= loss0 < 1e-6 and np.abs(dx0).max() < 1e-6


def test_dropout_mask_and_scaling():
    x = np.random.default_rng(0).standard_normal((40, 50)) + 3.0
    out, mask = L.dropout_forward(x, DROP_P, np.random.default_rng(1))
    kept = out != 0
    assert abs(kept.mean() - (1 - DROP_P)) < 0.03
    np.testing.assert_allclose(out[kept], x[kept] / (1 - DROP_P), rtol=1e-12)
    # The same seed gives the same mask; p = 0 is the identity.
    again, _ = L.dropout_forward(x, DROP_P, np.random.default_rng(1))
    np.testing.assert_array_equal(out, again)
    same, cache = L.dropout_forward(x, 0.0, np.random.default_rng(1))
    np.testing.assert_array_equal(same, x)
    np.testing.assert_array_equal(L.dropout_backward(x, cache), x)


# ----------------------------------------------------------------------------------
# Purity, dtype, and the backends
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(SPECS))
def test_layers_never_write_into_arguments_and_keep_dtype(name, dtype):
    spec = SPECS[name]
    args, wrt, douts = make_case(name, SHAPES[0], seed=1, dtype=dtype)
    before = {k: v.copy() for k, v in args.items() if isinstance(v, np.ndarray)}
    douts_before = [d.copy() for d in douts]

    res = spec.forward(*args.values())
    outs, cache = res[:-1], res[-1]
    for k, v in before.items():
        np.testing.assert_array_equal(args[k], v, err_msg=f"{name}_forward wrote into {k}")
    grads = _as_tuple(spec.backward(*douts, cache))
    grads_again = _as_tuple(spec.backward(*douts, cache))  # the cache must survive too
    for k, v in before.items():
        np.testing.assert_array_equal(args[k], v, err_msg=f"{name}_backward wrote into {k}")
    for d, d0 in zip(douts, douts_before):
        np.testing.assert_array_equal(d, d0, err_msg=f"{name}_backward wrote into dout")
    for g, g2 in zip(grads, grads_again):
        np.testing.assert_array_equal(g, g2, err_msg=f"{name}_backward is not repeatable")

    for o in outs:
        assert o.dtype == dtype, f"{name} output is {o.dtype}, inputs {np.dtype(dtype)}"
    for k, g in zip(wrt, grads):
        assert g.dtype == dtype, f"{name} d{k} is {g.dtype}, inputs {np.dtype(dtype)}"
        assert g.shape == args[k].shape, f"{name} d{k} shape {g.shape} != {args[k].shape}"


@pytest.mark.parametrize("name", list(SPECS))
def test_calls_do_not_share_buffers(name):
    """A second forward/backward (other inputs, same shapes) leaves the first call's
    outputs, cache and gradients alone: no scratch space outlives a call."""
    spec = SPECS[name]
    args_a, _, douts_a = make_case(name, SHAPES[0], seed=20)
    args_b, _, douts_b = make_case(name, SHAPES[0], seed=21)
    ref_outs, ref_grads = run(spec, np, args_a, douts_a)  # A alone

    res_a = spec.forward(*args_a.values())
    res_b = spec.forward(*args_b.values())
    grads_a = _as_tuple(spec.backward(*douts_a, res_a[-1]))
    grads_b = _as_tuple(spec.backward(*douts_b, res_b[-1]))
    for o, ref in zip(res_a[:-1], ref_outs):
        np.testing.assert_array_equal(o, ref, err_msg=f"{name}: output of call A changed")
    for g, ref in zip(grads_a, ref_grads):
        np.testing.assert_array_equal(g, ref, err_msg=f"{name}: gradient of call A wrong")
    for g, g_b in zip(grads_a, grads_b):
        assert not np.shares_memory(g, g_b), f"{name}: calls A and B share a gradient"


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_temporal_softmax_loss_is_pure_and_keeps_dtype(label_smoothing):
    for dtype in (np.float32, np.float64):
        x, y, mask = _softmax_case(np.random.default_rng(2))
        x = x.astype(dtype)
        copies = [x.copy(), y.copy(), mask.copy()]
        loss, dx = L.temporal_softmax_loss(x, y, mask, label_smoothing)
        for a, b in zip((x, y, mask), copies):
            np.testing.assert_array_equal(a, b)
        assert dx.dtype == dtype and isinstance(loss, float)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(SPECS))
def test_backend_matches_numpy(name, dtype, xp):
    """Forward and backward on ``xp`` agree with the NumPy results."""
    args, _, douts = make_case(name, SHAPES[1], seed=4, dtype=dtype)
    ref_outs, ref_grads = run(SPECS[name], np, args, douts)
    outs, grads = run(SPECS[name], xp, args, douts)
    rtol = 1e-5 if dtype == np.float32 else 1e-11
    for a, b in zip(outs + grads, ref_outs + ref_grads):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol)


# ----------------------------------------------------------------------------------
# The sequence layers are a loop of their step layers
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_sequence_layer_equals_loop_of_steps(cell):
    s = Shapes(3, 5, 4, 3, 1)
    args, _, (dh,) = make_case(cell, s, seed=9)
    x, h0, Wx, Wh, b = args.values()
    seq_fwd, seq_bwd = (L.rnn_forward, L.rnn_backward) if cell == "rnn" else \
        (L.lstm_forward, L.lstm_backward)
    h, cache = seq_fwd(x, h0, Wx, Wh, b)
    dx, dh0, dWx, dWh, db = seq_bwd(dh, cache)

    # Forward with the step layer, then backpropagate through the steps by hand.
    caches, hs = [], []
    prev_h, prev_c = h0, np.zeros_like(h0)
    for t in range(s.T):
        if cell == "rnn":
            prev_h, c = L.rnn_step_forward(x[:, t], prev_h, Wx, Wh, b)
        else:
            prev_h, prev_c, c = L.lstm_step_forward(x[:, t], prev_h, prev_c, Wx, Wh, b)
        caches.append(c)
        hs.append(prev_h)
    np.testing.assert_allclose(h, np.stack(hs, axis=1), rtol=1e-13, atol=1e-14)

    ref = {"dx": np.zeros_like(x), "dWx": np.zeros_like(Wx), "dWh": np.zeros_like(Wh),
           "db": np.zeros_like(b)}
    carry_h, carry_c = np.zeros_like(h0), np.zeros_like(h0)
    for t in reversed(range(s.T)):
        if cell == "rnn":
            gx, carry_h, gWx, gWh, gb = L.rnn_step_backward(dh[:, t] + carry_h, caches[t])
        else:
            gx, carry_h, carry_c, gWx, gWh, gb = L.lstm_step_backward(
                dh[:, t] + carry_h, carry_c, caches[t])
        ref["dx"][:, t] = gx
        ref["dWx"] += gWx
        ref["dWh"] += gWh
        ref["db"] += gb
    for k, got in (("dx", dx), ("dWx", dWx), ("dWh", dWh), ("db", db)):
        assert rel_error(got, ref[k]) < 1e-12, k
    assert rel_error(dh0, carry_h) < 1e-12


def test_lstm_gate_order_is_i_f_o_g():
    """With zero weights the gates are the bias alone: pick biases so that each gate
    is recognisable in the result."""
    H = 1
    x, prev_h = np.zeros((1, 1)), np.zeros((1, H))
    prev_c = np.array([[2.0]])
    Wx, Wh = np.zeros((1, 4 * H)), np.zeros((H, 4 * H))
    i, f, o, g = 0.3, -1.2, 0.7, 0.5
    b = np.array([i, f, o, g])
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))
    next_h, next_c, _ = L.lstm_step_forward(x, prev_h, prev_c, Wx, Wh, b)
    c = sig(f) * 2.0 + sig(i) * np.tanh(g)
    assert next_c[0, 0] == pytest.approx(c, rel=1e-14)
    assert next_h[0, 0] == pytest.approx(sig(o) * np.tanh(c), rel=1e-14)


def test_sigmoid_extremes_do_not_overflow():
    """Very large pre-activations saturate the gates instead of giving NaN/inf."""
    with np.errstate(over="raise", invalid="raise"):
        x = np.array([[1.0]])
        b = np.array([800.0, -800.0, 800.0, 800.0])
        h, c, cache = L.lstm_step_forward(x, np.zeros((1, 1)), np.ones((1, 1)),
                                          np.zeros((1, 4)), np.zeros((1, 4)), b)
        grads = L.lstm_step_backward(np.ones((1, 1)), np.ones((1, 1)), cache)
    assert c[0, 0] == pytest.approx(1.0) and h[0, 0] == pytest.approx(np.tanh(1.0))
    assert all(np.all(np.isfinite(g)) for g in grads)


# ----------------------------------------------------------------------------------
# Bad shapes
# ----------------------------------------------------------------------------------

def test_bad_shapes_raise_value_error():
    r = np.random.default_rng(0)
    with pytest.raises(ValueError):
        L.affine_forward(r.standard_normal((2, 3)), r.standard_normal((4, 5)), np.zeros(5))
    with pytest.raises(ValueError):
        L.rnn_forward(r.standard_normal((2, 3, 4)), np.zeros((2, 5)),
                      r.standard_normal((4, 5)), r.standard_normal((6, 5)), np.zeros(5))
    with pytest.raises(ValueError):
        L.lstm_forward(r.standard_normal((2, 3, 4)), np.zeros((2, 5)),
                       r.standard_normal((3, 20)), r.standard_normal((5, 20)), np.zeros(20))
    with pytest.raises(ValueError):
        L.temporal_softmax_loss(r.standard_normal((2, 3, 4)), np.zeros((2, 4), dtype=int),
                                np.ones((2, 4), dtype=bool))
