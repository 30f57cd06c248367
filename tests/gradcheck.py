"""Numerical gradient checking, shared by the layer and model tests.

The error measure (used everywhere in the suite) is norm-based, one number per
input array::

    rel_error(a, b) = ||a - b||_2 / max(1e-8, ||a||_2 + ||b||_2)

An element-wise maximum of |a_i - b_i| / (|a_i| + |b_i|) was tried first and rejected:
a gradient element that happens to be tiny (3.5e-7 next to 2e-2 in the same LSTM
dWx) is resolved by centred differences only to about 1e-12 absolute, so its
*relative* error reads 3e-6 to 3e-4 although the backward pass is exact. The norm
keeps the check sharp (any wrong part whose error exceeds ~2e-6 of the array's
norm fails it) without failing on such elements. The 1e-8 floor only matters when both
arrays are zero.

Numerical gradients are centred differences, ``(f(x + h) - f(x - h)) / 2h``, of the
scalar ``sum(f(...) * dout)`` for a fixed random upstream gradient ``dout``. The
step h = 1e-5 balances the two float64 error sources, truncation (~h^2) and
round-off (~1e-16 |f| / h). Everything here is host NumPy; the analytic side may have
been computed on any backend and brought back with ``to_numpy``.
"""
from __future__ import annotations

import numpy as np

TOLERANCE = 1e-6


def rel_error(a, b, floor=1e-8):
    """Norm-based relative error ``||a-b|| / max(floor, ||a||+||b||)``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return float(np.linalg.norm(a - b) / max(floor, np.linalg.norm(a) + np.linalg.norm(b)))


def numeric_gradient(f, x, dout=None, h=1e-5):
    """Centred-difference gradient of ``sum(f() * dout)`` with respect to ``x``.

    ``f`` takes no arguments and reads ``x``, which is perturbed in place one element
    at a time and restored exactly afterwards, so ``x`` must be a float64 array the
    caller owns. ``dout=None`` means ``f`` returns a scalar (a loss).
    """
    if x.dtype != np.float64:
        raise TypeError(f"numeric_gradient needs float64, got {x.dtype}")
    grad = np.zeros_like(x)
    flat = x.reshape(-1)  # a view: writes go to x
    if not np.shares_memory(flat, x):
        raise ValueError("x must be contiguous so it can be perturbed in place")
    g = grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        plus = np.asarray(f(), dtype=np.float64)
        flat[i] = old - h
        minus = np.asarray(f(), dtype=np.float64)
        flat[i] = old
        diff = plus - minus  # difference first: less cancellation than two sums
        g[i] = (diff.sum() if dout is None else np.sum(diff * dout)) / (2 * h)
    return grad


def check_gradients(f, inputs, analytic, dout=None, tol=TOLERANCE, h=1e-5):
    """Compare analytic gradients with centred differences for several inputs.

    f: no-argument function reading the arrays in ``inputs`` (a name -> float64 array
    dict); analytic: name -> gradient (any array with ``to_numpy``-able values, same
    names as ``inputs``). Raises AssertionError naming every input whose relative
    error exceeds ``tol``; returns the dict of errors otherwise.
    """
    errors = {}
    for name, x in inputs.items():
        num = numeric_gradient(f, x, dout, h=h)
        errors[name] = rel_error(num, analytic[name])
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative error above {tol:g}: " + ", ".join(
        f"{k}={v:.3g}" for k, v in bad.items())
    return errors
