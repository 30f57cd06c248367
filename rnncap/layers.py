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
``dWh`` are one GEMM each after it.
"""
from __future__ import annotations

from .backend import get_array_module


# ----------------------------------------------------------------------------------
# Dense layers
# ----------------------------------------------------------------------------------

def affine_forward(x, w, b):
    """Fully connected layer: ``out = x @ w + b``.

    x: (N, D) (or (N, d1, ..., dk), flattened to D = d1*...*dk); w: (D, M); b: (M,).
    Returns out (N, M) and a cache for the backward pass.
    """
    x2 = x.reshape(x.shape[0], -1)
    out = x2 @ w
    out += b
    return out, (x, w)


def affine_backward(dout, cache):
    """Backward of ``affine_forward``. dout: (N, M). Returns dx (shape of x), dw, db."""
    x, w = cache
    x2 = x.reshape(x.shape[0], -1)
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
    """Numerically stable logistic sigmoid, written into ``a``.

    sigmoid(z) = (1 + tanh(z/2)) / 2 never overflows (unlike 1/(1+exp(-z)) for very
    negative z) and costs one transcendental per element.
    """
    a *= 0.5
    xp.tanh(a, out=a)
    a += 1.0
    a *= 0.5
    return a


def _rnn_cell_forward(a):
    """tanh cell. a: (N, H) pre-activation (owned by the caller, overwritten)."""
    xp = get_array_module(a)
    return xp.tanh(a, out=a)


def _rnn_cell_backward(dnext_h, next_h):
    """Gradient with respect to the pre-activation: dnext_h * (1 - next_h**2)."""
    return dnext_h * (1.0 - next_h * next_h)


def _lstm_cell_forward(a, prev_c):
    """LSTM gates. a: (N, 4H) pre-activation ordered i, f, o, g (overwritten in place
    with the gate activations); prev_c: (N, H).

    Returns next_h, next_c and the cell cache (act, prev_c, tanh(next_c)).
    """
    xp = get_array_module(a, prev_c)
    H = a.shape[1] // 4
    act = a
    _sigmoid_inplace(act[:, :3 * H], xp)
    xp.tanh(act[:, 3 * H:], out=act[:, 3 * H:])
    i, f, o, g = act[:, :H], act[:, H:2 * H], act[:, 2 * H:3 * H], act[:, 3 * H:]
    next_c = f * prev_c
    next_c += i * g
    tanh_c = xp.tanh(next_c)
    next_h = o * tanh_c
    return next_h, next_c, (act, prev_c, tanh_c)


def _lstm_cell_backward(dnext_h, dnext_c, cell_cache):
    """Backward of ``_lstm_cell_forward``. Returns da (N, 4H) and dprev_c (N, H)."""
    act, prev_c, tanh_c = cell_cache
    xp = get_array_module(act)
    H = act.shape[1] // 4
    i, f, o, g = act[:, :H], act[:, H:2 * H], act[:, 2 * H:3 * H], act[:, 3 * H:]
    # dc = dnext_c + dnext_h * o * (1 - tanh_c**2)
    dc = tanh_c * tanh_c
    dc -= 1.0
    dc *= o
    dc *= dnext_h
    xp.subtract(dnext_c, dc, out=dc)
    da = xp.empty_like(act)
    xp.multiply(dc, g, out=da[:, :H])              # d i
    xp.multiply(dc, prev_c, out=da[:, H:2 * H])    # d f
    xp.multiply(dnext_h, tanh_c, out=da[:, 2 * H:3 * H])  # d o
    xp.multiply(dc, i, out=da[:, 3 * H:])          # d g
    # Through the nonlinearities: sigmoid' = s(1-s), tanh' = 1-t^2.
    s = act[:, :3 * H]
    da[:, :3 * H] *= s * (1.0 - s)
    da[:, 3 * H:] *= 1.0 - g * g
    dprev_c = dc * f
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


def _recurrent_forward(x, h0, Wx, Wh, b, cell_forward, c0=None):
    """Shared time loop of the RNN and LSTM sequence layers.

    ``x @ Wx + b`` for every step is one GEMM; only ``prev_h @ Wh`` and the cell
    kernel stay inside the loop. Works time-major internally so each step reads and
    writes contiguous (N, ·) blocks.
    """
    xp = get_array_module(x, h0, Wx, Wh, b)
    N, T, D = x.shape
    H = h0.shape[1]
    xt = xp.ascontiguousarray(x.transpose(1, 0, 2))            # (T, N, D)
    xa = (xt.reshape(T * N, D) @ Wx).reshape(T, N, -1)          # (T, N, kH)
    xa += b
    hs = xp.empty((T, N, H), dtype=xa.dtype)
    cells = []
    prev_h, prev_c = h0, c0
    for t in range(T):
        a = xa[t]
        a += prev_h @ Wh          # xa is our own buffer: a[t] becomes the activation
        if c0 is None:
            prev_h = cell_forward(a)
            cells.append(None)
        else:
            prev_h, prev_c, cell = cell_forward(a, prev_c)
            cells.append(cell)
        hs[t] = prev_h
    return hs, xt, xa, cells


def _recurrent_backward(dh, xt, h0, hs, Wx, Wh, cell_backward):
    """Shared backward time loop. ``cell_backward(dh_t, t)`` returns da_t (N, kH).

    The loop only carries dprev_h through ``da @ Wh.T``; dx, dWx and dWh are one GEMM
    each over all steps afterwards.
    """
    xp = get_array_module(dh, Wx)
    T, N, D = xt.shape
    H = h0.shape[1]
    kH = Wh.shape[1]
    da_all = xp.empty((T, N, kH), dtype=hs.dtype)
    dht = dh.transpose(1, 0, 2)
    dprev_h = xp.zeros_like(h0, dtype=hs.dtype)
    for t in range(T - 1, -1, -1):
        cur = dht[t] + dprev_h
        da = cell_backward(cur, t)
        da_all[t] = da
        dprev_h = da @ Wh.T
    da2 = da_all.reshape(T * N, kH)
    dx = (da2 @ Wx.T).reshape(T, N, D).transpose(1, 0, 2)
    dWx = xt.reshape(T * N, D).T @ da2
    # h_{t-1} for every step: h0 followed by hs[:-1].
    dWh = h0.T @ da_all[0]
    if T > 1:
        dWh += hs[:-1].reshape((T - 1) * N, H).T @ da_all[1:].reshape((T - 1) * N, kH)
    db = da2.sum(axis=0)
    return xp.ascontiguousarray(dx), dprev_h, dWx, dWh, db


def rnn_forward(x, h0, Wx, Wh, b):
    """A tanh RNN over a whole sequence.

    x: (N, T, D); h0: (N, H); Wx: (D, H); Wh: (H, H); b: (H,).
    Returns h (N, T, H), the hidden state at every step (h0 not included), and a cache.
    """
    hs, xt, _, _ = _recurrent_forward(x, h0, Wx, Wh, b, _rnn_cell_forward)
    h = hs.transpose(1, 0, 2)
    return get_array_module(h).ascontiguousarray(h), (xt, h0, hs, Wx, Wh)


def rnn_backward(dh, cache):
    """Backward of ``rnn_forward``. dh: (N, T, H), upstream gradient of every h.

    Returns dx (N, T, D), dh0 (N, H), dWx (D, H), dWh (H, H), db (H,).
    """
    xt, h0, hs, Wx, Wh = cache
    return _recurrent_backward(dh, xt, h0, hs, Wx, Wh,
                               lambda dh_t, t: _rnn_cell_backward(dh_t, hs[t]))


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


def lstm_forward(x, h0, Wx, Wh, b):
    """An LSTM over a whole sequence, with the initial cell state c0 = 0.

    x: (N, T, D); h0: (N, H); Wx: (D, 4H); Wh: (H, 4H); b: (4H,).
    Returns h (N, T, H) (h0 not included) and a cache.
    """
    xp = get_array_module(x, h0)
    c0 = xp.zeros(h0.shape, dtype=xp.result_type(x, h0, Wx))
    hs, xt, _, cells = _recurrent_forward(x, h0, Wx, Wh, b, _lstm_cell_forward, c0=c0)
    h = xp.ascontiguousarray(hs.transpose(1, 0, 2))
    return h, (xt, h0, hs, Wx, Wh, cells)


def lstm_backward(dh, cache):
    """Backward of ``lstm_forward``. dh: (N, T, H).

    Returns dx (N, T, D), dh0 (N, H), dWx (D, 4H), dWh (H, 4H), db (4H,).
    """
    xt, h0, hs, Wx, Wh, cells = cache
    xp = get_array_module(dh)
    dc = [xp.zeros(h0.shape, dtype=hs.dtype)]  # carried dnext_c, newest last

    def cell_backward(dh_t, t):
        da, dprev_c = _lstm_cell_backward(dh_t, dc[0], cells[t])
        dc[0] = dprev_c
        return da

    return _recurrent_backward(dh, xt, h0, hs, Wx, Wh, cell_backward)


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


def temporal_softmax_loss(x, y, mask, label_smoothing=0.0):
    """Softmax cross-entropy summed over time and averaged over the minibatch.

    x: (N, T, V) scores; y: (N, T) target ids in [0, V); mask: (N, T) bool, which
    elements count. ``loss = -sum(mask * log softmax(x)[y]) / N``.

    With ``label_smoothing = eps`` the target distribution is (1 - eps) on y plus
    eps / V on every word (eps = 0 is the homework's loss).

    Returns the scalar loss and dx (N, T, V).
    """
    xp = get_array_module(x)
    N, T, V = x.shape
    x2 = x.reshape(N * T, V)
    y2 = y.reshape(N * T)
    m2 = mask.reshape(N * T)
    # One (N*T, V) buffer holds shifted scores, then probabilities, then dx.
    shifted = x2 - x2.max(axis=1, keepdims=True)
    buf = xp.exp(shifted)
    sums = buf.sum(axis=1, keepdims=True)
    buf /= sums
    rows = xp.arange(N * T)
    # log p_y from the log-sum-exp form: log of the probability itself would
    # underflow to -inf for very unlikely targets.
    logsum = xp.log(sums[:, 0])
    logp_y = shifted[rows, y2] - logsum
    w = m2.astype(x.dtype) / N
    if label_smoothing:
        eps = float(label_smoothing)
        mean_logp = shifted.mean(axis=1) - logsum
        loss = -float(((1.0 - eps) * logp_y + eps * mean_logp) @ w)
        buf[rows, y2] -= 1.0 - eps
        buf -= eps / V
    else:
        loss = -float(logp_y @ w)
        buf[rows, y2] -= 1.0
    buf *= w[:, None]
    return loss, buf.reshape(N, T, V)


# ----------------------------------------------------------------------------------
# Dropout (inverted): used by the model when training with dropout > 0
# ----------------------------------------------------------------------------------

def dropout_forward(x, p, rng):
    """Inverted dropout: zero each element with probability p, scale the rest by
    1/(1-p). ``rng`` is a ``numpy.random.Generator``; the mask is drawn on the host so
    that runs are reproducible bit for bit whatever the device.

    Returns out (shape of x) and the mask as cache.
    """
    xp = get_array_module(x)
    if p <= 0:
        return x, None
    keep = rng.random(x.shape) >= p
    mask = xp.asarray(keep.astype(x.dtype) / x.dtype.type(1.0 - p))
    return x * mask, mask


def dropout_backward(dout, cache):
    """Backward of ``dropout_forward``."""
    return dout if cache is None else dout * cache
