"""Surgery and calibration: ``pca_wrap`` (PCA layers attached to modules: a class swap, ``F.linear``
call sites, or a wrapper) and ``calibrate``."""

from .calibrate import all_reduce_statistics, calibrate
from .wrap import pca_wrap

__all__ = ["all_reduce_statistics", "calibrate", "pca_wrap"]
