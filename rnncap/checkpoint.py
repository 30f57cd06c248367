"""Checkpoints: one self-contained ``.npz`` file, no pickle anywhere.

A checkpoint holds everything needed to caption a new photo or to resume training:

* ``param/<name>``           model parameters
* ``opt/<name>/<key>``       optimizer state arrays (Adam's m and v, SGD's velocity)
* ``pca/mean``, ``pca/components``, ``pca/scale``  the feature transform (PCA and/or
  standardisation, ``rnncap.features.apply_pca``) applied to encoder features, if any
* ``__meta__``               UTF-8 JSON as a uint8 array: format name and version, the
  model constructor arguments, the config dataclasses, the vocabulary, the encoder's
  identity, training counters and RNG states, and the loss history.

It is read with ``numpy.load(allow_pickle=False)``, so a file that carries a pickle
payload is refused before anything in it runs. Writes are atomic (temporary file,
fsync, rename): a crash mid-save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field

import numpy as np

from .errors import CheckpointError

FORMAT_NAME = "rnncap-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    model: object                      # CaptioningModel or AttentionCaptioningModel
    vocab: object                      # Vocab
    encoder: dict | None = None        # identity of the image encoder (name, dims, weights hash)
    pca: dict | None = None            # {"mean": (D,), "components": (D, K)} or None
    configs: dict = field(default_factory=dict)     # {"model": {...}, "train": {...}, "data": {...}}
    history: dict = field(default_factory=dict)     # loss curves
    train_state: dict = field(default_factory=dict)  # epoch, iteration, rng, optimizer state
    meta: dict = field(default_factory=dict)


def save_checkpoint(path, model, vocab, *, encoder=None, pca=None, configs=None,
                    train_state=None, history=None):
    """Write a checkpoint atomically to ``path`` (a ``.npz`` file).

    train_state may carry ``"optimizer": {param_name: {key: array or int}}``; arrays are
    stored as npz entries and scalars in the JSON.
    """
    train_state = dict(train_state or {})
    arrays = {f"param/{k}": v for k, v in model.numpy_params().items()}
    opt_scalars = {}
    for pname, st in (train_state.pop("optimizer", None) or {}).items():
        opt_scalars[pname] = {}
        for key, val in st.items():
            if hasattr(val, "shape") and getattr(val, "ndim", 0) > 0:
                arrays[f"opt/{pname}/{key}"] = _host(val)
            else:
                opt_scalars[pname][key] = val if isinstance(val, (int, float)) else _host(val).item()
    for key in ("mean", "components", "scale") if pca is not None else ():
        if pca.get(key) is not None:  # the feature transform (rnncap.features.apply_pca)
            arrays[f"pca/{key}"] = np.asarray(pca[key], dtype=np.float32)
    from . import __version__

    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "rnncap_version": __version__,
        "model_class": type(model).__name__,
        "model": model.config(),
        "model_rng": model.rng.bit_generator.state,
        "configs": configs or {},
        "vocab": vocab.to_dict(),
        "encoder": encoder,
        "train_state": train_state,
        "optimizer_scalars": opt_scalars,
        "history": history or {},
    }
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    _atomic_savez(path, arrays)
    return path


def _host(a):
    from .backend import to_numpy

    return to_numpy(a)


def _atomic_savez(path, arrays):
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    # Make the rename itself durable.
    try:
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def load_checkpoint(path, device="cpu"):
    """Read a checkpoint written by ``save_checkpoint``. Raises CheckpointError with one
    line naming the file for anything that is not a valid, compatible checkpoint."""
    from .model import model_class
    from .vocab import Vocab

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    arrays, meta = _read_archive(path)
    fmt = meta.get("format")
    version = meta.get("format_version")
    if fmt != FORMAT_NAME:
        raise CheckpointError(f"{path}: not an rnncap checkpoint (format {fmt!r})")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written in checkpoint format {version}, but this rnncap "
                              f"reads format {FORMAT_VERSION} at most: upgrade rnncap")
    try:
        # Checkpoints written before there was a second model hold a CaptioningModel.
        cls = model_class(meta.get("model_class", "CaptioningModel"))
        model = cls.from_config(dict(meta["model"]))
        vocab = Vocab.from_dict(meta["vocab"])
    except CheckpointError:
        raise
    except Exception as e:  # a damaged or hand-edited JSON header
        raise CheckpointError(f"{path}: damaged checkpoint header ({type(e).__name__}: {e})")
    for name, p in model.params.items():
        a = arrays.get(f"param/{name}")
        if a is None:
            raise CheckpointError(f"{path}: parameter {name!r} missing")
        if a.shape != p.shape:
            raise CheckpointError(f"{path}: parameter {name!r} has shape {a.shape}, "
                                  f"expected {p.shape}")
        model.params[name] = a.astype(model.dtype, copy=False)
    if len(vocab) != model.vocab_size:
        raise CheckpointError(f"{path}: vocabulary has {len(vocab)} words but the model "
                              f"expects {model.vocab_size}")
    if meta.get("model_rng"):
        model.rng.bit_generator.state = meta["model_rng"]
    if device != "cpu":
        model.to(device)

    pca = None
    if "pca/mean" in arrays:
        pca = {k: arrays.get(f"pca/{k}") for k in ("mean", "components", "scale")}
    train_state = dict(meta.get("train_state") or {})
    opt = {}
    for pname, scalars in (meta.get("optimizer_scalars") or {}).items():
        opt[pname] = dict(scalars)
    for key, a in arrays.items():
        if key.startswith("opt/"):
            _, pname, k = key.split("/", 2)
            opt.setdefault(pname, {})[k] = a
    if opt:
        train_state["optimizer"] = opt
    return Checkpoint(model=model, vocab=vocab, encoder=meta.get("encoder"), pca=pca,
                      configs=meta.get("configs") or {}, history=meta.get("history") or {},
                      train_state=train_state, meta=meta)


def _read_archive(path):
    """All arrays of the npz plus the decoded JSON header, with clear errors."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})")
    if magic != b"PK\x03\x04":
        raise CheckpointError(f"{path}: not an rnncap checkpoint (not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise CheckpointError(f"{path}: refusing to load: the file contains pickled "
                                  f"objects, which rnncap never writes")
        raise CheckpointError(f"{path}: corrupt checkpoint ({e})")
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({type(e).__name__}: {e})")
    raw = arrays.pop("__meta__", None)
    if raw is None or raw.dtype != np.uint8 or raw.ndim != 1:
        raise CheckpointError(f"{path}: not an rnncap checkpoint (no metadata)")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint header ({e})")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: damaged checkpoint header (not a JSON object)")
    return arrays, meta
