"""What ``rnncap bench`` measures: the model sizes, a batch shaped like real captions,
the matmul FLOPs of a training step, and rnncap's side of the contest (the model and
its training step, the same loop the trainer runs).

The PyTorch side is in rnncap.bench.peers; the Transformer's sizes, FLOPs and twin are
in rnncap.bench.transformer, which this module consults for that model.
"""
from __future__ import annotations

import numpy as np

from . import transformer

SIZES = {
    # the homework's COCO configuration
    "coco": dict(T=16, D=512, W=256, H=512, V=1004),
    # for smoke tests: every code path, no meaningful timing
    "tiny": dict(T=5, D=12, W=8, H=10, V=17),
    # the attention model (L locations of D channels, attention size A) as trained on
    # Flickr8k (docs/attention.md): EfficientNet-Lite0's 7x7 map
    "attention": dict(T=16, L=49, D=512, W=256, H=512, A=256, V=2538),
    "tiny-attention": dict(T=5, L=4, D=12, W=8, H=10, A=6, V=17),
    # the README's attention model on the last block's maps, at each grid of issue 21:
    # EfficientNet-Lite0 at 224 px (7x7, 320 channels) and at 448 px (14x14), Lite2 at
    # its own 260 px (9x9, 352 channels)
    "attention-7x7": dict(T=16, L=49, D=320, W=512, H=512, A=256, V=2538),
    "attention-9x9": dict(T=16, L=81, D=352, W=512, H=512, A=256, V=2538),
    "attention-14x14": dict(T=16, L=196, D=320, W=512, H=512, A=256, V=2538),
    **transformer.SIZES,  # E 512, 8 heads, FFN 2048, 49 memory tokens (rnncap.bench.transformer)
}
NULL, START, END = 0, 1, 2
LR = 1e-3


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
    from ..models.model import CaptioningModel

    if transformer.is_transformer(dims):
        return transformer.build_rnncap(dims, seed, device, NULL, START, END)
    if "A" in dims:
        from ..models.attention import AttentionCaptioningModel

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
    (``update_all`` in place, as the trainer runs it)."""
    from ..training.optim import adam, update_all

    states = {k: {} for k in model.params}
    params = model.params

    def step(features, captions):
        nonlocal states
        loss, grads = model.loss(features, captions)
        new_params, states = update_all(adam, params, grads, states, lr, in_place=True)
        params.update(new_params)
        return loss

    return step
