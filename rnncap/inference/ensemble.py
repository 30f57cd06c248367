"""Ensembles: several trained captioners decoding as one.

At every step each member scores the next word from its own state, and the ensemble's
scores are the members' next-word distributions averaged: the mean of their
log-probabilities ("logprob", a normalised geometric mean) or the log of the mean of
their probabilities ("prob"). The ensemble has the decoders' contract (``init_state``,
``step``, ``select_state``, ``xp`` and the special ids), so greedy decoding, sampling,
beam search, ``sequence_log_prob``, ``Captioner`` and the web page take it as they take
one model, with no special case.

Members may be of different kinds (the h0 LSTM, the attention LSTM, any model with the
contract) and read different features: ``MemberFeatures`` holds one row-aligned array
per member and slices like one array, so the decoders' batching works unchanged. A
plain array is given to every member.

Read top to bottom: the features, the model, then loading several checkpoints as one.
"""
from __future__ import annotations

import numpy as np

from ..errors import CheckpointError
from .decoding import log_softmax

AVERAGES = ("logprob", "prob")


class MemberFeatures:
    """One feature array per member, row n of each the same image: (N, D) for an h0
    member, (N, L, D) for an attention member. ``len`` and indexing by rows act on all
    of them at once."""

    def __init__(self, arrays):
        self.arrays = tuple(arrays)
        if not self.arrays or len({len(a) for a in self.arrays}) != 1:
            raise ValueError(f"member features must be one or more arrays of the same number of rows, "
                             f"got {[len(a) for a in self.arrays]}")

    def __len__(self):
        return len(self.arrays[0])

    def __getitem__(self, rows):
        return MemberFeatures(a[rows] for a in self.arrays)


class Ensemble:
    """Several captioners sharing a vocabulary, decoding as one model.

    members: models with the decoders' contract, all with the same special ids and
    vocabulary size; average: one of AVERAGES; names: how to call each member (its
    checkpoint), for messages and ``/api/model``.

    State: a tuple of the members' states. ``step`` returns (N, V) float64 log-scores:
    the averaged log-probabilities ("prob": exactly normalised; "logprob": normalised up
    to a constant per row, which every decoder's softmax removes).
    """

    def __init__(self, members, average="logprob", names=None):
        self.members = list(members)
        if not self.members:
            raise ValueError("an ensemble needs at least one member")
        if average not in AVERAGES:
            raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
        self.average = average
        self.names = list(names) if names is not None else [f"member {i}" for i in range(len(self.members))]
        first = self.members[0]
        for name, m in zip(self.names[1:], self.members[1:]):
            ids = lambda x: (x.null_id, x.start_id, x.end_id, x.vocab_size)  # noqa: E731
            if ids(m) != ids(first):
                raise ValueError(f"{name}: special ids and vocabulary size {ids(m)} differ from "
                                 f"{self.names[0]}'s {ids(first)}")
        self.null_id, self.start_id, self.end_id = first.null_id, first.start_id, first.end_id
        self.vocab_size = first.vocab_size

    @property
    def xp(self):
        return self.members[0].xp

    def to(self, device):
        for m in self.members:
            m.to(device)
        return self

    def member_features(self, features):
        """The features of each member: a ``MemberFeatures``' arrays, else ``features``
        for every member."""
        if isinstance(features, MemberFeatures):
            if len(features.arrays) != len(self.members):
                raise ValueError(f"{len(features.arrays)} feature arrays for {len(self.members)} members")
            return features.arrays
        return (features,) * len(self.members)

    def init_state(self, features):
        """A tuple of the members' initial states for N images."""
        return tuple(m.init_state(f) for m, f in zip(self.members, self.member_features(features)))

    def step(self, words, state, masks=None):
        """words (N,), state: from ``init_state`` or ``step``. Returns the averaged
        log-scores (N, V) float64 and the new state. An ensemble decodes without
        dropout, so ``masks`` must be None."""
        if masks is not None:
            raise ValueError("an ensemble decodes without dropout masks")
        xp = self.xp
        logps, states = [], []
        for m, s in zip(self.members, state):
            scores, s = m.step(words, s)
            logps.append(log_softmax(scores, xp))
            states.append(s)
        return self.combine(logps), tuple(states)

    def combine(self, logps):
        """The members' (N, V) log-probabilities -> the ensemble's (N, V) log-scores."""
        xp = self.xp
        stack = xp.stack(logps)
        if self.average == "logprob":
            return stack.mean(axis=0)
        top = stack.max(axis=0)  # log of the mean of probabilities, without underflow
        return top + xp.log(xp.exp(stack - top).mean(axis=0))

    def select_state(self, state, rows):
        """Rows (N',) of each member's state, in that order (beam search)."""
        from .decoding import select_rows

        return tuple(select_rows(m, s, rows) for m, s in zip(self.members, state))

    def in_shards(self, fn, features):
        """``fn`` over row shards side by side, as the first member would split them
        (``CaptioningModel.in_shards``); one call when it cannot split."""
        split = getattr(self.members[0], "in_shards", None)
        if split is None:
            return [fn(features)]
        return split(lambda rows: fn(features[rows]), np.arange(len(features)))


# ---- several checkpoints as one -------------------------------------------------------

def check_same_vocab(vocabs, paths):
    """One line naming both files when a member's vocabulary is not the first's."""
    first = vocabs[0]
    for vocab, path in zip(vocabs[1:], paths[1:]):
        if vocab != first:
            a, b = first.idx_to_word, vocab.idx_to_word
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            where = (f"word {at}: {a[at]!r} vs {b[at]!r}" if at < min(len(a), len(b))
                     else f"{len(a)} vs {len(b)} words")
            raise CheckpointError(f"{paths[0]} and {path} have different vocabularies ({where}); "
                                  f"an ensemble's members must share one (train them on the same "
                                  f"data with the same --min-count)")


def ensemble_of(checkpoints, paths, average="logprob"):
    """An ``Ensemble`` of loaded checkpoints (``rnncap.checkpoint.Checkpoint``), named by
    their paths, after checking they share a vocabulary."""
    check_same_vocab([c.vocab for c in checkpoints], [str(p) for p in paths])
    return Ensemble([c.model for c in checkpoints], average=average, names=[str(p) for p in paths])


def ensemble_decode(checkpoints, average=None):
    """The decoding defaults of an ensemble: the first checkpoint's ``DecodeConfig``,
    with the members' bad endings joined (they share a vocabulary, and so the words
    that cannot end a caption) and ``average`` (None: the first checkpoint's)."""
    import dataclasses

    from ..config import decode_config

    decode = decode_config(checkpoints[0].configs)
    bad = sorted({w for c in checkpoints for w in decode_config(c.configs).bad_endings})
    return dataclasses.replace(decode, bad_endings=bad, ensemble=average or decode.ensemble)
