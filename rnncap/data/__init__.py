"""Stage 1, the data: datasets and their captions, the vocabulary, photos, downloads, and the synthetic scenes."""
