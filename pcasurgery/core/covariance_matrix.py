"""``TorchCovarianceMatrix``: the seed library's streaming covariance, on the exact core."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .._errors import NonFiniteError
from . import moments as _m

__all__ = ["TorchCovarianceMatrix"]


def resolve_device(device: torch.device | str | None, name: str = "device") -> torch.device:
    """Turn ``device`` into a ``torch.device``; a CUDA device on a machine without
    one falls back to the CPU with a warning (the seed's default is ``"cuda:0"``)."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"{name} must name a torch device such as 'cpu' or 'cuda:0', got {device!r}"
        ) from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"{name}={device!r} but CUDA is not available; using the CPU", stacklevel=3)
        return torch.device("cpu")
    return dev


class TorchCovarianceMatrix:
    r"""Computes the covariance matrix of features from batches, online.

    The seed library's formula,

    .. math:: Q(Z_l, Z_l) = \frac{\sum_b A_{l,b}^T A_{l,b}}{n} - \bar A_l \otimes \bar A_l,

    is evaluated from float64 sums of shifted samples, so it stays accurate when
    the mean dwarfs the spread (the textbook formula loses every digit there).

    Args:
        bias: accepted for compatibility; as in the seed library, :meth:`fix`
            always divides by ``n``.
        device: where the sums live. ``"cuda:0"`` without CUDA falls back to the
            CPU with a warning.
        save_data: keep every sample (float64) in ``saved_samples``, e.g. to embed them.

    Example:
        >>> cov = TorchCovarianceMatrix(device="cpu")
        >>> cov.update(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
        >>> cov.fix()
        tensor([[1., 2.],
                [2., 4.]], dtype=torch.float64)
    """

    def __init__(
        self, bias: bool = False, device: str | torch.device = "cuda:0", save_data: bool = False
    ):
        self.bias = bias
        self.device = resolve_device(device)
        self.save_data = bool(save_data)
        self.saved_samples: Tensor | None = None
        self.moments: _m.Moments | None = None
        self._subtract = False

    @property
    def _tlen(self) -> int:
        """Number of samples seen (the seed's attribute name)."""
        return 0 if self.moments is None else int(self.moments.count)

    def update(self, x: Tensor, vae: bool = False, *, channel_dim: int | None = None) -> None:
        """Add a batch ``(n, features)`` (or one sample ``(features,)``).

        ``vae=True`` takes the seed library's transposed layout ``(features, n)``.
        ``channel_dim`` (an extension) names the feature dimension of a larger
        tensor, every other position being a sample: ``channel_dim=1`` takes
        ``(batch, channels, h, w)`` maps channelwise, without a permuted copy.
        A batch with no sample is skipped.

        Raises:
            NonFiniteError: ``x`` holds NaN or infinite values, on any device
                (a ``ValueError``; the statistics are unchanged).
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if channel_dim is None:
            if vae:
                x = (
                    x.squeeze().t()
                    if x.dim() == 3
                    else (x.t() if x.dim() == 2 else x.unsqueeze(0).t())
                )
            if x.dim() == 1:
                x = x.unsqueeze(0)
            if x.dim() != 2:
                raise ValueError(
                    f"x must have shape (n, features) or (features,), got {tuple(x.shape)}"
                )
            channel_dim = -1
        width = x.shape[channel_dim]
        x = x.detach().to(self.device)
        empty = self.moments is None
        if self.moments is None:
            self.moments = _m.empty_moments(width, self.device)
        elif width != self.moments.shift.shape[0]:
            raise ValueError(
                f"x has {width} features but earlier batches had {self.moments.shift.shape[0]}"
            )
        try:
            _, self._subtract = _m._accumulate(
                self.moments, x, channel_dim, self._subtract, empty=empty
            )
        except NonFiniteError as err:
            raise NonFiniteError("x contains NaN or infinite values") from err
        if self.save_data:
            rows = x.movedim(channel_dim, -1).reshape(-1, width).to(torch.float64)
            self.saved_samples = (
                rows if self.saved_samples is None else torch.cat([self.saved_samples, rows])
            )

    def merge(self, other: TorchCovarianceMatrix) -> TorchCovarianceMatrix:
        """Add the samples ``other`` has seen (exactly, whatever order they came in)."""
        if other.moments is None:
            return self
        theirs = _m.Moments(*(t.to(self.device) for t in other.moments))
        self.moments = theirs if self.moments is None else _m.merge_moments(self.moments, theirs)
        self._subtract = bool(self.moments.shift.any())
        return self

    def fix(self, center: bool = True) -> Tensor:
        """The covariance matrix (``center=True``) or the uncentred second moment, divided by ``n``."""
        if self.moments is None or self._tlen == 0:
            raise RuntimeError("TorchCovarianceMatrix.fix() called before any update()")
        return _m.covariance(self.moments) if center else _m.second_moment(self.moments)

    @property
    def mean(self) -> Tensor:
        """Mean of the samples seen so far, float64."""
        if self.moments is None or self._tlen == 0:
            raise RuntimeError("TorchCovarianceMatrix.mean read before any update()")
        return _m.mean(self.moments)
