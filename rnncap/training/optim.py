"""Optimizers as pure update rules, plus global-norm gradient clipping.

An update rule takes a parameter, its gradient and the rule's own state, and returns
the new parameter and the new state: ``(w, state) = rule(w, dw, state, lr=..)``. It
keeps no hidden state, so a checkpoint only has to save the returned state dicts.
Arguments are never written into, unless the caller hands Adam its own arrays as
``out`` (``update_all(in_place=True)``, as the trainer does: it owns them).
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import get_array_module


def sgd_momentum(w, dw, state, lr, momentum=0.9):
    """SGD with (heavy-ball) momentum: v = momentum*v - lr*dw; w = w + v.

    state: {} on the first call, then {"v": array}.
    """
    v = state.get("v")
    v = -lr * dw if v is None else momentum * v - lr * dw
    v = v.astype(w.dtype, copy=False)
    return w + v, {"v": v}


def adam(w, dw, state, lr, beta1=0.9, beta2=0.999, eps=1e-8, out=None):
    """Adam (Kingma & Ba, 2015) with bias correction.

    state: {} on the first call, then {"m", "v", "t"}.
    out: None, or C-contiguous arrays (w_new, m, v) shaped like w for the results;
    they may be w itself and the state's own m and v, which updates them in place
    (the same numbers, and no fresh memory each step).
    """
    xp = get_array_module(w)
    t = int(state.get("t", 0)) + 1
    m_old, v_old = state.get("m"), state.get("v")
    dt = w.dtype.type
    # Fold both bias corrections into one step size (a scalar) rather than two
    # extra full-size arrays.
    step = dt(lr * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t))
    if out is None:
        out = tuple(xp.empty(w.shape, dtype=w.dtype) for _ in range(3))  # C order: flat views
    w_new, m, v = out
    flat = [None if a is None else a.reshape(-1) for a in (w, dw, m_old, v_old, m, v, w_new)]
    # The rule is a dozen passes over arrays of up to millions of numbers. Done whole,
    # every pass streams them from memory; done a chunk at a time (on the CPU), each
    # chunk stays in the core's cache for all of them: 30% less time for the
    # coco-sized LSTM's parameters (docs/performance.md). A GPU takes each whole.
    chunk = _ADAM_CHUNK if xp is np else max(w.size, 1)
    s1, s2 = (xp.empty(min(chunk, w.size), dtype=w.dtype) for _ in range(2))
    for lo in range(0, w.size, chunk):
        rows = slice(lo, lo + chunk)
        w_c, dw_c, m_old_c, v_old_c, m_c, v_c, w_new_c = (
            None if a is None else a[rows] for a in flat)
        s, u = s1[:len(w_c)], s2[:len(w_c)]
        # m = b1 m + (1 - b1) dw;  v = b2 v + (1 - b2) dw^2;  w - step m / (sqrt(v) + eps),
        # with the same operations in the same order as those expressions (so the
        # same bits). Each result is written after the last read of what it may
        # overwrite (m over m_old, v over v_old, w_new over w).
        xp.multiply(dw_c, dt(1.0 - beta1), out=s)
        _scaled_or_zero(m_old_c, dt(beta1), m_c, xp)
        m_c += s
        xp.multiply(dw_c, dw_c, out=s)
        s *= dt(1.0 - beta2)
        _scaled_or_zero(v_old_c, dt(beta2), v_c, xp)
        v_c += s
        xp.sqrt(v_c, out=s)
        s += dt(eps)
        xp.multiply(m_c, step, out=u)
        u /= s
        xp.subtract(w_c, u, out=w_new_c)
    return w_new, {"m": m, "v": v, "t": t}


_ADAM_CHUNK = 32768  # numbers per chunk: the rule's arrays of it (nine at most) take 1.2 MB


def _scaled_or_zero(a, factor, out, xp):
    """out = a * factor, or zeros when there is no ``a`` yet (the first update)."""
    if a is None:
        out.fill(0)
    else:
        xp.multiply(a, factor, out=out)


RULES = {"adam": adam, "sgd": sgd_momentum}


def update_all(rule, params, grads, states, lr, in_place=False, **kwargs):
    """``rule`` on every parameter: ({name: new w}, {name: new state}). The loop the
    trainer and the bench share.

    in_place: Adam writes the new values over the parameters and their m and v
    (from its second step on, where they are contiguous and writable), for a caller
    that owns them: torch's optimizers work so, and fresh arrays cost memory
    traffic (the Transformer's update: 43 -> 32 ms, docs/performance.md).
    """
    done = {}
    for k in params:
        out = _own_arrays(params[k], states[k]) if in_place and rule is adam else None
        done[k] = rule(params[k], grads[k], states[k], lr=lr, **({"out": out} if out else {}), **kwargs)
    return {k: w for k, (w, _) in done.items()}, {k: st for k, (_, st) in done.items()}


def _own_arrays(w, state):
    """(w, m, v) when Adam can write its results over them, else None."""
    arrays = (w, state.get("m"), state.get("v"))
    if any(a is None or a.shape != w.shape or a.dtype != w.dtype
           or not (a.flags.c_contiguous and getattr(a.flags, "writeable", True)) for a in arrays):
        return None
    return arrays


def clip_by_global_norm(grads, max_norm):
    """Scale all gradients together so that their joint L2 norm is at most max_norm.

    grads: dict name -> array. Returns (new grads dict, the norm before clipping).
    max_norm <= 0 disables clipping.
    """
    total = 0.0
    for g in grads.values():
        xp = get_array_module(g)
        total += float(xp.vdot(g.ravel(), g.ravel()))
    norm = math.sqrt(total)
    if max_norm <= 0 or norm <= max_norm or not math.isfinite(norm):
        return dict(grads), norm
    scale = max_norm / (norm + 1e-12)
    return {k: g * g.dtype.type(scale) for k, g in grads.items()}, norm
