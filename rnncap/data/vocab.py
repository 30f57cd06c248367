"""Tokenisation and the word <-> id vocabulary.

Every caption becomes a row of ``max_length + 2`` int32 ids::

    <START> w1 w2 ... wn <END> <NULL> <NULL> ...

``max_length`` counts words only. The four special tokens always hold ids 0..3, in
the layout of the CS231n ``coco2014_vocab.json`` file, so that file loads as it is.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

from ..errors import DataError

SPECIALS = ("<NULL>", "<START>", "<END>", "<UNK>")
NULL_ID, START_ID, END_ID, UNK_ID = range(4)

# Bump when tokenize() changes in a way that alters its output: a saved vocab records it.
TOKENIZER = "rnncap-1"

_APOSTROPHES = {"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"}


def tokenize(text: str) -> list[str]:
    """Split a caption into lower-case word tokens.

    Rules (in this order):

    1. lower-case with ``str.lower``;
    2. the typographic apostrophes ``’ ‘ ʼ`` and the backtick count as ``'``;
    3. every character that is neither alphanumeric (``str.isalnum``, any script,
       digits included) nor ``'`` becomes a space, so hyphens and slashes split
       words ("t-shirt" -> "t", "shirt") and all other punctuation disappears;
    4. split on whitespace;
    5. apostrophes at either end of a token are stripped ("dogs'" -> "dogs",
       "'twas" -> "twas") but kept inside a word ("don't", "man's"); a token of
       apostrophes only disappears.

    The result is a fixed point: ``tokenize(" ".join(tokenize(s))) == tokenize(s)``.
    """
    chars = []
    for ch in str(text).lower():
        ch = _APOSTROPHES.get(ch, ch)
        chars.append(ch if ch.isalnum() or ch == "'" else " ")
    tokens = (t.strip("'") for t in "".join(chars).split())
    return [t for t in tokens if t]


class Vocab:
    """A fixed word list of V words. ``idx_to_word[i]`` is the word with id ``i``; ids
    0..3 are the specials ``<NULL> <START> <END> <UNK>``.

    ``encode`` gives one caption as a (T + 2,) int32 row (``<START>``, T words padded
    with ``<NULL>``, ``<END>``), ``encode_batch`` an (M, T + 2) array; ``decode`` takes
    one row of ids back to words."""

    def __init__(self, idx_to_word):
        self.idx_to_word = list(idx_to_word)
        self.word_to_idx = {w: i for i, w in enumerate(self.idx_to_word)}
        if tuple(self.idx_to_word[:4]) != SPECIALS:
            raise DataError(f"vocabulary must start with {', '.join(SPECIALS)} at ids 0..3, "
                            f"got {self.idx_to_word[:4]}")
        if len(self.word_to_idx) != len(self.idx_to_word):
            dup = next(w for w, c in Counter(self.idx_to_word).items() if c > 1)
            raise DataError(f"vocabulary lists the word {dup!r} twice")

    null_id = property(lambda self: NULL_ID)
    start_id = property(lambda self: START_ID)
    end_id = property(lambda self: END_ID)
    unk_id = property(lambda self: UNK_ID)
    # Ids a generated caption should never contain (decoders take them as ``banned``).
    never_generated = property(lambda self: (NULL_ID, START_ID, UNK_ID))

    def __len__(self):
        return len(self.idx_to_word)

    def __eq__(self, other):
        return isinstance(other, Vocab) and self.idx_to_word == other.idx_to_word

    def __repr__(self):
        return f"Vocab({len(self)} words)"

    # ---- building ---------------------------------------------------------------

    @classmethod
    def build(cls, captions, min_count: int = 1, top_k: int = 0) -> "Vocab":
        """Vocabulary of the words in ``captions`` (strings, or lists of tokens).

        Build it from the TRAINING captions only. Keeps words seen at least
        ``min_count`` times, then the ``top_k`` most frequent of those (0 = all).
        Order: count descending, then the word, so the ids do not depend on the
        order of the captions."""
        if min_count < 1 or top_k < 0:
            raise ValueError(f"need min_count >= 1 and top_k >= 0, got {min_count}, {top_k}")
        counts = Counter()
        for c in captions:
            counts.update(tokenize(c) if isinstance(c, str) else c)
        words = sorted((w for w, n in counts.items() if n >= min_count and w not in SPECIALS),
                       key=lambda w: (-counts[w], w))
        if top_k:
            words = words[:top_k]
        return cls(SPECIALS + tuple(words))

    @classmethod
    def from_words(cls, idx_to_word) -> "Vocab":
        return cls(idx_to_word)

    # ---- encoding ---------------------------------------------------------------

    def _word_ids(self, caption_or_tokens) -> list[int]:
        tokens = tokenize(caption_or_tokens) if isinstance(caption_or_tokens, str) else caption_or_tokens
        get = self.word_to_idx.get
        return [get(t, UNK_ID) for t in tokens]

    def _layout(self, ids: list[int], max_length: int) -> np.ndarray:
        row = np.full(max_length + 2, NULL_ID, dtype=np.int32)
        row[0] = START_ID
        row[1:len(ids) + 1] = ids
        row[len(ids) + 1] = END_ID
        return row

    def encode(self, caption_or_tokens, max_length: int, too_long: str = "truncate") -> np.ndarray:
        """One caption (a string, tokenised here, or a list of tokens) as a
        ``(max_length + 2,)`` int32 row. Unknown words become ``<UNK>``.
        ``too_long``: "truncate" keeps the first ``max_length`` words; "error"
        raises DataError."""
        _check_encode_args(max_length, too_long, ("truncate", "error"))
        ids = self._word_ids(caption_or_tokens)
        if len(ids) > max_length:
            if too_long == "error":
                raise DataError(f"caption has {len(ids)} words, more than max_length={max_length}")
            ids = ids[:max_length]
        return self._layout(ids, max_length)

    def encode_batch(self, captions, max_length: int, too_long: str = "truncate"):
        """Encode many captions, leaving out those that teach nothing.

        Returns ``(ids, kept, stats)``: ``ids`` is ``(M, max_length + 2)`` int32 for
        the M kept captions, ``kept`` a bool mask over ``captions``. Each caption
        lands in exactly one of the stats counts ``kept``, ``empty`` (no tokens after
        cleaning), ``dropped_too_long`` (only with ``too_long="drop"``) and
        ``all_unknown`` (every word it would be encoded with is ``<UNK>``);
        ``total`` is their sum and ``truncated`` counts the kept captions that
        were cut to ``max_length`` words."""
        _check_encode_args(max_length, too_long, ("truncate", "drop"))
        stats = dict(total=0, kept=0, truncated=0, dropped_too_long=0, empty=0, all_unknown=0)
        rows, kept = [], []
        for caption in captions:
            stats["total"] += 1
            ids = self._word_ids(caption)
            cut = len(ids) > max_length
            if cut and too_long == "truncate":
                ids = ids[:max_length]
            if not ids:
                reason = "empty"
            elif cut and too_long == "drop":
                reason = "dropped_too_long"
            elif all(i == UNK_ID for i in ids):
                reason = "all_unknown"
            else:
                reason = "kept"
                stats["truncated"] += cut
                rows.append(self._layout(ids, max_length))
            stats[reason] += 1
            kept.append(reason == "kept")
        ids = np.stack(rows) if rows else np.zeros((0, max_length + 2), np.int32)
        return ids, np.array(kept, dtype=bool), stats

    def decode(self, ids) -> str:
        """Words of one id sequence: stops at ``<END>``, skips ``<START>`` and ``<NULL>``."""
        ids = ids if isinstance(ids, list) else np.asarray(ids).reshape(-1).tolist()
        words, n = [], len(self.idx_to_word)
        for i in ids:
            if i == END_ID:
                break
            if i not in (START_ID, NULL_ID):
                words.append(self.idx_to_word[i] if 0 <= i < n else SPECIALS[UNK_ID])
        return " ".join(words)

    # ---- persistence ------------------------------------------------------------

    def to_dict(self) -> dict:
        """The CS231n JSON layout, plus the tokenizer version."""
        return {"idx_to_word": list(self.idx_to_word), "word_to_idx": dict(self.word_to_idx),
                "tokenizer": TOKENIZER}

    @classmethod
    def from_dict(cls, d, source: str = "vocabulary") -> "Vocab":
        """Inverse of to_dict; also reads CS231n's ``coco2014_vocab.json``. ``source``
        names the file in error messages."""
        if not isinstance(d, dict) or not isinstance(d.get("idx_to_word"), list):
            raise DataError(f"{source}: expected an object with an 'idx_to_word' list")
        words = d["idx_to_word"]
        if not all(isinstance(w, str) for w in words):
            raise DataError(f"{source}: 'idx_to_word' must hold only strings")
        try:
            vocab = cls(words)
        except DataError as e:
            raise DataError(f"{source}: {e}") from None
        w2i = d.get("word_to_idx")
        if w2i is not None and w2i != vocab.word_to_idx:
            raise DataError(f"{source}: 'word_to_idx' does not match 'idx_to_word'")
        return vocab

    def save(self, path) -> None:
        """Write JSON atomically (a reader never sees half a file)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> "Vocab":
        return cls.from_dict(read_json(path), source=str(path))


# A word is a bad ending when fewer than 1 in 100 of its occurrences in the training
# captions end one. On Flickr8k's train captions this marks 1,016 of the 2,534 words of
# the default vocabulary (min count 5):
# the function words ("a" ends 2 of 46,784 uses, "of" 1 of 4,974, "the" 1 of 13,509)
# and the colours that begin a noun phrase ("red" 0.8%, "black" and "white" 0.7%),
# and, at the margin, a few nouns that rarely close a caption ("man" 0.95%, "boy"
# 0.9%); ending words sit far above it ("water" 56%, "grass" 68%, "camera" 59%). The
# gap between 1% and the next words (2-3%: "blue", "jumping", "playing") is where a
# caption can plausibly stop.
BAD_ENDING_RATE = 0.01


def bad_endings(captions, vocab, rate=BAD_ENDING_RATE):
    """The words of ``vocab`` that end fewer than ``rate`` of their occurrences in
    ``captions`` (the TRAINING captions: strings or token lists), sorted. Captions
    count whole, as a person wrote them (not cut to a training length), so a word
    is judged by where people stop, not by where truncation did."""
    uses, ends = Counter(), Counter()
    for c in captions:
        tokens = tokenize(c) if isinstance(c, str) else list(c)
        uses.update(tokens)
        if tokens:
            ends[tokens[-1]] += 1
    return sorted(w for w in vocab.idx_to_word[len(SPECIALS):] if uses[w] and ends[w] < rate * uses[w])


def read_json(path):
    """Parse a JSON file, turning every way it can fail into a one-line DataError."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as e:
        raise DataError(f"{path}: cannot read as JSON text ({type(e).__name__})") from None


def _check_encode_args(max_length, too_long, allowed):
    if not isinstance(max_length, (int, np.integer)) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    if too_long not in allowed:
        raise ValueError(f"too_long must be one of {allowed}, got {too_long!r}")
