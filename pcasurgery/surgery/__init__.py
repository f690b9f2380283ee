"""Surgery and calibration: ``pca_wrap`` (torch.fx rewrite, module-level fallback) and ``calibrate``."""

from .calibrate import all_reduce_statistics, calibrate
from .wrap import pca_wrap

__all__ = ["all_reduce_statistics", "calibrate", "pca_wrap"]
