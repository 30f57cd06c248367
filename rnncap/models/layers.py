"""The layers of the captioning model, each a forward/backward pair.

Conventions (the CS231n layer API):

* ``x_forward(...) -> (out, cache)`` and ``x_backward(dout, cache) -> grads``.
* Batch first, row-major: an affine map is ``x @ w``. Letters in the docstrings:
  N batch, T time, D input, W word vector, H hidden, V vocabulary.
* dtype follows the inputs; float32 and float64 both work.
* No function writes into its arguments. Buffers that a function allocates itself
  are updated in place, which is where the speed comes from.
* Every function takes its array module from its inputs (``get_array_module``), so
  the same code runs on NumPy and CuPy.

There is exactly one copy of each cell's math: the private "gate kernels"
(``_rnn_cell_*`` and ``_lstm_cell_*``) map the pre-activation ``a`` to the new state
and back. The step layers, the sequence layers and the decoders all go through them.
The sequence layers only differ from a loop of steps in *where* the matmuls happen:
``x @ Wx`` for all time steps is one GEMM before the loop, and ``dx``, ``dWx`` and
``dWh`` are one GEMM each after it. Given ``lengths``, they run the sequences packed
longest first (like PyTorch's PackedSequence), so steps past a sequence's end, which
cannot reach the loss, cost nothing. docs/performance.md has the measurements.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ..backend import get_array_module, to_numpy


# ----------------------------------------------------------------------------------
# Dense layers
# ----------------------------------------------------------------------------------

def affine_forward(x, w, b):
    """Fully connected layer: ``out = x @ w + b``.

    x: (N, D) (or (N, d1, ..., dk), flattened to D = d1*...*dk); w: (D, M); b: (M,).
    Returns out (N, M) and a cache for the backward pass.
    """
    x2 = x.reshape(x.shape[0], math.prod(x.shape[1:]))  # also right for N = 0
    out = x2 @ w
    out += b
    return out, (x, w)


def affine_backward(dout, cache):
    """Backward of ``affine_forward``. dout: (N, M). Returns dx (shape of x), dw, db."""
    x, w = cache
    x2 = x.reshape(x.shape[0], math.prod(x.shape[1:]))
    dx = (dout @ w.T).reshape(x.shape)
    dw = x2.T @ dout
    db = dout.sum(axis=0)
    return dx, dw, db


def temporal_affine_forward(x, w, b):
    """Affine map applied at every time step.

    x: (N, T, D); w: (D, M); b: (M,). Returns out (N, T, M) and a cache.
    """
    N, T, D = x.shape
    out = x.reshape(N * T, D) @ w
    out += b
    return out.reshape(N, T, w.shape[1]), (x, w)


def temporal_affine_backward(dout, cache):
    """Backward of ``temporal_affine_forward``. dout: (N, T, M). Returns dx, dw, db."""
    x, w = cache
    N, T, D = x.shape
    M = w.shape[1]
    d2 = dout.reshape(N * T, M)
    dx = (d2 @ w.T).reshape(N, T, D)
    dw = x.reshape(N * T, D).T @ d2
    db = d2.sum(axis=0)
    return dx, dw, db


# ----------------------------------------------------------------------------------
# Cell kernels: the one copy of the recurrent math
# ----------------------------------------------------------------------------------

def _sigmoid_inplace(a, xp):
    """Logistic sigmoid 1 / (1 + exp(-a)), written into ``a``.

    For very negative ``a`` exp(-a) overflows to inf and the result is the correct 0;
    the overflow warning is silenced. This costs one exp per element, which NumPy
    evaluates faster than tanh (the other common form, (1 + tanh(a/2)) / 2).
    """
    xp.negative(a, out=a)
    with np.errstate(over="ignore"):
        xp.exp(a, out=a)
    a += 1.0
    return xp.reciprocal(a, out=a)


def _rnn_cell_forward(a, out=None):
    """tanh cell: next_h = tanh(a). a: (N, H) pre-activation, owned by the caller;
    the result goes to ``out`` (N, H) if given, else over ``a``."""
    xp = get_array_module(a)
    return xp.tanh(a, out=a if out is None else out)


def _rnn_cell_backward(dnext_h, next_h, out=None):
    """Gradient with respect to the pre-activation: dnext_h * (1 - next_h**2),
    written into ``out`` (N, H) if given."""
    xp = get_array_module(dnext_h, next_h)
    da = xp.multiply(next_h, next_h, out=out)
    xp.subtract(1.0, da, out=da)
    da *= dnext_h
    return da


def _lstm_cell_forward(a, prev_c, out=None):
    """LSTM gates. a: (N, 4H) pre-activation ordered i, f, o, g (overwritten in place
    with the gate activations); prev_c: (N, H). ``out``: optional (next_h, next_c,
    tanh_c) buffers, each (N, H), for the results.

    Returns next_h, next_c and the cell cache (act, prev_c, tanh(next_c)).
    """
    xp = get_array_module(a, prev_c)
    N, H = a.shape[0], a.shape[1] // 4
    if out is None:
        dtype = xp.result_type(a, prev_c)
        out = tuple(xp.empty((N, H), dtype=dtype) for _ in range(3))
    next_h, next_c, tanh_c = out
    act = a
    _sigmoid_inplace(act[:, :3 * H], xp)
    xp.tanh(act[:, 3 * H:], out=act[:, 3 * H:])
    i, f, o, g = act[:, :H], act[:, H:2 * H], act[:, 2 * H:3 * H], act[:, 3 * H:]
    xp.multiply(f, prev_c, out=next_c)
    xp.multiply(i, g, out=tanh_c)  # tanh_c is scratch until the last two lines
    next_c += tanh_c
    xp.tanh(next_c, out=tanh_c)
    xp.multiply(o, tanh_c, out=next_h)
    return next_h, next_c, (act, prev_c, tanh_c)


def _lstm_cell_backward(dnext_h, dnext_c, cell_cache, out=None):
    """Backward of ``_lstm_cell_forward``. Returns da (N, 4H) and dprev_c (N, H).

    ``out``: optional (da, dprev_c, work) buffers, shaped (N, 4H), (N, H) and
    (N, 3H); dprev_c may be the very buffer that holds dnext_c (it is read first).
    """
    act, prev_c, tanh_c = cell_cache
    xp = get_array_module(act, dnext_h, dnext_c)
    N, H = act.shape[0], act.shape[1] // 4
    if out is None:
        dtype = xp.result_type(act, dnext_h, dnext_c)
        out = (xp.empty((N, 4 * H), dtype=dtype), xp.empty((N, H), dtype=dtype),
               xp.empty((N, 3 * H), dtype=dtype))
    da, dprev_c, work = out
    i, f, o, g = act[:, :H], act[:, H:2 * H], act[:, 2 * H:3 * H], act[:, 3 * H:]
    di, df, do, dg = da[:, :H], da[:, H:2 * H], da[:, 2 * H:3 * H], da[:, 3 * H:]
    # dc = dnext_c + dnext_h * o * (1 - tanh_c**2), kept in the dg slot for now.
    dc = dg
    xp.multiply(tanh_c, tanh_c, out=dc)
    xp.subtract(1.0, dc, out=dc)
    dc *= o
    dc *= dnext_h
    dc += dnext_c
    xp.multiply(dc, g, out=di)
    xp.multiply(dc, prev_c, out=df)
    xp.multiply(dnext_h, tanh_c, out=do)
    xp.multiply(dc, f, out=dprev_c)
    xp.multiply(dc, i, out=dg)
    # Through the nonlinearities: sigmoid' = s(1-s), tanh' = 1-t^2.
    s = act[:, :3 * H]
    xp.subtract(1.0, s, out=work)
    work *= s
    da[:, :3 * H] *= work
    t2 = work[:, :H]
    xp.multiply(g, g, out=t2)
    xp.subtract(1.0, t2, out=t2)
    dg *= t2
    return da, dprev_c


# ----------------------------------------------------------------------------------
# Vanilla RNN
# ----------------------------------------------------------------------------------

def rnn_step_forward(x, prev_h, Wx, Wh, b):
    """One step of a tanh RNN: ``next_h = tanh(x @ Wx + prev_h @ Wh + b)``.

    x: (N, D); prev_h: (N, H); Wx: (D, H); Wh: (H, H); b: (H,).
    Returns next_h (N, H) and a cache.
    """
    a = x @ Wx
    a += prev_h @ Wh
    a += b
    next_h = _rnn_cell_forward(a)
    return next_h, (x, prev_h, Wx, Wh, next_h)


def rnn_step_backward(dnext_h, cache):
    """Backward of ``rnn_step_forward``. dnext_h: (N, H).

    Returns dx (N, D), dprev_h (N, H), dWx (D, H), dWh (H, H), db (H,).
    """
    x, prev_h, Wx, Wh, next_h = cache
    da = _rnn_cell_backward(dnext_h, next_h)
    return da @ Wx.T, da @ Wh.T, x.T @ da, prev_h.T @ da, da.sum(axis=0)


class _Packing(NamedTuple):
    """Where each step's rows live when the sequences of a batch run as one packed
    batch, longest first: the sequences still running at step t are then the first
    n_t rows, and the packed arrays hold block 0 (n_0 rows), block 1 (n_1 rows), ...
    """
    idx: object     # (P,) for each packed row, its row in the (N*T, ·) batch
    blocks: list    # (offset, n_t) of every step that some sequence still runs
    order: object   # (N,) batch index of packed row position j, None if identity
    full: bool      # every sequence runs all T steps


def _pack(lengths, N, T, xp):
    """The packing for ``lengths`` (N,) (None: all T). Bookkeeping is on the host."""
    if lengths is None:
        lengths = np.full(N, T, dtype=np.int64)
    else:
        lengths = np.asarray(to_numpy(lengths)).astype(np.int64, copy=False)
        if lengths.shape != (N,) or (lengths < 0).any() or (lengths > T).any():
            raise ValueError(f"lengths must be (N,) = ({N},) integers in [0, T={T}]; "
                             f"got shape {lengths.shape}")
    order = np.argsort(-lengths, kind="stable")
    running = lengths[order][None, :] > np.arange(T)[:, None]     # (T, N) time-major
    counts = running.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    blocks = [(int(o), int(n)) for o, n in zip(offsets, counts) if n > 0]
    t, j = np.nonzero(running)
    idx = order[j] * T + t
    identity = bool((order == np.arange(N)).all())
    return _Packing(xp.asarray(idx), blocks, None if identity else xp.asarray(order),
                    len(idx) == N * T)


def _recurrent_forward(x, h0, Wx, Wh, b, lengths, lstm):
    """Shared time loop of the RNN and LSTM sequence layers.

    ``x @ Wx + b`` for every step is one GEMM; only ``prev_h @ Wh`` and the cell
    kernel stay inside the loop, and they write into buffers allocated once. Rows are
    packed time-major (see ``_Packing``), so each step reads and writes one
    contiguous block, and steps past a sequence's length cost nothing.

    Returns h (N, T, H) and the cache: the packing, the packed inputs xs (P, D),
    hprev (P, H) (h_{t-1} of every row), hs (P, H), Wx, Wh and for the LSTM the
    cell state: act (P, 4H) gate activations, cs (P, H), tanh(cs) and c0.
    """
    xp = get_array_module(x, h0, Wx, Wh, b)
    N, T, D = x.shape
    H = h0.shape[1]
    pk = _pack(lengths, N, T, xp)
    xs = x.reshape(N * T, D)[pk.idx]
    act = xs @ Wx
    act += b
    P, kH = act.shape
    dtype = act.dtype
    hs = xp.empty((P, H), dtype=dtype)
    hprev = xp.empty((P, H), dtype=dtype)
    rec = xp.empty((N, kH), dtype=dtype)  # prev_h @ Wh
    h_first = h0 if pk.order is None else h0[pk.order]
    if lstm:
        cs = xp.empty((P, H), dtype=dtype)
        tcs = xp.empty((P, H), dtype=dtype)
        c0 = xp.zeros((N, H), dtype=dtype)
    prev = None  # offset of the previous block
    for off, n in pk.blocks:
        blk = slice(off, off + n)
        hprev[blk] = h_first[:n] if prev is None else hs[prev:prev + n]
        xp.matmul(hprev[blk], Wh, out=rec[:n])
        act[blk] += rec[:n]
        if lstm:
            prev_c = c0[:n] if prev is None else cs[prev:prev + n]
            _lstm_cell_forward(act[blk], prev_c, out=(hs[blk], cs[blk], tcs[blk]))
        else:
            _rnn_cell_forward(act[blk], out=hs[blk])
        prev = off
    h = (xp.empty if pk.full else xp.zeros)((N * T, H), dtype=dtype)
    h[pk.idx] = hs
    cell = (act, cs, tcs, c0) if lstm else None
    return h.reshape(N, T, H), (pk, xs, hprev, hs, Wx, Wh, cell)


def _recurrent_backward(dh, cache, cell_backward):
    """Shared backward time loop. ``cell_backward(dh_t, t, blk, da_t)`` writes the
    gradient of step t's pre-activation (packed rows ``blk``) into da_t (n_t, kH).

    The loop only carries dprev_h through ``da @ Wh.T``; dx, dWx and dWh are one GEMM
    each over all steps afterwards.
    """
    pk, xs, hprev, hs, Wx, Wh, _ = cache
    xp = get_array_module(dh, Wx)
    N, T, H = dh.shape
    D, (P, kH) = xs.shape[1], (hs.shape[0], Wh.shape[1])
    dtype = hs.dtype
    dhs = dh.reshape(N * T, H)[pk.idx]
    da = xp.empty((P, kH), dtype=dtype)
    # dprev_h is kept transposed, (H, N), so that the loop's matmul is Wh @ da_t.T,
    # reading Wh as it is stored: BLAS packs it for each call, and packing a
    # transposed Wh (da_t @ Wh.T) made the loop 40% slower (docs/performance.md).
    # Columns n_{t+1}..n_t (sequences whose last step is t) stay zero until block t.
    dprev_hT = xp.zeros((H, N), dtype=dtype)
    dh_t = xp.empty((N, H), dtype=dtype)
    for t in range(len(pk.blocks) - 1, -1, -1):
        off, n = pk.blocks[t]
        blk = slice(off, off + n)
        xp.add(dhs[blk], dprev_hT[:, :n].T, out=dh_t[:n])
        cell_backward(dh_t[:n], t, blk, da[blk])
        xp.matmul(Wh, da[blk].T, out=dprev_hT[:, :n])
    dprev_h = xp.ascontiguousarray(dprev_hT.T)
    dx = (xp.empty if pk.full else xp.zeros)((N * T, D), dtype=dtype)
    dx[pk.idx] = da @ Wx.T
    dWx = xs.T @ da
    dWh = hprev.T @ da
    db = da.sum(axis=0)
    if pk.order is None:
        dh0 = dprev_h
    else:
        dh0 = xp.empty_like(dprev_h)
        dh0[pk.order] = dprev_h
    return dx.reshape(N, T, D), dh0, dWx, dWh, db


def rnn_forward(x, h0, Wx, Wh, b, lengths=None):
    """A tanh RNN over a whole sequence.

    x: (N, T, D); h0: (N, H); Wx: (D, H); Wh: (H, H); b: (H,).
    lengths: optional (N,) ints in [0, T]: sequence n runs its first lengths[n] steps
    only; its later h are zero and their upstream gradients are ignored. Skipping
    steps that cannot reach the loss (padding) saves their work.
    Returns h (N, T, H), the hidden state at every step (h0 not included), and a cache.
    """
    return _recurrent_forward(x, h0, Wx, Wh, b, lengths, lstm=False)


def rnn_backward(dh, cache):
    """Backward of ``rnn_forward``. dh: (N, T, H), upstream gradient of every h.

    Returns dx (N, T, D), dh0 (N, H), dWx (D, H), dWh (H, H), db (H,).
    """
    hs = cache[3]
    return _recurrent_backward(
        dh, cache, lambda dh_t, t, blk, da_t: _rnn_cell_backward(dh_t, hs[blk], out=da_t))


# ----------------------------------------------------------------------------------
# LSTM
# ----------------------------------------------------------------------------------

def lstm_step_forward(x, prev_h, prev_c, Wx, Wh, b):
    """One LSTM step.

    ``a = x @ Wx + prev_h @ Wh + b`` is split into gates i, f, o, g (in that order);
    i, f, o take a sigmoid and g a tanh; ``next_c = f*prev_c + i*g`` and
    ``next_h = o*tanh(next_c)``.

    x: (N, D); prev_h, prev_c: (N, H); Wx: (D, 4H); Wh: (H, 4H); b: (4H,).
    Returns next_h (N, H), next_c (N, H) and a cache.
    """
    a = x @ Wx
    a += prev_h @ Wh
    a += b
    next_h, next_c, cell = _lstm_cell_forward(a, prev_c)
    return next_h, next_c, (x, prev_h, Wx, Wh, cell)


def lstm_step_backward(dnext_h, dnext_c, cache):
    """Backward of ``lstm_step_forward``. dnext_h, dnext_c: (N, H).

    Returns dx (N, D), dprev_h (N, H), dprev_c (N, H), dWx (D, 4H), dWh (H, 4H),
    db (4H,).
    """
    x, prev_h, Wx, Wh, cell = cache
    da, dprev_c = _lstm_cell_backward(dnext_h, dnext_c, cell)
    return da @ Wx.T, da @ Wh.T, dprev_c, x.T @ da, prev_h.T @ da, da.sum(axis=0)


def lstm_forward(x, h0, Wx, Wh, b, lengths=None):
    """An LSTM over a whole sequence, with the initial cell state c0 = 0.

    x: (N, T, D); h0: (N, H); Wx: (D, 4H); Wh: (H, 4H); b: (4H,).
    lengths: optional (N,) ints in [0, T], as for ``rnn_forward``.
    Returns h (N, T, H) (h0 not included) and a cache.
    """
    return _recurrent_forward(x, h0, Wx, Wh, b, lengths, lstm=True)


def lstm_backward(dh, cache):
    """Backward of ``lstm_forward``. dh: (N, T, H).

    Returns dx (N, T, D), dh0 (N, H), dWx (D, 4H), dWh (H, 4H), db (4H,).
    """
    pk, act, cs, tcs, c0 = cache[0], *cache[6]
    N, H = c0.shape
    xp = get_array_module(dh)
    dc = xp.zeros((N, H), dtype=c0.dtype)  # carried dnext_c, updated in place
    work = xp.empty((N, 3 * H), dtype=c0.dtype)

    def cell_backward(dh_t, t, blk, da_t):
        n = da_t.shape[0]
        prev = pk.blocks[t - 1][0] if t else None
        prev_c = c0[:n] if prev is None else cs[prev:prev + n]
        _lstm_cell_backward(dh_t, dc[:n], (act[blk], prev_c, tcs[blk]),
                            out=(da_t, dc[:n], work[:n]))

    return _recurrent_backward(dh, cache, cell_backward)


# ----------------------------------------------------------------------------------
# Words in and out
# ----------------------------------------------------------------------------------

def word_embedding_forward(x, W):
    """Look up word vectors. x: (N, T) integer ids in [0, V); W: (V, D).

    Returns out (N, T, D) and a cache.
    """
    return W[x], (x, W.shape, W.dtype)


def word_embedding_backward(dout, cache):
    """Backward of ``word_embedding_forward``. dout: (N, T, D). Returns dW (V, D).

    Rows of repeated ids are summed. Sorting the ids once and reducing contiguous runs
    (``add.reduceat``) avoids the slow scatter path of ``add.at``.
    """
    x, shape, dtype = cache
    xp = get_array_module(dout)
    D = shape[1]
    ids = x.reshape(-1)
    rows = dout.reshape(-1, D)
    dW = xp.zeros(shape, dtype=dout.dtype)
    if ids.size == 0:
        return dW
    order = xp.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    starts = xp.flatnonzero(xp.concatenate([xp.ones(1, dtype=bool),
                                            sorted_ids[1:] != sorted_ids[:-1]]))
    sums = xp.add.reduceat(rows[order], starts, axis=0)
    dW[sorted_ids[starts]] = sums
    return dW


def softmax_loss(x, y, weights, label_smoothing=0.0):
    """Weighted softmax cross-entropy over rows: ``loss = -sum_i w_i log softmax(x_i)[y_i]``.

    x: (M, V) scores; y: (M,) target ids in [0, V); weights: (M,) or a scalar.
    With ``label_smoothing = eps`` the target distribution is (1 - eps) on y plus
    eps / V on every word.

    Returns the scalar loss and dx (M, V).
    """
    xp = get_array_module(x)
    M, V = x.shape
    rows = xp.arange(M)
    # One (M, V) buffer holds the shifted scores, then exp, then dx.
    buf = x - x.max(axis=1, keepdims=True)
    shifted_y = buf[rows, y]
    if label_smoothing:
        mean_shifted = buf.mean(axis=1)
    xp.exp(buf, out=buf)
    sums = buf.sum(axis=1)
    # log p_y from the log-sum-exp form: log of the probability itself would
    # underflow to -inf for very unlikely targets.
    logsum = xp.log(sums)
    w = xp.broadcast_to(xp.asarray(weights, dtype=x.dtype), (M,))
    buf *= (w / sums)[:, None]  # w * softmax(x)
    if label_smoothing:
        eps = float(label_smoothing)
        loss = -float(((1.0 - eps) * (shifted_y - logsum) + eps * (mean_shifted - logsum)) @ w)
        buf[rows, y] -= (1.0 - eps) * w
        buf -= (eps / V) * w[:, None]
    else:
        loss = -float((shifted_y - logsum) @ w)
        buf[rows, y] -= w
    return loss, buf


def temporal_softmax_loss(x, y, mask, label_smoothing=0.0):
    """Softmax cross-entropy summed over time and averaged over the minibatch.

    x: (N, T, V) scores; y: (N, T) target ids in [0, V); mask: (N, T) bool, which
    elements count. ``loss = -sum(mask * log softmax(x)[y]) / N``.

    With ``label_smoothing = eps`` the target distribution is (1 - eps) on y plus
    eps / V on every word (eps = 0 is the homework's loss).

    Returns the scalar loss and dx (N, T, V).
    """
    N, T, V = x.shape
    w = mask.reshape(N * T).astype(x.dtype) / N
    loss, dx = softmax_loss(x.reshape(N * T, V), y.reshape(N * T), w, label_smoothing)
    return loss, dx.reshape(N, T, V)


# ----------------------------------------------------------------------------------
# Dropout (inverted): used by the model when training with dropout > 0
# ----------------------------------------------------------------------------------

def dropout_mask(shape, p, rng, dtype, xp=np):
    """The mask ``dropout_forward`` multiplies by: 0 with probability p, else
    1/(1-p), as an array of ``dtype`` on ``xp``; None when p <= 0 (no draw).

    ``rng`` is a ``numpy.random.Generator``; the mask is drawn on the host so that
    runs are reproducible bit for bit whatever the device.
    """
    if p <= 0:
        return None
    dtype = np.dtype(dtype)
    keep = rng.random(shape) >= p
    return xp.asarray(keep.astype(dtype) / dtype.type(1.0 - p))


def dropout_forward(x, p, rng):
    """Inverted dropout: zero each element with probability p, scale the rest by
    1/(1-p) (see ``dropout_mask``).

    Returns out (shape of x) and the mask as cache.
    """
    mask = dropout_mask(x.shape, p, rng, x.dtype, get_array_module(x))
    return (x, None) if mask is None else (x * mask, mask)


def dropout_backward(dout, cache):
    """Backward of ``dropout_forward``."""
    return dout if cache is None else dout * cache


# ----------------------------------------------------------------------------------
# Soft attention (Show, Attend and Tell): the one copy of its math
# ----------------------------------------------------------------------------------
#
# Letters: L locations of the image's spatial map, D channels per location, A the
# attention size. For a query q (the attention part of h_{t-1} @ Wh + bh):
#
#     pre_i   = tanh(P_i + q)           P = a @ W_a, computed once per image (L, A)
#     e_i     = w . pre_i
#     alpha   = softmax(e)              over the L locations
#     z       = sum_i alpha_i a_i       the context (D,)
#
# The kernels take the queries of k hypotheses per image at once (rows grouped by
# image: rows m*k .. m*k+k-1 are image m), so that beam search attends to one copy of
# each image's map, not one per hypothesis; training is k = 1.

def soft_attention_forward(q, proj, a, w):
    """Additive attention of n = M*k queries over M images.

    q: (n, A) queries; proj: (M, L, A) projected annotations a @ W_a; a: (M, L, D)
    annotations; w: (A,). Rows m*k .. m*k+k-1 of q belong to image m.
    Returns (z (n, D) contexts, alpha (n, L) attention weights) and a cache.
    """
    xp = get_array_module(q, proj, a, w)
    M, Lc, A = proj.shape
    n = q.shape[0]
    if (n % M if M else n):
        raise ValueError(f"{n} queries cannot be grouped over {M} images")
    k = n // M if M else 1  # no images, no queries: an empty batch
    pre = proj[:, None, :, :] + q.reshape(M, k, 1, A)       # (M, k, L, A)
    xp.tanh(pre, out=pre)
    e = pre @ w                                              # (M, k, L)
    e -= e.max(axis=2, keepdims=True)
    alpha = xp.exp(e, out=e)
    alpha /= alpha.sum(axis=2, keepdims=True)
    z = alpha @ a                                            # (M, k, D), one copy of a
    return (z.reshape(n, a.shape[2]), alpha.reshape(n, Lc)), (alpha, pre, a, w)


def soft_attention_backward(dz, dalpha, cache, need_da=True):
    """Backward of ``soft_attention_forward``. dz: (n, D); dalpha: (n, L) upstream
    gradient of the weights themselves (the regulariser's), or None.

    Returns dq (n, A), dproj (M, L, A), da (M, L, D), dw (A,). ``need_da=False``
    leaves da out (None) for callers that form it later in one batched matmul.
    """
    alpha, pre, a, w = cache
    xp = get_array_module(dz, a)
    M, k, Lc = alpha.shape
    dz3 = dz.reshape(M, k, a.shape[2])
    dal = dz3 @ a.transpose(0, 2, 1)                         # (M, k, L): through z
    if dalpha is not None:
        dal += dalpha.reshape(M, k, Lc)
    # softmax: de = alpha * (dalpha - sum(alpha * dalpha))
    de = dal
    de -= (alpha * dal).sum(axis=2, keepdims=True)
    de *= alpha
    dw = de.reshape(1, -1) @ pre.reshape(-1, pre.shape[3])   # (1, A)
    dt = xp.multiply(pre, pre)                               # through tanh: 1 - pre^2
    xp.subtract(1.0, dt, out=dt)
    dt *= de[..., None]
    dt *= w
    dq = dt.sum(axis=2).reshape(M * k, -1)
    dproj = dt[:, 0] if k == 1 else dt.sum(axis=1)
    da = alpha.transpose(0, 2, 1) @ dz3 if need_da else None  # (M, L, D)
    return dq, dproj, da, dw.reshape(-1)


def _attention_cell_forward(xw, prev_h, prev_c, a, proj, Wz, Wh, bh, w):
    """One attention-LSTM step after the input matmul: the kernel that training and
    every decoder share.

    xw: (n, 4H) x_t @ Wx (lifted out of the time loop by the sequence layer);
    prev_h, prev_c: (n, H); a: (M, L, D); proj: (M, L, A); Wz: (D, 4H);
    Wh: (H, 4H + A + 1) and bh (4H + A + 1,): every map of h_{t-1} in ONE GEMM, its
    columns the LSTM gates (4H), the attention query (A) and the context gate (1).

        q = h_{t-1} @ Wh + bh;  z, alpha = attention(q[4H:4H+A]);
        beta = sigmoid(q[-1]);  gates = xw + q[:4H] + (beta * z) @ Wz;  LSTM cell.

    Returns next_h, next_c, alpha (n, L) and the kernel cache.
    """
    xp = get_array_module(xw, prev_h, Wh)
    H = prev_c.shape[1]
    q = prev_h @ Wh
    q += bh
    (z, alpha), att = soft_attention_forward(q[:, 4 * H:-1], proj, a, w)
    beta = _sigmoid_inplace(q[:, -1:].copy(), xp)            # (n, 1)
    zg = z * beta
    act = zg @ Wz
    act += xw
    act += q[:, :4 * H]
    next_h, next_c, cell = _lstm_cell_forward(act, prev_c)
    return next_h, next_c, alpha, (zg, z, beta, att, cell)


def _attention_cell_backward(dnext_h, dnext_c, dalpha, kcache, Wz, need_da=True, dcontext=None):
    """Backward of ``_attention_cell_forward`` up to its matmul inputs. dcontext: (n, D)
    upstream gradient of the gated context beta * z itself (a deep output layer
    reads it), or None.

    Returns dgates (n, 4H) (the gradient of xw), dq (n, 4H + A + 1) (of h_{t-1} @ Wh
    + bh), dprev_c (n, H), dproj (M, L, A), da (M, L, D) (None unless ``need_da``),
    dw (A,) and dz (n, D), the gradient of the context; the caller turns dgates and
    dq into input and weight gradients (one GEMM each).
    """
    zg, z, beta, att, cell = kcache
    xp = get_array_module(dnext_h, Wz)
    dgates, dprev_c = _lstm_cell_backward(dnext_h, dnext_c, cell)
    dzg = dgates @ Wz.T                                      # (n, D)
    if dcontext is not None:
        dzg += dcontext
    dbeta = (dzg * z).sum(axis=1, keepdims=True)
    dbeta *= beta * (1.0 - beta)                             # through the sigmoid
    dzg *= beta                                              # now dz
    dq_att, dproj, da, dw = soft_attention_backward(dzg, dalpha, att, need_da)
    dq = xp.concatenate([dgates, dq_att, dbeta], axis=1)
    return dgates, dq, dprev_c, dproj, da, dw, dzg


def attention_lstm_step_forward(x, prev_h, prev_c, a, proj, Wx, Wz, Wh, bh, w):
    """One step of the attention LSTM (see ``_attention_cell_forward``).

    x: (n, W) word vectors; prev_h, prev_c: (n, H); a: (M, L, D); proj: (M, L, A);
    Wx: (W, 4H); Wz: (D, 4H); Wh: (H, 4H + A + 1); bh: (4H + A + 1,); w: (A,).
    n = M*k: k hypotheses per image, rows grouped by image.
    Returns next_h (n, H), next_c (n, H), alpha (n, L) and a cache.
    """
    next_h, next_c, alpha, kc = _attention_cell_forward(x @ Wx, prev_h, prev_c, a, proj, Wz, Wh, bh, w)
    return next_h, next_c, alpha, (x, prev_h, Wx, Wz, Wh, kc)


def attention_lstm_step_backward(dnext_h, dnext_c, dalpha, cache, dcontext=None):
    """Backward of ``attention_lstm_step_forward``. dnext_h, dnext_c: (n, H); dalpha:
    (n, L) or None; dcontext: (n, D) gradient of the step's gated context
    (``attention_context``), or None.

    Returns dx, dprev_h, dprev_c, da, dproj, dWx, dWz, dWh, dbh, dw.
    """
    x, prev_h, Wx, Wz, Wh, kc = cache
    dgates, dq, dprev_c, dproj, da, dw, _ = _attention_cell_backward(dnext_h, dnext_c, dalpha, kc, Wz,
                                                                     dcontext=dcontext)
    zg = kc[0]
    return (dgates @ Wx.T, dq @ Wh.T, dprev_c, da, dproj, x.T @ dgates, zg.T @ dgates,
            prev_h.T @ dq, dq.sum(axis=0), dw)


def attention_lstm_forward(x, a, proj, h0, c0, Wx, Wz, Wh, bh, w, lengths=None):
    """The attention LSTM over whole sequences (training), one image per sequence.

    x: (N, T, W); a: (N, L, D); proj: (N, L, A); h0, c0: (N, H); weights as for
    ``attention_lstm_step_forward``. lengths: optional (N,) ints in [0, T], as for
    ``rnn_forward``: steps past a sequence's end are skipped (their h and alpha are 0).

    ``x @ Wx`` is one GEMM before the loop; the sequences run packed, longest first
    (``_Packing``), so step t works on the first n_t images of the sorted batch.
    Returns h (N, T, H), alpha (N, T, L) and a cache.
    """
    xp = get_array_module(x, a, h0, Wx)
    N, T, _ = x.shape
    H, Lc = h0.shape[1], a.shape[1]
    pk = _pack(lengths, N, T, xp)
    xs = x.reshape(N * T, -1)[pk.idx]
    xw = xs @ Wx                                             # (P, 4H)
    if pk.order is not None:
        a, proj, h0, c0 = a[pk.order], proj[pk.order], h0[pk.order], c0[pk.order]
    P, dtype = xw.shape[0], xw.dtype
    hs, cs, hprev = (xp.empty((P, H), dtype=dtype) for _ in range(3))
    alphas = xp.empty((P, Lc), dtype=dtype)
    kcaches = []
    prev = None
    for off, n in pk.blocks:
        blk = slice(off, off + n)
        hprev[blk] = h0[:n] if prev is None else hs[prev:prev + n]
        prev_c = c0[:n] if prev is None else cs[prev:prev + n]
        hs[blk], cs[blk], alphas[blk], kc = _attention_cell_forward(
            xw[blk], hprev[blk], prev_c, a[:n], proj[:n], Wz, Wh, bh, w)
        kcaches.append(kc)
        prev = off
    h = (xp.empty if pk.full else xp.zeros)((N * T, H), dtype=dtype)
    h[pk.idx] = hs
    alpha = (xp.empty if pk.full else xp.zeros)((N * T, Lc), dtype=dtype)
    alpha[pk.idx] = alphas
    cache = (pk, xs, hprev, a, Wx, Wz, Wh, kcaches, proj.shape, (N, T))
    return h.reshape(N, T, H), alpha.reshape(N, T, Lc), cache


def deep_output_forward(x, h, z, Wox, Woh, Woz, bo):
    """The deep output layer of Show, Attend and Tell (its eq. 7, with the tanh of the
    authors' code) between the attention LSTM and the vocabulary projection:

        o = tanh(x @ Wox + h @ Woh + z @ Woz + bo)

    so that the next word is read from the word just fed in, the state and the
    context together, not from h alone. x: (n, W) word vectors; h: (n, H) states;
    z: (n, D) gated contexts (``attention_context``); Wox (W, E), Woh (H, E),
    Woz (D, E), bo (E,). Returns o (n, E) and a cache.
    """
    xp = get_array_module(x, h, Woh)
    o = x @ Wox
    o += h @ Woh
    o += z @ Woz
    o += bo
    xp.tanh(o, out=o)
    return o, (x, h, z, Wox, Woh, Woz, o)


def deep_output_backward(do, cache):
    """Backward of ``deep_output_forward``. do: (n, E).
    Returns dx (n, W), dh (n, H), dz (n, D), dWox, dWoh, dWoz, dbo."""
    x, h, z, Wox, Woh, Woz, o = cache
    da = do * (1.0 - o * o)                                  # through the tanh
    return (da @ Wox.T, da @ Woh.T, da @ Woz.T, x.T @ da, h.T @ da, z.T @ da, da.sum(axis=0))


def attention_context(cache):
    """The gated context beta_t * z_t that entered the gates, from the cache of
    ``attention_lstm_step_forward`` ((n, D)) or ``attention_lstm_forward`` ((N, T, D),
    0 past a sequence's end): what a deep output layer reads besides h_t and x_t."""
    if len(cache) == 6:                                      # one step
        return cache[5][0]
    pk, xs, hprev, a, Wx, Wz, Wh, kcaches, proj_shape, (N, T) = cache
    xp = get_array_module(hprev)
    out = (xp.empty if pk.full else xp.zeros)((N * T, a.shape[2]), dtype=hprev.dtype)
    if kcaches:
        out[pk.idx] = xp.concatenate([kc[0] for kc in kcaches], axis=0)
    return out.reshape(N, T, a.shape[2])


def attention_lstm_backward(dh, dalpha, cache, dcontext=None):
    """Backward of ``attention_lstm_forward``. dh: (N, T, H); dalpha: (N, T, L) or None;
    dcontext: (N, T, D) gradient of the gated contexts (``attention_context``), or None.

    The loop carries dh_{t-1} and dc_{t-1} and accumulates dproj; dx, dWx, dWz, dWh,
    dbh and da (sum_t alpha_t dz_t^T, a batched matmul over T) are formed after it.
    Returns dx (N, T, W), da (N, L, D), dproj (N, L, A), dh0 (N, H), dc0 (N, H),
    dWx, dWz, dWh, dbh, dw.
    """
    pk, xs, hprev, a, Wx, Wz, Wh, kcaches, proj_shape, _ = cache
    xp = get_array_module(dh, Wx)
    N, T, H = dh.shape
    Lc, D = a.shape[1], a.shape[2]
    dtype = hprev.dtype
    dhs = dh.reshape(N * T, H)[pk.idx]
    dal = None if dalpha is None else dalpha.reshape(N * T, Lc)[pk.idx].astype(dtype, copy=False)
    dzc = None if dcontext is None else dcontext.reshape(N * T, D)[pk.idx].astype(dtype, copy=False)
    P = dhs.shape[0]
    dgates_all = xp.empty((P, 4 * H), dtype=dtype)
    dq_all = xp.empty((P, Wh.shape[1]), dtype=dtype)
    zgs, dzs = xp.empty((P, D), dtype=dtype), xp.empty((P, D), dtype=dtype)
    alphas = xp.empty((P, Lc), dtype=dtype)
    dproj = xp.zeros(proj_shape, dtype=dtype)
    dw = xp.zeros(Wh.shape[1] - 4 * H - 1, dtype=dtype)
    dprev_h = xp.zeros((N, H), dtype=dtype)
    dc = xp.zeros((N, H), dtype=dtype)
    WhT = Wh.T
    for t in range(len(pk.blocks) - 1, -1, -1):
        off, n = pk.blocks[t]
        blk = slice(off, off + n)
        dh_t = dhs[blk] + dprev_h[:n]
        kc = kcaches[t]
        dg, dq, dc_prev, dproj_t, _, dw_t, dz = _attention_cell_backward(
            dh_t, dc[:n], None if dal is None else dal[blk], kc, Wz, need_da=False,
            dcontext=None if dzc is None else dzc[blk])
        dgates_all[blk], dq_all[blk], zgs[blk], dzs[blk] = dg, dq, kc[0], dz
        alphas[blk] = kc[3][0].reshape(n, Lc)
        dproj[:n] += dproj_t
        dw += dw_t
        xp.matmul(dq, WhT, out=dprev_h[:n])
        dc[:n] = dc_prev
    dx = (xp.empty if pk.full else xp.zeros)((N * T, xs.shape[1]), dtype=dtype)
    dx[pk.idx] = dgates_all @ Wx.T
    dWx = xs.T @ dgates_all
    dWz = zgs.T @ dgates_all
    dWh = hprev.T @ dq_all
    dbh = dq_all.sum(axis=0)
    # da_n = sum_t alpha_nt dz_nt^T: (N, L, T) @ (N, T, D), steps past the end zero.
    alpha_full = (xp.empty if pk.full else xp.zeros)((N * T, Lc), dtype=dtype)
    alpha_full[pk.idx] = alphas
    dz_full = (xp.empty if pk.full else xp.zeros)((N * T, D), dtype=dtype)
    dz_full[pk.idx] = dzs
    da = alpha_full.reshape(N, T, Lc).transpose(0, 2, 1) @ dz_full.reshape(N, T, D)
    if pk.order is not None:  # dproj, dh0 and dc0 back to the batch's order
        inv = xp.empty_like(pk.order)
        inv[pk.order] = xp.arange(N)
        dproj, dprev_h, dc = dproj[inv], dprev_h[inv], dc[inv]
    return dx.reshape(N, T, -1), da, dproj, dprev_h, dc, dWx, dWz, dWh, dbh, dw
