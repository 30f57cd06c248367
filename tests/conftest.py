"""Shared fixtures.

``xp`` runs a test once per array backend: NumPy always, CuPy when
``rnncap.backend.gpu_available()`` (otherwise that case is skipped with a reason).
Tests compare what the backend computes with host NumPy results via ``to_numpy``.
"""
from __future__ import annotations

import sys
from pathlib import Path

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
