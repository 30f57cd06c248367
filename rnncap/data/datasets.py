"""Captioning datasets in their published formats, all loaded into one form.

``load_dataset(path)`` recognises:

- the CS231n ``coco_captioning`` folder (features, pre-encoded captions, vocab);
- a caption-list JSON ``{"image_dir", "images": [{"file", "split", "captions"}]}``;
- COCO annotation files (``captions_train2014.json``);
- Karpathy split files (``dataset_coco.json``, ``dataset_flickr8k.json``);
- the Flickr8k text files (``Flickr8k.token.txt`` and the split lists beside it).

Every loader returns a :class:`Dataset` of :class:`Split` s. ``encode_split`` turns a
split's captions into training rows. See docs/datasets.md for the formats.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from .vocab import END_ID, NULL_ID, START_ID, UNK_ID, Vocab, read_json

SPLIT_ORDER = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class Split:
    name: str
    image_ids: list          # stable id per image (file name, or COCO id as str)
    image_paths: list        # absolute path per image; None when only features exist
    references: list         # raw reference captions per image
    features: np.ndarray | None = None   # (n_images, D) when the dataset ships features (cs231n)
    captions: np.ndarray | None = None   # (M, T+1) pre-encoded ids when the dataset ships them (cs231n)
    image_idx: np.ndarray | None = None  # (M,) image row of each pre-encoded caption
    urls: list | None = None
    caption_vocab: Vocab | None = None   # the vocab of the ids in ``captions``

    def __len__(self):
        return len(self.image_ids)


@dataclass
class Dataset:
    name: str
    source: str
    splits: dict
    vocab: Vocab | None = None   # when the dataset ships one (cs231n)
    skipped_missing: int = 0     # images named by the dataset whose files were absent

    def __getitem__(self, split_name) -> Split:
        if split_name not in self.splits:
            raise DataError(f"{self.source}: no split {split_name!r} (it has {', '.join(self.splits) or 'none'})")
        return self.splits[split_name]


def load_dataset(path, *, image_dir=None, missing: str = "skip", pca: bool = True,
                 split: str | None = None) -> Dataset:
    """Load a dataset, detecting its format from ``path`` (a file or a folder).

    image_dir: where the images are, overriding the format's default place.
    missing:   "skip" leaves out images whose files are absent (counted in
               ``skipped_missing``, with a warning); "error" raises DataError naming
               the first one. Feature-only datasets (cs231n) need no image files.
    pca:       cs231n only: the 512-d PCA features (True) or the 4096-d fc7 ones.
    split:     COCO annotation files only: the split name, when the file name
               does not say it (``captions_val2014.json`` -> "val").
    """
    if missing not in ("skip", "error"):
        raise ValueError(f"missing must be 'skip' or 'error', got {missing!r}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    opts = dict(image_dir=Path(image_dir) if image_dir is not None else None, missing=missing)

    if path.is_dir():
        for name in ("coco2014_captions.h5", "Flickr8k.token.txt", "Flickr8k_text/Flickr8k.token.txt",
                     "captions.json"):
            if (path / name).is_file():
                return load_dataset(path / name, image_dir=image_dir, missing=missing, pca=pca, split=split)
        raise DataError(f"{path}: unknown dataset folder: it holds none of coco2014_captions.h5 (cs231n), "
                        f"Flickr8k.token.txt or captions.json")
    if path.name == "coco2014_captions.h5":
        return _load_cs231n(path.parent, pca=pca)
    if path.suffix.lower() == ".txt":
        return _load_flickr8k_text(path, **opts)
    if path.suffix.lower() == ".json":
        d = read_json(path)
        images = d.get("images") if isinstance(d, dict) else None
        first = images[0] if isinstance(images, list) and images else None
        if isinstance(d, dict) and "annotations" in d and isinstance(images, list):
            return _load_coco(path, d, split=split, **opts)
        if isinstance(first, dict) and "sentences" in first:
            return _load_karpathy(path, d, **opts)
        if isinstance(first, dict) and "captions" in first:
            return _load_caption_list(path, d, **opts)
        if isinstance(d, dict) and "idx_to_word" in d:
            raise DataError(f"{path}: this is a vocabulary file, not a dataset")
    raise DataError(f"{path}: unknown dataset format (expected a cs231n coco_captioning folder, a caption-list, "
                    f"COCO or Karpathy JSON file, or Flickr8k.token.txt)")


# ---- encoding -----------------------------------------------------------------------

def encode_split(split: Split, vocab: Vocab, max_length: int, too_long: str = "truncate"):
    """Training rows for a split: ``(captions (M, max_length + 2) int32,
    image_idx (M,) int64, stats)``, with the rules and stats of
    ``Vocab.encode_batch`` (empty and all-unknown captions left out).

    A split that ships pre-encoded captions (cs231n) is re-laid-out from those ids
    (mapped into ``vocab`` by word); with the shipped vocab and
    ``max_length = T - 2`` its kept rows equal the shipped ones."""
    if split.captions is not None and split.image_idx is not None:
        return _encode_shipped(split, vocab, max_length, too_long)
    flat, owner = [], []
    for i, refs in enumerate(split.references):
        flat.extend(refs)
        owner.extend([i] * len(refs))
    ids, kept, stats = vocab.encode_batch(flat, max_length, too_long)
    return ids, np.asarray(owner, dtype=np.int64)[kept], stats


def _encode_shipped(split, vocab, max_length, too_long):
    vocab.encode_batch([], max_length, too_long)  # validates the arguments
    src = split.caption_vocab or vocab
    caps = np.asarray(split.captions)
    table = np.array([vocab.word_to_idx.get(w, UNK_ID) for w in src.idx_to_word], dtype=np.int32)
    word_mask = _word_mask(caps)
    n_words = word_mask.sum(axis=1)
    order = np.argsort(~word_mask, axis=1, kind="stable")  # word columns first, in order
    words = np.take_along_axis(table[caps], order, axis=1)
    if words.shape[1] < max_length:
        words = np.pad(words, ((0, 0), (0, max_length - words.shape[1])), constant_values=NULL_ID)
    words = words[:, :max_length]
    n_keep = np.minimum(n_words, max_length)
    valid = np.arange(max_length)[None, :] < n_keep[:, None]

    empty = n_words == 0
    too_long_rows = n_words > max_length
    dropped = too_long_rows & ~empty if too_long == "drop" else np.zeros_like(empty)
    all_unknown = ~empty & ~dropped & np.all((words == UNK_ID) | ~valid, axis=1)
    kept = ~(empty | dropped | all_unknown)

    out = np.full((len(caps), max_length + 2), NULL_ID, dtype=np.int32)
    out[:, 0] = START_ID
    out[:, 1:max_length + 1] = np.where(valid, words, NULL_ID)
    out[np.arange(len(caps)), n_keep + 1] = END_ID
    stats = dict(total=len(caps), kept=int(kept.sum()), truncated=int((too_long_rows & kept).sum()),
                 dropped_too_long=int(dropped.sum()), empty=int(empty.sum()), all_unknown=int(all_unknown.sum()))
    return out[kept], np.asarray(split.image_idx, dtype=np.int64)[kept], stats


def _word_mask(caps):
    """Where the words of pre-encoded captions are: before the first <END>, minus
    <START>/<NULL> (the rule of ``Vocab.decode``)."""
    return (np.cumsum(caps == END_ID, axis=1) == 0) & (caps != NULL_ID) & (caps != START_ID)


def _decode_rows(vocab, caps):
    """``[vocab.decode(row) for row in caps]``, without a Python loop over ids."""
    mask = _word_mask(caps)
    words = np.array(vocab.idx_to_word, dtype=object)[caps[mask]].tolist()
    texts, start = [], 0
    for end in np.cumsum(mask.sum(axis=1)).tolist():
        texts.append(" ".join(words[start:end]))
        start = end
    return texts


# ---- cs231n coco_captioning ---------------------------------------------------------

def _load_cs231n(folder: Path, *, pca: bool) -> Dataset:
    import h5py

    vocab_file = folder / "coco2014_vocab.json"
    vocab = Vocab.from_dict(read_json(vocab_file), source=str(vocab_file))
    cap_file = folder / "coco2014_captions.h5"
    splits = {}
    with _open_h5(h5py, cap_file) as f:
        shipped = {}
        for name in ("train", "val"):
            caps = _h5_read(h5py, f, cap_file, f"{name}_captions", "(N, T)", ndim=2, kinds="iu")
            idxs = _h5_read(h5py, f, cap_file, f"{name}_image_idxs", "(N,)", ndim=1, kinds="iu")
            if len(idxs) != len(caps):
                raise DataError(f"{cap_file}: dataset '{name}_image_idxs' has {len(idxs)} rows but "
                                f"'{name}_captions' has {len(caps)}")
            if caps.size and (caps.min() < 0 or caps.max() >= len(vocab)):
                raise DataError(f"{cap_file}: dataset '{name}_captions' holds ids outside 0..{len(vocab) - 1} "
                                f"(the size of {vocab_file.name})")
            shipped[name] = (caps, idxs)

    for name, (caps, idxs) in shipped.items():
        feat_file = folder / f"{name}2014_vgg16_fc7{'_pca' if pca else ''}.h5"
        with _open_h5(h5py, feat_file) as f:
            feats = _h5_read(h5py, f, feat_file, "features", "(N, D)", ndim=2, kinds="f")
        if idxs.size and (idxs.min() < 0 or idxs.max() >= len(feats)):
            raise DataError(f"{cap_file}: dataset '{name}_image_idxs' holds rows outside 0..{len(feats) - 1} "
                            f"(the rows of {feat_file.name})")
        urls = _read_urls(folder / f"{name}2014_urls.txt", len(feats))
        references = [[] for _ in range(len(feats))]
        for row, text in zip(idxs.tolist(), _decode_rows(vocab, caps)):
            references[row].append(text)
        splits[name] = Split(name=name, image_ids=[f"{name}/{i}" for i in range(len(feats))],
                             image_paths=[None] * len(feats), references=references, features=feats,
                             captions=caps.astype(np.int32, copy=False), image_idx=idxs.astype(np.int64),
                             urls=urls, caption_vocab=vocab)
    return Dataset(name="coco-cs231n", source=str(folder), splits=splits, vocab=vocab)


def _open_h5(h5py, path):
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({e})") from None


def _h5_read(h5py, f, path, key, expected, *, ndim, kinds):
    if key not in f or not isinstance(f[key], h5py.Dataset):
        raise DataError(f"{path}: dataset '{key}' missing")
    d = f[key]
    if d.ndim != ndim:
        raise DataError(f"{path}: dataset '{key}' has shape {d.shape}, expected {expected}")
    if d.dtype.kind not in kinds:
        want = "integer" if "i" in kinds else "floating-point"
        raise DataError(f"{path}: dataset '{key}' has dtype {d.dtype}, expected {want}")
    return d[()]


def _read_urls(path, n_rows):
    """One URL per feature row; optional (only used to show the photos)."""
    if not path.is_file():
        return None
    urls = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(urls) != n_rows:
        raise DataError(f"{path}: has {len(urls)} URLs but the features have {n_rows} rows")
    return urls


# ---- caption-list JSON --------------------------------------------------------------

def _load_caption_list(path, d, *, image_dir, missing):
    records = []
    for k, im in enumerate(d["images"]):
        where = f"images[{k}]"
        if not isinstance(im, dict):
            raise DataError(f"{path}: {where} must be an object")
        file, split = im.get("file"), im.get("split")
        if not isinstance(file, str) or not file:
            raise DataError(f"{path}: {where}.file must be a file name")
        if not isinstance(split, str) or not split:
            raise DataError(f"{path}: {where}.split must be a split name such as 'train'")
        records.append((split, file, file, _caption_strings(im.get("captions"), path, f"{where}.captions")))
    base = d.get("image_dir", ".")
    if not isinstance(base, str):
        raise DataError(f"{path}: 'image_dir' must be a folder name")
    root = _image_root(image_dir, [path.parent / base], records)
    return _assemble(d.get("name") or path.stem, path, records, root, missing)


def _caption_strings(caps, path, where):
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise DataError(f"{path}: {where} must be a list of strings")
    return caps


# ---- COCO annotation files ----------------------------------------------------------

def _load_coco(path, d, *, split, image_dir, missing):
    tag = re.search(r"(train|val|test)(\d{4})?", path.stem)
    split = split or (tag.group(1) if tag else None)
    if split is None:
        split = "train"
        warnings.warn(f"{path}: the file name names no split; loading it as 'train'", stacklevel=3)
    refs = {}
    for k, im in enumerate(d["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise DataError(f"{path}: images[{k}] must be an object with 'id' and 'file_name'")
        refs[im["id"]] = []
    if not isinstance(d["annotations"], list):
        raise DataError(f"{path}: 'annotations' must be a list")
    for k, a in enumerate(d["annotations"]):
        if not isinstance(a, dict) or not isinstance(a.get("caption"), str):
            raise DataError(f"{path}: annotations[{k}] must be an object with a 'caption' string")
        if a.get("image_id") not in refs:
            raise DataError(f"{path}: annotations[{k}].image_id {a.get('image_id')!r} is not in 'images'")
        refs[a["image_id"]].append(a["caption"])
    records = [(split, str(im["id"]), im["file_name"], refs[im["id"]]) for im in d["images"]]
    folder = tag.group(0) if tag else "images"
    root = _image_root(image_dir, [path.parent / folder, path.parent.parent / folder, path.parent], records)
    return _assemble("coco", path, records, root, missing)


# ---- Karpathy split files -----------------------------------------------------------

def _load_karpathy(path, d, *, image_dir, missing):
    records = []
    for k, im in enumerate(d["images"]):
        where = f"images[{k}]"
        if not isinstance(im, dict) or not isinstance(im.get("filename"), str):
            raise DataError(f"{path}: {where} must be an object with a 'filename'")
        sentences = im.get("sentences")
        if not isinstance(sentences, list) or not all(isinstance(s, dict) for s in sentences):
            raise DataError(f"{path}: {where}.sentences must be a list of objects")
        caps = []
        for j, s in enumerate(sentences):
            raw, tokens = s.get("raw"), s.get("tokens")
            if raw is None and isinstance(tokens, list) and all(isinstance(t, str) for t in tokens):
                raw = " ".join(tokens)
            if not isinstance(raw, str):
                raise DataError(f"{path}: {where}.sentences[{j}] has neither a 'raw' string nor 'tokens'")
            caps.append(raw)
        split = im.get("split")
        if not isinstance(split, str):
            raise DataError(f"{path}: {where}.split must be a split name")
        split = "train" if split == "restval" else split  # the usual Karpathy practice
        image_id = im.get("cocoid", im.get("filename"))
        rel = os.path.join(im.get("filepath") or "", im["filename"])
        records.append((split, str(image_id), rel, caps))
    root = _image_root(image_dir, [path.parent, *_flickr_image_dirs(path.parent)], records)
    return _assemble(f"karpathy-{d.get('dataset') or path.stem}", path, records, root, missing)


# ---- Flickr8k text files ------------------------------------------------------------

FLICKR8K_SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                        "test": "Flickr_8k.testImages.txt"}


def _flickr_image_dirs(folder):
    names = ("Flicker8k_Dataset", "Flickr8k_Dataset", "images")
    return [base / n for base in (folder, folder.parent) for n in names]


def _load_flickr8k_text(path, *, image_dir, missing):
    refs, bogus = {}, 0
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        name, hash_, _ = key.rpartition("#")
        if not tab or not hash_:
            raise DataError(f"{path}: line {lineno} is not 'NAME.jpg#K<TAB>caption'")
        if not name.lower().endswith(IMAGE_SUFFIXES):
            bogus += 1  # e.g. "2258277193_586949ec62.jpg.1#0" in the published file
            continue
        refs.setdefault(name, []).append(caption.strip())
    if bogus:
        warnings.warn(f"{path}: ignored {bogus} caption lines that name no image file", stacklevel=3)
    records = []
    for split, fname in FLICKR8K_SPLIT_FILES.items():
        list_file = path.parent / fname
        if list_file.is_file():
            names = [n.strip() for n in list_file.read_text(encoding="utf-8").splitlines() if n.strip()]
            records.extend((split, n, n, refs.get(n, [])) for n in names)
    if not records:
        raise DataError(f"{path}: no split lists beside it (expected {', '.join(FLICKR8K_SPLIT_FILES.values())})")
    root = _image_root(image_dir, _flickr_image_dirs(path.parent), records)
    return _assemble("flickr8k", path, records, root, missing)


# ---- shared: image folder, missing files, splits ------------------------------------

def _image_root(image_dir, candidates, records):
    """The given image folder, else the first candidate holding the first image
    (else the first candidate that exists)."""
    if image_dir is not None:
        if not image_dir.is_dir():
            raise DataError(f"{image_dir}: image folder not found")
        return image_dir
    probe = records[0][2] if records else ""
    existing = [c for c in candidates if c.is_dir()]
    for c in existing:
        if (c / probe).is_file():
            return c
    if existing:
        return existing[0]
    raise DataError(f"{candidates[0]}: image folder not found; give the image folder (image_dir / --image-dir)")


def _assemble(name, source, records, root, missing) -> Dataset:
    """Group (split, image_id, relative path, references) records into splits,
    leaving out images without references and images missing on disk."""
    listing = {}  # folder -> names in it; one listdir per folder instead of a stat per image

    def exists(p):
        folder, base = os.path.split(p)
        if folder not in listing:
            listing[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        return base in listing[folder]

    splits, n_missing, n_unreferenced = {}, 0, 0
    for split, image_id, rel, refs in records:
        if not refs:
            n_unreferenced += 1
            continue
        p = os.path.abspath(os.path.join(root, rel))
        if not exists(p):
            if missing == "error":
                raise DataError(f"{source}: image {p} not found (use missing='skip' to leave out missing images)")
            n_missing += 1
            continue
        s = splits.setdefault(split, Split(name=split, image_ids=[], image_paths=[], references=[]))
        s.image_ids.append(image_id)
        s.image_paths.append(p)
        s.references.append(list(refs))
    if n_unreferenced:
        warnings.warn(f"{source}: left out {n_unreferenced} images that have no captions", stacklevel=3)
    if n_missing:
        warnings.warn(f"{source}: skipped {n_missing} of {len(records)} images whose files are missing "
                      f"under {root}", stacklevel=3)
    if not splits:
        raise DataError(f"{source}: no usable images ({n_missing} missing on disk under {root}, "
                        f"{n_unreferenced} without captions); give the image folder with image_dir / --image-dir")
    order = sorted(splits, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER), s))
    return Dataset(name=name, source=str(source), splits={s: splits[s] for s in order},
                   skipped_missing=n_missing)
