"""Stage 6, evaluation: the COCO metrics, CIDEr-D in NumPy, `rnncap evaluate` and the HTML reports."""
