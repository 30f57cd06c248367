"""The encoder's fast path against the plain path it replaced, side by side in one
process: ``python benchmarks/bench_encode.py``.

Workloads, each timed for both paths in alternating rounds (plain, fast, plain, ...),
so that load from other processes hits both alike:

- features: ``extract_features`` (what ``rnncap features`` runs: decoding threads,
  batches of 32, the HDF5 file) on photos from the 224-pixel Flickr8k copy;
- encode: ``Encoder.encode`` of full-size photo files (decode and resize included);
- caption: with a checkpoint, ``Captioner.caption_many`` of the same files, the
  encoder then the checkpoint's decoder, as ``rnncap caption`` runs each batch.

Every round also checks that both paths give the same features. ``profile`` says
where one path's time goes, stage by stage, for docs/performance.md.
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from .measure import machine_info, paired_ratios, summarize, time_alternating

PATHS = ("plain", "fast")


def photo_files(folder, n):
    """The first ``n`` image files of ``folder``, sorted by name."""
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith((".jpg", ".jpeg", ".png")))
    return [os.path.join(folder, f) for f in names[:n]]


def encoder_pair(name="efficientnet-lite0", **options):
    """{"plain": the old path, "fast": the new one} of the same encoder."""
    from ..encoding.encoders import get_encoder

    return {path: get_encoder(name, fast=path == "fast", **options) for path in PATHS}


def captioner_pair(checkpoint):
    """{"plain", "fast"}: the checkpoint's Captioner, with its encoder on either path;
    the plain one also decodes as it did before issue 23, one thread for up to 31
    photos (16 rows a shard, where the product now splits from 8)."""
    import copy

    from ..encoding.encoders import get_encoder
    from ..inference.sample import Captioner

    fast = Captioner.from_checkpoint(checkpoint)
    ident = fast.encoder.identity()
    plain_encoder = get_encoder(ident["name"], pooling=ident["pooling"], image_size=ident["image_size"],
                                fast=False)
    plain_model = copy.copy(fast.model)  # shares the parameters
    plain_model._min_decode_rows = 16
    plain = Captioner(plain_model, fast.vocab, plain_encoder, fast.pca, max_length=fast.max_length,
                      decode=fast.decode)
    return {"plain": plain, "fast": fast}


def contest(fns, n_images, repeats, warmup):
    """Time ``fns`` ({"plain": f, "fast": g}) alternately: images/s of each and the
    per-round ratio fast/plain."""
    times = time_alternating(fns, repeats, warmup)
    out = {path: dict(summarize(times[path]), images_per_s=n_images / summarize(times[path])["median_s"])
           for path in fns}
    out["ratio"] = paired_ratios(times["plain"], times["fast"])
    return out


def features_workload(encoders, paths, folder, batch_size=32, workers=2):
    """{path: a function that encodes ``paths`` into a fresh HDF5 cache in ``folder``},
    and a check that both caches hold the same features (max abs difference)."""
    from ..encoding.features import extract_features, load_features

    items = {"train": ([os.path.basename(p) for p in paths], paths)}

    def run(path):
        out = os.path.join(folder, f"{path}.h5")
        if os.path.exists(out):
            os.remove(out)
        extract_features(items, encoders[path], out, batch_size=batch_size, progress=False, workers=workers)
        return out

    def max_diff():
        a, b = (load_features(run(path), "train")[0] for path in PATHS)
        return float(np.abs(a - b).max())

    return {path: (lambda path=path: run(path)) for path in PATHS}, max_diff


def run_benchmark(photos_224, photos_full, checkpoint=None, n=64, n_full=32, repeats=3, warmup=1,
                  batch_size=32, caption_batch=16, log=print):
    """All workloads; returns a JSON-able dict (machine, settings, one entry per workload)."""
    import torch

    encoders = encoder_pair()
    fast = encoders["fast"]
    result = {"machine": machine_info(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
              "chunk": fast.chunk, "fused": bool(getattr(fast._net, "fused", False)), "workloads": {}}
    log(_header(result))

    def record(name, what, fns, n_images, max_diff):
        r = contest(fns, n_images, repeats, warmup)
        r.update(what=what, images=n_images, max_abs_diff=max_diff, loadavg_after=_load())
        result["workloads"][name] = r
        log(_row(name, r))

    if photos_224:
        files = photo_files(photos_224, n)
        with tempfile.TemporaryDirectory(prefix="rnncap-bench-encode-") as folder:
            fns, max_diff = features_workload(encoders, files, folder, batch_size)
            record("features", f"extract_features, {len(files)} photos, batch {batch_size}", fns, len(files),
                   max_diff())
    if photos_full:
        files = photo_files(photos_full, n_full)
        a, b = (encoders[p].encode(files, batch_size=caption_batch) for p in PATHS)
        record("encode", f"Encoder.encode of {len(files)} full-size files, batch {caption_batch}",
               {p: (lambda p=p: encoders[p].encode(files, batch_size=caption_batch)) for p in PATHS},
               len(files), float(np.abs(a - b).max()))
        if checkpoint:
            caps = captioner_pair(checkpoint)
            a, b = (caps[p].features(files) for p in PATHS)
            record("caption", f"Captioner.caption_many of {len(files)} full-size files, batch {caption_batch}",
                   {p: (lambda p=p: caps[p].caption_many(files, batch_size=caption_batch)) for p in PATHS},
                   len(files), float(np.abs(np.asarray(a) - np.asarray(b)).max()))
    return result


# ---- where the time goes --------------------------------------------------------------

def profile(encoder, files, batch_size=32, decoder=None, repeats=2):
    """Seconds per image of each stage of ``encoder`` on ``files``, run one after the
    other in this thread (no overlap): decode (``load_image``), resize, normalise, and
    the network, on one torch thread, split by torch.profiler into its kinds of op. ``decoder``: a Captioner,
    to time its decoding of the features too. Returns {stage: s per image}."""
    import torch
    from PIL import Image
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from ..data.images import load_image

    size = (encoder.image_size,) * 2
    n = len(files)
    stages = {}

    def timed(name, fn):
        best = None
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)
        stages[name] = best / n
        return out

    loaded = timed("decode", lambda: [load_image(f) for f in files])
    resized = timed("resize", lambda: [im.resize(size, Image.Resampling.BICUBIC) if im.size != size else im
                                       for im in loaded])
    if encoder.fast:  # torch normalises each chunk inside the network's call
        batch = np.stack([np.asarray(im, np.uint8) for im in resized])
    else:
        batch = timed("normalise", lambda: np.stack([encoder.preprocess(im) for im in resized]))
    # On one torch thread: the profiler sees only its own thread, and the fast path
    # would run its calls on worker threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encoder.encode(batch[:batch_size], batch_size=batch_size)  # warm-up
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            encoder.encode(batch, batch_size=batch_size)
            network = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    kinds = {}
    for event in prof.key_averages():
        kind = _op_kind(event.key)
        kinds[kind] = kinds.get(kind, 0.0) + event.self_cpu_time_total
    total = sum(kinds.values()) or 1.0
    for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1]):
        stages[f"network: {kind}"] = network / n * us / total
    if decoder is not None:
        feats = decoder.features(files)  # after its PCA, if any
        timed("caption decoding", lambda: decoder.caption_features(feats))
    return stages


def _op_kind(name):
    """torch.profiler's op name -> the kind of work, for the profile's rows."""
    if "convolution" in name:
        return "convolutions"
    if name in ("aten::clamp", "aten::hardtanh", "aten::hardtanh_", "aten::clamp_"):
        return "ReLU6"
    if name in ("aten::fill_", "aten::constant_pad_nd", "aten::pad"):
        return "padding (fill)"
    if name in ("aten::copy_", "aten::clone", "aten::contiguous"):
        return "copies (padding, layout)"
    if name in ("aten::add_", "aten::add"):
        return "residual adds"
    if name in ("aten::sub", "aten::div", "aten::_to_copy", "aten::to"):
        return "normalise (torch)"
    return "other"


def print_profile(stages, title, log=print):
    total = sum(stages.values())
    log(f"{title}: {1e3 * total:.1f} ms per image in all, load {_load()}")
    for name, s in stages.items():
        log(f"  {name:<34} {1e3 * s:7.2f} ms  {100 * s / total:5.1f}%")


# ---- printing ---------------------------------------------------------------------------

def _load():
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _header(r):
    m = r["machine"]
    return (f"{m['date']}  {m['cpu']} ({m['cpu_count']} CPUs), load {_load()}\n"
            f"torch {r['torch']}, {r['torch_threads']} threads, OMP_WAIT_POLICY="
            f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}; fast path: {r['chunk']} images per network call, "
            f"fused convolutions {'on' if r['fused'] else 'off'}\n"
            f"{'workload':<10} {'plain img/s':>12} {'fast img/s':>11} {'fast/plain':>11}  "
            f"{'[per-round range]':<17} max|diff|  load after")


def _row(name, r):
    q = r["ratio"]
    return (f"{name:<10} {r['plain']['images_per_s']:12.1f} {r['fast']['images_per_s']:11.1f} "
            f"{q['median']:11.2f}  [{q['min']:.2f}-{q['max']:.2f}]{'':<5} {r['max_abs_diff']:.1e}  "
            f"{r['loadavg_after']}    ({r['what']})")


def main(argv=None):
    import argparse
    import json
    import sys

    from ..cli import positive_int

    if "torch" not in sys.modules:  # as `rnncap features` does (see features.run)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    p = argparse.ArgumentParser(prog="bench_encode.py", description="The encoder's fast path against the plain one.")
    p.add_argument("--photos", default="../shared/data/flickr8k/images", help="a folder of 224-pixel photos")
    p.add_argument("--full-size", default="../shared/data/flickr8k_val_fullsize/images",
                   help="a folder of full-size photos")
    p.add_argument("--checkpoint", help="a checkpoint, to time captioning too")
    p.add_argument("--n", type=int, default=64, help="224-pixel photos (default %(default)s)")
    p.add_argument("--n-full", type=int, default=32, help="full-size photos (default %(default)s)")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="first say where each path's time goes")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    for folder in (args.photos, args.full_size):
        if not os.path.isdir(folder):
            print(f"bench_encode.py: error: no such folder: {folder}", file=sys.stderr)
            return 2
    if args.profile:
        caps = captioner_pair(args.checkpoint) if args.checkpoint else None
        for path, encoder in encoder_pair().items():
            print_profile(profile(encoder, photo_files(args.photos, args.n)), f"{path}, features, 224 px")
            cap = caps[path] if caps else None
            print_profile(profile(cap.encoder if cap else encoder, photo_files(args.full_size, args.n_full),
                                  batch_size=16, decoder=cap), f"{path}, caption, full size")
    result = run_benchmark(args.photos, args.full_size, args.checkpoint, args.n, args.n_full, args.repeats,
                           args.warmup)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
