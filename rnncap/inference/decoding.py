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

``rules`` (a ``Rules``, built by ``rules_for`` from a checkpoint's ``DecodeConfig``)
forbid choices that depend on what a caption already says: ``<END>`` right after a
word that (almost) never ends a training caption, a word right after itself, and,
as an option, a trigram the caption already holds. One function, ``allowed``, applies
``banned`` and the rules for every decoder (greedy, sampling, beam search, and so
self-critical training's sampler), so training and captioning follow the same rules.
Like ``banned``, they only remove choices.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..backend import to_numpy


class Rules(NamedTuple):
    """What a caption may not do next, given the words it already has.

    bad_endings: ids after which <END> is forbidden (words that end almost no
    training caption: "a", "of", "the", colours); no_repeat: no word right after
    itself; block_trigrams: no word that would repeat a trigram of the caption.
    """
    bad_endings: tuple = ()
    no_repeat: bool = False
    block_trigrams: bool = False


NO_RULES = Rules()


def rules_for(vocab, decode):
    """The ``Rules`` a ``DecodeConfig`` asks for, as ids of ``vocab``: with
    ``decode.rules``, its ``bad_endings`` words (those the vocabulary knows) and no
    repeats; trigram blocking with ``decode.block_trigrams``."""
    if decode is None:
        return NO_RULES
    on = bool(getattr(decode, "rules", False))
    ids = vocab.word_to_idx
    bad = tuple(sorted(ids[w] for w in getattr(decode, "bad_endings", ()) or () if w in ids)) if on else ()
    return Rules(bad, on, bool(getattr(decode, "block_trigrams", False)))


def allowed(scores, history, end_id, banned=(), rules=None, xp=np):
    """scores (N, V) with -inf wherever a word may not come next (a copy when anything
    is forbidden; the input is untouched).

    history: (N, t) host int ids each row has written so far (no <START>); banned: ids
    never allowed; rules: a ``Rules`` or None.
    """
    rows, cols = _forbidden(np.asarray(history), end_id, rules or NO_RULES)
    if not banned and not len(rows):
        return scores
    scores = scores.copy()
    if banned:
        scores[:, xp.asarray(list(banned))] = -xp.inf
    if len(rows):
        scores[xp.asarray(rows), xp.asarray(cols)] = -xp.inf
    return scores


def forbidden_in(ids, end_id, banned=(), rules=None):
    """What ``allowed`` forbade at every step of decoded captions: (n, t, w) host int64
    arrays, word w was not allowed as word t of caption n. ids: (N, T) host ids as the
    decoders lay them out (the words after <START>); steps after a caption's <END> are
    left out. Self-critical training passes these to the model's loss, so its gradient
    is that of the distribution the captions were drawn from."""
    ids = np.asarray(ids)
    N, T = ids.shape
    ended = np.cumsum(ids == end_id, axis=1) - (ids == end_id)  # <END>s before step t
    banned = np.asarray(list(banned), dtype=np.int64)
    n, t, w = [], [], []
    for step in range(T):
        live = np.flatnonzero(ended[:, step] == 0)
        rows, cols = _forbidden(ids[live, :step], end_id, rules or NO_RULES)
        rows = np.concatenate([live[rows], np.repeat(live, len(banned))])
        cols = np.concatenate([cols, np.tile(banned, len(live))])
        n.append(rows)
        t.append(np.full(len(rows), step, dtype=np.int64))
        w.append(cols)
    return tuple(np.concatenate(a).astype(np.int64) for a in (n, t, w))


def _forbidden(history, end_id, rules):
    """(rows, words): host index arrays of the (row, next word) pairs the rules forbid."""
    N, t = history.shape
    rows, cols = [], []
    if t >= 1:
        last = history[:, -1]
        if rules.no_repeat:
            rows.append(np.arange(N))
            cols.append(last)
        if rules.bad_endings:
            r = np.nonzero(np.isin(last, rules.bad_endings))[0]
            rows.append(r)
            cols.append(np.full(len(r), end_id, dtype=history.dtype))
    if rules.block_trigrams and t >= 3:
        # Every earlier position i whose pair (w_i, w_i+1) is the caption's last pair:
        # its w_i+2 would complete that trigram a second time.
        hit = (history[:, :-2] == history[:, -2:-1]) & (history[:, 1:-1] == history[:, -1:])
        r, i = np.nonzero(hit)
        rows.append(r)
        cols.append(history[r, i + 2])
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(rows).astype(np.int64), np.concatenate(cols).astype(np.int64)


def _step(model, words, state, masks, t):
    """``model.step`` at step t, with step t's slices of the dropout masks if any."""
    if masks is None:
        return model.step(words, state)
    return model.step(words, state, masks=tuple(m if m is None else m[:, t] for m in masks))


def _decode_word_by_word(model, features, max_length, choose, attention=False, masks=None):
    """The loop greedy decoding and sampling share: feed <START>, let ``choose(scores,
    history)`` pick each next word (N,) given the (N, t) ids written so far, stop once every caption has said <END>. ``masks``: None,
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
    N = state_rows(state)
    words = xp.full((N,), model.start_id, dtype=np.int64)
    out = np.full((N, max_length), model.null_id, dtype=np.int64)
    done = np.zeros(N, dtype=bool)
    alphas = np.zeros((N, max_length, state.alpha.shape[1]), np.float32) if attention else None
    for t in range(max_length):
        scores, state = _step(model, words, state, masks, t)
        words = choose(scores, out[:, :t])
        w = to_numpy(words)
        out[:, t] = np.where(done, model.null_id, w)
        if attention:
            alphas[~done, t] = to_numpy(state.alpha)[~done]
        done |= w == model.end_id
        if done.all():
            break
    return (out, alphas) if attention else out


def state_rows(state):
    """Rows (images or hypotheses) of a decoder state: the first array's, looking
    inside nested states (an ensemble's state holds its members')."""
    while isinstance(state, tuple):
        state = state[0]
    return state.shape[0]


def greedy_decode(model, features, max_length=30, banned=(), return_attention=False, rules=None):
    """Pick the most likely (allowed) word at every step.

    features: (N, D), or (N, L, D) maps for an attention model. Returns (N, max_length)
    int64 ids on the host: the words after <START>, with <END> kept and everything
    after it set to <NULL>. ``return_attention`` (attention models): returns (ids,
    alphas) with alphas (N, max_length, L), the weights each word was chosen with.
    ``rules``: see ``allowed``.
    """
    xp = model.xp
    choose = lambda scores, history: allowed(  # noqa: E731
        scores, history, model.end_id, banned, rules, xp).argmax(axis=1)
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
                  masks=None, rules=None):
    """Draw every word from ``softmax(scores / temperature)``.

    features: (N, D). ``top_k`` > 0 keeps only the k highest-scoring words at each step
    (top_k=1 is greedy); ``temperature`` = 0 is greedy too, and small temperatures
    approach it. ``rng``: a ``numpy.random.Generator``, a seed, or None (fresh entropy);
    noise is drawn on the host so a seed gives the same captions on any device.
    ``masks``: dropout masks (mask_x (N, max_length, W), mask_h (N, max_length, H)) to
    draw with, the model's dropout on (self-critical training); None: off. ``rules``:
    see ``allowed``; the softmax is over the allowed words.

    Returns (N, max_length) int64 ids laid out like ``greedy_decode``.
    """
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = no limit), got {top_k}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    xp = model.xp

    def choose(scores, history):
        scores = allowed(scores.astype(np.float64), history, model.end_id, banned, rules, xp)
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


def select_rows(model, state, rows):
    """Rows of a decoder state: the model's ``select_state`` (an attention state keeps
    one copy of each image's map), else every array of the tuple indexed."""
    select = getattr(model, "select_state", None)
    return select(state, rows) if select is not None else tuple(s[rows] for s in state)


def beam_search(model, features, beam_size=3, max_length=30, length_norm=0.0, n_best=1, banned=(),
                return_attention=False, rules=None):
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
    hypothesis's ``attention``. ``rules``: see ``allowed`` (applied to each
    hypothesis's own words).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if beam_size < 1 or n_best < 1:
        raise ValueError(f"beam_size and n_best must be >= 1, got {beam_size} and {n_best}")
    if length_norm < 0:
        raise ValueError(f"length_norm must be >= 0, got {length_norm}")
    return [hyps for part in _in_shards(
        model, lambda f: _beam_search(model, f, beam_size, max_length, length_norm, n_best, banned,
                                      return_attention, rules),
        features) for hyps in part]


def _beam_search(model, features, beam_size, max_length, length_norm, n_best, banned, attention, rules):
    xp = model.xp
    k = int(beam_size)
    state = model.init_state(features)
    N = state_rows(state)
    if N == 0:  # nothing to search (its reshapes need an image)
        return []
    # rows n*k .. n*k+k-1 are image n
    state = select_rows(model, state, xp.repeat(xp.arange(N), k))
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
        total = xp.asarray(cum).reshape(N * k, 1) + log_softmax(scores, xp)
        total = allowed(total, tokens.reshape(N * k, -1), model.end_id, banned, rules,
                        xp).reshape(N, k * V)
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
        state = select_rows(model, state, parent)
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


def beam_decode(model, features, beam_size=3, max_length=30, length_norm=0.0, banned=(), rules=None):
    """The top beam-search caption of each image as (N, max_length) int64 ids, padded
    with <NULL> after <END> exactly like ``greedy_decode``."""
    hyps = beam_search(model, features, beam_size=beam_size, max_length=max_length,
                       length_norm=length_norm, n_best=1, banned=banned, rules=rules)
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
    if state_rows(state) != N:
        raise ValueError(f"features hold {state_rows(state)} images but ids hold {N} captions")
    words = xp.full((N,), model.start_id, dtype=np.int64)
    total = np.zeros(N, dtype=np.float64)
    for t in range(int(lengths.max(initial=0))):
        scores, state = _step(model, words, state, masks, t)
        words = xp.asarray(ids[:, t])
        lp = to_numpy(log_softmax(scores, xp)[xp.arange(N), words])
        total += np.where(t < lengths, lp, 0.0)
    return total


def log_softmax(scores, xp):
    """log softmax over the last axis, in float64 so long sums keep their precision."""
    s = scores.astype(np.float64)
    s = s - s.max(axis=1, keepdims=True)
    return s - xp.log(xp.exp(s).sum(axis=1, keepdims=True))


# ---- the commands' decoding flags ------------------------------------------------------

def add_rule_arguments(p):
    """--rules/--no-rules and --block-trigrams/--no-block-trigrams, for every command
    that decodes; unset, the checkpoint's ``DecodeConfig`` decides."""
    from argparse import BooleanOptionalAction

    p.add_argument("--rules", action=BooleanOptionalAction, default=None,
                   help="no <END> after a word that (almost) never ends a training caption, no word "
                        "right after itself (default: the checkpoint's; on)")
    p.add_argument("--block-trigrams", action=BooleanOptionalAction, default=None,
                   help="no trigram twice in a caption (default: the checkpoint's; on)")


def with_rule_arguments(decode, args):
    """``decode`` (a ``DecodeConfig``) with the rule flags ``args`` set (a copy)."""
    import dataclasses

    given = {k: getattr(args, k, None) for k in ("rules", "block_trigrams")}
    return dataclasses.replace(decode, **{k: v for k, v in given.items() if v is not None})
