"""Shared fixtures: data with a known, decaying spectrum."""

from __future__ import annotations

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


def decaying_data(
    n: int, d: int, offset: float = 0.0, seed: int = 0, decay: float = 0.6, dtype=np.float32
) -> np.ndarray:
    """``n`` samples in ``d`` dimensions whose variances decay geometrically, in a random basis."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    scales = decay ** np.arange(d)
    x = rng.normal(size=(n, d)) * scales @ basis.T
    return (x + offset).astype(dtype)


@pytest.fixture
def data():
    return decaying_data(2000, 12)


def relative_error(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
