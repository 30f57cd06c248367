"""The captioning model: image features in, a caption out, word by word.

Read top to bottom: the constructor and its parameters, the training loss with its
backward pass through time, then the two small pieces the decoders use
(``init_state`` and ``step``) and greedy ``sample``; last, how a batch runs in shards
on several cores.

    features --W_proj--> h0
    <START> w1 w2 ... --W_embed--> word vectors --RNN/LSTM--> h_t --W_vocab--> scores
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np

from . import layers as L
from .registry import register
from ..backend import get_array_module, to_device, to_numpy, xp_for

CELLS = ("rnn", "lstm")


@register("h0")
class CaptioningModel:
    """A recurrent image captioner (vanilla RNN or LSTM) in NumPy/CuPy.

    ``params`` is a plain dict of arrays (k = 1 for rnn, 4 for lstm):
    W_proj (D, H), b_proj (H,), W_embed (V, W), Wx (W, kH), Wh (H, kH), b (kH,),
    W_vocab (H, V), b_vocab (V,).

    Options beyond the homework: ``dropout`` (applied to the word vectors and to the
    hidden states before the vocabulary layer, training only) and ``label_smoothing``.
    """

    spatial = False  # reads (N, D) features; attention models read (N, L, D) maps

    def __init__(self, vocab_size, input_dim, wordvec_dim, hidden_dim, cell_type="rnn",
                 null_id=0, start_id=1, end_id=2, dtype=np.float32, seed=None,
                 dropout=0.0, label_smoothing=0.0):
        if cell_type not in CELLS:
            raise ValueError(f"cell_type must be one of {CELLS}, got {cell_type!r}")
        self._check_positive(vocab_size=vocab_size, input_dim=input_dim, wordvec_dim=wordvec_dim,
                             hidden_dim=hidden_dim)
        self._init_common(vocab_size, input_dim, wordvec_dim, hidden_dim, cell_type, null_id, start_id,
                          end_id, dtype, seed, dropout, label_smoothing)

    @staticmethod
    def _check_positive(**sizes):
        for name, v in sizes.items():
            if int(v) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v}")

    def _init_common(self, vocab_size, input_dim, wordvec_dim, hidden_dim, cell_type, null_id, start_id,
                     end_id, dtype, seed, dropout, label_smoothing):
        """What every model's constructor does once its own sizes are checked and set:
        the shared attributes, the dropout generator and fresh parameters."""
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.vocab_size, self.input_dim = int(vocab_size), int(input_dim)
        self.wordvec_dim, self.hidden_dim = int(wordvec_dim), int(hidden_dim)
        self.cell_type = cell_type
        self.null_id, self.start_id, self.end_id = null_id, start_id, end_id
        self.dtype = np.dtype(dtype)
        self.dropout = float(dropout)
        self.label_smoothing = float(label_smoothing)
        # Dropout masks come from this generator, so its state is part of a checkpoint.
        self.rng = np.random.default_rng(seed)

        init = np.random.default_rng(seed)
        self.params = {name: v.astype(self.dtype) for name, v in self._initial_params(init).items()}

    def _initial_params(self, init):
        """Fresh float64 parameters drawn from the generator ``init``, scaled so every
        pre-activation starts with unit-order variance."""
        V, D, W, H = self.vocab_size, self.input_dim, self.wordvec_dim, self.hidden_dim
        k = 4 if self.cell_type == "lstm" else 1
        return {
            "W_proj": init.standard_normal((D, H)) / np.sqrt(D),
            "b_proj": np.zeros(H),
            "W_embed": init.standard_normal((V, W)) / 100.0,
            "Wx": init.standard_normal((W, k * H)) / np.sqrt(W),
            "Wh": init.standard_normal((H, k * H)) / np.sqrt(H),
            "b": np.zeros(k * H),
            "W_vocab": init.standard_normal((H, V)) / np.sqrt(H),
            "b_vocab": np.zeros(V),
        }

    # -- device ----------------------------------------------------------------------

    @property
    def xp(self):
        return get_array_module(self.params["W_vocab"])

    def to(self, device):
        """Move the parameters to "cpu" (NumPy) or "gpu" (CuPy). Returns self."""
        xp = xp_for(device)
        self.params = {k: to_device(v, xp) for k, v in self.params.items()}
        return self

    # -- training loss ---------------------------------------------------------------

    def loss(self, features, captions, train=True, token_weights=None, masks=None, forbidden=None):
        """Loss and gradients for a minibatch.

        features: (N, D) image features; captions: (N, T+1) int ids, each starting
        with <START>. The model reads captions[:, :-1] and predicts captions[:, 1:];
        <NULL> targets are masked out. Dropout is active only when ``train`` is true.

        token_weights: None, or (N, T) floats, the weight of each target position
        captions[:, 1:] (any sign; 0 leaves a position out, whatever its word):
        ``loss = sum(w * -log p(target)) / N``, with no label smoothing. This is how a
        policy gradient (``rnncap.training.scst``) goes through the model's own backward.

        masks: None, or the dropout masks to use instead of drawing them: (mask_x
        (N, T, W), mask_h (N, T, H)), either may be None (``train`` is then ignored).
        Self-critical training passes the masks its captions were drawn with.

        forbidden: None, or (n, t, w) int arrays of equal length, words w that were not
        allowed as target t of caption n: those positions' softmax runs over the other
        words only (w's score is -inf), so the loss and its gradient are those of the
        renormalised distribution a rule-constrained decoder draws from. Self-critical
        training passes the words its decoding rules forbade.

        On the CPU with threadpoolctl installed, NumPy's BLAS runs single-threaded
        here, and a batch large enough is split into shards (up to one per BLAS thread)
        that run side by side (see the end of this module); the result is the same up
        to float rounding, and does not depend on the machine's load.

        Returns (loss, grads) with grads keyed like ``params``.
        """
        xp = self.xp
        features = xp.asarray(features, dtype=self.dtype)
        captions = xp.asarray(captions)
        self._check_inputs(features, captions)
        N, T = captions.shape[0], captions.shape[1] - 1
        if token_weights is not None:
            token_weights = xp.asarray(token_weights, dtype=self.dtype)
            if token_weights.shape != (N, T):
                raise ValueError(f"token_weights must be (N, T) = {(N, T)}; got shape "
                                 f"{tuple(token_weights.shape)}")
        if masks is None:
            # Masks are drawn here, in one fixed order, so that the random stream does
            # not depend on how the batch is split.
            masks = self._draw_masks(N, T, self.dropout if train else 0.0)
        else:
            masks = self._check_masks(masks, (N, T))
        forbidden = _check_forbidden(forbidden, N, T, captions)
        if forbidden is not None and token_weights is None and self.label_smoothing:
            # smoothing spreads mass over every word, the forbidden ones included
            raise ValueError("forbidden words need a loss without label smoothing "
                             "(likelihood_only(), or token_weights)")
        parts = _map_shards(
            lambda s: self._loss_rows(features[s], captions[s],
                                      [m if m is None else m[s] for m in masks], N,
                                      None if token_weights is None else token_weights[s],
                                      _forbidden_rows(forbidden, s)),
            N, xp, self._min_shard_rows or _MIN_SHARD_ROWS)
        loss, grads = parts[0]
        for part_loss, part_grads in parts[1:]:
            loss += part_loss
            for k, g in part_grads.items():
                grads[k] += g
        return loss, grads

    _min_shard_rows = None  # rows per shard of ``loss``; None: _MIN_SHARD_ROWS

    def _draw_masks(self, N, T, p):
        """The dropout masks of a batch (``loss``'s ``masks``), drawn from ``self.rng``
        with the batch first (per-row draws, which the data-parallel trainer splits):
        (mask_x (N, T, W), mask_h (N, T, H)), each None when p is 0."""
        xp = self.xp
        return (L.dropout_mask((N, T, self.wordvec_dim), p, self.rng, self.dtype, xp),
                L.dropout_mask((N, T, self.hidden_dim), p, self.rng, self.dtype, xp))

    def _loss_rows(self, features, captions, masks, batch_size, token_weights=None, forbidden=None):
        """``loss`` for some rows of the batch: the loss is divided by the whole
        batch's ``batch_size``, so the parts of a split batch add up.

        The words in and out are the same for every model; what happens between
        them is ``_recur``, the one part a model of another kind replaces."""
        p = self.params
        captions_in, captions_out = captions[:, :-1], captions[:, 1:]
        mask = self._target_mask(captions_out, token_weights)
        mask_x, mask_h = masks

        # Forward: embed, (dropout), recur, (dropout), score.
        x, c_embed = L.word_embedding_forward(captions_in, p["W_embed"])
        x = x if mask_x is None else x * mask_x
        h, extra_loss, recur_backward = self._recur(features, x, mask, batch_size)
        h = h if mask_h is None else h * mask_h
        loss, dh, grads = self._vocab_loss(h, captions_out, batch_size, token_weights, forbidden)

        # Backward through time, in reverse order of the forward pass.
        dh = L.dropout_backward(dh, mask_h)
        dx, recur_grads = recur_backward(dh)
        grads.update(recur_grads)
        dx = L.dropout_backward(dx, mask_x)
        grads["W_embed"] = L.word_embedding_backward(dx, c_embed)
        return loss + extra_loss, grads

    def _target_mask(self, captions_out, token_weights):
        """(N, T) bool: the positions whose target reaches the loss."""
        return captions_out != self.null_id if token_weights is None else token_weights != 0

    def _vocab_loss(self, h, captions_out, batch_size, token_weights=None, forbidden=None):
        """The output layer and the loss, the same for every model: from the states
        h (N, T, H) that are scored to the loss, dh (N, T, H) and the gradients of
        W_vocab and b_vocab (a dict). ``loss`` describes the weighting and
        ``forbidden`` ((n, t, w) arrays for these rows, or None).

        Only positions with a target word reach the loss, so only those are scored:
        padding is about a quarter of a COCO batch's (N, T, V) scores. The result is
        temporal_affine + temporal_softmax_loss without the rows the mask zeroes."""
        xp = self.xp
        p = self.params
        mask = self._target_mask(captions_out, token_weights)
        smoothing = self.label_smoothing if token_weights is None else 0.0
        N, T, H = h.shape
        keep = xp.flatnonzero(mask.reshape(-1))
        scores, c_vocab = L.affine_forward(h.reshape(N * T, H)[keep], p["W_vocab"], p["b_vocab"])
        if forbidden is not None and len(forbidden[0]):
            # the scored row of each forbidden (n, t); positions without a target drop out
            row_of = xp.full(N * T, -1, dtype=np.int64)
            row_of[keep] = xp.arange(len(keep))
            n, t, w = (xp.asarray(a) for a in forbidden)
            rows = row_of[n * T + t]
            scores[rows[rows >= 0], w[rows >= 0]] = -xp.inf
        weights = (1.0 / batch_size if token_weights is None
                   else token_weights.reshape(-1)[keep] / batch_size)
        loss, dscores = L.softmax_loss(scores, captions_out.reshape(-1)[keep], weights,
                                       label_smoothing=smoothing)
        grads = {}
        dh_kept, grads["W_vocab"], grads["b_vocab"] = L.affine_backward(dscores, c_vocab)
        dh = xp.zeros((N * T, H), dtype=dh_kept.dtype)
        dh[keep] = dh_kept
        return loss, dh.reshape(N, T, H), grads

    def _recur(self, features, x, mask, batch_size):
        """From image features and word vectors x (N, T, W) to the hidden states
        (N, T, H): h0 = features @ W_proj + b_proj, then the RNN/LSTM, running each
        caption only as far as ``mask`` (N, T) has targets.

        Returns (h, a loss term of the model's own (0 here), backward), where
        ``backward(dh) -> (dx, grads of the parameters used here)``.
        """
        p = self.params
        h0, c_proj = L.affine_forward(features, p["W_proj"], p["b_proj"])
        recur_fwd, recur_bwd = ((L.lstm_forward, L.lstm_backward) if self.cell_type == "lstm"
                                else (L.rnn_forward, L.rnn_backward))
        h, c_recur = recur_fwd(x, h0, p["Wx"], p["Wh"], p["b"], lengths=self._steps_needed(mask))

        def backward(dh):
            g = {}
            dx, dh0, g["Wx"], g["Wh"], g["b"] = recur_bwd(dh, c_recur)
            _, g["W_proj"], g["b_proj"] = L.affine_backward(dh0, c_proj)
            return dx, g

        return h, 0.0, backward

    @staticmethod
    def _steps_needed(mask):
        """(N,) steps each caption needs: up to its last target word. Later steps
        cannot reach the loss, so the recurrence skips them (padding is about a
        quarter of a COCO batch)."""
        xp = get_array_module(mask)
        T = mask.shape[1]
        return xp.where(mask.any(axis=1), T - mask[:, ::-1].argmax(axis=1), 0)

    def _check_inputs(self, features, captions):
        self._check_features(features)
        if captions.ndim != 2 or captions.shape[0] != features.shape[0] or captions.shape[1] < 2:
            raise ValueError(f"captions must be (N, T+1) with N={features.shape[0]} and T >= 1; "
                             f"got shape {tuple(captions.shape)}")

    def _check_masks(self, masks, lead):
        """Given dropout masks (mask_x, mask_h) as arrays of the model's dtype, each
        checked to be ``lead + (W,)`` and ``lead + (H,)`` (None stays None)."""
        if len(masks) != 2:
            raise ValueError("masks must be a pair (mask_x, mask_h)")
        out = []
        for name, m, dim in zip(("mask_x", "mask_h"), masks, (self.wordvec_dim, self.hidden_dim)):
            if m is not None:
                m = self.xp.asarray(m, dtype=self.dtype)
                if m.shape != (*lead, dim):
                    raise ValueError(f"{name} must be {(*lead, dim)}; got shape {tuple(m.shape)}")
            out.append(m)
        return tuple(out)

    def _check_features(self, features):
        if features.ndim != 2 or features.shape[1] != self.input_dim:
            raise ValueError(f"features must be (N, {self.input_dim}); got shape "
                             f"{tuple(features.shape)} (was the model trained on another "
                             f"encoder or PCA size?)")

    # -- decoding --------------------------------------------------------------------

    def init_state(self, features):
        """Decoder state for a batch of images: h0 = features @ W_proj + b_proj, and
        for the LSTM a zero cell. Returns a tuple of (N, H) arrays."""
        xp = self.xp
        features = xp.asarray(features, dtype=self.dtype)
        self._check_inputs(features, xp.zeros((features.shape[0], 2), dtype=np.int64))
        h0, _ = L.affine_forward(features, self.params["W_proj"], self.params["b_proj"])
        if self.cell_type == "lstm":
            return (h0, xp.zeros_like(h0))
        return (h0,)

    def step(self, words, state, masks=None):
        """One decoding step through the training math.

        words: (N,) int ids fed at this step; state: from ``init_state`` or ``step``.
        Returns scores (N, V) for the next word and the new state.

        masks: None, or this step's dropout masks (mask_x (N, W), mask_h (N, H)), as
        ``loss`` applies them at one position: the word vectors and the hidden state
        that is scored are multiplied by them; the state carries on undropped. For
        drawing captions with dropout on (self-critical training).

        Runs with NumPy's BLAS on one thread (when threadpoolctl is installed): a
        step's matmuls are too small to share, and a thread team that must meet
        several times per step is many times slower once other programs compete for
        the cores. The decoders use more cores by running groups of images side by
        side (``in_shards``).
        """
        with _one_blas_thread(self.xp):
            return self._step_rows(words, state, masks)

    def _step_rows(self, words, state, masks=None):
        p = self.params
        mask_x, mask_h = (None, None) if masks is None else self._check_masks(masks, words.shape)
        x = p["W_embed"][words]
        x = x if mask_x is None else x * mask_x
        if self.cell_type == "lstm":
            h, c, _ = L.lstm_step_forward(x, state[0], state[1], p["Wx"], p["Wh"], p["b"])
            new_state = (h, c)
        else:
            h, _ = L.rnn_step_forward(x, state[0], p["Wx"], p["Wh"], p["b"])
            new_state = (h,)
        scores, _ = L.affine_forward(h if mask_h is None else h * mask_h, p["W_vocab"], p["b_vocab"])
        return scores, new_state

    def select_state(self, state, rows):
        """The decoder state of the given rows (N',) of a state batch, in that order:
        beam search uses it to copy and reorder hypotheses."""
        return tuple(s[rows] for s in state)

    def in_shards(self, fn, features, min_rows=None):
        """Call ``fn(part)`` on row shards of ``features`` side by side and return the
        results in order: one shard per BLAS thread NumPy would use, each at least
        ``min_rows`` rows (default 8), each on its own thread with single-threaded
        BLAS; a single call ``[fn(features)]`` when the batch is too small to split, on
        a GPU, or when already inside a sharded call.

        For work whose rows are independent, such as decoding: the threads meet once
        per call, not once per step (see the end of this module).
        """
        return _map_shards(lambda s: fn(features[s]), len(features), self.xp,
                           min_rows or self._min_decode_rows or _MIN_DECODE_ROWS)

    _min_decode_rows = None  # in_shards' default rows per shard; None: _MIN_DECODE_ROWS

    def sample(self, features, max_length=30):
        """Greedy captions: (N, max_length) int ids, without <START>, padded with
        <NULL> after <END> (the <END> itself is kept)."""
        from ..inference.decoding import greedy_decode

        return greedy_decode(self, features, max_length=max_length)

    def likelihood_only(self):
        """A copy sharing the parameters whose ``loss`` is the plain negative
        log-likelihood: no label smoothing (for perplexity)."""
        import copy

        plain = copy.copy(self)
        plain.label_smoothing = 0.0
        return plain

    # -- (de)serialisation helpers ----------------------------------------------------

    @classmethod
    def from_model_config(cls, model_cfg, vocab, seed=None):
        """A fresh model for a ``ModelConfig`` (rnncap.models.registry.build_model)."""
        return cls(cell_type=model_cfg.cell_type, **_common_args(model_cfg, vocab, seed))

    @classmethod
    def from_config(cls, config, seed=None):
        """Rebuild from ``config()`` (keys this version does not know are ignored)."""
        import inspect

        names = set(inspect.signature(cls).parameters) - {"seed"}
        kw = {k: v for k, v in config.items() if k in names}
        if "dtype" in kw:
            kw["dtype"] = np.dtype(kw["dtype"])
        return cls(seed=seed, **kw)

    def config(self):
        """The constructor arguments, as plain JSON-able values."""
        return {
            "vocab_size": self.vocab_size, "input_dim": self.input_dim,
            "wordvec_dim": self.wordvec_dim, "hidden_dim": self.hidden_dim,
            "cell_type": self.cell_type, "null_id": self.null_id,
            "start_id": self.start_id, "end_id": self.end_id,
            "dtype": self.dtype.name, "dropout": self.dropout,
            "label_smoothing": self.label_smoothing,
        }

    def numpy_params(self):
        """Parameters as host NumPy arrays (for checkpoints)."""
        return {k: to_numpy(v) for k, v in self.params.items()}


def _common_args(model_cfg, vocab, seed):
    """The constructor arguments every model takes from a ``ModelConfig`` and ``Vocab``."""
    return dict(vocab_size=len(vocab), input_dim=model_cfg.input_dim,
                wordvec_dim=model_cfg.wordvec_dim, hidden_dim=model_cfg.hidden_dim,
                null_id=vocab.null_id, start_id=vocab.start_id, end_id=vocab.end_id,
                dtype=np.dtype(model_cfg.dtype), seed=seed, dropout=model_cfg.dropout,
                label_smoothing=model_cfg.label_smoothing)


# ---- running a batch in shards, side by side ----------------------------------------
#
# NumPy's BLAS parallelises each matmul on its own. The recurrence is a chain of small
# matmuls, and a thread team that must meet after every one of them loses most of its
# time in hand-offs: on a machine whose cores are busy with other programs, a training
# step on two BLAS threads took 5 to 15 times as long as on one (docs/performance.md).
# So the model runs BLAS on one thread, and uses more cores by splitting a batch into
# shards, each run on its own thread from start to end, with no meeting until the
# gradients are added; the elementwise work, which NumPy runs on one core, is spread
# as well. NumPy releases the GIL in its loops and BLAS calls, so plain Python threads
# do. A shard costs some efficiency (each of its step matmuls is thinner, and its
# weight gradients are full-size), so shards are made only with enough rows each:
# 16. Measured on Zen 3 (2 cores), h0 LSTM step at N=50: one shard 158 ms, two 102 ms
# idle; with a busy loop on the other core 161 and 153 ms. On the Intel CPU at N=32
# and 40 (one shard at 25 rows, two at 16): 65 -> 48 and 77 -> 56 ms idle, the
# attention LSTM at N=32 166 -> 116-128 ms; with the other core busy 62-64 -> 77 and
# 76-85 -> 91-93 ms, slower by a fifth at most.
# The BLAS limit is process-wide while it lasts: two threads that call ``loss`` at the
# same time should each run under their own threadpoolctl limit of 1.

_MIN_SHARD_ROWS = 16   # N = 32 and up split in two (docs/performance.md)
_MIN_DECODE_ROWS = 8   # in_shards' default: a caption batch of 16 photos decodes on both
                       # cores (beam 3: 189 -> 126 ms for 2 x 16 photos; docs/performance.md)
_parallel = {}        # lazily: the threadpoolctl controller and a thread pool
_parallel_state = threading.local()  # .inside: this thread is running a shard


def _check_forbidden(forbidden, N, T, captions):
    """``loss``'s ``forbidden`` as three host int64 arrays (n, t, w), checked against
    the (N, T+1) captions (no target may be forbidden: its probability would be 0); or
    None."""
    if forbidden is None:
        return None
    n, t, w = (np.asarray(a, dtype=np.int64).reshape(-1) for a in forbidden)
    if not len(n) == len(t) == len(w):
        raise ValueError(f"forbidden must be three arrays (n, t, w) of one length; got "
                         f"{len(n)}, {len(t)}, {len(w)}")
    if len(n) and (n.min() < 0 or n.max() >= N or t.min() < 0 or t.max() >= T):
        raise ValueError(f"forbidden positions must lie in the (N, T) = {(N, T)} targets")
    if len(n) and (to_numpy(captions)[n, t + 1] == w).any():
        raise ValueError("forbidden includes a caption's own target word")
    return n, t, w


def _forbidden_rows(forbidden, rows):
    """The entries of ``forbidden`` in the row slice ``rows``, renumbered from its start."""
    if forbidden is None:
        return None
    n, t, w = forbidden
    start, stop = rows.start or 0, rows.stop
    sel = (n >= start) & (n < stop) if stop is not None else n >= start
    return n[sel] - start, t[sel], w[sel]


def _inside_shard():
    return getattr(_parallel_state, "inside", False)


def _blas_controller():
    """threadpoolctl's handle on the BLAS libraries loaded (NumPy's), or None."""
    if "ctl" not in _parallel:
        try:
            from threadpoolctl import ThreadpoolController
            _parallel["ctl"] = ThreadpoolController().select(user_api="blas")
        except Exception:  # threadpoolctl missing or unusable: no sharding
            _parallel["ctl"] = None
    return _parallel["ctl"]


_blas_limit = {"lock": threading.Lock(), "users": 0, "limiter": None}


@contextmanager
def _one_blas_thread(xp):
    """Context: NumPy's BLAS limited to one thread (a no-op off the CPU or without
    threadpoolctl).

    The limit is process-wide, and threads (a server's workers, in-process ranks)
    enter and leave it in any order. A plain nested limit per thread restores what it
    found on entry, so "A in, B in, A out, B out" would leave B's saved 1 behind for
    good. So the first thread in sets the limit, and the last one out restores what
    the first found. (Measured with OpenBLAS 0.3.31: once the main thread has set a
    count, a count set from another thread is ignored, so there the limit does not
    hold; that thread's matmuls may use every BLAS thread. And a raise from one thread
    is ignored while the thread that lowered the count is still alive, so a restore
    by the last thread out holds only once the first one's thread has ended.)"""
    ctl = _blas_controller() if xp is np else None
    if ctl is None:
        yield
        return
    state = _blas_limit
    with state["lock"]:
        if state["users"] == 0:
            state["limiter"] = ctl.limit(limits=1)
        state["users"] += 1
    try:
        yield
    finally:
        with state["lock"]:
            state["users"] -= 1
            if state["users"] == 0:
                state["limiter"].restore_original_limits()
                state["limiter"] = None


def _shards(N, xp, min_rows=_MIN_SHARD_ROWS):
    """Row slices to split a batch of N into: up to one per BLAS thread NumPy would
    use (so OPENBLAS_NUM_THREADS=1 or a threadpoolctl limit of 1 turns sharding off),
    at least ``min_rows`` rows each; a single slice on a GPU or inside a shard. The
    split depends on N and the thread setting only, so results are reproducible run
    to run."""
    ctl = _blas_controller() if xp is np and not _inside_shard() else None
    threads = max((lib.num_threads for lib in ctl.lib_controllers), default=1) if ctl else 1
    k = max(1, min(threads, N // min_rows))
    bounds = [N * i // k for i in range(k + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def _map_shards(fn, N, xp, min_rows):
    """``[fn(rows) for rows in _shards(N, xp, min_rows)]``, the shards side by side,
    always with NumPy's BLAS on one thread."""
    shards = _shards(N, xp, min_rows)
    if len(shards) == 1:
        with _one_blas_thread(xp):
            return [fn(shards[0])]
    return _run_sharded([(lambda s=s: fn(s)) for s in shards])


def _run_sharded(fns):
    """Call every function, with NumPy's BLAS limited to one thread meanwhile, and
    return their results in order.

    This thread and pool threads take the functions from a shared counter, so when a
    pool thread is slow to get a core (a busy machine), this thread runs the rest
    itself instead of waiting for it.
    """
    from concurrent.futures import ThreadPoolExecutor

    helpers = len(fns) - 1
    if _parallel.get("pool_size", 0) < helpers:
        _parallel["pool"] = ThreadPoolExecutor(helpers, thread_name_prefix="rnncap")
        _parallel["pool_size"] = helpers
    pool = _parallel["pool"]
    results = [None] * len(fns)
    claims = iter(range(len(fns)))  # next() on an iterator is atomic under the GIL

    def work():
        _parallel_state.inside = True
        try:
            for i in claims:
                results[i] = fns[i]()
        finally:
            _parallel_state.inside = False

    with _one_blas_thread(np):
        futures = [pool.submit(work) for _ in range(helpers)]
        try:
            work()
        finally:
            for f in futures:  # wait only for helpers that started; drop the others
                if not f.cancel():
                    f.result()
    return results
