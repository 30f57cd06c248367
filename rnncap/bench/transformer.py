"""The Transformer's workload for ``rnncap bench --size transformer``, and its PyTorch twin.

The twin is the same captioner written the usual way in PyTorch: nn.Linear for the
memory, nn.Embedding, the sinusoidal table, nn.TransformerDecoder of
nn.TransformerDecoderLayer (post-norm, relu, batch first), nn.Linear for the scores;
rnncap's weights are copied in (rnncap's row-major W is torch's weight transposed; the
packed W_in is torch's in_proj_weight transposed). The tests use it as the float64
oracle of the whole model (tests/test_transformer_oracle.py), the benchmark times it
in float32 against rnncap's ``loss`` plus Adam, through rnncap.bench.measure.

Decoding is timed against a PyTorch greedy decoder that also caches: each layer's
memory keys and values are computed once, and every step appends its key and value
to the layer's cache and attends over it (``F.scaled_dot_product_attention``).
"""
from __future__ import annotations

import numpy as np

SIZES = {
    # Flickr8k shapes: EfficientNet-Lite0's 7x7 map (PCA 512), E 512, 8 heads, FFN 2048
    "transformer": dict(T=16, L=49, D=512, E=512, heads=8, layers=2, F=2048, V=2538),
    "tiny-transformer": dict(T=5, L=4, D=12, E=8, heads=2, layers=2, F=16, V=17),
}


def is_transformer(dims):
    return "heads" in dims


def shard_rows(dims, default):
    """The fewest rows per shard of the model's training step (the header's shard count)."""
    if not is_transformer(dims):
        return default
    from ..models.transformer import TransformerCaptioningModel

    return TransformerCaptioningModel._min_shard_rows


def build_rnncap(dims, seed, device="cpu", null_id=0, start_id=1, end_id=2, dtype=np.float32):
    """rnncap's Transformer for a size, without dropout (the twins must agree)."""
    from ..models.transformer import TransformerCaptioningModel

    return TransformerCaptioningModel(
        dims["V"], dims["D"], dims["E"], dims["heads"], dims["layers"], dims["F"],
        locations=dims.get("L", 0), null_id=null_id, start_id=start_id, end_id=end_id,
        dtype=dtype, seed=seed, dropout=0.0).to(device)


def step_flops(N, dims):
    """Matmul FLOPs of one dense training step (every position, as torch computes it):
    forward memory projection, per layer the self-attention (QKV, scores, weighted
    sum, output), the cross-attention (Q, memory KV, scores, sum, output) and the
    feed-forward block, and the vocabulary layer; backward twice the forward (the
    memory projection's input gradient is not needed)."""
    T, Lm, D, E, F, V, K = (dims[k] for k in ("T", "L", "D", "E", "F", "V", "layers"))
    rows, mrows = N * T, N * Lm
    per_layer = (2 * rows * E * 3 * E + 2 * 2 * N * T * T * E + 2 * rows * E * E      # self
                 + 2 * rows * E * E + 2 * mrows * E * 2 * E + 2 * 2 * N * T * Lm * E  # cross
                 + 2 * rows * E * E + 2 * 2 * rows * E * F)                          # out, FFN
    body = K * per_layer + 2 * rows * E * V
    return 3 * body + 2 * 2 * mrows * D * E


def build_torch(model, device="cpu"):
    """The PyTorch twin of a ``TransformerCaptioningModel`` with its weights copied in."""
    import torch

    # In the model's dtype before the weights go in (a float32 module would round them).
    tm = _twin_class()(model).to(dtype=torch.float64 if model.dtype == np.float64 else torch.float32)
    with torch.no_grad():
        p = {k: torch.from_numpy(np.ascontiguousarray(np.asarray(v))) for k, v in model.numpy_params().items()}
        tm.mem.weight.copy_(p["W_mem"].T)
        tm.mem.bias.copy_(p["b_mem"])
        if model.locations:
            tm.pos_mem.copy_(p["pos_mem"])
        tm.embed.weight.copy_(p["W_embed"])
        for i, layer in enumerate(tm.decoder.layers):
            q = {name: p[f"l{i}_{name}"] for name in _LAYER_NAMES}
            for attn, pre in ((layer.self_attn, "self"), (layer.multihead_attn, "cross")):
                attn.in_proj_weight.copy_(q[f"{pre}_W_in"].T)
                attn.in_proj_bias.copy_(q[f"{pre}_b_in"])
                attn.out_proj.weight.copy_(q[f"{pre}_W_out"].T)
                attn.out_proj.bias.copy_(q[f"{pre}_b_out"])
            layer.linear1.weight.copy_(q["W1"].T)
            layer.linear1.bias.copy_(q["b1"])
            layer.linear2.weight.copy_(q["W2"].T)
            layer.linear2.bias.copy_(q["b2"])
            for j, norm in enumerate((layer.norm1, layer.norm2, layer.norm3), start=1):
                norm.weight.copy_(q[f"norm{j}_g"])
                norm.bias.copy_(q[f"norm{j}_b"])
        tm.vocab.weight.copy_(p["W_vocab"].T)
        tm.vocab.bias.copy_(p["b_vocab"])
    return tm.to(device)


_LAYER_NAMES = ("self_W_in", "self_b_in", "self_W_out", "self_b_out", "cross_W_in", "cross_b_in",
                "cross_W_out", "cross_b_out", "W1", "b1", "W2", "b2",
                "norm1_g", "norm1_b", "norm2_g", "norm2_b", "norm3_g", "norm3_b")


def _twin_class():
    """The twin's nn.Module class (defined on first use: torch is imported lazily)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class TorchTransformerCaptioner(nn.Module):
        def __init__(self, model):
            super().__init__()
            E, h = model.embed_dim, model.num_heads
            self.E, self.h, self.null_id = E, h, model.null_id
            self.mem = nn.Linear(model.input_dim, E)
            self.pos_mem = nn.Parameter(torch.zeros(model.locations, E)) if model.locations else None
            self.embed = nn.Embedding(model.vocab_size, E)
            layer = nn.TransformerDecoderLayer(E, h, model.ffn_dim, dropout=model.dropout,
                                               batch_first=True)
            self.decoder = nn.TransformerDecoder(layer, model.num_layers)
            self.vocab = nn.Linear(E, model.vocab_size)

        def memory(self, features):
            m = self.mem(features if features.dim() == 3 else features.unsqueeze(1))
            return m if self.pos_mem is None else m + self.pos_mem

        def positions(self, start, T, like):
            pos = torch.arange(start, start + T, dtype=torch.float64).unsqueeze(1)
            angle = pos * 10000.0 ** (-torch.arange(0, self.E, 2, dtype=torch.float64) / self.E)
            pe = torch.zeros(T, self.E, dtype=torch.float64)
            pe[:, 0::2] = torch.sin(angle)
            pe[:, 1::2] = torch.cos(angle[:, :self.E // 2])
            return pe.to(dtype=like.dtype, device=like.device)

        def forward(self, features, captions_in):
            """Scores (N, T, V) of every position, causal self-attention."""
            T = captions_in.shape[1]
            x = self.embed(captions_in)
            x = x + self.positions(0, T, x)
            causal = torch.triu(torch.full((T, T), float("-inf"), dtype=x.dtype, device=x.device), 1)
            return self.vocab(self.decoder(x, self.memory(features), tgt_mask=causal))

        def greedy(self, features, max_length, start_id=1, end_id=2):
            """Greedy captions with a key/value cache: (N, max_length) ids, <NULL> after <END>."""
            with torch.inference_mode():
                N, E, h = features.shape[0], self.E, self.h
                mem = self.memory(features)
                cross = []
                for layer in self.decoder.layers:
                    a = layer.multihead_attn
                    k, v = F.linear(mem, a.in_proj_weight[E:], a.in_proj_bias[E:]).chunk(2, dim=-1)
                    cross.append((self._heads(k), self._heads(v)))
                cache = [None] * len(self.decoder.layers)
                words = torch.full((N,), start_id, dtype=torch.long, device=features.device)
                out = torch.full((N, max_length), self.null_id, dtype=torch.long)
                done = torch.zeros(N, dtype=torch.bool)
                for t in range(max_length):
                    x = self.embed(words).unsqueeze(1) + self.positions(t, 1, mem)
                    for i, layer in enumerate(self.decoder.layers):
                        a = layer.self_attn
                        q, k, v = (self._heads(z) for z in F.linear(x, a.in_proj_weight, a.in_proj_bias).chunk(3, dim=-1))
                        if cache[i] is not None:
                            k, v = torch.cat([cache[i][0], k], dim=2), torch.cat([cache[i][1], v], dim=2)
                        cache[i] = (k, v)
                        x = layer.norm1(x + a.out_proj(self._join(F.scaled_dot_product_attention(q, k, v))))
                        c = layer.multihead_attn
                        q = self._heads(F.linear(x, c.in_proj_weight[:E], c.in_proj_bias[:E]))
                        x = layer.norm2(x + c.out_proj(self._join(F.scaled_dot_product_attention(q, *cross[i]))))
                        x = layer.norm3(x + layer.linear2(F.relu(layer.linear1(x))))
                    words = self.vocab(x[:, 0]).argmax(dim=1)
                    w = words.cpu()
                    out[:, t] = torch.where(done, self.null_id, w)
                    done |= w == end_id
                    if bool(done.all()):
                        break
            return out.numpy()

        def _heads(self, x):
            N, S, E = x.shape
            return x.view(N, S, self.h, E // self.h).transpose(1, 2)

        def _join(self, x):
            N, h, S, d = x.shape
            return x.transpose(1, 2).reshape(N, S, h * d)

    return TorchTransformerCaptioner
