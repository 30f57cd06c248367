"""An outside oracle: PyTorch autograd in float64 on the same inputs.

rnncap stores weights row-major (``x @ Wx``) with LSTM gates ordered i, f, o, g;
torch.nn.LSTM stores ``weight_ih_l0`` (4H, D) and ``weight_hh_l0`` (4H, H), i.e.
transposed, with gates ordered i, f, g, o, and two biases that add up. The tests map
our weights into torch's layout and torch's gradients back; nothing of ours changes.
Agreement is required to 1e-10 (norm-relative, see ``gradcheck.rel_error``).
"""
from __future__ import annotations

import numpy as np
import pytest

from gradcheck import rel_error
from rnncap.models import layers as L
from rnncap.models.model import CaptioningModel

torch = pytest.importorskip("torch")

TOL = 1e-10


def t64(a, grad=True):
    return torch.tensor(np.asarray(a, dtype=np.float64), dtype=torch.float64,
                        requires_grad=grad)


def gate_perm(H):
    """Column indices of our (.., 4H) weights in torch's gate order i, f, g, o."""
    i, f, o, g = (np.arange(k * H, (k + 1) * H) for k in range(4))
    return np.concatenate([i, f, g, o])


def assert_close(ours, theirs, name):
    theirs = theirs.detach().numpy() if hasattr(theirs, "detach") else theirs
    err = rel_error(ours, theirs)
    assert err <= TOL, f"{name}: relative error {err:.2e}"


def _inputs(seed, N=3, T=5, D=4, H=6, k=1):
    r = np.random.default_rng(seed)
    return (r.standard_normal((N, T, D)), r.standard_normal((N, H)) * 0.5,
            r.standard_normal((D, k * H)) * 0.5, r.standard_normal((H, k * H)) * 0.4,
            r.standard_normal(k * H) * 0.3, r.standard_normal((N, T, H)))


@pytest.mark.parametrize("seed", [0, 1])
def test_rnn_matches_torch_nn_rnn(seed):
    x, h0, Wx, Wh, b, dh = _inputs(seed)
    H = h0.shape[1]
    h, cache = L.rnn_forward(x, h0, Wx, Wh, b)
    dx, dh0, dWx, dWh, db = L.rnn_backward(dh, cache)

    rnn = torch.nn.RNN(x.shape[2], H, nonlinearity="tanh", batch_first=True,
                       dtype=torch.float64)
    split = np.random.default_rng(seed + 10).standard_normal(H)  # b = b_ih + b_hh
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(torch.from_numpy(Wx.T.copy()))
        rnn.weight_hh_l0.copy_(torch.from_numpy(Wh.T.copy()))
        rnn.bias_ih_l0.copy_(torch.from_numpy(b - split))
        rnn.bias_hh_l0.copy_(torch.from_numpy(split))
    tx, th0 = t64(x), t64(h0[None])
    th, _ = rnn(tx, th0)
    (th * torch.from_numpy(dh)).sum().backward()

    assert_close(h, th, "h")
    assert_close(dx, tx.grad, "dx")
    assert_close(dh0, th0.grad[0], "dh0")
    assert_close(dWx, rnn.weight_ih_l0.grad.T, "dWx")
    assert_close(dWh, rnn.weight_hh_l0.grad.T, "dWh")
    assert_close(db, rnn.bias_ih_l0.grad, "db (via b_ih)")
    assert_close(db, rnn.bias_hh_l0.grad, "db (via b_hh)")


def test_rnn_step_matches_torch_ops():
    x, h0, Wx, Wh, b, dh = _inputs(2)
    x, dh = x[:, 0], dh[:, 0]
    h, cache = L.rnn_step_forward(x, h0, Wx, Wh, b)
    grads = L.rnn_step_backward(dh, cache)
    tin = [t64(a) for a in (x, h0, Wx, Wh, b)]
    th = torch.tanh(tin[0] @ tin[2] + tin[1] @ tin[3] + tin[4])
    (th * torch.from_numpy(dh)).sum().backward()
    assert_close(h, th, "next_h")
    for name, g, t in zip(["dx", "dprev_h", "dWx", "dWh", "db"], grads, tin):
        assert_close(g, t.grad, name)


def _torch_lstm(D, H, Wx, Wh, b, seed):
    """An nn.LSTM holding our weights (gate order and layout mapped)."""
    lstm = torch.nn.LSTM(D, H, batch_first=True, dtype=torch.float64)
    perm = gate_perm(H)
    split = np.random.default_rng(seed + 10).standard_normal(4 * H)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(torch.from_numpy(Wx[:, perm].T.copy()))
        lstm.weight_hh_l0.copy_(torch.from_numpy(Wh[:, perm].T.copy()))
        lstm.bias_ih_l0.copy_(torch.from_numpy(b[perm] - split))
        lstm.bias_hh_l0.copy_(torch.from_numpy(split))
    return lstm


def _from_torch_gates(g, H):
    """A gradient in torch's gate order/layout, back in ours: (4H, .) -> (., 4H)."""
    g = g.detach().numpy()
    out = np.empty_like(g.T if g.ndim == 2 else g)
    if g.ndim == 2:
        out[:, gate_perm(H)] = g.T
    else:
        out[gate_perm(H)] = g
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_lstm_matches_torch_nn_lstm(seed):
    x, h0, Wx, Wh, b, dh = _inputs(seed, k=4)
    N, T, D = x.shape
    H = h0.shape[1]
    h, cache = L.lstm_forward(x, h0, Wx, Wh, b)
    dx, dh0, dWx, dWh, db = L.lstm_backward(dh, cache)

    lstm = _torch_lstm(D, H, Wx, Wh, b, seed)
    tx, th0 = t64(x), t64(h0[None])
    tc0 = torch.zeros(1, N, H, dtype=torch.float64)  # ours starts from c0 = 0
    th, _ = lstm(tx, (th0, tc0))
    (th * torch.from_numpy(dh)).sum().backward()

    assert_close(h, th, "h")
    assert_close(dx, tx.grad, "dx")
    assert_close(dh0, th0.grad[0], "dh0")
    assert_close(dWx, _from_torch_gates(lstm.weight_ih_l0.grad, H), "dWx")
    assert_close(dWh, _from_torch_gates(lstm.weight_hh_l0.grad, H), "dWh")
    assert_close(db, _from_torch_gates(lstm.bias_ih_l0.grad, H), "db (via b_ih)")
    assert_close(db, _from_torch_gates(lstm.bias_hh_l0.grad, H), "db (via b_hh)")


def test_lstm_step_matches_torch_lstm_cell():
    x, h0, Wx, Wh, b, dh = _inputs(3, k=4)
    x, dh = x[:, 0], dh[:, 0]
    N, D = x.shape
    H = h0.shape[1]
    r = np.random.default_rng(4)
    c0, dc = r.standard_normal((N, H)), r.standard_normal((N, H))
    h, c, cache = L.lstm_step_forward(x, h0, c0, Wx, Wh, b)
    dx, dprev_h, dprev_c, dWx, dWh, db = L.lstm_step_backward(dh, dc, cache)

    cell = torch.nn.LSTMCell(D, H, dtype=torch.float64)
    perm = gate_perm(H)
    with torch.no_grad():
        cell.weight_ih.copy_(torch.from_numpy(Wx[:, perm].T.copy()))
        cell.weight_hh.copy_(torch.from_numpy(Wh[:, perm].T.copy()))
        cell.bias_ih.copy_(torch.from_numpy(b[perm]))
        cell.bias_hh.zero_()
    tx, th0, tc0 = t64(x), t64(h0), t64(c0)
    th, tc = cell(tx, (th0, tc0))
    ((th * torch.from_numpy(dh)).sum() + (tc * torch.from_numpy(dc)).sum()).backward()

    assert_close(h, th, "next_h")
    assert_close(c, tc, "next_c")
    assert_close(dx, tx.grad, "dx")
    assert_close(dprev_h, th0.grad, "dprev_h")
    assert_close(dprev_c, tc0.grad, "dprev_c")
    assert_close(dWx, _from_torch_gates(cell.weight_ih.grad, H), "dWx")
    assert_close(dWh, _from_torch_gates(cell.weight_hh.grad, H), "dWh")
    assert_close(db, _from_torch_gates(cell.bias_ih.grad, H), "db")


# ----------------------------------------------------------------------------------
# The whole model
# ----------------------------------------------------------------------------------

class TorchCaptioner(torch.nn.Module):
    """The captioning model written with torch.nn, holding a CaptioningModel's weights:
    nn.Linear features -> h0, nn.Embedding, nn.RNN / nn.LSTM, nn.Linear to the
    vocabulary, cross-entropy masked on <NULL>, summed over time and divided by N."""

    def __init__(self, m):
        super().__init__()
        p = {k: np.asarray(v, dtype=np.float64) for k, v in m.params.items()}
        (D, H), (V, W) = p["W_proj"].shape, p["W_embed"].shape
        self.null_id, self.H = m.null_id, H
        self.proj = torch.nn.Linear(D, H, dtype=torch.float64)
        self.embed = torch.nn.Embedding(V, W, dtype=torch.float64)
        self.lstm = m.cell_type == "lstm"
        rnn_cls = torch.nn.LSTM if self.lstm else torch.nn.RNN
        self.rnn = rnn_cls(W, H, batch_first=True, dtype=torch.float64)
        self.vocab = torch.nn.Linear(H, V, dtype=torch.float64)
        perm = gate_perm(H) if self.lstm else np.arange(H)
        with torch.no_grad():
            for param, value in [
                (self.proj.weight, p["W_proj"].T), (self.proj.bias, p["b_proj"]),
                (self.embed.weight, p["W_embed"]),
                (self.rnn.weight_ih_l0, p["Wx"][:, perm].T),
                (self.rnn.weight_hh_l0, p["Wh"][:, perm].T),
                (self.rnn.bias_ih_l0, p["b"][perm]),
                (self.vocab.weight, p["W_vocab"].T), (self.vocab.bias, p["b_vocab"]),
            ]:
                param.copy_(torch.from_numpy(np.ascontiguousarray(value)))
            self.rnn.bias_hh_l0.zero_()

    def forward(self, features, captions, label_smoothing=0.0):
        captions = torch.from_numpy(captions)
        cin, cout = captions[:, :-1], captions[:, 1:]
        h0 = self.proj(torch.from_numpy(features))[None]
        x = self.embed(cin)
        state = (h0, torch.zeros_like(h0)) if self.lstm else h0
        h, _ = self.rnn(x, state)
        scores = self.vocab(h)
        ce = torch.nn.functional.cross_entropy(
            scores.reshape(-1, scores.shape[-1]), cout.reshape(-1), reduction="none",
            label_smoothing=label_smoothing)
        mask = (cout.reshape(-1) != self.null_id).to(ce.dtype)
        return (ce * mask).sum() / captions.shape[0]

    def grads(self):
        """Gradients keyed and laid out like CaptioningModel.params."""
        perm_back = (lambda g: _from_torch_gates(g, self.H)) if self.lstm else \
            (lambda g: g.detach().numpy().T if g.ndim == 2 else g.detach().numpy())
        return {
            "W_proj": self.proj.weight.grad.numpy().T, "b_proj": self.proj.bias.grad.numpy(),
            "W_embed": self.embed.weight.grad.numpy(),
            "Wx": perm_back(self.rnn.weight_ih_l0.grad),
            "Wh": perm_back(self.rnn.weight_hh_l0.grad),
            "b": perm_back(self.rnn.bias_ih_l0.grad),
            "W_vocab": self.vocab.weight.grad.numpy().T,
            "b_vocab": self.vocab.bias.grad.numpy(),
        }


def _batch(seed, N=4, T=7, V=15, D=9):
    r = np.random.default_rng(seed)
    feats = r.standard_normal((N, D))
    caps = r.integers(3, V, size=(N, T + 1))
    caps[:, 0] = 1
    for i, n in enumerate([T - 1, 2, 4, 1][:N]):  # <END>, then <NULL> padding
        caps[i, n + 1] = 2
        caps[i, n + 2:] = 0
    caps[0, 3] = caps[1, 1]  # a repeated word, for the embedding gradient
    return feats, caps


@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_model_loss_and_gradients_match_torch(cell, label_smoothing):
    V, D = 15, 9
    m = CaptioningModel(V, D, 6, 5, cell_type=cell, dtype=np.float64, seed=3,
                        label_smoothing=label_smoothing)
    r = np.random.default_rng(7)
    for k, v in m.params.items():  # move every parameter (biases too) off zero
        m.params[k] = v + 0.2 * r.standard_normal(v.shape)
    feats, caps = _batch(1, V=V, D=D)
    loss, grads = m.loss(feats, caps)

    tm = TorchCaptioner(m)
    tloss = tm(feats, caps, label_smoothing)
    tloss.backward()
    assert abs(loss - tloss.item()) <= TOL * abs(loss), (loss, tloss.item())
    tgrads = tm.grads()
    assert set(tgrads) == set(grads)
    for k in grads:
        assert_close(grads[k], tgrads[k], k)
