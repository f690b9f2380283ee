"""Few samples held as rows (``layers.statistics.ROWS_FRACTION``).

A Linear PCA layer that has seen at most half its width of samples keeps the
samples themselves, and its spectrum comes from an ``(n, n)`` problem
(``core.spectrum.pca_of_rows``). Everything it gives must equal numpy on the
float64 samples, and what the layer gives when it collects moments
(``ROWS_FRACTION = 0``): the spectrum, the moments once formed, the projection,
a compressed model.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import pcasurgery as ps
from pcasurgery import LinearPCALayer, NonFiniteError
from pcasurgery.core import moments as _m
from pcasurgery.core import spectrum as _s
from pcasurgery.layers import statistics


def _samples(n: int, width: int, offset: float = 0.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = 0.8 ** np.arange(width)
    return (rng.standard_normal((n, width)) * scales + offset).astype(np.float32)


def _numpy_spectrum(x: np.ndarray, centering: bool = True) -> tuple[np.ndarray, np.ndarray]:
    x = x.astype(np.float64)
    matrix = np.cov(x.T, bias=True) if centering else x.T @ x / len(x)
    values, vectors = np.linalg.eigh(matrix)
    return values[::-1], vectors[:, ::-1]


def _fed(x: np.ndarray, batches: int = 2, **kwargs) -> LinearPCALayer:
    layer = LinearPCALayer(x.shape[1], **kwargs)
    for part in np.array_split(x, batches):
        layer(torch.from_numpy(part))
    return layer


@pytest.mark.parametrize("centering", [True, False])
def test_few_samples_are_held_as_rows_and_give_numpys_spectrum(centering):
    x = _samples(20, 64, offset=3.0)
    layer = _fed(x, centering=centering, threshold=0.9)
    assert layer.rows_held and layer._buffers["shifted_sum_sq"].shape == (0, 0)  # never formed
    layer.compute_eigenspace()
    values, vectors = _numpy_spectrum(x, centering)
    got = layer.eigenvalues.numpy()
    np.testing.assert_allclose(got, np.clip(values, 0, None), atol=1e-12 * values[0])
    k = layer.in_dim
    assert k == _s.intrinsic_dimensionality(torch.from_numpy(values.copy()), 0.9)
    basis = layer.eigenvectors.numpy()
    assert basis.shape == (64, 20)  # those of the non-zero eigenvalues (and one zero)
    np.testing.assert_allclose(basis.T @ basis, np.eye(20), atol=1e-13)
    np.testing.assert_allclose(
        basis[:, :k] @ basis[:, :k].T, vectors[:, :k] @ vectors[:, :k].T, atol=1e-10
    )
    np.testing.assert_allclose(layer.mean.numpy(), x.astype(np.float64).mean(0), rtol=1e-12)


def test_a_mean_far_from_zero_keeps_float64_accuracy():
    x = _samples(30, 64, offset=1e6)
    layer = _fed(x, batches=3)
    assert layer.rows_held
    layer.compute_eigenspace()
    values, _ = _numpy_spectrum(x)
    np.testing.assert_allclose(layer.eigenvalues.numpy()[:5], values[:5], rtol=1e-5)
    formed = _m.covariance(layer.statistics())  # reading the square forms it, around the mean
    assert not layer.rows_held
    reference = np.cov(x.astype(np.float64).T, bias=True)
    assert np.abs(formed.numpy() - reference).max() <= 1e-5 * np.abs(reference).max()


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_samples_past_half_the_width_turn_the_rows_into_moments(offset):
    x = _samples(48, 64, offset=offset)
    layer = _fed(x[:24], batches=2)
    assert layer.rows_held
    layer(torch.from_numpy(x[24:]))  # 48 > 32: moments from here on
    assert not layer.rows_held and layer.sample_rows == 48
    reference = np.cov(x.astype(np.float64).T, bias=True)
    covariance = _m.covariance(layer.statistics()).numpy()
    assert np.abs(covariance - reference).max() <= 1e-6 * np.abs(reference).max()
    np.testing.assert_allclose(
        _m.mean(layer.statistics()).numpy(), x.astype(np.float64).mean(0), rtol=1e-9, atol=1e-6
    )


def test_rows_and_moments_give_the_same_layer(monkeypatch):
    x = _samples(24, 64, offset=2.0)
    rows = _fed(x, threshold=0.95)
    monkeypatch.setattr(statistics, "ROWS_FRACTION", 0.0)
    moments = _fed(x, threshold=0.95)
    assert rows.rows_held and not moments.rows_held
    for layer in (rows, moments):
        layer.compute_eigenspace()
        layer.eval()
    assert rows.in_dim == moments.in_dim
    probe = torch.from_numpy(_samples(10, 64, offset=2.0, seed=1))
    torch.testing.assert_close(rows(probe), moments(probe), atol=1e-5, rtol=1e-5)


def test_a_layer_holding_rows_saves_and_loads():
    x = _samples(20, 64)
    layer = _fed(x, threshold=0.9)
    layer.compute_eigenspace()
    layer.eval()
    fresh = LinearPCALayer(64, threshold=0.9)
    fresh.load_state_dict(layer.state_dict())
    fresh.eval()
    probe = torch.from_numpy(_samples(5, 64, seed=2))
    torch.testing.assert_close(fresh(probe), layer(probe))
    np.testing.assert_allclose(
        _m.covariance(fresh.statistics()).numpy(), np.cov(x.astype(np.float64).T, bias=True),
        atol=1e-12,
    )  # fmt: skip


def test_a_non_finite_batch_names_the_layer_and_keeps_the_rows():
    x = _samples(10, 64)
    layer = _fed(x[:6], batches=1)
    bad = torch.from_numpy(x[6:]).clone()
    bad[1, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="received NaN"):
        layer(bad)
    assert layer.rows_held and layer.sample_rows == 6
    layer.compute_eigenspace()
    np.testing.assert_allclose(
        layer.eigenvalues.numpy(), np.clip(_numpy_spectrum(x[:6])[0], 0, None), atol=1e-12
    )


def test_the_caller_s_float64_batch_is_copied_not_kept():
    x = torch.from_numpy(_samples(6, 64).astype(np.float64))
    layer = LinearPCALayer(64)
    layer(x)
    expected = _numpy_spectrum(x.numpy())[0]
    x.zero_()
    layer.compute_eigenspace()
    np.testing.assert_allclose(layer.eigenvalues.numpy(), np.clip(expected, 0, None), atol=1e-12)


class _Twin(nn.Module):
    """Two widening Linears fed the same tensor (a Llama MLP's gate and up)."""

    def __init__(self):
        super().__init__()
        self.gate, self.up = nn.Linear(16, 64), nn.Linear(16, 64)

    def forward(self, x):
        return self.gate(x) * self.up(x)


def test_widening_layers_calibrated_on_few_inputs_hold_their_outputs_as_rows(monkeypatch):
    model = _Twin()
    x = torch.from_numpy(_samples(8, 16, offset=1.0))  # 8 rows: at most half of 16 and 64
    wrapped = ps.pca_wrap(model, threshold=0.95)
    with pytest.warns(UserWarning, match="fewer samples .* than they are wide"):
        ps.calibrate(wrapped, [x[:3], x[3:]], progress=False)
    layers = ps.pca_layers_of(wrapped)
    assert all(layer.rows_held for layer in layers.values())
    x64 = x.double().numpy()
    for name in ("gate", "up"):
        module = getattr(model, name)
        outputs = (
            x64 @ module.weight.detach().double().numpy().T + module.bias.detach().double().numpy()
        )
        values, vectors = _numpy_spectrum(outputs)
        layer = layers[name]
        np.testing.assert_allclose(
            layer.eigenvalues.numpy(), np.clip(values, 0, None), atol=1e-12 * values[0]
        )
        k = layer.in_dim
        basis = layer.reduced_transformation_matrix.double().numpy()
        np.testing.assert_allclose(
            basis @ basis.T, vectors[:, :k] @ vectors[:, :k].T, atol=1e-5
        )  # fmt: skip
    # the same model calibrated on moments compresses to the same outputs
    monkeypatch.setattr(statistics, "ROWS_FRACTION", 0.0)
    reference = ps.pca_wrap(copy.deepcopy(model), threshold=0.95)
    with pytest.warns(UserWarning, match="fewer samples"):
        ps.calibrate(reference, [x[:3], x[3:]], progress=False)
    assert not any(layer.rows_held for layer in ps.pca_layers_of(reference).values())
    probe = torch.from_numpy(_samples(5, 16, offset=1.0, seed=3))
    torch.testing.assert_close(
        ps.compress(wrapped, progress=False)(probe),
        ps.compress(reference, progress=False)(probe),
        atol=1e-4,
        rtol=1e-4,
    )


def test_pca_of_rows_refuses_more_rows_than_features():
    with pytest.raises(ValueError, match="n <= d"):
        _s.pca_of_rows(torch.zeros(5, 4, dtype=torch.float64))
