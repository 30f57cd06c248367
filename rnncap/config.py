"""Configuration as dataclasses. Every checkpoint stores them (as JSON) with the vocab,
so a run can be resumed or a model rebuilt from the checkpoint alone."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class ModelConfig:
    """Decoder shape. input_dim and vocab_size come from the data.

    model: "h0" (the image is the initial hidden state, ``CaptioningModel``) or
    "attention" (soft attention over the spatial map, ``AttentionCaptioningModel``,
    LSTM only). attention_dim and attention_reg (the doubly stochastic lambda) are
    the attention model's."""
    model: str = "h0"
    cell_type: str = "lstm"
    wordvec_dim: int = 256
    hidden_dim: int = 512
    dropout: float = 0.0
    label_smoothing: float = 0.0
    dtype: str = "float32"
    input_dim: int = 0
    vocab_size: int = 0
    attention_dim: int = 512
    attention_reg: float = 1.0


@dataclass
class TrainConfig:
    """Optimisation. lr_decay multiplies the learning rate after every epoch."""
    optimizer: str = "adam"          # "adam" or "sgd" (with momentum)
    lr: float = 5e-3
    momentum: float = 0.9
    lr_decay: float = 0.95
    weight_decay: float = 0.0
    clip_norm: float = 5.0           # global-norm clipping; 0 disables
    batch_size: int = 128
    epochs: int = 10
    seed: int = 0
    checkpoint_every: int = 0        # iterations between "last" checkpoints; 0 = per epoch
    max_iters: int = 0               # stop after this many iterations in total; 0 = no cap
    device: str = "cpu"


@dataclass
class DataConfig:
    """Where the data came from and how captions were encoded."""
    captions: str = ""               # the dataset file (any supported format)
    features: str = ""               # the HDF5 feature cache
    max_length: int = 16             # T: words per caption, <START>/<END> not counted
    too_long: str = "truncate"       # "truncate" or "drop"
    min_count: int = 1
    top_k: int = 0                   # 0 = no cap on the vocabulary size


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, d: dict):
    """Build a config from a dict, ignoring keys this version does not know and
    keeping defaults for keys an older checkpoint lacks."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in (d or {}).items() if k in names})
