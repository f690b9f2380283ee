"""Streaming first and second moments of activations, exact to float64.

The state of an accumulator is four tensors (:class:`Moments`): the number of
samples ``count``, a reference ``shift`` (the first batch's mean, rounded to the
batch's dtype), and the float64 sums of the shifted samples ``x - shift`` and of
their outer products. Summing shifted data keeps the covariance accurate when
the mean is huge compared with the spread (|mean| = 1e6 x std in float32): the
textbook ``E[xx^T] - mu mu^T`` cancels catastrophically there, even in float64.

The per-batch sums of shifted samples and of their products run in the
batch's own precision (float32 for float32,
float16 and bfloat16 activations; float64 for float64), which keeps calibration
fast; only its result is added to the float64 sums. Two accumulators merge
exactly (:func:`merge_moments`), which is what sharded calibration all-reduces.

Everything here is a pure function of tensors except :func:`accumulate_`, the
one in-place helper that adds a batch into buffers owned by a module.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Moments",
    "accumulate_",
    "batch_moments",
    "compute_dtype",
    "covariance",
    "empty_moments",
    "mean",
    "merge_moments",
    "reference_shift",
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

    count: Tensor
    shift: Tensor
    total: Tensor
    total_sq: Tensor


def empty_moments(width: int, device: torch.device | str | None = None) -> Moments:
    """Return the state of an accumulator that has seen no sample."""
    f64 = {"dtype": torch.float64, "device": device}
    return Moments(
        torch.zeros((), dtype=torch.int64, device=device),
        torch.zeros(width, **f64),
        torch.zeros(width, **f64),
        torch.zeros(width, width, **f64),
    )


_PRODUCT_BYTES = 64 * 2**20  # memory for per-position products of one chunk


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which a batch of ``dtype`` is shifted and multiplied."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _width(x: Tensor, channel_dim: int) -> int:
    """Number of features of ``x`` along ``channel_dim``."""
    if x.dim() == 0:
        raise ValueError("activations must have at least one dimension, got a scalar")
    return x.shape[channel_dim]


# Shifting matters only when a feature's mean is large against its spread: with
# |mean| <= 4 std, products of raw float32 samples keep the covariance's relative
# error below ~17 float32 epsilons (2e-6), so the shifted copy is skipped.
SHIFT_RATIO = 4.0


def reference_shift(x: Tensor, channel_dim: int = -1) -> Tensor:
    """The shift for an accumulator whose first batch is ``x`` (features on ``channel_dim``).

    It is the batch's mean in the batch's compute dtype (so that subtracting it
    there is exact where it matters), stored as float64; or zero
    when every feature's mean lies within ``SHIFT_RATIO`` standard deviations of
    zero, where no shift is needed and :func:`batch_moments` skips the subtraction.
    """
    _width(x, channel_dim)
    cd = channel_dim % x.dim()
    dims = [d for d in range(x.dim()) if d != cd]
    # The compute dtype is precise enough: any point near the mean is a good shift.
    xc = x.to(compute_dtype(x.dtype))
    if dims:
        var, m = torch.var_mean(xc, dim=dims, correction=0)
    else:
        var, m = torch.zeros_like(xc), xc
    if bool((m.abs() <= SHIFT_RATIO * var.sqrt()).all()):
        return torch.zeros(m.shape, dtype=torch.float64, device=m.device)
    return m.to(torch.float64)


def batch_moments(
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
        The batch's :class:`Moments` with the given shift.
    """
    width = _width(x, channel_dim)
    if shift.shape != (width,):
        raise ValueError(f"shift must have shape ({width},), got {tuple(shift.shape)}")
    dtype = compute_dtype(x.dtype)
    cd = channel_dim % x.dim()
    shift64 = shift.to(device=x.device, dtype=torch.float64)
    if subtract is None:
        subtract = bool(shift64.any())
    s = shift64.to(dtype)
    if cd == x.dim() - 1:
        # (..., width): one row per sample.
        rows = x.reshape(-1, width).to(dtype)
        rows = rows - s if subtract else rows
        total_sq = (rows.T @ rows).to(torch.float64)
        count = rows.shape[0]
        total = rows.sum(0).to(torch.float64)
    else:
        # (lead..., width, trail...), e.g. NCHW: a batched (width x trail) @ (trail x width)
        # product over the leading positions, with no permute copy.
        lead, trail = math.prod(x.shape[:cd]), math.prod(x.shape[cd + 1 :])
        view = x.reshape(lead, width, trail)
        total_sq = torch.zeros(width, width, dtype=torch.float64, device=x.device)
        step = max(1, _PRODUCT_BYTES // (4 * width * width))  # bound the (step, w, w) products
        total = torch.zeros(width, dtype=torch.float64, device=x.device)
        for start in range(0, lead, step):
            shifted = view[start : start + step].to(dtype)
            shifted = shifted - s[:, None] if subtract else shifted
            total_sq += torch.bmm(shifted, shifted.transpose(1, 2)).sum(0).to(torch.float64)
            total += shifted.sum(2).to(torch.float64).sum(0)
        count = lead * trail
    return Moments(
        torch.tensor(count, dtype=torch.int64, device=x.device),
        shift64,
        total,
        total_sq,
    )


def accumulate_(state: Moments, batch: Moments) -> None:
    """Add ``batch`` into ``state`` in place; both must share the same shift."""
    state.count.add_(batch.count.to(state.count.device))
    state.total.add_(batch.total.to(state.total.device))
    state.total_sq.add_(batch.total_sq.to(state.total_sq.device))


def reshift(m: Moments, shift: Tensor) -> Moments:
    """The same moments expressed relative to another ``shift`` (exact algebra in float64)."""
    shift = shift.to(device=m.shift.device, dtype=torch.float64)
    delta = m.shift - shift  # x - new = (x - old) + delta
    n = m.count.to(torch.float64)
    total = m.total + n * delta
    cross = torch.outer(delta, m.total)
    total_sq = m.total_sq + cross + cross.T + n * torch.outer(delta, delta)
    return Moments(m.count.clone(), shift.clone(), total, total_sq)


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
