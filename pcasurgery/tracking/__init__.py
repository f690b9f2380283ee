"""Training-time saturation tracking (``CheckLayerSat``) and its writers, on the statistics core."""

from .saturation import CONV_METHODS, STATS, TIMESERIES_METHODS, CheckLayerSat, SaturationTracker
from .writers import (
    STATMAP,
    WRITERS,
    AbstractWriter,
    CompositWriter,
    CSVandPlottingWriter,
    CSVWriter,
    NPYWriter,
    PrintWriter,
    TensorBoardWriter,
)

__all__ = [
    "CONV_METHODS",
    "STATMAP",
    "STATS",
    "TIMESERIES_METHODS",
    "WRITERS",
    "AbstractWriter",
    "CSVWriter",
    "CSVandPlottingWriter",
    "CheckLayerSat",
    "CompositWriter",
    "NPYWriter",
    "PrintWriter",
    "SaturationTracker",
    "TensorBoardWriter",
]
