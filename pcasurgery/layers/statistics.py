"""The statistics protocol of a PCA layer: what calibration drives.

A calibration takes each layer's :meth:`~LayerState.snapshot` (and restores it
on failure), starts fresh statistics (:meth:`LayerStatistics.begin_statistics`),
has the layer absorb batches (:meth:`LayerStatistics.collect`, which its
forward calls in collect mode; under :func:`token_mask` padded tokens are left
out), combines them with earlier statistics and other processes'
(:meth:`LayerStatistics.statistics`, :meth:`LayerStatistics.summed_statistics`,
:meth:`LayerStatistics.load_statistics`) or declares them complete
(:meth:`LayerStatistics.finish_statistics`). A layer after a widening module
can collect that module's inputs instead (:meth:`LayerStatistics.collect_through`,
``layers.through``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor

from .._errors import NonFiniteError, NotCalibratedError
from ..core import moments as _m
from ..core import spectrum as _s
from .state import MOMENTS, STATE, SUMMED, LayerState, SquareFactors

__all__ = [
    "ROWS_FRACTION",
    "TOKEN_MASK",
    "LayerStatistics",
    "spectrum_through",
    "statistics_bytes",
    "token_mask",
]

_F64 = torch.float64

# A Linear PCA layer holds its samples themselves (float64 rows) while they number at
# most this fraction of its width: then they take at most half the memory of the
# (width, width) square, cost no product to collect, and the spectrum is an
# (n, n) problem (core.spectrum.pca_of_rows) instead of a width-wide one: a
# 4096-wide layer of a 7B-shaped model calibrated on 1024 tokens decomposes in
# a third of the time of its square's eigenvalues alone.
ROWS_FRACTION = 0.5

# Which token positions are real (True) in the batch being calibrated, (batch, tokens).
TOKEN_MASK: ContextVar[Tensor | None] = ContextVar("pcasurgery_token_mask", default=None)


def statistics_bytes(width: int, inputs: int | None = None, weight_itemsize: int = 4) -> int:
    """The most a PCA layer of ``width`` holds while it is calibrated and decomposed (what
    calibration and the block-by-block functions announce before they allocate it): a
    float64 ``(width, width)`` square and as many eigenvectors; or, for a layer whose
    statistics are collected on its module's ``inputs``-wide input (``layers.through``),
    that input's float64 square and the Cholesky factor of ``W^T W``, a copy of the
    weight (``weight_itemsize`` bytes a number) and ``inputs + 1`` eigenvectors."""
    if inputs is None:
        return 2 * 8 * width * width
    return 2 * 8 * inputs * inputs + weight_itemsize * width * inputs + 8 * width * (inputs + 1)


def spectrum_through(
    factors: SquareFactors, centering: bool, vectors: bool = True
) -> tuple[Tensor, Tensor | None]:
    """The spectrum of statistics held as their factors, from the ``in``-wide problem.

    Centred: ``W cov(x) W^T``. Uncentred, the second moment of ``y = W x + b``:
    ``[W b] E[x~ x~^T] [W b]^T`` with ``x~ = (x, 1)`` (``W E[x x^T] W^T``
    without a bias). See ``core.spectrum.eigh_through``.

    Returns:
        ``(values (out,), vectors (out, in) or (out, in + 1), or None)``.
    """
    weight, inputs = factors.weight, factors.inputs  # as held: float64 a block at a time
    if centering or factors.bias is None:
        inner = _m.covariance(inputs) if centering else _m.second_moment(inputs)
        return _s.eigh_through(weight, inner, vectors, factors.cache.setdefault("weight", {}))
    mu = _m.mean(inputs)
    inner = torch.cat(
        [
            torch.cat([_m.second_moment(inputs), mu[:, None]], 1),
            torch.cat([mu, mu.new_ones(1)])[None, :],
        ]
    )
    augmented = torch.cat([weight, factors.bias.to(weight.dtype)[:, None]], 1)
    return _s.eigh_through(augmented, inner, vectors, factors.cache.setdefault("with bias", {}))


@contextlib.contextmanager
def token_mask(mask: Tensor | None) -> Iterator[None]:
    """Within the block, Linear PCA layers collect only the positions where ``mask`` is true.

    ``mask`` is ``(batch, tokens)`` (a tokenizer's ``attention_mask``); an
    activation whose leading dimensions are ``(batch, tokens)`` (or
    ``(tokens, batch)``) contributes only its real tokens, so padding never
    enters the statistics. Other activations (pooled outputs, say) are used whole.
    A mask with no padding selects every position: it is read once here and
    dropped, so that no layer copies its real tokens out of the activations.
    """
    if mask is not None:
        mask = mask.bool()
        mask = None if bool(mask.all()) else mask
    reset = TOKEN_MASK.set(mask)
    try:
        yield
    finally:
        TOKEN_MASK.reset(reset)


class LayerStatistics(LayerState):
    """The statistics a PCA layer collects (see the module docstring)."""

    channel_dim: int = -1
    # calibration only: where the followed module's inputs are collected instead
    # of this layer's (a layers.through.InputStatistics); never saved or copied
    _through: Any = None

    @property
    def sample_rows(self) -> int:
        """Rows of the covariance collected (samples: examples times positions)."""
        return self._n

    @property
    def rows_held(self) -> bool:
        """Whether the statistics are held as the samples themselves (few of them:
        ``ROWS_FRACTION``), their square formed only if something reads it."""
        return self._rows is not None

    @property
    def has_statistics(self) -> bool:
        """Whether the layer holds statistics of some data."""
        return not self._empty

    @property
    def positions(self) -> int:
        """Samples per input example seen last (``h*w`` for convs, tokens for Linear)."""
        return int(self.sample_positions)

    @property
    def samples(self) -> int:
        """Input examples (batch rows) seen since the statistics were last reset."""
        return int(self.example_count)

    def statistics(self) -> _m.Moments:
        """The accumulated moments (the buffers themselves; modify with care).

        A layer that has seen no data holds no ``(width, width)`` square yet;
        its moments are returned with a zero square then (not stored).
        """
        self._form_square()
        state = self._held_moments()
        if state.total_sq.shape != (self.width, self.width):
            square = torch.zeros(self.width, self.width, dtype=_F64, device=state.shift.device)
            state = state._replace(total_sq=square)
        return state

    def _allocate_statistics(self) -> None:
        """Allocate the ``(width, width)`` square, where the other statistics live, if it is not yet."""
        self._form_square()
        if self.shifted_sum_sq.shape != (self.width, self.width):
            with torch.inference_mode(False):  # a buffer that later updates may change in place
                self._buffers["shifted_sum_sq"] = torch.zeros(
                    self.width, self.width, dtype=_F64, device=self.shift.device
                )

    def _fresh_statistics(self) -> None:
        """Statistics of no data (the square is released until the next batch)."""
        self._square_factors = None
        self._rows = None
        for spec in STATE:
            if spec.statistic:
                current = self._buffers[spec.name]
                assert current is not None
                shape = spec.shape(self.width, self.keepdim)
                self._put(spec.name, torch.full(shape, spec.initial, dtype=current.dtype))

    def _before_statistics_change(self) -> None:
        """What must be derived from the statistics before they change (see ``PCALayer``)."""

    def reset_statistics(self) -> None:
        """Forget the collected statistics; the current projection stays in place."""
        self._before_statistics_change()
        self._fresh_statistics()
        self._statistics_replaced()

    def _statistics_replaced(self) -> None:
        """Mark a spectrum computed before as not matching the statistics now held."""
        if self._has_spectrum:
            self._put("computed_count", -1)
        self._sync_flags()

    def load_statistics(
        self,
        state: _m.Moments,
        examples: int | None = None,
        *,
        summed: Mapping[str, int] | None = None,
        positions: int | None = None,
        shared: bool | None = None,
        square_factors: SquareFactors | None = None,
    ) -> None:
        """Replace the statistics by ``state`` (e.g. the all-reduced moments of all ranks).

        Args:
            state: the moments.
            examples: the input examples they came from (``samples``).
            summed: the buffers processes add up (:meth:`summed_statistics`), reduced.
            positions: the samples per input example (``positions``).
            shared: whether ``state`` is already the union over a process group.
            square_factors: the square is ``W S W^T`` (``state`` being the moments of
                the factors' inputs mapped through ``W``; its ``total_sq`` is ignored),
                formed when first read; the spectrum comes from the factors.
        """
        if state.shift.shape != (self.width,):
            raise ValueError(
                f"{self.name}: statistics of width {state.shift.shape[0]} do not fit width {self.width}"
            )
        if any(
            value is not self._buffers[name] for name, value in zip(MOMENTS, state, strict=True)
        ):
            self._before_statistics_change()
        self._rows = None
        if square_factors is not None:
            state = state._replace(total_sq=state.shift.new_zeros(0, 0))
        for name, value in zip(MOMENTS, state, strict=True):
            if value is not self._buffers[name]:  # its own buffers: nothing to copy
                self._put(name, value)
        self._square_factors = square_factors
        if examples is not None:
            self._put("example_count", int(examples))
        for name, total in (summed or {}).items():
            if name not in SUMMED:
                raise ValueError(
                    f"{self.name}: {name!r} is not a summed statistic; those are {SUMMED}"
                )
            self._put(name, int(total))
        if positions is not None:
            self._put("sample_positions", int(positions))
        if shared is not None:
            self._put("statistics_shared", bool(shared))
        self._statistics_replaced()

    def load_rows(self, rows: Tensor, examples: int, *, positions: int | None = None) -> None:
        """Replace the statistics by those of the samples ``rows`` ``(n, width)``, held as
        rows where they are few (``ROWS_FRACTION`` of the width), else as their moments.

        Args:
            rows: the samples.
            examples: the input examples they came from (``samples``).
            positions: the samples per input example (``positions``).
        """
        if rows.dim() != 2 or rows.shape[1] != self.width:
            raise ValueError(
                f"{self.name}: rows must be (n, {self.width}), got {tuple(rows.shape)}"
            )
        rows = rows.to(device=self.shift.device, dtype=_F64)
        if not len(rows) or len(rows) > self.width * ROWS_FRACTION:
            self.load_statistics(_m.moments_of_rows(rows), examples, positions=positions)
            return
        with torch.inference_mode(False):
            empty = _m.empty_moments(self.width, rows.device)
            self.load_statistics(
                empty._replace(
                    count=empty.count + len(rows), total=rows.sum(0), total_sq=rows.new_zeros(0, 0)
                ),
                examples,
                positions=positions,
            )
        self._rows = (rows,)

    def summed_statistics(self) -> dict[str, int]:
        """The statistics processes add up (``reduce="sum"`` in the state table), by name."""
        return {name: int(getattr(self, name)) for name in SUMMED}

    def begin_statistics(self) -> None:
        """Start statistics of no data (take a :meth:`snapshot` first to keep the old ones)."""
        self._fresh_statistics()
        self._sync_flags()

    def finish_statistics(self, *, shared: bool = False) -> None:
        """Declare the statistics collected complete (``shared``: the union over a process
        group): a spectrum computed before no longer matches them."""
        self._put("statistics_shared", shared)
        self._statistics_replaced()

    def collect_through(self, source: Any) -> None:
        """Collect ``source``'s inputs (a ``layers.through.InputStatistics`` of the followed
        module) instead of this layer's own, until called with None."""
        self._through = source

    def collecting_through(self) -> Any:
        """The ``InputStatistics`` collected instead of this layer's inputs, if any."""
        return self._through if self._collecting() else None

    def _check_statistics(self) -> None:
        """Check the statistics: there are some, and they are finite (a square held as
        its factors is checked through them, unformed)."""
        if self._empty:
            raise NotCalibratedError(
                f"PCA layer {self.name!r} has no statistics yet: run calibration "
                "(pcasurgery.calibrate) or forward data in training mode first"
            )
        state = self._held_moments()
        if self._rows is not None:  # their sum is finite iff they are (collect checks it)
            squares: tuple[Tensor, ...] = ()
        else:
            factors = self._square_factors
            squares = (
                (self.statistics().total_sq,)
                if factors is None
                else (factors.weight, factors.inputs.total_sq)
            )
        if not _s.all_finite(state.total, *squares):
            raise NonFiniteError(
                f"PCA layer {self.name!r} received NaN or infinite activations; "
                "its statistics cannot be decomposed"
            )

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"PCA layer {self.name!r} expects a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[self.channel_dim] != self.width:
            raise ValueError(
                f"PCA layer {self.name!r} has width {self.width} on dimension "
                f"{self.channel_dim}, got an input of shape {tuple(x.shape)}"
            )

    def _collecting(self) -> bool:
        return self._mode == "collect" or (self._mode == "auto" and self.training)

    def _samples_of(self, x: Tensor) -> Tensor:
        """The tensor whose positions along non-channel dimensions are the samples."""
        return x

    @torch.no_grad()
    def collect(self, x: Tensor) -> None:
        """Add a batch to the statistics (what training/collect mode does in forward).

        In ``"auto"`` mode, statistics whose eigenspace has been computed belong to
        a finished phase: the first batch after that starts fresh statistics (the
        seed library's behaviour, after calibration as after an eval pass). A
        batch with no sample (zero rows) is skipped.

        Raises:
            NonFiniteError: the batch holds NaN or infinite values (named by layer);
                the statistics are unchanged.
        """
        self._check_input(x)
        if self._mode == "auto" and self._n > 0 and self._n == self._computed:
            self.reset_statistics()
        positions = x[0].numel() // self.width if x.dim() > 1 and len(x) else 1
        examples = x.shape[0] if x.dim() > 1 else 1
        x = self._samples_of(x.detach())
        if self._take_rows(x):
            self.sample_positions.fill_(positions)
            self.example_count.add_(examples)
            return
        self._allocate_statistics()
        try:
            added, self._subtract = _m._accumulate(
                self.statistics(), x, self.channel_dim, self._subtract, empty=self._n == 0
            )
        except NonFiniteError as err:
            raise NonFiniteError(
                f"PCA layer {self.name!r} received NaN or infinite activations"
            ) from err
        if added == 0:
            return
        self.sample_positions.fill_(positions)
        self.example_count.add_(examples)
        self._n += added

    def _take_rows(self, x: Tensor) -> bool:
        """Add the batch's samples as rows, where the layer holds its samples so (or holds
        none yet) and they stay few (``ROWS_FRACTION``); False to collect moments instead
        (the rows held so far are turned into moments then, by ``_allocate_statistics``)."""
        if self.channel_dim != -1 or x.dim() == 0 or x.shape[-1] != self.width:
            return False
        square = self._buffers["shifted_sum_sq"]
        assert square is not None
        if self._rows is None and (self._n or self._square_factors is not None or square.numel()):
            return False
        added = x.numel() // self.width
        if self._n + added > self.width * ROWS_FRACTION:
            return False
        rows = x.reshape(-1, self.width)
        rows = rows.clone() if rows.dtype == _F64 else rows.to(_F64)  # never the caller's tensor
        total = rows.sum(0)
        if not bool(
            torch.isfinite(total).all()
        ):  # a float64 sum of narrower samples cannot overflow
            raise NonFiniteError(f"PCA layer {self.name!r} received NaN or infinite activations")
        if added:
            self._rows = (*(self._rows or ()), rows)
            self.sample_count.add_(added)
            self.shifted_sum.add_(total)
            self._n += added
        return True
