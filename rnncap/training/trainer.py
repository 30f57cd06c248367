"""The generic minibatch ``Trainer`` and the pieces both training stages share: the data
a captioner trains on (captions, features, vocabulary), validation by CIDEr-D, and
checkpoint averaging.

Read top to bottom: ``Trainer`` (which knows nothing of captions: it sees inputs,
targets, an index from target rows to input rows, and a model with ``params`` and
``loss(inputs, targets)``), then the captioning data it is given, then the helpers
that cross-entropy training (``rnncap.training.train``) and self-critical training
(``rnncap.training.scst``) share.

Resume is exact: the shuffling order of an epoch is derived from (seed, epoch), the
dropout generator's state, the optimizer state and the moving average of the weights
are saved, so k steps + resume + m steps give bitwise the parameters of k + m
uninterrupted steps.
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
import sys
import time

import numpy as np

from . import optim
from ..backend import get_array_module, retain_freed_memory
from ..config import DataConfig, TrainConfig
from ..errors import RnncapError, TrainingDiverged


class Trainer:
    """Minibatch training with validation, checkpoints and exact resume.

    model: has ``params`` (dict of arrays) and ``loss(X, y, train=True) -> (loss, grads)``;
        for a captioner X is (N, D) features (or (N, L, D) maps) and y (N, T+1) captions.
    train: (inputs, targets, index): the batch for rows ``b`` of targets is
        ``(inputs[index[b]], targets[b])``.
    val: the same form, or None.
    checkpoint_fn(path, state, params=None): writes a checkpoint; ``state`` is what
        ``restore`` takes; ``params``, when given, are the weights to write instead of the
        model's (the moving average, with ``cfg.ema``).
    count_fn(targets_batch) -> int: units for the throughput figure (default: rows).
    val_fn(model) -> {name: float}: more validation metrics after each epoch; ``select``
        = (metric, "min" or "max") picks the epoch kept as best.npz.
    step_stats() -> {name: float}: figures of the step just taken (an objective's mean
        reward, say), shown on the progress bar and kept per iteration as "train_NAME".
    keep_top: also keep the parameters of the ``keep_top`` best epochs so far as
        ``epoch-E.npz`` (without optimizer state), for ``average_top_epochs``.

    Each update writes the new weights over the model's arrays (as torch's optimizers
    do): copy ``model.params``' arrays to keep a step's weights.

    With ``cfg.ema`` = d > 0 the trainer also keeps a moving average of the weights,
    ``ema <- d * ema + (1 - d) * w`` after every update, starting from the weights
    training began with (Polyak averaging). The average is what is validated, kept as
    best.npz and as the epoch snapshots; the raw weights go on training (last.npz holds
    both). Where the rate keeps the weights wandering about a plateau, as in
    self-critical training, the average sits nearer its middle.
    """

    def __init__(self, model, train, cfg: TrainConfig, val=None, out_dir=None,
                 checkpoint_fn=None, count_fn=None, unit="samples", val_fn=None,
                 select=("val_loss", "min"), progress=None, log=None, step_stats=None,
                 keep_top=0):
        if cfg.optimizer not in optim.RULES:
            raise RnncapError(f"optimizer must be one of {sorted(optim.RULES)}, got {cfg.optimizer!r}")
        self.model, self.cfg = model, cfg
        if get_array_module(*model.params.values()) is np:
            retain_freed_memory()  # each step frees and allocates the same arrays again
        self.train_data, self.val_data = train, val
        self.out_dir = out_dir
        self.checkpoint_fn = checkpoint_fn
        self.count_fn = count_fn or (lambda y: len(y))
        self.unit = unit
        self.val_fn = val_fn
        self.select_key, self.select_mode = select
        self.step_stats = step_stats
        self.keep_top = int(keep_top)
        self.top = []             # [[epoch, metric], ...] of the kept snapshots, best first
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.epoch = 0            # epochs completed
        self.iteration = 0        # updates done
        self.opt_state = {k: {} for k in model.params}
        self.ema = None           # {name: array}, the moving average of the weights (cfg.ema > 0)
        self.history = {"iteration": [], "train_loss": [], "epoch": [], "val_loss": [],
                        "val_iteration": []}
        self.best = None
        n = len(train[1])
        if n == 0:
            raise RnncapError("no training examples: the training split is empty")
        self.iters_per_epoch = math.ceil(n / cfg.batch_size)

    # -- state for checkpoints ----------------------------------------------------------

    def state(self):
        state = {"epoch": self.epoch, "iteration": self.iteration, "best": self.best,
                 "top": self.top, "optimizer": self.opt_state, "history": self.history}
        if self.ema is not None:
            state["ema"] = self.ema
        return state

    def restore(self, state):
        self.epoch = int(state.get("epoch", 0))
        self.iteration = int(state.get("iteration", 0))
        self.best = state.get("best")
        self.top = [list(t) for t in state.get("top") or []]
        xp = self.model.xp
        opt = state.get("optimizer") or {}
        self.opt_state = {k: {kk: (xp.asarray(vv) if hasattr(vv, "shape") else vv)
                              for kk, vv in opt.get(k, {}).items()} for k in self.model.params}
        ema = state.get("ema")
        self.ema = None if not ema else {k: xp.asarray(ema[k]) for k in self.model.params}
        if state.get("history"):
            self.history = {k: list(v) for k, v in state["history"].items()}
            for k in ("iteration", "train_loss", "epoch", "val_loss", "val_iteration"):
                self.history.setdefault(k, [])

    # -- the loop ---------------------------------------------------------------------

    def lr(self, epoch):
        return self.cfg.lr * (self.cfg.lr_decay ** epoch)

    def _warmup(self):
        """The learning-rate factor of the next update: (i + 1) / warmup over the first
        ``cfg.warmup`` updates (i counted over the whole run, so resume keeps it), then 1."""
        w = getattr(self.cfg, "warmup", 0)
        return min(1.0, (self.iteration + 1) / w) if w else 1.0

    def _batches(self, epoch):
        """Row indices of each minibatch of an epoch, from a generator seeded by
        (seed, epoch) so a resumed run sees the same order."""
        n = len(self.train_data[1])
        perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(n)
        B = self.cfg.batch_size
        return [perm[i:i + B] for i in range(0, n, B)]

    def step(self, rows, lr):
        X, y, index = self.train_data
        loss, grads = self.model.loss(X[index[rows]], y[rows])
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"loss became {loss} at iteration {self.iteration + 1} (epoch {self.epoch + 1}); "
                f"stopped without saving, the last good checkpoint is kept"
                + (f" in {self.out_dir}" if self.out_dir else "")
                + ". Try a lower --lr or --clip")
        if self.cfg.weight_decay:
            grads = {k: (g + self.cfg.weight_decay * self.model.params[k]
                         if self.model.params[k].ndim > 1 else g) for k, g in grads.items()}
        grads, norm = optim.clip_by_global_norm(grads, self.cfg.clip_norm)
        if not math.isfinite(norm):
            raise TrainingDiverged(f"gradient norm became {norm} at iteration {self.iteration + 1}; "
                                   f"stopped without saving, the last good checkpoint is kept")
        rule = optim.RULES[self.cfg.optimizer]
        kw = {"momentum": self.cfg.momentum} if self.cfg.optimizer == "sgd" else {}
        # The trainer owns the parameters and the optimizer's state, so the update
        # writes over them (a wrapper's params are its model's).
        new_params, self.opt_state = optim.update_all(rule, self.model.params, grads, self.opt_state, lr,
                                                      in_place=True, **kw)
        self.model.params.update(new_params)
        if self.ema is not None:
            for k, w in self.model.params.items():
                dt = w.dtype.type
                self.ema[k] = dt(self.cfg.ema) * self.ema[k] + dt(1.0 - self.cfg.ema) * w
        self.iteration += 1
        return loss, norm

    @contextlib.contextmanager
    def kept_weights(self):
        """The model holds, inside the block, the weights that are validated and kept:
        the moving average with ``cfg.ema``, else its own."""
        if self.ema is None:
            yield
            return
        params = self.model.params  # swapped in place: a wrapper's params are its module's
        own = dict(params)
        params.update(self.ema)
        try:
            yield
        finally:
            params.update(own)

    def validate(self):
        """Mean per-example validation loss (no dropout), plus val_fn's metrics, of the
        weights that are kept (``kept_weights``)."""
        with self.kept_weights():
            return self._validate()

    def _validate(self):
        out = {}
        if self.val_data is not None and len(self.val_data[1]):
            X, y, index = self.val_data
            total, n = 0.0, 0
            for i in range(0, len(y), 512):
                rows = np.arange(i, min(i + 512, len(y)))
                loss, _ = self.model.loss(X[index[rows]], y[rows], train=False)
                total += loss * len(rows)
                n += len(rows)
            out["val_loss"] = total / n
        if self.val_fn is not None:
            out.update(self.val_fn(self.model))
        return out

    def fit(self):
        """Train until cfg.epochs (or cfg.max_iters). Returns the history."""
        cfg = self.cfg
        stop = False
        if cfg.ema and self.ema is None:
            self.ema = {k: w.copy() for k, w in self.model.params.items()}
        while self.epoch < cfg.epochs and not stop:
            batches = self._batches(self.epoch)
            start = self.iteration - self.epoch * self.iters_per_epoch
            lr = self.lr(self.epoch)
            bar = _progress(len(batches), start, f"epoch {self.epoch + 1}/{cfg.epochs}", self.progress)
            t0, units = time.perf_counter(), 0
            for b in range(start, len(batches)):
                loss, norm = self.step(batches[b], lr * self._warmup())
                units += int(self.count_fn(self.train_data[1][batches[b]]))
                self.history["iteration"].append(self.iteration)
                self.history["train_loss"].append(float(loss))
                self.history["epoch"].append(self.epoch + (b + 1) / len(batches))
                stats = self.step_stats() if self.step_stats is not None else {}
                for k, v in stats.items():
                    self.history.setdefault(f"train_{k}", []).append(float(v))
                rate = units / max(time.perf_counter() - t0, 1e-9)
                bar.update(loss, rate, self.unit, stats)
                if cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0:
                    self._save("last.npz")
                if cfg.max_iters and self.iteration >= cfg.max_iters:
                    stop = True
                    break
            bar.close()
            if stop and self.iteration < (self.epoch + 1) * self.iters_per_epoch:
                self._save("last.npz")
                break
            self.epoch += 1
            metrics = self.validate()
            self.history["val_iteration"].append(self.iteration)
            self.history["val_loss"].append(metrics.get("val_loss"))
            for k, v in metrics.items():
                if k != "val_loss":
                    self.history.setdefault(k, []).append(v)
            # Wall time of the epoch's updates and validation (of the part run in this
            # process, for an epoch resumed midway).
            seconds = time.perf_counter() - t0
            self.history.setdefault("epoch_seconds", []).append(seconds)
            msg = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            self.log(f"epoch {self.epoch}/{cfg.epochs}: train loss {self.history['train_loss'][-1]:.4f}"
                     + (f", {msg}" if msg else "") + f", lr {lr:.2e}, {seconds:.0f} s")
            improved = self._is_better(metrics.get(self.select_key))
            if improved:
                self.best = {"epoch": self.epoch, "iteration": self.iteration,
                             self.select_key: metrics.get(self.select_key)}
            stale = self._keep_snapshot(metrics.get(self.select_key))
            self._save("last.npz")
            for path in stale:  # only once last.npz no longer lists them
                os.remove(path)
            if improved:
                self._save("best.npz", kept=True)
            self._write_logs()
        return self.history

    def _keep_snapshot(self, value):
        """Keep this epoch's parameters if it ranks among the ``keep_top`` best so far.
        Returns the paths of the snapshots it pushes out, for the caller to remove."""
        if not self.keep_top or value is None or not self.out_dir or self.checkpoint_fn is None:
            return []
        sign = 1.0 if self.select_mode == "min" else -1.0
        ranked = sorted([t for t in self.top if t[0] != self.epoch] + [[self.epoch, float(value)]],
                        key=lambda t: (sign * t[1], t[0]))
        kept, dropped = ranked[:self.keep_top], ranked[self.keep_top:]
        if any(e == self.epoch for e, _ in kept):
            state = {k: v for k, v in self.state().items() if k != "optimizer"}
            self._checkpoint(self.snapshot_path(self.epoch), state, kept=True)
        self.top = kept
        return [p for p in (self.snapshot_path(e) for e, _ in dropped if e != self.epoch)
                if os.path.exists(p)]

    def snapshot_path(self, epoch):
        return os.path.join(self.out_dir, f"epoch-{epoch}.npz")

    def _is_better(self, value):
        if value is None:  # nothing to select on: the latest epoch counts as best
            return True
        if self.best is None or self.best.get(self.select_key) is None:
            return True
        prev = self.best[self.select_key]
        return value < prev if self.select_mode == "min" else value > prev

    def _save(self, name, kept=False):
        if self.checkpoint_fn is not None and self.out_dir:
            self._checkpoint(os.path.join(self.out_dir, name), self.state(), kept)

    def _checkpoint(self, path, state, kept):
        """Write ``path``; ``kept``: with the kept weights (``kept_weights``)."""
        if kept and self.ema is not None:
            # The average is the checkpoint's weights: not written a second time as state.
            state = {k: v for k, v in state.items() if k != "ema"}
            self.checkpoint_fn(path, state, params=self.ema)
        else:
            self.checkpoint_fn(path, state)

    def _write_logs(self):
        if not self.out_dir:
            return
        path = os.path.join(self.out_dir, "log.csv")
        tmp = path + ".tmp"
        h = self.history
        per_step = ["train_loss"] + sorted(k for k in h if k.startswith("train_") and k != "train_loss")
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["iteration", "epoch"] + per_step)
            for row in zip(h["iteration"], h["epoch"], *(h[k] for k in per_step)):
                w.writerow(row)
        os.replace(tmp, path)
        with open(os.path.join(self.out_dir, "val_log.csv"), "w", newline="") as f:
            w = csv.writer(f)
            keys = [k for k in h if k not in ("iteration", "epoch", "val_iteration")
                    and not k.startswith("train_")]
            w.writerow(["iteration"] + keys)
            for i, it in enumerate(h["val_iteration"]):
                w.writerow([it] + [h[k][i] if i < len(h[k]) else "" for k in keys])
        plot_history(h, os.path.join(self.out_dir, "loss.png"))


class _progress:
    """The epoch's bar (``rnncap.progress``: tqdm on a terminal, short lines in a log)
    when wanted, else nothing."""

    def __init__(self, total, initial, desc, enabled):
        self.bar = None
        if enabled:
            from ..progress import progress_bar

            self.bar = progress_bar(total=total, initial=initial, desc=desc, unit="it", leave=False,
                                    dynamic_ncols=True)

    def update(self, loss, rate, unit, stats=None):
        if self.bar is not None:
            extra = "".join(f", {k} {v:.3f}" for k, v in (stats or {}).items())
            self.bar.set_postfix_str(f"loss {loss:.3f}{extra}, {rate:,.0f} {unit}/s", refresh=False)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def plot_history(history, path):
    """PNG of the training and validation loss curves (needs matplotlib; skipped without)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(history["iteration"], history["train_loss"], lw=0.8, alpha=0.7, label="train")
    vals = [(i, v) for i, v in zip(history.get("val_iteration", []), history.get("val_loss", []))
            if v is not None]
    if vals:
        ax.plot(*zip(*vals), "o-", label="val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss per caption")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ======================================================================================
# The captioning side: ``rnncap train``
# ======================================================================================

def prepare_data(dataset, vocab, features_path, data_cfg: DataConfig, splits=("train", "val"),
                 pca=True, encoder=None, standardize=False):
    """Encode captions and line them up with feature rows.

    pca: True to apply the PCA stored in the feature cache, False for raw features, or
    a feature-transform dict to apply (a resumed run uses its checkpoint's).
    standardize: fit a per-channel standardisation on the train features (after the
    PCA) and add it to the transform, unless the transform has one already.
    encoder: the identity the cache must have been made with (on resume), or None.

    Returns ({split: (features (n, D) or (n, L, D) float32, captions (M, T+1) int32,
    image_idx (M,), stats)}, the encoder identity, the feature transform); identity is
    None for datasets that ship their own features, the transform None when there is
    nothing to apply. Every split goes through ``apply_pca`` with that one transform,
    the function caption time uses too.
    """
    from ..data.datasets import encode_split
    from ..encoding.features import apply_pca, fit_standardizer

    out, ident, params = {}, None, pca if isinstance(pca, dict) else None
    for name in splits:
        if name not in dataset.splits:
            if name == "train":
                raise RnncapError(f"{data_cfg.captions}: the dataset has no 'train' split "
                                  f"(splits: {', '.join(dataset.splits) or 'none'})")
            continue
        split = dataset.splits[name]
        caps, img_idx, stats = encode_split(split, vocab, data_cfg.max_length, data_cfg.too_long)
        if split.features is not None:
            feats = np.asarray(split.features, dtype=np.float32)
        else:
            if not features_path:
                raise RnncapError("--features is required: this dataset ships no features "
                                  "(make them with `rnncap features`)")
            feats, ident, stored = _features_for(features_path, name, split, encoder)
            if pca is True and params is None:
                params = stored
        out[name] = [feats, caps, img_idx, stats]
    if standardize and (params is None or params.get("scale") is None):
        train = out["train"][0]
        params = fit_standardizer(train if params is None else apply_pca(train, params), params)
    for entry in out.values():
        if params is not None:
            entry[0] = apply_pca(entry[0], params)
    return {k: tuple(v) for k, v in out.items()}, ident, params


def _features_for(path, split_name, split, encoder):
    """Raw rows of the feature cache for a split, in the dataset's image order, the
    cache's encoder identity and its stored PCA (or None)."""
    from ..encoding.encoders import describe_mismatch
    from ..encoding.features import load_features, read_identity, read_pca

    ident = read_identity(path)
    if encoder is not None:
        diff = describe_mismatch(encoder, ident)
        if diff:
            raise RnncapError(f"{path}: made with another encoder than the checkpoint ({diff})")
    feats, ids = load_features(path, split_name, pca=False)
    pos = {i: k for k, i in enumerate(ids)}
    missing = [i for i in split.image_ids if i not in pos]
    if missing:
        raise RnncapError(f"{path}: {len(missing)} images of split '{split_name}' have no "
                          f"features (first: {missing[0]}); rerun `rnncap features`")
    rows = np.fromiter((pos[i] for i in split.image_ids), dtype=np.int64, count=len(split.image_ids))
    return feats[rows], ident, read_pca(path)


def given_or_default(args, keys, defaults, flags=None):
    """{key: the command line's value where given (not None), else defaults.key};
    ``flags`` maps a key to its argparse name where they differ."""
    flags = flags or {}
    out = {}
    for k in keys:
        v = getattr(args, flags.get(k, k), None)
        out[k] = getattr(defaults, k) if v is None else v
    return out


def train_bad_endings(dataset, vocab):
    """The words of ``vocab`` that (almost) never end one of the dataset's train
    captions (``rnncap.data.vocab.bad_endings``): what the decoding rules keep
    ``<END>`` from following; stored in every checkpoint's ``DecodeConfig``."""
    from ..data.vocab import bad_endings

    train = dataset.splits.get("train")
    return bad_endings([c for refs in train.references for c in refs], vocab) if train is not None else []


def cider_val_fn(vocab, features, references, max_length, beam=1, length_norm=0.0, decode=None):
    """A ``Trainer`` val_fn: {"val_cider": CIDEr-D of the model's captions of the val
    images (greedy, or beam search of size ``beam``, with the rules of ``decode``, a
    ``DecodeConfig``; None: ``Captioner``'s defaults) against all their references,
    document frequencies from those references}: the COCO toolkit's CIDEr-D
    (``rnncap.evaluation.cider``), with rnncap's tokenizer on both sides. Images without a
    reference are left out."""
    from ..evaluation.cider import cider_d
    from ..inference.sample import Captioner
    from ..data.vocab import tokenize

    keep = [i for i, refs in enumerate(references) if refs]
    feats = features[keep]
    refs = [[tokenize(c) for c in references[i]] for i in keep]

    def val_fn(model):
        captions = Captioner(model, vocab, None, max_length=max_length, decode=decode).caption_features(
            feats, beam=beam, length_norm=length_norm)
        return {"val_cider": cider_d([tokenize(c) for c in captions], refs)[0]}

    return val_fn


def with_params(model, params):
    """A shallow copy of ``model`` that holds ``params`` (the model is untouched)."""
    import copy

    out = copy.copy(model)
    out.params = params
    return out


def average_top_epochs(trainer, model, val_fn, checkpoint_fn, log=None):
    """After a finished run: the mean of the parameters of the epochs the trainer kept
    (``keep_top``, the best on val), scored by ``val_fn``; when it beats the best
    epoch, it becomes best.npz (``checkpoint_fn(path, state, params)``) and
    ``trainer.best`` records the epochs averaged. Returns its score, or None when
    there was nothing to average."""
    from ..checkpoint import load_checkpoint

    log = log or trainer.log
    epochs = sorted(e for e, _ in trainer.top)
    if val_fn is None or len(epochs) < 2 or trainer.epoch < trainer.cfg.epochs:
        return None
    total = None
    for e in epochs:
        params = load_checkpoint(trainer.snapshot_path(e)).model.params
        total = ({k: v.astype(np.float64) for k, v in params.items()} if total is None
                 else {k: total[k] + v for k, v in params.items()})
    xp = model.xp
    avg = {k: xp.asarray((v / len(epochs)).astype(model.params[k].dtype)) for k, v in total.items()}
    key = trainer.select_key
    score = float(val_fn(with_params(model, avg))[key])
    best = (trainer.best or {}).get(key)
    better = best is None or (score < best if trainer.select_mode == "min" else score > best)
    log(f"average of epochs {epochs}: {key} {score:.4f} against {best if best is None else round(best, 4)} "
        f"for the best epoch: " + ("kept as best.npz" if better else "not kept"))
    if better:
        trainer.best = {**(trainer.best or {}), key: score, "averaged": epochs}
        checkpoint_fn(os.path.join(trainer.out_dir, "best.npz"), trainer.state(), params=avg)
        checkpoint_fn(os.path.join(trainer.out_dir, "last.npz"), trainer.state())
    return score


def _check_feature_kind(model, feats, path):
    """Spatial models (the attention model, a Transformer trained on maps) read spatial
    maps (n, L, D), the others pooled vectors."""
    if model.spatial and feats.ndim != 3:
        raise RnncapError(f"{path}: holds pooled features; this model (--model "
                          f"{_kind(model)}) reads spatial maps: make them with `rnncap features --maps`")
    if not model.spatial and feats.ndim != 2:
        raise RnncapError(f"{path}: holds spatial maps (from `rnncap features --maps`), which this "
                          f"model (--model {_kind(model)}, trained on pooled features) does not read; "
                          f"pool them (`rnncap features` without --maps)")


def _kind(model):
    from ..models.registry import kind_of

    return kind_of(model)


def dataset_vocab(dataset, data_cfg):
    """The dataset's own vocabulary (cs231n ships one), else one built from train."""
    from ..data.vocab import Vocab

    if dataset.vocab is not None:
        return dataset.vocab
    if "train" not in dataset.splits:
        raise RnncapError(f"{data_cfg.captions}: no 'train' split to build a vocabulary from")
    refs = [c for caps in dataset.splits["train"].references for c in caps]
    return Vocab.build(refs, min_count=data_cfg.min_count, top_k=data_cfg.top_k)


def check_vocab_matches(vocab, dataset, data_cfg, ckpt_path):
    """On resume, the data must give the checkpoint's vocabulary back."""
    fresh = dataset_vocab(dataset, data_cfg)
    if list(fresh.idx_to_word) != list(vocab.idx_to_word):
        a, b = list(vocab.idx_to_word), list(fresh.idx_to_word)
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise RnncapError(
            f"{data_cfg.captions}: its vocabulary ({len(b)} words) does not match the one in "
            f"{ckpt_path} ({len(a)} words; first difference at id {k}): resume with the "
            f"dataset the checkpoint was trained on")


def _print_data_summary(dataset, vocab, data, stats):
    parts = [f"vocab {len(vocab)} words"]
    for name, (feats, caps, _, st) in data.items():
        parts.append(f"{name}: {feats.shape[0]} images, {caps.shape[0]} captions")
    msg = "; ".join(parts)
    dropped = {k: v for k, v in (stats or {}).items() if k != "total" and v}
    if dropped:
        msg += " (train captions: " + ", ".join(f"{k} {v}" for k, v in dropped.items()) + ")"
    if getattr(dataset, "skipped_missing", 0):
        msg += f"; {dataset.skipped_missing} images skipped (files missing)"
    print(msg, file=sys.stderr)
