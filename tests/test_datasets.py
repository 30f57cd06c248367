import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from rnncap.data.datasets import Dataset, Split, encode_split, load_dataset
from rnncap.errors import DataError
from rnncap.data.vocab import SPECIALS, Vocab

h5py = pytest.importorskip("h5py")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def touch_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"\xff\xd8 not really a jpeg")


def one_line_error(excinfo, *fragments):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)


# ---- cs231n coco_captioning ---------------------------------------------------------

WORDS = list(SPECIALS) + ["a", "dog", "cat", "runs", "on", "grass"]


def caption_row(words, width=7):
    row = [1] + [WORDS.index(w) for w in words] + [2]
    return row + [0] * (width - len(row))


def make_cs231n(folder, *, captions_override=None, skip=(), features_override=None):
    """A miniature coco_captioning folder with the course's exact file and key names."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    data = {
        "train_captions": np.array([caption_row(["a", "dog", "runs"]), caption_row(["a", "cat"]),
                                    caption_row(["dog", "on", "grass"]), caption_row(["cat", "<UNK>"]),
                                    caption_row(["<UNK>"]), caption_row([])], dtype=np.int32),
        "train_image_idxs": np.array([0, 0, 1, 2, 2, 1], dtype=np.int32),
        "val_captions": np.array([caption_row(["a", "cat", "on", "grass", "a"])], dtype=np.int32),
        "val_image_idxs": np.array([1], dtype=np.int32),
    }
    data.update(captions_override or {})
    with h5py.File(folder / "coco2014_captions.h5", "w") as f:
        for k, v in data.items():
            if k not in skip:
                f.create_dataset(k, data=v)
    n = {"train": 3, "val": 2}
    for split in ("train", "val"):
        for suffix, dim in (("_pca", 8), ("", 16)):
            name = f"{split}2014_vgg16_fc7{suffix}.h5"
            if name in skip:
                continue
            feats = (features_override or {}).get(name, rng.standard_normal((n[split], dim)).astype(np.float32))
            with h5py.File(folder / name, "w") as f:
                f.create_dataset("features", data=feats)
        (folder / f"{split}2014_urls.txt").write_text(
            "".join(f"http://example.org/{split}/{i}.jpg\n" for i in range(n[split])))
    if "vocab" not in skip:
        (folder / "coco2014_vocab.json").write_text(json.dumps(
            {"idx_to_word": WORDS, "word_to_idx": {w: i for i, w in enumerate(WORDS)}}))
    return folder


def test_cs231n_loads_as_shipped(tmp_path):
    folder = make_cs231n(tmp_path / "coco_captioning")
    for path in (folder, folder / "coco2014_captions.h5"):
        ds = load_dataset(path)
        assert isinstance(ds, Dataset) and ds.name == "coco-cs231n" and list(ds.splits) == ["train", "val"]
    assert ds.vocab.idx_to_word == WORDS
    train = ds["train"]
    assert isinstance(train, Split)
    assert train.features.shape == (3, 8) and train.image_paths == [None] * 3
    assert train.captions.shape == (6, 7) and train.captions.dtype == np.int32
    assert train.image_idx.dtype == np.int64 and train.image_idx.tolist() == [0, 0, 1, 2, 2, 1]
    assert train.references == [["a dog runs", "a cat"], ["dog on grass", ""], ["cat <UNK>", "<UNK>"]]
    assert train.urls[2] == "http://example.org/train/2.jpg" and len(set(train.image_ids)) == 3
    assert load_dataset(folder, pca=False)["val"].features.shape == (2, 16)

    # With the shipped vocab and width, the kept rows ARE the shipped rows.
    caps, idx, stats = encode_split(train, ds.vocab, max_length=5)
    keep = [0, 1, 2, 3]
    np.testing.assert_array_equal(caps, train.captions[keep])
    np.testing.assert_array_equal(idx, train.image_idx[keep])
    assert stats == dict(total=6, kept=4, truncated=0, dropped_too_long=0, empty=1, all_unknown=1)

    caps, idx, stats = encode_split(ds["val"], ds.vocab, max_length=3)
    assert ds.vocab.decode(caps[0]) == "a cat on" and caps.shape == (1, 5) and stats["truncated"] == 1
    _, _, stats = encode_split(ds["val"], ds.vocab, max_length=3, too_long="drop")
    assert stats["dropped_too_long"] == 1 and stats["kept"] == 0


def test_cs231n_reencodes_into_another_vocab(tmp_path):
    ds = load_dataset(make_cs231n(tmp_path / "c"))
    other = Vocab.from_words(list(SPECIALS) + ["grass", "dog"])
    caps, idx, stats = encode_split(ds["train"], other, max_length=4)
    assert [other.decode(r) for r in caps] == ["<UNK> dog <UNK>", "dog <UNK> grass"]
    assert idx.tolist() == [0, 1] and stats["all_unknown"] == 3 and caps.shape == (2, 6)


def test_cs231n_shipped_path_matches_reference_encoding():
    """The vectorised re-layout agrees with Vocab.encode_batch on the same words."""
    rng = np.random.default_rng(1)
    src = Vocab.from_words(WORDS)
    dst = Vocab.from_words(list(SPECIALS) + ["grass", "dog", "a"])
    caps = rng.integers(0, len(WORDS), size=(300, 9)).astype(np.int32)
    caps[rng.random(300) < 0.3, 0] = 1
    split = Split("train", ["x"], [None], [[]], captions=caps, image_idx=np.zeros(300, np.int64),
                  caption_vocab=src)
    tokens = []
    for row in caps.tolist():
        row = row[:row.index(2)] if 2 in row else row
        tokens.append([src.idx_to_word[i] for i in row if i not in (0, 1)])
    for max_length in (1, 4, 12):
        for too_long in ("truncate", "drop"):
            got, _, got_stats = encode_split(split, dst, max_length, too_long)
            want, _, want_stats = dst.encode_batch(tokens, max_length, too_long)
            np.testing.assert_array_equal(got, want)
            assert got_stats == want_stats


@pytest.mark.parametrize("kwargs, fragments", [
    (dict(skip=("train_image_idxs",)), ["coco2014_captions.h5: dataset 'train_image_idxs' missing"]),
    (dict(captions_override={"train_image_idxs": np.zeros((5, 3), np.int32)}),
     ["coco2014_captions.h5: dataset 'train_image_idxs' has shape (5, 3), expected (N,)"]),
    (dict(captions_override={"val_captions": np.zeros((1, 7), np.float32)}),
     ["coco2014_captions.h5: dataset 'val_captions' has dtype float32"]),
    (dict(captions_override={"train_image_idxs": np.array([0, 0, 1, 2, 3, 1], np.int32)}),
     ["coco2014_captions.h5", "'train_image_idxs'", "outside 0..2", "train2014_vgg16_fc7_pca.h5"]),
    (dict(captions_override={"train_image_idxs": np.array([0, 1], np.int32)}),
     ["'train_image_idxs' has 2 rows but 'train_captions' has 6"]),
    (dict(captions_override={"val_captions": np.array([[1, 99, 2]], np.int32)}),
     ["'val_captions' holds ids outside 0..9"]),
    (dict(skip=("val2014_vgg16_fc7_pca.h5",)), ["val2014_vgg16_fc7_pca.h5: file not found"]),
    (dict(skip=("vocab",)), ["coco2014_vocab.json: file not found"]),
    (dict(features_override={"train2014_vgg16_fc7_pca.h5": np.zeros(3, np.float32)}),
     ["train2014_vgg16_fc7_pca.h5: dataset 'features' has shape (3,), expected (N, D)"]),
])
def test_cs231n_validation(tmp_path, kwargs, fragments):
    folder = make_cs231n(tmp_path / "c", **kwargs)
    with pytest.raises(DataError) as e:
        load_dataset(folder)
    one_line_error(e, *fragments)


def test_cs231n_bad_files(tmp_path):
    folder = make_cs231n(tmp_path / "c")
    (folder / "val2014_urls.txt").write_text("http://x/1.jpg\n")
    with pytest.raises(DataError) as e:
        load_dataset(folder)
    one_line_error(e, "val2014_urls.txt", "1 URLs", "2 rows")
    (folder / "val2014_urls.txt").unlink()
    assert load_dataset(folder)["val"].urls is None  # URLs are optional
    (folder / "train2014_vgg16_fc7_pca.h5").write_bytes(b"garbage")
    with pytest.raises(DataError) as e:
        load_dataset(folder)
    one_line_error(e, "train2014_vgg16_fc7_pca.h5", "not a readable HDF5 file")


# ---- caption-list JSON --------------------------------------------------------------

def write_caption_list(root, images=None, names=("a.jpg", "b.jpg", "c.jpg")):
    images = images if images is not None else [
        {"file": names[0], "split": "train", "captions": ["A dog runs.", "A brown dog."]},
        {"file": names[1], "split": "val", "captions": ["A cat sleeps"]},
        {"file": names[2], "split": "train", "captions": ["Two dogs play", "Dogs!"]},
    ]
    root.mkdir(parents=True, exist_ok=True)
    p = root / "captions.json"
    p.write_text(json.dumps({"name": "tiny", "image_dir": "imgs", "images": images}))
    return p


def test_caption_list(tmp_path):
    p = write_caption_list(tmp_path / "d")
    touch_images(tmp_path / "d" / "imgs", ["a.jpg", "b.jpg", "c.jpg"])
    ds = load_dataset(p)
    assert ds.name == "tiny" and list(ds.splits) == ["train", "val"] and ds.skipped_missing == 0
    tr = ds["train"]
    assert tr.image_ids == ["a.jpg", "c.jpg"]
    assert tr.image_paths == [str((tmp_path / "d" / "imgs" / n).resolve()) for n in ("a.jpg", "c.jpg")]
    assert tr.references[1] == ["Two dogs play", "Dogs!"] and tr.features is None and tr.captions is None
    assert load_dataset(tmp_path / "d")["val"].image_ids == ["b.jpg"]  # the folder works too
    with pytest.raises(DataError) as e:
        ds["test"]
    one_line_error(e, "no split 'test'")

    vocab = Vocab.build([c for refs in tr.references for c in refs])
    caps, idx, stats = encode_split(tr, vocab, max_length=3)
    assert caps.shape == (4, 5) and idx.tolist() == [0, 0, 1, 1] and stats["kept"] == 4


def test_caption_list_image_dir_override_and_missing_images(tmp_path):
    p = write_caption_list(tmp_path / "d")
    touch_images(tmp_path / "d" / "imgs", ["a.jpg", "c.jpg"])
    with pytest.warns(UserWarning, match="skipped 1 of 3 images"):
        ds = load_dataset(p)
    assert ds.skipped_missing == 1 and list(ds.splits) == ["train"]
    with pytest.raises(DataError) as e:
        load_dataset(p, missing="error")
    one_line_error(e, str(p), "b.jpg", "not found")

    touch_images(tmp_path / "elsewhere", ["a.jpg", "b.jpg", "c.jpg"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_dataset(p, image_dir=tmp_path / "elsewhere", missing="error")
    assert ds["val"].image_paths[0] == str((tmp_path / "elsewhere" / "b.jpg").resolve())

    with pytest.raises(DataError) as e:
        load_dataset(p, image_dir=tmp_path / "nowhere")
    one_line_error(e, "nowhere", "image folder not found")
    (tmp_path / "d" / "imgs" / "a.jpg").unlink()
    (tmp_path / "d" / "imgs" / "c.jpg").unlink()
    with pytest.raises(DataError) as e, pytest.warns(UserWarning):
        load_dataset(p)
    one_line_error(e, "no usable images", "3 missing")


def test_empty_and_unknown_captions_are_counted_not_kept(tmp_path):
    images = [{"file": "a.jpg", "split": "train", "captions": ["a dog", "", "...", "zebra okapi", "a zebra"]}]
    p = write_caption_list(tmp_path / "d", images)
    touch_images(tmp_path / "d" / "imgs", ["a.jpg"])
    split = load_dataset(p)["train"]
    assert split.references[0] == images[0]["captions"]  # references stay raw
    vocab = Vocab.build(["a dog"])
    caps, idx, stats = encode_split(split, vocab, max_length=4)
    assert [vocab.decode(r) for r in caps] == ["a dog", "a <UNK>"]
    assert stats == dict(total=5, kept=2, truncated=0, dropped_too_long=0, empty=2, all_unknown=1)


@pytest.mark.parametrize("images, fragment", [
    ([{"file": "a.jpg", "split": "train", "captions": "a dog"}], "images[0].captions must be a list of strings"),
    ([{"file": "a.jpg", "split": "train", "captions": ["ok"]},
      {"file": "b.jpg", "captions": ["x"]}], "images[1].split"),
    ([{"file": 3, "split": "train", "captions": ["x"]}], "images[0].file"),
])
def test_caption_list_bad_fields(tmp_path, images, fragment):
    p = write_caption_list(tmp_path / "d", images)
    touch_images(tmp_path / "d" / "imgs", ["a.jpg", "b.jpg"])
    with pytest.raises(DataError) as e:
        load_dataset(p)
    one_line_error(e, str(p), fragment)


def test_images_without_captions_are_left_out(tmp_path):
    images = [{"file": "a.jpg", "split": "train", "captions": ["a dog"]},
              {"file": "b.jpg", "split": "train", "captions": []}]
    p = write_caption_list(tmp_path / "d", images)
    touch_images(tmp_path / "d" / "imgs", ["a.jpg", "b.jpg"])
    with pytest.warns(UserWarning, match="1 images that have no captions"):
        assert load_dataset(p)["train"].image_ids == ["a.jpg"]


# ---- unknown formats and broken files -----------------------------------------------

@pytest.mark.parametrize("name, content, fragment", [
    ("x.json", '{"images": [{"file": "a.jpg"', "not valid JSON"),
    ("x.json", '{"something": 1}', "unknown dataset format"),
    ("x.json", "[1, 2, 3]", "unknown dataset format"),
    ("x.csv", "a,b\n", "unknown dataset format"),
    ("v.json", json.dumps({"idx_to_word": WORDS}), "vocabulary file, not a dataset"),
    ("x.json", b"\xff\xfe\x00garbage", "cannot read as JSON text"),
    ("Flickr8k.token.txt", "no tab here\n", "line 1 is not"),
])
def test_unknown_or_broken_files(tmp_path, name, content, fragment):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as e:
        load_dataset(p)
    one_line_error(e, str(p), fragment)


def test_unknown_folder_and_missing_path(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path)
    one_line_error(e, str(tmp_path), "unknown dataset folder")
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path / "nope.json")
    one_line_error(e, "nope.json", "no such file")
    with pytest.raises(ValueError):
        load_dataset(tmp_path, missing="ignore")


# ---- COCO annotation files ----------------------------------------------------------

def write_coco(path, images, annotations):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return path


COCO_IMAGES = [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg"},
               {"id": 7, "file_name": "COCO_val2014_000000000007.jpg"}]
COCO_ANNS = [{"image_id": 7, "id": 1, "caption": "A cat."}, {"image_id": 42, "id": 2, "caption": "A dog."},
             {"image_id": 7, "id": 3, "caption": "Another cat."}]


def test_coco_annotations(tmp_path):
    p = write_coco(tmp_path / "annotations" / "captions_val2014.json", COCO_IMAGES, COCO_ANNS)
    touch_images(tmp_path / "val2014", [im["file_name"] for im in COCO_IMAGES])
    ds = load_dataset(p)
    assert ds.name == "coco" and list(ds.splits) == ["val"]
    val = ds["val"]
    assert val.image_ids == ["42", "7"] and val.references == [["A dog."], ["A cat.", "Another cat."]]
    assert val.image_paths[1] == str((tmp_path / "val2014" / "COCO_val2014_000000000007.jpg").resolve())

    renamed = write_coco(tmp_path / "annotations" / "my_caps.json", COCO_IMAGES, COCO_ANNS)
    assert list(load_dataset(renamed, split="test", image_dir=tmp_path / "val2014").splits) == ["test"]
    with pytest.warns(UserWarning, match="names no split"):
        assert list(load_dataset(renamed, image_dir=tmp_path / "val2014").splits) == ["train"]

    bad = write_coco(tmp_path / "annotations" / "captions_train2014.json", COCO_IMAGES,
                     COCO_ANNS + [{"image_id": 5, "caption": "x"}])
    with pytest.raises(DataError) as e:
        load_dataset(bad)
    one_line_error(e, str(bad), "annotations[3].image_id 5 is not in 'images'")
    with pytest.raises(DataError) as e, pytest.warns(UserWarning):
        load_dataset(write_coco(tmp_path / "a2" / "captions_train2014.json", COCO_IMAGES, COCO_ANNS))
    one_line_error(e, "no usable images (2 missing", "--image-dir")


# ---- Karpathy split files -----------------------------------------------------------

def test_karpathy_coco_and_flickr(tmp_path):
    def sent(raw):
        return {"raw": raw, "tokens": raw.lower().rstrip(".").split()}
    images = [
        {"filepath": "train2014", "filename": "t1.jpg", "split": "train", "cocoid": 11, "sentences": [sent("A dog.")]},
        {"filepath": "val2014", "filename": "v1.jpg", "split": "restval", "cocoid": 12, "sentences": [sent("A cat.")]},
        {"filepath": "val2014", "filename": "v2.jpg", "split": "val", "cocoid": 13,
         "sentences": [sent("A bird."), {"tokens": ["only", "tokens"]}]},
        {"filepath": "val2014", "filename": "v3.jpg", "split": "test", "cocoid": 14, "sentences": [sent("A cow.")]},
    ]
    root = tmp_path / "coco"
    root.mkdir()
    p = root / "dataset_coco.json"
    p.write_text(json.dumps({"dataset": "coco", "images": images}))
    touch_images(root / "train2014", ["t1.jpg"])
    touch_images(root / "val2014", ["v1.jpg", "v2.jpg", "v3.jpg"])
    ds = load_dataset(p)
    assert ds.name == "karpathy-coco" and list(ds.splits) == ["train", "val", "test"]
    assert ds["train"].image_ids == ["11", "12"]  # restval joins train
    assert ds["val"].references == [["A bird.", "only tokens"]]
    assert ds["train"].image_paths[1] == str((root / "val2014" / "v1.jpg").resolve())

    flickr = tmp_path / "f"
    (flickr / "Flicker8k_Dataset").mkdir(parents=True)
    touch_images(flickr / "Flicker8k_Dataset", ["1_a.jpg"])
    pf = flickr / "dataset_flickr8k.json"
    pf.write_text(json.dumps({"dataset": "flickr8k", "images": [
        {"filename": "1_a.jpg", "imgid": 0, "split": "train", "sentences": [sent("A dog.")]},
        {"filename": "2_b.jpg", "imgid": 1, "split": "train", "sentences": [sent("A cat.")]}]}))
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        ds = load_dataset(pf)
    assert ds["train"].image_ids == ["1_a.jpg"] and ds.skipped_missing == 1

    images[1]["sentences"] = [{"nothing": 1}]
    p.write_text(json.dumps({"images": images}))
    with pytest.raises(DataError) as e:
        load_dataset(p)
    one_line_error(e, str(p), "images[1].sentences[0]")


# ---- Flickr8k text files ------------------------------------------------------------

def test_flickr8k_text_files(tmp_path):
    text = tmp_path / "Flickr8k_text"
    text.mkdir()
    token = text / "Flickr8k.token.txt"
    token.write_text("1_a.jpg#0\tA dog runs .\n1_a.jpg#1\tA brown dog .\n2_b.jpg#0\tA cat .\n"
                     "2_b.jpg.1#0\tbogus line\n3_c.jpg#0\tA cow .\n4_d.jpg#0\tNot in any split .\n\n")
    (text / "Flickr_8k.trainImages.txt").write_text("1_a.jpg\n3_c.jpg\n")
    (text / "Flickr_8k.devImages.txt").write_text("2_b.jpg\n")
    (text / "Flickr_8k.testImages.txt").write_text("")
    touch_images(tmp_path / "Flicker8k_Dataset", ["1_a.jpg", "2_b.jpg", "3_c.jpg", "4_d.jpg"])
    with pytest.warns(UserWarning, match="ignored 1 caption lines"):
        ds = load_dataset(token)
    assert ds.name == "flickr8k" and list(ds.splits) == ["train", "val"]
    assert ds["train"].image_ids == ["1_a.jpg", "3_c.jpg"]
    assert ds["train"].references[0] == ["A dog runs .", "A brown dog ."]
    assert ds["val"].image_paths == [str((tmp_path / "Flicker8k_Dataset" / "2_b.jpg").resolve())]
    with pytest.warns(UserWarning):
        assert list(load_dataset(text).splits) == ["train", "val"]  # the folder works too

    (tmp_path / "Flicker8k_Dataset" / "3_c.jpg").unlink()
    with pytest.raises(DataError) as e, pytest.warns(UserWarning):
        load_dataset(token, missing="error")
    one_line_error(e, "3_c.jpg", "not found")

    for f in text.glob("Flickr_8k.*"):
        f.unlink()
    with pytest.raises(DataError) as e, pytest.warns(UserWarning):
        load_dataset(token)
    one_line_error(e, str(token), "no split lists")


# ---- the real Flickr8k copy ---------------------------------------------------------

@pytest.mark.flickr8k
def test_real_flickr8k_caption_list():
    path = SHARED / "flickr8k" / "captions.json"
    if not path.is_file():
        pytest.skip(f"real Flickr8k data not present at {path}")
    ds = load_dataset(path, missing="error")
    assert {name: len(s) for name, s in ds.splits.items()} == {"train": 6000, "val": 1000}
    assert all(len(refs) == 5 for s in ds.splits.values() for refs in s.references)
    vocab = Vocab.build([c for refs in ds["train"].references for c in refs], min_count=5)
    assert 2000 < len(vocab) < 3000  # 2,538 measured (2,534 words + 4 specials)
    caps, idx, stats = encode_split(ds["train"], vocab, max_length=16)
    assert caps.shape == (30000, 18) and stats["empty"] == 0 and stats["all_unknown"] == 0
