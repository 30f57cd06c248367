"""The attention captioner (Show, Attend and Tell, soft attention; Xu et al. 2015).

The decoder looks at the image at every step instead of once: the encoder's spatial
map gives L annotation vectors a_i (D each), and before each word the LSTM chooses
where to look from its previous state.

    a (N, L, D) --mean over L--> tanh(. @ W_init + b_init) --> h0, c0
    a @ W_att = P (N, L, A), once per image
    step t:  q = h_{t-1} @ Wh + bh   (one GEMM: LSTM gates | attention query | gate)
             alpha_t = softmax_i(w_att . tanh(P_i + q_att)),  z_t = sum_i alpha_ti a_i
             beta_t = sigmoid(q_beta);  gates = x_t @ Wx + (beta_t z_t) @ Wz + q_gates
             LSTM cell -> h_t --W_vocab--> scores of word t+1
    with --deep-output: o_t = tanh(x_t Wo_x + h_t Wo_h + beta_t z_t Wo_z + b_o) --W_vocab-->

Read top to bottom: the class and its parameters, the training pass (the words in and
out are ``CaptioningModel``'s; ``_recur`` is the attention part, with the doubly
stochastic penalty), then ``init_state``/``step`` for the decoders. The math of a
step lives once, in ``rnncap.models.layers`` (``_attention_cell_forward``), and serves
training and every decoder.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import layers as L
from .model import CaptioningModel, _common_args, _one_blas_thread
from .registry import register


class AttentionState(NamedTuple):
    """Decoder state: per row (hypothesis) h, c (n, H) and the attention weights of
    the step just taken (n, L); per image, once, the annotations a (M, L, D) and their
    projection P (M, L, A). Rows m*k .. m*k+k-1 belong to image m."""
    h: object
    c: object
    alpha: object
    a: object
    proj: object


@register("attention")
class AttentionCaptioningModel(CaptioningModel):
    """An LSTM captioner with soft attention over the image's spatial map.

    ``params`` (D channels per location, A attention size):
    W_init (D, 2H), b_init (2H,): h0 | c0 from the mean annotation;
    W_att (D, A): the annotation projection; w_att (A,): the attention scorer;
    W_embed (V, W); Wx (W, 4H); Wz (D, 4H): the gated context into the gates;
    Wh (H, 4H + A + 1), bh (4H + A + 1,): everything that reads h_{t-1};
    W_vocab (H, V), b_vocab (V,); with ``deep_output`` also Wo_x (W, H), Wo_h (H, H),
    Wo_z (D, H), b_o (H,): the deep output layer (``layers.deep_output_forward``), whose
    H outputs take h_t's place before W_vocab (and its dropout).

    ``attention_reg`` is the doubly stochastic penalty's lambda:
    ``lambda * sum_i (1 - sum_t alpha_ti)^2`` per caption over its real steps,
    averaged over the batch like the cross-entropy (the paper uses 1).
    Dropout and label smoothing act as in ``CaptioningModel``.
    """

    spatial = True  # reads (N, L, D) maps; its state's alpha is where it looked

    def __init__(self, vocab_size, input_dim, wordvec_dim, hidden_dim, attention_dim=512,
                 attention_reg=1.0, null_id=0, start_id=1, end_id=2, dtype=np.float32, seed=None,
                 dropout=0.0, label_smoothing=0.0, deep_output=False):
        if int(attention_dim) <= 0:
            raise ValueError(f"attention_dim must be a positive integer, got {attention_dim}")
        if not attention_reg >= 0:
            raise ValueError(f"attention_reg must be >= 0, got {attention_reg}")
        self.attention_dim = int(attention_dim)
        self.attention_reg = float(attention_reg)
        self.deep_output = bool(deep_output)
        super().__init__(vocab_size, input_dim, wordvec_dim, hidden_dim, cell_type="lstm",
                         null_id=null_id, start_id=start_id, end_id=end_id, dtype=dtype,
                         seed=seed, dropout=dropout, label_smoothing=label_smoothing)

    @classmethod
    def from_model_config(cls, model_cfg, vocab, seed=None):
        if model_cfg.cell_type != "lstm":
            raise ValueError(f"the attention model is an LSTM; got cell {model_cfg.cell_type!r}")
        return cls(attention_dim=model_cfg.attention_dim, attention_reg=model_cfg.attention_reg,
                   deep_output=model_cfg.deep_output, **_common_args(model_cfg, vocab, seed))

    def _initial_params(self, init):
        V, D, W, H, A = (self.vocab_size, self.input_dim, self.wordvec_dim, self.hidden_dim,
                         self.attention_dim)
        gates_in = np.sqrt(W + D)  # the gates read [x, beta z]: unit variance overall
        params = {
            "W_init": init.standard_normal((D, 2 * H)) / np.sqrt(D),
            "b_init": np.zeros(2 * H),
            "W_att": init.standard_normal((D, A)) / np.sqrt(D),
            "w_att": init.standard_normal(A) / np.sqrt(A),
            "W_embed": init.standard_normal((V, W)) / 100.0,
            "Wx": init.standard_normal((W, 4 * H)) / gates_in,
            "Wz": init.standard_normal((D, 4 * H)) / gates_in,
            "Wh": init.standard_normal((H, 4 * H + A + 1)) / np.sqrt(H),
            "bh": np.zeros(4 * H + A + 1),
            "W_vocab": init.standard_normal((H, V)) / np.sqrt(H),
            "b_vocab": np.zeros(V),
        }
        if self.deep_output:  # drawn last: the rest are the plain model's for the same seed
            fan_in = np.sqrt(W + H + D)                                  # it reads [x, h, beta z]
            params.update(Wo_x=init.standard_normal((W, H)) / fan_in, Wo_h=init.standard_normal((H, H)) / fan_in,
                          Wo_z=init.standard_normal((D, H)) / fan_in, b_o=np.zeros(H))
        return params

    # -- training ----------------------------------------------------------------------

    def _recur(self, features, x, mask, batch_size):
        """Annotations a = features (N, L, D) and word vectors x (N, T, W) to the hidden
        states (N, T, H), with the doubly stochastic penalty over the real steps
        (``mask`` (N, T)). Returns (h, penalty, backward) as ``CaptioningModel._recur``."""
        xp = self.xp
        p = self.params
        a = features
        N, Lc, D = a.shape
        mean_a = a.mean(axis=1)
        init, c_init = L.affine_forward(mean_a, p["W_init"], p["b_init"])
        xp.tanh(init, out=init)
        H = self.hidden_dim
        h0, c0 = init[:, :H], init[:, H:]
        proj = (a.reshape(N * Lc, D) @ p["W_att"]).reshape(N, Lc, self.attention_dim)   # once per image
        h, alpha, cache = L.attention_lstm_forward(x, a, proj, h0, c0, p["Wx"], p["Wz"], p["Wh"],
                                                   p["bh"], p["w_att"], lengths=self._steps_needed(mask))
        # Doubly stochastic attention: every location should be looked at about once
        # over the caption. alpha is 0 past a caption's end; inside it, the mask says
        # which steps predict a real word.
        real = mask.astype(alpha.dtype)
        gap = 1.0 - (alpha * real[:, :, None]).sum(axis=1)              # (N, L)
        gap *= real.any(axis=1, keepdims=True)                          # no caption, no penalty
        lam = self.attention_reg / batch_size
        penalty = lam * float((gap * gap).sum())
        out, c_out = h, None
        if self.deep_output:  # every step at once, after the loop
            T = x.shape[1]
            o, c_out = L.deep_output_forward(x.reshape(N * T, -1), h.reshape(N * T, H),
                                             L.attention_context(cache).reshape(N * T, D),
                                             p["Wo_x"], p["Wo_h"], p["Wo_z"], p["b_o"])
            out = o.reshape(N, T, H)

        def backward(dout):
            dalpha = (-2.0 * lam) * gap[:, None, :] * real[:, :, None] if lam else None
            dh, dctx, g = dout, None, {}
            if c_out is not None:
                T = dout.shape[1]
                dx_o, dh, dctx, g["Wo_x"], g["Wo_h"], g["Wo_z"], g["b_o"] = L.deep_output_backward(
                    dout.reshape(N * T, H), c_out)
                dh, dctx = dh.reshape(N, T, H), dctx.reshape(N, T, D)
            dx, _, dproj, dh0, dc0, g_Wx, g_Wz, g_Wh, g_bh, g_w = L.attention_lstm_backward(
                dh, dalpha, cache, dcontext=dctx)
            if c_out is not None:
                dx += dx_o.reshape(dx.shape)
            g.update({"Wx": g_Wx, "Wz": g_Wz, "Wh": g_Wh, "bh": g_bh, "w_att": g_w})
            g["W_att"] = a.reshape(N * Lc, D).T @ dproj.reshape(N * Lc, self.attention_dim)
            dinit = xp.concatenate([dh0, dc0], axis=1)
            dinit *= 1.0 - init * init                                  # through the tanh
            _, g["W_init"], g["b_init"] = L.affine_backward(dinit, c_init)
            return dx, g

        return out, penalty, backward

    def _check_features(self, features):
        if features.ndim != 3 or features.shape[2] != self.input_dim or features.shape[1] < 1:
            raise ValueError(f"features must be spatial maps (N, L, {self.input_dim}); got shape "
                             f"{tuple(features.shape)} (make them with `rnncap features --maps`, "
                             f"with the encoder and PCA the model was trained on)")

    # -- decoding ----------------------------------------------------------------------

    def init_state(self, features):
        """Decoder state for (N, L, D) maps: h0, c0 from the mean annotation, the
        annotations and their projection (once per image), no attention yet."""
        xp = self.xp
        p = self.params
        a = xp.asarray(features, dtype=self.dtype)
        self._check_inputs(a, xp.zeros((a.shape[0], 2), dtype=np.int64))
        N, Lc, D = a.shape
        init, _ = L.affine_forward(a.mean(axis=1), p["W_init"], p["b_init"])
        xp.tanh(init, out=init)
        H = self.hidden_dim
        proj = (a.reshape(N * Lc, D) @ p["W_att"]).reshape(N, Lc, self.attention_dim)
        return AttentionState(init[:, :H], init[:, H:], xp.zeros((N, Lc), dtype=self.dtype), a, proj)

    def step(self, words, state, masks=None):
        """One decoding step through the training math. words: (n,) ids; state: an
        ``AttentionState`` whose n rows are k hypotheses per image. Returns scores
        (n, V) and the new state; its ``alpha`` (n, L) is where this step looked.
        masks: this step's dropout masks, as ``CaptioningModel.step``."""
        p = self.params
        mask_x, mask_h = (None, None) if masks is None else self._check_masks(masks, words.shape)
        x = p["W_embed"][words]
        x = x if mask_x is None else x * mask_x
        with _one_blas_thread(self.xp):
            h, c, alpha, cache = L.attention_lstm_step_forward(
                x, state.h, state.c, state.a, state.proj, p["Wx"], p["Wz"], p["Wh"], p["bh"], p["w_att"])
            out = h if not self.deep_output else L.deep_output_forward(
                x, h, L.attention_context(cache), p["Wo_x"], p["Wo_h"], p["Wo_z"], p["b_o"])[0]
            scores, _ = L.affine_forward(out if mask_h is None else out * mask_h, p["W_vocab"], p["b_vocab"])
        return scores, state._replace(h=h, c=c, alpha=alpha)

    def select_state(self, state, rows):
        """The hypotheses ``rows`` (n',) of a state, in that order. Each image's map is
        kept once: rows must stay grouped by image, k' = n' / M per image (beam search
        only reorders within an image's rows)."""
        return state._replace(h=state.h[rows], c=state.c[rows], alpha=state.alpha[rows])

    def likelihood_only(self):
        """As ``CaptioningModel.likelihood_only``, without the attention penalty too."""
        plain = super().likelihood_only()
        plain.attention_reg = 0.0
        return plain

    # -- (de)serialisation ---------------------------------------------------------------

    def config(self):
        cfg = super().config()
        cfg.update(attention_dim=self.attention_dim, attention_reg=self.attention_reg,
                   deep_output=self.deep_output)
        return cfg
