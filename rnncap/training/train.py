"""The ``rnncap train`` command: cross-entropy training, or with ``--scst`` self-critical
training (``rnncap.training.scst``), both run by the generic ``Trainer``
(``rnncap.training.trainer``).

The command builds the captioning pieces around the Trainer: data, vocabulary,
features, model, checkpoints; ``--resume`` rebuilds them all from a checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import optim
from ..config import DataConfig, DecodeConfig, ModelConfig, TrainConfig, decode_config, from_dict, to_dict
from ..errors import RnncapError
# Re-exported so that rnncap.training.train keeps naming the trainer's pieces.
from .trainer import (Trainer, _check_feature_kind, _print_data_summary, average_top_epochs,  # noqa: F401
                      check_vocab_matches, cider_val_fn, dataset_vocab, given_or_default, plot_history,
                      prepare_data, train_bad_endings, with_params)

# Defaults that differ by kind of model (ModelConfig.model), where the flag is not given:
# the Transformer's recipe (docs/transformer.md). The rate is val's choice: 1e-3 kept
# greedy val CIDEr-D 0.497 where 5e-4 kept 0.451 (seed 0, 8 epochs, 250-update warm-up).
KIND_DEFAULTS = {"transformer": {"dropout": 0.1, "hidden_dim": 256, "wordvec_dim": 256, "heads": 4,
                                 "ffn_dim": 1024, "lr": 1e-3, "warmup": 250}}


def add_arguments(p):
    from ..cli import nonneg_float, nonneg_int, positive_float, positive_int, unit_float

    d = (DataConfig(), ModelConfig(), TrainConfig())
    g = p.add_argument_group("data")
    g.add_argument("--data", required=False, help="dataset file or folder (any supported format)")
    g.add_argument("--features", help="HDF5 feature cache from `rnncap features`")
    g.add_argument("--no-pca", action="store_true", help="ignore the PCA stored in the feature cache")
    g.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=d[0].standardize,
                   help="scale every feature channel to unit variance, fitted on train and kept in "
                        "the checkpoint (default %(default)s)")
    g.add_argument("--max-length", type=positive_int, default=d[0].max_length,
                   help="words per caption, <START>/<END> not counted (default %(default)s)")
    g.add_argument("--too-long", choices=["truncate", "drop"], default=d[0].too_long,
                   help="what to do with longer captions (default %(default)s)")
    g.add_argument("--min-count", type=positive_int, default=d[0].min_count,
                   help="keep words seen at least this often in train (default %(default)s)")
    g.add_argument("--top-k", type=nonneg_int, default=d[0].top_k,
                   help="keep at most this many words, 0 = no cap (default %(default)s)")
    g = p.add_argument_group("model")
    from ..models.registry import kinds

    g.add_argument("--model", choices=kinds(), default=d[1].model,
                   help="h0: the image is the initial state; attention: soft attention over the "
                        "spatial map (needs `rnncap features --maps`); transformer: a Transformer "
                        "decoder over the map's locations (or the pooled feature) "
                        "(default %(default)s)")
    g.add_argument("--cell", choices=["rnn", "lstm"], default=d[1].cell_type)
    tf = {**ModelConfig().__dict__, **KIND_DEFAULTS["transformer"]}
    g.add_argument("--wordvec", type=positive_int,
                   help=f"W (default {d[1].wordvec_dim}; {tf['wordvec_dim']} for the transformer)")
    g.add_argument("--hidden", type=positive_int,
                   help=f"H, the transformer's width E (default {d[1].hidden_dim}; {tf['hidden_dim']} "
                        f"for the transformer)")
    g.add_argument("--dropout", type=unit_float,
                   help=f"(default {d[1].dropout:g}; {KIND_DEFAULTS['transformer']['dropout']:g} "
                        f"for the transformer)")
    g.add_argument("--label-smoothing", type=unit_float, default=d[1].label_smoothing)
    g.add_argument("--attention-dim", type=positive_int, default=d[1].attention_dim,
                   help="A, the attention model's hidden size (default %(default)s)")
    g.add_argument("--attention-reg", type=nonneg_float, default=d[1].attention_reg,
                   help="lambda of the doubly stochastic attention penalty (default %(default)s)")
    g.add_argument("--deep-output", action="store_true",
                   help="attention: read each word from tanh(word vector, h, context) through one more "
                        "layer, Show, Attend and Tell's deep output (default: from h)")
    g.add_argument("--heads", type=positive_int,
                   help=f"transformer: attention heads, dividing --hidden (default {tf['heads']})")
    g.add_argument("--layers", type=positive_int, default=d[1].layers,
                   help="transformer: decoder layers (default %(default)s)")
    g.add_argument("--ffn", type=positive_int,
                   help=f"transformer: feed-forward width (default {tf['ffn_dim']})")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=sorted(optim.RULES), default=d[2].optimizer)
    from .scst import STAGE_DEFAULTS as s, stage_defaults

    g.add_argument("--lr", type=positive_float,
                   help=f"(default {d[2].lr:g}, {KIND_DEFAULTS['transformer']['lr']:g} for the transformer; "
                        f"{s['lr']:g} with --scst, {stage_defaults('transformer')['lr']:g} for the transformer)")
    g.add_argument("--lr-decay", type=positive_float,
                   help=f"learning-rate factor per epoch (default {d[2].lr_decay:g}; "
                        f"{s['lr_decay']:g} with --scst)")
    g.add_argument("--ema", type=unit_float, metavar="DECAY",
                   help="keep a moving average of the weights with this decay per update, and "
                        "validate and keep it in their place; 0 = off (default "
                        f"{d[2].ema:g}; {s.get('ema', d[2].ema):g} with --scst)")
    g.add_argument("--warmup", type=nonneg_int,
                   help=f"updates over which the learning rate rises linearly to --lr (default "
                        f"{d[2].warmup}; {KIND_DEFAULTS['transformer']['warmup']} for the transformer; "
                        f"{s['warmup']} with --scst)")
    g.add_argument("--momentum", type=unit_float, default=d[2].momentum, help="for sgd")
    g.add_argument("--weight-decay", type=float, default=d[2].weight_decay)
    g.add_argument("--clip", type=float, default=d[2].clip_norm,
                   help="global gradient-norm clip, 0 = off (default %(default)s)")
    g.add_argument("--batch-size", type=positive_int,
                   help=f"captions per update (default {d[2].batch_size}); with --scst, images "
                        f"(default {s['batch_size']})")
    g.add_argument("--epochs", type=positive_int,
                   help=f"(default {d[2].epochs}; {s['epochs']} with --scst, "
                        f"{stage_defaults('attention')['epochs']} for attention models); with --resume: "
                        f"train until this many epochs in all")
    g.add_argument("--max-iters", type=nonneg_int, default=0, help="stop after this many updates in total")
    g.add_argument("--checkpoint-every", type=nonneg_int, default=0,
                   help="also save last.npz every this many updates (default: each epoch)")
    g.add_argument("--seed", type=int, default=d[2].seed)
    g.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    g = p.add_argument_group("selection and decoding")
    g.add_argument("--select", choices=["cider", "loss"], default=d[2].select,
                   help="best.npz: the epoch with the best val CIDEr-D, or the lowest val loss "
                        "(default %(default)s)")
    g.add_argument("--select-beam", type=positive_int, default=d[2].select_beam,
                   help="val captions for --select cider: 1 = greedy, else the beam size "
                        "(default %(default)s)")
    g.add_argument("--average", type=nonneg_int, default=d[2].average,
                   help="average the weights of the K epochs with the best val CIDEr-D, kept as "
                        "best.npz only if val CIDEr-D says it is better; 0 or 1 = off "
                        "(default %(default)s)")
    g.add_argument("--beam", type=positive_int,
                   help=f"beam size recorded as the checkpoint's decoding default for `rnncap "
                        f"caption`/`evaluate` (default {DecodeConfig().beam_size}; with --scst: "
                        f"the --init checkpoint's)")
    g.add_argument("--length-norm", type=nonneg_float,
                   help=f"beam length normalisation recorded likewise (default "
                        f"{DecodeConfig().length_norm:g}; with --scst: the --init checkpoint's)")
    from ..inference.decoding import add_rule_arguments

    add_rule_arguments(g)  # recorded likewise; the val checks and SCST's sampler follow them
    g = p.add_argument_group("self-critical training (after cross-entropy; see rnncap.training.scst)")
    g.add_argument("--scst", action="store_true",
                   help="fine-tune the --init checkpoint on CIDEr-D with self-critical training")
    g.add_argument("--init", metavar="CKPT", help="with --scst: the cross-entropy checkpoint to start from")
    g.add_argument("--samples", type=positive_int, default=d[2].samples,
                   help="captions drawn per image (default %(default)s)")
    g.add_argument("--baseline", choices=["mean", "greedy"], default=d[2].baseline,
                   help="a sample's baseline: the mean reward of the image's other samples, or the "
                        "reward of its greedy caption (default %(default)s)")
    g.add_argument("--sample-dropout", type=unit_float, default=d[2].sample_dropout,
                   help="dropout (word vectors, scored hidden states) while drawing captions, the "
                        "same masks in the loss; 0 = off (default %(default)s)")
    g.add_argument("--sample-rules", action=argparse.BooleanOptionalAction, default=d[2].sample_rules,
                   help="draw the captions under the checkpoint's decoding rules, with the policy "
                        "gradient of that renormalised distribution; off, they apply when decoding "
                        "only, which Flickr8k val preferred (default %(default)s)")
    g.add_argument("--temperature", type=positive_float, default=None,
                   help="the policy starts as the --init model's softmax at this temperature: its "
                        "output layer is divided by it, so greedy captions are unchanged and samples "
                        f"are surer below 1 (default {stage_defaults('h0')['temperature']:g} for h0, "
                        f"{stage_defaults('attention')['temperature']:g} for attention models, "
                        f"{stage_defaults('transformer')['temperature']:g} for the transformer)")
    p.add_argument("--out", help="output folder (default: runs/train, or the folder of --resume's checkpoint)")
    p.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint (e.g. OUT/last.npz); "
                   "configs, vocab and state come from it, --epochs may extend the run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel over the ranks torchrun starts (gloo on CPUs): "
                        "torchrun --nproc_per_node N -m rnncap train --distributed ... (docs/scaling.md)")


def run(args):
    from ..checkpoint import load_checkpoint
    from ..data.datasets import load_dataset
    from ..inference.decoding import with_rule_arguments
    from ..models.registry import build_model

    if args.weight_decay < 0 or args.clip < 0:
        raise RnncapError("--weight-decay and --clip must be >= 0")
    if args.out is None:
        args.out = os.path.dirname(os.path.abspath(args.resume)) if args.resume else "runs/train"
    if args.distributed and args.scst:
        raise RnncapError("--distributed covers cross-entropy training, not --scst")
    if args.scst:
        from . import scst

        if args.resume or not args.init:
            raise RnncapError("--scst starts self-critical training from --init CKPT (a "
                              "cross-entropy checkpoint); continue a stopped one with --resume alone")
        return scst.run(args, load_checkpoint(args.init), args.init, resume=False)
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        if (ckpt.configs.get("train") or {}).get("stage") == "scst":
            if args.distributed:
                raise RnncapError(f"{args.resume}: a self-critical checkpoint; --distributed covers "
                                  f"cross-entropy training only")
            from . import scst

            return scst.run(args, ckpt, args.resume, resume=True)
        data_cfg = from_dict(DataConfig, ckpt.configs.get("data"))
        model_cfg = from_dict(ModelConfig, ckpt.configs.get("model"))
        train_cfg = from_dict(TrainConfig, ckpt.configs.get("train"))
        decode_cfg = decode_config(ckpt.configs)
        if args.epochs is not None:
            train_cfg.epochs = args.epochs
        if args.max_iters:
            train_cfg.max_iters = args.max_iters
        if args.data:
            data_cfg.captions = args.data
        if args.features:
            data_cfg.features = args.features
        pca = ckpt.pca if ckpt.pca is not None else False
    else:
        if not args.data:
            raise RnncapError("--data is required (or --resume CKPT)")
        data_cfg = DataConfig(captions=args.data, features=args.features or "",
                              max_length=args.max_length, too_long=args.too_long,
                              min_count=args.min_count, top_k=args.top_k,
                              standardize=args.standardize)
        if args.deep_output and args.model != "attention":
            raise RnncapError(f"--deep-output is the attention model's; --model is {args.model}")
        kind = KIND_DEFAULTS.get(args.model, {})
        model_fields = set(ModelConfig().__dict__)
        model_cfg = ModelConfig(model=args.model, cell_type=args.cell, label_smoothing=args.label_smoothing,
                                attention_dim=args.attention_dim, attention_reg=args.attention_reg,
                                deep_output=args.deep_output, layers=args.layers,
                                **given_or_default(args, ("dropout", "wordvec_dim", "hidden_dim", "heads",
                                                          "ffn_dim"),
                                                   ModelConfig(**{k: v for k, v in kind.items()
                                                                  if k in model_fields}),
                                                   {"wordvec_dim": "wordvec", "hidden_dim": "hidden",
                                                    "ffn_dim": "ffn"}))
        train_cfg = TrainConfig(optimizer=args.optimizer, momentum=args.momentum,
                                weight_decay=args.weight_decay, clip_norm=args.clip, seed=args.seed,
                                checkpoint_every=args.checkpoint_every, max_iters=args.max_iters,
                                device=args.device, select=args.select, select_beam=args.select_beam,
                                average=args.average,
                                **given_or_default(args, ("lr", "lr_decay", "batch_size", "epochs", "ema",
                                                          "warmup"),
                                                   TrainConfig(**{k: v for k, v in kind.items()
                                                                  if k not in model_fields})))
        decode_cfg = from_dict(DecodeConfig, given_or_default(args, ("beam_size", "length_norm"),
                                                              DecodeConfig(), {"beam_size": "beam"}))
        decode_cfg = with_rule_arguments(decode_cfg, args)
        pca = not args.no_pca

    comm = None
    if args.distributed:  # rank 0 alone prints, logs and writes checkpoints
        from .distributed import init_from_env

        comm = init_from_env(train_cfg.device)
    main = comm is None or comm.rank == 0
    dataset = load_dataset(data_cfg.captions)
    if ckpt is not None:
        vocab = ckpt.vocab
        check_vocab_matches(vocab, dataset, data_cfg, args.resume)
    else:
        vocab = dataset_vocab(dataset, data_cfg)
    if not decode_cfg.bad_endings:  # new runs, and checkpoints from before the list
        decode_cfg.bad_endings = train_bad_endings(dataset, vocab)
    data, encoder, pca_params = prepare_data(dataset, vocab, data_cfg.features, data_cfg, pca=pca,
                                             encoder=ckpt.encoder if ckpt is not None else None,
                                             standardize=data_cfg.standardize and ckpt is None)
    train_feats, train_caps, train_idx, stats = data["train"]
    if main:
        _print_data_summary(dataset, vocab, data, stats)

    if ckpt is not None:
        model = ckpt.model
        if model.input_dim != train_feats.shape[-1]:
            raise RnncapError(f"{data_cfg.features}: features are {train_feats.shape[-1]}-d but the "
                              f"checkpoint {args.resume} expects {model.input_dim}-d")
    else:
        model_cfg.input_dim, model_cfg.vocab_size = int(train_feats.shape[-1]), len(vocab)
        model_cfg.locations = int(train_feats.shape[1]) if train_feats.ndim == 3 else 0
        try:
            model = build_model(model_cfg, vocab, seed=train_cfg.seed)
        except ValueError as e:
            raise RnncapError(f"--model/--cell: {e}") from None
    _check_feature_kind(model, train_feats, data_cfg.features)
    if train_cfg.device != "cpu":
        model.to(train_cfg.device)

    configs = {"model": to_dict(model_cfg), "train": to_dict(train_cfg), "data": to_dict(data_cfg),
               "decode": to_dict(decode_cfg)}
    if ckpt is not None:
        encoder = encoder or ckpt.encoder
        pca_params = pca_params if pca_params is not None else ckpt.pca

    def checkpoint_fn(path, state, params=None):
        from ..checkpoint import save_checkpoint

        save_checkpoint(path, model if params is None else with_params(model, params), vocab,
                        encoder=encoder, pca=pca_params, configs=configs,
                        train_state={k: v for k, v in state.items() if k != "history"},
                        history=state["history"])

    null = vocab.null_id
    val = data.get("val")
    val_fn = None
    if val and train_cfg.select == "cider":
        val_fn = cider_val_fn(vocab, val[0], dataset.splits["val"].references, data_cfg.max_length + 1,
                              beam=train_cfg.select_beam, length_norm=decode_cfg.length_norm,
                              decode=decode_cfg)
    trained = model
    if comm is not None:
        from .distributed import wrap_for_training

        trained = wrap_for_training(model, comm, (train_feats, train_caps, train_idx),
                                    (ckpt.train_state.get("iteration", 0) if ckpt is not None else 0),
                                    resume_hint=os.path.join(args.out, "last.npz"))
        if not main:  # the other ranks take the same steps and write, log and decode nothing
            checkpoint_fn, val_fn = None, None
    trainer = Trainer(trained, (train_feats, train_caps, train_idx), train_cfg,
                      val=(val[0], val[1], val[2]) if val else None, out_dir=args.out if main else None,
                      checkpoint_fn=checkpoint_fn, count_fn=lambda y: int((y[:, 1:] != null).sum()),
                      unit="tok", progress=False if args.quiet or not main else None, val_fn=val_fn,
                      select=("val_cider", "max") if val_fn else ("val_loss", "min"),
                      keep_top=train_cfg.average if val_fn and train_cfg.average > 1 else 0,
                      log=None if main else (lambda msg: None))
    if ckpt is not None:
        state = dict(ckpt.train_state)
        state["history"] = ckpt.history
        trainer.restore(state)
        if main:
            print(f"resuming from {args.resume} at epoch {trainer.epoch}, iteration {trainer.iteration}",
                  file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    try:
        trainer.fit()
    finally:
        if comm is not None:
            comm.close()
    average_top_epochs(trainer, model, val_fn, checkpoint_fn)
    if main:
        print(f"checkpoints in {args.out}: last.npz" + (", best.npz" if trainer.best else ""))
    return 0
