"""Surgery and calibration: ``pca_wrap`` (torch.fx rewrite, hook fallback) and ``calibrate``."""

from .calibrate import all_reduce_statistics, calibrate
from .wrap import PCATracer, pca_wrap

__all__ = ["PCATracer", "all_reduce_statistics", "calibrate", "pca_wrap"]
