"""Training: losses, data, the fit loop, stage 1 (detection) and stage 2 (segmentation)."""
