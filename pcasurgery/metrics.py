"""The seed library's ``metrics`` functions, on the statistics core.

They take a covariance matrix (a tensor) and return Python numbers. The
intrinsic dimensionality follows pcasurgery's rule (the smallest ``k`` whose
eigenvalues explain at least ``thresh`` of the variance), not the seed's
"+1 when the gap exceeds 2 %" adjustment.
"""

from __future__ import annotations

from torch import Tensor

from .core import spectrum as _s

__all__ = [
    "compute_cov_determinant",
    "compute_cov_trace",
    "compute_diag_trace",
    "compute_intrinsic_dimensionality",
    "compute_saturation",
]


def compute_intrinsic_dimensionality(cov: Tensor, thresh: float = 0.99) -> int:
    """Number of eigendirections of ``cov`` needed to explain ``thresh`` of its variance."""
    values, _ = _s.eigh_descending(cov)
    return _s.intrinsic_dimensionality(values, thresh)


def compute_saturation(cov: Tensor, thresh: float = 0.99) -> float:
    """Intrinsic dimensionality divided by the width of ``cov``: a value in [0, 1]."""
    return _s.saturation(compute_intrinsic_dimensionality(cov, thresh), cov.shape[0])


def compute_cov_determinant(cov: Tensor) -> float:
    """Determinant of the covariance matrix (generalised variance)."""
    return _s.cov_determinant(cov)


def compute_cov_trace(cov: Tensor) -> float:
    """Trace of the covariance matrix (total variance)."""
    return _s.cov_trace(cov)


def compute_diag_trace(cov: Tensor) -> float:
    """Trace of the diagonalised covariance matrix (sum of its clipped eigenvalues)."""
    return _s.diag_trace(cov)
