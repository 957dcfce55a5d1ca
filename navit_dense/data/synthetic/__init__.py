"""Synthetic datasets the demo, the tests and the benchmarks share (no downloads):

- ``lvis_shapes``: LVIS-v1-format detection images of textured shapes with a long tail
  (rare / common / frequent), written to disk (tools/make_synthetic_lvis.py);
- ``ade_regions``: ADE20K-layout segmentation images of textured regions (tools/make_synthetic_seg.py);
- ``shapes``: an in-memory classification dataset of shapes (the engine's toy task);
- ``lvis_random``: random LVIS ground truth and noisy detections, nothing rendered (evaluation tests and benchmarks).
"""
