"""Stage 2, encoding: the CNN encoders and the HDF5 feature cache they fill (one process or Ray)."""
