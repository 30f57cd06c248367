"""Model tests: parameters, numerical gradients of every parameter for both cells
(also with dropout and label smoothing), purity, dtype, the initial loss, greedy
sampling, argument errors, the array backends, and a small memorisation run.
"""
from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from gradcheck import check_gradients, rel_error
from rnncap.models import layers as L
from rnncap.backend import to_device, to_numpy
from rnncap.models.model import CaptioningModel

NULL, START, END = 0, 1, 2
CELLS = ["rnn", "lstm"]


def small_model(cell, dtype=np.float64, seed=0, jitter=0.1, **kw):
    """V=11, D=6, W=4, H=5. ``jitter`` moves every parameter (biases included) off
    the initialisation so that no gradient is zero by construction."""
    m = CaptioningModel(11, 6, 4, 5, cell_type=cell, dtype=dtype, seed=seed, **kw)
    r = np.random.default_rng(seed + 100)
    for k, v in m.params.items():
        m.params[k] = (v + jitter * r.standard_normal(v.shape)).astype(dtype)
    return m


def small_batch(seed=1, N=3, T=5, V=11, D=6):
    """Features (N, D) and captions (N, T+1): <START>, words, <END>, then <NULL>s of
    different lengths (one caption fills the whole row, one is very short)."""
    r = np.random.default_rng(seed)
    feats = r.standard_normal((N, D))
    caps = np.full((N, T + 1), NULL, dtype=np.int64)
    lengths = [T - 1, 1] + list(r.integers(1, T, size=N - 2))
    for i, n in enumerate(lengths[:N]):
        caps[i, 0] = START
        caps[i, 1:n + 1] = r.integers(3, V, size=n)
        caps[i, n + 1] = END
    return feats, caps


def copy_model(m, xp):
    """The same model with its parameters on the backend ``xp`` (fresh copies)."""
    c = CaptioningModel(**{**m.config(), "dtype": m.dtype})
    c.params = {k: to_device(v.copy(), xp) for k, v in m.params.items()}
    return c


# ----------------------------------------------------------------------------------
# Parameters and dtype
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", CELLS)
def test_params_names_shapes_and_dtype(cell, dtype):
    V, D, W, H = 11, 9, 5, 4
    k = 4 if cell == "lstm" else 1
    m = CaptioningModel(V, D, W, H, cell_type=cell, dtype=dtype, seed=0)
    expected = {"W_proj": (D, H), "b_proj": (H,), "W_embed": (V, W), "Wx": (W, k * H),
                "Wh": (H, k * H), "b": (k * H,), "W_vocab": (H, V), "b_vocab": (V,)}
    assert {k: v.shape for k, v in m.params.items()} == expected
    assert all(v.dtype == dtype for v in m.params.values())

    feats, caps = small_batch(V=V, D=D)
    loss, grads = m.loss(feats, caps)
    assert isinstance(loss, float) and math.isfinite(loss)
    assert set(grads) == set(expected)
    for name, g in grads.items():
        assert g.shape == expected[name] and g.dtype == dtype, name
    state = m.init_state(feats)
    assert len(state) == (2 if cell == "lstm" else 1)
    assert all(s.shape == (3, H) and s.dtype == dtype for s in state)
    scores, state = m.step(np.full(3, START), state)
    assert scores.shape == (3, V) and scores.dtype == dtype
    assert all(s.dtype == dtype for s in state)


def test_same_seed_same_parameters_and_float32_matches_float64():
    a = CaptioningModel(20, 8, 6, 5, cell_type="lstm", seed=3, dtype=np.float64)
    b = CaptioningModel(20, 8, 6, 5, cell_type="lstm", seed=3, dtype=np.float32)
    for k in a.params:
        np.testing.assert_allclose(b.params[k], a.params[k], rtol=1e-6, atol=1e-7)
    feats, caps = small_batch(V=20, D=8)
    la, _ = a.loss(feats, caps)
    lb, _ = b.loss(feats, caps)
    assert lb == pytest.approx(la, rel=1e-5)
    c = CaptioningModel(20, 8, 6, 5, cell_type="lstm", seed=4, dtype=np.float64)
    assert not np.allclose(c.params["Wx"], a.params["Wx"])


# ----------------------------------------------------------------------------------
# Numerical gradients of every parameter
# ----------------------------------------------------------------------------------

CONFIGS = {"plain": {}, "dropout": {"dropout": 0.3}, "smoothing": {"label_smoothing": 0.1}}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("cell", CELLS)
def test_model_gradients(cell, config, xp):
    """Analytic gradients (on ``xp``) against centred differences of the host loss.
    With dropout the generator is reset before every evaluation, so every loss
    sees the same masks."""
    host = small_model(cell, **CONFIGS[config])
    dev = copy_model(host, xp)
    feats, caps = small_batch()

    def loss_of(m):
        m.rng = np.random.default_rng(1234)
        return m.loss(feats, caps)

    loss_dev, grads_dev = loss_of(dev)
    loss_host, grads_host = loss_of(host)
    assert loss_dev == pytest.approx(loss_host, rel=1e-12)
    grads = {k: to_numpy(g) for k, g in grads_dev.items()}
    for k in grads:
        assert rel_error(grads[k], grads_host[k]) < 1e-12, k
    check_gradients(lambda: loss_of(host)[0], host.params, grads)


def test_dropout_changes_the_loss_only_in_training():
    feats, caps = small_batch()
    plain = small_model("lstm")
    drop = small_model("lstm", dropout=0.5)
    l_plain, _ = plain.loss(feats, caps, train=False)
    l_eval, _ = drop.loss(feats, caps, train=False)
    assert l_eval == l_plain
    drop.rng = np.random.default_rng(0)
    l_train, _ = drop.loss(feats, caps, train=True)
    assert l_train != pytest.approx(l_plain, rel=1e-3)


# ----------------------------------------------------------------------------------
# Purity and backends
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cell", CELLS)
def test_loss_never_writes_into_inputs_or_params(cell):
    m = small_model(cell, dropout=0.2)
    feats, caps = small_batch()
    copies = (feats.copy(), caps.copy(), {k: v.copy() for k, v in m.params.items()})
    m.loss(feats, caps)
    m.sample(feats, max_length=5)
    np.testing.assert_array_equal(feats, copies[0])
    np.testing.assert_array_equal(caps, copies[1])
    for k, v in copies[2].items():
        np.testing.assert_array_equal(m.params[k], v, err_msg=k)


@pytest.mark.parametrize("cell", CELLS)
def test_results_survive_later_calls(cell):
    """Gradients, states and scores handed out stay valid after further calls (a
    beam search keeps old states): no buffer is reused across calls."""
    m = small_model(cell)
    feats, caps = small_batch(seed=1)
    feats2, caps2 = small_batch(seed=2)
    loss, grads = m.loss(feats, caps)
    kept = {k: g.copy() for k, g in grads.items()}
    m.loss(feats2, caps2)
    for k, g in grads.items():
        np.testing.assert_array_equal(g, kept[k], err_msg=k)

    state0 = m.init_state(feats)
    state0_kept = [s.copy() for s in state0]
    scores1, state1 = m.step(np.full(3, START), state0)
    kept1 = [scores1.copy()] + [s.copy() for s in state1]
    scores2, state2 = m.step(np.array([4, 5, 6]), state0)  # branch from state0 again
    m.step(np.array([7, 8, 9]), state2)
    for a, b in zip([scores1, *state1], kept1):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(state0, state0_kept):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", CELLS)
def test_loss_and_sample_on_backend_match_numpy(cell, dtype, xp, device):
    host = CaptioningModel(30, 7, 5, 6, cell_type=cell, dtype=dtype, seed=2)
    dev = CaptioningModel(30, 7, 5, 6, cell_type=cell, dtype=dtype, seed=2).to(device)
    assert dev.xp is xp
    feats, caps = small_batch(V=30, D=7)
    lh, gh = host.loss(feats, caps)
    ld, gd = dev.loss(feats, caps)
    tol = 1e-4 if dtype == np.float32 else 1e-11
    assert ld == pytest.approx(lh, rel=tol)
    for k in gh:
        np.testing.assert_allclose(to_numpy(gd[k]), gh[k], rtol=tol, atol=tol, err_msg=k)
    np.testing.assert_array_equal(dev.sample(feats, max_length=6),
                                  host.sample(feats, max_length=6))


# ----------------------------------------------------------------------------------
# Initial loss
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cell", CELLS)
def test_initial_loss_is_about_log_V_per_word(cell):
    """A fresh model knows nothing: each unmasked target costs about ln V, so the
    loss (summed over time, averaged over captions) is ~ (tokens per caption) ln V."""
    V, D, N, T = 1000, 64, 30, 12
    m = CaptioningModel(V, D, 32, 64, cell_type=cell, dtype=np.float64, seed=0)
    r = np.random.default_rng(0)
    feats = r.standard_normal((N, D))
    caps = r.integers(3, V, size=(N, T + 1))
    caps[:, 0] = START
    for i, n in enumerate(r.integers(2, T, size=N)):  # pad the tails with <NULL>
        caps[i, n + 1:] = NULL
    tokens_per_caption = np.count_nonzero(caps[:, 1:] != NULL) / N
    expected = tokens_per_caption * math.log(V)
    loss, _ = m.loss(feats, caps)
    print(f"\n{cell}: initial loss {loss:.2f}, (tokens per caption) ln V = {expected:.2f}")
    assert abs(loss - expected) <= 0.10 * expected, (loss, expected)
    # The mask matters: counting the <NULL> targets too would be far off.
    assert abs(loss - T * math.log(V)) > 0.10 * expected


# ----------------------------------------------------------------------------------
# Greedy sampling
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cell", CELLS)
def test_sample_follows_the_training_forward(cell):
    """Each sampled word is the argmax of the scores the *training* forward pass
    gives for the sampled prefix (fed from <START>), up to and including <END>; after
    <END> comes only <NULL>."""
    N, max_len = 8, 8
    m = small_model(cell, jitter=0.5, seed=5)
    feats = np.random.default_rng(6).standard_normal((N, 6)) * 2
    # Raise the <END> bias until some, but not all, captions stop early: both the
    # <END> and the no-<END> paths get checked.
    for _ in range(25):
        s = m.sample(feats, max_length=max_len)
        if 0 < (s == END).any(axis=1).sum() < N:
            break
        m.params["b_vocab"][END] += 0.25
    assert s.shape == (N, max_len) and s.dtype.kind == "i"

    ended = 0
    for i in range(N):
        row = s[i]
        hits = np.flatnonzero(row == END)
        n = hits[0] + 1 if hits.size else max_len  # words up to and including <END>
        ended += bool(hits.size)
        assert (row[n:] == NULL).all()
        # Teacher-force <START> + the sampled prefix through the sequence layers.
        caps = np.concatenate([[START], row[:n]])[None, :]
        scores = _training_scores(m, feats[i:i + 1], caps)
        np.testing.assert_array_equal(scores.argmax(axis=-1)[0], row[:n])
    assert 0 < ended < N, f"{ended} of {N} captions ended: no bias split them"


def _training_scores(m, feats, caps):
    """Scores of the training forward, rebuilt from the layers the loss uses."""
    p = m.params
    h0, _ = L.affine_forward(feats, p["W_proj"], p["b_proj"])
    x, _ = L.word_embedding_forward(caps[:, :-1], p["W_embed"])
    fwd = L.lstm_forward if m.cell_type == "lstm" else L.rnn_forward
    h, _ = fwd(x, h0, p["Wx"], p["Wh"], p["b"])
    scores, _ = L.temporal_affine_forward(h, p["W_vocab"], p["b_vocab"])
    return scores


@pytest.mark.parametrize("cell", CELLS)
def test_sample_pads_null_after_immediate_end(cell):
    m = small_model(cell)
    m.params["b_vocab"][END] = 100.0  # <END> wins at every step
    s = m.sample(np.ones((2, 6)), max_length=5)
    np.testing.assert_array_equal(s, [[END, NULL, NULL, NULL, NULL]] * 2)


def test_sample_rejects_bad_max_length():
    with pytest.raises(ValueError):
        small_model("rnn").sample(np.ones((1, 6)), max_length=0)


# ----------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"cell_type": "gru"}, {"vocab_size": 0}, {"hidden_dim": -1}, {"dropout": 1.0},
    {"dropout": -0.1}, {"label_smoothing": 1.0},
])
def test_constructor_rejects_bad_arguments(kwargs):
    args = {"vocab_size": 10, "input_dim": 4, "wordvec_dim": 3, "hidden_dim": 5, **kwargs}
    with pytest.raises(ValueError):
        CaptioningModel(**args)


@pytest.mark.parametrize("feats_shape,caps_shape", [
    ((3, 7), (3, 5)),      # wrong feature size
    ((3,), (3, 5)),        # features not 2-D
    ((3, 6), (2, 5)),      # batch sizes differ
    ((3, 6), (3, 1)),      # no target word
    ((3, 6), (3,)),        # captions not 2-D
])
def test_loss_rejects_bad_shapes(feats_shape, caps_shape):
    m = small_model("lstm")
    with pytest.raises(ValueError):
        m.loss(np.zeros(feats_shape), np.ones(caps_shape, dtype=np.int64))


def test_init_state_rejects_bad_feature_size():
    with pytest.raises(ValueError, match="features"):
        small_model("rnn").init_state(np.zeros((2, 7)))


# ----------------------------------------------------------------------------------
# Learning: memorise 50 captions
# ----------------------------------------------------------------------------------

def _one_blas_thread():
    """On a small machine shared with other jobs, OpenBLAS threads that spin while
    waiting for a core made the memorisation test 4-5x slower (70 s against 15 s,
    2 cores, load ~8). threadpoolctl is optional; without it nothing changes."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _adam():
    """The project's Adam when it exists; else a local one with the same contract."""
    try:
        from rnncap.training.optim import adam
        return adam
    except ImportError:  # pragma: no cover - only before rnncap.training.optim existed
        def adam(w, dw, state, lr, beta1=0.9, beta2=0.999, eps=1e-8):
            t = state.get("t", 0) + 1
            m = beta1 * state.get("m", 0.0) + (1 - beta1) * dw
            v = beta2 * state.get("v", 0.0) + (1 - beta2) * dw * dw
            mh, vh = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
            return (w - lr * mh / (np.sqrt(vh) + eps)).astype(w.dtype), {"m": m, "v": v, "t": t}
        return adam


def fifty_captions(r, V, N=50):
    """N random captions of 4-8 words (ids 3 .. V-1) for a memorisation test:
    (lengths (N,), captions (N, longest + 2) with <START>, <END> and <NULL> padding)."""
    lengths = r.integers(4, 9, size=N)
    caps = np.full((N, lengths.max() + 2), NULL, dtype=np.int64)
    for i, n in enumerate(lengths):
        caps[i, 0], caps[i, n + 1] = START, END
        caps[i, 1:n + 1] = r.integers(3, V, size=n)
    return lengths, caps


def memorise(model, feats, caps, lengths, lr, max_iters, target, name):
    """Adam on the whole batch until the teacher-forced loss falls under ``target``
    (at most ``max_iters`` updates); then greedy sampling must give back every caption
    exactly (ids up to and including <END>, <NULL> after)."""
    adam, states = _adam(), {k: {} for k in model.params}
    start = time.perf_counter()
    history = []
    with _one_blas_thread():
        for _ in range(max_iters):
            loss, grads = model.loss(feats, caps)
            history.append(loss)
            if loss < target:
                break
            for k in model.params:
                model.params[k], states[k] = adam(model.params[k], grads[k], states[k], lr=lr)
        sampled = model.sample(feats, max_length=caps.shape[1] - 1)
    assert history[-1] < target, (f"{name}: loss {history[-1]:.3f} after {len(history)} "
                                  f"iterations (start {history[0]:.2f})")
    for i, n in enumerate(lengths):
        np.testing.assert_array_equal(sampled[i, :n + 1], caps[i, 1:n + 2], err_msg=f"caption {i}")
        assert (sampled[i, n + 1:] == NULL).all()
    print(f"\n{name}: loss {history[0]:.2f} -> {history[-1]:.3f} in {len(history)} "
          f"iterations, {time.perf_counter() - start:.1f} s")


@pytest.mark.parametrize("cell,target,max_iters", [("rnn", 0.1, 60), ("lstm", 0.5, 120)])
def test_memorises_fifty_captions(cell, target, max_iters):
    """50 random captions (4-8 words, V = 1000) for 50 random feature vectors; H=512,
    W=256, Adam lr 5e-3, float32. The teacher-forced loss must fall under the target
    within max_iters, and greedy sampling must then give back every caption exactly
    (ids up to and including <END>)."""
    V, D, W, H, N = 1000, 128, 256, 512, 50
    r = np.random.default_rng(0)
    feats = r.standard_normal((N, D)).astype(np.float32)
    lengths, caps = fifty_captions(r, V, N)
    model = CaptioningModel(V, D, W, H, cell_type=cell, dtype=np.float32, seed=0)
    memorise(model, feats, caps, lengths, 5e-3, max_iters, target, cell)


def test_overlapping_blas_limits_from_threads_restore_the_setting():
    """Threads that enter and leave the one-thread BLAS limit in any order (a server's
    workers, in-process ranks): each runs limited throughout, and the process gets its
    setting back when the last one leaves. "A in, B in, A out, B out" with a limit per
    thread left B unlimited after A left, then the process at 1 thread for good (the
    sharded SCST tests skipped after the distributed ones). In a fresh process: this
    OpenBLAS ignores a thread count set from another thread once the main thread has
    set one, and a raise from one thread while the thread that lowered the count is
    still alive (so B leaves after A's thread has ended; without that the end state
    depended on which came first, 1 run in 3)."""
    pytest.importorskip("threadpoolctl")
    script = """
import threading, numpy as np
from rnncap.models.model import _blas_controller, _one_blas_thread
ctl = _blas_controller()
threads = lambda: max(lib.num_threads for lib in ctl.lib_controllers)
start, seen = threads(), {}
a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
def a():
    with _one_blas_thread(np):
        a_in.set(); b_in.wait(10); seen["A inside"] = threads()
    a_out.set()
def b():
    a_in.wait(10)
    with _one_blas_thread(np):
        b_in.set(); a_out.wait(10); seen["B after A left"] = threads()
        workers[0].join(10)  # A's thread gone: OpenBLAS ignores a raise while it lives
workers = [threading.Thread(target=a), threading.Thread(target=b)]
[w.start() for w in workers]; [w.join(20) for w in workers]
print(start, seen["A inside"], seen["B after A left"], threads())
"""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="2", OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    start, a_inside, b_after, end = map(int, r.stdout.split())
    if start < 2:
        pytest.skip("this BLAS runs one thread only")
    assert (a_inside, b_after, end) == (1, 1, start)
