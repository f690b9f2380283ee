"""The seed library's ``pca_layers`` module: PCA layers and the ``change_all_*`` helpers."""

from __future__ import annotations

import numpy as np

from .core.spectrum import random_orthogonal
from .layers.network import (
    change_all_pca_layer_centering,
    change_all_pca_layer_thresholds,
    change_all_pca_layer_thresholds_and_inject_random_directions,
)
from .layers.pca import Conv2DPCALayer, LinearPCALayer, PCALayer

__all__ = [
    "Conv2DPCALayer",
    "LinearPCALayer",
    "PCALayer",
    "change_all_pca_layer_centering",
    "change_all_pca_layer_thresholds",
    "change_all_pca_layer_thresholds_and_inject_random_directions",
    "rvs",
]


def rvs(dim: int = 3, random_state: int | np.random.Generator | None = None) -> np.ndarray:
    """Create a random orthonormal matrix of size ``dim`` (Haar measure on SO(dim)).

    Args:
        dim: matrix size.
        random_state: seed or ``numpy.random.Generator``; ``None`` uses NumPy's
            global state, as the seed library did.

    Example:
        >>> q = rvs(4, random_state=0)
        >>> bool(np.allclose(q @ q.T, np.eye(4))), round(float(np.linalg.det(q)), 6)
        (True, 1.0)
    """
    return random_orthogonal(dim, random_state)
