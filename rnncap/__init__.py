"""rnncap: image captioning from scratch in NumPy, with hand-written backward passes.

The captioners: a vanilla RNN, an LSTM, an LSTM with soft attention over the CNN's
spatial map (Show, Attend and Tell), and a Transformer decoder, each with its backward
pass written by hand; several checkpoints of any kinds decode as one ensemble. Around them:
dataset loaders, a pretrained CNN encoder with a resumable feature cache, training with
exact resume and self-critical fine-tuning on CIDEr-D, greedy/sampled/beam-search
decoding, the COCO caption metrics, HTML reports with attention maps, the ``rnncap``
command line, and a web page and JSON API (``rnncap serve``).

The names a user needs sit here, loaded on first use (PEP 562), so ``import rnncap``
stays fast and imports neither torch nor NumPy::

    from rnncap import Captioner
    Captioner.from_checkpoint("runs/f8k/att/best.npz").caption("photo.jpg")

Shapes in the docstrings: N images (or captions), T time steps, D feature size, L map
locations, W word-vector size, H hidden size, V vocabulary size.
"""

__version__ = "0.1.0"

# public name -> the module that defines it (the deep paths keep working too)
_WHERE = {
    # models
    "CaptioningModel": "rnncap.models.model",
    "AttentionCaptioningModel": "rnncap.models.attention",
    "TransformerCaptioningModel": "rnncap.models.transformer",
    # data
    "Vocab": "rnncap.data.vocab",
    "load_dataset": "rnncap.data.datasets",
    # encoding
    "get_encoder": "rnncap.encoding.encoders",
    "extract_features": "rnncap.encoding.features",
    "load_features": "rnncap.encoding.cache",
    # training
    "Trainer": "rnncap.training.trainer",
    # checkpoints
    "load_checkpoint": "rnncap.checkpoint",
    "save_checkpoint": "rnncap.checkpoint",
    # inference
    "Captioner": "rnncap.inference.sample",
    "Ensemble": "rnncap.inference.ensemble",
    "greedy_decode": "rnncap.inference.decoding",
    "sample_decode": "rnncap.inference.decoding",
    "beam_search": "rnncap.inference.decoding",
    # evaluation
    "evaluate_split": "rnncap.evaluation.evaluate",
    "coco_metrics": "rnncap.evaluation.metrics",
    # errors
    "RnncapError": "rnncap.errors",
}

__all__ = ["__version__", *_WHERE]


def __getattr__(name):
    """Import the module that defines ``name`` on first use, then keep the name here."""
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'rnncap' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(where), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
