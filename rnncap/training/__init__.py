"""Stage 4, training: the trainer, self-critical training, data-parallel training and the optimisers."""
