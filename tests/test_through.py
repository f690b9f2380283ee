"""A widening layer's output statistics collected on its input (``layers.through``).

Calibration collects the PCA layer after a Linear, Conv1D or 1x1 Conv2d with
fewer inputs than outputs on the module's input and decomposes an ``in``-wide
problem; everything the layer ends with must equal what collecting its outputs
gives (independent references: numpy on the float64 outputs, and the layer
collecting its outputs itself in training mode).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from models import Conv1D
from torch import nn

import pcasurgery as ps
from pcasurgery.core import moments as _m
from pcasurgery.core import spectrum as _s
from pcasurgery.layers.pca import PCALayer


def _projector(vectors: np.ndarray, k: int) -> np.ndarray:
    v = vectors[:, :k]
    return v @ v.T


def test_map_moments_equals_the_moments_of_the_mapped_data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 5)) * 0.01 + 1e4  # a mean far from zero: shifts matter
    w, b = rng.standard_normal((9, 5)), rng.standard_normal(9)
    state = _m.empty_moments(5)
    _m._accumulate(state, torch.from_numpy(x))
    mapped = _m.map_moments(state, torch.from_numpy(w), torch.from_numpy(b))
    y = x @ w.T + b
    np.testing.assert_allclose(_m.mean(mapped).numpy(), y.mean(0), rtol=1e-12)
    np.testing.assert_allclose(_m.covariance(mapped).numpy(), np.cov(y.T, bias=True),
                               rtol=1e-7, atol=1e-12 * np.abs(np.cov(y.T)).max())  # fmt: skip
    np.testing.assert_allclose(_m.second_moment(mapped).numpy(), y.T @ y / len(y), rtol=1e-10)
    assert int(mapped.count) == 300


@pytest.mark.parametrize("r", [1, 4, 11])
def test_eigh_through_equals_the_eigendecomposition_of_the_product(r):
    rng = np.random.default_rng(r)
    a = rng.standard_normal((12, r))
    f = rng.standard_normal((r, r)) * np.logspace(0, -3, r)
    inner = f @ f.T
    values, vectors = _s.eigh_through(torch.from_numpy(a), torch.from_numpy(inner))
    ref_values, ref_vectors = np.linalg.eigh(a @ inner @ a.T)
    ref_values, ref_vectors = ref_values[::-1], ref_vectors[:, ::-1]
    assert values.shape == (12,) and vectors.shape == (12, r)
    np.testing.assert_allclose(values.numpy(), np.clip(ref_values, 0, None),
                               atol=1e-12 * ref_values[0])  # fmt: skip
    np.testing.assert_allclose(vectors.T.numpy() @ vectors.numpy(), np.eye(r), atol=1e-12)
    for k in range(1, r + 1):
        np.testing.assert_allclose(_projector(vectors.numpy(), k), _projector(ref_vectors, k),
                                   atol=1e-8)  # fmt: skip
    pivots = np.abs(vectors.numpy()).argmax(0)
    assert (vectors.numpy()[pivots, range(r)] > 0).all()  # the sign convention of eigh_descending
    with pytest.raises(ValueError, match="r < d"):
        _s.eigh_through(torch.ones(3, 3), torch.eye(3))


def test_eigh_through_converts_a_float32_weight_a_block_of_rows_at_a_time(monkeypatch):
    """A float32 ``a`` gives the float64 ``a``'s spectrum, its rows taken in float64 a block
    at a time (never a float64 copy of the whole), also where the blocks do not divide it."""
    rng = np.random.default_rng(5)
    a = torch.from_numpy(rng.standard_normal((50, 7))).float()
    f = rng.standard_normal((7, 7))
    inner = torch.from_numpy(f @ f.T)
    converted = []
    monkeypatch.setattr(_s, "_ROWS_BYTES", 8 * 7 * 16)  # 16 rows a block: 16, 16, 16, 2
    real = _s.row_blocks

    def blocks(x, width=0):
        for rows, block in real(x, width):
            converted.append(block.shape[0])
            yield rows, block

    monkeypatch.setattr(_s, "row_blocks", blocks)
    values, vectors = _s.eigh_through(a, inner)
    assert converted == [16, 16, 16, 2] * 2  # a^T a, then the eigenvectors' map
    ref_values, ref_vectors = _s.eigh_through(a.double(), inner)
    torch.testing.assert_close(values, ref_values, rtol=0, atol=1e-12 * float(ref_values[0]))
    torch.testing.assert_close(vectors, ref_vectors, rtol=0, atol=1e-10)
    assert vectors.dtype == torch.float64


@pytest.mark.parametrize("case", ["conditioned", "ill-conditioned", "rank-deficient"])
def test_eigh_through_takes_householder_qr_where_the_cholesky_route_would_lose_orthogonality(
    case, monkeypatch
):
    """A well-conditioned ``a`` goes through the Cholesky factor of ``a^T a`` (no QR);
    cond(a) = 1e6, or a repeated column, through Householder QR. Both match numpy. The
    eigenvalues alone go through the Cholesky factor wherever it exists (their error is
    of the same order by either route), without the orthogonality bound's inverse."""
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((40, 9)))
    v, _ = np.linalg.qr(rng.standard_normal((9, 9)))
    singular = np.logspace(0, -6 if case == "ill-conditioned" else -1, 9)
    a = (u * singular) @ v.T
    if case == "rank-deficient":
        a[:, 8] = a[:, 0]
    f = rng.standard_normal((9, 9))
    inner = f @ f.T
    qr_calls = []
    original = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda *x, **k: qr_calls.append(1) or original(*x, **k))
    values, vectors = _s.eigh_through(torch.from_numpy(a), torch.from_numpy(inner))
    assert len(qr_calls) == (case != "conditioned")
    inverses = []
    inverse = torch.cholesky_inverse
    monkeypatch.setattr(torch, "cholesky_inverse", lambda *x: inverses.append(1) or inverse(*x))
    alone, none = _s.eigh_through(torch.from_numpy(a), torch.from_numpy(inner), vectors=False)
    assert none is None and len(qr_calls) == {"rank-deficient": 2}.get(case, len(qr_calls))
    assert not inverses
    ref_values, ref_vectors = np.linalg.eigh(a @ inner @ a.T)
    ref_values, ref_vectors = ref_values[::-1], ref_vectors[:, ::-1]
    for got in (values, alone):
        np.testing.assert_allclose(got.numpy(), np.clip(ref_values, 0, None),
                                   atol=1e-12 * ref_values[0])  # fmt: skip
    np.testing.assert_allclose(vectors.T.numpy() @ vectors.numpy(), np.eye(9), atol=1e-12)
    cache: dict = {}  # the eigenvalues first, the eigenvectors at their first use: the route
    _s.eigh_through(torch.from_numpy(a), torch.from_numpy(inner), vectors=False, cache=cache)
    _, later = _s.eigh_through(torch.from_numpy(a), torch.from_numpy(inner), cache=cache)
    np.testing.assert_allclose(later.T.numpy() @ later.numpy(), np.eye(9), atol=1e-12)
    k = 5  # a gap in every case's spectrum
    np.testing.assert_allclose(_projector(vectors.numpy(), k), _projector(ref_vectors, k),
                               atol=1e-7)  # fmt: skip


def _reference(outputs: np.ndarray, centering: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(eigenvalues, eigenvectors, mean)`` of outputs ``(n, d)`` by numpy, descending."""
    mean = outputs.mean(0)
    matrix = np.cov(outputs.T, bias=True) if centering else outputs.T @ outputs / len(outputs)
    values, vectors = np.linalg.eigh(matrix)
    return np.clip(values[::-1], 0, None), vectors[:, ::-1], mean


def _widening_linear(bias: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 20, bias=bias), nn.Tanh(), nn.Linear(20, 4)).double().eval()


@pytest.mark.parametrize("centering", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_a_widening_linear_is_calibrated_on_its_input_exactly(centering, bias):
    model = _widening_linear(bias)
    x = torch.randn(400, 6, dtype=torch.float64) * 2 + 3
    wrapped = ps.pca_wrap(model, 0.99, centering=centering)
    ps.calibrate(wrapped, x.split(64), progress=False)
    layer = wrapped.get_submodule("0.pca")
    rank = 6 if centering or not bias else 7
    assert layer.eigenvectors.shape == (20, rank)  # decomposed through the 6 inputs
    with torch.no_grad():
        outputs = model[0](x).numpy()
    values, vectors, mean = _reference(outputs, centering)
    np.testing.assert_allclose(layer.eigenvalues.numpy(), values, atol=1e-11 * values[0])
    np.testing.assert_allclose(layer.mean.numpy(), mean, rtol=1e-12, atol=1e-12)
    k = layer.in_dim
    assert k == ps.core.intrinsic_dimensionality(torch.from_numpy(values.copy()), 0.99)
    np.testing.assert_allclose(layer.transformation_matrix.numpy(), _projector(vectors, k),
                               atol=1e-9)  # fmt: skip
    moments = (
        _m.covariance(layer.statistics()) if centering else _m.second_moment(layer.statistics())
    )
    np.testing.assert_allclose(moments.numpy(), np.cov(outputs.T, bias=True) if centering
                               else outputs.T @ outputs / len(outputs), atol=1e-10)  # fmt: skip
    assert layer.samples == 400 and layer.positions == 1 and layer._through is None
    # the layer after the narrowing module collected its outputs as before
    assert wrapped.get_submodule("2.pca").eigenvectors.shape == (4, 4)


def test_input_side_calibration_equals_collecting_the_outputs_in_float32():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 48), nn.GELU(), nn.Linear(48, 96)).eval()
    data = [torch.randn(64, 8) * 5 + 100 for _ in range(6)]  # a large mean: float32 shifts
    fast = ps.calibrate(ps.pca_wrap(model, 0.95), data, progress=False)
    slow = ps.pca_wrap(model, 0.95).train()  # training mode: the layers collect their outputs
    with torch.no_grad():
        for batch in data:
            slow(batch)
    slow.eval()
    for name in ("0", "2"):
        a, b = ps.pca_layers_of(fast)[name], ps.pca_layers_of(slow)[name]
        b.compute_eigenspace()
        assert a.eigenvectors.shape[1] == 8 if name == "0" else 48
        ca, cb = _m.covariance(a.statistics()), _m.covariance(b.statistics())
        assert float((ca - cb).norm() / cb.norm()) < 1e-5  # the contract's accuracy
        assert a.in_dim == b.in_dim
        torch.testing.assert_close(a.mean, b.mean, rtol=1e-6, atol=1e-5)
        pa, pb = a.transformation_matrix, b.transformation_matrix
        assert float((pa - pb).norm() / pb.norm()) < 1e-3
    x = torch.randn(16, 8) * 5 + 100
    with torch.no_grad():
        torch.testing.assert_close(fast(x), slow(x), rtol=1e-3, atol=1e-2)
        small = ps.compress(fast)
        torch.testing.assert_close(small(x), fast(x), rtol=1e-4, atol=1e-3)


def test_a_strided_1x1_convolution_and_a_conv1d_are_calibrated_on_their_inputs():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 16, 1, stride=2), nn.ReLU(), nn.Conv2d(16, 4, 3)).double()
    x = torch.randn(8, 3, 9, 9, dtype=torch.float64)
    wrapped = ps.calibrate(ps.pca_wrap(model, 0.99), [x[:4], x[4:]], progress=False)
    layer = wrapped.get_submodule("0.pca")
    assert layer.eigenvectors.shape == (16, 3)
    with torch.no_grad():
        out = model[0](x)
    rows = out.permute(0, 2, 3, 1).reshape(-1, 16).numpy()
    values, _, mean = _reference(rows, True)
    np.testing.assert_allclose(layer.eigenvalues.numpy(), values, atol=1e-11 * values[0])
    np.testing.assert_allclose(layer.mean.numpy(), mean, atol=1e-12)
    assert layer.positions == 25 and layer.samples == 8

    gpt = nn.Sequential(Conv1D(24, 5), nn.ReLU(), Conv1D(3, 24)).double()
    tokens = torch.randn(4, 7, 5, dtype=torch.float64)
    wrapped = ps.calibrate(ps.pca_wrap(gpt, 0.99), [tokens], progress=False)
    layer = wrapped.get_submodule("0.pca")
    assert layer.eigenvectors.shape == (24, 5)
    with torch.no_grad():
        rows = gpt[0](tokens).reshape(-1, 24).numpy()
    values, _, _ = _reference(rows, True)
    np.testing.assert_allclose(layer.eigenvalues.numpy(), values, atol=1e-11 * values[0])
    assert layer.positions == 7 and layer.samples == 4


def test_padding_stays_out_of_input_side_statistics():
    torch.manual_seed(3)

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 6)
            self.up = nn.Linear(6, 12)

        def forward(self, input_ids, attention_mask=None):
            return self.up(self.embed(input_ids))

    model = Tokens().double().eval()
    ids = torch.randint(1, 50, (3, 9))
    lengths = [9, 5, 2]
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    padded = ps.calibrate(ps.pca_wrap(model, 0.9, include=["up"]),
                          [{"input_ids": ids, "attention_mask": mask}], progress=False)  # fmt: skip
    unpadded = ps.calibrate(ps.pca_wrap(model, 0.9, include=["up"]),
                            [{"input_ids": ids[i : i + 1, :n]} for i, n in enumerate(lengths)],
                            progress=False)  # fmt: skip
    a, b = padded.get_submodule("up.pca"), unpadded.get_submodule("up.pca")
    assert a.eigenvectors.shape == (12, 6)
    assert a._n == b._n == sum(lengths)
    torch.testing.assert_close(_m.covariance(a.statistics()), _m.covariance(b.statistics()),
                               rtol=1e-9, atol=1e-12)  # fmt: skip
    torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=1e-9, atol=1e-12)


def test_threshold_one_and_later_changes_complete_the_basis():
    model = _widening_linear(True)
    wrapped = ps.calibrate(ps.pca_wrap(model, 0.9), [torch.randn(200, 6, dtype=torch.float64)],
                           progress=False)  # fmt: skip
    layer: PCALayer = wrapped.get_submodule("0.pca")
    assert layer.eigenvectors.shape == (20, 6)
    layer.threshold = 1.0
    assert layer.in_dim == 20 and layer.eigenvectors.shape == (20, 20)
    torch.testing.assert_close(layer.transformation_matrix, torch.eye(20, dtype=torch.float64))
    v = layer.eigenvectors
    torch.testing.assert_close(v.T @ v, torch.eye(20, dtype=torch.float64))
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(wrapped[0](x), model[0](x))
    layer.threshold = 0.9
    layer.centering = False  # recomputed from the factors still held: [W b], 7 wide
    assert layer.eigenvectors.shape == (20, 7) and layer.in_dim <= 7
    formed = _m.second_moment(layer.statistics())  # the (20, 20) square, formed
    torch.testing.assert_close(layer.eigenvalues, torch.linalg.eigvalsh(formed).flip(0).clamp_min(0),
                               rtol=0, atol=1e-12 * float(formed.diagonal().sum()))  # fmt: skip
    state = wrapped.state_dict()
    again = ps.pca_wrap(model, 0.5)
    again.load_state_dict(state)
    torch.testing.assert_close(again(x), wrapped(x))


def test_calibrating_again_without_reset_adds_to_the_input_side_statistics():
    model = _widening_linear(True)
    data = torch.randn(300, 6, dtype=torch.float64) + 2
    once = ps.calibrate(ps.pca_wrap(model, 0.99), [data], progress=False)
    twice = ps.calibrate(ps.pca_wrap(model, 0.99), [data[:100]], progress=False)
    ps.calibrate(twice, [data[100:]], reset=False, progress=False)
    a, b = once.get_submodule("0.pca"), twice.get_submodule("0.pca")
    assert b._n == 300 and b.samples == 300
    torch.testing.assert_close(b.eigenvalues, a.eigenvalues, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(b.transformation_matrix, a.transformation_matrix, atol=1e-8,
                               rtol=0)  # fmt: skip


def test_a_non_finite_input_names_the_layer_and_leaves_the_model_as_it_was():
    model = _widening_linear(True)
    wrapped = ps.calibrate(ps.pca_wrap(model, 0.99), [torch.randn(50, 6, dtype=torch.float64)],
                           progress=False)  # fmt: skip
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    bad = torch.randn(50, 6, dtype=torch.float64)
    bad[3, 2] = float("nan")
    with pytest.raises(ps.NonFiniteError, match="PCA layer '0' received NaN"):
        ps.calibrate(wrapped, [bad], progress=False)
    after = wrapped.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]) or (value.isnan().all() and after[key].isnan().all())
    assert all(layer._through is None for layer in ps.pca_layers_of(wrapped).values())


def test_a_wide_layer_holds_its_covariance_only_once_it_is_read():
    # Linear(3, 2048): the statistics' square is 2048 x 2048 float64 once formed;
    # calibration leaves it as its factors (the 2048 x 3 weight and a 3 x 3 square)
    model = nn.Sequential(nn.Linear(3, 2048)).eval()
    wrapped = ps.pca_wrap(model, 0.99)
    layer = wrapped.get_submodule("0.pca")
    assert sum(b.numel() * b.element_size() for b in layer.buffers()) < 2**20  # nothing yet
    ps.calibrate(wrapped, [torch.randn(1024, 3) for _ in range(3)], progress=False)
    covariance = 2048 * 2048 * 8
    assert sum(b.numel() * b.element_size() for b in layer.buffers()) < 0.01 * covariance
    assert layer.shifted_sum_sq.shape == (2048, 2048)  # reading the buffer forms it
    held = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert covariance <= held < 1.01 * covariance and layer._square_factors is None


@pytest.mark.parametrize("changed", [False, True])
def test_a_widening_layers_eigenvectors_wait_for_their_first_use_and_come_from_its_input(
    changed, monkeypatch
):
    """Calibrate + report computes the eigenvalues of the 6-wide problem only; the first
    use computes the eigenvectors from the same factors (never a 20-wide decomposition),
    and they span the module's range while its weights are the ones calibrated."""
    model = _widening_linear(True)
    x = torch.randn(300, 6, dtype=torch.float64) * 2 + 3
    grams = []
    gram_factor = _s._gram_factor
    monkeypatch.setattr(_s, "_gram_factor", lambda a: grams.append(a.shape) or gram_factor(a))
    wrapped = ps.calibrate(ps.pca_wrap(model, 0.9), x.split(50), progress=False)
    layer = wrapped.get_submodule("0.pca")
    assert layer.eigenvectors_pending and layer._square_factors is not None
    ps.report(wrapped)
    assert layer.eigenvectors_pending
    with torch.no_grad():
        outputs = model[0](x).numpy()
    values, vectors, _ = _reference(outputs, True)
    np.testing.assert_allclose(layer.eigenvalues.numpy(), values, atol=1e-11 * values[0])
    wide = []
    eigh = _s.eigh_descending
    monkeypatch.setattr(_s, "eigh_descending", lambda m: wide.append(m.shape[0]) or eigh(m))
    if changed:
        with torch.no_grad():
            wrapped[0].weight.mul_(2)  # the statistics are of the outputs seen
    torch.testing.assert_close(layer.eigenvectors.T @ layer.eigenvectors,
                               torch.eye(6, dtype=torch.float64))  # fmt: skip
    assert wide == [6] and not layer.eigenvectors_pending
    assert grams == [(20, 6)]  # W^T W formed once, for the eigenvalues and the eigenvectors
    assert layer._square_factors.cache == {}  # and let go once they are computed
    k = layer.in_dim
    np.testing.assert_allclose(layer.transformation_matrix.numpy(), _projector(vectors, k),
                               atol=1e-9)  # fmt: skip
    rest = layer.discarded_directions(wrapped[0])
    assert (rest is None) == changed
    if rest is not None:
        np.testing.assert_allclose(rest.numpy(), layer.eigenvectors[:, k:].numpy())


def test_the_square_of_a_widening_layer_is_formed_only_when_read(monkeypatch):
    formed = []
    mapped_square = _m.mapped_square
    monkeypatch.setattr(_m, "mapped_square", lambda *a: formed.append(1) or mapped_square(*a))
    model = _widening_linear(True)
    x = torch.randn(300, 6, dtype=torch.float64) * 2 + 3
    wrapped = ps.calibrate(ps.pca_wrap(model, 0.9), x.split(50), progress=False)
    layer = wrapped.get_submodule("0.pca")
    ps.report(wrapped)
    ps.budget_plan(wrapped, remove=0.2)
    small = ps.compress(wrapped)
    with torch.no_grad():
        torch.testing.assert_close(small(x), wrapped(x))
    layer.threshold = 0.99  # a new rank from the spectrum, not from the statistics
    assert formed == [] and layer._buffers["shifted_sum_sq"].shape == (0, 0)
    with torch.no_grad():
        outputs = model[0](x)
        wrapped[0].weight.mul_(2)  # the square is of the outputs seen, whatever the weight is now
    state = wrapped.state_dict()
    assert formed == [1]
    y = outputs.numpy()
    np.testing.assert_allclose(
        _m.covariance(layer.statistics()).numpy(), np.cov(y.T, bias=True), atol=1e-10
    )
    square = state["0.pca.shifted_sum_sq"].numpy()
    shifted = y - state["0.pca.shift"].numpy()
    np.testing.assert_allclose(square, shifted.T @ shifted, rtol=1e-10)
    # calibrating again, moving the model first, forms nothing of the statistics it replaces
    ps.calibrate(wrapped, x.split(50), device="cpu", progress=False)
    ps.calibrate(wrapped, x.split(50), device="cpu", progress=False)
    assert formed == [1]


@pytest.mark.parametrize("read", ["statistics", "buffer", "move", "collect", "copy"])
def test_every_way_of_reading_the_statistics_sees_the_formed_square(read):
    model = _widening_linear(True)
    x = torch.randn(300, 6, dtype=torch.float64) * 2 + 3
    reference = ps.pca_wrap(model, 0.9).train()  # training mode: the layers collect their outputs
    with torch.no_grad():
        reference(x[:200])
    wrapped = ps.calibrate(ps.pca_wrap(model, 0.9), [x[:200]], progress=False)
    layer: PCALayer = wrapped.get_submodule("0.pca")
    assert layer._square_factors is not None
    expected = reference.get_submodule("0.pca").statistics()
    if read == "statistics":
        square = layer.statistics().total_sq
    elif read == "buffer":
        square = layer.shifted_sum_sq
    elif read == "move":  # the factors follow the device and keep their dtypes
        wrapped.to("cpu", torch.float16)
        assert layer._square_factors is not None and layer._square_factors[0].dtype == torch.float64
        square = layer.statistics().total_sq
    elif read == "copy":
        square = copy.deepcopy(wrapped).state_dict()["0.pca.shifted_sum_sq"]
    else:  # training mode adds the next batches to the calibrated statistics
        with torch.no_grad():
            layer.mode = "collect"
            wrapped(x[200:])
            reference(x[200:])
        expected = reference.get_submodule("0.pca").statistics()
        square = layer.statistics().total_sq
    assert square.shape == (20, 20)
    state = layer.statistics()  # each way of collecting picks its own shift
    torch.testing.assert_close(square, _m.reshift(expected, state.shift).total_sq, rtol=1e-9,
                               atol=1e-9)  # fmt: skip


def test_a_failed_calibration_keeps_a_square_held_as_factors():
    model = _widening_linear(True)
    wrapped = ps.calibrate(ps.pca_wrap(model, 0.99), [torch.randn(50, 6, dtype=torch.float64)],
                           progress=False)  # fmt: skip
    before = copy.deepcopy(wrapped).state_dict()
    layer = wrapped.get_submodule("0.pca")
    assert layer._square_factors is not None
    bad = torch.randn(50, 6, dtype=torch.float64)
    bad[3, 2] = float("nan")
    with pytest.raises(ps.NonFiniteError):
        ps.calibrate(wrapped, [torch.randn(50, 6, dtype=torch.float64), bad], progress=False)
    assert layer._square_factors is not None
    after = wrapped.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]) or (value.isnan().all() and after[key].isnan().all())


def test_a_half_precision_widening_layer_whose_weights_sum_past_its_range_calibrates():
    """Its factors are checked through float64 sums: the half weight's own sum is inf."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 4096)).half()
    with torch.no_grad():
        model[0].weight.normal_(1.0, 0.1)
    assert model[0].weight.sum().isinf()  # 131072 > 65504, every element finite
    x = [torch.randn(1024, 32).half() for _ in range(4)]  # as many rows as the width
    half = ps.calibrate(ps.pca_wrap(model, 0.99), x, progress=False)
    full = ps.calibrate(ps.pca_wrap(copy.deepcopy(model).float(), 0.99), [b.float() for b in x],
                        progress=False)  # fmt: skip
    a, b = half.get_submodule("0.pca"), full.get_submodule("0.pca")
    assert a._square_factors is not None  # calibrated through its input, as the float one
    torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=1e-9, atol=1e-9)
    assert _s.all_finite(torch.full((70000,), 1.0, dtype=torch.float16))
    assert not _s.all_finite(torch.ones(3), torch.tensor([1.0, float("nan")]))


class GatedMLP(nn.Module):
    """A Llama MLP: gate and up projections fed the same tensor."""

    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(6, 20), nn.Linear(6, 20), nn.Linear(20, 6)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


@pytest.mark.parametrize("masked", [False, True])
def test_modules_fed_the_same_tensor_compute_its_moments_once(monkeypatch, masked):
    torch.manual_seed(0)
    model = GatedMLP().double().eval()
    # a far mean moves the shift on the first batch: each layer then re-derives its own
    x = torch.randn(8, 30, 6, dtype=torch.float64) * 2 + 50
    mask = torch.ones(8, 30, dtype=torch.long)
    mask[::3, 20:] = 0
    data = [
        {"x": b, "attention_mask": m} if masked else b
        for b, m in zip(x.split(2), mask.split(2), strict=True)
    ]

    class Masked(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, attention_mask):
            return self.inner(x)

    net = Masked(model) if masked else model
    calls = []
    real = _m._batch_moments
    monkeypatch.setattr(_m, "_batch_moments", lambda *a, **k: calls.append(1) or real(*a, **k))
    wrapped = ps.calibrate(ps.pca_wrap(net, 0.99), data, progress=False)
    # the first batch is far from zero: each product is taken once, around a subsample's
    # mean (up, still empty, takes gate's); then gate and up share 1 per batch, down has 1
    assert len(calls) == (1 + 0 + 3) + (1 + 3)
    real_rows = x[mask.bool()] if masked else x.reshape(-1, 6)
    prefix = "inner." if masked else ""
    for name in ("gate", "up"):
        layer = ps.pca_layers_of(wrapped)[prefix + name]
        with torch.no_grad():
            outputs = getattr(model, name)(real_rows).numpy()
        values, vectors, mean = _reference(outputs, True)
        assert layer.sample_count == len(real_rows)
        np.testing.assert_allclose(layer.eigenvalues.numpy(), values, atol=1e-11 * values[0])
        np.testing.assert_allclose(layer.mean.numpy(), mean, rtol=1e-12)


class ChangedInPlace(nn.Module):
    """The tensor fed to ``a`` is changed in place before it is fed to ``b``."""

    def __init__(self, change):
        super().__init__()
        self.a, self.b = nn.Linear(6, 20), nn.Linear(6, 20)
        self.change = change

    def forward(self, x):
        h = x + 0.0
        y = self.a(h)
        self.change(h)
        return y + self.b(h)


def _swap_two_samples_of_one_feature(h):
    h[[0, 1], 2] = h[[1, 0], 2]  # each feature's sum and sum of squares stay the same


@pytest.mark.parametrize(
    "change", [torch.Tensor.relu_, _swap_two_samples_of_one_feature], ids=["relu", "swap"]
)
def test_a_tensor_changed_in_place_between_two_modules_is_not_shared(change):
    torch.manual_seed(0)
    model = ChangedInPlace(change).double().eval()
    x = torch.randn(240, 6, dtype=torch.float64)
    changed = [c.clone() for c in x.split(60)]
    for c in changed:
        change(c)
    changed = torch.cat(changed)
    wrapped = ps.calibrate(ps.pca_wrap(model, 0.99), x.split(60), progress=False)
    for name, inputs in (("a", x), ("b", changed)):
        with torch.no_grad():
            outputs = getattr(model, name)(inputs).numpy()
        values, _, mean = _reference(outputs, True)
        layer = ps.pca_layers_of(wrapped)[name]
        np.testing.assert_allclose(layer.eigenvalues.numpy(), values, atol=1e-11 * values[0])
        np.testing.assert_allclose(layer.mean.numpy(), mean, rtol=1e-12, atol=1e-12)
