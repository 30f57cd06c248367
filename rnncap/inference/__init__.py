"""Stage 5, inference: the decoders (greedy, sampling, beam search), the Captioner behind `rnncap caption`, and `rnncap serve`."""
