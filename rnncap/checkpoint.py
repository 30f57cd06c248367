"""Checkpoints: one self-contained ``.npz`` file, no pickle anywhere.

A checkpoint holds everything needed to caption a new photo or to resume training:

* ``param/<name>``           model parameters
* ``opt/<name>/<key>``       optimizer state arrays (Adam's m and v, SGD's velocity)
* ``ema/<name>``             the moving average of the parameters, when training keeps one
* ``pca/mean``, ``pca/components``, ``pca/scale``  the feature transform (PCA and/or
  standardisation, ``rnncap.encoding.features.apply_pca``) applied to encoder features, if any
* ``__meta__``               UTF-8 JSON as a uint8 array: format name and version, the
  model constructor arguments, the config dataclasses, the vocabulary, the encoder's
  identity, training counters and RNG states, and the loss history.

Each member is read as an .npy array of plain numbers, its header checked first and
``allow_pickle=False``, so a file that carries a pickle payload is refused before
anything in it runs. Writes are atomic (temporary file, fsync, rename): a crash
mid-save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import io
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
    """Write a checkpoint atomically to ``path`` (a ``.npz`` file): ``model.params``
    (each array as its own entry), the vocabulary, the encoder identity, ``pca`` (the
    feature transform: "mean" (D,), "components" (D, K), "scale" (K,)) and the configs.

    train_state may carry ``"optimizer": {param_name: {key: array or int}}``; arrays are
    stored as npz entries and scalars in the JSON. Its ``"ema": {param_name: array}``
    (the trainer's moving average of the parameters) is stored as npz entries too.
    """
    train_state = dict(train_state or {})
    arrays = {f"param/{k}": v for k, v in model.numpy_params().items()}
    for pname, a in (train_state.pop("ema", None) or {}).items():
        arrays[f"ema/{pname}"] = _host(a)
    opt_scalars = {}
    for pname, st in (train_state.pop("optimizer", None) or {}).items():
        opt_scalars[pname] = {}
        for key, val in st.items():
            if hasattr(val, "shape") and getattr(val, "ndim", 0) > 0:
                arrays[f"opt/{pname}/{key}"] = _host(val)
            else:
                opt_scalars[pname][key] = val if isinstance(val, (int, float)) else _host(val).item()
    for key in ("mean", "components", "scale") if pca is not None else ():
        if pca.get(key) is not None:  # the feature transform (rnncap.encoding.features.apply_pca)
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
    """Read a checkpoint written by ``save_checkpoint``: a ``Checkpoint`` with ``model``
    (its ``params`` arrays on ``device``), ``vocab``, ``encoder`` (the identity to rebuild
    the image encoder), ``pca`` (the feature transform: "mean" (D,), "components"
    (D, K)) or None, ``configs``, ``train_state`` and ``history``. Raises CheckpointError
    with one line naming the file for anything that is not a valid, compatible
    checkpoint."""
    from .models.registry import model_class
    from .data.vocab import Vocab

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
    ema = {key[len("ema/"):]: a for key, a in arrays.items() if key.startswith("ema/")}
    if ema and set(ema) != set(model.params):
        raise CheckpointError(f"{path}: the moving average (ema/...) covers {sorted(ema)}, "
                              f"not the parameters {sorted(model.params)}")
    for name, a in ema.items():
        if a.shape != model.params[name].shape:
            raise CheckpointError(f"{path}: entry 'ema/{name}' has shape {a.shape}, expected "
                                  f"{model.params[name].shape}")
    if len(vocab) != model.vocab_size:
        raise CheckpointError(f"{path}: vocabulary has {len(vocab)} words but the model "
                              f"expects {model.vocab_size}")
    try:
        train_state, extras = _header_state(meta, arrays, model)
    except Exception as e:  # a damaged or hand-edited JSON header
        raise CheckpointError(f"{path}: damaged checkpoint header ({type(e).__name__}: {e})")
    if ema:
        train_state["ema"] = {k: a.astype(model.dtype, copy=False) for k, a in ema.items()}
    if device != "cpu":
        model.to(device)
    pca = None
    if "pca/mean" in arrays:
        pca = {k: arrays.get(f"pca/{k}") for k in ("mean", "components", "scale")}
    return Checkpoint(model=model, vocab=vocab, pca=pca, train_state=train_state, meta=meta, **extras)


def _header_state(meta, arrays, model):
    """The training state, the dropout generator's state and the other header fields,
    each checked for its type (a hand-edited header fails here, with its reason)."""
    def mapping(key):
        value = meta.get(key) or {}
        if not isinstance(value, dict):
            raise TypeError(f"{key!r} is a {type(value).__name__}, not an object")
        return value

    if meta.get("model_rng"):
        model.rng.bit_generator.state = meta["model_rng"]
    train_state = dict(mapping("train_state"))
    opt = {pname: dict(scalars) for pname, scalars in mapping("optimizer_scalars").items()}
    for key, a in arrays.items():
        if key.startswith("opt/"):
            _, pname, k = key.split("/", 2)
            opt.setdefault(pname, {})[k] = a
    if opt:
        train_state["optimizer"] = opt
    encoder = meta.get("encoder")
    if encoder is not None and not isinstance(encoder, dict):
        raise TypeError(f"'encoder' is a {type(encoder).__name__}, not an object")
    return train_state, {"encoder": encoder, "configs": mapping("configs"), "history": mapping("history")}


def _read_archive(path):
    """All arrays of the npz plus the decoded JSON header, with clear errors.

    Every zip member is read on its own rather than through ``np.load``, whose NpzFile
    hands back the raw bytes of any member that is not an .npy array (random bytes, a
    zip inside the zip, a bare pickle), which then failed later as a traceback.
    """
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})")
    if magic != b"PK\x03\x04":
        raise CheckpointError(f"{path}: not an rnncap checkpoint (not an .npz archive)")
    arrays = {}
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                name = info.filename
                key = name[:-len(".npy")] if name.endswith(".npy") else name
                arrays[key] = _read_entry(path, z, info)
                if key.startswith("opt/") and len(key.split("/")) < 3:
                    raise CheckpointError(f"{path}: entry {name!r} is not named opt/<parameter>/<key>")
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as e:
        # NotImplementedError: a damaged directory can ask for a zip feature or version
        # that zipfile lacks.
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({type(e).__name__}: {e})")
    raw = arrays.pop("__meta__", None)
    if raw is None:
        raise CheckpointError(f"{path}: not an rnncap checkpoint (no metadata)")
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise CheckpointError(f"{path}: entry '__meta__.npy' is not the JSON header (a 1-D uint8 "
                              f"array) but {raw.dtype} of shape {raw.shape}")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint header ({e})")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: damaged checkpoint header (not a JSON object)")
    return arrays, meta


# What a member holds when it is not .npy data, by its first bytes.
_NOT_NPY = ((b"PK\x03\x04", "a zip archive, not .npy data"), (b"\x80", "pickled data, not .npy data"))


def _read_entry(path, z, info):
    """One member as a numeric array, or a CheckpointError naming the file and the entry.

    Only plain numbers are arrays rnncap writes (bool, integer, float; no objects, so
    no pickle, no strings, records or complex numbers), and the data must be exactly as
    long as the .npy header says. The header is checked before the array is built, so a
    pickle is refused without being read and a forged shape cannot ask for terabytes.
    """
    where = f"{path}: entry {info.filename!r}"
    if not info.filename.endswith(".npy"):
        raise CheckpointError(f"{where} is not an .npy array (an .npz holds only .npy members)")
    fmt, raw = np.lib.format, b""
    try:
        raw = z.read(info)
        f = io.BytesIO(raw)
        version = fmt.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f".npy format version {version[0]}.{version[1]}")
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read_header(f)
        if dtype.hasobject:
            raise CheckpointError(f"{where}: refusing to load: it holds pickled objects, which "
                                  f"rnncap never writes")
        size = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
            problem = f"dtype {dtype}, not numbers"
        elif len(raw) - f.tell() != size:
            problem = f"truncated or padded: {len(raw) - f.tell()} bytes of data, its header says {size}"
        else:
            return fmt.read_array(io.BytesIO(raw), allow_pickle=False)
    except CheckpointError:
        raise
    except Exception as e:  # anything wrong in an untrusted member is the file's fault: one line
        problem = next((what for head, what in _NOT_NPY if raw.startswith(head)), None)
        if problem is None and raw and not raw.startswith(fmt.MAGIC_PREFIX):
            problem = "no .npy header"
        problem = problem or f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    raise CheckpointError(f"{where} is not a valid array ({problem})")
