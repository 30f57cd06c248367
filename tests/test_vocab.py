import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rnncap.errors import DataError
from rnncap.data.vocab import SPECIALS, Vocab, tokenize


# ---- tokenize -----------------------------------------------------------------------

@pytest.mark.parametrize("text, tokens", [
    ("A dog runs.", ["a", "dog", "runs"]),
    ("  Two   DOGS\tplay\n", ["two", "dogs", "play"]),
    ("A man's hat , don't", ["a", "man's", "hat", "don't"]),
    ("dogs' toys 'quoted'", ["dogs", "toys", "quoted"]),
    ("a man 's dog", ["a", "man", "s", "dog"]),
    ("red t-shirt/jeans", ["red", "t", "shirt", "jeans"]),
    ("it\u2019s 3 caf\u00e9s!", ["it's", "3", "caf\u00e9s"]),
    ("!!! ... ''", []),
    ("", []),
])
def test_tokenize_rules(text, tokens):
    assert tokenize(text) == tokens


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_tokenize_is_idempotent(text):
    tokens = tokenize(text)
    assert tokenize(" ".join(tokens)) == tokens
    assert all(t and not t[0] == "'" and not t[-1] == "'" and t == t.lower() for t in tokens)


# ---- build --------------------------------------------------------------------------

def test_build_orders_by_count_then_word_and_respects_min_count_top_k():
    caps = ["b a c", "c b", "c d", "e"]
    v = Vocab.build(caps)
    assert v.idx_to_word == list(SPECIALS) + ["c", "b", "a", "d", "e"]
    assert Vocab.build(list(reversed(caps))) == v  # independent of caption order
    assert Vocab.build(caps, min_count=2).idx_to_word[4:] == ["c", "b"]
    assert Vocab.build(caps, top_k=3).idx_to_word[4:] == ["c", "b", "a"]
    assert Vocab.build([["x", "y"], ["y"]]).idx_to_word[4:] == ["y", "x"]  # token lists too
    assert (v.null_id, v.start_id, v.end_id, v.unk_id) == (0, 1, 2, 3)
    assert len(v) == 9 and v.word_to_idx["c"] == 4
    with pytest.raises(ValueError):
        Vocab.build(caps, min_count=0)


# ---- encode / decode ----------------------------------------------------------------

def test_encode_layout_truncation_and_unknowns():
    v = Vocab.build(["a dog runs on grass"])
    row = v.encode("A dog flies!", max_length=5)
    assert row.dtype == np.int32 and row.shape == (7,)
    a, dog = v.word_to_idx["a"], v.word_to_idx["dog"]
    assert row.tolist() == [1, a, dog, 3, 2, 0, 0]
    assert v.encode(["a", "dog"], max_length=2).tolist() == [1, a, dog, 2]
    assert v.encode("a dog runs", max_length=2).tolist() == [1, a, dog, 2]  # truncated
    with pytest.raises(DataError, match="3 words"):
        v.encode("a dog runs", max_length=2, too_long="error")
    with pytest.raises(ValueError):
        v.encode("a", max_length=0)
    assert v.decode(row) == "a dog <UNK>"
    assert v.decode([1, a, 2, dog, dog]) == "a"  # stops at <END>
    assert v.decode(np.array([[0, 1, dog, 0]])) == "dog"


def test_encode_batch_stats_and_drop():
    v = Vocab.build(["a dog runs on grass"])
    caps = ["a dog", "", " ?! ", "zebra giraffe", "a dog runs on grass", "zebra dog"]
    ids, kept, stats = v.encode_batch(caps, max_length=3)
    assert kept.tolist() == [True, False, False, False, True, True]
    assert ids.shape == (3, 5) and ids.dtype == np.int32
    assert [v.decode(r) for r in ids] == ["a dog", "a dog runs", "<UNK> dog"]
    assert stats == dict(total=6, kept=3, truncated=1, dropped_too_long=0, empty=2, all_unknown=1)

    ids, kept, stats = v.encode_batch(caps, max_length=3, too_long="drop")
    assert kept.tolist() == [True, False, False, False, False, True]
    assert stats == dict(total=6, kept=2, truncated=0, dropped_too_long=1, empty=2, all_unknown=1)
    assert sum(stats[k] for k in ("kept", "dropped_too_long", "empty", "all_unknown")) == stats["total"]

    # A caption whose known words all fall past max_length is all-unknown once truncated.
    _, kept, stats = v.encode_batch(["zebra zebra dog"], max_length=2)
    assert not kept[0] and stats["all_unknown"] == 1

    ids, kept, stats = v.encode_batch([], max_length=4)
    assert ids.shape == (0, 6) and kept.shape == (0,) and stats["total"] == 0
    with pytest.raises(ValueError):
        v.encode_batch(caps, 3, too_long="error")


words = st.text(alphabet=st.characters(categories=("Ll", "Nd")), min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(st.lists(words, min_size=1, max_size=12), st.integers(1, 15))
def test_decode_inverts_encode_for_known_words(tokens, max_length):
    tokens = [t for t in tokens if tokenize(t) == [t]]
    v = Vocab.build([tokens])
    row = v.encode(tokens, max_length)
    kept = tokens[:max_length]
    assert v.decode(row) == " ".join(kept)
    assert row[len(kept) + 1] == v.end_id and (row[len(kept) + 2:] == v.null_id).all()


@settings(max_examples=200, deadline=None)
@given(st.text(), st.integers(1, 8))
def test_encode_never_crashes_on_unicode(text, max_length):
    v = Vocab.build(["a dog", "caf\u00e9 \u732b"])
    row = v.encode(text, max_length)
    assert row.shape == (max_length + 2,) and row[0] == v.start_id
    assert ((row >= 0) & (row < len(v))).all()
    ids, kept, stats = v.encode_batch([text], max_length)
    assert stats["total"] == 1 and len(ids) == int(kept.sum())
    # Any text round-trips through a vocab that knows its words.
    tokens = tokenize(text)
    own = Vocab.build([text])
    if len(tokens) <= max_length:
        assert own.decode(own.encode(tokens, max_length)) == " ".join(tokens)
        assert own.decode(own.encode(text, max_length)) == " ".join(tokens)


# ---- persistence --------------------------------------------------------------------

def test_save_load_roundtrip_and_cs231n_layout(tmp_path):
    v = Vocab.build(["a dog", "caf\u00e9 dog"])
    v.save(tmp_path / "v.json")
    d = json.loads((tmp_path / "v.json").read_text(encoding="utf-8"))
    assert d["idx_to_word"][:4] == list(SPECIALS) and d["word_to_idx"]["dog"] == 4
    assert Vocab.load(tmp_path / "v.json") == v
    assert not list(tmp_path.glob("*.tmp"))
    # The course file has only these two keys.
    (tmp_path / "c.json").write_text(json.dumps({"idx_to_word": d["idx_to_word"], "word_to_idx": d["word_to_idx"]}))
    assert Vocab.load(tmp_path / "c.json") == v
    assert Vocab.from_words(d["idx_to_word"]) == v


@pytest.mark.parametrize("content, message", [
    ('{"idx_to_word": ["<NULL>", ', "not valid JSON"),
    ('[1, 2]', "'idx_to_word' list"),
    ('{"idx_to_word": ["<START>", "<NULL>", "<END>", "<UNK>", "a"]}', "ids 0..3"),
    ('{"idx_to_word": ["<NULL>", "<START>", "<END>"]}', "ids 0..3"),
    ('{"idx_to_word": ["<NULL>", "<START>", "<END>", "<UNK>", "a", "a"]}', "'a' twice"),
    ('{"idx_to_word": ["<NULL>", "<START>", "<END>", "<UNK>", 5]}', "only strings"),
    ('{"idx_to_word": ["<NULL>", "<START>", "<END>", "<UNK>", "a"], "word_to_idx": {"a": 7}}', "does not match"),
])
def test_load_rejects_broken_files_with_one_line(tmp_path, content, message):
    p = tmp_path / "vocab.json"
    p.write_text(content)
    with pytest.raises(DataError, match=message) as e:
        Vocab.load(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_load_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        Vocab.load(tmp_path / "nope.json")
