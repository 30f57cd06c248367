"""Time the LSTM captioner's training step and decoding against PyTorch.

One training step is forward, backward and an Adam update of the homework's COCO
model (T=16, D=512, W=256, H=512, V=1004, float32). The PyTorch side is the same
model written the usual way (nn.Linear, nn.Embedding, nn.LSTM, nn.Linear, masked
cross-entropy, torch.optim.Adam) and starts from the same weights, so the two first
losses must agree. Both run in this process, alternating step by step after a
warm-up; medians and spreads are reported. Decoding compares rnncap's greedy (and,
when present, beam) decoder with a PyTorch loop of the same algorithm.

Peak memory is measured in fresh subprocesses (one per framework and batch size): how
far the peak resident set rises over two training steps above the memory in use just
before them (model, batch and imports in place); see ``memory_probe``.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

from . import bench_transformer as transformer
from .backend import to_numpy, xp_for
from .errors import RnncapError

SIZES = {
    # the homework's COCO configuration
    "coco": dict(T=16, D=512, W=256, H=512, V=1004),
    # for smoke tests: every code path, no meaningful timing
    "tiny": dict(T=5, D=12, W=8, H=10, V=17),
    # the attention model (L locations of D channels, attention size A) as trained on
    # Flickr8k (docs/attention.md): EfficientNet-Lite0's 7x7 map
    "attention": dict(T=16, L=49, D=512, W=256, H=512, A=256, V=2538),
    "tiny-attention": dict(T=5, L=4, D=12, W=8, H=10, A=6, V=17),
    **transformer.SIZES,  # E 512, 8 heads, FFN 2048, 49 memory tokens (rnncap.bench_transformer)
}
NULL, START, END = 0, 1, 2
LR = 1e-3
PARTS = ("train", "decode", "memory", "gemm")


def add_arguments(parser):
    from .cli import positive_int

    def int_list(text):
        try:
            vals = [positive_int(v) for v in text.split(",") if v.strip()]
        except Exception:
            raise _arg_error(f"expected comma-separated positive integers, got {text!r}")
        if not vals:
            raise _arg_error("expected at least one batch size")
        return vals

    def part_list(text):
        vals = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in vals if v not in PARTS]
        if bad or not vals:
            raise _arg_error(f"unknown part(s) {bad or text!r}; choose from {','.join(PARTS)}")
        return vals

    parser.add_argument("--batch-sizes", type=int_list, default=[50, 128], metavar="N,N",
                        help="minibatch sizes to time (default: 50,128)")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed repetitions per measurement; the median is reported "
                             "(default: 15, or 3 with --quick)")
    parser.add_argument("--warmup", type=positive_int, default=None,
                        help="untimed repetitions first (default: 3, or 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="few repeats and no memory subprocesses: a fast sanity run")
    parser.add_argument("--parts", type=part_list, default=list(PARTS), metavar="P,P",
                        help=f"what to measure, from {','.join(PARTS)} (default: all)")
    parser.add_argument("--size", choices=sorted(SIZES), default="coco",
                        help="model size: coco (T=16 D=512 W=256 H=512 V=1004, the default) "
                             "or tiny (smoke tests only)")
    parser.add_argument("--full-length", action="store_true",
                        help="captions fill all T steps (no padding), so rnncap's skipping "
                             "of padded positions saves nothing: same work on both sides")
    parser.add_argument("--beam-size", type=positive_int, default=3,
                        help="beam width for the beam-search timing (default: 3)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="cpu: NumPy vs PyTorch CPU; gpu: CuPy vs PyTorch CUDA")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="threads for both NumPy's BLAS (needs threadpoolctl) and torch "
                             "(default: torch gets as many as NumPy's BLAS uses)")
    parser.add_argument("--no-torch", action="store_true",
                        help="time rnncap alone (no PyTorch comparison)")
    parser.add_argument("--seed", type=int, default=0, help="weights and data seed")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write every figure as JSON to PATH ('-' for stdout)")


def _arg_error(msg):
    import argparse

    return argparse.ArgumentTypeError(msg)


# ---- environment ------------------------------------------------------------------

def blas_info():
    """NumPy's BLAS library, kernel and thread count (via threadpoolctl if present)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return {"library": "unknown (threadpoolctl not installed)", "threads": os.cpu_count() or 1}
    for info in threadpool_info():
        if info.get("user_api") == "blas" and "numpy" in info.get("filepath", ""):
            return {"library": f"{info.get('internal_api')} {info.get('version')}",
                    "kernel": info.get("architecture"), "threads": int(info["num_threads"])}
    return {"library": "unknown", "threads": os.cpu_count() or 1}


def machine_info():
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("OPENBLAS_", "OMP_", "MKL_", "GOTO"))}
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": cpu,
            "cpu_count": os.cpu_count(), "loadavg": load, "python": platform.python_version(),
            "numpy": np.__version__, "blas": blas_info(), "blas_env": env}


# ---- the workload -------------------------------------------------------------------

def make_batch(N, dims, seed=0, full_length=False):
    """Random features (N, D) float32 and captions (N, T+1) int64: <START>, words,
    <END>, then <NULL> padding.

    Caption lengths follow real data: words per caption ~ N(11, 3.5) clipped to
    [1, T-1] (Flickr8k's training captions average 11.8 words, sd 3.9), so about a
    quarter of the T positions are padding, as in a COCO batch. ``full_length``: every
    caption fills all T positions (no padding at all).
    """
    rng = np.random.default_rng(seed)
    T, V = dims["T"], dims["V"]
    # (N, L, D) spatial maps for the attention model
    features = rng.standard_normal((N, *([dims["L"]] if "L" in dims else []), dims["D"])).astype(np.float32)
    captions = np.full((N, T + 1), NULL, dtype=np.int64)
    captions[:, 0] = START
    if full_length:
        lengths = np.full(N, T, dtype=np.int64)  # T words, no <END> within the window
    else:
        lengths = np.clip(np.rint(rng.normal(11.0, 3.5, size=N)), 1, T - 1).astype(np.int64)
    for i, n in enumerate(lengths):
        captions[i, 1:n + 1] = rng.integers(3, V, size=n)
        if n < T:
            captions[i, n + 1] = END
    return features, captions


def step_flops(N, dims, steps=None, scored=None):
    """Matmul FLOPs of one training step (elementwise work not counted).

    Forward: h0 projection, x@Wx, h@Wh, h@W_vocab. Backward: two matmuls for each,
    except the projection, whose input gradient is not needed. ``steps``: recurrent
    steps actually run (default N*T); ``scored``: positions scored against the
    vocabulary (default N*T). rnncap skips padding, so it does fewer of both.
    """
    if transformer.is_transformer(dims):
        return transformer.step_flops(N, dims)
    T, D, W, H, V = (dims[k] for k in "TDWHV")
    steps = N * T if steps is None else steps
    scored = N * T if scored is None else scored
    vocab = 2 * scored * H * V
    if "A" in dims:  # attention: init from the mean map, P = a @ W_att, and per step
        Lc, A = dims["L"], dims["A"]    # h @ Wh (gates, query, gate), x @ Wx, z @ Wz, e, z
        once = 2 * N * D * 2 * H + 2 * N * Lc * D * A
        recur = 2 * steps * (H * (4 * H + A + 1) + (W + D) * 4 * H + Lc * A + Lc * D)
        return 2 * once + 3 * (recur + vocab)
    proj = 2 * N * D * H
    recur = 2 * steps * (W + H) * 4 * H
    return 2 * proj + 3 * (recur + vocab)


def work_done(captions, dims):
    """(recurrent steps, scored positions) that rnncap's loss needs for a batch: every
    step up to a caption's last target word, and the positions with a target."""
    mask = captions[:, 1:] != NULL
    T = mask.shape[1]
    steps = np.where(mask.any(axis=1), T - mask[:, ::-1].argmax(axis=1), 0)
    return int(steps.sum()), int(mask.sum())


def build_rnncap(dims, seed, device="cpu"):
    from .models.model import CaptioningModel

    if transformer.is_transformer(dims):
        return transformer.build_rnncap(dims, seed, device, NULL, START, END)
    if "A" in dims:
        from .models.attention import AttentionCaptioningModel

        model = AttentionCaptioningModel(dims["V"], dims["D"], dims["W"], dims["H"],
                                         attention_dim=dims["A"], null_id=NULL, start_id=START,
                                         end_id=END, dtype=np.float32, seed=seed)
    else:
        model = CaptioningModel(dims["V"], dims["D"], dims["W"], dims["H"], cell_type="lstm",
                                null_id=NULL, start_id=START, end_id=END, dtype=np.float32,
                                seed=seed)
    return model.to(device)


def rnncap_trainer(model, lr=LR):
    """A training-step closure: model.loss, then rnncap.training.optim.adam on every parameter
    (the same loop the trainer runs)."""
    from .training.optim import adam

    states = {k: {} for k in model.params}
    params = model.params

    def step(features, captions):
        loss, grads = model.loss(features, captions)
        for k in params:
            params[k], states[k] = adam(params[k], grads[k], states[k], lr=lr)
        return loss

    return step


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


# ---- timing -------------------------------------------------------------------------

def _sync_for(device, with_torch=True):
    """Wait for queued GPU work (CuPy's, and torch's when it is in use); a no-op on
    the CPU."""
    if device != "gpu":
        return lambda: None
    import cupy

    torch_sync = lambda: None  # noqa: E731
    if with_torch:
        import torch

        torch_sync = torch.cuda.synchronize

    def sync():
        cupy.cuda.Device().synchronize()
        torch_sync()

    return sync


def time_alternating(fns, repeats, warmup, sync=lambda: None):
    """Call each function in turn, ``warmup`` untimed rounds then ``repeats`` timed
    ones, so that load from other processes hits every contender alike.
    Returns name -> list of seconds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def summarize(seconds):
    s = sorted(seconds)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
    return {"median_s": statistics.median(s), "min_s": s[0], "max_s": s[-1],
            "q1_s": q[0], "q3_s": q[2], "n": len(s)}


def gemm_peak(xp, n=2048, repeats=5, sync=lambda: None):
    """Best float32 GEMM rate (FLOP/s) of ``xp`` on an n x n x n product."""
    rng = np.random.default_rng(0)
    a = xp.asarray(rng.standard_normal((n, n)).astype(np.float32))
    b = xp.asarray(rng.standard_normal((n, n)).astype(np.float32))
    out = xp.empty((n, n), dtype=np.float32)
    xp.matmul(a, b, out=out)
    sync()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        xp.matmul(a, b, out=out)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


# ---- the measurements ---------------------------------------------------------------

def bench_train(N, dims, repeats, warmup, device="cpu", with_torch=True, seed=0,
                full_length=False):
    xp = xp_for(device)
    features, captions = make_batch(N, dims, seed, full_length)
    model = build_rnncap(dims, seed, device)
    fns, first = {}, {}
    f_x, c_x = xp.asarray(features), xp.asarray(captions)
    step = rnncap_trainer(model)
    fns["rnncap"] = lambda: step(f_x, c_x)
    if with_torch:
        import torch

        tdev = "cuda" if device == "gpu" else "cpu"
        tm = build_torch(model, tdev)
        tstep = torch_trainer(tm)
        f_t = torch.from_numpy(features).to(tdev)
        c_t = torch.from_numpy(captions).to(tdev)
        fns["torch"] = lambda: tstep(f_t, c_t)
        # Same weights, same batch: the first losses must agree (float32 rounding).
        first = {"torch": fns["torch"]()}
    first["rnncap"] = fns["rnncap"]()
    times = time_alternating(fns, repeats, warmup, _sync_for(device, with_torch))
    tokens = N * dims["T"]
    steps, scored = work_done(captions, dims)
    res = {"N": N, "tokens_per_step": tokens, "first_loss": first,
           "target_fraction": scored / tokens, "steps_fraction": steps / tokens,
           # dense: what the PyTorch step computes; rnncap: what rnncap computes
           "flops_per_step": {"dense": step_flops(N, dims),
                              "rnncap": step_flops(N, dims, steps, scored)}}
    for name, ts in times.items():
        s = summarize(ts)
        s["tokens_per_s"] = tokens / s["median_s"]
        res[name] = s
    if with_torch:
        res["ratio"] = res["torch"]["median_s"] / res["rnncap"]["median_s"]
        res["ratio_per_round"] = _paired_ratios(times["torch"], times["rnncap"])
    return res


def _paired_ratios(ref, ours):
    r = [a / b for a, b in zip(ref, ours)]
    s = sorted(r)
    return {"median": statistics.median(s), "min": s[0], "max": s[-1]}


def bench_decode(N, dims, repeats, warmup, beam_size, device="cpu", with_torch=True,
                 seed=0):
    """Greedy and beam decoding of N images, ``max_length`` = T, captions/s.

    The PyTorch greedy decoder is a plain torch loop of the same algorithm; the
    PyTorch beam search is rnncap's own ``beam_search`` driving a PyTorch model step
    (``TorchStepModel``), so both sides run identical search code.
    """
    from .inference import decoding

    xp = xp_for(device)
    features, _ = make_batch(N, dims, seed)
    model = build_rnncap(dims, seed, device)
    max_length = dims["T"]
    f_x = xp.asarray(features)
    beam = getattr(decoding, "beam_search", None)
    fns = {"rnncap greedy": lambda: decoding.greedy_decode(model, f_x, max_length=max_length)}
    with_torch = with_torch and "A" not in dims  # the attention twin is timed in training only
    if beam is not None:
        fns["rnncap beam"] = lambda: beam(model, f_x, beam_size=beam_size, max_length=max_length)
    res = {"N": N, "max_length": max_length, "beam_size": beam_size,
           "beam": "timed" if beam is not None else "rnncap.inference.decoding.beam_search not found"}
    if with_torch:
        import torch

        tdev = "cuda" if device == "gpu" else "cpu"
        tm = build_torch(model, tdev)
        f_t = torch.from_numpy(features).to(tdev)
        fns["torch greedy"] = lambda: torch_greedy(tm, f_t, max_length)
        ours, theirs = fns["rnncap greedy"](), fns["torch greedy"]()
        res["greedy_token_agreement"] = float((ours == theirs).mean())
        if beam is not None and not transformer.is_transformer(dims):  # the Transformer: greedy only
            tstep = TorchStepModel(tm, model)
            fns["torch beam"] = lambda: beam(tstep, f_x, beam_size=beam_size,
                                             max_length=max_length)
            ours, theirs = fns["rnncap beam"](), fns["torch beam"]()
            res["beam_caption_agreement"] = float(np.mean(
                [np.array_equal(a[0].ids, b[0].ids) for a, b in zip(ours, theirs)]))
    times = time_alternating(fns, repeats, warmup, _sync_for(device, with_torch))
    for name, ts in times.items():
        s = summarize(ts)
        s["captions_per_s"] = N / s["median_s"]
        res[name] = s
    for kind in ("greedy", "beam"):
        if f"torch {kind}" in res:
            res[f"{kind}_ratio"] = (res[f"torch {kind}"]["median_s"]
                                    / res[f"rnncap {kind}"]["median_s"])
            res[f"{kind}_ratio_per_round"] = _paired_ratios(times[f"torch {kind}"],
                                                            times[f"rnncap {kind}"])
    return res


def memory_probe(framework, N, size, seed=0, steps=2):
    """Run in a fresh process: build the model and the batch, then run ``steps``
    training steps and report how far the resident set's peak rose above its size
    before the steps (bytes): the activations, gradients and optimizer state.

    On Linux the peak is the kernel's VmHWM, reset just before the steps (so nothing
    earlier, such as an import, counts); elsewhere the growth of ``ru_maxrss``. For
    rnncap also the tracemalloc peak of one step (NumPy's allocations only).
    """
    import resource
    import tracemalloc

    dims = SIZES[size]
    features, captions = make_batch(N, dims, seed)
    model = build_rnncap(dims, seed)
    if framework == "torch":
        import torch

        step = torch_trainer(build_torch(model))
        features, captions = torch.from_numpy(features), torch.from_numpy(captions)
    else:
        step = rnncap_trainer(model)
    out = {}
    rss0 = _proc_status("VmRSS")
    if rss0 is not None and _reset_peak_rss():
        for _ in range(steps):
            step(features, captions)
        out["method"] = "VmHWM after clear_refs"
        out["peak_growth_bytes"] = _proc_status("VmHWM") - rss0
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(steps):
            step(features, captions)
        out["method"] = "ru_maxrss"
        out["peak_growth_bytes"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    if framework == "rnncap":
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        step(features, captions)
        out["tracemalloc_step_peak_bytes"] = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
    return out


def _proc_status(field):
    """A size field of /proc/self/status in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss():
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _run_memory_probe(framework, N, size, seed):
    code = ("import json, sys; from rnncap.bench import memory_probe; "
            f"print(json.dumps(memory_probe({framework!r}, {N}, {size!r}, {seed})))")
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=600)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the command --------------------------------------------------------------------

def run(args):
    limiter = None
    if args.threads:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            raise RnncapError("--threads needs the package threadpoolctl to set NumPy's BLAS "
                              "threads: pip install threadpoolctl")
        limiter = threadpool_limits(args.threads, user_api="blas")
    try:
        return _run(args)
    finally:
        if limiter is not None:
            limiter.restore_original_limits()


def _run(args):
    repeats = args.repeats or (3 if args.quick else 15)
    warmup = args.warmup or (1 if args.quick else 3)
    dims = SIZES[args.size]
    with_torch = not args.no_torch
    if args.device == "gpu":
        xp_for("gpu")  # a clear error when CuPy or the GPU is missing
    info = machine_info()
    threads = info["blas"]["threads"]
    if with_torch:
        try:
            import torch
        except ModuleNotFoundError:
            raise RnncapError("the comparison needs PyTorch (pip install 'rnncap[vision]'); "
                              "pass --no-torch to time rnncap alone")
        torch.set_num_threads(threads)
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if args.device == "gpu" and not torch.cuda.is_available():
            raise RnncapError("--device gpu: PyTorch sees no CUDA device; pass --no-torch "
                              "to time rnncap alone")
    results = {"machine": info, "size": args.size, "dims": dims, "device": args.device,
               "repeats": repeats, "warmup": warmup, "command": " ".join(sys.argv)}
    if args.device == "cpu":
        from .models.model import _MIN_DECODE_ROWS, _MIN_SHARD_ROWS, _shards

        rows = transformer.shard_rows(dims, _MIN_SHARD_ROWS)
        results["rnncap_shards"] = {N: len(_shards(N, np, rows)) for N in args.batch_sizes}
        results["rnncap_decode_shards"] = {N: len(_shards(N, np, _MIN_DECODE_ROWS)) for N in args.batch_sizes}
    _print_header(results)

    if "gemm" in args.parts:
        sync = _sync_for(args.device, with_torch)
        n = 128 if args.size.startswith("tiny") else 2048
        results["gemm_size"] = n
        results["gemm_flops"] = {"numpy" if args.device == "cpu" else "cupy":
                                 gemm_peak(xp_for(args.device), n, sync=sync)}
        if args.device == "cpu":
            from .models.model import _one_blas_thread

            with _one_blas_thread(np):
                results["gemm_flops"]["numpy 1 thread"] = gemm_peak(np, n)
        if with_torch:
            results["gemm_flops"]["torch"] = _torch_gemm_peak(args.device, n)
        print(f"float32 GEMM {n}^3, best of 5 (the best is the peak below): " + ", ".join(
            f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in results["gemm_flops"].items()))

    if "train" in args.parts:
        results["train"] = []
        print("\ntraining step (forward + backward + Adam), alternating, "
              f"median of {repeats} after {warmup} warm-up")
        for N in args.batch_sizes:
            r = bench_train(N, dims, repeats, warmup, args.device, with_torch, args.seed,
                            args.full_length)
            if results.get("gemm_flops"):  # the peak: the best GEMM rate measured here
                peak = max(results["gemm_flops"].values())
                r["flop_rate"] = {name: r["flops_per_step"]["rnncap" if name == "rnncap" else "dense"]
                                  / r[name]["median_s"] for name in ("rnncap", "torch") if name in r}
                r["share_of_peak"] = {name: rate / peak for name, rate in r["flop_rate"].items()}
            results["train"].append(r)
            _print_train(r)

    if "decode" in args.parts:
        results["decode"] = []
        print(f"\ndecoding (max_length={dims['T']}), alternating, median of {repeats}")
        for N in args.batch_sizes:
            r = bench_decode(N, dims, repeats, warmup, args.beam_size, args.device,
                             with_torch, args.seed)
            results["decode"].append(r)
            _print_decode(r)

    if "memory" in args.parts and not args.quick and args.device == "cpu":
        results["memory"] = []
        print("\npeak memory of 2 training steps over the memory before them (fresh "
              "subprocess each, peak RSS; tracemalloc: NumPy's allocations in 1 step)")
        for N in args.batch_sizes:
            r = {"N": N, "rnncap": _run_memory_probe("rnncap", N, args.size, args.seed)}
            if with_torch:
                r["torch"] = _run_memory_probe("torch", N, args.size, args.seed)
            results["memory"].append(r)
            _print_memory(r)

    results["loadavg_end"] = machine_info()["loadavg"]
    print(f"\nload average at the end: {_load(results['loadavg_end'])}")
    if args.json:
        text = json.dumps(results, indent=2, default=float)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 0


def _torch_gemm_peak(device, n=2048, repeats=5):
    import torch

    dev = "cuda" if device == "gpu" else "cpu"
    a = torch.randn(n, n, device=dev)
    b = torch.randn(n, n, device=dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    a @ b
    sync()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def _print_header(r):
    m = r["machine"]
    print(f"rnncap bench  {m['date']}  {m['cpu']} ({m['cpu_count']} CPUs, "
          f"load average {_load(m['loadavg'])})")
    b = m["blas"]
    print(f"numpy {m['numpy']}: {b.get('library')} kernel={b.get('kernel')} "
          f"threads={b['threads']}" + (f"  env {m['blas_env']}" if m["blas_env"] else ""))
    if "torch" in m:
        print(f"torch {m['torch']}: threads={m['torch_threads']}")
    print(f"size {r['size']} {r['dims']} float32, device {r['device']}")
    if "rnncap_shards" in r:
        print("rnncap runs BLAS single-threaded, a batch in shards side by side; training: "
              + ", ".join(f"N={n} {k} shard{'s' * (k > 1)}" for n, k in r["rnncap_shards"].items())
              + "; decoding: " + ", ".join(f"N={n} {k}" for n, k in r["rnncap_decode_shards"].items()))


def _load(loadavg):
    return "n/a" if loadavg is None else " ".join(f"{x:.1f}" for x in loadavg)


def _spread(s):
    return f"{s['median_s'] * 1e3:8.1f} ms [{s['min_s'] * 1e3:.1f}-{s['max_s'] * 1e3:.1f}]"


def _print_train(r):
    print(f"N={r['N']}: {100 * r['target_fraction']:.0f}% of positions have a target, "
          f"{100 * r['steps_fraction']:.0f}% need a recurrent step")
    for name in ("rnncap", "torch"):
        if name in r:
            s = r[name]
            extra = ""
            if name in r.get("flop_rate", {}):
                rate, share = r["flop_rate"][name], r["share_of_peak"][name]
                extra = f"  {rate / 1e9:.1f} GFLOP/s = {100 * share:.0f}% of peak"
            print(f"  {name:7s} {_spread(s)}  {s['tokens_per_s']:9.0f} tokens/s{extra}")
    if "ratio" in r:
        pr = r["ratio_per_round"]
        print(f"  ratio rnncap/torch throughput: {r['ratio']:.2f} (of medians); per round "
              f"{pr['median']:.2f} median, {pr['min']:.2f}-{pr['max']:.2f}; first losses "
              + ", ".join(f"{k} {v:.5f}" for k, v in r["first_loss"].items()))


def _print_decode(r):
    print(f"N={r['N']}:" + ("" if r["beam"] == "timed" else f"  (beam: {r['beam']})"))
    for name in ("rnncap greedy", "torch greedy", "rnncap beam", "torch beam"):
        if name in r:
            s = r[name]
            print(f"  {name:14s} {_spread(s)}  {s['captions_per_s']:9.0f} captions/s")
    if "greedy_ratio" in r:
        pr = r["greedy_ratio_per_round"]
        print(f"  greedy ratio rnncap/torch: {r['greedy_ratio']:.2f} (of medians); per round "
              f"{pr['median']:.2f} median, {pr['min']:.2f}-{pr['max']:.2f}; token agreement "
              f"{100 * r['greedy_token_agreement']:.1f}%")
    if "beam_ratio" in r:
        pr = r["beam_ratio_per_round"]
        print(f"  beam-{r['beam_size']} ratio rnncap/torch: {r['beam_ratio']:.2f} (of medians); per "
              f"round {pr['median']:.2f} median, {pr['min']:.2f}-{pr['max']:.2f}; same top caption "
              f"for {100 * r['beam_caption_agreement']:.1f}% of images")


def _print_memory(r):
    parts = []
    for name in ("rnncap", "torch"):
        if name in r:
            m = r[name]
            if "error" in m:
                parts.append(f"{name} failed: {m['error']}")
                continue
            t = (f", tracemalloc {m['tracemalloc_step_peak_bytes'] / 2**20:.0f} MiB"
                 if "tracemalloc_step_peak_bytes" in m else "")
            parts.append(f"{name} +{m['peak_growth_bytes'] / 2**20:.0f} MiB{t}")
    print(f"N={r['N']}: " + "; ".join(parts))
