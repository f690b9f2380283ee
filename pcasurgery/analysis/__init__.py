"""Analysis: reports, plots, threshold sweeps and per-layer threshold allocation."""

from .report import plot_saturation, report
from .sweep import DEFAULT_LADDER, allocate, sweep

__all__ = ["DEFAULT_LADDER", "allocate", "plot_saturation", "report", "sweep"]
