"""Statistics core: streaming moments and spectra on plain tensors (no ``nn.Module``)."""

from .covariance_matrix import TorchCovarianceMatrix
from .moments import (
    Moments,
    all_reduce_moments,
    covariance,
    empty_moments,
    map_moments,
    mean,
    merge_moments,
    reshift,
    second_moment,
)
from .spectrum import (
    cov_determinant,
    cov_trace,
    diag_trace,
    eigh_descending,
    eigh_through,
    embed,
    explained_fraction,
    explained_fractions,
    intrinsic_dimensionality,
    projection_affine,
    random_orthogonal,
    saturation,
)

__all__ = [
    "Moments",
    "TorchCovarianceMatrix",
    "all_reduce_moments",
    "cov_determinant",
    "cov_trace",
    "covariance",
    "diag_trace",
    "eigh_descending",
    "eigh_through",
    "embed",
    "empty_moments",
    "map_moments",
    "explained_fraction",
    "explained_fractions",
    "intrinsic_dimensionality",
    "mean",
    "merge_moments",
    "projection_affine",
    "random_orthogonal",
    "reshift",
    "saturation",
    "second_moment",
]
