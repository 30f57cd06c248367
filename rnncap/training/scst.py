"""Self-critical sequence training: fine-tune a captioner on CIDEr-D itself.

After cross-entropy training, a captioner is tuned on the metric it is judged by
(Rennie et al. 2017, "Self-critical sequence training for image captioning"). For each
image the model draws K captions from its own softmax; each gets a reward, its CIDEr-D
against the image's train references (document frequencies from all train references,
``<END>`` scored as a word, so that stopping at the right place pays); the gradient is
the policy gradient

    loss = -sum_samples (r - b) * sum_{t <= <END>} log p(w_t | w_<t, image)

with the baseline b of a sample the mean reward of the image's other K - 1 samples
(Luo 2020, "A better variant of self-critical sequence training"), or, as an option,
the reward of the image's greedy caption (Rennie et al.'s own baseline).

The policy starts as the cross-entropy model's softmax at a temperature T (default
0.5 for the h0 models and the Transformer, 1 for the attention model, as val chose): the output layer is
divided by T once, at the start, so the model stays a model of its kind, its greedy
captions are unchanged, and its samples are surer; from then on every caption is drawn
from the model's own softmax.

Read top to bottom: the rewards' references; ``ScstObjective``, which wraps a captioner
in the model contract (``params``, ``loss(X, y)``; y are image rows, not captions) so
that the generic ``rnncap.training.trainer.Trainer`` runs the stage unchanged; then the stage
behind ``rnncap train --scst --init CKPT``.

The objective touches the model only through ``init_state``/``step`` (by way of
``rnncap.inference.decoding``) and ``loss(..., token_weights=...)``, so it works for every model
with the contract (the RNN, the LSTM, the attention model).
"""
from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import numpy as np

from ..errors import RnncapError

BASELINES = ("mean", "greedy")
SAMPLE_GROUP = 16  # at most this many images' captions per generator; groups run side by side


def reward_references(references, end_token):
    """Each image's reference strings as token lists ending in ``end_token``: the
    reference sets rewards are scored against (and take document frequencies from)."""
    from ..data.vocab import tokenize

    return [[tokenize(r) + [end_token] for r in refs] for refs in references]


class ScstObjective:
    """The model contract around a captioner, for self-critical training.

    ``loss(features, images)``: features (N, ...) of N images and ``images`` (N,) their
    rows in the scorer's reference sets. Draws ``samples`` captions per image with
    ``sample_decode`` (the model's own softmax, temperature 1, under ``rules`` only: the
    policy whose gradient is taken), scores them with ``scorer`` (a ``CiderD`` whose
    reference sets are the train images' ``reward_references``), and returns the
    model's loss with the advantages as per-token weights, and its gradients.

    The loss runs without any term of the model's own beyond the likelihood
    (``likelihood_only``: no label smoothing, no attention penalty), and with the
    dropout the captions were drawn with: none by default, or, with ``dropout`` p > 0,
    masks drawn for each caption (word vectors and scored hidden states, as in
    cross-entropy training) that the sampler applied at every step and the loss applies
    again. Either way the gradient is that of the drawn captions' own probability.

    rules: None, or the decoding rules (``rnncap.inference.decoding.Rules``) the
    captions are drawn under (``--sample-rules``: the checkpoint's own, so that training
    sees only captions that captioning allows). Each word is drawn from the softmax
    renormalised over the
    allowed words, and the gradient is that of the same renormalised log-probability
    (the loss's ``forbidden``), so that it is the policy gradient of what was drawn.
    rng: the sampling generator; its state is part of a checkpoint (exact resume).
    ``stats()``: the mean reward (and baseline) of the last batch, for the progress bar.

    Sampling runs on several cores: the batch is cut into the fewest groups of at most
    ``SAMPLE_GROUP`` images, as even as can be (25 images: 12 and 13, so that neither of
    two cores waits long for the other), each drawn by its own generator seeded from
    ``rng``, side by side on threads (NumPy releases the GIL in its loops). The groups
    depend on the batch only, so the captions drawn do not depend on the machine's
    thread count.
    """

    def __init__(self, model, vocab, scorer, samples=5, baseline="mean", max_length=17, rng=None,
                 dropout=0.0, rules=None):
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
        if samples < (2 if baseline == "mean" else 1):
            raise ValueError(f"the {baseline!r} baseline needs at least "
                             f"{2 if baseline == 'mean' else 1} samples per image, got {samples}")
        self.model, self.vocab, self.scorer = model, vocab, scorer
        self.samples, self.baseline, self.max_length = int(samples), baseline, int(max_length)
        self.dropout = float(dropout)
        self.rules = rules
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        self._words = np.asarray(vocab.idx_to_word, dtype=object)
        self._stats = {}
        self._pool = None

    @property
    def params(self):
        return self.model.params

    @property
    def xp(self):
        return self.model.xp

    def stats(self):
        return dict(self._stats)

    def loss(self, features, images, train=True):
        """(loss, grads) of the policy gradient on N images (see the class docstring).
        ``train`` is accepted for the contract; the loss never uses dropout."""
        from ..inference.decoding import forbidden_in, greedy_decode

        model, K = self.model, self.samples
        images = np.asarray(images, dtype=np.int64).reshape(-1)
        xp = model.xp
        repeated = xp.repeat(xp.asarray(features), K, axis=0)  # rows n*K .. n*K+K-1: image n
        ids, masks = self.draw(repeated)
        lengths = self.lengths(ids)
        ref_rows = np.repeat(images, K)
        rewards = self.scorer.score(self.tokens(ids, lengths), ref_rows).reshape(-1, K)

        if self.baseline == "mean":  # leave-one-out: the mean of the image's other samples
            base = (rewards.sum(axis=1, keepdims=True) - rewards) / (K - 1)
        else:
            greedy = greedy_decode(model, features, max_length=self.max_length,
                                   banned=self.vocab.never_generated, rules=self.rules)
            base = self.scorer.score(self.tokens(greedy, self.lengths(greedy)), images)[:, None]
        advantage = (rewards - base).reshape(-1)

        # The sampled words as training captions: <START> first, <NULL> after the end
        # (already so in the decoder's layout); each word up to and including <END>
        # weighs its caption's advantage.
        N, L = ids.shape
        captions = np.empty((N, L + 1), dtype=np.int64)
        captions[:, 0] = model.start_id
        captions[:, 1:] = ids
        weights = (np.arange(L)[None, :] < lengths[:, None]) * advantage[:, None]
        drawn_with = {} if masks is None else {"masks": masks}  # models without dropout need no masks
        # The words the rules forbade at each step leave the loss's softmax, so the
        # gradient is that of the renormalised distribution the captions were drawn
        # from. Without this the gradient has a term the sampler never sees, the
        # forbidden words' share, and the attention model's val CIDEr-D fell over 3
        # epochs on Flickr8k instead of rising (docs/results.md).
        if self.rules is not None:
            drawn_with["forbidden"] = forbidden_in(ids, model.end_id, rules=self.rules)
        loss, grads = model.likelihood_only().loss(repeated, captions, train=False,
                                                   token_weights=weights, **drawn_with)
        self._stats = {"reward": float(rewards.mean())}
        if self.baseline == "greedy":
            self._stats["greedy_reward"] = float(base.mean())
        return loss, grads

    def draw(self, repeated):
        """(N*K, max_length) ids drawn from the model's softmax for the repeated
        features (rows n*K .. n*K+K-1 of image n), laid out like ``sample_decode``'s,
        and the dropout masks they were drawn with: (mask_x (N*K, max_length, W),
        mask_h (N*K, max_length, H)), or None without dropout."""
        from concurrent.futures import ThreadPoolExecutor

        from ..inference.decoding import sample_decode
        from ..models.layers import dropout_mask

        model, xp = self.model, self.model.xp
        n_images = len(repeated) // self.samples
        bounds = np.linspace(0, n_images, -(-n_images // SAMPLE_GROUP) + 1).round().astype(int)
        groups = [slice(a * self.samples, b * self.samples) for a, b in zip(bounds[:-1], bounds[1:])]
        seeds = self.rng.integers(2 ** 63, size=len(groups))

        def one(group, seed):
            rng, part = np.random.default_rng(seed), repeated[group]
            masks = None if self.dropout <= 0 else tuple(
                dropout_mask((len(part), self.max_length, dim), self.dropout, rng, model.dtype, xp)
                for dim in (model.wordvec_dim, model.hidden_dim))
            return sample_decode(model, part, max_length=self.max_length, rng=rng, masks=masks,
                                 rules=self.rules), masks

        if len(groups) == 1:
            return one(groups[0], seeds[0])
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max(1, min(os.cpu_count() or 1, 8)),
                                            thread_name_prefix="rnncap-scst")
        parts = list(self._pool.map(one, groups, seeds))
        ids = np.concatenate([p[0] for p in parts])
        if self.dropout <= 0:
            return ids, None
        return ids, tuple(xp.concatenate([p[1][i] for p in parts]) for i in range(2))

    def lengths(self, ids):
        """(N,) words of each decoded caption, its <END> included (all of the row
        when it never ended)."""
        is_end = ids == self.model.end_id
        return np.where(is_end.any(axis=1), is_end.argmax(axis=1) + 1, ids.shape[1])

    def tokens(self, ids, lengths):
        """Decoded ids as word lists, <END> (and any special word drawn) kept as a word."""
        return [self._words[row[:n]].tolist() for row, n in zip(ids, lengths)]


# ---- the stage: ``rnncap train --scst --init CKPT`` --------------------------------------

# The stage's own defaults, where they differ from cross-entropy training's: measured
# on Flickr8k val from the default h0 LSTM (docs/results.md). The literature's 5e-5 is
# for ~100k updates; the 15-minute budget here allows ~1,000 (4 epochs of 240), where
# 5e-5 moved val CIDEr by +0.006 and 5e-4 by +0.037 (beam 3); larger or decayed rates
# did no better.
STAGE_DEFAULTS = {"lr": 5e-4, "lr_decay": 1.0, "batch_size": 25, "epochs": 4, "ema": 0.0, "warmup": 0}
# Per kind of model, where it differs, as measured on val. The temperature of the
# starting policy: the h0 LSTM (label smoothing, dropout) has a flat softmax, its
# samples score a third of its greedy captions' CIDEr-D and the few updates went on
# sharpening it; at 0.5 (greedy captions unchanged) the gain rose from +0.037 to +0.052
# (seed 0; +0.025 to +0.044, seed 1). The attention model's samples at 1 already score
# close to its greedy captions on train, and at 0.5 nearly repeat its train references
# (mean reward ~1.0): val CIDEr-D fell (0.501 -> 0.498 -> 0.494 over two epochs) where
# at 1 it rose. The attention model's epoch costs 1.6 times the LSTM's: 3 of them fit
# the 15-minute budget, and gave most of the 4-epoch gain (0.537 of 0.540).
# The Transformer (label smoothing 0.1 in cross-entropy) is the h0 case again, and
# more so: at T = 1 its samples scored 0.23 mean reward on train against 0.55 at 0.5,
# and greedy val CIDEr-D fell after one epoch at every rate tried (5e-4: 0.451 ->
# 0.325; 1e-4 and 5e-5: 0.438); at 0.5 and 5e-4 it fell too (0.370), at 0.5 and 1e-4
# it rose, 0.451 -> 0.474 -> 0.501 (seed 0, docs/transformer.md).
MODEL_DEFAULTS = {"h0": {"temperature": 0.5}, "attention": {"temperature": 1.0, "epochs": 3},
                  "transformer": {"temperature": 0.5, "lr": 1e-4}}


def stage_defaults(model_kind):
    """The stage's defaults for a kind of model (``ModelConfig.model``)."""
    return {**STAGE_DEFAULTS, "temperature": 1.0, **MODEL_DEFAULTS.get(model_kind, {})}


def run(args, ckpt, ckpt_path, resume):
    """Self-critical training from a checkpoint.

    ckpt: the cross-entropy checkpoint to start from (``--init``), or, with ``resume``,
    an SCST checkpoint to continue. Writes OUT/last.npz every epoch and OUT/best.npz,
    the epoch with the best val CIDEr; the starting model is epoch 0, so best.npz is
    never worse on val than where the stage began.
    """
    from ..config import DataConfig, ModelConfig, TrainConfig, decode_config, from_dict, to_dict
    from ..evaluation.cider import CiderD
    from ..data.datasets import load_dataset
    import dataclasses

    from ..inference.decoding import rules_for, with_rule_arguments
    from .trainer import (Trainer, _print_data_summary, average_top_epochs, check_vocab_matches,
                          cider_val_fn, given_or_default, prepare_data, train_bad_endings, with_params)

    data_cfg = from_dict(DataConfig, ckpt.configs.get("data"))
    model_cfg = from_dict(ModelConfig, ckpt.configs.get("model"))
    decode_cfg = decode_config(ckpt.configs)
    if resume:
        train_cfg = from_dict(TrainConfig, ckpt.configs.get("train"))
        for key in ("epochs", "max_iters"):
            if getattr(args, key, None):
                setattr(train_cfg, key, getattr(args, key))
    else:
        defaults = stage_defaults(model_cfg.model)
        train_cfg = TrainConfig(
            optimizer=args.optimizer, momentum=args.momentum, weight_decay=args.weight_decay,
            clip_norm=args.clip, seed=args.seed, checkpoint_every=args.checkpoint_every,
            max_iters=args.max_iters, device=args.device, stage="scst", init=str(ckpt_path),
            samples=args.samples, baseline=args.baseline, average=args.average,
            sample_dropout=args.sample_dropout, sample_rules=args.sample_rules,
            select_beam=args.select_beam,
            **given_or_default(args, defaults, SimpleNamespace(**defaults)))
        decode_cfg = with_rule_arguments(dataclasses.replace(decode_cfg, **given_or_default(
            args, ("beam_size", "length_norm"), decode_cfg, {"beam_size": "beam"})), args)
    if args.data:
        data_cfg.captions = args.data
    if args.features:
        data_cfg.features = args.features
    if not data_cfg.captions:
        raise RnncapError(f"{ckpt_path}: records no dataset; pass --data")

    dataset = load_dataset(data_cfg.captions)
    vocab, model = ckpt.vocab, ckpt.model
    check_vocab_matches(vocab, dataset, data_cfg, ckpt_path)
    if not decode_cfg.bad_endings:  # an --init checkpoint from before the list
        decode_cfg.bad_endings = train_bad_endings(dataset, vocab)
    data, encoder, transform = prepare_data(
        dataset, vocab, data_cfg.features, data_cfg,
        pca=ckpt.pca if ckpt.pca is not None else False, encoder=ckpt.encoder)
    _print_data_summary(dataset, vocab, data, data["train"][3])
    train_feats = data["train"][0]
    if model.input_dim != train_feats.shape[-1]:
        raise RnncapError(f"{data_cfg.features}: features are {train_feats.shape[-1]}-d but the "
                          f"checkpoint {ckpt_path} expects {model.input_dim}-d")
    if train_cfg.sample_dropout and not getattr(model, "samples_with_dropout", True):
        raise RnncapError(f"--sample-dropout: {ckpt_path} holds a {type(model).__name__}, which "
                          f"samples without dropout masks (they are for the LSTM models)")
    if train_cfg.device != "cpu":
        model.to(train_cfg.device)
    encoder = encoder or ckpt.encoder
    transform = transform if transform is not None else ckpt.pca
    if not resume and train_cfg.temperature != 1.0:
        # The starting policy softmax(scores / T), folded into the output layer so that
        # the model stays one of its kind: greedy captions are the same, samples surer.
        for key in ("W_vocab", "b_vocab"):
            model.params[key] = model.params[key] / train_cfg.temperature

    train_refs = reward_references(dataset.splits["train"].references, vocab.idx_to_word[vocab.end_id])
    if any(not refs for refs in train_refs):
        raise RnncapError(f"{data_cfg.captions}: some train images have no reference caption; "
                          f"self-critical training scores every image against its references")
    max_length = data_cfg.max_length + 1  # room for <END>
    objective = ScstObjective(model, vocab, CiderD(train_refs), samples=train_cfg.samples,
                              baseline=train_cfg.baseline, max_length=max_length,
                              rng=np.random.default_rng([train_cfg.seed, 0x5C57]),
                              dropout=train_cfg.sample_dropout,
                              rules=rules_for(vocab, decode_cfg) if train_cfg.sample_rules else None)
    val = data.get("val")
    val_fn = None if val is None else cider_val_fn(
        vocab, val[0], dataset.splits["val"].references, max_length, beam=train_cfg.select_beam,
        length_norm=decode_cfg.length_norm, decode=decode_cfg)
    # The Trainer validates what it trains (the objective); val_fn scores the captioner.
    trainer_val_fn = None if val_fn is None else (lambda objective: val_fn(objective.model))
    configs = {"model": to_dict(model_cfg), "train": to_dict(train_cfg), "data": to_dict(data_cfg),
               "decode": to_dict(decode_cfg)}

    def checkpoint_fn(path, state, params=None):
        from ..checkpoint import save_checkpoint

        saved = model if params is None else with_params(model, params)
        train_state = {k: v for k, v in state.items() if k != "history"}
        train_state["sample_rng"] = objective.rng.bit_generator.state
        save_checkpoint(path, saved, vocab, encoder=encoder, pca=transform, configs=configs,
                        train_state=train_state, history=state["history"])

    n = len(train_feats)
    rows = np.arange(n)
    trainer = Trainer(objective, (train_feats, rows, rows), train_cfg, val=None, out_dir=args.out,
                      checkpoint_fn=checkpoint_fn, count_fn=lambda y: len(y) * train_cfg.samples,
                      unit="captions", val_fn=trainer_val_fn, select=("val_cider", "max"),
                      progress=False if args.quiet else None, step_stats=objective.stats,
                      keep_top=train_cfg.average if train_cfg.average > 1 else 0)
    os.makedirs(args.out, exist_ok=True)
    if resume:
        state = dict(ckpt.train_state)
        state["history"] = ckpt.history
        trainer.restore(state)
        if state.get("sample_rng"):
            objective.rng.bit_generator.state = state["sample_rng"]
        print(f"resuming self-critical training from {ckpt_path} at epoch {trainer.epoch}, "
              f"iteration {trainer.iteration}", file=sys.stderr)
    elif val_fn is not None:
        # The starting model is epoch 0: an epoch must beat it to become best.npz.
        start = val_fn(model)["val_cider"]
        trainer.best = {"epoch": 0, "iteration": 0, "val_cider": start}
        checkpoint_fn(os.path.join(args.out, "best.npz"), trainer.state())
        print(f"self-critical training from {ckpt_path}: val CIDEr-D {start:.4f} at the start",
              file=sys.stderr)
    trainer.fit()
    average_top_epochs(trainer, model, val_fn, checkpoint_fn)
    print(f"checkpoints in {args.out}: last.npz" + (", best.npz" if trainer.best else ""))
    return 0

