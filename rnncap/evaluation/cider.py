"""CIDEr-D in NumPy: the COCO toolkit's CIDEr-D, vectorised, for model selection and rewards.

The math is pycocoevalcap's ``CiderScorer`` (the ``Cider`` class that ``coco_metrics``
reports), to rounding:

* each caption becomes four term-frequency vectors, one per n-gram order n = 1..4;
* an n-gram g weighs ``tf(g) * (log(N) - log(max(1, df(g))))``: df(g) counts the
  *reference sets* (images) in which some reference contains g, N is the number of
  reference sets; an n-gram found in no reference set has df 0, so weight ``tf * log N``;
* against one reference, per order: ``sum_g min(h_g, r_g) * r_g / (|h| |r|)``
  (the "D" clipping), left undivided when either norm is 0 (it is then 0 anyway);
* times the Gaussian length penalty ``exp(-(l_h - l_r)**2 / (2 * sigma**2))``, sigma 6.
  The toolkit counts length in bigrams (its ``n == 1`` index), words - 1, so its
  difference is the difference in words whenever both captions have a word; with an
  empty caption there is no n-gram and the cosine is 0 whatever the penalty, so words do;
* mean over the 4 orders, mean over the references, times 10.

Two sources of document frequencies, one class:

* ``cider_d(candidates, references)``: df and N from the evaluated references, the
  toolkit's behaviour (for reported numbers);
* ``CiderD(corpus)``: df and N fixed from a corpus of reference sets (e.g. the train
  references), which is what training rewards use. ``scorer.score(candidates, ref_ids)``
  scores against corpus reference sets whose vectors were computed once, in the
  constructor; ``scorer.score(candidates, references)`` takes other references too.

Captions are token lists (plain strings; a token such as ``"<END>"`` is just a word).

How it is fast: tokens become integer ids through one dict; an n-gram of order k is
the integer pair (id of its first k-1 words, id of its last word), packed into one
int64 and numbered by its rank in the sorted table of the corpus's n-grams (exact: no
hashing, no collisions; n-grams the corpus lacks get fresh ids, unique within a call).
A batch of sentences is then an inverted index, one entry per distinct (n-gram,
sentence) sorted by n-gram, so a candidate's n-gram finds the references of its image
that hold it with two ``np.searchsorted`` calls; where each candidate sits right after
its own references in one index (``cider_d``, explicit references) they are the entries
just before its own. Counting, document frequencies, norms and the clipped dot products
are sorts, run lengths and ``np.bincount`` over flat arrays: no Python work per n-gram,
only per token (the dict lookup) and per call.
"""
from __future__ import annotations

from collections import defaultdict
from itertools import chain, count

import numpy as np

from ..errors import DataError

N_ORDERS = 4        # pycocoevalcap always cooks 1..4-grams (its n argument cannot change it)
SIGMA = 6.0
# Entry keys: (order << 30 | n-gram id) << 31 | sentence, so entries sort by order, then
# n-gram, then sentence: 2 + 30 + 31 bits. N-gram ids stay below 2**30, sentences below 2**31.
_ID_BITS, _SENT_BITS = 30, 31
_SENT_MASK = (1 << _SENT_BITS) - 1
_ID_MASK = (1 << _ID_BITS) - 1
_TOKEN_BASE = 1 << 31  # exact key of an unknown n-gram: prefix id * 2**31 + last token id
_RADIX_TOKENS = 1 << 16  # up to this many distinct tokens, unigrams are sorted as uint16


def cider_d(candidates, references, sigma=SIGMA):
    """The toolkit's CIDEr-D of one candidate per image against that image's references,
    with document frequencies from these references.

    candidates: n token lists; references: n lists of token lists (at least one each).
    Returns (mean, per_image): a float and an (n,) float64 array.
    """
    if len(candidates) != len(references):
        raise DataError(f"{len(candidates)} candidates but {len(references)} reference sets")
    if len(candidates) == 0:
        raise DataError("no captions to score")
    # The candidates go through the constructor's one pass, each after its references.
    scorer = CiderD(references, sigma=sigma, _candidates=candidates)
    scores = scorer._own_scores(scorer._refs, scorer._set_start, scorer._set_size)
    return float(scores.mean()), scores


class CiderD:
    """CIDEr-D with document frequencies fixed from ``corpus_references`` (a list of
    reference sets, each a list of token lists).

    ``score(candidates, references)``: candidates[i] is scored against references[i];
    references is either an integer array of indices into the corpus's reference sets
    (the fast path: their vectors are precomputed) or a list of reference sets (lists of
    token lists; their n-grams that the corpus lacks have df 0). Returns (n,) float64.
    """

    def __init__(self, corpus_references, sigma=SIGMA, _candidates=None):
        sentences, sizes, starts = _flatten(corpus_references, _candidates)
        if not len(sizes):
            raise DataError("CIDEr-D needs at least one reference set for its document frequencies")
        self.sigma = float(sigma)
        self.n_sets = len(sizes)
        self.log_n = float(np.log(float(self.n_sets)))
        # The corpus's tokens get ids 0..V-1; its distinct (k+1)-grams are _tables[k]
        # (sorted keys ``prefix id * V + last token id``), each n-gram's id its rank there.
        # Unigram ids are token ids. _sizes[k]: ids of order k; more are fresh ones.
        self._token_ids = {}
        self._tables = [None] * N_ORDERS
        self._sizes = np.zeros(N_ORDERS, dtype=np.int64)

        self._set_start, self._set_size = starts, sizes
        # _candidates (cider_d's) share the pass, each right after its references; their
        # n-grams enter the tables (with df 0 unless a reference has them too).
        self._refs = _Bag(*self._ngrams(sentences, build=True))

        # Document frequency: in how many reference sets each n-gram occurs. All orders
        # share one array (order k from _offset[k]), plus a spare cell with df 0.
        self._offset = np.cumsum(self._sizes) - self._sizes
        cell = self._cells(self._refs)
        # Entries run by n-gram, then sentence, so by (n-gram, set): count the set changes.
        # A candidate comes last in its set, so it starts a set's run only when none of
        # the set's references has the n-gram: such a run does not count.
        per_set = np.full(self.n_sets, 1 if _candidates is not None else 0) + sizes
        doc = np.repeat(np.arange(self.n_sets, dtype=np.int64), per_set)[self._refs.sent]
        first = np.ones(len(cell), dtype=bool)
        first[1:] = (cell[1:] != cell[:-1]) | (doc[1:] != doc[:-1])
        if _candidates is not None:
            first &= self._refs.sent != (starts + sizes)[doc]
        self._df = np.bincount(cell[first], minlength=int(self._sizes.sum()) + 1).astype(np.float64)
        self._idf = self.log_n - np.log(np.maximum(1.0, self._df))
        self._weigh(self._refs, cell)

    def __len__(self):
        return self.n_sets

    def document_frequency(self, ngram):
        """df of one n-gram (a sequence of 1..4 tokens) in the corpus: 0 if unseen."""
        ngram = list(ngram)
        if not 1 <= len(ngram) <= N_ORDERS:
            raise ValueError(f"an n-gram has 1..{N_ORDERS} tokens, got {len(ngram)}")
        bag = _Bag(*self._ngrams([ngram]))
        k = len(ngram) - 1
        g = int(bag.gid(k)[0])
        return float(self._df[self._offset[k] + g]) if g < self._sizes[k] else 0.0

    def score(self, candidates, references):
        """CIDEr-D of candidates[i] against references[i] (see the class docstring)."""
        ref_ids = _as_ref_ids(references)
        if ref_ids is not None:
            if len(ref_ids) != len(candidates):
                raise DataError(f"{len(candidates)} candidates but {len(ref_ids)} reference ids")
            if len(ref_ids) and (ref_ids.min() < 0 or ref_ids.max() >= self.n_sets):
                raise IndexError(f"reference ids must lie in 0..{self.n_sets - 1}")
            return self._scores(self._bag(candidates), self._refs, *self._ref_runs(ref_ids))
        # One pass over candidates and references, so that n-grams unseen in the corpus
        # get the same fresh ids on both sides.
        sentences, counts, starts = _flatten(references, candidates)
        if not len(counts):
            return np.zeros(0)
        return self._own_scores(self._bag(sentences), starts, counts)

    def _ref_runs(self, ref_ids):
        """Where the references of each of the given corpus sets lie in ``self._refs``."""
        return self._set_start[ref_ids], self._set_size[ref_ids]

    def _scores(self, cands, refs, starts, counts):
        """Candidate i (sentence i of ``cands``) against the corpus references, sentences
        starts[i] .. starts[i] + counts[i] - 1 of ``refs``: (n,) CIDEr-D."""
        if len(counts) == 0:
            return np.zeros(0)
        # Only entries that can add to a dot product: weight > 0 (idf is 0 when every
        # reference set has the n-gram) and an n-gram of the corpus's references.
        useful = np.flatnonzero((cands.w > 0) & cands.in_corpus)
        cand = cands.sent[useful]
        ngram = cands.key[useful] & ~_SENT_MASK  # (order, n-gram) with the sentence cleared
        # The entries of this n-gram in this candidate's references: one run of refs.key.
        lo = np.searchsorted(refs.key, ngram | starts[cand])
        hi = np.searchsorted(refs.key, ngram | (starts[cand] + counts[cand]))
        hit, at = _expand(lo, hi - lo)
        return self._cider(cands, np.arange(len(counts)), refs, starts, counts, cand[hit], useful[hit], at)

    def _own_scores(self, bag, starts, counts):
        """Candidates that sit in ``bag`` right after their references: candidate i is
        sentence starts[i] + counts[i], its references the counts[i] before it. In an
        n-gram's run of entries (sorted by sentence) the references that have the
        n-gram come just before the candidate's entry, so a short backward scan finds
        every match, without a search."""
        cand_sent = starts + counts
        cand_of = np.full(len(bag.length), -1, dtype=np.int64)
        cand_of[cand_sent] = np.arange(len(counts))
        entry = np.flatnonzero((cand_of[bag.sent] >= 0) & (bag.w > 0))
        cand = cand_of[bag.sent[entry]]
        # An earlier entry has this n-gram in one of these references iff its key is at
        # least (this n-gram, the first reference): keys sort by n-gram, then sentence.
        bound = (bag.key[entry] & ~_SENT_MASK) | starts[cand]
        hits, ats, alive = [], [], np.arange(len(entry))
        for j in range(1, int(counts.max()) + 1):
            at = entry[alive] - j
            alive = alive[(at >= 0) & (bag.key[np.maximum(at, 0)] >= bound[alive])]
            if not len(alive):
                break
            hits.append(alive)
            ats.append(entry[alive] - j)
        hit = np.concatenate(hits) if hits else np.zeros(0, dtype=np.int64)
        at = np.concatenate(ats) if ats else np.zeros(0, dtype=np.int64)
        return self._cider(bag, cand_sent, bag, starts, counts, cand[hit], entry[hit], at)

    def _cider(self, cands, cand_sent, refs, starts, counts, cand, entry, at):
        """CIDEr-D from the matches: entry ``entry`` of candidate ``cand`` (sentence
        cand_sent[cand] of ``cands``) has the n-gram of entry ``at`` of ``refs``, whose
        sentence is one of starts[cand] .. starts[cand] + counts[cand] - 1. (n,)."""
        h, r = cands.w[entry], refs.w[at]
        pair_start = np.cumsum(counts) - counts
        pair = pair_start[cand] + refs.sent[at] - starts[cand]
        order = cands.key[entry] >> (_ID_BITS + _SENT_BITS)
        P = int(counts.sum())
        dot = np.bincount(pair * N_ORDERS + order, np.minimum(h, r) * r,
                          minlength=P * N_ORDERS).reshape(P, N_ORDERS)
        pair_cand, pair_ref = _expand(starts, counts)
        norm_h, norm_r = cands.norm[cand_sent[pair_cand]], refs.norm[pair_ref]
        # The toolkit divides only when both norms are non-zero (the dot is 0 otherwise).
        both = (norm_h != 0) & (norm_r != 0)
        val = np.where(both, dot / np.where(both, norm_h * norm_r, 1.0), dot)
        delta = cands.length[cand_sent[pair_cand]] - refs.length[pair_ref]
        val *= np.exp(-(delta ** 2) / (2 * self.sigma ** 2))[:, None]
        # Mean over orders and references, x 10.
        total = np.bincount(pair_cand, val.sum(axis=1), minlength=len(counts))
        return 10.0 * total / (N_ORDERS * counts)

    # ---- n-grams to ids to tf-idf vectors ----

    def _bag(self, sentences):
        bag = _Bag(*self._ngrams(sentences))
        self._weigh(bag)
        return bag

    def _cells(self, bag):
        """Each entry's cell in the df/idf arrays: order k's n-gram g at _offset[k] + g;
        fresh ids (never seen in the corpus) at the spare last cell, which has df 0."""
        cell = np.empty(len(bag.key), dtype=np.int64)
        spare = int(self._sizes.sum())
        for k, run in enumerate(bag.runs):
            gid = bag.gid(k)
            cell[run] = self._offset[k] + gid
            fresh = gid >= self._sizes[k]
            if fresh.any():
                cell[run][fresh] = spare
        return cell

    def _weigh(self, bag, cell=None):
        """tf-idf values and norms (the spare cell's idf is log N)."""
        cell = self._cells(bag) if cell is None else cell
        bag.in_corpus = self._df[cell] > 0
        bag.weigh(self._idf[cell])

    def _ngrams(self, sentences, build=False):
        """Entries (distinct n-gram, sentence) of the sentences: sorted keys (see _ID_BITS)
        with term frequencies, and the sentence lengths in words (the toolkit counts
        bigrams, words - 1: the same length differences whenever both captions have a
        word, and an empty caption scores 0 whatever its penalty). build=True fills the
        tables (constructor only)."""
        if str in set(map(type, sentences)):
            raise TypeError("captions must be token lists, not strings (split them first)")
        lengths = np.fromiter(map(len, sentences), dtype=np.int64, count=len(sentences))
        tok = self._tokens(chain.from_iterable(sentences), int(lengths.sum()), build)
        owner = np.repeat(np.arange(len(sentences), dtype=np.int64), lengths)
        left = np.repeat(np.cumsum(lengths), lengths) - np.arange(len(tok)) - 1  # words after
        keys, tfs, prefix = [], [], tok
        for k in range(N_ORDERS):
            pos = np.flatnonzero(left >= k) if k else np.arange(len(tok))  # (k+1)-gram starts
            if not len(pos):
                break
            last = tok[pos + k]
            if build:
                # One sort numbers the n-grams and, since windows of one sentence sit
                # together within an n-gram's run, gives the entries in key order too.
                if k == 0 and self._sizes[0] <= _RADIX_TOKENS:
                    # Unigram ids are the token ids: a stable (radix) sort of them as
                    # 16-bit numbers, about twice as fast as the general one.
                    by_key = np.argsort(last.astype(np.uint16), kind="stable")
                    group = last[by_key]
                else:
                    key = last if k == 0 else prefix[pos] * self._sizes[0] + last
                    by_key, group, table = _sorted_groups(key)
                    if k:
                        self._tables[k], self._sizes[k] = table, len(table)
                pos = pos[by_key]
                key, tf = _runs((k << _ID_BITS | group) << _SENT_BITS | owner[pos])
                keys.append(key)
                tfs.append(tf)
                ids = group
            else:
                ids = last if k == 0 else self._ids(k, prefix[pos], last)
                keys.append((k << _ID_BITS | ids) << _SENT_BITS | owner[pos])
            prefix = np.empty_like(tok)
            prefix[pos] = ids
        if self._sizes.max() + len(tok) >= 1 << _ID_BITS:
            raise ValueError("too many distinct n-grams for CIDEr-D's 30-bit ids")
        if not keys:  # no words at all
            return np.zeros(0, np.int64), np.zeros(0, np.int64), lengths
        if build:
            return np.concatenate(keys), np.concatenate(tfs), lengths
        key, tf = np.unique(np.concatenate(keys), return_counts=True)
        return key, tf, lengths

    def _tokens(self, tokens, n, build):
        """Ids of the n tokens; tokens unknown to the corpus get fresh ids (from V on, in
        order of first sight), unique within the call."""
        # A dict that numbers each new token as it is first looked up, at C speed.
        ids = defaultdict(count(len(self._token_ids)).__next__, self._token_ids)
        tok = np.fromiter(map(ids.__getitem__, tokens), dtype=np.int64, count=n)
        if build:
            self._token_ids = dict(ids)
            self._sizes[0] = len(ids)
        return tok

    def _ids(self, k, prefix, last):
        """Ids of the (k+1)-grams (prefix id, last token id): their rank in _tables[k]
        where known, else fresh ids from _sizes[k] on, one per distinct n-gram."""
        V, n_prefix, table = self._sizes[0], self._sizes[k - 1], self._tables[k]
        key = prefix * V + last
        ids = np.empty(len(key), dtype=np.int64)
        if table is not None and len(table):
            at = np.minimum(np.searchsorted(table, key), len(table) - 1)
            # The key means this n-gram only when both parts are corpus ids.
            known = (prefix < n_prefix) & (last < V) & (table[at] == key)
            ids[known] = at[known]
            miss = np.flatnonzero(~known)
        else:
            miss = np.arange(len(key))
        if len(miss):
            by_key, group, _ = _sorted_groups(prefix[miss] * _TOKEN_BASE + last[miss])
            ids[miss[by_key]] = self._sizes[k] + group
        return ids


class _Bag:
    """Sparse n-gram vectors of S sentences as an inverted index: one entry per distinct
    (order, n-gram, sentence), sorted by its key, so each order is one run of entries,
    ``runs[k]`` (a slice). ``weigh(idf)`` sets the tf-idf values ``w`` and the norms
    (S, 4); ``length`` (S,) is in words."""

    def __init__(self, key, tf, length):
        self.key, self.tf, self.length = key, tf, length
        self.sent = key & _SENT_MASK
        starts = np.searchsorted(key, np.arange(N_ORDERS) << (_ID_BITS + _SENT_BITS))
        self.runs = [slice(lo, hi) for lo, hi in zip(starts, [*starts[1:], len(key)])]

    def gid(self, k):
        """The n-gram ids of order k's entries."""
        return (self.key[self.runs[k]] >> _SENT_BITS) & _ID_MASK

    def weigh(self, idf):
        self.w = self.tf * idf
        S = len(self.length)
        self.norm = np.empty((S, N_ORDERS))
        for k, run in enumerate(self.runs):
            self.norm[:, k] = np.sqrt(np.bincount(self.sent[run], self.w[run] ** 2, minlength=S))


def _flatten(reference_sets, candidates=None):
    """(sentences, sizes, starts): every reference in order, how many each set has and
    where each set starts among the sentences; with candidates, each candidate right
    after its set's references. A set without references is refused."""
    sets = list(reference_sets)
    sizes = np.fromiter(map(len, sets), dtype=np.int64, count=len(sets))
    if len(sizes) and not sizes.all():
        raise DataError(f"reference set {int(np.argmin(sizes))}: no reference captions")
    if candidates is None:
        return list(chain.from_iterable(sets)), sizes, np.cumsum(sizes) - sizes
    if len(candidates) != len(sets):
        raise DataError(f"{len(candidates)} candidates but {len(sets)} reference sets")
    step = sizes + 1
    return (list(chain.from_iterable([*refs, c] for refs, c in zip(sets, candidates))), sizes,
            np.cumsum(step) - step)


def _sorted_groups(key):
    """Sort non-negative int64 keys: (by_key, group, distinct) with key[by_key] sorted
    (equal keys by position), group the rank of each sorted key among the distinct
    ones. Key and position are packed into one int64 for a plain sort where that fits
    (about twice as fast as argsort)."""
    n = len(key)
    bits = max(n - 1, 1).bit_length()
    if n and int(key.max()).bit_length() + bits <= 63:
        packed = np.sort(key << bits | np.arange(n, dtype=np.int64))
        by_key, sorted_key = packed & ((1 << bits) - 1), packed >> bits
    else:
        by_key = np.argsort(key, kind="stable")
        sorted_key = key[by_key]
    first = np.ones(n, dtype=bool)
    np.not_equal(sorted_key[1:], sorted_key[:-1], out=first[1:])
    return by_key, np.cumsum(first) - 1, sorted_key[first]


def _runs(sorted_key):
    """Distinct values of a sorted array and how often each occurs."""
    first = np.ones(len(sorted_key), dtype=bool)
    np.not_equal(sorted_key[1:], sorted_key[:-1], out=first[1:])
    at = np.flatnonzero(first)
    return sorted_key[at], np.diff(np.append(at, len(sorted_key)))


def _expand(starts, counts):
    """For runs [starts[i], starts[i] + counts[i]): (run index, position) of every element."""
    owner = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    offset = np.arange(len(owner), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return owner, np.repeat(starts, counts) + offset


def _as_ref_ids(references):
    """references as an int64 index array if it is one (array or list of ints), else None."""
    if isinstance(references, np.ndarray):
        if references.dtype.kind in "iu":
            return references.astype(np.int64).reshape(-1)
        if references.dtype != object:
            raise TypeError(f"reference ids must be integers, got dtype {references.dtype}")
        return None
    refs = list(references) if not isinstance(references, list) else references
    if refs and all(isinstance(r, (int, np.integer)) and not isinstance(r, bool) for r in refs):
        return np.asarray(refs, dtype=np.int64)
    return None
