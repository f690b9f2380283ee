"""The seed library's ``writers`` module."""

from .tracking.writers import (
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
    "STATMAP",
    "WRITERS",
    "AbstractWriter",
    "CSVWriter",
    "CSVandPlottingWriter",
    "CompositWriter",
    "NPYWriter",
    "PrintWriter",
    "TensorBoardWriter",
]
