"""PCA and standardisation of features, fitted on train only, and ``apply_pca``, the one
transform that training, evaluation and caption time all apply.

Projections are ``(x - mean) @ components`` in float32. For spatial maps ((L, C) per
image) the PCA is per channel, fitted on the C-vectors of all train locations.
Whitening is off by default: it inflates the many low-variance directions to unit
scale, which mostly amplifies noise for a captioner that learns its own input
projection.
"""
from __future__ import annotations

import numpy as np

from ..errors import RnncapError


def fit_pca(train_features, dim, whiten=False):
    """Principal components of (n, D) features: {"mean" (D,), "components" (D, K),
    "explained_variance_ratio" (K,)}, all float32.

    Computed from the D x D covariance (memory grows with D^2, not n * D). Each
    component's sign is fixed (largest entry positive) so refits agree. With
    ``whiten`` the components are scaled so projections have unit variance.
    """
    x = np.asarray(train_features)
    if x.ndim != 2:
        raise RnncapError(f"PCA needs (n, D) features, got shape {x.shape}")
    n, d = x.shape
    if not 1 <= dim <= min(n - 1, d):
        raise RnncapError(f"PCA dimension {dim} must be between 1 and {min(n - 1, d)} "
                          f"({n} train features of dimension {d})")
    mean, cov = _mean_and_covariance(x)
    var, vecs = np.linalg.eigh(cov)
    order = np.argsort(var)[::-1][:dim]
    var, comps = np.maximum(var[order], 0.0), vecs[:, order]
    signs = np.sign(comps[np.argmax(np.abs(comps), axis=0), np.arange(dim)])
    comps = comps * np.where(signs == 0, 1.0, signs)
    if whiten:
        comps = comps / np.sqrt(var + 1e-12)
    total = np.trace(cov)
    return {"mean": mean.astype(np.float32), "components": comps.astype(np.float32),
            "explained_variance_ratio": (var / total if total > 0 else np.zeros_like(var)).astype(np.float32),
            "whiten": bool(whiten)}


def _mean_and_covariance(x, chunk=16384):
    """Mean (D,) and covariance (D, D) of (n, D) rows in float64, a chunk of rows at a
    time, so that a float16 map cache (294k rows for Flickr8k) is never copied whole."""
    n, d = x.shape
    total = np.zeros(d)
    for i in range(0, n, chunk):
        total += x[i:i + chunk].sum(axis=0, dtype=np.float64)
    mean = total / n
    cov = np.zeros((d, d))
    for i in range(0, n, chunk):
        xc = x[i:i + chunk].astype(np.float64) - mean
        cov += xc.T @ xc
    return mean, cov / (n - 1)


def apply_pca(features, pca):
    """The feature transform stored with a cache or checkpoint, applied to (N, D)
    features or (N, L, D) maps (the same map at every location): float32.

    ``pca`` holds "mean" (D,) and, optionally, "components" (D, K) from ``fit_pca``
    and "scale" (K,) from ``fit_standardizer``: out = ((x - mean) @ components) * scale,
    each step only when its entry is there. This one function serves training,
    evaluation and caption time. Works on NumPy and CuPy arrays.
    """
    from ..backend import get_array_module

    xp = get_array_module(features)
    mean = xp.asarray(pca["mean"], dtype=xp.float32)
    if features.shape[-1] != mean.shape[0]:
        raise RnncapError(f"features are {features.shape[-1]}-d but the PCA expects {mean.shape[0]}-d")
    out = features.astype(xp.float32, copy=False) - mean
    if pca.get("components") is not None:
        out = out @ xp.asarray(pca["components"], dtype=xp.float32)
    if pca.get("scale") is not None:
        out *= xp.asarray(pca["scale"], dtype=xp.float32)
    return out


def transformed_dim(pca, raw_dim):
    """Size of a feature vector after ``apply_pca`` (``raw_dim`` without a transform)."""
    if pca is None:
        return raw_dim
    comps = pca.get("components")
    return int(comps.shape[1]) if comps is not None else int(len(pca["mean"]))


def fit_standardizer(features, pca=None):
    """Per-channel standardisation on top of ``pca`` (None: none yet), fitted on
    train features *after* that transform: a new transform dict whose "scale" gives
    every channel unit variance over the train rows (and locations, for maps).

    Without a PCA the mean is fitted here too; with one, its projections already
    have zero mean on train. Channels with no variance keep scale 1.
    """
    x = np.asarray(features)
    rows = x.reshape(-1, x.shape[-1])
    mean, var = _mean_and_variance(rows)
    std = np.sqrt(var)
    scale = np.where(std > 1e-8, 1.0 / np.maximum(std, 1e-8), 1.0).astype(np.float32)
    if pca is None:
        return {"mean": mean.astype(np.float32), "scale": scale}
    return {**pca, "scale": scale if pca.get("scale") is None else pca["scale"] * scale}


def _mean_and_variance(x, chunk=16384):
    """Per-column mean and variance (population) of (n, D) rows, in float64 chunks."""
    n, d = x.shape
    total, sq = np.zeros(d), np.zeros(d)
    for i in range(0, n, chunk):
        c = x[i:i + chunk].astype(np.float64)
        total += c.sum(axis=0)
        sq += (c * c).sum(axis=0)
    mean = total / n
    return mean, np.maximum(sq / n - mean * mean, 0.0)
