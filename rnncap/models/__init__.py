"""Stage 3, the models: the layers with their hand-written backward passes, the h0 captioner, the attention captioner and the Transformer captioner."""
# Importing every model module registers its class (rnncap.models.registry).
from . import attention, model, transformer  # noqa: F401
