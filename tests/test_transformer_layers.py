"""The Transformer's layers (rnncap.models.transformer_layers): numerical gradients of
every input and parameter, with masks and with dropout on fixed masks; the fused
projections against separate ones; the conventions (positional table, layer norm)
written out; the generator and explicit masks giving the same result; purity."""
from __future__ import annotations

import numpy as np
import pytest

from gradcheck import check_gradients, rel_error
from rnncap.models import transformer_layers as TL
from rnncap.models.layers import dropout_mask

E, NH, F = 8, 2, 12


def _rand(r, *shape):
    return r.standard_normal(shape)


def _mha_params(r):
    return {"W_in": _rand(r, E, 3 * E) / 3, "b_in": _rand(r, 3 * E) / 3,
            "W_out": _rand(r, E, E) / 3, "b_out": _rand(r, E) / 3}


def _drop(r, shape, p=0.3):
    return dropout_mask(shape, p, r, np.float64)


@pytest.mark.parametrize("kind", ["self", "cross_kv", "separate"])
@pytest.mark.parametrize("dropout", [False, True])
def test_multihead_attention_gradients(kind, dropout):
    r = np.random.default_rng(0)
    N, S, T = 2, 4, 3 if kind != "self" else 4
    p = _mha_params(r)
    x = {"query": _rand(r, N, S, E)}
    if kind == "cross_kv":
        x["key"] = _rand(r, N, T, E)
    elif kind == "separate":
        x["key"], x["value"] = _rand(r, N, T, E), _rand(r, N, T, E)
    mask = np.tril(np.ones((S, T))) if kind == "self" else (r.random((S, T)) > 0.3).astype(float)
    mask[:, 0] = 1  # every query sees a key
    drop = (_drop(r, (N, NH, S, T)),) if dropout else None

    def run():
        q = x["query"]
        k = x.get("key", q)
        v = x.get("value", k)
        return TL.multihead_attention_forward(q, k, v, p["W_in"], p["b_in"], p["W_out"], p["b_out"],
                                              NH, mask=mask, masks=drop)

    out, cache = run()
    dout = _rand(r, *out.shape)
    dq, dk, dv, dW_in, db_in, dW_out, db_out = TL.multihead_attention_backward(dout, cache)
    analytic = {"query": dq, "key": dk, "value": dv, "W_in": dW_in, "b_in": db_in,
                "W_out": dW_out, "b_out": db_out}
    if kind == "self":
        assert dk is None and dv is None
    if kind == "cross_kv":
        assert dv is None
    check_gradients(lambda: run()[0], {**x, **p}, analytic, dout=dout)
    # masked keys get no weight
    w = cache[2]
    assert np.all(w[:, :, mask == 0] == 0)
    np.testing.assert_allclose(w.sum(axis=-1), 1.0)


def test_fused_projections_equal_separate_ones():
    r = np.random.default_rng(1)
    p = _mha_params(r)
    x = _rand(r, 2, 5, E)
    args = (p["W_in"], p["b_in"], p["W_out"], p["b_out"], NH)
    fused, _ = TL.multihead_attention_forward(x, x, x, *args)
    apart, _ = TL.multihead_attention_forward(x, x.copy(), x.copy(), *args)
    y = x.copy()
    kv, _ = TL.multihead_attention_forward(x, y, y, *args)
    np.testing.assert_allclose(fused, apart, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(kv, apart, rtol=1e-13, atol=1e-14)


def test_attention_written_out():
    """One head by hand: softmax(q k^T / sqrt(E/h) masked) v, heads as contiguous blocks."""
    r = np.random.default_rng(2)
    p = _mha_params(r)
    q, kv = _rand(r, 1, 3, E), _rand(r, 1, 4, E)
    mask = np.array([[1, 0, 1, 1], [1, 1, 0, 0], [0, 0, 0, 1]])
    out, _ = TL.multihead_attention_forward(q, kv, kv, p["W_in"], p["b_in"], p["W_out"], p["b_out"],
                                            NH, mask=mask)
    Q = q[0] @ p["W_in"][:, :E] + p["b_in"][:E]
    K = kv[0] @ p["W_in"][:, E:2 * E] + p["b_in"][E:2 * E]
    Vv = kv[0] @ p["W_in"][:, 2 * E:] + p["b_in"][2 * E:]
    d = E // NH
    heads = []
    for j in range(NH):
        s = Q[:, j * d:(j + 1) * d] @ K[:, j * d:(j + 1) * d].T / np.sqrt(d)
        s = np.where(mask == 0, -np.inf, s)
        a = np.exp(s - s.max(axis=1, keepdims=True))
        a /= a.sum(axis=1, keepdims=True)
        heads.append(a @ Vv[:, j * d:(j + 1) * d])
    want = np.concatenate(heads, axis=1) @ p["W_out"] + p["b_out"]
    np.testing.assert_allclose(out[0], want, rtol=1e-12)


def test_layernorm_gradients_and_definition():
    r = np.random.default_rng(3)
    x, g, b = _rand(r, 2, 3, E) * 3 + 1, _rand(r, E), _rand(r, E)
    out, cache = TL.layernorm_forward(x, g, b)
    want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * g + b
    np.testing.assert_allclose(out, want, rtol=1e-12)
    dout = _rand(r, *out.shape)
    dx, dg, db = TL.layernorm_backward(dout, cache)
    check_gradients(lambda: TL.layernorm_forward(x, g, b)[0], {"x": x, "g": g, "b": b},
                    {"x": dx, "g": dg, "b": db}, dout=dout)


def test_positional_encoding_table():
    pe = TL.positional_encoding(6, E)
    for pos in range(6):
        for k in range(E // 2):
            angle = pos * 10000.0 ** (-2 * k / E)
            assert pe[pos, 2 * k] == pytest.approx(np.sin(angle), abs=1e-15)
            assert pe[pos, 2 * k + 1] == pytest.approx(np.cos(angle), abs=1e-15)
    np.testing.assert_array_equal(TL.positional_encoding(2, E, start=3), pe[3:5])
    x = np.zeros((1, 6, E))
    out, c = TL.positional_encoding_forward(x)
    np.testing.assert_array_equal(out[0], pe)
    assert TL.positional_encoding_backward(x, c) is x


@pytest.mark.parametrize("dropout", [False, True])
def test_ffn_gradients(dropout):
    r = np.random.default_rng(4)
    x = _rand(r, 2, 3, E)
    p = {"W1": _rand(r, E, F) / 3, "b1": _rand(r, F) / 3, "W2": _rand(r, F, E) / 3, "b2": _rand(r, E)}
    masks = (_drop(r, (2, 3, F)),) if dropout else None

    def run():
        return TL.ffn_forward(x, p["W1"], p["b1"], p["W2"], p["b2"], masks=masks)

    out, cache = run()
    dout = _rand(r, *out.shape)
    dx, dW1, db1, dW2, db2 = TL.ffn_backward(dout, cache)
    check_gradients(lambda: run()[0], {"x": x, **p},
                    {"x": dx, "W1": dW1, "b1": db1, "W2": dW2, "b2": db2}, dout=dout)


def decoder_params(r, E=E, F=F):
    shapes = {"self_W_in": (E, 3 * E), "self_b_in": (3 * E,), "self_W_out": (E, E), "self_b_out": (E,),
              "cross_W_in": (E, 3 * E), "cross_b_in": (3 * E,), "cross_W_out": (E, E), "cross_b_out": (E,),
              "W1": (E, F), "b1": (F,), "W2": (F, E), "b2": (E,)}
    p = {k: _rand(r, *s) / 3 for k, s in shapes.items()}
    for j in (1, 2, 3):
        p[f"norm{j}_g"], p[f"norm{j}_b"] = 1 + _rand(r, E) / 5, _rand(r, E) / 5
    assert set(p) == set(TL.DECODER_PARAMS)
    return p


@pytest.mark.parametrize("dropout", [False, True])
def test_decoder_layer_gradients(dropout):
    r = np.random.default_rng(5)
    N, S, Lm = 2, 4, 3
    p = decoder_params(r)
    x, mem = _rand(r, N, S, E), _rand(r, N, Lm, E)
    causal = np.tril(np.ones((S, S)))
    masks = (tuple(_drop(r, s) for s in TL.decoder_mask_shapes(N, S, S, Lm, NH, E, F))
             if dropout else None)

    def run():
        return TL.decoder_layer_forward(x, mem, p, NH, causal, masks=masks)

    out, cache = run()
    dout = _rand(r, *out.shape)
    dx, dmem, g = TL.decoder_layer_backward(dout, cache)
    check_gradients(lambda: run()[0], {"x": x, "memory": mem, **p}, {"x": dx, "memory": dmem, **g}, dout=dout)


def test_generator_and_explicit_masks_agree_and_inputs_are_untouched():
    r = np.random.default_rng(6)
    N, S, Lm = 2, 3, 2
    p = decoder_params(r)
    x, mem = _rand(r, N, S, E), _rand(r, N, Lm, E)
    before = {k: v.copy() for k, v in {**p, "x": x, "mem": mem}.items()}
    a, _ = TL.decoder_layer_forward(x, mem, p, NH, np.tril(np.ones((S, S))), dropout=0.4,
                                    rng=np.random.default_rng(9))
    g = np.random.default_rng(9)
    masks = tuple(dropout_mask(s, 0.4, g, np.float64) for s in TL.decoder_mask_shapes(N, S, S, Lm, NH, E, F))
    b, cache = TL.decoder_layer_forward(x, mem, p, NH, np.tril(np.ones((S, S))), masks=masks)
    np.testing.assert_array_equal(a, b)
    TL.decoder_layer_backward(np.ones_like(b), cache)
    for k, v in {**p, "x": x, "mem": mem}.items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    with pytest.raises(ValueError, match="generator"):
        TL.decoder_layer_forward(x, mem, p, NH, dropout=0.4)
    with pytest.raises(ValueError, match="mask"):
        TL.decoder_layer_forward(x, mem, p, NH, masks=masks[:5])


def test_cached_steps_equal_the_whole_sequence():
    """Feeding positions one at a time with ``past`` and the memory's keys/values gives
    the causal forward pass over the whole sequence."""
    r = np.random.default_rng(7)
    N, S, Lm = 3, 5, 4
    p = decoder_params(r)
    x, mem = _rand(r, N, S, E), _rand(r, N, Lm, E)
    full, cache = TL.decoder_layer_forward(x, mem, p, NH, np.tril(np.ones((S, S))))
    kv = TL.memory_keys_values(mem, p)
    past = (np.zeros((N, 0, E)), np.zeros((N, 0, E)))
    for t in range(S):
        out, c = TL.decoder_layer_forward(x[:, t:t + 1], None, p, NH, past=past, memory_kv=kv)
        past = c["keys"]
        np.testing.assert_allclose(out[:, 0], full[:, t], rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(c["cross_weights"][:, :, 0], cache["cross_weights"][:, :, t], rtol=1e-12)
    assert rel_error(past[0], cache["keys"][0]) < 1e-14
