"""Analysis: reports, plots, threshold sweeps and per-layer threshold allocation."""

from .budget import apply_plan, budget_plan
from .report import plot_saturation, report
from .sequential import calibrate_sequential, compress_sequential, forward_sequential
from .sweep import DEFAULT_LADDER, allocate, sweep

__all__ = [
    "DEFAULT_LADDER",
    "allocate",
    "apply_plan",
    "budget_plan",
    "calibrate_sequential",
    "compress_sequential",
    "forward_sequential",
    "plot_saturation",
    "report",
    "sweep",
]
