"""The homework's worked example (docs/worked-example.md), through rnncap's layers.

A vanilla RNN in column convention, h_t = tanh(W_hx x_t + W_hh h_{t-1} + b_h) and
y_t = W_hy h_t + b_y, with T = 2, scalar inputs x = [1, 2], zero biases and h0 = 0.
rnncap is row-major (``x @ Wx``), so the column-convention matrices go in transposed.

The handwritten notes give y1 = 0.277 and h2 = (0.744, -0.545); both are arithmetic
slips, and the last test pins down that the math does not give them.
"""
from __future__ import annotations

import numpy as np
import pytest

from rnncap.models.layers import rnn_forward, temporal_affine_forward

# Column convention, as in the notes.
W_HX = np.array([[0.5], [-0.3]])             # (H, D) = (2, 1)
W_HH = np.array([[0.1, 0.2], [0.4, 0.5]])    # (H, H)
W_HY = np.array([[0.6, 0.4]])                # (1, H)
XS = [1.0, 2.0]

# The correct values, to the 5 decimals of docs/worked-example.md.
H1, Y1 = (0.46212, -0.29131), 0.16075
H2, Y2 = (0.75649, -0.50858), 0.25046
# What the handwritten notes say.
NOTES_H1, NOTES_Y1, NOTES_H2 = (0.462, -0.291), 0.277, (0.744, -0.545)


def rnncap_example(Wh=W_HH.T):
    """h (T, H) and y (T,) from rnn_forward + temporal_affine_forward (N = 1)."""
    x = np.array(XS).reshape(1, 2, 1)        # (N, T, D)
    h0 = np.zeros((1, 2))
    h, _ = rnn_forward(x, h0, W_HX.T, Wh, np.zeros(2))
    y, _ = temporal_affine_forward(h, W_HY.T, np.zeros(1))
    return h[0], y[0, :, 0]


def column_example():
    """The same recurrence written literally in column convention."""
    h, hs, ys = np.zeros((2, 1)), [], []
    for x in XS:
        h = np.tanh(W_HX * x + W_HH @ h)
        hs.append(h[:, 0])
        ys.append((W_HY @ h).item())
    return np.array(hs), np.array(ys)


def test_rnncap_reproduces_the_correct_values():
    h, y = rnncap_example()
    np.testing.assert_allclose(h[0], H1, atol=5e-6)
    np.testing.assert_allclose(h[1], H2, atol=5e-6)
    np.testing.assert_allclose(y, [Y1, Y2], atol=5e-6)


def test_row_and_column_conventions_agree():
    h, y = rnncap_example()
    hc, yc = column_example()
    np.testing.assert_allclose(h, hc, rtol=1e-14)
    np.testing.assert_allclose(y, yc, rtol=1e-14)


def test_forgetting_to_transpose_W_hh_changes_h2():
    # W_hh is not symmetric, so the row-convention Wh must be W_hh^T.
    h, _ = rnncap_example(Wh=W_HH)
    np.testing.assert_allclose(h[0], H1, atol=5e-6)  # h0 = 0: step 1 cannot tell
    assert np.abs(h[1] - np.array(H2)).max() > 0.02


def test_the_notes_values_are_arithmetic_slips():
    h, y = rnncap_example()
    # h1 in the notes is right (to their 3 decimals) ...
    np.testing.assert_allclose(h[0], NOTES_H1, atol=5e-4)
    # ... but y1 = 0.6*h1[0] + 0.4*h1[1] is not 0.277: that is the first term alone.
    assert abs(y[0] - NOTES_Y1) > 0.1
    assert 0.6 * h[0, 0] == pytest.approx(NOTES_Y1, abs=1e-3)
    assert 0.4 * h[0, 1] == pytest.approx(Y1 - NOTES_Y1, abs=1e-3)
    # h2 = (0.744, -0.545) is off by 0.013 and 0.037: not rounding.
    assert np.abs(h[1] - np.array(NOTES_H2)).min() > 0.01
    # The notes' h2 needs pre-activations ~(0.959, -0.611); the math gives
    # 2*W_hx + W_hh h1 = (0.988, -0.561).
    a2 = 2 * W_HX[:, 0] + W_HH @ h[0]
    np.testing.assert_allclose(a2, [0.98795, -0.56081], atol=5e-6)
    np.testing.assert_allclose(np.arctanh(NOTES_H2), [0.959, -0.611], atol=1e-3)
