"""Feature extraction on Ray Data: ``rnncap features ... --ray [ADDRESS]``.

The same HDF5 cache as ``rnncap.encoding.features`` (same layout, same resume, same PCA), with
the images read and encoded by a Ray cluster, this machine alone or many:

    rows not yet done --from_arrow--> read + preprocess (tasks: decode, resize, normalise)
        --map_batches(compute=ActorPoolStrategy)--> encoder actors (1 CPU each, torch on
        one thread, or 1 GPU each) --iter_batches--> this process writes the HDF5 file

Only the driver (this process) touches the file, from the results as they arrive.
Ray does not keep the order, so every row carries its split and its row number, and
rows already written are never written again (a retried batch cannot duplicate one).
After each batch the features are flushed, then their ``done`` flags, as in the
single-process path: an interrupted run keeps every row written, and the same command
resumes with the rest. A worker that dies mid-batch is restarted by Ray and its batch
run again.

Missing or broken images are counted and skipped, rather than stopping the cluster
at the first one: every other image is encoded, then the run stops with one line
naming how many failed and the first of them, their rows left not done (the cache
stays complete-or-refused for training, as in the single-process path). Fix or
remove them and run again: only those rows are read. The PCA is fitted on train
after encoding, once train is complete.

A local cluster (no ADDRESS) is private to this machine: it listens on 127.0.0.1
only, and Ray's start-up probe of cloud metadata servers is sent to a closed local
port, so nothing leaves the machine. Usage statistics are off unless the user turned
them on. Joining a cluster (ADDRESS) leaves Ray's settings alone; the encoder's
weights must then be where ``--weights`` (or the default package) says on every node.
"""
from __future__ import annotations

import os
import time
import uuid
from contextlib import contextmanager

import numpy as np

from ..errors import DataError, RnncapError


# ---- the cluster -------------------------------------------------------------------------

@contextmanager
def _loopback_only():
    """Environment for starting a local cluster that talks to nobody else.

    Ray resolves "this node" from a route to a public address unless told it is a
    single-machine cluster (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read when ray is
    imported), and its dashboard probes cloud metadata servers over plain HTTP even
    with usage stats off: that goes to a proxy on a closed port of 127.0.0.1 and fails
    at once (gRPC between Ray's own processes bypasses it through no_proxy). Ray's
    processes keep the environment they were started with."""
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def connect(address=None, num_cpus=None, object_store_memory=None):
    """Ray, initialised: the cluster already joined in this process if there is one,
    else a new local cluster (``address`` None) or the cluster at ``address``.
    Returns (ray, started): ``started`` when this call started it (so shut it down)."""
    import importlib.util
    import logging
    import sys

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return sys.modules["ray"], False
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("pyarrow") is None:
        raise RnncapError("--ray needs Ray Data; install it with: pip install 'rnncap[ray]'")
    quiet = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    if address:
        import ray

        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise RnncapError(f"--ray {address}: cannot join the cluster ({str(e).splitlines()[0]})") from None
        return ray, True
    with _loopback_only():
        import ray
        from ray._private import ray_constants

        # Imported earlier in this process, ray read the setting then: tell it again.
        ray_constants.ENABLE_RAY_CLUSTER = False
        ray.init(num_cpus=num_cpus, object_store_memory=object_store_memory,
                 _node_ip_address="127.0.0.1", **quiet)
    return ray, True


# ---- the pipeline -------------------------------------------------------------------------

_ENCODERS = {}  # per worker process: (run token, device) -> the encoder, built once


def _encoder(make_encoder, token, device):
    key = (token, device)
    if key not in _ENCODERS:
        _ENCODERS.clear()  # one run's encoder at a time per process
        _ENCODERS[key] = make_encoder(device=device)
    return _ENCODERS[key]


def _read_and_preprocess(batch, make_encoder, token):
    """Ray task: image files -> network inputs (n, 3, S, S); a file that cannot be
    read becomes zeros with ok False and its error."""
    enc = _encoder(make_encoder, token, "cpu")
    n = len(batch["row"])
    images = np.zeros((n, 3, enc.image_size, enc.image_size), np.float32)
    ok = np.ones(n, bool)
    errors = np.full(n, "", dtype=object)
    for i, path in enumerate(batch["path"]):
        try:
            images[i] = enc.preprocess(str(path))
        except DataError as e:
            ok[i], errors[i] = False, str(e)
    return {"split": batch["split"], "row": batch["row"], "image": images, "ok": ok, "error": errors}


class _EncoderActor:
    """Ray actor: network inputs -> features, on one CPU thread (or its GPU)."""

    def __init__(self, make_encoder, token):
        import sys

        import ray

        device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.encoder = _encoder(make_encoder, token, device)
        if "torch" in sys.modules:  # the encoder runs on torch: one thread per actor
            sys.modules["torch"].set_num_threads(1)

    def __call__(self, batch):
        ok = batch["ok"]
        feats = np.zeros((len(ok), *self.encoder.feature_shape), np.float32)
        if ok.any():
            x = batch["image"][ok]
            feats[ok] = np.asarray(self.encoder.encode(x, batch_size=len(x)), dtype=np.float32)
        return {"split": batch["split"], "row": batch["row"], "features": feats, "ok": ok,
                "error": batch["error"]}


def extract_features_ray(split_items, make_encoder, out_path, batch_size=32, progress=True,
                         pca_dim=None, dataset=None, whiten=False, actors=None, gpus_per_actor=0,
                         rows_per_block=None, stats=None, encoder=None):
    """``rnncap.encoding.features.extract_features`` with Ray Data reading and encoding.

    make_encoder(device=...) -> encoder: picklable; it runs once on this process (for
        the identity) and once per Ray worker process.
    actors: encoder actors: an int for a fixed pool, None for 1 up to the cluster's CPUs.
    rows_per_block: images per Ray block, the unit of a read task (default 4 batches).
    stats: a dict to fill with {"written", "duplicates", "failed", "first_batch_s",
        "first_batch_rows", "pipeline_s"} (rows written, rows that came twice, (split,
        row, error) of the images that failed, seconds to the first result and its
        size, seconds in all; for tests and benchmarks).
    encoder: this process's copy, if it has one already (else built by make_encoder).
    Needs ``connect()`` first. Returns {split: rows encoded by this call}; raises
    DataError after encoding everything else when images could not be read.
    """
    import h5py
    import pyarrow as pa
    import ray
    from ray.data import ActorPoolStrategy, DataContext
    from ..progress import progress_bar

    from .cache import _open_for_writing, _split_group, _store_pca, bad_images_message

    encoder = encoder if encoder is not None else make_encoder(device="cpu")
    ident = encoder.identity()
    stats = {} if stats is None else stats
    stats.clear()
    stats.update(written=0, duplicates=0, failed=[])
    with _open_for_writing(h5py, out_path, ident, dataset) as f:
        groups, todo = {}, []
        for split, (ids, paths) in split_items.items():
            ids, paths = [str(i) for i in ids], [os.fspath(p) for p in paths]
            if len(ids) != len(paths):
                raise RnncapError(f"split {split!r}: {len(ids)} image ids but {len(paths)} paths")
            groups[split] = g = _split_group(h5py, f, split, ids, tuple(encoder.feature_shape), out_path)
            todo += [(split, int(r), paths[r]) for r in np.flatnonzero(~g["done"][...])]
        written = {s: np.zeros(len(g["done"]), bool) for s, g in groups.items()}
        if todo:
            table = pa.table({"split": [t[0] for t in todo], "row": [t[1] for t in todo],
                              "path": [t[2] for t in todo]})
            per_block = rows_per_block or 4 * batch_size
            blocks = [table.slice(i, per_block) for i in range(0, len(table), per_block)]
            DataContext.get_current().enable_progress_bars = False
            token = uuid.uuid4().hex
            pool = (ActorPoolStrategy(size=actors) if actors else
                    ActorPoolStrategy(min_size=1, max_size=max(1, int(ray.cluster_resources().get("CPU", 1)))))
            ds = (ray.data.from_arrow(blocks)
                  .map_batches(_read_and_preprocess, batch_size=batch_size,
                               fn_kwargs={"make_encoder": make_encoder, "token": token})
                  .map_batches(_EncoderActor, batch_size=batch_size, compute=pool,
                               fn_constructor_kwargs={"make_encoder": make_encoder, "token": token},
                               num_cpus=0 if gpus_per_actor else 1, num_gpus=gpus_per_actor))
            total = sum(len(w) for w in written.values())
            bar = progress_bar(total=total, initial=total - len(todo), desc="features (ray)", unit="img",
                               enabled=progress, smoothing=0.1)
            t0 = time.perf_counter()
            try:
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    _write(f, groups, written, batch, stats)
                    bar.update(len(batch["row"]))
                    if "first_batch_s" not in stats:
                        stats.update(first_batch_s=time.perf_counter() - t0,
                                     first_batch_rows=len(batch["row"]))
            finally:
                bar.close()
                stats["pipeline_s"] = time.perf_counter() - t0
        failed = stats["failed"]
        encoded = {s: int(w.sum()) for s, w in written.items()}
        if failed:
            raise DataError(bad_images_message(out_path, [e for _, _, e in failed], sum(encoded.values())))
        if pca_dim is not None:
            _store_pca(f, pca_dim, whiten, out_path)
    return encoded


def _write(f, groups, written, batch, stats):
    """Store one result batch: features, flush, then the done flags, flush."""
    splits = batch["split"].astype(str)
    for split in np.unique(splits):
        sel = np.flatnonzero(splits == split)
        rows, ok = batch["row"][sel].astype(np.int64), batch["ok"][sel]
        for r, err in zip(rows[~ok], batch["error"][sel][~ok]):
            stats["failed"].append((str(split), int(r), str(err)))
        order = np.argsort(rows)
        rows, feats, ok = rows[order], batch["features"][sel][order], ok[order]
        fresh = ok & ~written[split][rows]
        stats["duplicates"] += int((ok & written[split][rows]).sum())
        rows, feats = rows[fresh], feats[fresh]
        if not len(rows):
            continue
        g = groups[split]
        g["features"][rows] = feats  # h5py wants increasing rows: sorted above
        f.flush()
        g["done"][rows] = True
        f.flush()
        written[split][rows] = True
        stats["written"] += len(rows)


# ---- the command line ---------------------------------------------------------------------

class EncoderRecipe:
    """``get_encoder`` arguments, picklable, for the workers: ``recipe(device=...)``."""

    def __init__(self, name, weights=None, pooling="mean", image_size=None):
        self.name, self.weights, self.pooling, self.image_size = name, weights, pooling, image_size

    def __call__(self, device="cpu"):
        from .encoders import get_encoder

        return get_encoder(self.name, weights=self.weights, device=device, pooling=self.pooling,
                           image_size=self.image_size)


def run_from_args(args, items, encoder, pooling):
    """`rnncap features --ray`: start or join the cluster, extract, shut down what it
    started. ``encoder`` is the one this process built. Returns rows encoded per split."""
    address = None if args.ray == "local" else args.ray
    t0 = time.perf_counter()
    ray, started = connect(address)
    try:
        t1 = time.perf_counter()
        done = extract_features_ray(items, EncoderRecipe(args.encoder, args.weights, pooling,
                                                                  getattr(args, "input_size", None)), args.out,
                                    batch_size=args.batch_size, progress=not args.quiet,
                                    pca_dim=args.pca, dataset=args.data, whiten=args.pca_whiten,
                                    actors=args.ray_actors, encoder=encoder,
                                    gpus_per_actor=1 if args.device in ("cuda", "gpu") else 0)
        print(f"ray: cluster ready in {t1 - t0:.1f} s, extraction took {time.perf_counter() - t1:.1f} s")
    finally:
        if started:
            ray.shutdown()
    return done
