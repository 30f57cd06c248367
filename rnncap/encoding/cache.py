"""The HDF5 feature cache: its layout, opening it to write (with the checks that make a
resume safe), the PCA stored in it, and reading it back.

File layout (one file, a group per split)::

    /                       attrs: format, encoder (identity JSON), dataset
    /{split}/image_ids      (n,) utf-8 strings, the dataset's image order
    /{split}/features       (n, D) float32, or (n, L, C) float16 for spatial maps
    /{split}/done           (n,) bool; a row counts only once its flag is set
    /pca/mean               (D,) float32       optional, fitted on train only
    /pca/components         (D, K) float32     attrs: dim, whiten, fitted_on, n_fit
    /pca/explained_variance_ratio  (K,)

Both writers, ``rnncap.encoding.features`` (one process) and
``rnncap.encoding.ray_features`` (Ray Data), fill it through these functions, so a
file one starts the other can finish. A file made with another encoder (identity
differs) or another image list is refused, never resumed.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..errors import DataError, RnncapError
from .pca import apply_pca, fit_pca

FORMAT = "rnncap-features/1"


# ---- writing ------------------------------------------------------------------------

def _open_for_writing(h5py, path, ident, dataset):
    path = os.fspath(path)
    if os.path.exists(path):
        try:
            f = h5py.File(path, "a")
        except OSError as e:
            raise DataError(f"{path}: exists but cannot be opened as HDF5 ({e}); "
                            f"delete it or choose another --out") from None
        stored = f.attrs.get("encoder")
        if f.attrs.get("format") != FORMAT or stored is None:
            f.close()
            raise DataError(f"{path}: exists and is not an rnncap feature cache; choose another --out")
        from .encoders import describe_mismatch

        diff = describe_mismatch(json.loads(stored), ident)
        if diff:
            f.close()
            raise RnncapError(f"{path}: was made with another encoder ({diff}); "
                              f"use a new --out, or delete the file to start over")
        return f
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    f = h5py.File(path, "w", track_order=True)  # splits listed in the order written
    f.attrs["format"] = FORMAT
    f.attrs["encoder"] = json.dumps(ident, sort_keys=True)
    f.attrs["dataset"] = "" if dataset is None else os.fspath(dataset)
    return f


def _split_group(h5py, f, split, ids, shape, path):
    if split == "pca":
        raise RnncapError("a split cannot be called 'pca' (that name holds the PCA)")
    g = f.get(split)
    if g is not None and not all(k in g for k in ("image_ids", "features", "done")):
        del f[split]  # creation was interrupted before any row was encoded
        g = None
    if g is not None:
        stored = list(g["image_ids"].asstr()[...])
        if stored != ids:
            raise RnncapError(f"{path}: split '{split}' holds a different image list ({len(stored)} images, "
                              f"this dataset has {len(ids)}); use a new --out")
        if g["features"].shape[1:] != shape:
            raise RnncapError(f"{path}: split '{split}' has features of shape {g['features'].shape[1:]}, "
                              f"the encoder gives {shape}")
        return g
    n = len(ids)
    g = f.create_group(split)
    g.create_dataset("image_ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
    # Maps are L times larger; half precision keeps 3 significant digits, far below
    # the spread of the features, and halves the file (0.9 GB for Flickr8k's 1280 x 49).
    dtype, rows = ("f2", 32) if len(shape) > 1 else ("f4", 256)
    g.create_dataset("features", shape=(n, *shape), dtype=dtype,
                     chunks=(max(1, min(n, rows)), *shape) if n else None)
    g.create_dataset("done", shape=(n,), dtype=bool, fillvalue=False)
    f.flush()
    return g


def bad_images_message(out_path, errors, encoded):
    """The one line a run with unreadable images ends with (this path and --ray's):
    errors: what went wrong with each, first first; encoded: the images that went well."""
    return (f"{out_path}: {len(errors)} of {len(errors) + encoded} images could not be read and were "
            f"skipped (first: {errors[0]}); the other {encoded} are encoded. Fix or remove them and "
            f"run again: only their rows are left")


def _store_pca(f, dim, whiten, path):
    g = f.get("train")
    if g is None or "done" not in g:
        raise RnncapError(f"{path}: PCA is fitted on the train split, which this file does not have; "
                          f"include train in --splits")
    if not g["done"][...].all():
        raise RnncapError(f"{path}: the train split is not fully encoded; cannot fit the PCA")
    train = g["features"][...]
    pca = fit_pca(train.reshape(-1, train.shape[-1]), dim, whiten)
    if "pca" in f:
        del f["pca"]
    p = f.create_group("pca")
    for key in ("mean", "components", "explained_variance_ratio"):
        p.create_dataset(key, data=pca[key])
    p.attrs.update(dim=int(dim), whiten=bool(whiten), fitted_on="train", n_fit=int(len(train)))
    f.flush()
    return pca



# ---- reading ------------------------------------------------------------------------

def _open_for_reading(path):
    import h5py

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"feature file not found: {path} (make it with `rnncap features`)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: cannot be opened as HDF5 ({e})") from None
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise DataError(f"{path}: not an rnncap feature cache (made by `rnncap features`)")
    return f


def load_features(path, split, pca=True):
    """(features (N, D') float32 (or (N, L, D') maps), image_ids list) of one split. With ``pca`` the
    stored PCA is applied when the file has one."""
    with _open_for_reading(path) as f:
        splits = [k for k in f if k != "pca"]
        if split not in splits:
            raise DataError(f"{path}: has no split '{split}' (it has {', '.join(splits) or 'none'})")
        g = f[split]
        done = g["done"][...]
        if not done.all():
            raise DataError(f"{path}: split '{split}' is incomplete ({int(done.sum())} of {len(done)} "
                            f"images encoded); run `rnncap features` again to finish it")
        feats = g["features"][...].astype(np.float32, copy=False)
        ids = list(g["image_ids"].asstr()[...])
        stored_pca = _read_pca(f) if pca else None
    if stored_pca is not None:
        feats = apply_pca(feats, stored_pca)
    return feats, ids


def read_pca(path):
    """The stored PCA as {"mean", "components", "explained_variance_ratio", "whiten"},
    or None when the file has none."""
    with _open_for_reading(path) as f:
        return _read_pca(f)


def _read_pca(f):
    p = f.get("pca")
    if p is None:
        return None
    out = {k: p[k][...].astype(np.float32) for k in ("mean", "components", "explained_variance_ratio")}
    out["whiten"] = bool(p.attrs.get("whiten", False))
    return out


def read_identity(path):
    """The encoder identity (``Encoder.identity()``) the file was made with."""
    with _open_for_reading(path) as f:
        return json.loads(f.attrs["encoder"])


def feature_info(path):
    """{"encoder", "dataset", "splits": {name: (done, n)}, "pca_dim"} for a cache."""
    with _open_for_reading(path) as f:
        splits = {k: (int(f[k]["done"][...].sum()), int(f[k]["done"].shape[0])) for k in f if k != "pca"}
        return {"encoder": json.loads(f.attrs["encoder"]), "dataset": str(f.attrs.get("dataset", "")),
                "splits": splits, "pca_dim": int(f["pca"].attrs["dim"]) if "pca" in f else None}
