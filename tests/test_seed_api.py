"""The seed library's documented API keeps working: module paths, signatures, returns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import decaying_data
from torch import nn

import pcasurgery
from pcasurgery import metrics
from pcasurgery.pca_layers import (
    Conv2DPCALayer,
    LinearPCALayer,
    change_all_pca_layer_centering,
    change_all_pca_layer_thresholds,
    change_all_pca_layer_thresholds_and_inject_random_directions,
    rvs,
)
from pcasurgery.torch_utils import TorchCovarianceMatrix


class SeedNet(nn.Module):
    """The kind of network seed users build by hand: PCA layers after conv and linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_pca = Conv2DPCALayer(8, verbose=False)
        self.fc = nn.Linear(8 * 4 * 4, 16)
        self.fc_pca = LinearPCALayer(16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        x = self.conv_pca(torch.relu(self.conv(x)))
        return self.out(self.fc_pca(torch.relu(self.fc(x.flatten(1)))))


@pytest.fixture
def seed_net():
    torch.manual_seed(0)
    net = SeedNet()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(32, 3, 4, 4))
    net.eval()(torch.randn(2, 3, 4, 4))
    return net


def test_seed_module_paths_and_names_import():
    assert pcasurgery.TorchCovarianceMatrix is TorchCovarianceMatrix
    assert pcasurgery.pca_layers.LinearPCALayer is pcasurgery.LinearPCALayer
    layer = LinearPCALayer(5, 0.9, True, False, 20, True)  # positional, seed order
    conv = Conv2DPCALayer(4, 0.9, False, 20, False, None)
    assert (layer.threshold, layer.keepdim, layer.centering) == (0.9, True, True)
    assert (conv.threshold, conv.centering, conv.downsampling) == (0.9, False, None)


def test_change_all_thresholds_returns_the_seed_tuple(seed_net):
    sat, in_dims, fs_dims, names = change_all_pca_layer_thresholds(0.9, seed_net)
    assert names == ["Conv-0", "Lin-0"]
    assert fs_dims == [8, 16]
    assert in_dims == [seed_net.conv_pca.in_dim, seed_net.fc_pca.in_dim]
    assert sat == [round(100 * k / w, 4) for k, w in zip(in_dims, fs_dims, strict=True)]
    assert all(layer.threshold == 0.9 for layer in (seed_net.conv_pca, seed_net.fc_pca))


def test_inject_random_directions_returns_the_seed_tuples(seed_net):
    result = change_all_pca_layer_thresholds_and_inject_random_directions(0.95, seed_net)
    assert len(result) == 3
    sat, in_dims, fs_dims, names = change_all_pca_layer_thresholds_and_inject_random_directions(
        0.95, seed_net, include_names=True
    )
    assert names == ["Conv-0", "Linear-0"]
    assert bool(seed_net.fc_pca.random_directions) and bool(seed_net.conv_pca.random_directions)
    p = seed_net.fc_pca.transformation_matrix.double()
    assert float(torch.trace(p)) == pytest.approx(in_dims[1], abs=1e-4)


def test_change_all_centering_sets_centering_and_conv_downsampling(seed_net):
    sat, in_dims, fs_dims = change_all_pca_layer_centering(True, seed_net, downsampling=2)
    assert seed_net.conv_pca.centering and seed_net.fc_pca.centering
    assert seed_net.conv_pca.downsampling == 2
    assert fs_dims == [8, 16]


def test_rvs_is_a_random_rotation():
    np.random.seed(0)
    q = rvs(5)
    np.testing.assert_allclose(q @ q.T, np.eye(5), atol=1e-12)
    assert np.linalg.det(q) == pytest.approx(1.0)
    assert rvs().shape == (3, 3)
    np.testing.assert_array_equal(rvs(4, random_state=1), rvs(4, random_state=1))


def test_metrics_match_numpy():
    x = decaying_data(1000, 8, decay=0.8).astype(np.float64)
    cov_np = np.cov(x, rowvar=False, bias=True)
    cov = torch.from_numpy(cov_np)
    values = np.linalg.eigvalsh(cov_np)[::-1]
    k = int(np.searchsorted(np.cumsum(values) / values.sum(), 0.9) + 1)
    assert metrics.compute_intrinsic_dimensionality(cov, 0.9) == k
    assert metrics.compute_saturation(cov, 0.9) == pytest.approx(k / 8)
    assert metrics.compute_cov_determinant(cov) == pytest.approx(np.linalg.det(cov_np), rel=1e-9)
    assert metrics.compute_cov_trace(cov) == pytest.approx(np.trace(cov_np))
    assert metrics.compute_diag_trace(cov) == pytest.approx(values.sum())


def test_torch_covariance_matrix_follows_the_seed_formula():
    x = decaying_data(3000, 6, offset=1e6)
    cov = TorchCovarianceMatrix(device="cpu", save_data=True)
    for chunk in np.array_split(x, 7):
        cov.update(torch.from_numpy(chunk))
    x64 = x.astype(np.float64)
    reference = np.cov(x64, rowvar=False, bias=True)
    assert np.linalg.norm(cov.fix().numpy() - reference) / np.linalg.norm(reference) < 1e-5
    np.testing.assert_allclose(cov.fix(center=False).numpy(), x64.T @ x64 / len(x64), rtol=1e-9)
    assert cov._tlen == 3000 and cov.saved_samples.shape == (3000, 6)
    # the seed's transposed layout
    transposed = TorchCovarianceMatrix(device="cpu")
    transposed.update(torch.from_numpy(x[:100].T.copy()), vae=True)
    np.testing.assert_allclose(
        transposed.fix().numpy(), np.cov(x64[:100], rowvar=False, bias=True), rtol=1e-4, atol=1e-6
    )


def test_torch_covariance_matrix_merges_and_validates():
    x = decaying_data(1000, 4, dtype=np.float64)
    a, b, whole = (TorchCovarianceMatrix(device="cpu") for _ in range(3))
    a.update(torch.from_numpy(x[:300]))
    b.update(torch.from_numpy(x[300:]))
    whole.update(torch.from_numpy(x))
    np.testing.assert_allclose(a.merge(b).fix().numpy(), whole.fix().numpy(), rtol=1e-10)
    with pytest.raises(RuntimeError, match="before any update"):
        TorchCovarianceMatrix(device="cpu").fix()
    with pytest.raises(ValueError, match="x has 5 features but earlier batches had 4"):
        a.update(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="NaN or infinite"):
        a.update(torch.full((2, 4), float("inf")))


def test_default_cuda_device_falls_back_to_cpu_with_a_warning():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.warns(UserWarning, match="CUDA is not available"):
        cov = TorchCovarianceMatrix()
    assert cov.device == torch.device("cpu")
