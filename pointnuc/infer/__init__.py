"""Inference: tiling, batched prediction, post-processing, whole-slide driver."""
