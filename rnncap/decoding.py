"""Decoders: turn image features into word ids through the model's ``step``.

Every decoder here drives ``model.init_state`` and ``model.step``, the same step math
that training uses, so there is no second copy of the recurrence to drift.
"""
from __future__ import annotations

import numpy as np

from .backend import to_numpy


def greedy_decode(model, features, max_length=30):
    """Pick the most likely word at every step.

    features: (N, D). Returns (N, max_length) int64 ids on the host: the words after
    <START>, with <END> kept and everything after it set to <NULL>.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    xp = model.xp
    state = model.init_state(features)
    N = state[0].shape[0]
    words = xp.full((N,), model.start_id, dtype=np.int64)
    out = np.full((N, max_length), model.null_id, dtype=np.int64)
    done = np.zeros(N, dtype=bool)
    for t in range(max_length):
        scores, state = model.step(words, state)
        words = scores.argmax(axis=1)
        w = to_numpy(words)
        out[:, t] = np.where(done, model.null_id, w)
        done |= w == model.end_id
        if done.all():
            break
    return out
