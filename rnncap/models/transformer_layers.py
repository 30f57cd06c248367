"""The Transformer's layers, each a forward/backward pair (the CS231n layer API, as in
``rnncap.models.layers``): multi-head attention, layer norm, positional encoding, the
ReLU feed-forward block and the post-norm decoder layer built from them.

Letters: N batch, S queries, T keys (the queries' own sequence in self-attention),
E the model width, h the number of heads (E/h features each), F the feed-forward
width, L memory tokens (image locations), V vocabulary.

Conventions, those of ``torch.nn.MultiheadAttention`` / ``TransformerDecoderLayer``
(batch first, post-norm) written row-major:

* the input projections of q, k and v are packed in one W_in (E, 3E), b_in (3E,),
  as torch's in_proj_weight transposed: self-attention computes q, k and v with one
  GEMM, cross-attention q with one and k, v with another;
* head j is the contiguous block of features [j*E/h, (j+1)*E/h);
* scores are q k^T / sqrt(E/h); a mask (S, T) of zeros and ones hides the keys where
  it is 0 (score -inf); softmax; dropout on the attention weights; weighted sum of v;
  heads joined; output projection;
* every dropout takes either a generator (``dropout``, ``rng``) or explicit masks
  (``masks``), so a run can be replayed exactly.

Nothing here writes into its arguments; buffers a function allocates are reused in
place. The decoder's cached step (``decoder_layer_forward`` with ``past`` and
``memory_kv``) goes through the same code as training, one position at a time.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import get_array_module
from .layers import affine_backward, affine_forward, dropout_mask


def _masks_or_drawn(masks, shapes, p, rng, dtype, xp):
    """The dropout masks to use: ``masks`` as given (any may be None), else drawn with
    ``rng`` in the order of ``shapes`` (all None when p is 0)."""
    if masks is not None:
        if len(masks) != len(shapes):
            raise ValueError(f"expected {len(shapes)} dropout masks, got {len(masks)}")
        for m, s in zip(masks, shapes):
            if m is not None and tuple(m.shape) != tuple(s):
                raise ValueError(f"a dropout mask must be {tuple(s)}; got {tuple(m.shape)}")
        return tuple(masks)
    if p > 0 and rng is None:
        raise ValueError("dropout > 0 needs a generator (rng) or explicit masks")
    return tuple(dropout_mask(s, p, rng, dtype, xp) for s in shapes)


# ----------------------------------------------------------------------------------
# Multi-head attention
# ----------------------------------------------------------------------------------

def _split_heads(x, h):
    """(N, S, E) -> (N, h, S, E/h), a view where the layout allows."""
    N, S, E = x.shape
    return x.reshape(N, S, h, E // h).transpose(0, 2, 1, 3)


def _join_heads(x):
    """(N, h, S, d) -> (N, S, h*d)."""
    N, h, S, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(N, S, h * d)


def _attend_forward(q, k, v, h, mask=None, drop=None):
    """Scaled dot-product attention of projected queries over projected keys/values.

    q: (N, S, E); k, v: (N, T, E); mask: None or (S, T) zeros and ones; drop: None or
    the attention-weight dropout mask (N, h, S, T). Returns out (N, S, E) (heads
    joined, before the output projection), the weights (N, h, S, T) and a cache.
    """
    xp = get_array_module(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[2] // h)
    qh, kh, vh = _split_heads(q, h), _split_heads(k, h), _split_heads(v, h)
    w = qh @ kh.transpose(0, 1, 3, 2)                       # (N, h, S, T)
    w *= scale
    if mask is not None:
        w[..., xp.asarray(mask) == 0] = -xp.inf
    w -= w.max(axis=-1, keepdims=True)
    xp.exp(w, out=w)
    w /= w.sum(axis=-1, keepdims=True)
    a = w if drop is None else w * drop
    out = _join_heads(a @ vh)
    return out, w, (qh, kh, vh, w, a, drop, scale)


def _attend_backward(dout, cache):
    """Backward of ``_attend_forward``. dout: (N, S, E). Returns dq, dk, dv."""
    qh, kh, vh, w, a, drop, scale = cache
    h = qh.shape[1]
    douth = _split_heads(dout, h)                            # (N, h, S, d)
    dvh = a.transpose(0, 1, 3, 2) @ douth
    dw = douth @ vh.transpose(0, 1, 3, 2)                    # (N, h, S, T)
    if drop is not None:
        dw *= drop
    # softmax backward: ds = w * (dw - sum(dw * w)); masked keys have w = 0.
    dw -= (dw * w).sum(axis=-1, keepdims=True)
    dw *= w
    dw *= scale
    dqh = dw @ kh
    dkh = dw.transpose(0, 1, 3, 2) @ qh
    return _join_heads(dqh), _join_heads(dkh), _join_heads(dvh)


def _project_in(query, key, value, W_in, b_in):
    """q, k, v = the input projections, with as few GEMMs as the inputs allow: one
    when key and value are the query itself (self-attention), two when key is value.
    Returns q, k, v and the cache for ``_project_in_backward``."""
    E = W_in.shape[0]
    if key is query and value is query:
        qkv, c = affine_forward(query.reshape(-1, E), W_in, b_in)
        qkv = qkv.reshape(*query.shape[:-1], 3 * E)
        return qkv[..., :E], qkv[..., E:2 * E], qkv[..., 2 * E:], ("self", c)
    q, cq = affine_forward(query.reshape(-1, E), W_in[:, :E], b_in[:E])
    q = q.reshape(*query.shape[:-1], E)
    if key is value:
        kv, ckv = affine_forward(key.reshape(-1, E), W_in[:, E:], b_in[E:])
        kv = kv.reshape(*key.shape[:-1], 2 * E)
        return q, kv[..., :E], kv[..., E:], ("kv", cq, ckv, key.shape)
    k, ck = affine_forward(key.reshape(-1, E), W_in[:, E:2 * E], b_in[E:2 * E])
    v, cv = affine_forward(value.reshape(-1, E), W_in[:, 2 * E:], b_in[2 * E:])
    return (q, k.reshape(*key.shape[:-1], E), v.reshape(*value.shape[:-1], E),
            ("qkv", cq, ck, cv, key.shape, value.shape))


def _project_in_backward(dq, dk, dv, cache, query_shape):
    """Backward of ``_project_in``: (dquery, dkey or None, dvalue or None, dW_in, db_in);
    a None gradient is already part of the one before it (shared input)."""
    xp = get_array_module(dq)
    E = dq.shape[-1]
    kind = cache[0]
    if kind == "self":
        dqkv = xp.concatenate([dq, dk, dv], axis=-1).reshape(-1, 3 * E)
        dx, dW, db = affine_backward(dqkv, cache[1])
        return dx.reshape(query_shape), None, None, dW, db
    dx_q, dWq, dbq = affine_backward(dq.reshape(-1, E), cache[1])
    if kind == "kv":
        dkv = xp.concatenate([dk, dv], axis=-1).reshape(-1, 2 * E)
        dx_kv, dWkv, dbkv = affine_backward(dkv, cache[2])
        return (dx_q.reshape(query_shape), dx_kv.reshape(cache[3]), None,
                xp.concatenate([dWq, dWkv], axis=1), xp.concatenate([dbq, dbkv]))
    dx_k, dWk, dbk = affine_backward(dk.reshape(-1, E), cache[2])
    dx_v, dWv, dbv = affine_backward(dv.reshape(-1, E), cache[3])
    return (dx_q.reshape(query_shape), dx_k.reshape(cache[4]), dx_v.reshape(cache[5]),
            xp.concatenate([dWq, dWk, dWv], axis=1), xp.concatenate([dbq, dbk, dbv]))


def multihead_attention_forward(query, key, value, W_in, b_in, W_out, b_out, num_heads,
                                mask=None, dropout=0.0, rng=None, masks=None):
    """Multi-head attention (``torch.nn.MultiheadAttention``, batch first).

    query: (N, S, E); key, value: (N, T, E); W_in: (E, 3E), b_in: (3E,) the packed
    q | k | v projections; W_out: (E, E), b_out: (E,); num_heads h divides E.
    mask: None or (S, T) zeros and ones, 0 = this query cannot see this key (every
    query must see at least one key). Dropout on the attention weights: p ``dropout``
    with generator ``rng``, or ``masks`` = (drop (N, h, S, T) or None,).

    Pass the same array as query, key and value for self-attention (one GEMM for
    q, k, v), the same as key and value for cross-attention.
    Returns out (N, S, E) and a cache; the weights (N, h, S, T) are ``cache[2]``.
    """
    xp = get_array_module(query, W_in)
    E = query.shape[2]
    if E % num_heads:
        raise ValueError(f"num_heads {num_heads} must divide the width {E}")
    N, S, T = query.shape[0], query.shape[1], key.shape[1]
    (drop,) = _masks_or_drawn(masks, [(N, num_heads, S, T)], dropout, rng, query.dtype, xp)
    q, k, v, c_in = _project_in(query, key, value, W_in, b_in)
    att, weights, c_att = _attend_forward(q, k, v, num_heads, mask, drop)
    out, c_out = affine_forward(att.reshape(N * S, E), W_out, b_out)
    return out.reshape(N, S, E), (c_in, c_att, weights, c_out, query.shape)


def multihead_attention_backward(dout, cache):
    """Backward of ``multihead_attention_forward``. dout: (N, S, E).

    Returns dquery, dkey, dvalue, dW_in, db_in, dW_out, db_out. When the forward pass
    was given one array for several inputs, its whole gradient is returned in the
    first of them and the others are None (self-attention: dquery; key is value: dkey).
    """
    c_in, c_att, _, c_out, qshape = cache
    N, S, E = dout.shape
    datt, dW_out, db_out = affine_backward(dout.reshape(N * S, E), c_out)
    dq, dk, dv = _attend_backward(datt.reshape(N, S, E), c_att)
    dquery, dkey, dvalue, dW_in, db_in = _project_in_backward(dq, dk, dv, c_in, qshape)
    return dquery, dkey, dvalue, dW_in, db_in, dW_out, db_out


# ----------------------------------------------------------------------------------
# Layer norm, positional encoding, feed-forward
# ----------------------------------------------------------------------------------

def layernorm_forward(x, gamma, beta, eps=1e-5):
    """Layer norm over the last axis (biased variance, as torch).

    x: (..., E); gamma, beta: (E,). Returns out (shape of x) and a cache.
    """
    xp = get_array_module(x)
    xhat = x - x.mean(axis=-1, keepdims=True)
    inv = 1.0 / xp.sqrt((xhat * xhat).mean(axis=-1, keepdims=True) + eps)
    xhat *= inv
    out = xhat * gamma
    out += beta
    return out, (xhat, inv, gamma)


def layernorm_backward(dout, cache):
    """Backward of ``layernorm_forward``. Returns dx, dgamma, dbeta."""
    xhat, inv, gamma = cache
    E = xhat.shape[-1]
    d2, x2 = dout.reshape(-1, E), xhat.reshape(-1, E)
    dgamma = (d2 * x2).sum(axis=0)
    dbeta = d2.sum(axis=0)
    dxhat = dout * gamma
    dx = dxhat - dxhat.mean(axis=-1, keepdims=True)
    dx -= xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)
    dx *= inv
    return dx, dgamma, dbeta


def positional_encoding(T, E, dtype=np.float64, xp=np, start=0):
    """The sinusoidal table (T, E) for positions start .. start+T-1: feature 2k is
    sin(pos * 10000^(-2k/E)), feature 2k+1 is cos of the same angle."""
    pos = np.arange(start, start + T, dtype=np.float64)[:, None]
    angle = pos * 10000.0 ** (-np.arange(0, E, 2, dtype=np.float64) / E)
    pe = np.zeros((T, E))
    pe[:, 0::2] = np.sin(angle)
    pe[:, 1::2] = np.cos(angle[:, :E // 2])
    return xp.asarray(pe.astype(dtype))


def positional_encoding_forward(x, start=0):
    """x (N, T, E) plus the positional table of positions start .. start+T-1.
    Returns out (N, T, E) and a cache (the backward is the identity)."""
    N, T, E = x.shape
    return x + positional_encoding(T, E, x.dtype, get_array_module(x), start), None


def positional_encoding_backward(dout, cache):
    """Backward of ``positional_encoding_forward``: dx = dout."""
    return dout


def ffn_forward(x, W1, b1, W2, b2, dropout=0.0, rng=None, masks=None):
    """The feed-forward block: relu(x @ W1 + b1), dropout, @ W2 + b2.

    x: (..., E); W1: (E, F); b1: (F,); W2: (F, E); b2: (E,). Dropout on the hidden
    layer: p ``dropout`` with ``rng``, or ``masks`` = (drop (..., F) or None,).
    Returns out (shape of x) and a cache.
    """
    xp = get_array_module(x, W1)
    E, F = W1.shape
    lead = x.shape[:-1]
    (drop,) = _masks_or_drawn(masks, [(*lead, F)], dropout, rng, x.dtype, xp)
    hid, c1 = affine_forward(x.reshape(-1, E), W1, b1)
    xp.maximum(hid, 0, out=hid)
    dropped = hid if drop is None else hid * drop.reshape(-1, F)
    out, c2 = affine_forward(dropped, W2, b2)
    return out.reshape(x.shape), (c1, c2, hid, drop, x.shape)


def ffn_backward(dout, cache):
    """Backward of ``ffn_forward``. Returns dx, dW1, db1, dW2, db2."""
    c1, c2, hid, drop, shape = cache
    E = shape[-1]
    dhid, dW2, db2 = affine_backward(dout.reshape(-1, E), c2)
    if drop is not None:
        dhid *= drop.reshape(dhid.shape)
    dhid *= hid > 0
    dx, dW1, db1 = affine_backward(dhid, c1)
    return dx.reshape(shape), dW1, db1, dW2, db2


# ----------------------------------------------------------------------------------
# The decoder layer (post-norm, torch's default norm_first=False)
# ----------------------------------------------------------------------------------
#
#     y1  = norm1(x  + drop(SelfAttention(x, causal mask)))
#     y2  = norm2(y1 + drop(CrossAttention(y1, memory)))
#     out = norm3(y2 + drop(FFN(y2)))
#
# The layer's parameters are a dict: self_W_in (E, 3E), self_b_in, self_W_out (E, E),
# self_b_out; cross_W_in (E, 3E), cross_b_in, cross_W_out, cross_b_out; W1 (E, F),
# b1, W2 (F, E), b2; norm1_g, norm1_b, norm2_g, norm2_b, norm3_g, norm3_b (E,).

DECODER_PARAMS = ("self_W_in", "self_b_in", "self_W_out", "self_b_out",
                  "cross_W_in", "cross_b_in", "cross_W_out", "cross_b_out",
                  "W1", "b1", "W2", "b2",
                  "norm1_g", "norm1_b", "norm2_g", "norm2_b", "norm3_g", "norm3_b")


def decoder_mask_shapes(N, S, T, L, h, E, F):
    """Shapes of a decoder layer's six dropout masks, in order: self-attention weights
    (N, h, S, T), self-attention output (N, S, E), cross-attention weights (N, h, S, L),
    cross-attention output (N, S, E), feed-forward hidden (N, S, F), feed-forward
    output (N, S, E). T is S in training (T = past + S with a cache)."""
    return [(N, h, S, T), (N, S, E), (N, h, S, L), (N, S, E), (N, S, F), (N, S, E)]


def memory_keys_values(memory, p):
    """The cross-attention's keys and values of ``memory`` (M, L, E): one GEMM,
    computed once per image for decoding. Returns k, v (M, L, E)."""
    E = memory.shape[2]
    kv = (memory.reshape(-1, E) @ p["cross_W_in"][:, E:] + p["cross_b_in"][E:]).reshape(
        *memory.shape[:2], 2 * E)
    return kv[..., :E], kv[..., E:]


def decoder_layer_forward(x, memory, p, num_heads, self_mask=None, dropout=0.0, rng=None,
                          masks=None, past=None, memory_kv=None):
    """One post-norm decoder layer (``torch.nn.TransformerDecoderLayer``, relu).

    x: (N, S, E) the target sequence; memory: (N, L, E); p: the layer's parameters
    (``DECODER_PARAMS``); self_mask: None or (S, S) zeros and ones (causal: lower
    triangular). Dropout: p ``dropout`` with ``rng``, or ``masks`` =
    the six masks of ``decoder_mask_shapes`` (any may be None).

    Decoding (no backward): ``past`` = (k, v) (n, t, E) the self-attention keys and
    values of the earlier positions, prepended to this step's; ``memory_kv`` = the
    memory's (k, v) from ``memory_keys_values`` (M, L, E) with n = M*k rows grouped
    by image (memory is then unused). Training has k = 1.

    Returns out (N, S, E) and a cache; ``cache["keys"]`` is (k, v) of the
    self-attention (past included), ``cache["cross_weights"]`` (N, h, S, L).
    """
    xp = get_array_module(x, p["W1"])
    N, S, E = x.shape
    h, F = num_heads, p["W1"].shape[1]
    if E % h:
        raise ValueError(f"num_heads {h} must divide the width {E}")
    t0 = 0 if past is None else past[0].shape[1]
    mem_k, mem_v = memory_keys_values(memory, p) if memory_kv is None else memory_kv
    M, Lm = mem_k.shape[0], mem_k.shape[1]
    m = _masks_or_drawn(masks, decoder_mask_shapes(N, S, t0 + S, Lm, h, E, F), dropout, rng, x.dtype, xp)
    c = {}

    # Masked self-attention: q, k, v in one GEMM, the past's keys in front.
    q, k, v, c["self_in"] = _project_in(x, x, x, p["self_W_in"], p["self_b_in"])
    if past is not None:
        k, v = xp.concatenate([past[0], k], axis=1), xp.concatenate([past[1], v], axis=1)
    c["keys"] = (k, v)
    att, _, c["self_att"] = _attend_forward(q, k, v, h, self_mask, m[0])
    sa, c["self_out"] = affine_forward(att.reshape(N * S, E), p["self_W_out"], p["self_b_out"])
    sa = sa.reshape(N, S, E)
    if m[1] is not None:
        sa *= m[1]
    y1, c["norm1"] = layernorm_forward(x + sa, p["norm1_g"], p["norm1_b"])

    # Cross-attention over the memory; the k hypotheses of an image are k*S queries
    # over its one copy of the memory (no mask, so this is exact).
    cq, c["cross_q"] = affine_forward(y1.reshape(N * S, E), p["cross_W_in"][:, :E], p["cross_b_in"][:E])
    kq = N // M
    drop_c = None if m[2] is None else m[2].reshape(M, kq, h, S, Lm).transpose(0, 2, 1, 3, 4).reshape(M, h, kq * S, Lm)
    att, cw, c["cross_att"] = _attend_forward(cq.reshape(M, kq * S, E), mem_k, mem_v, h, None, drop_c)
    c["cross_weights"] = cw.reshape(M, h, kq, S, Lm).transpose(0, 2, 1, 3, 4).reshape(N, h, S, Lm)
    ca, c["cross_out"] = affine_forward(att.reshape(N * S, E), p["cross_W_out"], p["cross_b_out"])
    ca = ca.reshape(N, S, E)
    if m[3] is not None:
        ca *= m[3]
    y2, c["norm2"] = layernorm_forward(y1 + ca, p["norm2_g"], p["norm2_b"])

    # Feed-forward.
    ff, c["ffn"] = ffn_forward(y2, p["W1"], p["b1"], p["W2"], p["b2"], masks=(m[4],))
    if m[5] is not None:
        ff *= m[5]
    out, c["norm3"] = layernorm_forward(y2 + ff, p["norm3_g"], p["norm3_b"])
    c["masks"], c["memory_given"] = m, memory_kv is None
    c["cross_memory"], c["cross_W_kv"] = memory, p["cross_W_in"][:, E:]
    return out, c


def decoder_layer_backward(dout, cache):
    """Backward of ``decoder_layer_forward`` (training: no ``past``, memory given).

    dout: (N, S, E). Returns dx (N, S, E), dmemory (N, L, E) and the parameters'
    gradients as a dict keyed like ``DECODER_PARAMS``.
    """
    xp = get_array_module(dout)
    c, m = cache, cache["masks"]
    if not c["memory_given"] or c["keys"][0].shape[1] != dout.shape[1]:
        raise ValueError("decoder_layer_backward needs a training forward pass (no past, memory given)")
    N, S, E = dout.shape
    g = {}
    dz, g["norm3_g"], g["norm3_b"] = layernorm_backward(dout, c["norm3"])
    dff = dz if m[5] is None else dz * m[5]
    dy2, g["W1"], g["b1"], g["W2"], g["b2"] = ffn_backward(dff, c["ffn"])
    dy2 += dz

    dz, g["norm2_g"], g["norm2_b"] = layernorm_backward(dy2, c["norm2"])
    dca = dz if m[3] is None else dz * m[3]
    datt, g["cross_W_out"], g["cross_b_out"] = affine_backward(dca.reshape(N * S, E), c["cross_out"])
    dq, dk, dv = _attend_backward(datt.reshape(N, S, E), c["cross_att"])
    dy1, dWq, dbq = affine_backward(dq.reshape(N * S, E), c["cross_q"])
    dy1 = dy1.reshape(N, S, E)
    dy1 += dz
    dkv = xp.concatenate([dk, dv], axis=-1)
    memory = c["cross_memory"]
    Lm = memory.shape[1]
    dmemory = (dkv.reshape(N * Lm, 2 * E) @ c["cross_W_kv"].T).reshape(N, Lm, E)
    g["cross_W_in"] = xp.concatenate([dWq, memory.reshape(N * Lm, E).T @ dkv.reshape(N * Lm, 2 * E)], axis=1)
    g["cross_b_in"] = xp.concatenate([dbq, dkv.reshape(N * Lm, 2 * E).sum(axis=0)])

    dz, g["norm1_g"], g["norm1_b"] = layernorm_backward(dy1, c["norm1"])
    dsa = dz if m[1] is None else dz * m[1]
    datt, g["self_W_out"], g["self_b_out"] = affine_backward(dsa.reshape(N * S, E), c["self_out"])
    dq, dk, dv = _attend_backward(datt.reshape(N, S, E), c["self_att"])
    dx, _, _, g["self_W_in"], g["self_b_in"] = _project_in_backward(dq, dk, dv, c["self_in"], (N, S, E))
    dx += dz
    return dx, dmemory, g
