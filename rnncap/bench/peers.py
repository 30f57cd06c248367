"""The PyTorch peers of rnncap's captioners, written the way PyTorch code usually is,
with rnncap's weights copied in so that both sides compute the same thing.

``rnncap bench`` times them against rnncap (rnncap.bench.measure); the oracle tests use
them in float64 as an outside check of every loss and gradient. The LSTM twin is
nn.Linear, nn.Embedding, nn.LSTM, nn.Linear; the attention twin is the usual
Show-Attend-Tell loop over nn.LSTMCell; the Transformer's twin is in
rnncap.bench.transformer. For decoding: a torch greedy loop, and ``TorchStepModel``,
which lets rnncap's own beam search drive a torch model step.
"""
from __future__ import annotations

import numpy as np

from ..backend import to_numpy
from . import transformer
from .workloads import END, LR, NULL, START


def _gate_order(H):
    """rnncap orders the LSTM gates i, f, o, g; torch orders them i, f, g, o."""
    import torch

    return torch.cat([torch.arange(0, 2 * H), torch.arange(3 * H, 4 * H), torch.arange(2 * H, 3 * H)])


def build_torch(model, device="cpu"):
    """The same captioner in idiomatic PyTorch, with rnncap's weights copied in."""
    import torch
    from torch import nn

    if hasattr(model, "attention_dim"):
        return build_torch_attention(model, device)
    if hasattr(model, "num_heads"):
        return transformer.build_torch(model, device)
    p = {k: torch.from_numpy(to_numpy(v).copy()) for k, v in model.params.items()}
    V, D, W, H = model.vocab_size, model.input_dim, model.wordvec_dim, model.hidden_dim

    class TorchCaptioner(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(D, H)
            self.embed = nn.Embedding(V, W)
            self.lstm = nn.LSTM(W, H, batch_first=True)
            self.vocab = nn.Linear(H, V)

        def forward(self, features, captions_in):
            h0 = self.proj(features).unsqueeze(0)
            h, _ = self.lstm(self.embed(captions_in), (h0, torch.zeros_like(h0)))
            return self.vocab(h)

    tm = TorchCaptioner().to(p["Wx"].dtype)
    order = _gate_order(H)
    with torch.no_grad():
        tm.proj.weight.copy_(p["W_proj"].T)
        tm.proj.bias.copy_(p["b_proj"])
        tm.embed.weight.copy_(p["W_embed"])
        tm.lstm.weight_ih_l0.copy_(p["Wx"].T[order])
        tm.lstm.weight_hh_l0.copy_(p["Wh"].T[order])
        tm.lstm.bias_ih_l0.copy_(p["b"][order])
        tm.lstm.bias_hh_l0.zero_()
        tm.vocab.weight.copy_(p["W_vocab"].T)
        tm.vocab.bias.copy_(p["b_vocab"])
    return tm.to(device)


def build_torch_attention(model, device="cpu"):
    """The attention captioner the way PyTorch Show-Attend-Tell code is usually
    written (nn.Linear for the init, the encoder and decoder attention projections
    and the gate, nn.LSTMCell over [word, gated context], a time loop over the rows
    still running, longest first), with rnncap's weights copied in. forward returns
    (scores (N, T, V), alphas (N, T, L)), zeros past each caption's end."""
    import torch
    from torch import nn

    p = {k: torch.from_numpy(to_numpy(v).copy()) for k, v in model.params.items()}
    V, D, W, H, A = (model.vocab_size, model.input_dim, model.wordvec_dim, model.hidden_dim,
                     model.attention_dim)

    class TorchAttentionCaptioner(nn.Module):
        def __init__(self):
            super().__init__()
            self.init = nn.Linear(D, 2 * H)              # h0 | c0
            self.encoder_att = nn.Linear(D, A, bias=False)
            self.decoder_att = nn.Linear(H, A)
            self.full_att = nn.Linear(A, 1, bias=False)
            self.f_beta = nn.Linear(H, 1)
            self.embed = nn.Embedding(V, W)
            self.cell = nn.LSTMCell(W + D, H)
            self.vocab = nn.Linear(H, V)

        def forward(self, maps, captions_in, lengths):
            N, T = captions_in.shape
            order = torch.argsort(lengths, descending=True, stable=True)
            a, words, lengths = maps[order], captions_in[order], lengths[order]
            h, c = torch.tanh(self.init(a.mean(dim=1))).chunk(2, dim=1)
            att_a = self.encoder_att(a)
            x = self.embed(words)
            scores = maps.new_zeros(N, T, V)
            alphas = maps.new_zeros(N, T, a.shape[1])
            for t in range(T):
                n = int((lengths > t).sum())
                if n == 0:
                    break
                e = self.full_att(torch.tanh(att_a[:n] + self.decoder_att(h[:n]).unsqueeze(1))).squeeze(2)
                alpha = torch.softmax(e, dim=1)
                z = (alpha.unsqueeze(2) * a[:n]).sum(dim=1)
                z = torch.sigmoid(self.f_beta(h[:n])) * z
                h, c = self.cell(torch.cat([x[:n, t], z], dim=1), (h[:n], c[:n]))
                scores[:n, t] = self.vocab(h)
                alphas[:n, t] = alpha
            inv = torch.argsort(order)
            return scores[inv], alphas[inv]

    tm = TorchAttentionCaptioner().to(p["Wx"].dtype)
    order = _gate_order(H)
    with torch.no_grad():
        tm.init.weight.copy_(p["W_init"].T)
        tm.init.bias.copy_(p["b_init"])
        tm.encoder_att.weight.copy_(p["W_att"].T)
        tm.decoder_att.weight.copy_(p["Wh"][:, 4 * H:4 * H + A].T)
        tm.decoder_att.bias.copy_(p["bh"][4 * H:4 * H + A])
        tm.full_att.weight.copy_(p["w_att"][None, :])
        tm.f_beta.weight.copy_(p["Wh"][:, -1:].T)
        tm.f_beta.bias.copy_(p["bh"][-1:])
        tm.embed.weight.copy_(p["W_embed"])
        tm.cell.weight_ih.copy_(torch.cat([p["Wx"], p["Wz"]]).T[order])
        tm.cell.weight_hh.copy_(p["Wh"][:, :4 * H].T[order])
        tm.cell.bias_ih.zero_()
        tm.cell.bias_hh.copy_(p["bh"][:4 * H][order])
        tm.vocab.weight.copy_(p["W_vocab"].T)
        tm.vocab.bias.copy_(p["b_vocab"])
    tm.attention_reg = model.attention_reg
    return tm.to(device)


def torch_loss(tm, captions_in, target, features):
    """The masked cross-entropy (summed, divided by N) of a torch twin, plus for the
    attention twin its doubly stochastic penalty over the real steps."""
    import torch
    import torch.nn.functional as F

    mask = target != NULL
    N = target.shape[0]
    if hasattr(tm, "attention_reg"):
        lengths = torch.where(mask.any(dim=1), mask.shape[1] - mask.flip(1).int().argmax(dim=1), 0)
        scores, alphas = tm(features, captions_in, lengths)
        gap = 1.0 - (alphas * mask.unsqueeze(2)).sum(dim=1)
        penalty = tm.attention_reg * (gap * gap * mask.any(dim=1, keepdim=True)).sum() / N
    else:
        scores, penalty = tm(features, captions_in), 0.0
    return F.cross_entropy(scores.reshape(-1, scores.shape[-1]), target.reshape(-1),
                           ignore_index=NULL, reduction="sum") / N + penalty


def torch_trainer(tm, lr=LR):
    import torch

    opt = torch.optim.Adam(tm.parameters(), lr=lr)

    def step(features, captions):
        # Masked cross-entropy: <NULL> targets are ignored; summed, divided by N.
        loss = torch_loss(tm, captions[:, :-1], captions[:, 1:], features)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def torch_greedy(tm, features, max_length):
    """Greedy decoding in PyTorch, step for step the algorithm of
    rnncap.inference.decoding.greedy_decode (stop once every caption has emitted <END>)."""
    import torch

    if hasattr(tm, "greedy"):  # the Transformer twin's decoder, with its key/value cache
        return tm.greedy(features, max_length, START, END)
    with torch.inference_mode():
        cell = _torch_cell(tm)
        N = features.shape[0]
        h = tm.proj(features)
        c = torch.zeros_like(h)
        words = torch.full((N,), START, dtype=torch.long, device=features.device)
        out = torch.full((N, max_length), NULL, dtype=torch.long)
        done = torch.zeros(N, dtype=torch.bool)
        for t in range(max_length):
            h, c = cell(tm.embed(words), (h, c))
            words = tm.vocab(h).argmax(dim=1)
            w = words.cpu()
            out[:, t] = torch.where(done, NULL, w)
            done |= w == END
            if bool(done.all()):
                break
    return out.numpy()


def _torch_cell(tm):
    """An nn.LSTMCell sharing the nn.LSTM's weights (cached on the module)."""
    import torch

    cell = getattr(tm, "_bench_cell", None)
    if cell is None:
        lstm = tm.lstm
        cell = torch.nn.LSTMCell(lstm.input_size, lstm.hidden_size).to(lstm.weight_ih_l0.device)
        cell.weight_ih = lstm.weight_ih_l0
        cell.weight_hh = lstm.weight_hh_l0
        cell.bias_ih = lstm.bias_ih_l0
        cell.bias_hh = lstm.bias_hh_l0
        object.__setattr__(tm, "_bench_cell", cell)
    return cell


class TorchStepModel:
    """The decoder-facing part of ``CaptioningModel`` (``xp``, ``init_state``,
    ``step`` and the special ids) with the per-step math done by PyTorch.

    Handing this to ``rnncap.inference.decoding.beam_search`` gives a PyTorch beam search that
    is the same algorithm line for line: only the model step differs. Arrays cross
    without copies (``torch.from_numpy`` / DLPack on a GPU).
    """

    def __init__(self, tm, model):
        self.tm, self.xp = tm, model.xp
        self.start_id, self.end_id, self.null_id = model.start_id, model.end_id, model.null_id
        self.cell = _torch_cell(tm)

    def _in(self, a):
        import torch

        return torch.from_numpy(a) if self.xp is np else torch.from_dlpack(a)

    def _out(self, t):
        return t.numpy() if self.xp is np else self.xp.from_dlpack(t)

    def init_state(self, features):
        import torch

        with torch.no_grad():
            h = self.tm.proj(self._in(self.xp.asarray(features, dtype=np.float32)))
            return self._out(h), self._out(torch.zeros_like(h))

    def step(self, words, state):
        import torch

        with torch.no_grad():
            x = self.tm.embed(self._in(self.xp.ascontiguousarray(words)))
            h, c = self.cell(x, tuple(self._in(self.xp.ascontiguousarray(s)) for s in state))
            return self._out(self.tm.vocab(h)), (self._out(h), self._out(c))
