"""Calibration statistics (Fisher information) for data-aware decomposition."""
