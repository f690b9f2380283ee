"""Analysis: reports and plots of what each PCA layer uses."""

from .report import plot_saturation, report

__all__ = ["plot_saturation", "report"]
