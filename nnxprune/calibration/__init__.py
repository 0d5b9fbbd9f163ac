"""Calibration data (drawn as the Wanda / SparseGPT reference code draws it) for post-training
pruning."""

from nnxprune.calibration.data import DATASETS, FILE_SUFFIXES, CalibrationSet, calibration_samples

__all__ = ["CalibrationSet", "calibration_samples", "DATASETS", "FILE_SUFFIXES"]
