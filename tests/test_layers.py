"""LinearPCALayer and Conv2DPCALayer against scikit-learn and numpy."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from conftest import decaying_data, relative_error
from sklearn.decomposition import PCA

from pcasurgery import Conv2DPCALayer, LinearPCALayer, NotCalibratedError
from pcasurgery.core import spectrum
from pcasurgery.core.spectrum import explained_fractions


def fitted_linear(x: np.ndarray, batch: int = 250, **kwargs) -> LinearPCALayer:
    layer = LinearPCALayer(x.shape[-1], **kwargs)
    t = torch.from_numpy(x)
    for i in range(0, len(t), batch):
        layer(t[i : i + batch])
    layer.compute_eigenspace()
    return layer.eval()


@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.99, 0.999])
@pytest.mark.parametrize("keepdim", [True, False])
def test_linear_projection_matches_sklearn(threshold, keepdim):
    x = decaying_data(3000, 16, offset=5.0, decay=0.7)
    layer = fitted_linear(x, threshold=threshold, keepdim=keepdim)
    x64 = x.astype(np.float64)
    pca = PCA(n_components=threshold, svd_solver="full").fit(x64)
    assert layer.in_dim == pca.n_components_
    assert layer.fs_dim == 16 and layer.sat == round(100 * pca.n_components_ / 16, 4)
    out = layer(torch.from_numpy(x)).double().numpy()
    expected = pca.inverse_transform(pca.transform(x64)) if keepdim else pca.transform(x64)
    np.testing.assert_allclose(out, expected, atol=2e-4 * np.abs(expected).max())
    np.testing.assert_allclose(layer.mean.numpy(), x64.mean(0), rtol=1e-10, atol=1e-7)
    np.testing.assert_allclose(
        layer.eigenvalues.numpy()[: pca.n_components_],
        pca.explained_variance_ * (len(x) - 1) / len(x),
        rtol=1e-5,
    )


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_large_offset_float32_activations_keep_float64_accuracy(offset):
    x = decaying_data(4000, 10, offset=offset)
    layer = fitted_linear(x, threshold=0.99)
    reference = np.cov(x.astype(np.float64), rowvar=False, bias=True)
    ref_values = np.linalg.eigvalsh(reference)[::-1]
    cov = (
        layer.eigenvectors.numpy()
        @ np.diag(layer.eigenvalues.numpy())
        @ layer.eigenvectors.numpy().T
    )
    assert relative_error(cov, reference) <= 1e-5
    np.testing.assert_allclose(layer.eigenvalues.numpy()[:3], ref_values[:3], rtol=1e-5)


def test_uncentred_layer_decomposes_the_second_moment_through_the_origin():
    x = decaying_data(2000, 8, offset=2.0)
    layer = fitted_linear(x, threshold=0.95, centering=False)
    x64 = x.astype(np.float64)
    values, vectors = np.linalg.eigh(x64.T @ x64 / len(x))
    values, vectors = values[::-1], vectors[:, ::-1]
    k = int(np.searchsorted(np.cumsum(values) / values.sum(), 0.95) + 1)
    assert layer.in_dim == k
    projector = vectors[:, :k] @ vectors[:, :k].T
    np.testing.assert_allclose(
        layer(torch.from_numpy(x)).double().numpy(), x64 @ projector, atol=1e-4
    )


def test_linear_accepts_tokens():
    x = decaying_data(1200, 6)
    tokens = torch.from_numpy(x).reshape(100, 12, 6)
    layer = LinearPCALayer(6, threshold=0.9)
    layer(tokens)
    assert layer.samples == 100 and int(layer.sample_count) == 1200
    flat = fitted_linear(x, batch=1200, threshold=0.9)
    layer.eval()
    torch.testing.assert_close(layer(tokens), flat(tokens.reshape(-1, 6)).reshape(100, 12, 6))


@pytest.mark.parametrize("keepdim", [True, False])
def test_conv_layer_is_channelwise_and_one_1x1_convolution(keepdim):
    rng = np.random.default_rng(3)
    mix = rng.normal(size=(8, 8)) * (0.5 ** np.arange(8))
    x = (np.einsum("bchw,dc->bdhw", rng.normal(size=(40, 8, 5, 5)), mix) + 3).astype(np.float32)
    layer = Conv2DPCALayer(8, threshold=0.95, centering=True, verbose=False, keepdim=keepdim)
    t = torch.from_numpy(x)
    layer(t[:20])
    layer(t[20:])
    layer.eval()
    rows = x.transpose(0, 2, 3, 1).reshape(-1, 8).astype(np.float64)
    pca = PCA(n_components=0.95, svd_solver="full").fit(rows)
    projected = layer(t)  # the first eval call decomposes; reading in_dim never does
    assert layer.in_dim == pca.n_components_
    out = (
        projected.double().numpy().transpose(0, 2, 3, 1).reshape(-1, 8 if keepdim else layer.in_dim)
    )
    expected = pca.inverse_transform(pca.transform(rows)) if keepdim else pca.transform(rows)
    np.testing.assert_allclose(out, expected, atol=1e-4)
    assert layer.samples == 40


def test_conv_downsampling_collects_on_smaller_maps():
    layer = Conv2DPCALayer(3, downsampling=4, verbose=False)
    layer(torch.randn(2, 3, 16, 16))
    assert int(layer.sample_count) == 2 * 4 * 4
    out = layer.eval()(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 3, 16, 16)


def test_setting_threshold_reuses_the_cached_spectrum(monkeypatch):
    x = decaying_data(2000, 12, decay=0.7)
    layer = fitted_linear(x, threshold=0.99)
    layer(torch.from_numpy(x[:1]))  # computes the eigenspace once
    calls = []
    original = spectrum.eigh_descending
    monkeypatch.setattr(spectrum, "eigh_descending", lambda m: calls.append(1) or original(m))
    for t in (0.5, 0.8, 0.95):
        layer.threshold = t
        assert (
            layer.in_dim
            == PCA(n_components=t, svd_solver="full").fit(x.astype(np.float64)).n_components_
        )
    assert calls == []
    layer.centering = False  # a different matrix: one new decomposition, no new data
    assert len(calls) == 1 and layer.centering is False


def test_the_scalar_settings_are_read_without_reading_a_tensor(monkeypatch):
    """threshold, centering, keepdim and k come from host mirrors (no device sync on a GPU)."""
    layer = fitted_linear(decaying_data(200, 6, decay=0.7), threshold=0.9)
    layer.threshold, layer.centering = 0.8, False
    k = int(layer.rank)
    for name in ("__bool__", "__float__", "__int__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, **kw: pytest.fail("a tensor was read"))
    assert (layer.threshold, layer.centering, layer.keepdim) == (0.8, False, True)
    assert layer.in_dim == k


def test_state_dict_round_trips_into_a_fresh_layer():
    x = decaying_data(1500, 10, offset=1.0)
    for keepdim in (True, False):
        layer = fitted_linear(x, threshold=0.9, keepdim=keepdim)
        expected = layer(torch.from_numpy(x))
        fresh = LinearPCALayer(10, keepdim=keepdim).eval()
        fresh.load_state_dict(layer.state_dict())
        torch.testing.assert_close(fresh(torch.from_numpy(x)), expected)
        assert fresh.threshold == 0.9 and fresh.in_dim == layer.in_dim
        buffer = io.BytesIO()
        torch.save(layer.state_dict(), buffer)
        buffer.seek(0)
        again = LinearPCALayer(10, keepdim=keepdim).eval()
        again.load_state_dict(torch.load(buffer, weights_only=True))
        torch.testing.assert_close(again(torch.from_numpy(x)), expected)
        clone = pickle.loads(pickle.dumps(layer))
        torch.testing.assert_close(clone(torch.from_numpy(x)), expected)


def test_dtype_casts_keep_statistics_in_float64():
    layer = fitted_linear(decaying_data(500, 4), threshold=0.9)
    layer(torch.zeros(1, 4))
    layer.half()
    assert layer.shifted_sum_sq.dtype == torch.float64 and layer.eigenvectors.dtype == torch.float64
    assert layer.projection_weight.dtype == torch.float16
    layer.double()
    out = layer(torch.ones(2, 4, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_constant_outputs_have_rank_zero_and_project_onto_their_mean():
    layer = LinearPCALayer(5, threshold=0.99)
    layer(torch.full((64, 5), 2.5))
    layer.eval()
    out = layer(torch.randn(3, 5))
    assert layer.in_dim == 0 and layer.sat == 0.0 and layer.saturation == 0.0
    torch.testing.assert_close(out, torch.full((3, 5), 2.5))
    assert torch.isfinite(out).all()


def test_random_directions_are_a_projector_of_the_same_rank():
    x = decaying_data(2000, 12, decay=0.7)
    layer = fitted_linear(x, threshold=0.9)
    pca_projector = layer.transformation_matrix.double()
    k = layer.in_dim
    layer.inject_random_directions(random_state=0)
    p = layer.transformation_matrix.double()
    torch.testing.assert_close(p, p.T, atol=1e-6, rtol=0)
    torch.testing.assert_close(p @ p, p, atol=1e-5, rtol=0)
    assert float(torch.trace(p)) == pytest.approx(k, abs=1e-4)
    assert (p - pca_projector).abs().max() > 0.1
    assert bool(layer.random_directions)
    layer.threshold = 0.9  # restores the PCA projection
    torch.testing.assert_close(layer.transformation_matrix.double(), pca_projector)


def test_training_mode_is_identity_and_seed_epochs_restart_statistics():
    layer = LinearPCALayer(3)
    x = torch.randn(10, 3)
    assert torch.equal(layer(x), x)
    layer.eval()(x)  # computes from the first "epoch"
    layer.train()(torch.randn(7, 3))
    assert int(layer.sample_count) == 7  # the next training phase starts afresh, as in the seed


def test_collect_mode_collects_in_eval_and_project_mode_projects_in_training():
    layer = LinearPCALayer(3).eval()
    layer.mode = "collect"
    layer(torch.randn(10, 3))
    assert int(layer.sample_count) == 10
    layer.threshold = 0.5
    layer.compute_eigenspace()
    assert layer.in_dim < 3  # a real projection, not the identity
    layer.mode = "project"
    layer.train()
    x = torch.randn(4, 3)
    out = layer(x)
    assert int(layer.sample_count) == 10
    v, mu = layer.reduced_transformation_matrix.double(), layer.mean
    expected = (x.double() - mu) @ v @ v.T + mu
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, x, atol=1e-3)
    with pytest.raises(ValueError, match="mode must be one of 'auto', 'collect', 'project'"):
        layer.mode = "train"


def test_statistics_collect_under_inference_mode_and_projection_still_trains():
    layer = LinearPCALayer(4)
    layer.mode = "collect"
    with torch.inference_mode():
        layer(torch.randn(50, 4))
    layer.compute_eigenspace()
    layer.mode = "project"
    x = torch.randn(3, 4, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and not layer.projection_weight.is_inference()


def test_uncalibrated_layer_passes_through_but_refuses_an_explicit_projection():
    layer = LinearPCALayer(4)
    layer.eval()
    x = torch.randn(2, 4)
    assert torch.equal(layer(x), x)
    with pytest.raises(NotCalibratedError, match=layer.name):
        layer.project(x)
    with pytest.raises(NotCalibratedError, match="no statistics"):
        _ = layer.in_dim


def test_bad_inputs_name_the_layer_and_the_value():
    layer = LinearPCALayer(4)
    layer.name = "fc1"
    with pytest.raises(ValueError, match=r"'fc1' has width 4 .* shape \(2, 5\)"):
        layer(torch.randn(2, 5))
    with pytest.raises(ValueError, match="'fc1' received NaN or infinite"):
        layer(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\] .*got 1.5"):
        LinearPCALayer(4, threshold=1.5)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\] .*got 0.0"):
        layer.threshold = 0.0
    with pytest.raises(TypeError, match="in_features must be a positive integer"):
        LinearPCALayer(4.0)
    with pytest.raises(ValueError, match=r"expects \(batch, 3, h, w\)"):
        Conv2DPCALayer(3, verbose=False)(torch.randn(2, 3))


def test_threshold_one_reproduces_the_input():
    x = decaying_data(500, 6)
    layer = fitted_linear(x, threshold=1.0)
    assert layer.in_dim == 6
    torch.testing.assert_close(
        layer(torch.from_numpy(x)), torch.from_numpy(x), atol=1e-4, rtol=1e-5
    )


def test_checkpoints_written_before_the_newer_buffers_still_load():
    x = torch.from_numpy(decaying_data(300, 6))
    layer = LinearPCALayer(6, 0.9)
    layer(x)
    layer.eval()(x[:1])
    old = {
        k: v for k, v in layer.state_dict().items() if k not in ("_keepdim", "statistics_shared")
    }
    fresh = LinearPCALayer(6, 0.5)
    fresh.load_state_dict(old)  # strict: no missing key is reported for them
    assert fresh.threshold == pytest.approx(0.9) and fresh.in_dim == layer.in_dim
    torch.testing.assert_close(fresh.eval()(x[:4]), layer(x[:4]))
    with pytest.raises(RuntimeError, match="Missing key.*eigenvalues"):
        LinearPCALayer(6).load_state_dict({k: v for k, v in old.items() if k != "eigenvalues"})


def test_a_threshold_with_the_same_k_keeps_the_projection_and_a_new_k_rebuilds_it():
    torch.manual_seed(0)
    layer = LinearPCALayer(12, 0.9)
    layer.collect(torch.randn(400, 12) @ torch.diag(torch.linspace(3.0, 0.1, 12)))
    layer.compute_eigenspace()
    k, weight = layer.in_dim, layer.projection_weight
    fractions = explained_fractions(layer.eigenvalues)
    layer.threshold = float(fractions[k - 1]) - 1e-9  # still k directions
    assert layer.in_dim == k and layer.projection_weight is weight
    layer.threshold = float(fractions[k - 1]) + 1e-9  # one more
    assert layer.in_dim == k + 1 and layer.projection_weight is not weight
    v = layer.eigenvectors[:, : k + 1]
    torch.testing.assert_close(layer.projection_weight.double(), v @ v.T, atol=1e-6, rtol=0)
    layer.inject_random_directions(0)
    layer.threshold = layer.threshold  # restores the PCA projection, same k or not
    assert not bool(layer.random_directions)
    torch.testing.assert_close(layer.projection_weight.double(), v @ v.T, atol=1e-6, rtol=0)


def test_squares_are_allocated_with_the_first_batch_and_released_on_reset():
    layer = LinearPCALayer(64, threshold=0.9)
    assert layer.shifted_sum_sq.numel() == 0 and layer.projection_weight.numel() == 0
    assert layer.eigenvectors.numel() == 0  # nothing width x width before data
    assert layer.statistics().total_sq.shape == (64, 64)  # read as zeros
    layer(torch.randn(100, 64))
    assert layer.shifted_sum_sq.shape == (64, 64)
    layer.reset_statistics()
    assert layer.shifted_sum_sq.numel() == 0
    fresh = LinearPCALayer(64, threshold=0.9)
    fresh.load_state_dict(layer.state_dict())  # an empty checkpoint loads as it is
    assert fresh.shifted_sum_sq.numel() == 0 and not fresh.is_calibrated


@pytest.mark.parametrize("keepdim", [True, False])
def test_a_projection_onto_few_directions_is_held_as_two_skinny_maps(keepdim):
    x = decaying_data(2000, 32, offset=3.0, decay=0.5)
    layer = fitted_linear(x, threshold=0.9, keepdim=keepdim)
    k = layer.in_dim
    assert 2 * k < 32 and layer.projection_weight.shape == (k, 32)
    v = layer.basis
    torch.testing.assert_close(layer.transformation_matrix.double(), v @ v.T, atol=1e-6, rtol=0)
    t = torch.from_numpy(x[:50])
    c = layer.mean
    expected = ((t.double() - c) @ v @ v.T + c) if keepdim else (t.double() - c) @ v
    torch.testing.assert_close(layer(t).double(), expected, atol=1e-4, rtol=0)
    copy = LinearPCALayer(32, threshold=0.3, keepdim=keepdim)
    copy.load_state_dict(layer.state_dict())
    torch.testing.assert_close(copy.eval()(t), layer(t))
    layer.threshold = 1.0  # more than half the width: one fused map again
    assert layer.in_dim * 2 >= 32
    assert layer.projection_weight.shape == ((32, 32) if keepdim else (layer.in_dim, 32))


def test_the_kept_basis_is_a_view_of_the_eigenvectors_and_loads_without_writing_them():
    def shared(layer):
        return (
            layer.basis.untyped_storage().data_ptr()
            == layer.eigenvectors.untyped_storage().data_ptr()
        )

    x = decaying_data(2000, 16, offset=2.0, decay=0.7)
    layer = fitted_linear(x, threshold=0.9)
    k = layer.in_dim
    assert 0 < k < 16
    # no second float64 copy of the leading eigenvectors
    assert shared(layer)
    torch.testing.assert_close(layer.basis, layer.eigenvectors[:, :k], atol=0, rtol=0)
    vectors = layer.eigenvectors.clone()
    layer.double().reduced_transformation_matrix.zero_()  # a copy, also in float64
    assert torch.equal(layer.eigenvectors, vectors)
    layer.float()
    # a checkpoint whose basis is not the leading eigenvectors (random directions) loads
    # into a layer whose basis is such a view without overwriting its eigenvectors
    random = fitted_linear(x, threshold=0.9)
    random.inject_random_directions(random_state=0)
    expected = random(torch.from_numpy(x[:20]))
    layer.load_state_dict(random.state_dict())
    torch.testing.assert_close(layer.eigenvectors, random.eigenvectors, atol=0, rtol=0)
    torch.testing.assert_close(layer.basis, random.basis, atol=0, rtol=0)
    torch.testing.assert_close(layer(torch.from_numpy(x[:20])), expected)
    assert not shared(layer)  # loaded into a buffer of its own
    layer.threshold = 0.9  # back to the PCA projection: the leading eigenvectors again
    assert shared(layer)
    state = layer.state_dict()  # the basis as a tensor of its own, the layer's a view still
    assert state["basis"].is_contiguous() and shared(layer)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    fresh = LinearPCALayer(16).eval()
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(fresh(torch.from_numpy(x[:20])), layer(torch.from_numpy(x[:20])))
    torch.testing.assert_close(fresh.eigenvectors, layer.eigenvectors, atol=0, rtol=0)
    safetensors = pytest.importorskip("safetensors.torch")  # refuses strided or shared tensors
    loaded = safetensors.load(safetensors.save(state))
    assert torch.equal(loaded["basis"], layer.basis) and torch.equal(
        loaded["eigenvectors"], layer.eigenvectors
    )


@pytest.mark.parametrize(
    "device",
    [
        "meta",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ),
    ],
)
def test_a_moved_layer_keeps_its_basis_a_view_of_the_eigenvectors(device):
    x = decaying_data(2000, 16, offset=2.0, decay=0.7)
    layer = fitted_linear(x, threshold=0.9)
    k = layer.in_dim
    expected = layer(torch.from_numpy(x[:20]))
    layer.to(device)
    assert layer.basis.device.type == device and layer.basis.shape == (16, k)
    assert layer.basis.stride() == layer.eigenvectors.stride()  # a slice, not a (16, k) copy
    if device != "meta":
        assert layer.basis.data_ptr() == layer.eigenvectors.data_ptr()
        torch.testing.assert_close(layer(torch.from_numpy(x[:20]).to(device)).cpu(), expected)


def test_reading_a_layer_never_decomposes():
    torch.manual_seed(0)
    layer = LinearPCALayer(6, threshold=0.9)
    layer(torch.randn(64, 6) * torch.logspace(0, -2, 6))
    calls = []
    original = type(layer).compute_eigenspace

    def counted(self):
        calls.append(1)
        return original(self)

    type(layer).compute_eigenspace = counted  # type: ignore[method-assign]
    try:
        for read in (
            "in_dim",
            "explained",
            "transformation_matrix",
            "reduced_transformation_matrix",
        ):
            with pytest.raises(
                NotCalibratedError, match="newer than its eigenspace.*compute_eigenspace"
            ):
                getattr(layer, read)
        layer.threshold = 0.5  # stored for the decomposition to come
        assert calls == []
        layer.compute_eigenspace()
        assert len(calls) == 1 and layer.threshold == 0.5 and 1 <= layer.in_dim < 6
        layer.threshold = 0.999  # a new projection from the spectrum, no decomposition
        assert len(calls) == 1 and layer.in_dim > 1
    finally:
        type(layer).compute_eigenspace = original  # type: ignore[method-assign]


def test_released_statistics_keep_the_eigenspace_the_projection_and_the_positions():
    x = decaying_data(600, 12, offset=2.0, decay=0.6)
    layer = LinearPCALayer(12, threshold=0.9).train()
    layer(torch.from_numpy(x).reshape(50, 12, 12))  # 12 positions per example
    layer.eval()
    t = torch.from_numpy(x[:40])
    before, values = layer(t), layer.eigenvalues.clone()
    layer.release_statistics()
    assert layer.shifted_sum_sq.numel() == 0 and layer.sample_count == 0
    assert int(layer.sample_positions) == 12 and layer.is_calibrated
    torch.testing.assert_close(layer(t), before, rtol=0, atol=0)
    torch.testing.assert_close(layer.eigenvalues, values, rtol=0, atol=0)
    layer.train()(torch.from_numpy(x[:30]))  # calibrating again starts from no statistics
    assert layer.sample_count == 30
