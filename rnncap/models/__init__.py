"""Stage 3, the models: the layers with their hand-written backward passes, the h0 captioner and the attention captioner."""
