"""Measured calibration data: the file format, import, bead finding, the noise model."""
