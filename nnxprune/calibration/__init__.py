"""Calibration for post-training pruning: the sequential block-by-block driver (`sequential`).

The calibration samples themselves come from `nnxprune.data.calibration_samples`.
"""
