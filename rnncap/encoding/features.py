"""Encode a dataset's images once into an HDF5 feature cache: `rnncap features`.

File layout (one file, a group per split)::

    /                       attrs: format, encoder (identity JSON), dataset
    /{split}/image_ids      (n,) utf-8 strings, the dataset's image order
    /{split}/features       (n, D) float32, or (n, L, C) float16 for spatial maps
    /{split}/done           (n,) bool; a row counts only once its flag is set
    /pca/mean               (D,) float32       optional, fitted on train only
    /pca/components         (D, K) float32     attrs: dim, whiten, fitted_on, n_fit
    /pca/explained_variance_ratio  (K,)

Extraction is resumable: after every batch the features are flushed to disk, then
their ``done`` flags. Re-running the same command skips finished rows. It refuses
to resume a file made with another encoder (identity differs) or another image list.

A missing or broken image is counted and skipped: every other image is encoded, then
the run stops with one ``DataError`` line saying how many failed and naming the
first, their rows left not done. Fix or remove them and run again: only those rows
are read. (Skipping them silently would leave captions without features; a split
with rows not done is refused for training.) ``rnncap features --ray`` does the same.

PCA is fitted on the train features only, so validation images never shape the
projection. For spatial maps (``--maps``: (L, C) per image) it is a per-channel PCA,
fitted on the C-vectors of all train locations. Projections are ``(x - mean) @ components`` in float32 — ``apply_pca``
is the one copy of that math, at training and at caption time. Whitening is off by
default: it inflates the many low-variance directions to unit scale, which mostly
amplifies noise for a captioner that learns its own input projection.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from ..errors import DataError, RnncapError

FORMAT = "rnncap-features/1"


# ---- extraction ---------------------------------------------------------------------

def extract_features(split_items, encoder, out_path, batch_size=32, progress=True, pca_dim=None,
                     workers=2, dataset=None, whiten=False):
    """Encode images into the cache at ``out_path``, resuming any finished rows.

    split_items: {split: (image_ids, image_paths)}, each a list of n entries.
    encoder:     an ``rnncap.encoding.encoders.Encoder`` (``identity``, ``feature_shape``,
                 ``preprocess``, ``encode``).
    pca_dim:     when given, fit a K-dim PCA on the train features and store it.
    workers:     threads that decode and resize images while the network runs.
    dataset:     recorded in the file, for people reading it later.
    Returns {split: number of rows encoded by this call}.
    """
    import h5py

    ident = encoder.identity()
    encoded, failed = {}, []
    with _open_for_writing(h5py, out_path, ident, dataset) as f:
        for split, (ids, paths) in split_items.items():
            ids, paths = [str(i) for i in ids], [os.fspath(p) for p in paths]
            if len(ids) != len(paths):
                raise RnncapError(f"split {split!r}: {len(ids)} image ids but {len(paths)} paths")
            group = _split_group(h5py, f, split, ids, tuple(encoder.feature_shape), out_path)
            encoded[split] = _fill(f, group, split, paths, encoder, batch_size, progress, workers, failed)
        if failed:
            raise DataError(bad_images_message(out_path, [e for _, e in failed], sum(encoded.values())))
        if pca_dim is not None:
            _store_pca(f, pca_dim, whiten, out_path)
    return encoded


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


def _fill(f, group, split, paths, encoder, batch_size, progress, workers, failed):
    """Encode the rows not yet done, in batches, decoding the next batch meanwhile.
    Images that cannot be read are appended to ``failed`` as (path, error) and their
    rows left not done. Returns the number of rows encoded."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    n = len(paths)
    todo = np.flatnonzero(~group["done"][...])
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    if not batches:
        return 0
    bar = tqdm(total=n, initial=n - len(todo), desc=f"{split} features", unit="img",
               disable=not progress, smoothing=0.1)
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="rnncap-decode")
    try:
        def submit(rows):
            return [pool.submit(encoder.preprocess, paths[r]) for r in rows]

        pending = submit(batches[0])
        encoded = 0
        for k, rows in enumerate(batches):
            good, x = [], []
            for r, fut in zip(rows, pending):
                try:
                    x.append(fut.result())
                    good.append(r)
                except DataError as e:
                    failed.append((paths[r], e))
            pending = submit(batches[k + 1]) if k + 1 < len(batches) else []
            bar.update(len(rows) - len(good))
            if not good:
                continue
            rows = np.asarray(good)
            feats = np.asarray(encoder.encode(np.stack(x), batch_size=len(rows)), dtype=np.float32)
            lo, hi = rows[0], rows[-1] + 1
            if hi - lo == len(rows):  # the usual case: a contiguous run of rows
                group["features"][lo:hi] = feats
                f.flush()
                group["done"][lo:hi] = True
            else:
                group["features"][rows] = feats
                f.flush()
                group["done"][rows] = True
            f.flush()
            bar.update(len(rows))
            encoded += len(rows)
    finally:
        bar.close()
        pool.shutdown(wait=True, cancel_futures=True)
    return encoded


# ---- PCA ----------------------------------------------------------------------------

def fit_pca(train_features, dim, whiten=False):
    """Principal components of (n, D) features: {"mean" (D,), "components" (D, K),
    "explained_variance_ratio" (K,)}, all float32.

    Computed from the D x D covariance (memory grows with D^2, not n * D). Each
    component's sign is fixed (largest entry positive) so refits agree. With
    ``whiten`` the components are scaled so projections have unit variance.
    """
    x = np.asarray(train_features)
    if x.ndim != 2:
        raise RnncapError(f"PCA needs (n, D) features, got shape {x.shape}")
    n, d = x.shape
    if not 1 <= dim <= min(n - 1, d):
        raise RnncapError(f"PCA dimension {dim} must be between 1 and {min(n - 1, d)} "
                          f"({n} train features of dimension {d})")
    mean, cov = _mean_and_covariance(x)
    var, vecs = np.linalg.eigh(cov)
    order = np.argsort(var)[::-1][:dim]
    var, comps = np.maximum(var[order], 0.0), vecs[:, order]
    signs = np.sign(comps[np.argmax(np.abs(comps), axis=0), np.arange(dim)])
    comps = comps * np.where(signs == 0, 1.0, signs)
    if whiten:
        comps = comps / np.sqrt(var + 1e-12)
    total = np.trace(cov)
    return {"mean": mean.astype(np.float32), "components": comps.astype(np.float32),
            "explained_variance_ratio": (var / total if total > 0 else np.zeros_like(var)).astype(np.float32),
            "whiten": bool(whiten)}


def _mean_and_covariance(x, chunk=16384):
    """Mean (D,) and covariance (D, D) of (n, D) rows in float64, a chunk of rows at a
    time, so that a float16 map cache (294k rows for Flickr8k) is never copied whole."""
    n, d = x.shape
    total = np.zeros(d)
    for i in range(0, n, chunk):
        total += x[i:i + chunk].sum(axis=0, dtype=np.float64)
    mean = total / n
    cov = np.zeros((d, d))
    for i in range(0, n, chunk):
        xc = x[i:i + chunk].astype(np.float64) - mean
        cov += xc.T @ xc
    return mean, cov / (n - 1)


def apply_pca(features, pca):
    """The feature transform stored with a cache or checkpoint, applied to (N, D)
    features or (N, L, D) maps (the same map at every location): float32.

    ``pca`` holds "mean" (D,) and, optionally, "components" (D, K) from ``fit_pca``
    and "scale" (K,) from ``fit_standardizer``: out = ((x - mean) @ components) * scale,
    each step only when its entry is there. This one function serves training,
    evaluation and caption time. Works on NumPy and CuPy arrays.
    """
    from ..backend import get_array_module

    xp = get_array_module(features)
    mean = xp.asarray(pca["mean"], dtype=xp.float32)
    if features.shape[-1] != mean.shape[0]:
        raise RnncapError(f"features are {features.shape[-1]}-d but the PCA expects {mean.shape[0]}-d")
    out = features.astype(xp.float32, copy=False) - mean
    if pca.get("components") is not None:
        out = out @ xp.asarray(pca["components"], dtype=xp.float32)
    if pca.get("scale") is not None:
        out *= xp.asarray(pca["scale"], dtype=xp.float32)
    return out


def transformed_dim(pca, raw_dim):
    """Size of a feature vector after ``apply_pca`` (``raw_dim`` without a transform)."""
    if pca is None:
        return raw_dim
    comps = pca.get("components")
    return int(comps.shape[1]) if comps is not None else int(len(pca["mean"]))


def fit_standardizer(features, pca=None):
    """Per-channel standardisation on top of ``pca`` (None: none yet), fitted on
    train features *after* that transform: a new transform dict whose "scale" gives
    every channel unit variance over the train rows (and locations, for maps).

    Without a PCA the mean is fitted here too; with one, its projections already
    have zero mean on train. Channels with no variance keep scale 1.
    """
    x = np.asarray(features)
    rows = x.reshape(-1, x.shape[-1])
    mean, var = _mean_and_variance(rows)
    std = np.sqrt(var)
    scale = np.where(std > 1e-8, 1.0 / np.maximum(std, 1e-8), 1.0).astype(np.float32)
    if pca is None:
        return {"mean": mean.astype(np.float32), "scale": scale}
    return {**pca, "scale": scale if pca.get("scale") is None else pca["scale"] * scale}


def _mean_and_variance(x, chunk=16384):
    """Per-column mean and variance (population) of (n, D) rows, in float64 chunks."""
    n, d = x.shape
    total, sq = np.zeros(d), np.zeros(d)
    for i in range(0, n, chunk):
        c = x[i:i + chunk].astype(np.float64)
        total += c.sum(axis=0)
        sq += (c * c).sum(axis=0)
    mean = total / n
    return mean, np.maximum(sq / n - mean * mean, 0.0)


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
    """(features (n, D') float32, image_ids list) of one split. With ``pca`` the
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


# ---- command line -------------------------------------------------------------------

def add_arguments(p):
    from ..cli import positive_int
    from .encoders import DEFAULT_ENCODER, ENCODERS

    p.add_argument("--data", required=True, help="dataset: captions file or folder (see docs/datasets.md)")
    p.add_argument("--out", required=True, help="HDF5 feature cache to write (resumed if it exists)")
    p.add_argument("--encoder", default=DEFAULT_ENCODER, choices=ENCODERS, help="image encoder")
    p.add_argument("--maps", nargs="?", const="head", choices=["head", "block"],
                   help="keep the spatial map (L locations x C channels, float16) for the attention "
                        "model instead of pooling it: the head's 1280 channels (default) or the "
                        "last block's 320 (efficientnet-lite)")
    p.add_argument("--input-size", type=positive_int, metavar="S",
                   help="resize photos to S x S pixels (default: the encoder's own, 224 for "
                        "efficientnet-lite0); a larger S gives a finer map, ceil(S / 32) a side: "
                        "14 x 14 at 448. Recorded with the features, so captioning rebuilds it")
    p.add_argument("--weights", help="encoder weights file (vgg16 needs one; see docs/encoders.md)")
    p.add_argument("--pca", type=positive_int, metavar="K", help="also fit a K-dim PCA on the train features")
    p.add_argument("--pca-whiten", action="store_true", help="whiten the PCA (unit variance per component)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per network batch")
    p.add_argument("--splits", help="comma-separated splits to encode (default: all the dataset has)")
    p.add_argument("--image-dir", help="where the images are, if not where the dataset says")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--workers", type=positive_int, default=2, help="image-decoding threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="read and encode on Ray Data: a local cluster, or join the one at ADDRESS "
                        "(needs the extra: pip install 'rnncap[ray]'; see docs/scaling.md)")
    p.add_argument("--ray-actors", type=positive_int, metavar="N",
                   help="with --ray: N encoder actors (default: 1 up to the cluster's CPUs)")


def run(args):
    import sys

    if "torch" not in sys.modules:
        # OpenMP threads that spin while waiting burn the CPU they wait for when the
        # machine is shared: measured 76 vs 48 ms of CPU per image on a busy 2-core box.
        # Only read when torch loads; a value the user set wins.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from ..data.datasets import load_dataset
    from .encoders import get_encoder

    dataset = load_dataset(args.data, image_dir=args.image_dir)
    names = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else list(dataset.splits)
    items = {}
    for name in names:
        split = dataset[name]
        if split.image_paths is None or any(p is None for p in split.image_paths):
            raise RnncapError(f"{args.data}: split '{name}' has no image files (this dataset ships "
                              f"its own features, so it needs no `rnncap features`)")
        items[name] = (split.image_ids, split.image_paths)
    if args.pca and "train" not in items:
        raise RnncapError("--pca is fitted on the train split; include train in --splits")
    pooling = {None: "mean", "head": "map", "block": "block-map"}[args.maps]
    encoder = get_encoder(args.encoder, weights=args.weights, device=args.device, pooling=pooling,
                          image_size=args.input_size)
    start = time.perf_counter()
    if args.ray:
        from .ray_features import run_from_args

        done = run_from_args(args, items, encoder, pooling)
    else:
        done = extract_features(items, encoder, args.out, batch_size=args.batch_size,
                                progress=not args.quiet, pca_dim=args.pca, workers=args.workers,
                                dataset=args.data, whiten=args.pca_whiten)
    secs = time.perf_counter() - start
    n = sum(done.values())
    rate = f", {n / secs:.1f} images/s" if n else ""
    shape = " x ".join(str(d) for d in encoder.feature_shape)
    print(f"{args.out}: encoded {n} images in {secs:.1f} s{rate} with {encoder.name} "
          f"({shape}, pooling {encoder.pooling}); splits: "
          + ", ".join(f"{k} {len(v[0])}" for k, v in items.items())
          + (f"; PCA to {args.pca} dims fitted on train" if args.pca else ""))
    return 0
