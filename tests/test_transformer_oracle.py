"""An outside oracle for the Transformer captioner: its PyTorch twin
(rnncap.bench.transformer: nn.TransformerDecoder of nn.TransformerDecoderLayer,
nn.MultiheadAttention inside, autograd) in float64 on the same weights and batch.
The loss and every gradient must agree to 1e-10 (norm-relative); so must the
scores of the course-style forward pass, and the twin's own cached greedy decoder
must give rnncap's captions."""
from __future__ import annotations

import numpy as np
import pytest

from gradcheck import rel_error
from rnncap.models.transformer import TransformerCaptioningModel

torch = pytest.importorskip("torch")
from rnncap.bench.peers import torch_loss  # noqa: E402
from test_attention_oracle import _batch as attention_batch  # noqa: E402
from rnncap.bench.transformer import build_torch  # noqa: E402

TOL = 1e-10
V, D, E, NH, F = 13, 7, 8, 2, 12


def _batch(seed, N=4, T=6, L=0):
    """The attention oracle's batch; L = 0: pooled features (N, D)."""
    maps, caps = attention_batch(seed, N=N, T=T, V=V, L=max(L, 1), D=D)
    return (maps if L else maps[:, 0]), caps


def _model(L, layers=2):
    m = TransformerCaptioningModel(V, D, E, NH, layers, F, locations=L, dtype=np.float64, seed=3,
                                   dropout=0.0)
    r = np.random.default_rng(9)
    for k, v in m.params.items():  # off the initialisation, so no gradient is 0 by construction
        m.params[k] = v + 0.1 * r.standard_normal(v.shape)
    return m


@pytest.mark.parametrize("L", [0, 5], ids=["pooled", "spatial"])
def test_transformer_loss_and_gradients_match_torch(L):
    feats, caps = _batch(0, L=L)
    m = _model(L)
    loss, grads = m.loss(feats, caps)

    tm = build_torch(m)
    t_loss = torch_loss(tm, torch.from_numpy(caps[:, :-1]), torch.from_numpy(caps[:, 1:]),
                        torch.from_numpy(feats))
    t_loss.backward()
    assert abs(loss - t_loss.item()) <= TOL * abs(loss)
    t = {"W_mem": tm.mem.weight.grad.T, "b_mem": tm.mem.bias.grad, "W_embed": tm.embed.weight.grad,
         "W_vocab": tm.vocab.weight.grad.T, "b_vocab": tm.vocab.bias.grad}
    if L:
        t["pos_mem"] = tm.pos_mem.grad
    for i, layer in enumerate(tm.decoder.layers):
        for attn, pre in ((layer.self_attn, "self"), (layer.multihead_attn, "cross")):
            t[f"l{i}_{pre}_W_in"] = attn.in_proj_weight.grad.T
            t[f"l{i}_{pre}_b_in"] = attn.in_proj_bias.grad
            t[f"l{i}_{pre}_W_out"] = attn.out_proj.weight.grad.T
            t[f"l{i}_{pre}_b_out"] = attn.out_proj.bias.grad
        t[f"l{i}_W1"], t[f"l{i}_b1"] = layer.linear1.weight.grad.T, layer.linear1.bias.grad
        t[f"l{i}_W2"], t[f"l{i}_b2"] = layer.linear2.weight.grad.T, layer.linear2.bias.grad
        for j, norm in enumerate((layer.norm1, layer.norm2, layer.norm3), start=1):
            t[f"l{i}_norm{j}_g"], t[f"l{i}_norm{j}_b"] = norm.weight.grad, norm.bias.grad
    assert set(t) == set(grads)
    errors = {k: rel_error(grads[k], t[k].numpy()) for k in grads}
    assert max(errors.values()) <= TOL, {k: e for k, e in errors.items() if e > TOL}

    with torch.no_grad():
        want = tm(torch.from_numpy(feats), torch.from_numpy(caps[:, :-1])).numpy()
    assert rel_error(m.scores(feats, caps[:, :-1]), want) <= TOL


@pytest.mark.parametrize("L", [0, 5], ids=["pooled", "spatial"])
def test_the_twins_cached_greedy_decoder_gives_rnncaps_captions(L):
    from rnncap.inference.decoding import greedy_decode

    feats, _ = _batch(1, N=6, L=L)
    m = _model(L)
    m.params["b_vocab"][2] -= 1.0  # longer captions
    ours = greedy_decode(m, feats, max_length=7)
    theirs = build_torch(m).greedy(torch.from_numpy(feats), 7)
    np.testing.assert_array_equal(ours, theirs)
