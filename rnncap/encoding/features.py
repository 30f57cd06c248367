"""Encode a dataset's images once into an HDF5 feature cache: `rnncap features`.

The cache's layout and its reading live in ``rnncap.encoding.cache``; the PCA and
standardisation in ``rnncap.encoding.pca`` (their names are importable from here too).

Extraction is resumable: after every batch the features are flushed to disk, then
their ``done`` flags. Re-running the same command skips finished rows. It refuses
to resume a file made with another encoder (identity differs) or another image list.

A missing or broken image is counted and skipped: every other image is encoded, then
the run stops with one ``DataError`` line saying how many failed and naming the
first, their rows left not done. Fix or remove them and run again: only those rows
are read. (Skipping them silently would leave captions without features; a split
with rows not done is refused for training.) ``rnncap features --ray`` does the same.

PCA is fitted on the train features only, so validation images never shape the
projection.
"""
from __future__ import annotations

import os
import time

import numpy as np

from ..errors import DataError, RnncapError
# Re-exported: the cache and the transform are part of what this stage offers.
from .cache import (FORMAT, _open_for_writing, _split_group, _store_pca, bad_images_message,  # noqa: F401
                    feature_info, load_features, read_identity, read_pca)
from .pca import apply_pca, fit_pca, fit_standardizer, transformed_dim  # noqa: F401


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
    Each image becomes one row of its split: (D,) float32 pooled features, or an (L, C)
    float16 map (``encoder.feature_shape``; layout in ``rnncap.encoding.cache``).
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


def _fill(f, group, split, paths, encoder, batch_size, progress, workers, failed):
    """Encode the rows not yet done, in batches, decoding the next batch meanwhile.
    Images that cannot be read are appended to ``failed`` as (path, error) and their
    rows left not done. Returns the number of rows encoded."""
    import contextlib

    from ..data.images import read_ahead
    from ..progress import progress_bar

    n = len(paths)
    todo = np.flatnonzero(~group["done"][...])
    if not len(todo):
        return 0
    # The encoder's own batch input when it has one (uint8 pixels, normalised by the
    # network batch-wise), else the normalised arrays of ``preprocess``.
    read = getattr(encoder, "load", encoder.preprocess)
    bar = progress_bar(total=n, initial=n - len(todo), desc=f"{split} features", unit="img",
                       enabled=progress, smoothing=0.1)
    encoded, start = 0, 0
    with contextlib.closing(bar), contextlib.closing(read_ahead(read, [paths[r] for r in todo], batch_size,
                                                                workers)) as batches:
        for results in batches:
            rows, start = todo[start:start + len(results)], start + len(results)
            good = [k for k, r in enumerate(results) if not isinstance(r, DataError)]
            failed.extend((paths[rows[k]], r) for k, r in enumerate(results) if isinstance(r, DataError))
            bar.update(len(rows) - len(good))
            if not good:
                continue
            rows = rows[good]
            feats = np.asarray(encoder.encode(np.stack([results[k] for k in good]), batch_size=len(rows)),
                               dtype=np.float32)
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
    return encoded


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
    from .encoders import get_encoder  # first: it sets torch's OpenMP wait policy
    from ..data.datasets import load_dataset

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
