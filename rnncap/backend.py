"""The one place that decides between NumPy and CuPy.

Layers never import cupy themselves: they ask ``get_array_module(x)`` for the module
that owns their inputs, so the same code runs on the CPU and on a GPU. Conversions
between host and device happen only at the edges (``to_device`` / ``to_numpy``).
"""
from __future__ import annotations

import functools

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


@functools.cache
def retain_freed_memory():
    """Ask the C library's allocator (glibc) to keep freed memory for reuse instead of
    handing it back to the system: once per process, best before any thread but this
    one allocates; False where it cannot (not glibc).

    A training step frees and allocates the same arrays, tens of megabytes of them,
    every time. By default glibc gives much of that back to the system, so the next
    step pays a page fault for every 4 KB it touches again: for the Transformer at
    N=50, 12,000 faults and 34 ms of system time in a 348 ms step (docs/performance.md).
    Kept, the pages are reused. The process holds on to its peak heap until it exits,
    which a training run does anyway.
    """
    return _glibc_mallopt(mmap_threshold=32 << 20, trim_threshold=1 << 30, arena_max=1)


def _glibc_mallopt(mmap_threshold, trim_threshold, arena_max):
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # a C library without mallopt (musl)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's <malloc.h>
    # Blocks above the mmap threshold are mapped and unmapped one by one (32 MB is
    # the most glibc accepts on 64-bit systems); free memory at the top of the heap
    # goes back beyond the trim threshold. A thread's own arena is made of mapped
    # heaps that are unmapped once empty, whatever the threshold, so the shards'
    # threads share the one heap (they allocate seldom, and in large blocks).
    return all(mallopt(opt, value) == 1 for opt, value in (
        (M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold),
        (M_ARENA_MAX, arena_max)))
