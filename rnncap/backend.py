"""The one place that decides between NumPy and CuPy.

Layers never import cupy themselves: they ask ``get_array_module(x)`` for the module
that owns their inputs, so the same code runs on the CPU and on a GPU. Conversions
between host and device happen only at the edges (``to_device`` / ``to_numpy``).
"""
from __future__ import annotations

import numpy as np

try:  # CuPy is optional (extra "gpu"); its absence is the normal case.
    import cupy as _cupy  # type: ignore

    try:
        _cupy.cuda.runtime.getDeviceCount()
        cupy = _cupy
    except Exception:  # installed but no usable GPU
        cupy = None
except Exception:  # pragma: no cover - depends on the machine
    cupy = None


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    return cupy is not None


def get_array_module(*arrays):
    """Return ``cupy`` if any argument is a CuPy array, else ``numpy``."""
    if cupy is not None:
        for a in arrays:
            if isinstance(a, cupy.ndarray):
                return cupy
    return np


def xp_for(device: str):
    """Array module for a device name: "cpu" -> numpy, "gpu"/"cuda" -> cupy."""
    if device in ("cpu", "numpy"):
        return np
    if device in ("gpu", "cuda", "cupy"):
        if cupy is None:
            from .errors import DeviceUnavailable

            raise DeviceUnavailable("device 'gpu' asked for, but CuPy with a CUDA device is not available "
                                    "(install the extra: pip install 'rnncap[gpu]')")
        return cupy
    raise ValueError(f"unknown device {device!r}: use 'cpu' or 'gpu'")


def to_numpy(a):
    """Bring an array (NumPy or CuPy) to the host as a NumPy array."""
    if cupy is not None and isinstance(a, cupy.ndarray):
        return cupy.asnumpy(a)
    return np.asarray(a)


def to_device(a, xp):
    """Move a host array onto the array module ``xp`` (no copy when already there)."""
    if xp is np:
        return to_numpy(a)
    return xp.asarray(a)
