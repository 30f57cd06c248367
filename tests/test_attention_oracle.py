"""An outside oracle for the attention model: its PyTorch twin (rnncap.bench.peers, the
benchmark's peer: nn.Linear, nn.LSTMCell, autograd) in float64 on the same weights
and batch. Loss and every gradient must agree to 1e-10 (norm-relative)."""
from __future__ import annotations

import numpy as np
import pytest

from gradcheck import rel_error
from rnncap.models.attention import AttentionCaptioningModel

torch = pytest.importorskip("torch")
from rnncap.bench.peers import _gate_order, build_torch_attention, torch_loss  # noqa: E402

TOL = 1e-10


def _batch(seed, N=4, T=6, V=13, L=5, D=7):
    r = np.random.default_rng(seed)
    maps = r.standard_normal((N, L, D))
    caps = np.zeros((N, T + 1), np.int64)
    for i, n in enumerate([T, 2, 4, T - 1][:N]):  # one caption fills the row, none is empty
        caps[i, 0] = 1
        caps[i, 1:n + 1] = r.integers(3, V, size=n)
        if n < T:
            caps[i, n + 1] = 2
    return maps, caps


@pytest.mark.parametrize("reg", [0.0, 1.0])
def test_attention_model_loss_and_gradients_match_torch(reg):
    maps, caps = _batch(0)
    m = AttentionCaptioningModel(13, 7, 5, 6, attention_dim=4, attention_reg=reg, dtype=np.float64, seed=3)
    r = np.random.default_rng(9)
    for k, v in m.params.items():  # off the initialisation, so no gradient is 0 by construction
        m.params[k] = v + 0.1 * r.standard_normal(v.shape)
    loss, grads = m.loss(maps, caps)

    tm = build_torch_attention(m).double()
    t_loss = torch_loss(tm, torch.from_numpy(caps[:, :-1]), torch.from_numpy(caps[:, 1:]),
                        torch.from_numpy(maps))
    t_loss.backward()
    assert abs(loss - t_loss.item()) <= TOL * abs(loss)

    H, W = m.hidden_dim, m.wordvec_dim
    inv = torch.argsort(_gate_order(H))  # torch's gate rows back to rnncap's order
    g = lambda t: t.grad.detach().numpy()  # noqa: E731
    ih = g(tm.cell.weight_ih)[inv.numpy()].T
    theirs = {
        "W_init": g(tm.init.weight).T, "b_init": g(tm.init.bias),
        "W_att": g(tm.encoder_att.weight).T, "w_att": g(tm.full_att.weight)[0],
        "W_embed": g(tm.embed.weight), "Wx": ih[:W], "Wz": ih[W:],
        "Wh": np.concatenate([g(tm.cell.weight_hh)[inv.numpy()].T, g(tm.decoder_att.weight).T,
                              g(tm.f_beta.weight).T], axis=1),
        "bh": np.concatenate([g(tm.cell.bias_hh)[inv.numpy()], g(tm.decoder_att.bias), g(tm.f_beta.bias)]),
        "W_vocab": g(tm.vocab.weight).T, "b_vocab": g(tm.vocab.bias),
    }
    assert set(theirs) == set(grads)
    for k, v in theirs.items():
        err = rel_error(grads[k], v)
        assert err <= TOL, f"{k}: relative error {err:.2e}"
