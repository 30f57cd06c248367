"""Decoders: turn image features into word ids through the model's ``step``.

Every decoder here drives ``model.init_state`` and ``model.step``, the same step math
that training uses, so there is no second copy of the recurrence to drift.

* ``greedy_decode``   the most likely word at every step;
* ``sample_decode``   a word drawn from the softmax (temperature, optional top-k);
* ``beam_search``     the k best partial captions at every step, all images at once;
  ``beam_decode`` is its top-1 in greedy's padded layout;
* ``sequence_log_prob`` the model's own log-probability of given captions.

Output conventions shared by all decoders: ids never include <START>; a caption stops
at its first <END>, which is kept. By default a decoder reports what the model
prefers, whatever the word. ``banned`` lists ids a decoder must never choose (the
captioning commands pass <NULL>, <START> and <UNK>, so a user never reads "<UNK>");
banning only removes choices: log-probabilities stay those of the model over the
whole vocabulary.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..backend import to_numpy


def _without(scores, banned, xp):
    """scores with the banned columns set to -inf (a copy; the input is untouched)."""
    if not banned:
        return scores
    scores = scores.copy()
    scores[:, xp.asarray(list(banned))] = -xp.inf
    return scores


def _step(model, words, state, masks, t):
    """``model.step`` at step t, with step t's slices of the dropout masks if any."""
    if masks is None:
        return model.step(words, state)
    return model.step(words, state, masks=tuple(m if m is None else m[:, t] for m in masks))


def _decode_word_by_word(model, features, max_length, choose, attention=False, masks=None):
    """The loop greedy decoding and sampling share: feed <START>, let ``choose(scores)``
    pick each next word (N,), stop once every caption has said <END>. ``masks``: None,
    or dropout masks (mask_x (N, max_length, W), mask_h (N, max_length, H)), step t's
    slices passed to ``model.step``.

    Returns (N, max_length) int64 host ids, <NULL> after each caption's <END>; with
    ``attention`` (an attention model) also (N, max_length, L) host float32: where
    each step looked, zeros after the caption's end.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    xp = model.xp
    state = model.init_state(features)
    N = state[0].shape[0]
    words = xp.full((N,), model.start_id, dtype=np.int64)
    out = np.full((N, max_length), model.null_id, dtype=np.int64)
    done = np.zeros(N, dtype=bool)
    alphas = np.zeros((N, max_length, state.alpha.shape[1]), np.float32) if attention else None
    for t in range(max_length):
        scores, state = _step(model, words, state, masks, t)
        words = choose(scores)
        w = to_numpy(words)
        out[:, t] = np.where(done, model.null_id, w)
        if attention:
            alphas[~done, t] = to_numpy(state.alpha)[~done]
        done |= w == model.end_id
        if done.all():
            break
    return (out, alphas) if attention else out


def greedy_decode(model, features, max_length=30, banned=(), return_attention=False):
    """Pick the most likely (allowed) word at every step.

    features: (N, D), or (N, L, D) maps for an attention model. Returns (N, max_length)
    int64 ids on the host: the words after <START>, with <END> kept and everything
    after it set to <NULL>. ``return_attention`` (attention models): returns (ids,
    alphas) with alphas (N, max_length, L), the weights each word was chosen with.
    """
    xp = model.xp
    choose = lambda scores: _without(scores, banned, xp).argmax(axis=1)  # noqa: E731
    parts = _in_shards(
        model, lambda part: _decode_word_by_word(model, part, max_length, choose, return_attention),
        features)
    if return_attention:
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return np.concatenate(parts)


def _in_shards(model, fn, features):
    """``fn`` over groups of images side by side when the model offers it
    (``CaptioningModel.in_shards``: one thread per group, meeting once per call, not
    once per step); else ``[fn(features)]``. Only for decoders whose images do not
    interact (not sampling, whose random draws are shared across the batch)."""
    in_shards = getattr(model, "in_shards", None)
    return in_shards(fn, features) if in_shards is not None else [fn(features)]


def sample_decode(model, features, max_length=30, temperature=1.0, top_k=0, rng=None, banned=(),
                  masks=None):
    """Draw every word from ``softmax(scores / temperature)``.

    features: (N, D). ``top_k`` > 0 keeps only the k highest-scoring words at each step
    (top_k=1 is greedy); ``temperature`` = 0 is greedy too, and small temperatures
    approach it. ``rng``: a ``numpy.random.Generator``, a seed, or None (fresh entropy);
    noise is drawn on the host so a seed gives the same captions on any device.
    ``masks``: dropout masks (mask_x (N, max_length, W), mask_h (N, max_length, H)) to
    draw with, the model's dropout on (self-critical training); None: off.

    Returns (N, max_length) int64 ids laid out like ``greedy_decode``.
    """
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = no limit), got {top_k}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    xp = model.xp

    def choose(scores):
        scores = _without(scores.astype(np.float64), banned, xp)
        N, V = scores.shape
        if 0 < top_k < V:
            kth = -xp.partition(-scores, top_k - 1, axis=1)[:, top_k - 1:top_k]
            scores = xp.where(scores >= kth, scores, -xp.inf)
        if temperature == 0:
            return scores.argmax(axis=1)
        # Inverse CDF: the first word whose cumulative (unnormalised) probability
        # exceeds u * total, u ~ U[0, 1) drawn on the host. One uniform per row: half
        # the time of the Gumbel-max trick's V noise draws, which SCST feels.
        z = scores / temperature
        p = xp.exp(z - z.max(axis=1, keepdims=True))
        cdf = xp.cumsum(p, axis=1)
        u = xp.asarray(rng.random(N)) * cdf[:, -1]
        return (cdf <= u[:, None]).sum(axis=1)

    return _decode_word_by_word(model, features, max_length, choose, masks=masks)


class Hypothesis(NamedTuple):
    """One beam-search caption.

    ids: int64 word ids without <START>; ends with <END> when the caption finished.
    logprob: the model's log-probability of exactly these ids (float).
    score: ``logprob / len(ids) ** length_norm``, what the beam ranks by.
    attention: (len(ids), L) float32, where each word was chosen from (attention
    models, when asked for), else None.
    """
    ids: np.ndarray
    logprob: float
    score: float
    attention: np.ndarray | None = None


def _select_state(model, state, rows):
    """Rows of a decoder state: the model's ``select_state`` (an attention state keeps
    one copy of each image's map), else every array of the tuple indexed."""
    select = getattr(model, "select_state", None)
    return select(state, rows) if select is not None else tuple(s[rows] for s in state)


def beam_search(model, features, beam_size=3, max_length=30, length_norm=0.0, n_best=1, banned=(),
                return_attention=False):
    """Beam search over all images at once.

    features: (N, D). The N*k live hypotheses run through ``model.step`` as one
    (N*k, H) state batch. At each step every hypothesis is extended by every word;
    per image the 2k best extensions are ranked: those that say <END> within the top
    k are set aside as finished, and the k best others carry on. An image stops early
    once its ``n_best``-th finished score beats anything a live hypothesis could still
    reach (its log-probability only falls as it grows; with length normalisation the
    most it can gain is from growing to ``max_length``).

    Ranking score: ``logprob / len ** length_norm`` where len counts the returned ids
    (with <END>); ``length_norm`` = 0 ranks by log-probability alone, larger values
    favour longer captions (0.7 is a common choice).

    Returns a list of N lists of ``Hypothesis(ids, logprob, score)``: the finished
    hypotheses, best score first, and, when fewer than ``n_best`` finished within
    ``max_length`` steps, the best unfinished ones (no <END>, ``max_length`` ids) after
    them. Each list holds ``n_best`` distinct hypotheses (fewer only for a vocabulary
    too small to make that many). ``return_attention`` (attention models) fills each
    hypothesis's ``attention``.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if beam_size < 1 or n_best < 1:
        raise ValueError(f"beam_size and n_best must be >= 1, got {beam_size} and {n_best}")
    if length_norm < 0:
        raise ValueError(f"length_norm must be >= 0, got {length_norm}")
    return [hyps for part in _in_shards(
        model, lambda f: _beam_search(model, f, beam_size, max_length, length_norm, n_best, banned,
                                      return_attention),
        features) for hyps in part]


def _beam_search(model, features, beam_size, max_length, length_norm, n_best, banned, attention):
    xp = model.xp
    k = int(beam_size)
    state = model.init_state(features)
    N = state[0].shape[0]
    if N == 0:  # nothing to search (its reshapes need an image)
        return []
    # rows n*k .. n*k+k-1 are image n
    state = _select_state(model, state, xp.repeat(xp.arange(N), k))
    words = xp.full((N * k,), model.start_id, dtype=np.int64)
    # All k copies start identical; only the first is live, so no hypothesis repeats.
    cum = np.full((N, k), -np.inf)
    cum[:, 0] = 0.0
    tokens = np.zeros((N, k, 0), dtype=np.int64)
    alphas = np.zeros((N, k, 0, state.alpha.shape[1]), np.float32) if attention else None
    finished = [[] for _ in range(N)]
    done = np.zeros(N, dtype=bool)
    rows = np.arange(N)[:, None]

    for t in range(max_length):
        scores, state = model.step(words, state)
        if attention:  # where each live hypothesis looked for the word it now picks
            step_alpha = to_numpy(state.alpha).reshape(N, k, 1, -1)
            alphas = np.concatenate([alphas, step_alpha], axis=2)
        V = scores.shape[1]
        total = xp.asarray(cum).reshape(N * k, 1) + _log_softmax(scores, xp)
        total = _without(total, banned, xp).reshape(N, k * V)
        m = min(2 * k, k * V)
        idx = xp.argpartition(-total, m - 1, axis=1)[:, :m]
        cand = xp.take_along_axis(total, idx, axis=1)
        order = xp.argsort(-cand, axis=1)
        idx, cand = to_numpy(xp.take_along_axis(idx, order, axis=1)), to_numpy(
            xp.take_along_axis(cand, order, axis=1))
        beam, word = idx // V, idx % V
        is_end = word == model.end_id

        newly = is_end & (np.arange(m) < k) & np.isfinite(cand) & ~done[:, None]
        for n, j in zip(*np.nonzero(newly)):
            ids = np.append(tokens[n, beam[n, j]], model.end_id)
            finished[n].append(Hypothesis(ids, float(cand[n, j]),
                                          float(cand[n, j] / len(ids) ** length_norm),
                                          alphas[n, beam[n, j]].copy() if attention else None))

        # Each hypothesis has one <END> extension, so at least k of the 2k are others.
        keep = np.argsort(is_end, axis=1, kind="stable")[:, :k]
        sel_beam = np.take_along_axis(beam, keep, axis=1)
        sel_word = np.take_along_axis(word, keep, axis=1)
        cum = np.take_along_axis(cand, keep, axis=1)
        tokens = np.concatenate([tokens[rows, sel_beam], sel_word[:, :, None]], axis=2)
        if attention:
            alphas = alphas[rows, sel_beam]
        parent = xp.asarray((rows * k + sel_beam).reshape(-1))
        state = _select_state(model, state, parent)
        words = xp.asarray(sel_word.reshape(-1))

        best_reachable = cum[:, 0] / max_length ** length_norm
        for n in np.nonzero(~done)[0]:
            if len(finished[n]) >= n_best:
                nth = sorted((h.score for h in finished[n]), reverse=True)[n_best - 1]
                done[n] = nth >= best_reachable[n]
        if done.all():
            break

    out = []
    L = tokens.shape[2]
    for n in range(N):
        best = sorted(finished[n], key=lambda h: -h.score)[:n_best]
        if len(best) < n_best:
            live = [Hypothesis(tokens[n, j].copy(), float(cum[n, j]), float(cum[n, j] / L ** length_norm),
                               alphas[n, j].copy() if attention else None)
                    for j in range(k) if np.isfinite(cum[n, j])]
            best += sorted(live, key=lambda h: -h.score)[:n_best - len(best)]
        out.append(best)
    return out


def beam_decode(model, features, beam_size=3, max_length=30, length_norm=0.0, banned=()):
    """The top beam-search caption of each image as (N, max_length) int64 ids, padded
    with <NULL> after <END> exactly like ``greedy_decode``."""
    hyps = beam_search(model, features, beam_size=beam_size, max_length=max_length,
                       length_norm=length_norm, n_best=1, banned=banned)
    out = np.full((len(hyps), max_length), model.null_id, dtype=np.int64)
    for n, h in enumerate(hyps):
        out[n, :len(h[0].ids)] = h[0].ids
    return out


def sequence_log_prob(model, features, ids, masks=None):
    """The model's log-probability of given captions, computed through ``step``.

    features: (N, D). ids: (N, T) ids without <START> (as the decoders return them),
    or a list of N 1-D id arrays. A caption runs up to and including its first <END>,
    or to the end of its row; whatever follows the <END> (padding) is ignored.
    ``masks``: dropout masks (mask_x (N, T, W), mask_h (N, T, H)) to apply, as
    ``sample_decode`` takes them; None: off.

    Returns (N,) float64: sum over the caption of log p(word_t | words before, image).
    """
    if isinstance(ids, (list, tuple)):
        rows = [np.asarray(r, dtype=np.int64).reshape(-1) for r in ids]
        T = max((len(r) for r in rows), default=0)
        padded = np.full((len(rows), T), model.null_id, dtype=np.int64)
        for n, r in enumerate(rows):
            padded[n, :len(r)] = r
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        ids = padded
    else:
        ids = np.asarray(to_numpy(ids), dtype=np.int64)
        lengths = np.full(ids.shape[0], ids.shape[1], dtype=np.int64)
    is_end = ids == model.end_id
    has_end = is_end.any(axis=1)
    lengths = np.where(has_end, np.minimum(lengths, is_end.argmax(axis=1) + 1), lengths)

    xp = model.xp
    state = model.init_state(features)
    N, T = ids.shape
    if state[0].shape[0] != N:
        raise ValueError(f"features hold {state[0].shape[0]} images but ids hold {N} captions")
    words = xp.full((N,), model.start_id, dtype=np.int64)
    total = np.zeros(N, dtype=np.float64)
    for t in range(int(lengths.max(initial=0))):
        scores, state = _step(model, words, state, masks, t)
        words = xp.asarray(ids[:, t])
        lp = to_numpy(_log_softmax(scores, xp)[xp.arange(N), words])
        total += np.where(t < lengths, lp, 0.0)
    return total


def _log_softmax(scores, xp):
    """log softmax over the last axis, in float64 so long sums keep their precision."""
    s = scores.astype(np.float64)
    s = s - s.max(axis=1, keepdims=True)
    return s - xp.log(xp.exp(s).sum(axis=1, keepdims=True))
