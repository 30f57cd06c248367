"""The Transformer captioner (the course's ``CaptioningTransformer``, CS231n 2021-2024).

The words attend to each other (causally) and to the image, in a stack of post-norm
decoder layers (``rnncap.models.transformer_layers``):

    memory (N, L, E) = features @ W_mem + b_mem (+ pos_mem, one learned vector per location)
    x (N, T, E)      = dropout(W_embed[words] + positional encoding)
    x                = decoder layer 1..K (x, memory), causal self-attention
    scores (N, T, V) = x @ W_vocab + b_vocab

The memory is one token, the pooled feature (N, D) (the course's setup), or the
encoder's spatial map (N, L, D), one token per location (the one for Flickr8k).

Read top to bottom: the class and its parameters, the training pass (the loss and
output layer are ``CaptioningModel``'s ``_vocab_loss``), then the decoders' cached
step: ``init_state`` computes each image's memory keys and values once, ``step`` feeds
one word through the same layer code with the earlier positions' keys and values as
``past``, so a step costs O(t) and does not recompute the prefix; ``select_state``
reorders the caches for beam search and keeps one copy of each image's memory.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import layers as L
from . import transformer_layers as TL
from .model import CaptioningModel, _one_blas_thread
from .registry import register


class TransformerState(NamedTuple):
    """Decoder state: alpha (n, L), where the last step looked (the last layer's
    cross-attention, averaged over heads); per layer, the self-attention keys and
    values of the positions decoded so far (n, t, E) per row (hypothesis); per layer,
    the memory's keys and values (M, L, E), once per image; t, the positions decoded
    so far. Rows m*k .. m*k+k-1 belong to image m."""
    alpha: object        # first: the decoders read the row count from state[0]
    keys: tuple
    values: tuple
    memory_kv: tuple
    t: int


@register("transformer")
class TransformerCaptioningModel(CaptioningModel):
    """A Transformer decoder captioner in NumPy/CuPy.

    ``params`` (E the width, F the feed-forward width, K layers, l in 0..K-1):
    W_mem (D, E), b_mem (E,): the image features into the memory; pos_mem (L, E):
    a learned position per location (spatial memory only); W_embed (V, E);
    l{l}_<name> for every name of ``transformer_layers.DECODER_PARAMS``;
    W_vocab (E, V), b_vocab (V,).

    ``locations``: 0 for pooled features (N, D), one memory token; L > 0 for spatial
    maps (N, L, D). Dropout (torch's places: after the positional encoding, on the
    attention weights, after each sublayer, inside the feed-forward block) and label
    smoothing act in training only. The loss is rnncap's: summed over time, averaged
    over the batch (the course's averages over all N*T positions: theirs = ours / T
    with the same gradients up to that factor).
    """

    def __init__(self, vocab_size, input_dim, embed_dim=512, num_heads=8, num_layers=2,
                 ffn_dim=2048, locations=0, null_id=0, start_id=1, end_id=2, dtype=np.float32,
                 seed=None, dropout=0.1, label_smoothing=0.0):
        self._check_positive(vocab_size=vocab_size, input_dim=input_dim, embed_dim=embed_dim,
                             num_heads=num_heads, num_layers=num_layers, ffn_dim=ffn_dim)
        if int(embed_dim) % int(num_heads):
            raise ValueError(f"num_heads {num_heads} must divide the width {embed_dim}")
        if int(locations) < 0:
            raise ValueError(f"locations must be >= 0, got {locations}")
        self.embed_dim, self.num_heads = int(embed_dim), int(num_heads)
        self.num_layers, self.ffn_dim, self.locations = int(num_layers), int(ffn_dim), int(locations)
        # What the shared code reads: the words and the scored states are E wide.
        self._init_common(vocab_size, input_dim, embed_dim, embed_dim, "transformer", null_id, start_id,
                          end_id, dtype, seed, dropout, label_smoothing)

    @classmethod
    def from_model_config(cls, model_cfg, vocab, seed=None):
        if model_cfg.wordvec_dim != model_cfg.hidden_dim:
            raise ValueError(f"the Transformer's word vectors are its width: --wordvec "
                             f"({model_cfg.wordvec_dim}) must equal --hidden ({model_cfg.hidden_dim})")
        return cls(vocab_size=len(vocab), input_dim=model_cfg.input_dim, embed_dim=model_cfg.hidden_dim,
                   num_heads=model_cfg.heads, num_layers=model_cfg.layers, ffn_dim=model_cfg.ffn_dim,
                   locations=model_cfg.locations, null_id=vocab.null_id, start_id=vocab.start_id,
                   end_id=vocab.end_id, dtype=np.dtype(model_cfg.dtype), seed=seed,
                   dropout=model_cfg.dropout, label_smoothing=model_cfg.label_smoothing)

    def _initial_params(self, init):
        """The course's initialisation: every weight N(0, 0.02), biases 0, layer norms
        the identity."""
        V, D, E, F = self.vocab_size, self.input_dim, self.embed_dim, self.ffn_dim

        def normal(*shape):
            return 0.02 * init.standard_normal(shape)

        p = {"W_mem": normal(D, E), "b_mem": np.zeros(E)}
        if self.locations:
            p["pos_mem"] = normal(self.locations, E)
        p["W_embed"] = normal(V, E)
        shapes = {"self_W_in": (E, 3 * E), "self_W_out": (E, E), "cross_W_in": (E, 3 * E),
                  "cross_W_out": (E, E), "W1": (E, F), "W2": (F, E)}
        for layer in range(self.num_layers):
            for name in TL.DECODER_PARAMS:
                if name in shapes:
                    v = normal(*shapes[name])
                elif name.endswith("_g"):
                    v = np.ones(E)
                else:
                    v = np.zeros(F if name == "b1" else 3 * E if name.endswith("_b_in") else E)
                p[f"l{layer}_{name}"] = v
        p["W_vocab"] = normal(E, V)
        p["b_vocab"] = np.zeros(V)
        return p

    samples_with_dropout = False  # SCST's --sample-dropout masks are the LSTM models' (W, H)

    @property
    def spatial(self):
        """True when the memory is a spatial map (attention maps mean something)."""
        return self.locations > 0

    def _layer(self, layer):
        """Layer ``layer``'s parameters under the names of ``DECODER_PARAMS``."""
        return {name: self.params[f"l{layer}_{name}"] for name in TL.DECODER_PARAMS}

    # -- training ----------------------------------------------------------------------

    _min_shard_rows = 16   # every matmul is (rows * T)-tall: small shards stay efficient

    def _draw_masks(self, N, T, p):
        """The dropout masks of a batch: the embedding's (N, T, E), then each layer's six
        (``transformer_layers.decoder_mask_shapes``); all None when p is 0."""
        return tuple(L.dropout_mask(s, p, self.rng, self.dtype, self.xp) for s in self._mask_shapes(N, T))

    def _mask_shapes(self, N, T):
        E, h, F, Lm = self.embed_dim, self.num_heads, self.ffn_dim, max(self.locations, 1)
        return [(N, T, E)] + TL.decoder_mask_shapes(N, T, T, Lm, h, E, F) * self.num_layers

    def _check_masks(self, masks, lead):
        if len(lead) != 2:
            raise ValueError("the Transformer decodes without dropout masks (dropout while "
                             "sampling is for the LSTM models)")
        shapes = self._mask_shapes(*lead)
        if len(masks) != len(shapes):
            raise ValueError(f"masks must be {len(shapes)} arrays (the embedding's, then six per "
                             f"layer); got {len(masks)}")
        out = []
        for i, (m, shape) in enumerate(zip(masks, shapes)):
            if m is not None:
                m = self.xp.asarray(m, dtype=self.dtype)
                if m.shape != shape:
                    raise ValueError(f"mask {i} must be {shape}; got shape {tuple(m.shape)}")
            out.append(m)
        return tuple(out)

    def _memory(self, features):
        """Features (N, D) or (N, L, D) to the memory (N, L, E), L = 1 for pooled
        features. Returns the memory and a cache for ``_memory_backward``."""
        a = features if features.ndim == 3 else features[:, None, :]
        mem, cache = L.temporal_affine_forward(a, self.params["W_mem"], self.params["b_mem"])
        if self.locations:
            mem += self.params["pos_mem"]
        return mem, cache

    def _memory_backward(self, dmem, cache):
        _, dW, db = L.temporal_affine_backward(dmem, cache)
        g = {"W_mem": dW, "b_mem": db}
        if self.locations:
            g["pos_mem"] = dmem.sum(axis=0)
        return g

    def _forward(self, features, captions_in, masks):
        """The decoder over whole captions: h (N, T, E), the states that are scored,
        and a backward ``(dh) -> grads`` of every parameter but W_vocab, b_vocab."""
        xp = self.xp
        N, T = captions_in.shape
        mem, c_mem = self._memory(features)
        x, c_embed = L.word_embedding_forward(captions_in, self.params["W_embed"])
        x, _ = TL.positional_encoding_forward(x)
        x = L.dropout_backward(x, masks[0])  # the same product as the forward: x * mask
        causal = xp.tril(xp.ones((T, T), dtype=bool))
        caches = []
        for layer in range(self.num_layers):
            x, c = TL.decoder_layer_forward(x, mem, self._layer(layer), self.num_heads, causal,
                                            masks=masks[1 + 6 * layer: 7 + 6 * layer])
            caches.append(c)

        def backward(dh):
            grads = {}
            dmem = xp.zeros_like(mem)
            for layer in reversed(range(self.num_layers)):
                dh, dm, g = TL.decoder_layer_backward(dh, caches[layer])
                dmem += dm
                grads.update({f"l{layer}_{k}": v for k, v in g.items()})
            dh = TL.positional_encoding_backward(L.dropout_backward(dh, masks[0]), None)
            grads["W_embed"] = L.word_embedding_backward(dh, c_embed)
            grads.update(self._memory_backward(dmem, c_mem))
            return grads

        return x, backward

    def _loss_rows(self, features, captions, masks, batch_size, token_weights=None, forbidden=None):
        """``loss`` for some rows of the batch (see ``CaptioningModel._loss_rows``)."""
        h, backward = self._forward(features, captions[:, :-1], masks)
        loss, dh, grads = self._vocab_loss(h, captions[:, 1:], batch_size, token_weights, forbidden)
        grads.update(backward(dh))
        return loss, grads

    def scores(self, features, captions_in, masks=None):
        """The forward pass over whole captions, like the course's ``forward``:
        features (N, D) or (N, L, D), captions_in (N, T) ids (starting with <START>);
        masks as ``loss``'s (None: no dropout). Returns scores (N, T, V)."""
        xp = self.xp
        features = xp.asarray(features, dtype=self.dtype)
        captions_in = xp.asarray(captions_in)
        N, T = captions_in.shape
        self._check_features(features)
        masks = self._draw_masks(N, T, 0.0) if masks is None else self._check_masks(masks, (N, T))
        h, _ = self._forward(features, captions_in, masks)
        out, _ = L.temporal_affine_forward(h, self.params["W_vocab"], self.params["b_vocab"])
        return out

    def _check_features(self, features):
        if self.locations:
            if features.ndim != 3 or features.shape[1:] != (self.locations, self.input_dim):
                raise ValueError(f"features must be spatial maps (N, {self.locations}, {self.input_dim}); "
                                 f"got shape {tuple(features.shape)} (make them with `rnncap features "
                                 f"--maps`, with the encoder and PCA the model was trained on)")
        elif features.ndim != 2 or features.shape[1] != self.input_dim:
            raise ValueError(f"features must be (N, {self.input_dim}); got shape {tuple(features.shape)} "
                             f"(was the model trained on another encoder or PCA size?)")

    # -- decoding ----------------------------------------------------------------------

    def init_state(self, features):
        """Decoder state for a batch of images: each layer's memory keys and values,
        computed once; no position decoded yet."""
        xp = self.xp
        features = xp.asarray(features, dtype=self.dtype)
        self._check_inputs(features, xp.zeros((features.shape[0], 2), dtype=np.int64))
        N, E = features.shape[0], self.embed_dim
        with _one_blas_thread(xp):
            mem, _ = self._memory(features)
            memory_kv = tuple(TL.memory_keys_values(mem, self._layer(layer)) for layer in range(self.num_layers))
        empty = tuple(xp.zeros((N, 0, E), dtype=self.dtype) for _ in range(self.num_layers))
        return TransformerState(xp.zeros((N, mem.shape[1]), dtype=self.dtype), empty, empty, memory_kv, 0)

    def step(self, words, state, masks=None):
        """One decoding step through the training layers: words (n,) ids at position
        ``state.t``; the earlier positions' keys and values come from the state.
        Returns scores (n, V) and the new state (its ``alpha`` (n, L): where the last
        layer's cross-attention looked, averaged over heads)."""
        if masks is not None:
            self._check_masks(masks, words.shape)
        p = self.params
        with _one_blas_thread(self.xp):
            x = p["W_embed"][words][:, None, :]
            x, _ = TL.positional_encoding_forward(x, start=state.t)
            keys, values = [], []
            for layer in range(self.num_layers):
                x, c = TL.decoder_layer_forward(x, None, self._layer(layer), self.num_heads,
                                                past=(state.keys[layer], state.values[layer]),
                                                memory_kv=state.memory_kv[layer])
                keys.append(c["keys"][0])
                values.append(c["keys"][1])
            alpha = c["cross_weights"][:, :, 0, :].mean(axis=1)
            scores, _ = L.affine_forward(x[:, 0, :], p["W_vocab"], p["b_vocab"])
        return scores, state._replace(t=state.t + 1, keys=tuple(keys), values=tuple(values), alpha=alpha)

    def select_state(self, state, rows):
        """The hypotheses ``rows`` (n',) of a state, in that order; each image's memory
        is kept once, so rows must stay grouped by image (as beam search does)."""
        return state._replace(keys=tuple(k[rows] for k in state.keys),
                              values=tuple(v[rows] for v in state.values), alpha=state.alpha[rows])

    # -- (de)serialisation ---------------------------------------------------------------

    def config(self):
        return {
            "vocab_size": self.vocab_size, "input_dim": self.input_dim,
            "embed_dim": self.embed_dim, "num_heads": self.num_heads,
            "num_layers": self.num_layers, "ffn_dim": self.ffn_dim, "locations": self.locations,
            "null_id": self.null_id, "start_id": self.start_id, "end_id": self.end_id,
            "dtype": self.dtype.name, "dropout": self.dropout,
            "label_smoothing": self.label_smoothing,
        }
