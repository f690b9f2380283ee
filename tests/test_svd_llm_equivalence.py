"""Uncentred output PCA is the activation-aware low-rank optimum (the SVD-LLM objective).

For a Linear without bias, ``y = W x``, the rank-``k`` map ``W'`` minimising
``||W X - W' X||_F`` over the calibration inputs ``X`` is found independently
by whitening: with ``X X^T = S S^T`` (Cholesky), ``W' = trunc_k(W S) S^{-1}``.
Uncentred PCA of the outputs keeps ``V_k V_k^T W``, with ``V_k`` the top
eigenvectors of ``E[y y^T]``. The two must agree; centring then differs
(it is the optimum for the centred outputs, with the mean carried by a bias).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import pcasurgery as ps


def whitened_svd(weight: np.ndarray, inputs: np.ndarray, k: int) -> np.ndarray:
    """SVD-LLM: the rank-k W' minimising ||W X - W' X||, by Cholesky whitening then SVD."""
    gram = inputs.T @ inputs  # X X^T with samples as rows of `inputs`
    s = np.linalg.cholesky(gram)
    u, sigma, vt = np.linalg.svd(weight @ s)
    return (u[:, :k] * sigma[:k]) @ vt[:k] @ np.linalg.inv(s)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_uncentred_output_pca_is_the_whitened_svd_optimum(k):
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(2000, 12)) @ rng.normal(size=(12, 12)) + 0.5  # correlated, offset
    layer = nn.Linear(12, 10, bias=False).double()
    torch.manual_seed(0)
    wrapped = ps.pca_wrap(nn.Sequential(layer), centering=False)
    ps.calibrate(wrapped, [torch.from_numpy(inputs)], progress=False)
    pca = ps.pca_layers_of(wrapped)["0"]
    pca.threshold = ps.core.explained_fraction(pca.eigenvalues, k)
    assert pca.in_dim == k
    basis = pca.reduced_transformation_matrix.numpy()
    weight = layer.weight.detach().numpy()
    ours = basis @ basis.T @ weight
    reference = whitened_svd(weight, inputs, k)
    np.testing.assert_allclose(ours, reference, rtol=1e-7, atol=1e-9)
    error = np.linalg.norm(inputs @ (weight - ours).T)
    # and it is the optimum: the plain truncated SVD of W does worse on these inputs
    u, sigma, vt = np.linalg.svd(weight)
    plain = (u[:, :k] * sigma[:k]) @ vt[:k]
    assert error < np.linalg.norm(inputs @ (weight - plain).T)


def test_centring_finds_the_optimum_for_the_centred_outputs():
    rng = np.random.default_rng(1)
    inputs = rng.normal(size=(2000, 8)) @ rng.normal(size=(8, 8)) + 3.0
    layer = nn.Linear(8, 8, bias=False).double()
    wrapped = ps.calibrate(ps.pca_wrap(nn.Sequential(layer), 0.9), [torch.from_numpy(inputs)],
                           progress=False)  # fmt: skip
    pca = ps.pca_layers_of(wrapped)["0"]
    k = pca.in_dim
    centred = inputs - inputs.mean(0)
    weight = layer.weight.detach().numpy()
    reference = whitened_svd(weight, centred, k)
    basis = pca.reduced_transformation_matrix.numpy()
    np.testing.assert_allclose(basis @ basis.T @ weight, reference, rtol=1e-6, atol=1e-8)
