"""Configuration as dataclasses. Every checkpoint stores them (as JSON) with the vocab,
so a run can be resumed or a model rebuilt from the checkpoint alone."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """Decoder shape. input_dim and vocab_size come from the data.

    model: "h0" (the image is the initial hidden state, ``CaptioningModel``) or
    "attention" (soft attention over the spatial map, ``AttentionCaptioningModel``,
    LSTM only) or "transformer" (``TransformerCaptioningModel``, width hidden_dim, which
    wordvec_dim must equal). attention_dim and attention_reg (the doubly stochastic
    lambda) are the attention model's; heads, layers, ffn_dim and locations the
    Transformer's."""
    model: str = "h0"
    cell_type: str = "lstm"
    wordvec_dim: int = 512
    hidden_dim: int = 512
    dropout: float = 0.5
    label_smoothing: float = 0.1
    dtype: str = "float32"
    input_dim: int = 0
    vocab_size: int = 0
    attention_dim: int = 256
    attention_reg: float = 1.0
    deep_output: bool = False        # attention: tanh(x, h, context) before the vocabulary
    heads: int = 8                   # transformer: attention heads
    layers: int = 2                  # transformer: decoder layers
    ffn_dim: int = 2048              # transformer: feed-forward width
    locations: int = 0               # transformer: memory tokens (the map's locations, from the
                                     # data); 0 = pooled features, one token


@dataclass
class TrainConfig:
    """Optimisation. lr_decay multiplies the learning rate after every epoch.

    The defaults (here, in ModelConfig and DataConfig) are the best recipe known on
    Flickr8k val (docs/results.md). stage "xe" is cross-entropy training; "scst" is
    self-critical training (rnncap.training.scst) from the checkpoint ``init``, drawing
    ``samples`` captions per image, with the "mean" (of the other samples) or "greedy"
    baseline; its batch_size counts images.
    """
    optimizer: str = "adam"          # "adam" or "sgd" (with momentum)
    lr: float = 3e-3
    momentum: float = 0.9
    lr_decay: float = 0.8
    weight_decay: float = 0.0
    clip_norm: float = 5.0           # global-norm clipping; 0 disables
    batch_size: int = 128
    epochs: int = 8
    seed: int = 0
    checkpoint_every: int = 0        # iterations between "last" checkpoints; 0 = per epoch
    max_iters: int = 0               # stop after this many iterations in total; 0 = no cap
    device: str = "cpu"
    select: str = "cider"            # best.npz: "cider" (val CIDEr-D, max) or "loss" (val loss, min)
    select_beam: int = 1             # captions for val CIDEr-D: 1 = greedy, else beam size
    average: int = 3                 # average the best K epochs' weights if val CIDEr-D says so; <= 1 off
    warmup: int = 0                  # updates over which lr rises linearly from lr/warmup to lr; 0 = off
    ema: float = 0.0                 # decay per update of a moving average of the weights, which is
                                     # validated and kept in their place; 0 = off
    stage: str = "xe"                # "xe" or "scst"
    init: str = ""                   # scst: the checkpoint the stage started from
    samples: int = 5                 # scst: captions drawn per image
    baseline: str = "mean"           # scst: "mean" or "greedy"
    temperature: float = 1.0         # scst: the policy starts as the --init model's softmax at this temperature
    sample_dropout: float = 0.0      # scst: dropout while drawing captions (the same masks in the loss); 0 = off
    sample_rules: bool = False       # scst: draw captions under the decoding rules (the gradient is then that
                                     # of the renormalised distribution); off: val preferred it (docs/results.md)


@dataclass
class DecodeConfig:
    """How a checkpoint's captions are decoded unless told otherwise: beam size (1 =
    greedy) and length normalisation (beam search ranks by logprob / len ** length_norm).

    rules: no <END> right after a word of ``bad_endings`` and no word right after
    itself (``rnncap.inference.decoding.allowed``); block_trigrams: no trigram twice in
    a caption (on: on Flickr8k val it removed all 17 repeated trigrams of the attention
    + SCST model at the same scores, docs/ensembles.md). bad_endings: the words that (almost) never end a training caption,
    derived from them at training time (``rnncap.data.vocab.bad_endings``); empty in
    checkpoints written before there was a list (their rules are the no-repeat rule
    alone, unless a command derives the list from the dataset it is given).
    ensemble: how an ensemble averages its members' next-word distributions, "logprob"
    (the mean of log-probabilities) or "prob" (of probabilities)."""
    beam_size: int = 3
    length_norm: float = 0.5
    rules: bool = True
    block_trigrams: bool = True
    bad_endings: list = field(default_factory=list)
    ensemble: str = "logprob"


def decode_config(configs) -> DecodeConfig:
    """The decoding defaults a checkpoint's configs record. Checkpoints written before
    there were any keep the defaults of their day: beam 3, no length normalisation."""
    recorded = (configs or {}).get("decode")
    return from_dict(DecodeConfig, recorded) if recorded is not None else DecodeConfig(3, 0.0)


@dataclass
class DataConfig:
    """Where the data came from and how captions were encoded."""
    captions: str = ""               # the dataset file (any supported format)
    features: str = ""               # the HDF5 feature cache
    max_length: int = 16             # T: words per caption, <START>/<END> not counted
    too_long: str = "truncate"       # "truncate" or "drop"
    min_count: int = 5
    top_k: int = 0                   # 0 = no cap on the vocabulary size
    standardize: bool = True         # per-channel unit variance, fitted on train
    synthetic: bool = False          # the captions describe rnncap's synthetic scenes (rnncap demo), not photos


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, d: dict):
    """Build a config from a dict, ignoring keys this version does not know and
    keeping defaults for keys an older checkpoint lacks."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in (d or {}).items() if k in names})
