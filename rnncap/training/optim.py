"""Optimizers as pure update rules, plus global-norm gradient clipping.

An update rule takes a parameter, its gradient and the rule's own state, and returns
the new parameter and the new state: ``(w, state) = rule(w, dw, state, lr=..)``. It
keeps no hidden state, so a checkpoint only has to save the returned state dicts.
Arguments are never written into.
"""
from __future__ import annotations

import math

from ..backend import get_array_module


def sgd_momentum(w, dw, state, lr, momentum=0.9):
    """SGD with (heavy-ball) momentum: v = momentum*v - lr*dw; w = w + v.

    state: {} on the first call, then {"v": array}.
    """
    v = state.get("v")
    v = -lr * dw if v is None else momentum * v - lr * dw
    v = v.astype(w.dtype, copy=False)
    return w + v, {"v": v}


def adam(w, dw, state, lr, beta1=0.9, beta2=0.999, eps=1e-8):
    """Adam (Kingma & Ba, 2015) with bias correction.

    state: {} on the first call, then {"m", "v", "t"}.
    """
    xp = get_array_module(w)
    t = int(state.get("t", 0)) + 1
    m = state.get("m")
    v = state.get("v")
    if m is None:
        m = xp.zeros_like(w)
        v = xp.zeros_like(w)
    dt = w.dtype.type
    # m = b1 m + (1 - b1) dw;  v = b2 v + (1 - b2) dw^2;  w - step m / (sqrt(v) + eps),
    # with the same operations in the same order as those expressions (so the same
    # bits), but three new arrays and one scratch instead of twelve temporaries: the
    # rule is memory-bound, and every fresh array costs its page faults.
    scratch = xp.multiply(dw, dt(1.0 - beta1))
    m = xp.multiply(m, dt(beta1))
    m += scratch
    xp.multiply(dw, dw, out=scratch)
    scratch *= dt(1.0 - beta2)
    v = xp.multiply(v, dt(beta2))
    v += scratch
    # Fold both bias corrections into one step size (a scalar) rather than two
    # extra full-size arrays.
    step = lr * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
    xp.sqrt(v, out=scratch)
    scratch += dt(eps)
    w_new = xp.multiply(m, dt(step))
    w_new /= scratch
    xp.subtract(w, w_new, out=w_new)
    return w_new, {"m": m, "v": v, "t": t}


RULES = {"adam": adam, "sgd": sgd_momentum}


def update_all(rule, params, grads, states, lr, **kwargs):
    """``rule`` on every parameter: ({name: new w}, {name: new state}). The loop the
    trainer and the bench share."""
    done = {k: rule(params[k], grads[k], states[k], lr=lr, **kwargs) for k in params}
    return {k: w for k, (w, _) in done.items()}, {k: st for k, (_, st) in done.items()}


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
