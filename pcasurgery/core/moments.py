"""Streaming first and second moments of activations, exact to float64.

The state of an accumulator is four tensors (:class:`Moments`): the number of
samples ``count``, a reference point ``shift``, and the float64 sums of the
shifted samples ``x - shift`` and of their outer products. Summing shifted data
keeps the covariance accurate when the mean is huge compared with the spread
(|mean| = 1e6 x std in float32): the textbook ``E[xx^T] - mu mu^T`` cancels
catastrophically there, even in float64.

The shift follows the data. An empty accumulator has shift zero. Each batch's
products are taken around the current shift in the batch's own precision
(float32 for float32, float16 and bfloat16 activations; float64 for float64);
when the batch's mean lies more than ``SHIFT_RATIO`` standard deviations from
the shift in some feature (read off the batch's own sums, at no extra pass),
and by more than a negligible fraction of the largest feature's spread, the
batch is measured again around its own mean, and the accumulated sums are
re-expressed around that new shift (exact algebra in float64). So the contract
(1e-5 relative for |mean| up to 1e6 x std) holds in any order of batches, and
data whose mean is within a few standard deviations of zero (most activations)
is never shifted at all. An accumulator's first batch is probed on a subsample
for a mean far from zero, so that it is measured once, around that mean.

Two accumulators merge exactly (:func:`merge_moments`), and
:func:`all_reduce_moments` sums many accumulators across processes with any
sum-reduction (``torch.distributed.all_reduce`` in practice).

Everything here is a pure function of tensors except :func:`_accumulate`, the
one in-place helper that adds a batch into tensors owned by a module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .._errors import NonFiniteError

__all__ = [
    "Moments",
    "all_reduce_moments",
    "covariance",
    "empty_moments",
    "map_moments",
    "mapped_square",
    "mean",
    "merge_moments",
    "moments_of_rows",
    "reshift",
    "second_moment",
]


class Moments(NamedTuple):
    """Sufficient statistics of a stream of ``width``-dimensional samples.

    Attributes:
        count: number of samples, an int64 scalar tensor.
        shift: reference point, float64 ``(width,)``; all sums are of ``x - shift``.
        total: float64 ``(width,)`` sum of ``x - shift``.
        total_sq: float64 ``(width, width)`` sum of ``(x - shift)(x - shift)^T``.
    """

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count, as NamedTuple fields may
    shift: Tensor
    total: Tensor
    total_sq: Tensor


def empty_moments(width: int, device: torch.device | str | None = None) -> Moments:
    """Return the state of an accumulator that has seen no sample."""
    f64 = torch.float64
    return Moments(
        torch.zeros((), dtype=torch.int64, device=device),
        torch.zeros(width, dtype=f64, device=device),
        torch.zeros(width, dtype=f64, device=device),
        torch.zeros(width, width, dtype=f64, device=device),
    )


_PRODUCT_BYTES = 64 * 2**20  # memory for per-position products of one chunk

# On the CPU, a Gram product at least this wide is computed in 2 x 2 blocks, the
# one below the diagonal once and mirrored (3/4 of the multiply-accumulates): torch
# has no symmetric rank-k product (syrk). Measured on 2 cores, float32, 4096 rows:
# 0.82x the full product's time at 1024 wide, 0.83x at 4096 (16384 x 768: 0.81x);
# 0.98x at 576, and 1.0-1.45x at 64-256 wide, where the smaller products lose more
# efficiency than the skipped block saves.
_SPLIT_GRAM_WIDTH = 768


def _gram(left: Tensor) -> Tensor:
    """``left @ left.mT``, summed over the leading dimension when ``left`` is 3-D.

    ``left`` is ``(width, samples)`` or ``(batch, width, samples)``; the result is
    ``(width, width)`` in ``left``'s dtype.
    """

    def product(a: Tensor, b: Tensor) -> Tensor:
        return a @ b.mT if a.dim() == 2 else torch.bmm(a, b.mT).sum(0)

    width = left.shape[-2]
    if left.device.type != "cpu" or width < _SPLIT_GRAM_WIDTH:
        return product(left, left)
    half = width // 2
    top, bottom = left[..., :half, :], left[..., half:, :]
    out = left.new_empty(width, width)
    out[:half, :half] = product(top, top)
    out[half:, half:] = product(bottom, bottom)
    out[half:, :half] = product(bottom, top)
    out[:half, half:] = out[half:, :half].mT
    return out


_ADD_BYTES = 4 * 2**20  # float64 rows a narrower square is promoted in, when added to the sums


def _add_into(total: Tensor, part: Tensor) -> None:
    """``total += part`` in place, a narrower ``part`` promoted a block of rows at a time.

    torch promotes a whole mixed-dtype operand into a temporary first: for a batch's
    float32 ``(4096, 4096)`` square, 128 MiB of float64 that the CPU allocator maps
    afresh for every batch (glibc keeps no freed block over 32 MiB) and the kernel
    zeroes page by page; in blocks of ``_ADD_BYTES`` the temporary is reused. The
    sums are the same to the bit. On a GPU (a caching allocator) it is one addition.
    """
    if part.dtype == total.dtype or total.device.type != "cpu" or total.dim() != 2:
        total.add_(part)
        return
    rows = max(1, _ADD_BYTES // (total.element_size() * max(1, total.shape[1])))
    for start in range(0, total.shape[0], rows):
        total[start : start + rows].add_(part[start : start + rows])


# Products of samples taken around a shift within SHIFT_RATIO standard deviations
# of their mean keep the covariance's relative error below ~17 float32 epsilons
# (2e-6); a batch farther away is measured again around its own mean.
SHIFT_RATIO = 4.0
_FAR = SHIFT_RATIO**2 / (1.0 + SHIFT_RATIO**2)
# An offset from the shift with d^2 below this fraction of the largest feature's
# E[(x - shift)^2] never moves the shift: its products' rounding stays below
# float32 epsilon x 1e-3 of the covariance's norm (see _check).
_NEGLIGIBLE = 1e-6


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which a batch of ``dtype`` is shifted and multiplied."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _width(x: Tensor, channel_dim: int) -> int:
    """Number of features of ``x`` along ``channel_dim``."""
    if x.dim() == 0:
        raise ValueError("activations must have at least one dimension, got a scalar")
    return x.shape[channel_dim]


def _batch_moments(
    x: Tensor, shift: Tensor, channel_dim: int = -1, subtract: bool | None = None
) -> Moments:
    """Moments of one batch, relative to ``shift``.

    Args:
        x: activations with the features on ``channel_dim``; every other position
            is a sample (for ``(batch, channels, h, w)`` with ``channel_dim=1``,
            each pixel of each image is one sample).
        shift: float64 ``(width,)`` reference point.
        channel_dim: the feature dimension of ``x``.
        subtract: whether ``shift`` is non-zero (skip the subtraction when it is
            zero); computed from ``shift`` when None, which costs a device sync.

    Returns:
        The batch's :class:`Moments` with the given shift; ``total_sq`` in the
        compute dtype for activations with one row per sample (float32 products
        of float32 activations, promoted only as they are added to float64 sums,
        :func:`_add_into`), float64 for the per-image products of NCHW maps.
    """
    width = _width(x, channel_dim)
    if shift.shape != (width,):
        raise ValueError(f"shift must have shape ({width},), got {tuple(shift.shape)}")
    dtype = _compute_dtype(x.dtype)
    cd = channel_dim % x.dim()
    shift64 = shift.to(device=x.device, dtype=torch.float64)
    if subtract is None:
        subtract = bool(shift64.any())
    s = shift64.to(dtype)
    lead, trail = math.prod(x.shape[:cd]), math.prod(x.shape[cd + 1 :])
    last = x.movedim(cd, -1)
    if last.is_contiguous() or trail < 2 * width:
        # one row per sample, and one (width x samples) @ (samples x width) product: for
        # (..., width) and channels-last maps a free view; for NCHW maps with fewer
        # positions per image than twice the width, a copy that costs far less than
        # the per-image products would
        rows = last.reshape(-1, width).to(dtype)
        rows = rows - s if subtract else rows
        total_sq = _gram(rows.T)  # in the compute dtype: added to float64 sums by _add_into
        count = rows.shape[0]
        total = rows.sum(0).to(torch.float64)
    else:
        # (lead..., width, trail...), e.g. NCHW: a batched (width x trail) @ (trail x width)
        # product over the leading positions, with no permute copy.
        view = x.reshape(lead, width, trail)
        total_sq = torch.zeros(width, width, dtype=torch.float64, device=x.device)
        step = max(1, _PRODUCT_BYTES // (4 * width * width))  # bound the (step, w, w) products
        total = torch.zeros(width, dtype=torch.float64, device=x.device)
        for start in range(0, lead, step):
            shifted = view[start : start + step].to(dtype)
            shifted = shifted - s[:, None] if subtract else shifted
            _add_into(total_sq, _gram(shifted))
            total += shifted.sum(2).to(torch.float64).sum(0)
        count = lead * trail
    return Moments(
        torch.full((), count, dtype=torch.int64, device=x.device),  # no host-to-device copy
        shift64,
        total,
        total_sq,
    )


# The first batch of an accumulator is probed on every _PROBE_STRIDE-th sample
# (at least _PROBE_SAMPLES of them) for a mean far from the zero shift.
_PROBE_STRIDE = 8
_PROBE_SAMPLES = 64


def _probe_shift(x: Tensor, channel_dim: int) -> Tensor | None:
    """A shift for a first batch whose mean is far from zero, read off a subsample; else None.

    Every ``_PROBE_STRIDE``-th sample (rows, or positions of each image for NCHW
    maps) is summed with its squares, a read of a fraction of the batch, and
    the subsample's mean is tested as :func:`_check` tests a batch. Where some
    feature is far from zero, that mean (rounded to the compute dtype, so that
    the subtraction is exact) is the shift to measure the batch around; the
    check that follows still measures it again if the subsample misled. Without
    the probe, a far first batch (most layers of a trained network) has its
    products taken twice: around zero, then around its own mean.
    """
    width = _width(x, channel_dim)
    cd = channel_dim % x.dim()
    count = x.numel() // width if width else 0
    stride = _PROBE_STRIDE if count >= _PROBE_STRIDE * _PROBE_SAMPLES else 1
    dtype = _compute_dtype(x.dtype)
    last = x.movedim(cd, -1)
    if last.is_contiguous() or x.dim() == 1:
        sample = last.reshape(-1, width)[::stride].to(dtype)
        total, squares = sample.sum(0), sample.square().sum(0)
    else:
        lead = math.prod(x.shape[:cd])
        sample = x.reshape(lead, width, -1)[:, :, ::stride].to(dtype)
        total, squares = sample.sum((0, 2)), sample.square().sum((0, 2))
    n = sample.numel() // width
    total = total.to(torch.float64)
    least, _ = _least_margin(total, squares.to(torch.float64), n)
    if not float(least) < 0:  # nothing far (or not finite: the check will say so)
        return None
    return (total / n).to(dtype).to(torch.float64)


def _least_margin(total: Tensor, squares: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """``(least margin, largest square)`` for samples' sums and sums of squares about a shift.

    The margin is negative iff some feature is far (see :func:`_check`), NaN iff
    ``total`` is not finite; both are left on the device, to be read together.
    """
    top = squares.max()
    margin = torch.addcmul(squares, total, total, value=-1.0 / (_FAR * count))
    slack = torch.addcmul(_NEGLIGIBLE * top, total, total, value=-1.0 / count)
    return torch.maximum(margin, slack).min(), top


def _check(batch: Moments, count: int) -> tuple[bool, bool]:
    """``(finite, far)`` for a batch's moments, read in one device sync.

    A sum is non-finite iff some sample is (or the batch overflows its compute
    dtype), so the check costs ``width`` operations, not one per element. ``far``:
    some feature's mean lies more than ``SHIFT_RATIO`` standard deviations from
    the shift, i.e. ``d^2 > R^2 / (1 + R^2) * E[(x - shift)^2]`` with ``d`` the
    mean of ``x - shift`` (both sides sums of squares, free of cancellation),
    and ``d^2`` is more than ``_NEGLIGIBLE`` of the largest feature's
    ``E[(x - shift)^2]``. Below that the offset's rounding is negligible next to
    the covariance's norm (the contract is norm-wise), whatever the feature's own
    spread: a feature that stops varying (a ReLU channel dead in this batch) has
    a mean infinitely many standard deviations from any shift but its own, which
    rounding may never reach, and must not have every batch measured again.
    The per-feature test is read off one number, the least of
    ``max(diag(total_sq) - total^2 / (_FAR n), _NEGLIGIBLE max(diag(total_sq)) - total^2 / n)``:
    negative iff some feature is far, NaN iff ``total`` is not finite (an
    infinite sum has an infinite square on the diagonal, and ``inf - inf`` is
    NaN); the largest diagonal, read with it, is infinite where a square
    overflowed.
    """
    least, largest = torch.stack(
        _least_margin(batch.total, batch.total_sq.diagonal().to(torch.float64), count)
    ).tolist()
    return not math.isnan(least) and math.isfinite(largest), least < 0


def _accumulate(
    state: Moments,
    x: Tensor,
    channel_dim: int = -1,
    subtract: bool | None = None,
    empty: bool = False,
) -> tuple[int, bool]:
    """Add the samples of ``x`` (features on ``channel_dim``) into ``state``, in place.

    See :func:`_accumulate_known` for the arguments and what is raised.

    Returns:
        ``(samples added, whether the shift is non-zero now)``.
    """
    added, subtract, _ = _accumulate_known(state, x, channel_dim, subtract, empty=empty)
    return added, subtract


def _accumulate_known(
    state: Moments,
    x: Tensor,
    channel_dim: int = -1,
    subtract: bool | None = None,
    known: Moments | None = None,
    empty: bool = False,
) -> tuple[int, bool, Moments | None]:
    """Add the samples of ``x`` (features on ``channel_dim``) into ``state``, in place.

    A batch with no sample leaves ``state`` unchanged. A batch whose mean is far
    from ``state.shift`` (see the module docstring) moves the shift to the
    batch's mean and re-expresses the sums already accumulated around it.

    Args:
        state: tensors to update in place (a module's buffers, say).
        x: the batch.
        channel_dim: the feature dimension of ``x``.
        subtract: whether ``state.shift`` is non-zero, if the caller knows
            (saves a device sync); computed when None.
        known: the moments of these same samples returned by an earlier call
            (for another accumulator fed the same tensor): used instead of
            computing them again where their shift equals ``state``'s (any
            shift, when ``state`` is empty).
        empty: ``state`` holds no sample yet, if the caller knows (saves a
            device sync): a batch far from the zero shift is then found from a
            subsample (:func:`_probe_shift`) and measured once, around the
            subsample's mean, instead of twice.

    Returns:
        ``(samples added, whether the shift is non-zero now, the batch's moments)``;
        the moments are None when the batch had no sample.

    Raises:
        NonFiniteError: ``x`` holds NaN or infinite values (``state`` unchanged).
    """
    width = _width(x, channel_dim)
    count = x.numel() // width if width else 0
    if subtract is None:
        subtract = bool(state.shift.any())
    if count == 0:
        return 0, subtract, None
    moved = False
    if known is not None and (
        known.total_sq.shape != (width, width) or known.shift.device != state.shift.device
    ):
        known = None
    if known is not None:
        same = torch.equal(known.shift, state.shift)
        if same or empty:  # an empty state takes any shift for free
            batch, moved = known, not same
        else:
            known = None
    if known is None:
        probed = _probe_shift(x, channel_dim) if empty and not subtract else None
        if probed is None:
            batch = _batch_moments(x, state.shift, channel_dim, subtract)
        else:
            batch, moved = _batch_moments(x, probed, channel_dim, subtract=True), True
    for _ in range(3):
        finite, far = _check(batch, count)
        if not finite:
            raise NonFiniteError(
                "activations contain NaN or infinite values, or values whose squares "
                f"overflow {_compute_dtype(x.dtype)}"
            )
        if not far:
            break
        # the batch's own mean, rounded to its compute dtype so that the subtraction is exact
        center = batch.shift + batch.total / count
        center = center.to(_compute_dtype(x.dtype)).to(torch.float64)
        batch = _batch_moments(x, center, channel_dim, subtract=True)
        moved = True
    if moved:
        if empty:  # no sums yet to re-express around the new shift
            state.shift.copy_(batch.shift)
        else:
            moved_state = reshift(state, batch.shift)
            for buf, value in zip(state[1:], moved_state[1:], strict=True):
                buf.copy_(value)
        subtract = bool(batch.shift.any())
    state.count.add_(count)
    state.total.add_(batch.total.to(state.total.device))
    _add_into(state.total_sq, batch.total_sq.to(state.total_sq.device))
    return count, subtract, batch


def reshift(m: Moments, shift: Tensor) -> Moments:
    """The same moments expressed relative to another ``shift`` (exact algebra in float64)."""
    shift = shift.to(device=m.shift.device, dtype=torch.float64)
    delta = m.shift - shift  # x - new = (x - old) + delta
    n = m.count.to(torch.float64)
    total = m.total + n * delta
    cross = torch.outer(delta, m.total)
    total_sq = m.total_sq + cross + cross.T + n * torch.outer(delta, delta)
    return Moments(m.count.clone(), shift.clone(), total, total_sq)


def map_moments(
    m: Moments, weight: Tensor, bias: Tensor | None = None, square: bool = True
) -> Moments:
    """The moments of ``y = weight @ x + bias`` from those of ``x`` (exact algebra in float64).

    Around the shift ``weight @ shift + bias``, ``y - shift_y = weight (x - shift)``:
    the sums map through ``weight`` and the products through ``weight . weight^T``,
    so the shift's protection against cancellation carries over.

    Args:
        m: moments of ``x`` (width ``r``).
        weight: ``(d, r)``.
        bias: ``(d,)``, or None for zero.
        square: map the products too (``weight @ total_sq @ weight.T``); otherwise
            the result's ``total_sq`` is an empty ``(0, 0)`` placeholder, for a
            caller that keeps the factors of the square instead.
    """
    w = weight.to(device=m.shift.device, dtype=torch.float64)
    shift = w @ m.shift
    if bias is not None:
        shift = shift + bias.to(shift)
    total_sq = mapped_square(w, m.total_sq) if square else m.total_sq.new_zeros(0, 0)
    return Moments(m.count.clone(), shift, w @ m.total, total_sq)


def mapped_square(weight: Tensor, inner: Tensor) -> Tensor:
    """``weight @ inner @ weight.T`` in float64, on ``inner``'s device: products mapped through ``weight``."""
    w = weight.to(device=inner.device, dtype=torch.float64)
    return w @ inner.to(torch.float64) @ w.T


def moments_of_rows(rows: Tensor) -> Moments:
    """The moments of samples held as the rows of a float64 ``(n, width)`` matrix.

    They are taken around the rows' mean rounded to float32, so that later
    float32 batches subtract the shift exactly (:func:`_batch_moments`), and
    the sums of the shifted rows are formed in float64: no cancellation, however
    far the mean lies from zero.
    """
    rows = rows.to(torch.float64)
    n, width = rows.shape
    if not n:
        return empty_moments(width, rows.device)
    shift = rows.mean(0).to(torch.float32).to(torch.float64)
    shifted = rows - shift
    count = torch.full((), n, dtype=torch.int64, device=rows.device)
    return Moments(count, shift, shifted.sum(0), _gram(shifted.T))


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Moments of the union of two streams, expressed relative to ``a``'s shift.

    Merging the moments of two halves of a data set gives the moments of one pass
    over all of it (to float64 rounding), whatever their shifts.
    """
    if int(a.count) == 0:
        return Moments(*(t.clone() for t in b))
    if int(b.count) == 0:
        return Moments(*(t.clone() for t in a))
    b = reshift(b, a.shift)
    return Moments(a.count + b.count, a.shift.clone(), a.total + b.total, a.total_sq + b.total_sq)


def all_reduce_moments(
    states: Sequence[Moments],
    reduce: Callable[[Tensor], None],
    extra: Tensor | None = None,
) -> tuple[list[Moments], Tensor | None]:
    """Sum accumulators over processes: each process passes its own, all get the union.

    Each process first re-expresses its moments around a shift common to all
    (the mean of the shifts of the processes that hold samples), then all sums
    travel in one packed float64 tensor. Counts travel as float64, exact up to
    2**53 samples. A process with no sample takes part like any other.

    Args:
        states: this process's accumulators (the same widths, in the same order,
            on every process).
        reduce: sums a float64 tensor in place over all processes, e.g.
            ``lambda t: torch.distributed.all_reduce(t, group=group)``.
        extra: a float64 1-D tensor summed alongside (example counts, say).

    Returns:
        ``(moments of the union per accumulator, the summed extra)``.
    """
    if not states:
        return [], extra
    f64 = torch.float64
    device = states[0].shift.device
    widths = [m.shift.shape[0] for m in states]
    # 1. a shift common to all processes
    has = torch.tensor([float(int(m.count) > 0) for m in states], dtype=f64, device=device)
    packed = torch.cat([m.shift.to(device) * h for m, h in zip(states, has, strict=True)] + [has])
    reduce(packed)
    holders = packed[-len(states) :].clamp_min(1.0)
    commons = [c / n for c, n in zip(packed[: -len(states)].split(widths), holders, strict=True)]
    # 2. every accumulator around it, then one sum
    local = [reshift(m, c.to(m.shift.device)) for m, c in zip(states, commons, strict=True)]
    parts = [
        torch.cat(
            [
                m.count.to(device, f64).reshape(1),
                m.total.to(device),
                m.total_sq.to(device).reshape(-1),
            ]
        )
        for m in local
    ]
    if extra is not None:
        parts.append(extra.to(device, f64).reshape(-1))
    packed = torch.cat(parts)
    reduce(packed)
    sizes = [1 + w + w * w for w in widths]
    chunks = packed.split(sizes + ([packed.numel() - sum(sizes)] if extra is not None else []))
    merged = []
    for m, common, chunk, w in zip(states, commons, chunks, widths, strict=False):
        target = m.shift.device
        merged.append(
            Moments(
                chunk[0].round().to(torch.int64).to(target),
                common.to(target),
                chunk[1 : 1 + w].to(target),
                chunk[1 + w :].reshape(w, w).to(target),
            )
        )
    return merged, (chunks[-1] if extra is not None else None)


def _require_samples(m: Moments) -> float:
    n = int(m.count)
    if n <= 0:
        raise ValueError("no samples have been accumulated")
    return float(n)


def mean(m: Moments) -> Tensor:
    """Mean of the samples, float64 ``(width,)``."""
    n = _require_samples(m)
    return m.shift + m.total / n


def covariance(m: Moments) -> Tensor:
    """Covariance of the samples divided by ``n`` (population covariance), float64."""
    n = _require_samples(m)
    d = m.total / n
    c = m.total_sq / n - torch.outer(d, d)
    return (c + c.T) / 2


def second_moment(m: Moments) -> Tensor:
    """Uncentred second moment ``E[x x^T]`` of the samples, float64."""
    n = _require_samples(m)
    d = m.total / n
    cross = torch.outer(m.shift, d)
    c = m.total_sq / n + cross + cross.T + torch.outer(m.shift, m.shift)
    return (c + c.T) / 2
