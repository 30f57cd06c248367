"""The benchmark, `rnncap bench`: rnncap's training step and decoders timed against PyTorch peers of the same models."""
