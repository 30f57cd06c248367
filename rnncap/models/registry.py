"""Which class a checkpoint or a ``ModelConfig`` names.

Every model module registers its class here when it is imported
(``@register("attention")``); this module imports no model module, so the models
import it and nothing imports back (no cycle). ``rnncap.models`` imports every model
module, so importing this one (``from rnncap.models.registry import ...``) sees them all.
"""
from __future__ import annotations

_BY_CLASS = {}   # class name (as checkpoints store it) -> class
_BY_KIND = {}    # ModelConfig.model ("h0", "attention", ...) -> class


def register(kind):
    """Class decorator: the class is what ``ModelConfig(model=kind)`` builds. The class
    provides ``from_model_config(model_cfg, vocab, seed)``."""
    def add(cls):
        _BY_CLASS[cls.__name__] = cls
        _BY_KIND[kind] = cls
        return cls
    return add


def kinds():
    """The model kinds ``--model`` accepts, in the order they were registered."""
    return tuple(_BY_KIND)


def kind_of(model):
    """The ``ModelConfig.model`` that builds a model of this class ("h0", ...)."""
    return next((k for k, cls in _BY_KIND.items() if cls is type(model)), type(model).__name__)


def model_class(name):
    """The model class a checkpoint names ("CaptioningModel", "AttentionCaptioningModel", ...)."""
    if name not in _BY_CLASS:
        raise ValueError(f"unknown model class {name!r}")
    return _BY_CLASS[name]


def build_model(model_cfg, vocab, seed=None):
    """A fresh model for a ``ModelConfig`` (input_dim and vocab_size filled in) and a
    ``Vocab``: the class registered for ``model_cfg.model``."""
    if model_cfg.model not in _BY_KIND:
        raise ValueError(f"model must be one of {kinds()}, got {model_cfg.model!r}")
    return _BY_KIND[model_cfg.model].from_model_config(model_cfg, vocab, seed)
