"""The PyTorch twin of rnncap's LSTM captioner: the same model, written with torch.nn.

It is the yardstick for the Flickr8k experiment (experiments/flickr8k.py): trained on
the same features, vocabulary and captions, it tells whether rnncap's hand-written
NumPy LSTM learns as well as an autograd implementation of the same network.

The network is rnncap's ``CaptioningModel`` (cell "lstm"):

    h0 = features @ W_proj + b_proj, c0 = 0
    x_t = dropout(embed(word_t));  h_t = LSTM(x_t, h_{t-1}, c_{t-1})
    scores_t = dropout(h_t) @ W_vocab + b_vocab

with PyTorch's own default initialisation (the twin is "what one would write in
PyTorch", not a copy of rnncap's numbers) and the loss summed over the words of a
caption and averaged over captions, as rnncap does. Training: Adam, the learning rate
multiplied by ``lr_decay`` after every epoch, global-norm clipping, and the epoch
with the best validation score kept.

``to_rnncap`` converts a trained twin into a ``CaptioningModel`` (PyTorch orders the
LSTM gates i, f, g, o; rnncap orders them i, f, o, g), so the twin is decoded and
scored by exactly the code that decodes and scores rnncap's own models.
"""
from __future__ import annotations

import copy
import math
import time

import numpy as np


def build_twin(vocab_size, input_dim, wordvec_dim=512, hidden_dim=512, dropout=0.5,
               null_id=0, label_smoothing=0.0, seed=0):
    """A fresh twin (a ``torch.nn.Module``) initialised from ``seed``."""
    import torch
    from torch import nn

    class TwinCaptioner(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(input_dim, hidden_dim)
            self.embed = nn.Embedding(vocab_size, wordvec_dim)
            self.lstm = nn.LSTM(wordvec_dim, hidden_dim, batch_first=True)
            self.drop = nn.Dropout(dropout)
            self.vocab = nn.Linear(hidden_dim, vocab_size)
            self.null_id = null_id
            self.label_smoothing = label_smoothing

        def forward(self, features, captions_in):
            """features (N, D), captions_in (N, T) -> scores (N, T, V)."""
            h0 = self.proj(features).unsqueeze(0)
            x = self.drop(self.embed(captions_in))
            h, _ = self.lstm(x, (h0, torch.zeros_like(h0)))
            return self.vocab(self.drop(h))

        def loss(self, features, captions):
            """captions (N, T+1) starting with <START>; <NULL> targets do not count."""
            scores = self(features, captions[:, :-1])
            target = captions[:, 1:]
            per_word = nn.functional.cross_entropy(
                scores.reshape(-1, scores.shape[-1]), target.reshape(-1), reduction="none",
                label_smoothing=self.label_smoothing)
            mask = (target.reshape(-1) != self.null_id).to(per_word.dtype)
            return (per_word * mask).sum() / captions.shape[0]

    torch.manual_seed(seed)
    return TwinCaptioner()


def to_rnncap(twin, null_id=0, start_id=1, end_id=2):
    """The twin's weights as an rnncap ``CaptioningModel`` (no dropout: for decoding
    and scoring)."""
    from rnncap.models.model import CaptioningModel

    sd = {k: v.detach().cpu().double().numpy() for k, v in twin.state_dict().items()}
    V, W = sd["embed.weight"].shape
    H, D = sd["proj.weight"].shape
    model = CaptioningModel(V, D, W, H, cell_type="lstm", null_id=null_id, start_id=start_id,
                            end_id=end_id, seed=0)

    def gates(a):  # rows (4H, ...) in torch's i, f, g, o -> rnncap's i, f, o, g
        i, f, g, o = np.split(a, 4, axis=0)
        return np.concatenate([i, f, o, g], axis=0)

    p = {
        "W_proj": sd["proj.weight"].T, "b_proj": sd["proj.bias"],
        "W_embed": sd["embed.weight"],
        "Wx": gates(sd["lstm.weight_ih_l0"]).T, "Wh": gates(sd["lstm.weight_hh_l0"]).T,
        "b": gates(sd["lstm.bias_ih_l0"] + sd["lstm.bias_hh_l0"]),
        "W_vocab": sd["vocab.weight"].T, "b_vocab": sd["vocab.bias"],
    }
    model.params = {k: np.ascontiguousarray(v, dtype=model.dtype) for k, v in p.items()}
    return model


def load_rnncap(twin, model):
    """Set the twin's weights to an rnncap ``CaptioningModel``'s (the inverse of
    ``to_rnncap``): with a fresh model, both implementations start from the same numbers."""
    import torch

    p = model.params

    def gates(a):  # columns (..., 4H) in rnncap's i, f, o, g -> rows in torch's i, f, g, o
        i, f, o, g = np.split(np.asarray(a).T, 4, axis=0)
        return np.concatenate([i, f, g, o], axis=0)

    sd = {"proj.weight": p["W_proj"].T, "proj.bias": p["b_proj"], "embed.weight": p["W_embed"],
          "lstm.weight_ih_l0": gates(p["Wx"]), "lstm.weight_hh_l0": gates(p["Wh"]),
          "lstm.bias_ih_l0": gates(p["b"][None, :])[:, 0], "lstm.bias_hh_l0": np.zeros(p["b"].shape),
          "vocab.weight": p["W_vocab"].T, "vocab.bias": p["b_vocab"]}
    twin.load_state_dict({k: torch.tensor(np.ascontiguousarray(v), dtype=torch.float32)
                          for k, v in sd.items()}, strict=True)
    return twin


def train_twin(twin, train, *, lr=3e-3, lr_decay=0.8, batch_size=128, clip=5.0, epochs=15,
               seed=0, val_fn=None, select="val_cider", log=print):
    """Train the twin in place and load the weights of its best epoch back into it.

    train: (features (n, D) float32, captions (M, T+1) int, image_idx (M,)), the same
        arrays rnncap's Trainer takes. Batches come from a generator seeded by
        (seed, epoch).
    val_fn(rnncap_model) -> dict of metrics, called after every epoch on the twin
        converted by ``to_rnncap``; the epoch with the largest ``select`` is kept (the
        last epoch when there is no val_fn).

    Returns the history: a list of per-epoch dicts (epoch, train_loss, seconds, metrics).
    """
    import torch

    feats = torch.from_numpy(np.ascontiguousarray(train[0], dtype=np.float32))
    caps = torch.from_numpy(np.asarray(train[1], dtype=np.int64))
    idx = torch.from_numpy(np.asarray(train[2], dtype=np.int64))
    opt = torch.optim.Adam(twin.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=lr_decay)
    history, best, best_state = [], -math.inf, None
    n = len(caps)
    for epoch in range(epochs):
        twin.train()
        perm = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))
        t0, total = time.perf_counter(), 0.0
        for i in range(0, n, batch_size):
            rows = perm[i:i + batch_size]
            loss = twin.loss(feats[idx[rows]], caps[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(twin.parameters(), clip)
            opt.step()
            total += loss.item() * len(rows)
        sched.step()
        twin.eval()
        rec = {"epoch": epoch + 1, "train_loss": total / n, "seconds": time.perf_counter() - t0}
        if val_fn is not None:
            rec.update(val_fn(to_rnncap(twin, null_id=twin.null_id)))
        history.append(rec)
        log("twin " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in rec.items()))
        score = rec.get(select, epoch)
        if score > best:
            best, best_state = score, copy.deepcopy(twin.state_dict())
    if best_state is not None:
        twin.load_state_dict(best_state)
    twin.eval()
    return history
