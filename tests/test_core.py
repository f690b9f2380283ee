"""The statistics core against numpy, scipy and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import decaying_data, relative_error
from sklearn.decomposition import PCA

from pcasurgery.core import moments as m
from pcasurgery.core import spectrum as s


def stream(x: np.ndarray, batch: int, channel_dim: int = -1) -> m.Moments:
    t = torch.from_numpy(x)
    state = m.empty_moments(t.shape[channel_dim])
    for i in range(0, t.shape[0], batch):
        m._accumulate(state, t[i : i + batch], channel_dim)
    return state


@pytest.mark.parametrize("offset", [0.0, 1e4, 1e6])
def test_streaming_covariance_matches_numpy_with_large_offsets(offset):
    # float32 activations whose mean is up to 1e6 x their largest std
    x = decaying_data(5000, 16, offset=offset)
    state = stream(x, batch=128)
    reference = np.cov(x.astype(np.float64), rowvar=False, bias=True)
    assert relative_error(m.covariance(state).numpy(), reference) <= 1e-5
    # the mean to ~1e-7 of the spread (float32 shifted sums), whatever the offset
    mean = x.astype(np.float64).mean(0)
    np.testing.assert_allclose(m.mean(state).numpy(), mean, rtol=1e-12, atol=1e-7)
    assert int(state.count) == 5000


def test_textbook_formula_fails_where_ours_holds():
    """The reason for shifted sums: E[xx^T] - mu mu^T loses every digit at 1e6 x std."""
    x = decaying_data(5000, 16, offset=1e6).astype(np.float64)
    naive = x.T @ x / len(x) - np.outer(x.mean(0), x.mean(0))
    reference = np.cov(x, rowvar=False, bias=True)
    assert relative_error(naive, reference) > 1e-3


def test_second_moment_matches_numpy():
    x = decaying_data(3000, 10, offset=3.0)
    state = stream(x, batch=100)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(m.second_moment(state).numpy(), x64.T @ x64 / len(x), rtol=1e-6)


def test_merge_of_two_halves_equals_one_pass():
    # float64 data: products in float64, so the only difference left is the merge itself
    x = decaying_data(4000, 8, offset=50.0, dtype=np.float64)
    whole = stream(x, batch=250)
    first, second = stream(x[:1700], batch=100), stream(x[1700:] + 0, batch=300)
    assert not torch.equal(first.shift, second.shift)
    merged = m.merge_moments(first, second)
    assert int(merged.count) == 4000
    np.testing.assert_allclose(
        m.covariance(merged).numpy(), m.covariance(whole).numpy(), rtol=1e-9, atol=1e-12
    )
    np.testing.assert_allclose(m.mean(merged).numpy(), m.mean(whole).numpy(), rtol=1e-12)
    # merging with an empty accumulator is the identity
    empty = m.empty_moments(8)
    assert torch.equal(m.merge_moments(empty, whole).total_sq, whole.total_sq)


def test_reshift_is_exact_algebra():
    x = decaying_data(500, 5, offset=7.0)
    state = stream(x, batch=50)
    moved = m.reshift(state, torch.full((5,), -3.0, dtype=torch.float64))
    np.testing.assert_allclose(m.covariance(moved).numpy(), m.covariance(state).numpy(), rtol=1e-9)
    np.testing.assert_allclose(
        m.second_moment(moved).numpy(), m.second_moment(state).numpy(), rtol=1e-12
    )


@pytest.mark.parametrize(
    "size, channels_last",
    [((4, 3), False), ((2, 2), False), ((4, 3), True)],  # per-image products, one product of rows
)
def test_channelwise_layout_equals_rows_of_pixels(size, channels_last):
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(6, 5, *size)) * np.arange(1, 6)[None, :, None, None] + 100).astype(
        np.float32
    )
    if channels_last:
        t = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
        conv = m.empty_moments(5)
        for i in range(0, 6, 2):
            m._accumulate(conv, t[i : i + 2], channel_dim=1)
    else:
        conv = stream(x, batch=2, channel_dim=1)
    rows = x.transpose(0, 2, 3, 1).reshape(-1, 5)
    assert int(conv.count) == 6 * size[0] * size[1]
    np.testing.assert_allclose(
        m.covariance(conv).numpy(),
        np.cov(rows.astype(np.float64), rowvar=False, bias=True),
        rtol=1e-5,
    )


def test_float64_batches_are_multiplied_in_float64():
    x = decaying_data(1000, 6, offset=1e3, dtype=np.float64)
    state = stream(x, batch=100)
    assert relative_error(m.covariance(state).numpy(), np.cov(x, rowvar=False, bias=True)) < 1e-12


def test_eigh_descending_matches_numpy_with_sklearn_signs():
    x = decaying_data(2000, 9)
    cov = np.cov(x.astype(np.float64), rowvar=False, bias=True)
    values, vectors = s.eigh_descending(torch.from_numpy(cov))
    ref_values = np.linalg.eigvalsh(cov)[::-1]
    np.testing.assert_allclose(values.numpy(), ref_values, rtol=1e-10, atol=1e-14)
    assert np.all(np.diff(values.numpy()) <= 0)
    np.testing.assert_allclose(
        vectors.numpy() @ np.diag(values.numpy()) @ vectors.numpy().T, cov, atol=1e-12
    )
    components = PCA(svd_solver="full").fit(x.astype(np.float64)).components_
    np.testing.assert_allclose(vectors.numpy().T, components, atol=1e-8)


def test_eigenvalues_are_clipped_at_zero():
    rank_one = torch.ones(4, 4, dtype=torch.float64)
    values, _ = s.eigh_descending(rank_one)
    assert (values >= 0).all() and values[0] == pytest.approx(4.0)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999])
def test_intrinsic_dimensionality_matches_sklearn(threshold):
    x = decaying_data(3000, 20, decay=0.75).astype(np.float64)
    values, _ = s.eigh_descending(torch.from_numpy(np.cov(x, rowvar=False, bias=True)))
    expected = PCA(n_components=threshold, svd_solver="full").fit(x).n_components_
    assert s.intrinsic_dimensionality(values, threshold) == expected


def test_intrinsic_dimensionality_edges():
    values = torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    assert s.intrinsic_dimensionality(values, 1.0) == 4  # t = 1 keeps every direction
    assert s.intrinsic_dimensionality(values, 0.75) == 1  # exactly 0.75 explained by one
    assert s.intrinsic_dimensionality(values, 0.76) == 2
    assert s.intrinsic_dimensionality(torch.zeros(5, dtype=torch.float64), 0.9) == 0
    assert s.saturation(0, 5) == 0.0 and s.saturation(2, 8) == 0.25
    assert s.explained_fraction(values, 1) == pytest.approx(0.75)
    assert s.explained_fraction(values, 0) == 0.0


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_threshold_out_of_range_is_a_value_error(bad):
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        s.intrinsic_dimensionality(torch.ones(3, dtype=torch.float64), bad)


def test_threshold_of_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match="threshold must be a real number"):
        s.intrinsic_dimensionality(torch.ones(3, dtype=torch.float64), "0.9")


@pytest.mark.parametrize("keepdim", [True, False])
def test_projection_affine_matches_sklearn_transform(keepdim):
    x = decaying_data(1500, 10, offset=20.0).astype(np.float64)
    pca = PCA(n_components=4, svd_solver="full").fit(x)
    t = torch.from_numpy(x)
    _, vectors = s.eigh_descending(torch.from_numpy(np.cov(x, rowvar=False, bias=True)))
    weight, bias = s.projection_affine(vectors[:, :4], t.mean(0), keepdim=keepdim)
    out = (t @ weight.T + bias).numpy()
    expected = pca.inverse_transform(pca.transform(x)) if keepdim else pca.transform(x)
    np.testing.assert_allclose(out, expected, atol=1e-8)


def test_a_narrower_projection_is_the_float64_one_rounded_built_by_blocks(monkeypatch):
    monkeypatch.setattr(s, "_BLOCK_BYTES", 8 * 10 * 3)  # blocks of 3 rows of 10
    basis, _ = torch.linalg.qr(torch.randn(10, 4, dtype=torch.float64))
    center = torch.randn(10, dtype=torch.float64) * 100
    weight, bias = s.projection_affine(basis, center)
    narrow_w, narrow_b = s.projection_affine(basis, center, dtype=torch.float32)
    assert narrow_w.dtype == narrow_b.dtype == torch.float32
    torch.testing.assert_close(narrow_w, weight.float(), rtol=0, atol=0)
    torch.testing.assert_close(narrow_b, bias.float(), rtol=0, atol=0)
    torch.testing.assert_close(bias, center - basis @ basis.T @ center)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_projection_built_from_the_dropped_directions_is_the_same_map(monkeypatch, dtype):
    monkeypatch.setattr(s, "_BLOCK_BYTES", 8 * 10 * 3)  # blocks of 3 rows of 10
    q, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))
    center = torch.randn(10, dtype=torch.float64) * 100
    for k in (3, 8):  # the rest is used only where it is the smaller of the two
        weight, bias = s.projection_affine(q[:, :k], center, dtype=dtype, rest=q[:, k:])
        expected_w, expected_b = q[:, :k] @ q[:, :k].T, center - q[:, :k] @ q[:, :k].T @ center
        torch.testing.assert_close(weight, expected_w.to(dtype), rtol=0, atol=1e-14 * (
            1 if dtype == torch.float64 else 1e8))  # fmt: skip
        torch.testing.assert_close(bias, expected_b.to(dtype), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"rest must complete basis \(10, 8\)"):
        s.projection_affine(q[:, :8], center, rest=q[:, 7:])


def test_random_orthogonal_is_haar_special_orthogonal_and_seedable():
    q = s.random_orthogonal(7, 3)
    np.testing.assert_allclose(q @ q.T, np.eye(7), atol=1e-12)
    assert np.linalg.det(q) == pytest.approx(1.0)
    np.testing.assert_array_equal(q, s.random_orthogonal(7, 3))
    assert not np.allclose(q, s.random_orthogonal(7, 4))
    assert s.random_orthogonal(1).shape == (1, 1)
    with pytest.raises(ValueError, match="dim must be >= 1"):
        s.random_orthogonal(0)


def test_seed_stats_match_numpy():
    x = decaying_data(800, 6, decay=0.9).astype(np.float64)
    cov = np.cov(x, rowvar=False, bias=True)
    t = torch.from_numpy(cov)
    assert s.cov_determinant(t) == pytest.approx(np.linalg.det(cov), rel=1e-9)
    assert s.cov_trace(t) == pytest.approx(np.trace(cov), rel=1e-12)
    assert s.diag_trace(t) == pytest.approx(np.linalg.eigvalsh(cov).sum(), rel=1e-12)
    _, vectors = s.eigh_descending(t)
    embedded = s.embed(torch.from_numpy(x), vectors, torch.from_numpy(x.mean(0)))
    np.testing.assert_allclose(
        embedded.numpy(), PCA(2, svd_solver="full").fit_transform(x), atol=1e-8
    )


def test_eigenvector_signs_follow_the_largest_magnitude_entry():
    """scikit-learn's convention, ties going to the first such entry (as ``argmax``)."""
    rng = np.random.default_rng(6)
    columns = [
        rng.normal(size=7),
        [1.0, -1.0, 0.5, 0, 0, 0, 0],  # tie: the first is positive
        [-2.0, 2.0, 0.5, 0, 0, 0, 0],  # tie: the first is negative
        [0.0] * 7,
        [0.1, -3.0, 2.9, 0, 0, 0, 0],
    ]
    v = np.array(columns).T
    pivots = np.abs(v).argmax(0)
    signs = np.sign(v[pivots, range(v.shape[1])])
    expected = v * np.where(signs == 0, 1.0, signs)
    got = s._fix_signs(torch.from_numpy(v.copy()))
    np.testing.assert_array_equal(got.numpy(), expected)
    pivots_only = torch.from_numpy(v) * s._pivot_signs(torch.from_numpy(v))  # the GPU's way
    np.testing.assert_array_equal(pivots_only.numpy(), expected)


def test_non_square_or_non_finite_matrices_are_rejected():
    with pytest.raises(ValueError, match="square matrix"):
        s.eigh_descending(torch.ones(2, 3))
    with pytest.raises(ValueError, match="NaN or infinite"):
        s.eigh_descending(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="no samples"):
        m.covariance(m.empty_moments(3))


@pytest.mark.parametrize("sigmas", [0.0, 3.0, 5.0, 50.0])
def test_shift_is_adopted_only_where_raw_products_lose_accuracy(sigmas):
    rng = np.random.default_rng(2)
    scales = 0.7 ** np.arange(10)
    x = (rng.normal(size=(4000, 10)) * scales + sigmas * scales).astype(np.float32)
    state = stream(x, batch=500)
    assert bool(state.shift.any()) == (sigmas > 4.0)
    reference = np.cov(x.astype(np.float64), rowvar=False, bias=True)
    assert relative_error(m.covariance(state).numpy(), reference) <= 1e-5


def test_a_feature_that_stops_varying_does_not_remeasure_every_batch(monkeypatch):
    """A dead channel (exactly zero after a ReLU) whose shift is not exactly zero.

    Its own mean then lies infinitely many (zero) standard deviations from the
    shift, yet the offset is negligible next to the other features' spread: no
    batch is measured again for it, and the covariance stays exact.
    """
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(2000, 6)) + 50).astype(np.float32)  # far from zero: the shift moves
    x[:400, 0] = 1e-4 * (1 + 0.01 * rng.normal(size=400))  # alive in the first batch only
    x[400:, 0] = 0.0
    calls = []
    batch_moments = m._batch_moments

    def counted(*args, **kwargs):
        calls.append(1)
        return batch_moments(*args, **kwargs)

    monkeypatch.setattr(m, "_batch_moments", counted)
    state = stream(x, batch=400)
    assert len(calls) == 5 + 1  # one product per batch, the first one measured again
    reference = np.cov(x.astype(np.float64), rowvar=False, bias=True)
    assert relative_error(m.covariance(state).numpy(), reference) <= 1e-6


@pytest.mark.parametrize("sigmas", [0.0, 3.0, 5.0, 50.0, 1e6])
def test_a_probed_first_batch_is_measured_once(monkeypatch, sigmas):
    """An empty accumulator finds a far first batch's shift from a subsample, and takes
    it without re-expressing sums it does not have yet (a square's worth of work)."""
    rng = np.random.default_rng(4)
    scales = 0.7 ** np.arange(10)
    x = (rng.normal(size=(4000, 10)) * scales + sigmas * scales).astype(np.float32)
    calls, moves = [], []
    batch_moments, reshift = m._batch_moments, m.reshift
    monkeypatch.setattr(
        m, "_batch_moments", lambda *a, **k: calls.append(1) or batch_moments(*a, **k)
    )
    monkeypatch.setattr(m, "reshift", lambda *a: moves.append(1) or reshift(*a))
    state = m.empty_moments(10)
    for i in range(0, 4000, 1000):
        m._accumulate(state, torch.from_numpy(x[i : i + 1000]), empty=i == 0)
    assert len(calls) == 4 and not moves  # no batch measured twice, no sums moved
    assert bool(state.shift.any()) == (sigmas > 4.0)  # data near zero is never shifted
    reference = np.cov(x.astype(np.float64), rowvar=False, bias=True)
    assert relative_error(m.covariance(state).numpy(), reference) <= 1e-5


def test_a_misleading_probe_is_corrected_by_the_check():
    """Every 8th sample (the probe's) sits far from the others: the batch is measured again."""
    x = decaying_data(1024, 6, decay=0.8).astype(np.float32)
    x[::8] += 1e4
    state = m.empty_moments(6)
    m._accumulate(state, torch.from_numpy(x), empty=True)
    reference = np.cov(x.astype(np.float64), rowvar=False, bias=True)
    assert relative_error(m.covariance(state).numpy(), reference) <= 1e-5


@pytest.mark.parametrize("layout", ["NCHW", "channels-last"])
def test_a_probed_image_batch_matches_numpy(layout):
    rng = np.random.default_rng(5)
    x = torch.from_numpy((rng.normal(size=(4, 6, 24, 24)) * 0.01 + 3).astype(np.float32))
    if layout == "channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
    state = m.empty_moments(6)
    m._accumulate(state, x, channel_dim=1, empty=True)
    assert bool(state.shift.any())
    rows = x.permute(0, 2, 3, 1).reshape(-1, 6).double().numpy()
    reference = np.cov(rows, rowvar=False, bias=True)
    assert relative_error(m.covariance(state).numpy(), reference) <= 1e-5


def drifting(first_offset: float, later_offset: float) -> np.ndarray:
    """A first batch near one mean, then batches far from it (std about 1)."""
    x = decaying_data(4000, 12, decay=0.8).astype(np.float64)
    x[:500] += first_offset
    x[500:] += later_offset
    return x.astype(np.float32)


@pytest.mark.parametrize("first, later", [(0.0, 1e6), (1e6, 0.0), (0.0, -3e5), (5e5, 1e6)])
def test_contract_holds_in_any_order_of_batches(first, later):
    """A first batch near zero must not fix the shift for later batches at 1e6 (and back)."""
    x = drifting(first, later)
    reference = np.cov(x.astype(np.float64), rowvar=False, bias=True)
    for order in (x, x[::-1].copy()):
        state = stream(order, batch=500)
        assert relative_error(m.covariance(state).numpy(), reference) <= 1e-5
        later_part = stream(order[500:], batch=250) if order is x else None
        if later_part is not None:  # the small eigenvalues of the far part stay exact
            ref = np.linalg.eigvalsh(np.cov(x[500:].astype(np.float64), rowvar=False, bias=True))
            got = np.linalg.eigvalsh(m.covariance(later_part).numpy())
            np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_channelwise_drift_is_handled_like_rows():
    x = torch.from_numpy(decaying_data(6 * 49, 5)).reshape(6, 7, 7, 5).permute(0, 3, 1, 2)
    x = x.contiguous()
    x[3:] += 1e6
    state = m.empty_moments(5)
    for chunk in x.split(2):
        m._accumulate(state, chunk, channel_dim=1)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 5).double().numpy()
    reference = np.cov(rows, rowvar=False, bias=True)
    assert relative_error(m.covariance(state).numpy(), reference) <= 1e-5


@pytest.mark.parametrize("width", [m._SPLIT_GRAM_WIDTH - 1, m._SPLIT_GRAM_WIDTH + 1])
@pytest.mark.parametrize("layout", ["rows", "per-image", "channels-last"])
def test_gram_products_built_by_blocks_match_numpy(width, layout):
    # at and above _SPLIT_GRAM_WIDTH the CPU product is built block by block and mirrored
    rng = np.random.default_rng(2)
    scales = np.linspace(0.5, 3.0, width)
    if layout == "rows":
        x = (rng.normal(size=(600, width)) * scales + 2).astype(np.float32)
        state, rows = stream(x, batch=200), x
    else:
        # NCHW with 40 x 40 positions per image takes the per-image products
        side = 4 if layout == "channels-last" else 40
        x = (rng.normal(size=(6, width, side, side)) * scales[:, None, None] + 2).astype(np.float32)
        t = torch.from_numpy(x)
        if layout == "channels-last":
            t = t.contiguous(memory_format=torch.channels_last)
        state = m.empty_moments(width)
        for i in range(0, 6, 3):
            m._accumulate(state, t[i : i + 3], channel_dim=1)
        rows = x.transpose(0, 2, 3, 1).reshape(-1, width)
    reference = np.cov(rows.astype(np.float64), rowvar=False, bias=True)
    assert relative_error(m.covariance(state).numpy(), reference) <= 1e-5
    # a NaN in the last feature is still caught by the sums
    bad = torch.from_numpy(rows.copy())
    bad[3, -1] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        m._accumulate(m.empty_moments(width), bad)


def test_a_batch_square_is_added_to_the_float64_sums_by_blocks_of_rows_to_the_bit(monkeypatch):
    # a float32 batch's products stay float32 until they are added: then a few rows
    # at a time (no float64 copy of the whole square), with the same sums as one addition
    x = decaying_data(700, 13, offset=5.0)
    batch = m._batch_moments(torch.from_numpy(x[:100]), torch.zeros(13, dtype=torch.float64))
    assert batch.total_sq.dtype == torch.float32
    whole = stream(x, batch=100)
    monkeypatch.setattr(m, "_ADD_BYTES", 8 * 13 * 4)  # 4 rows a block: 4 + 4 + 4 + 1
    blocks = stream(x, batch=100)
    assert torch.equal(blocks.total_sq, whole.total_sq) and torch.equal(blocks.total, whole.total)
    reference = np.cov(x.astype(np.float64), rowvar=False, bias=True)
    assert relative_error(m.covariance(blocks).numpy(), reference) <= 1e-5
    total = torch.zeros(13, 13, dtype=torch.float64)
    part = torch.from_numpy(x[:13].copy())
    m._add_into(total, part)
    assert torch.equal(total, part.double())
    double = m._batch_moments(
        torch.from_numpy(x[:100]).double(), torch.zeros(13, dtype=torch.float64)
    )
    assert double.total_sq.dtype == torch.float64


def test_empty_batches_are_skipped_and_non_finite_batches_leave_the_state_alone():
    state = m.empty_moments(3)
    assert m._accumulate(state, torch.empty(0, 3)) == (0, False)
    assert int(state.count) == 0 and not state.shift.any()
    good = torch.randn(10, 3)
    m._accumulate(state, good)
    before = [t.clone() for t in state]
    bad = good.clone()
    bad[4, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        m._accumulate(state, bad)
    huge = good.clone()
    huge[4, 1] = 1e20  # finite, but its square is not in float32
    with pytest.raises(ValueError, match="squares overflow torch.float32"):
        m._accumulate(state, huge)
    for t, b in zip(state, before, strict=True):
        assert torch.equal(t, b)


def test_all_reduce_moments_equals_one_pass_over_the_union():
    """Three simulated ranks (one with no sample) and a fake reduce that sums their tensors."""
    import threading

    x = decaying_data(3000, 6, offset=1e5)
    shards = [x[:1000], x[1000:1000], x[1000:] - 0.0]
    states = [stream(s, batch=200) if len(s) else m.empty_moments(6) for s in shards]
    world = len(states)
    barrier = threading.Barrier(world)
    slots: list = [None] * world
    results: list = [None] * world

    def run(rank: int) -> None:
        def reduce(t: torch.Tensor) -> None:
            slots[rank] = t.clone()
            barrier.wait()
            total = sum(slots)
            barrier.wait()
            t.copy_(total)

        extra = torch.tensor([float(rank)], dtype=torch.float64)
        results[rank] = m.all_reduce_moments([states[rank]], reduce, extra)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reference = np.cov(x.astype(np.float64), rowvar=False, bias=True)
    for merged, extra in results:
        assert int(merged[0].count) == 3000 and float(extra[0]) == 3.0
        assert relative_error(m.covariance(merged[0]).numpy(), reference) <= 1e-5
        np.testing.assert_allclose(m.mean(merged[0]).numpy(), x.astype(np.float64).mean(0),
                                   rtol=1e-9, atol=1e-3)  # fmt: skip
