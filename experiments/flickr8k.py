"""Flickr8k for real: rnncap's captioners against a PyTorch twin, scored on val.

    .venv/bin/python experiments/flickr8k.py --out runs/flickr8k            # the main run
    .venv/bin/python experiments/flickr8k.py --out runs/flickr8k --runs lstm,lstm-scst --seeds 0,1
    .venv/bin/python experiments/flickr8k.py --out runs/flickr8k --runs all --seeds 0,1
    .venv/bin/python experiments/flickr8k.py --out runs/quick --quick       # a few minutes

The recipe is the product's: the rnncap runs are ``rnncap train`` (and ``rnncap train
--scst``) with their default settings, called through ``rnncap.cli.main``; only the
parity check's "twin" recipe, given by the issue, is spelled out here, as flags of the
same command. Steps, each reusing what an earlier invocation left in --out:

1. features: the pretrained encoder (1280-d pooled) over the train (6,000) and val
   (1,000) images, cached in OUT/features-ENCODER.h5 (resumable);
2. for every requested run and seed, training into OUT/<run>-s<seed>/ (``rnncap train``
   keeps the epoch with the best val CIDEr-D, averages the best epochs when val says
   so, and records its decoding defaults); a run whose training finished is not
   trained again;
3. the kept model's val captions with greedy, beam-3 and beam-5 decoding (beam search
   with the checkpoint's length normalisation), scored by ``rnncap.evaluation.evaluate``'s
   ``evaluate_split`` with the COCO caption toolkit against all 5 references;
4. OUT/results.json and OUT/results.md: every finished run's numbers side by side,
   and example captions of randomly drawn val images (the seed is printed).

A run whose OUT/<run>-s<seed>/metrics.json exists is not scored again (--force
retrains and rescores). Only train and val are used; the test split is never touched,
and every choice is made on val.

The runs:
  lstm             ``rnncap train`` with its defaults (an h0 LSTM)
  rnn              the same with --cell rnn
  lstm-scst        ``rnncap train --scst --init OUT/lstm-s<seed>/best.npz`` (defaults)
  lstm-twin-recipe ``rnncap train`` with the twin's recipe (the parity check)
  torch-twin       the PyTorch twin (experiments/torch_twin.py), the twin's recipe
  torch-twin-same-init  the same, started from rnncap's initial weights for the seed

The spatial captioners, each step a product command (``rnncap features --maps block``,
``rnncap train``, ``rnncap train --scst``, ``rnncap evaluate`` with beam 3 and the
decoding rules), into OUT/<run>-s<seed>/ with the map cache in OUT/<features>.h5
(a cache already there, or a link to one, is used as it is):
  attention        ``--model attention`` (the README's best single recipe, with -scst)
  attention-scst   ``--scst --init OUT/attention-s<seed>/best.npz``
  attention-scst-sample-rules  the same with ``--sample-rules`` (the sampler under the rules)
  transformer      ``--model transformer``; transformer-scst as attention-scst
  attention-448    the attention model on 14 x 14 maps (``--input-size 448``)
  attention-lite2  on EfficientNet-Lite2's 9 x 9 maps (its native 260 px); -scst as above
  attention-reg0   without the doubly stochastic attention penalty
  attention-deep   with the deep output layer (``--deep-output``)
and the ensembles (``rnncap evaluate --checkpoint A B ... --ensemble logprob``) of
their members at every seed asked for, into OUT/<ensemble>/:
  ens-attention-scst                   attention-scst
  ens-attention-scst+transformer       attention-scst and transformer
  ens-attention-scst-both+transformer  attention-scst, attention-scst-sample-rules, transformer
  ens-attention-scst+lite2             attention-scst, attention-lite2-scst s0, attention-lite2 s1
  ens-attention-scst+transformer+lite2 the same and transformer
  ens-attention-scst+lite2-scst        attention-scst and attention-lite2-scst
  ens-attention-scst+lite2-both        those and attention-lite2
  ens-lite2-both                       attention-lite2-scst and attention-lite2 (one feature cache)
(a member given with its seed is that seed alone, whatever --seeds says).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "flickr8k"
DEFAULT_ENCODER = "efficientnet-lite0"
DECODE_MAX = 20          # words a decoded caption may have (with <END>)
EXAMPLE_SEED = 8         # which val images results.md shows

# Given by the issue, not tuned: the PyTorch twin's recipe. rnncap's own recipe is
# `rnncap train`'s defaults (rnncap.config), so no run here names one.
TWIN_RECIPE = dict(wordvec=512, hidden=512, dropout=0.5, label_smoothing=0.0, lr=3e-3,
                   lr_decay=0.8, batch_size=128, clip=5.0, epochs=15, max_length=16,
                   standardize=False, average=0, length_norm=0.0)
RUNS = {  # name: (implementation, cell)
    "lstm": ("rnncap", "lstm"),
    "rnn": ("rnncap", "rnn"),
    "lstm-scst": ("rnncap-scst", "lstm"),
    "lstm-twin-recipe": ("rnncap-twin-recipe", "lstm"),
    "torch-twin": ("torch", "lstm"),
    "torch-twin-same-init": ("torch-rnncap-init", "lstm"),
}
DECODERS = (("greedy", 1), ("beam3", 3), ("beam5", 5))

# The spatial captioners, run through the product's commands (see the docstring).
MAP_FEATURES = {  # cache name: `rnncap features` flags
    "maps-block": ["--maps", "block"],
    "maps-block-448": ["--maps", "block", "--input-size", "448"],
    "maps-block-lite2": ["--maps", "block", "--encoder", "efficientnet-lite2"],
}
COMMAND_RUNS = {  # name: (feature cache, `rnncap train` flags, the run it starts from)
    "attention": ("maps-block", ["--model", "attention"], None),
    "attention-scst": ("maps-block", ["--scst"], "attention"),
    "attention-scst-sample-rules": ("maps-block", ["--scst", "--sample-rules"], "attention"),
    "transformer": ("maps-block", ["--model", "transformer"], None),
    "transformer-scst": ("maps-block", ["--scst"], "transformer"),
    "attention-448": ("maps-block-448", ["--model", "attention"], None),
    "attention-lite2": ("maps-block-lite2", ["--model", "attention"], None),
    "attention-lite2-scst": ("maps-block-lite2", ["--scst"], "attention-lite2"),
    "attention-reg0": ("maps-block", ["--model", "attention", "--attention-reg", "0"], None),
    "attention-deep": ("maps-block", ["--model", "attention", "--deep-output"], None),
}
ENSEMBLES = {  # name: member runs, each at every seed asked for
    "ens-attention-scst": ["attention-scst"],
    "ens-attention-scst+transformer": ["attention-scst", "transformer"],
    "ens-attention-scst-both+transformer": ["attention-scst", "attention-scst-sample-rules", "transformer"],
    # with the Lite2 9 x 9 models (issue 21 §2): seed 0 after SCST, seed 1 after cross-entropy
    "ens-attention-scst+lite2": ["attention-scst", ("attention-lite2-scst", 0), ("attention-lite2", 1)],
    "ens-attention-scst+transformer+lite2": ["attention-scst", "transformer", ("attention-lite2-scst", 0),
                                             ("attention-lite2", 1)],
    # every member after SCST, both grids; then with the Lite2 cross-entropy models too
    "ens-attention-scst+lite2-scst": ["attention-scst", "attention-lite2-scst"],
    "ens-attention-scst+lite2-both": ["attention-scst", "attention-lite2-scst", "attention-lite2"],
    "ens-lite2-both": ["attention-lite2-scst", "attention-lite2"],  # one feature cache
}
# `rnncap evaluate` for every spatial row: the product's decoder (beam 3, its length
# normalisation) with the decoding rules and trigram blocking on.
EVALUATE_FLAGS = ["--split", "val", "--beam", "3", "--rules", "--block-trigrams", "--report-images", "0"]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- data -----------------------------------------------------------------------------

class Data:
    """Flickr8k train/val: the dataset file the commands read, references, features
    (raw encoder output) and the vocabulary (for the PyTorch twin; ``rnncap train``
    builds the same one from the same train captions)."""

    def __init__(self, args):
        from rnncap.data.datasets import load_dataset
        from rnncap.data.vocab import Vocab

        self.dataset = load_dataset(args.data)
        self.splits = {}
        for name, n in (("train", args.train_images), ("val", args.val_images)):
            s = copy.copy(self.dataset[name])
            if n:
                s.image_ids, s.image_paths, s.references = (
                    s.image_ids[:n], s.image_paths[:n], s.references[:n])
            self.splits[name] = s
        self.args, self.feature_seconds, self._features_of, self.cache = args, {}, {}, {}
        refs = [c for caps in self.splits["train"].references for c in caps]
        self.vocab = Vocab.build(refs, min_count=5)
        self.references = {i: r for i, r in zip(self.splits["val"].image_ids,
                                                  self.splits["val"].references)}
        self.captions_file = self._captions_file()

    def _captions_file(self):
        """The dataset file for the commands: the dataset itself, or, for a slice, a
        caption list of exactly these images in OUT."""
        if not (self.args.train_images or self.args.val_images):
            return str(self.args.data)
        wanted = {n: set(s.image_ids) for n, s in self.splits.items()}
        src = json.loads(Path(self.dataset.source).read_text())
        images = [r for r in src["images"] if r.get("split") in wanted and r["file"] in wanted[r["split"]]]
        root = Path(self.dataset.source).parent / src.get("image_dir", "")
        path = Path(self.args.out) / f"captions-{len(self.splits['train'])}-{len(self.splits['val'])}.json"
        path.write_text(json.dumps({"name": f"{src.get('name', 'flickr8k')}-slice", "image_dir": str(root),
                                    "images": images}))
        return str(path)

    def features(self, encoder):
        """({split: raw (N, D) features}, encoder identity) of ``encoder``, extracted
        (or read from its cache) the first time they are asked for."""
        if encoder not in self._features_of:
            self._features_of[encoder] = self._features(encoder)
        return self._features_of[encoder]

    def _features(self, encoder):
        """Raw features per split, from the full cache when it is complete, else
        extracted (resumably) into a cache for exactly these images."""
        from rnncap.encoding.encoders import get_encoder
        from rnncap.errors import DataError
        from rnncap.encoding.features import extract_features, feature_info, load_features, read_identity

        args = self.args
        full = Path(args.features or Path(args.out) / f"features-{encoder}.h5")
        wanted = {n: len(s) for n, s in self.splits.items()}
        everything = {n: len(self.dataset[n]) for n in wanted}
        path, seconds = full, 0.0
        # A subset reads the full cache when there is one, or a cache of exactly its
        # sizes (a --features file made for the first N photos, say).
        if not (_complete(full, feature_info, everything) or _complete(full, feature_info, wanted)):
            if wanted != everything:
                path = full.with_name(f"{full.stem}-{wanted['train']}-{wanted['val']}.h5")
            if not _complete(path, feature_info, wanted):
                items = {n: (s.image_ids, s.image_paths) for n, s in self.splits.items()}
                log(f"extracting features into {path} ({sum(wanted.values())} images)")
                t0 = time.perf_counter()
                extract_features(items, get_encoder(encoder), path, progress=sys.stderr.isatty(),
                                 dataset=str(args.data))
                seconds = time.perf_counter() - t0
                self.feature_seconds[encoder] = seconds
                log(f"features done in {seconds / 60:.1f} min")
        out = {}
        for name, s in self.splits.items():
            feats, ids = load_features(path, name, pca=False)
            pos = {i: k for k, i in enumerate(ids)}
            missing = [i for i in s.image_ids if i not in pos]
            if missing:
                raise DataError(f"{path}: {len(missing)} {name} images have no features "
                                f"(first: {missing[0]}); give another --features file")
            out[name] = feats[[pos[i] for i in s.image_ids]]
        identity = read_identity(path)
        if identity.get("name") != encoder:
            raise DataError(f"{path}: holds {identity.get('name')} features, not {encoder}")
        self.cache[encoder] = path
        return out, identity

    def encoded(self, name, max_length):
        from rnncap.data.datasets import encode_split

        caps, idx, _ = encode_split(self.splits[name], self.vocab, max_length)
        return caps, idx


def _complete(path, feature_info, sizes):
    """Whether the cache at ``path`` holds all ``sizes[split]`` rows of every split."""
    if not Path(path).is_file():
        return False
    try:
        info = feature_info(path)["splits"]
    except Exception:
        return False
    return all(n in info and info[n] == (k, k) for n, k in sizes.items())


# ---- scoring --------------------------------------------------------------------------

def score(model, vocab, data, features, beam=1, meteor=True, perplexity=False, length_norm=0.0):
    """Val captions of one decoder scored by ``rnncap.evaluation.evaluate.evaluate_split`` (the
    code behind ``rnncap evaluate``): COCO metrics, diversity and, when asked, the
    perplexity of the reference captions. Returns (summary, {image_id: caption})."""
    from rnncap.data.datasets import encode_split
    from rnncap.evaluation.evaluate import evaluate_split

    val = data.splits["val"]
    caps, idx = encode_split(val, vocab, DECODE_MAX)[:2] if perplexity else (None, None)
    summary, per_image, _ = evaluate_split(model, vocab, features, val.references, val.image_ids,
                                           beam=beam, max_length=DECODE_MAX, length_norm=length_norm,
                                           captions=caps, image_idx=idx, meteor=meteor)
    return summary, {i: p["beam"] for i, p in per_image.items()}


def val_fn_for(data, features):
    """Greedy val BLEU-4 and CIDEr after every epoch of the PyTorch twin: what selects
    its epoch (``rnncap train`` selects on its own NumPy CIDEr-D of greedy captions)."""

    def val_fn(model):
        summary, _ = score(model, data.vocab, data, features, beam=1, meteor=False)
        return {"val_bleu4": summary["BLEU-4"], "val_cider": summary["CIDEr"]}

    return val_fn


def model_path(run_dir):
    """The run's kept model: ``rnncap train``'s best.npz, or the twin's model.npz."""
    best = Path(run_dir) / "best.npz"
    return best if best.is_file() else Path(run_dir) / "model.npz"


def val_features(ckpt, data):
    """The val features a checkpoint takes: raw encoder output through the checkpoint's
    own feature transform (PCA, standardisation), as ``rnncap evaluate`` feeds them."""
    from rnncap.encoding.features import apply_pca

    raw = data.features(ckpt.encoder["name"])[0]["val"]
    return np.asarray(apply_pca(raw, ckpt.pca) if ckpt.pca is not None else raw, dtype=np.float32)


# ---- one run --------------------------------------------------------------------------

def run_one(name, seed, data, args):
    impl, cell = RUNS[name]
    out_dir = Path(args.out) / f"{name}-s{seed}"
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder = args.encoder or DEFAULT_ENCODER
    feats, identity = data.features(encoder)
    recipe = dict(TWIN_RECIPE) if impl in ("rnncap-twin-recipe", "torch", "torch-rnncap-init") else None
    log(f"{out_dir.name}: {impl} {cell}" + (f", twin recipe {recipe}" if recipe else ", rnncap train's defaults"))

    t0 = time.perf_counter()
    if impl.startswith("torch"):
        model, vocab, history, untrained = _train_twin(recipe, seed, data, feats, args,
                                                       same_init=impl == "torch-rnncap-init")
        chosen = {"epoch": max(history, key=lambda h: h["val_cider"])["epoch"], "averaged": 0}
        length_norm = recipe["length_norm"]
        _save_model(out_dir / "model.npz", model, data, identity, recipe, cell, seed)
        val_feats = feats["val"]
        train_seconds = time.perf_counter() - t0
    else:
        trained_now = _train_rnncap(impl, cell, recipe, seed, data, args, out_dir)
        train_seconds = time.perf_counter() - t0 if trained_now else None
        model, vocab, history, untrained, chosen, length_norm, val_feats, seconds = _read_rnncap(
            out_dir, data, seed, impl)
        train_seconds = train_seconds or seconds

    t0 = time.perf_counter()
    metrics, captions = {}, {}
    for dec, beam in DECODERS:
        if dec not in args.decoder_list:
            continue
        metrics[dec], captions[dec] = score(model, vocab, data, val_feats, beam=beam, meteor=args.meteor,
                                            perplexity=(dec == "greedy"),
                                            length_norm=length_norm if beam > 1 else 0.0)
        log(f"{out_dir.name} {dec}: " + ", ".join(
            f"{k} {v:.3f}" for k, v in metrics[dec].items() if isinstance(v, float)))
    eval_seconds = time.perf_counter() - t0

    result = {"run": name, "seed": seed, "implementation": impl, "cell": cell,
              "recipe_name": "twin" if recipe else "rnncap train defaults", "recipe": recipe,
              "length_norm": length_norm, "encoder": encoder, "chosen": chosen,
              "untrained_val_cider": untrained, "history": history, "metrics": metrics,
              "train_seconds": train_seconds, "eval_seconds": eval_seconds,
              "train_images": len(data.splits["train"]), "val_images": len(data.splits["val"]),
              "vocab_size": len(vocab)}
    (out_dir / "captions.json").write_text(json.dumps(captions, indent=0))
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=1))
    return result


def _command_overrides(args, scst=False):
    """The experiment's --epochs/--hidden/--wordvec/--batch-size as flags of `rnncap
    train` (for --scst, only --epochs: its batches count images)."""
    keys = ("epochs",) if scst else ("epochs", "hidden", "wordvec", "batch_size")
    flags = []
    for key in keys:
        if getattr(args, key):
            flags += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return flags


def _twin_flags(r):
    """The twin recipe as flags of `rnncap train`."""
    return ["--wordvec", str(r["wordvec"]), "--hidden", str(r["hidden"]), "--dropout", str(r["dropout"]),
            "--label-smoothing", str(r["label_smoothing"]), "--lr", str(r["lr"]),
            "--lr-decay", str(r["lr_decay"]), "--batch-size", str(r["batch_size"]), "--clip", str(r["clip"]),
            "--epochs", str(r["epochs"]), "--max-length", str(r["max_length"]),
            "--standardize" if r["standardize"] else "--no-standardize", "--average", str(r["average"]),
            "--length-norm", str(r["length_norm"])]


def _finished(out_dir):
    """Whether `rnncap train` finished in out_dir (its last.npz has all its epochs)."""
    from rnncap.checkpoint import load_checkpoint

    last = Path(out_dir) / "last.npz"
    if not (last.is_file() and (Path(out_dir) / "best.npz").is_file()):
        return False
    ck = load_checkpoint(last)
    return int(ck.train_state.get("epoch", 0)) >= int(ck.configs["train"]["epochs"])


def _train_rnncap(impl, cell, recipe, seed, data, args, out_dir):
    """`rnncap train` (or `--scst`) into out_dir, unless it already finished there (or,
    stopped midway, continued with --resume). Returns whether it trained now."""
    if _finished(out_dir) and not args.force:
        log(f"{out_dir.name}: training already finished, kept (--force retrains)")
        return False
    if impl == "rnncap-scst":
        init = Path(args.out) / f"lstm-s{seed}" / "best.npz"
        if not _finished(init.parent):
            run_one("lstm", seed, data, args)
        argv = ["train", "--scst", "--init", str(init), *_command_overrides(args, scst=True)]
    else:
        argv = ["train", "--data", data.captions_file, "--cell", cell, "--no-pca",
                *(_twin_flags(recipe) if recipe else []), *_command_overrides(args)]
    data.features(args.encoder or DEFAULT_ENCODER)  # extracted (or found) before training
    argv += ["--features", str(data.cache[args.encoder or DEFAULT_ENCODER])]
    return _train(argv, seed, out_dir, args)


def _train(argv, seed, out_dir, args):
    """`rnncap ARGV --seed SEED` into out_dir, or, stopped midway there, `rnncap train
    --resume` of it. Returns True (it trained now)."""
    from rnncap.cli import main as rnncap

    argv = [*argv, "--out", str(out_dir), "--seed", str(seed), "--quiet"]
    if (Path(out_dir) / "last.npz").is_file() and not args.force:  # stopped midway: continue it
        argv = ["train", "--resume", str(Path(out_dir) / "last.npz"), "--quiet"]
    log(f"{Path(out_dir).name}: rnncap " + " ".join(argv))
    if rnncap(argv) != 0:
        raise SystemExit(f"{Path(out_dir).name}: rnncap train failed")
    return True


# ---- the spatial captioners: the product's commands, end to end -------------------------

def map_features(name, data, args):
    """OUT/<name>.h5, made by `rnncap features` with MAP_FEATURES[name]'s flags unless a
    complete cache (or a link to one) is already there."""
    from rnncap.cli import main as rnncap
    from rnncap.encoding.features import feature_info

    path = Path(args.out) / f"{name}.h5"
    wanted = {n: len(s) for n, s in data.splits.items()}
    if not _complete(path, feature_info, wanted) and not _complete(
            path, feature_info, {n: len(data.dataset[n]) for n in wanted}):
        log(f"{name}: rnncap features {' '.join(MAP_FEATURES[name])}")
        t0 = time.perf_counter()
        if rnncap(["features", "--data", data.captions_file, "--out", str(path), *MAP_FEATURES[name],
                   "--splits", ",".join(wanted), "--quiet"]) != 0:
            raise SystemExit(f"{name}: rnncap features failed")
        data.feature_seconds[name] = time.perf_counter() - t0
    return path


def run_command(name, seed, data, args):
    """COMMAND_RUNS[name] at ``seed``: trained (unless finished) and evaluated into
    OUT/<name>-s<seed>/, its row in OUT/<name>-s<seed>/command.json."""
    feats, flags, start = COMMAND_RUNS[name]
    out_dir = Path(args.out) / f"{name}-s{seed}"
    path = map_features(feats, data, args)
    argv = ["train", "--data", data.captions_file, "--features", str(path), *flags]
    if start:
        init = Path(args.out) / f"{start}-s{seed}" / "best.npz"
        if not _finished(init.parent):
            run_command(start, seed, data, args)
        argv += ["--init", str(init), *_command_overrides(args, scst=True)]
    else:
        argv += _command_overrides(args)
    if args.force or not _finished(out_dir):
        _train(argv, seed, out_dir, args)
    metrics = evaluate_command([out_dir / "best.npz"], [path], out_dir / "eval", data, args)
    row = {"run": name, "seeds": [seed], "members": [f"{name}-s{seed}"], "features": feats,
           "train_command": "rnncap " + " ".join(argv), "metrics": metrics,
           "train_seconds": _train_seconds(out_dir)}
    (out_dir / "command.json").write_text(json.dumps(row, indent=1))
    return row


def run_ensemble(name, seeds, data, args):
    """ENSEMBLES[name] over ``seeds``: its members trained if needed (run_command), then
    `rnncap evaluate --ensemble logprob` of them all into OUT/<name>/."""
    members = [m for run in ENSEMBLES[name] for m in ([run] if isinstance(run, tuple)  # (run, its seed)
                                                       else [(run, seed) for seed in seeds])]
    for run, seed in members:
        if not (Path(args.out) / f"{run}-s{seed}" / "command.json").is_file() or args.force:
            run_command(run, seed, data, args)
    out_dir = Path(args.out) / name
    metrics = evaluate_command([Path(args.out) / f"{run}-s{seed}" / "best.npz" for run, seed in members],
                               [Path(args.out) / f"{COMMAND_RUNS[run][0]}.h5" for run, _ in members],
                               out_dir / "eval", data, args, ["--ensemble", "logprob"])
    trained = {(r, seed) for run, seed in members for r in _chain(run)}  # the starts too, once each
    row = {"run": name, "seeds": list(seeds), "members": [f"{run}-s{seed}" for run, seed in members],
           "features": ",".join(sorted({COMMAND_RUNS[run][0] for run, _ in members})), "metrics": metrics,
           "train_seconds": sum(_train_seconds(Path(args.out) / f"{r}-s{seed}") or 0.0 for r, seed in trained)}
    (out_dir / "command.json").write_text(json.dumps(row, indent=1))
    return row


def _chain(run):
    """The run and every run it starts from: what training it took."""
    start = COMMAND_RUNS[run][2]
    return [run, *(_chain(start) if start else [])]


def evaluate_command(checkpoints, features, out_dir, data, args, extra=()):
    """`rnncap evaluate` of ``checkpoints`` (one model, or an ensemble's members) with
    EVALUATE_FLAGS; returns its summary (COCO metrics and the defect counts). A scored
    out_dir is read back rather than scored again (--force rescores)."""
    from rnncap.cli import main as rnncap

    done = Path(out_dir) / "metrics.json"
    if not _scored(done, checkpoints) or args.force:
        argv = ["evaluate", "--checkpoint", *map(str, checkpoints), "--features", *map(str, features),
                "--data", data.captions_file, *EVALUATE_FLAGS, *extra, "--out", str(out_dir), "--json",
                *([] if args.meteor else ["--no-meteor"])]
        log(f"{Path(out_dir).parent.name}: rnncap " + " ".join(argv))
        with contextlib.redirect_stdout(sys.stderr):  # its JSON is also in metrics.json
            if rnncap(argv) != 0:
                raise SystemExit(f"{Path(out_dir).parent.name}: rnncap evaluate failed")
    return json.loads(done.read_text())["summary"]


def _scored(metrics_file, checkpoints):
    """Whether ``metrics_file`` is `rnncap evaluate`'s scoring of exactly these
    checkpoints, in this order."""
    if not Path(metrics_file).is_file():
        return False
    run = json.loads(Path(metrics_file).read_text())["run"]
    named = run.get("checkpoint")
    named = [named] if isinstance(named, str) else named or []
    return [os.path.realpath(str(p)) for p in named] == [os.path.realpath(str(p)) for p in checkpoints]


def _train_seconds(out_dir):
    """The training seconds `rnncap train` recorded in out_dir (its epochs' sum)."""
    from rnncap.checkpoint import load_checkpoint

    last = Path(out_dir) / "last.npz"
    if not last.is_file():
        return None
    seconds = load_checkpoint(last).history.get("epoch_seconds")
    return float(sum(seconds)) if seconds else None


def _read_rnncap(out_dir, data, seed, impl):
    """What a finished `rnncap train` run left: the kept model, its vocabulary, the
    per-epoch history, the starting model's greedy val CIDEr (the untrained model, or
    for SCST the cross-entropy model it started from), the kept epoch, the decoding
    length normalisation, the val features and the training seconds it recorded."""
    from rnncap.checkpoint import load_checkpoint
    from rnncap.config import ModelConfig, decode_config, from_dict
    from rnncap.models.registry import build_model

    best = load_checkpoint(out_dir / "best.npz")
    last = load_checkpoint(out_dir / "last.npz")
    feats = val_features(best, data)
    if impl == "rnncap-scst":
        start = load_checkpoint(best.configs["train"]["init"]).model
    else:
        start = build_model(from_dict(ModelConfig, best.configs["model"]), best.vocab, seed=seed)
    untrained = score(start, best.vocab, data, feats, beam=1, meteor=False)[0]["CIDEr"]
    h = last.history
    history = []
    for e in range(len(h.get("val_cider", []))):
        rec = {"epoch": e + 1, "val_loss": (h.get("val_loss") or [None] * (e + 1))[e],
               "val_cider": h["val_cider"][e]}
        for key in ("train_loss", "train_reward"):
            vals = [v for v, ep in zip(h.get(key, []), h["epoch"]) if e < ep <= e + 1]
            if vals:
                rec[key] = float(np.mean(vals))
        history.append(rec)
    b = last.train_state.get("best") or {}
    chosen = {"epoch": b.get("epoch"), "averaged": len(b.get("averaged") or []),
              "average_of": b.get("averaged"), "val_cider": b.get("val_cider")}
    seconds = sum(h["epoch_seconds"]) if h.get("epoch_seconds") else None
    return (best.model, best.vocab, history, untrained, chosen, decode_config(best.configs).length_norm,
            feats, seconds)


def _train_twin(r, seed, data, feats, args, same_init=False):
    sys.path.insert(0, str(HERE))
    from torch_twin import build_twin, load_rnncap, to_rnncap, train_twin

    from rnncap.models.model import CaptioningModel

    r = dict(r)
    for key in ("epochs", "hidden", "wordvec", "batch_size"):
        if getattr(args, key):
            r[key] = getattr(args, key)
    caps_tr, idx_tr = data.encoded("train", r["max_length"])
    val_fn = val_fn_for(data, feats["val"])
    twin = build_twin(len(data.vocab), feats["train"].shape[1], r["wordvec"], r["hidden"],
                      dropout=r["dropout"], null_id=data.vocab.null_id,
                      label_smoothing=r["label_smoothing"], seed=seed)
    if same_init:  # start from the very numbers rnncap's run of this seed starts from
        load_rnncap(twin, CaptioningModel(len(data.vocab), feats["train"].shape[1], r["wordvec"],
                                          r["hidden"], cell_type="lstm", seed=seed))
    untrained = val_fn(to_rnncap(twin.eval()))["val_cider"]
    history = train_twin(twin, (feats["train"], caps_tr, idx_tr), lr=r["lr"], lr_decay=r["lr_decay"],
                         batch_size=r["batch_size"], clip=r["clip"], epochs=r["epochs"], seed=seed,
                         val_fn=val_fn, log=log)
    return to_rnncap(twin), data.vocab, history, untrained


def _save_model(path, model, data, encoder, r, cell, seed):
    from rnncap.checkpoint import save_checkpoint
    from rnncap.config import DataConfig, DecodeConfig, ModelConfig, TrainConfig, to_dict

    configs = {
        "data": to_dict(DataConfig(captions=str(data.dataset.source), max_length=r["max_length"],
                                   min_count=5, standardize=False)),
        "model": to_dict(ModelConfig(cell_type=cell, wordvec_dim=r["wordvec"], hidden_dim=r["hidden"],
                                     dropout=r["dropout"], label_smoothing=r["label_smoothing"],
                                     input_dim=model.input_dim, vocab_size=model.vocab_size)),
        "train": to_dict(TrainConfig(lr=r["lr"], lr_decay=r["lr_decay"], clip_norm=r["clip"],
                                     batch_size=r["batch_size"], epochs=r["epochs"], seed=seed,
                                     average=r["average"])),
        "decode": to_dict(DecodeConfig(beam_size=3, length_norm=r["length_norm"])),
    }
    save_checkpoint(str(path), model, data.vocab, encoder=encoder, configs=configs)


def sweep_length_norm(run_dir, data, norms):
    """Val metrics (METEOR left out) of a finished run's kept model with beam 3 and 5 at
    each length normalisation (``beam_search``'s ranking logprob / len ** norm), into
    RUN/length_norm.json."""
    from rnncap.checkpoint import load_checkpoint

    ckpt = load_checkpoint(model_path(run_dir))
    features = val_features(ckpt, data)
    rows = []
    for beam in (3, 5):
        for norm in norms:
            m, _ = score(ckpt.model, ckpt.vocab, data, features, beam=beam, meteor=False, length_norm=norm)
            rows.append({"beam": beam, "length_norm": norm,
                         **{k: v for k, v in m.items() if isinstance(v, float)}})
            log(f"{run_dir.name} beam {beam}, length norm {norm}: BLEU-4 {m['BLEU-4']:.3f}, "
                f"CIDEr {m['CIDEr']:.3f}, mean length {m['mean_length']:.2f}")
    (run_dir / "length_norm.json").write_text(json.dumps(rows, indent=1))


# ---- the summary ----------------------------------------------------------------------

def summarise(out, data):
    results = [json.loads(p.read_text()) for p in sorted(Path(out).glob("*-s*/metrics.json"))]
    rows = [json.loads(p.read_text()) for p in Path(out).glob("*/command.json")]
    if not (results or rows):
        return None
    summary = {"machine": machine(), "features_seconds": data.feature_seconds,
               "example_seed": EXAMPLE_SEED, "runs": results, "commands": rows}
    Path(out, "results.json").write_text(json.dumps(summary, indent=1))
    parts = ([markdown(results, data)] if results else []) + ([command_markdown(rows)] if rows else [])
    Path(out, "results.md").write_text("\n".join(parts))
    return summary


COMMAND_KEYS = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
DEFECT_KEYS = ("mid_phrase_endings", "repeated_words", "repeated_trigrams")


def command_markdown(rows):
    """The spatial captioners' table: each run and seed, the mean of a run's seeds
    (how a single model counts), then the ensembles, naming their members."""
    order = {name: k for k, name in enumerate([*COMMAND_RUNS, *ENSEMBLES])}
    rows = sorted(rows, key=lambda r: (order.get(r["run"], len(order)), r["seeds"]))
    lines = ["Val (all 5 references), COCO caption toolkit, `rnncap evaluate` with beam 3, the decoding "
             "rules and trigram blocking; defects: captions that end mid-phrase / repeat a word back to "
             "back / repeat a trigram; train min: the run's epochs (an ensemble: every run it took, the "
             "cross-entropy starts of SCST members included).", "",
             "| run | seeds | features | " + " | ".join(COMMAND_KEYS) + " | defects | train min |",
             "|---" * (len(COMMAND_KEYS) + 5) + "|"]

    def line(run, seeds, feats, m, seconds):
        cells = ["-" if m.get(k) is None else f"{m[k]:.4f}" for k in COMMAND_KEYS]
        defects = " / ".join("-" if m.get(k) is None else f"{m[k]:g}" for k in DEFECT_KEYS)
        return (f"| {run} | {seeds} | {feats} | " + " | ".join(cells) + f" | {defects} | "
                + ("-" if not seconds else f"{seconds / 60:.1f}") + " |")

    for k, r in enumerate(rows):
        lines.append(line(r["run"], ",".join(map(str, r["seeds"])), r["features"], r["metrics"],
                          r["train_seconds"]))
        name = r["run"]
        seeds = [q for q in rows if q["run"] == name]
        if name in COMMAND_RUNS and len(seeds) > 1 and (k + 1 == len(rows) or rows[k + 1]["run"] != name):
            # after a run's last seed: the mean of its seeds, how a single model counts
            mean = {key: float(np.mean([q["metrics"][key] for q in seeds]))
                    for key in (*COMMAND_KEYS, *DEFECT_KEYS) if all(q["metrics"].get(key) is not None for q in seeds)}
            times = [q["train_seconds"] for q in seeds if q["train_seconds"]]
            lines.append(line(f"{name}, mean of seeds", ",".join(str(q["seeds"][0]) for q in seeds),
                              seeds[0]["features"], mean, float(np.mean(times)) if times else None))
    ensembles = [r for r in rows if r["run"] in ENSEMBLES or len(r["members"]) > 1]
    if ensembles:
        lines += ["", "Ensemble members (mean of log-probabilities at every step):", ""]
        lines += [f"- {r['run']} (seeds {','.join(map(str, r['seeds']))}): {', '.join(r['members'])}"
                  for r in ensembles]
    return "\n".join(lines) + "\n"


def markdown(results, data):
    keys = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "distinct_fraction", "mean_length",
            "perplexity")
    lines = [f"Val ({results[0]['val_images']} images, all 5 references), COCO caption toolkit; "
             f"distinct_fraction: share of different captions; perplexity: of the references.", "",
             "| run | seed | encoder | decoder | " + " | ".join(keys) + " | epoch kept | train min |",
             "|---" * (len(keys) + 6) + "|"]
    for r in results:
        for dec, m in r["metrics"].items():
            kept = str(r["chosen"]["epoch"]) + (f" (avg {r['chosen']['average_of']})"
                                                if r["chosen"].get("averaged") else "")
            enc = r.get("encoder", DEFAULT_ENCODER).replace("efficientnet-", "")
            norm = r.get("length_norm", 0.0)
            dec = f"{dec}, length norm {norm:g}" if dec != "greedy" and norm else dec
            lines.append(f"| {r['run']} | {r['seed']} | {enc} | {dec} | "
                         + " | ".join("-" if m.get(k) is None else f"{m[k]:.3f}" if k != "perplexity"
                                      else f"{m[k]:.1f}" for k in keys)
                         + f" | {kept} | " + ("-" if r["train_seconds"] is None else f"{r['train_seconds'] / 60:.1f}")
                         + " |")
    sweeps = [(r, Path(data.out, f"{r['run']}-s{r['seed']}", "length_norm.json")) for r in results]
    sweeps = [(r, json.loads(p.read_text())) for r, p in sweeps if p.is_file()]
    if sweeps:
        lines += ["", "Beam length normalisation (val; `--length-norms`):", "",
                  "| run | seed | beam | length norm | BLEU-4 | CIDEr | mean_length | distinct_fraction |",
                  "|---" * 8 + "|"]
        lines += [f"| {r['run']} | {r['seed']} | {row['beam']} | {row['length_norm']:g} | {row['BLEU-4']:.3f} | "
                  f"{row['CIDEr']:.3f} | {row['mean_length']:.2f} | {row['distinct_fraction']:.3f} |"
                  for r, rows in sweeps for row in rows]
    lines += ["", "Per-epoch val, greedy captions (C: for rnncap runs the NumPy CIDEr-D `rnncap train` selects "
              "on; for the PyTorch twin the COCO toolkit's; reward: SCST's mean train reward):", ""]
    for r in results:
        start = "its cross-entropy start" if r.get("implementation") == "rnncap-scst" else "untrained"
        lines.append(f"- {r['run']} s{r['seed']} ({start}: CIDEr {r['untrained_val_cider']:.3f}): "
                     + ", ".join(f"{h['epoch']}: " + (f"B4 {h['val_bleu4']:.3f} " if "val_bleu4" in h else "")
                                 + f"C {h['val_cider']:.3f}"
                                 + (f" reward {h['train_reward']:.3f}" if "train_reward" in h else "")
                                 for h in r["history"]))
    lines += ["", f"Examples: val images drawn with numpy.random.default_rng({EXAMPLE_SEED}).", ""]
    lines += examples(results, data)
    return "\n".join(lines) + "\n"


def examples(results, data, n=6):
    ids = data.splits["val"].image_ids
    pick = np.random.default_rng(EXAMPLE_SEED).choice(len(ids), size=min(n, len(ids)), replace=False)
    runs = {}
    for r in results:  # the first seed of each run
        runs.setdefault(r["run"], json.loads(Path(data.out, f"{r['run']}-s{r['seed']}",
                                                 "captions.json").read_text()))
    lines = []
    for k in pick:
        i = ids[k]
        lines.append(f"**{i}**")
        lines.append("")
        for name, caps in runs.items():
            dec = "beam3" if "beam3" in caps else next(iter(caps))
            lines.append(f"- {name} ({dec}): *{caps[dec].get(i, '-')}*")
        for ref in data.references[i]:
            lines.append(f"- reference: {ref}")
        lines.append("")
    return lines


def machine():
    try:
        import torch
        tv = torch.__version__
    except ImportError:
        tv = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "torch": tv}


# ---- command line -----------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/flickr8k", help="output folder (default %(default)s)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="Flickr8k folder (default %(default)s)")
    p.add_argument("--features", help="feature cache of the encoder (default OUT/features-ENCODER.h5)")
    p.add_argument("--encoder", help=f"the encoder (rnncap.encoding.encoders.ENCODERS; default {DEFAULT_ENCODER})")
    p.add_argument("--runs", default="lstm",
                   help=f"comma-separated runs from {', '.join([*RUNS, *COMMAND_RUNS, *ENSEMBLES])}, "
                        f"or 'all' (the pooled runs; default %(default)s)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 500 train and 100 val images, 2 epochs")
    p.add_argument("--train-images", type=int, default=0, help="use only the first N train images")
    p.add_argument("--val-images", type=int, default=0, help="use only the first N val images")
    p.add_argument("--epochs", type=int, default=0, help="override every run's epochs")
    p.add_argument("--hidden", type=int, default=0, help="override every run's hidden size")
    p.add_argument("--wordvec", type=int, default=0, help="override every run's word-vector size")
    p.add_argument("--batch-size", type=int, default=0,
                   help="override every run's batch size (captions; not the SCST stage's)")
    p.add_argument("--decoders", default=",".join(d for d, _ in DECODERS),
                   help="decoders to score the kept model with (default %(default)s)")
    p.add_argument("--no-meteor", dest="meteor", action="store_false",
                   help="skip METEOR (its Java jar takes a while to load)")
    p.add_argument("--length-norms", default="",
                   help="comma-separated beam length normalisations to sweep on val for each run's "
                        "saved model (trained first if needed), e.g. 0,0.5,1")
    p.add_argument("--force", action="store_true", help="retrain runs that already have results")
    p.add_argument("--summarise", action="store_true",
                   help="train nothing: only rebuild OUT/results.md from the finished runs")
    args = p.parse_args(argv)
    if args.quick:
        args.train_images = args.train_images or 500
        args.val_images = args.val_images or 100
        args.epochs = args.epochs or 2
    runs = list(RUNS) if args.runs == "all" else [s.strip() for s in args.runs.split(",") if s.strip()]
    known = [*RUNS, *COMMAND_RUNS, *ENSEMBLES]
    unknown = [r for r in runs if r not in known]
    if unknown:
        p.error(f"unknown run(s) {', '.join(unknown)}; choose from {', '.join(known)} or 'all' "
                f"(the pooled runs)")
    args.run_list = runs
    from rnncap.encoding.encoders import ENCODERS

    if args.encoder and args.encoder not in ENCODERS:
        p.error(f"--encoder: choose from {', '.join(ENCODERS)}")
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    from rnncap.cli import nonneg_float  # the check `rnncap caption --length-norm` uses

    try:
        args.length_norm_list = [nonneg_float(s) for s in args.length_norms.split(",") if s.strip()]
    except argparse.ArgumentTypeError as e:
        p.error(f"--length-norms: {e}")
    args.decoder_list = [d.strip() for d in args.decoders.split(",") if d.strip()]
    bad = [d for d in args.decoder_list if d not in dict(DECODERS)]
    if bad or not args.decoder_list:
        p.error(f"--decoders: choose from {', '.join(dict(DECODERS))}")
    return args


def main(argv=None):
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = Data(args)
    data.out = args.out
    log(f"vocab {len(data.vocab)} words; train {len(data.splits['train'])} images, "
        f"val {len(data.splits['val'])} images")
    for seed in [] if args.summarise else args.seed_list:
        for name in args.run_list:
            if name in ENSEMBLES:
                continue
            done = Path(args.out) / f"{name}-s{seed}" / ("metrics.json" if name in RUNS else "command.json")
            if done.is_file() and not args.force:
                log(f"{done.parent.name}: already done, kept (--force retrains)")
            elif name in RUNS:
                run_one(name, seed, data, args)
            else:
                run_command(name, seed, data, args)
            if args.length_norm_list and name in RUNS:
                sweep_length_norm(done.parent, data, args.length_norm_list)
    for name in [] if args.summarise else [r for r in args.run_list if r in ENSEMBLES]:
        if (Path(args.out) / name / "command.json").is_file() and not args.force:
            log(f"{name}: already done, kept (--force rescores)")
        else:
            run_ensemble(name, args.seed_list, data, args)
    summarise(args.out, data)
    log(f"all done in {(time.perf_counter() - t0) / 60:.1f} min; see {Path(args.out) / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
