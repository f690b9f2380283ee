"""PCA layers: observers that collect activation statistics, then project.

``LinearPCALayer`` and ``Conv2DPCALayer`` keep the seed library's constructor
signatures and behaviour:

* training mode: identity; the batch is added to the statistics;
* eval mode: projection onto the top-``k`` eigenvectors, where ``k`` is the
  intrinsic dimensionality at ``threshold``. The eigenspace is computed on the
  first eval call after new statistics (or explicitly, :meth:`compute_eigenspace`).

Differences from the seed library, all deliberate:

* the projection centres on the real mean of the data (the seed never computed
  it and centred on zeros);
* ``k`` is the smallest number of directions explaining at least ``threshold``
  of the variance (scikit-learn's rule); the seed's "+1 if the gap exceeds 2 %"
  adjustment is gone, and a layer whose outputs never vary has ``k = 0``;
* statistics are not thrown away after the eigendecomposition, so changing
  ``threshold`` or ``centering`` later needs no new data. As in the seed, the
  first training batch after an eval-mode recomputation starts fresh statistics
  (one covariance per training phase);
* an uncalibrated layer in eval mode passes its input through unchanged (the
  wrapped model computes the original function until it has seen data);
* the eval-mode forward is one fused affine map (``F.linear`` / a 1x1
  ``F.conv2d``), or two skinny ones through the ``k`` kept directions when
  ``2k < width``, held in buffers, so ``state_dict`` round-trips and the layer
  exports to ONNX.

Besides ``module.train()``/``eval()``, :attr:`mode` forces a behaviour:
``"collect"`` (identity + statistics, in any mode; what calibration uses while
the rest of the model stays in eval mode), ``"project"`` (always project) or
``"auto"`` (the seed's behaviour, the default).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._errors import NonFiniteError, NotCalibratedError
from .._progress import progress_bar, step
from .._validation import (
    check_bool,
    check_choice,
    check_positive_int,
    check_threshold,
)
from ..core import moments as _m
from ..core import spectrum as _s

__all__ = [
    "Conv1DPCALayer",
    "Conv2DPCALayer",
    "Conv3DPCALayer",
    "LinearPCALayer",
    "PCALayer",
    "pca_layer_for",
]

log = logging.getLogger("pcasurgery")

MODES = ("auto", "collect", "project")


@dataclass(frozen=True)
class _StateSpec:
    """One buffer of a PCA layer, declared once.

    Attributes:
        name: the buffer's name (its ``state_dict`` key).
        shape: ``shape(width, keepdim)``, its shape when the layer is built.
        dtype: its dtype, which casts such as ``.half()`` never change; None for
            the projection, which follows the module's floating dtype.
        statistic: part of the collected statistics: cleared by
            ``reset_statistics``, collected afresh by each calibration.
        reduce: how processes combine it: ``"moments"`` (the four fields of
            ``core.moments.Moments``, summed exactly around a common shift by
            ``all_reduce_moments``), ``"sum"`` (added), or None (kept per process).
        resizable: its shape depends on ``k`` or on whether there is data yet (the
            squares are allocated when first needed); a checkpoint's shape is
            taken on load.
        initial: the value it starts from (and returns to on reset).
        optional: added after checkpoints were first written; a checkpoint
            without it loads, keeping the initial value.
        view_of: the buffer whose leading columns it may be, a strided view that
            shares their storage (the basis: the kept eigenvectors, not a second
            copy of them) and is sliced again after a move to another device; a
            checkpoint is loaded into a buffer of its own, never through the view.
    """

    name: str
    shape: Callable[[int, bool], tuple[int, ...]]
    dtype: torch.dtype | None
    statistic: bool = False
    reduce: str | None = None
    resizable: bool = False
    initial: float = 0
    optional: bool = False
    view_of: str | None = None


def _scalar(width: int, keepdim: bool) -> tuple[int, ...]:
    return ()


def _vector(width: int, keepdim: bool) -> tuple[int, ...]:
    return (width,)


def _unallocated(width: int, keepdim: bool) -> tuple[int, ...]:
    return (0, 0)  # (width, width) once the first batch arrives (PCALayer._allocate_statistics)


_F64, _I64 = torch.float64, torch.int64
_STATE: tuple[_StateSpec, ...] = (
    # the moments (core.moments.Moments) and the examples they came from
    _StateSpec("sample_count", _scalar, _I64, statistic=True, reduce="moments"),
    _StateSpec("shift", _vector, _F64, statistic=True, reduce="moments"),
    _StateSpec("shifted_sum", _vector, _F64, statistic=True, reduce="moments"),
    _StateSpec(
        "shifted_sum_sq", _unallocated, _F64, statistic=True, reduce="moments", resizable=True
    ),
    _StateSpec("example_count", _scalar, _I64, statistic=True, reduce="sum"),
    # samples per input example in the last batch (h*w for convs, tokens for Linear)
    _StateSpec("sample_positions", _scalar, _I64, statistic=True, initial=1),
    # the statistics are already the union over a process group (a distributed calibration)
    _StateSpec("statistics_shared", _scalar, torch.bool, statistic=True, optional=True),
    # sample_count when the spectrum was computed: 0 = never, -1 = from other statistics
    _StateSpec("computed_count", _scalar, _I64),
    _StateSpec("_threshold", _scalar, _F64),
    _StateSpec("_centering", _scalar, torch.bool),
    _StateSpec("_keepdim", _scalar, torch.bool, optional=True),
    _StateSpec("eigenvalues", _vector, _F64),
    # the eigenvectors computed so far, leading first: all of them, or those of the
    # non-zero eigenvalues when the spectrum came from a layer's input (layers.through)
    _StateSpec("eigenvectors", lambda w, keep: (w, 0), _F64, resizable=True),
    _StateSpec("mean", _vector, _F64),
    _StateSpec("rank", _scalar, _I64),
    _StateSpec("random_directions", _scalar, torch.bool),
    # the affine map of the projection (V V^T, or V^T where that is smaller: see
    # PCALayer._factored), and the (width, k) basis it keeps
    _StateSpec("projection_weight", lambda w, keep: (0, w), None, resizable=True),
    _StateSpec("projection_bias", lambda w, keep: (0,), None, resizable=True),
    _StateSpec("basis", lambda w, keep: (w, 0), _F64, resizable=True, view_of="eigenvectors"),
)
_SPEC = {spec.name: spec for spec in _STATE}
_MOMENTS = tuple(s.name for s in _STATE if s.reduce == "moments")  # Moments' field order
_SUMMED = tuple(s.name for s in _STATE if s.reduce == "sum")
assert _MOMENTS == ("sample_count", "shift", "shifted_sum", "shifted_sum_sq")


# Which token positions are real (True) in the batch being calibrated, (batch, tokens).
_TOKEN_MASK: ContextVar[Tensor | None] = ContextVar("pcasurgery_token_mask", default=None)


@contextlib.contextmanager
def token_mask(mask: Tensor | None) -> Iterator[None]:
    """Within the block, Linear PCA layers collect only the positions where ``mask`` is true.

    ``mask`` is ``(batch, tokens)`` (a tokenizer's ``attention_mask``); an
    activation whose leading dimensions are ``(batch, tokens)`` (or
    ``(tokens, batch)``) contributes only its real tokens, so padding never
    enters the statistics. Other activations (pooled outputs, say) are used whole.
    """
    reset = _TOKEN_MASK.set(None if mask is None else mask.bool())
    try:
        yield
    finally:
        _TOKEN_MASK.reset(reset)


def _exporting() -> bool:
    """Whether the forward is being traced or exported rather than run."""
    compiler = getattr(torch, "compiler", None)
    is_exporting = getattr(compiler, "is_exporting", None)
    is_compiling = getattr(compiler, "is_compiling", None)
    return bool(
        torch.jit.is_tracing()
        or (is_exporting is not None and is_exporting())
        or (is_compiling is not None and is_compiling())
    )


class PCALayer(nn.Module):
    """Common machinery of the PCA layers; use :class:`LinearPCALayer` or :class:`Conv2DPCALayer`.

    The feature dimension is ``channel_dim``; every other position of the input
    is one sample of the statistics. The layer's whole state is the buffers
    declared in :data:`_STATE`; host-side mirrors of the sample counts, the scalar
    settings and the rank keep the forward and their reads free of device syncs, and
    are derived from the buffers in one place (:meth:`_sync_flags`).

    Buffers are replaced, never changed in place, except the statistics while a
    batch is added: a shallow copy of ``_buffers`` is then a complete snapshot,
    which is how calibration restores a layer when it fails.
    """

    channel_dim: int = -1
    spatial_dims: int = 0  # positions of a (batch, channels, *spatial) map; 0: features last
    kind: str = "linear"
    num = 0  # the seed's counter, used for default layer names
    # calibration only: where the followed module's inputs are collected instead
    # of this layer's (a layers.through.InputStatistics); never saved or copied
    _through: Any = None
    # ``(W, C)`` while the statistics' square is held as its factors ``W C W^T``
    # (a widening layer calibrated on its input, layers.through): the square is
    # formed the first time anything reads it (``statistics()``, the buffer, the
    # state dict, more data), so that calibration and its spectrum never need it
    _square_factors: tuple[Tensor, Tensor] | None = None
    # ``((eigenvectors, weight, bias), their tokens)`` where the computed eigenvectors,
    # fewer than the width, span the range of the followed module's map as it was
    # when they were computed (layers.through); see ``_discarded``. Cleared when the
    # spectrum is installed; a weight replaced since stays referenced until then.
    _spans: tuple[tuple, tuple] | None = None

    # The buffers of _STATE, for type checkers (nn.Module resolves them at run time).
    sample_count: Tensor
    shift: Tensor
    shifted_sum: Tensor
    shifted_sum_sq: Tensor
    example_count: Tensor
    sample_positions: Tensor
    statistics_shared: Tensor
    computed_count: Tensor
    _threshold: Tensor
    _centering: Tensor
    _keepdim: Tensor
    eigenvalues: Tensor
    eigenvectors: Tensor
    mean: Tensor
    rank: Tensor
    random_directions: Tensor
    projection_weight: Tensor
    projection_bias: Tensor
    basis: Tensor

    def __init__(
        self,
        width: int,
        threshold: float = 0.99,
        keepdim: bool = True,
        verbose: bool = False,
        gradient_epoch_start: int = 20,
        centering: bool = True,
        *,
        width_name: str = "in_features",
    ):
        super().__init__()
        width = check_positive_int(width, width_name)
        threshold = check_threshold(threshold)
        check_bool(keepdim, "keepdim")
        check_bool(centering, "centering")
        self.width: int = width
        self.verbose = bool(verbose)
        self.gradient_epoch = gradient_epoch_start
        self.epoch = 0
        self.name = f"pca{PCALayer.num}"
        PCALayer.num += 1
        self._mode = "auto"
        for spec in _STATE:
            shape = spec.shape(width, keepdim)
            dtype = spec.dtype or torch.get_default_dtype()
            self.register_buffer(spec.name, torch.full(shape, spec.initial, dtype=dtype))
        self._put("_threshold", threshold)
        self._put("_centering", centering)
        self._put("_keepdim", keepdim)
        self._sync_flags()

    # ------------------------------------------------------------------ state
    def _put(self, name: str, value: Tensor | float | bool) -> None:
        """Install a new tensor as buffer ``name``, in its declared dtype, on the layer's device.

        Contiguous, except for a buffer declared a view of another (``view_of``),
        which keeps the strides it is given (a slice of that buffer stays a slice).
        It shares memory with no other buffer (a tensor that does is copied): a
        state dict of tensors that share memory is refused by safetensors, and so
        by ``save_pretrained``.
        """
        current = self._buffers[name]
        assert current is not None
        spec = _SPEC[name]
        dtype = spec.dtype or current.dtype
        with torch.inference_mode(False):
            if not isinstance(value, Tensor):  # filled where it lives: no host-to-device copy
                value = torch.full((), value, dtype=dtype, device=current.device)
            value = value.to(device=current.device, dtype=dtype)
            if value.is_inference() or self._aliases(value, spec):
                value = value.clone()
            self._buffers[name] = value if spec.view_of else value.contiguous()

    def _aliases(self, value: Tensor, spec: _StateSpec) -> bool:
        """Whether ``value`` shares memory with a buffer, other than the one ``spec``
        declares it a view of (and its own view of that one)."""
        ptr = value.untyped_storage().data_ptr()
        allowed = (spec.view_of, spec.name) if spec.view_of else ()
        return bool(ptr) and any(
            other is not None and name not in allowed and other.untyped_storage().data_ptr() == ptr
            for name, other in self._buffers.items()
        )

    def _sync_flags(self) -> None:
        """Derive the host-side mirrors from the buffers (one device sync)."""
        flags = torch.stack(
            [
                t.to(_F64)
                for t in (
                    self.sample_count,
                    self.computed_count,
                    self.shift.any(),
                    self._keepdim,
                    self._threshold,
                    self._centering,
                    self.rank,
                )
            ]
        ).tolist()
        self._n, self._computed = int(flags[0]), int(flags[1])
        self._subtract, self._keepdim_host = bool(flags[2]), bool(flags[3])
        self._threshold_host, self._centering_host = flags[4], bool(flags[5])
        self._rank_host = int(flags[6])

    @property
    def _empty(self) -> bool:
        return self._n == 0

    @property
    def _has_spectrum(self) -> bool:
        return self._computed != 0

    @property
    def _stale(self) -> bool:
        return self._n > 0 and self._n != self._computed

    def _held_moments(self) -> _m.Moments:
        """The moment buffers as they are: the square may still be unformed (``(0, 0)``)."""
        return _m.Moments(*(self._buffers[name] for name in _MOMENTS))  # type: ignore[arg-type]

    def _form_square(self) -> None:
        """Form the square from its factors, if it is held that way (see ``_square_factors``)."""
        factors = self._square_factors
        if factors is not None:
            weight, inner = factors
            with torch.inference_mode(False):
                self._buffers["shifted_sum_sq"] = _m.mapped_square(weight, inner)
            self._square_factors = None

    def __getattr__(self, name: str) -> Any:
        if name == "shifted_sum_sq":
            self._form_square()
        return super().__getattr__(name)

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
        for spec in _STATE:
            if spec.statistic:
                current = self._buffers[spec.name]
                assert current is not None
                shape = spec.shape(self.width, self.keepdim)
                self._put(spec.name, torch.full(shape, spec.initial, dtype=current.dtype))

    def reset_statistics(self) -> None:
        """Forget the collected statistics; the current projection stays in place."""
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
        square_factors: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        """Replace the statistics by ``state`` (e.g. the all-reduced moments of all ranks).

        With ``square_factors`` ``(W, C)`` the square is ``W C W^T``, formed when
        first read (``state.total_sq`` is ignored); ``W`` must not change after.
        """
        if state.shift.shape != (self.width,):
            raise ValueError(
                f"{self.name}: statistics of width {state.shift.shape[0]} do not fit width {self.width}"
            )
        if square_factors is not None:
            state = state._replace(total_sq=state.shift.new_zeros(0, 0))
        for name, value in zip(_MOMENTS, state, strict=True):
            if value is not self._buffers[name]:  # its own buffers: nothing to copy
                self._put(name, value)
        self._square_factors = square_factors
        if examples is not None:
            self._put("example_count", int(examples))
        self._statistics_replaced()

    def _apply(self, fn, recurse=True):
        # Module.half()/float()/to(dtype) would cast the float64 statistics; keep
        # every buffer in its declared dtype and only follow the device (a square
        # held as its factors too).
        keep = {s.name: self._buffers[s.name] for s in _STATE if s.dtype is not None}
        views = {
            s.name: _leading_columns(self._buffers[s.name], self._buffers[s.view_of])
            for s in _STATE
            if s.view_of
        }
        super()._apply(fn, recurse)
        device = self.projection_weight.device
        for name, value in keep.items():
            if value is not None:
                self._buffers[name] = value.to(device)
        for name, k in views.items():  # still a view, not a copy, on the new device
            base = self._buffers[str(_SPEC[name].view_of)]
            if k is not None and base is not None:
                self._buffers[name] = base[:, :k]
        if self._square_factors is not None:
            weight, inner = self._square_factors
            self._square_factors = (weight.to(device), inner.to(device))
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._form_square()
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for spec in _STATE:  # a tensor of its own (a full-rank view is its whole base):
            if spec.view_of and prefix + spec.name in destination:  # safetensors refuses shared
                destination[prefix + spec.name] = destination[prefix + spec.name].clone(
                    memory_format=torch.contiguous_format
                )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # fmt: skip
        if prefix + "sum_squares" in state_dict and prefix + "shifted_sum_sq" not in state_dict:
            self._convert_delve_state(state_dict, prefix)
        incoming_keepdim = state_dict.get(prefix + "_keepdim")
        weight = state_dict.get(prefix + "projection_weight")
        if isinstance(incoming_keepdim, Tensor):
            theirs = bool(incoming_keepdim)
        elif isinstance(weight, Tensor) and weight.dim() == 2 and weight.shape[0] != self.width:
            theirs = False  # a checkpoint from before keepdim was stored: read it off the shape
        else:
            theirs = self.keepdim
        if theirs != self.keepdim:
            error_msgs.append(
                f"{prefix or 'PCA layer '}: the checkpoint was saved with keepdim={theirs}, this "
                f"layer has keepdim={self.keepdim} (its outputs would change shape); build the "
                f"layer with keepdim={theirs} to load it"
            )
            return
        for spec in _STATE:
            incoming = state_dict.get(prefix + spec.name)
            current = self._buffers[spec.name]
            if spec.resizable and isinstance(incoming, Tensor) and current is not None:
                if incoming.shape != current.shape or spec.view_of:  # never through a view
                    self._buffers[spec.name] = current.new_empty(incoming.shape)
        if prefix + "shifted_sum_sq" in state_dict:
            self._square_factors = None  # the square comes from the checkpoint
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)  # fmt: skip
        for spec in _STATE:  # checkpoints written before these buffers existed
            if spec.optional and prefix + spec.name in missing_keys:
                missing_keys.remove(prefix + spec.name)
        self._sync_flags()

    # ------------------------------------------------------------- properties
    @property
    def mode(self) -> str:
        """``"auto"`` (seed behaviour), ``"collect"`` or ``"project"``."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = check_choice(value, "mode", MODES)

    @property
    def threshold(self) -> float:
        """Fraction of variance the projection keeps; setting it recomputes the projection."""
        return self._threshold_host

    @threshold.setter
    def threshold(self, value: float) -> None:
        value = check_threshold(value)
        current = self._has_spectrum and not self._stale and not bool(self.random_directions)
        self._put("_threshold", value)
        self._threshold_host = value
        if current and _s.intrinsic_dimensionality(self.eigenvalues, value) == self._rank_host:
            return  # the same k: the projection stands
        self._refresh()

    @property
    def centering(self) -> bool:
        """Decompose the covariance around the mean (True) or the uncentred second moment."""
        return self._centering_host

    @centering.setter
    def centering(self, value: bool) -> None:
        check_bool(value, "centering")
        if value == self.centering:
            return
        if self._has_spectrum and self._empty:
            raise NotCalibratedError(
                f"{self.name}: changing centering needs the statistics, which were reset"
            )
        self._put("_centering", value)
        self._centering_host = value
        if self._has_spectrum:
            self.compute_eigenspace()

    @property
    def keepdim(self) -> bool:
        """Whether the output keeps the layer's width (fixed when the layer is built)."""
        return self._keepdim_host

    @property
    def is_calibrated(self) -> bool:
        """Whether the layer has an eigenspace (or statistics to compute one from)."""
        return self._has_spectrum or not self._empty

    def _convert_delve_state(self, state_dict: dict, prefix: str) -> None:
        """Rewrite a delve 0.1.50 PCA layer's state (in ``state_dict``) into this layer's buffers.

        delve keeps unshifted float64 sums (``sum_squares``, ``running_sum``,
        ``seen_samples``), which are our moments around a zero shift; its
        eigenvectors and threshold load as they are; its ``mean`` buffer (which
        delve never computes: zeros) is the centre its projection uses, so the
        loaded projection is delve's, except that ``k`` follows this library's
        rule (delve adds a direction when the kept variance falls more than 2 %
        short of the threshold). delve's 1x1 convolutions are derived state and
        are dropped.
        """

        def take(name: str) -> Tensor:
            return state_dict.pop(prefix + name).detach().to(torch.float64)

        total_sq, total = take("sum_squares"), take("running_sum")
        n = int(round(float(take("seen_samples").reshape(-1)[0])))
        threshold = float(take("_threshold").reshape(-1)[0])
        mean = take("mean")
        for key in [k for k in state_dict if k.startswith(prefix)]:
            if key[len(prefix) :].split(".")[0] in ("convolution", "mean_subtracting_convolution"):
                del state_dict[key]
        values = state_dict[prefix + "eigenvalues"].to(torch.float64)
        vectors = state_dict[prefix + "eigenvectors"].to(torch.float64)
        computed = bool(vectors.abs().sum() > 0)
        k = _s.intrinsic_dimensionality(values, threshold) if computed else 0
        center = mean if self.centering else torch.zeros_like(mean)
        weight, bias = _s.projection_affine(vectors[:, :k], center, self.keepdim)
        if not computed and not self.keepdim:
            weight, bias = weight[:0], bias[:0]
        dtype = self.projection_weight.dtype
        converted = {
            "sample_count": torch.tensor(n),
            "shift": torch.zeros_like(total),
            "shifted_sum": total,
            "shifted_sum_sq": total_sq,
            "example_count": torch.tensor(n if self.channel_dim == -1 else 0),
            "sample_positions": torch.tensor(1),
            "statistics_shared": torch.tensor(False),
            "computed_count": torch.tensor(-1 if computed else 0),
            "_threshold": torch.tensor(threshold, dtype=torch.float64),
            "_centering": torch.tensor(self.centering),
            "_keepdim": torch.tensor(self.keepdim),
            "mean": mean,
            "rank": torch.tensor(k),
            "random_directions": torch.tensor(False),
            "projection_weight": weight.to(dtype),
            "projection_bias": bias.to(dtype),
            "basis": vectors[:, :k].contiguous(),
        }
        state_dict.update({prefix + name: value for name, value in converted.items()})
        log.info("%s: loaded a delve PCA layer (k = %d of %d at threshold %g)",
                 prefix or self.name, k, self.width, threshold)  # fmt: skip

    def is_floating_point(self) -> bool:
        """False, as in the seed library: the layer is a module, not a floating-point tensor."""
        return False

    @property
    def pca_computed(self) -> bool:
        """Whether the eigenspace is up to date with the statistics.

        Set it to False to have the next eval call recompute the eigenspace from
        the statistics (as the seed library allows); set it to True to keep the
        current projection for the statistics collected since.
        """
        return self._has_spectrum and not self._stale

    @pca_computed.setter
    def pca_computed(self, value: bool) -> None:
        check_bool(value, "pca_computed")
        if value and self._has_spectrum and self._stale:
            self._put("computed_count", self.sample_count)
        elif not value and self._has_spectrum and not self._empty:
            self._put("computed_count", -1)
        self._sync_flags()

    @property
    def in_dim(self) -> int:
        """``k``: the number of kept eigendirections."""
        self._ensure_current()
        return self._rank_host

    @property
    def fs_dim(self) -> int:
        """The layer's width (feature-space dimensionality)."""
        return self.width

    @property
    def saturation(self) -> float:
        """``k / width``, a fraction."""
        return _s.saturation(self.in_dim, self.width)

    @property
    def sat(self) -> float:
        """Saturation in percent, rounded to 4 decimals as in the seed library."""
        return round(100.0 * self.saturation, 4)

    @property
    def explained(self) -> float:
        """Fraction of the variance the kept directions carry."""
        self._ensure_current()
        return _s.explained_fraction(self.eigenvalues, self._rank_host)

    @property
    def positions(self) -> int:
        """Samples per input example seen last (``h*w`` for convs, tokens for Linear)."""
        return int(self.sample_positions)

    @property
    def samples(self) -> int:
        """Input examples (batch rows) seen since the statistics were last reset."""
        return int(self.example_count)

    @property
    def transformation_matrix(self) -> Tensor:
        """The ``(width, width)`` projector ``V_k V_k^T`` (random if directions were injected)."""
        self._ensure_current()
        if self.keepdim and not self._factored:
            return self.projection_weight.detach().clone()
        return self.projection_weight.T @ self.projection_weight

    @property
    def reduced_transformation_matrix(self) -> Tensor:
        """The ``(width, k)`` basis ``V_k`` the projection keeps (random after injection), a copy."""
        self._ensure_current()
        return self.basis.to(self.projection_weight.dtype, copy=True)

    # ------------------------------------------------------------ computation
    def _ensure_current(self) -> None:
        if self._stale:
            self.compute_eigenspace()
        if not self._has_spectrum:
            raise NotCalibratedError(
                f"PCA layer {self.name!r} has no statistics yet: run calibration "
                "(pcasurgery.calibrate) or forward data in training mode first"
            )

    def _refresh(self) -> None:
        """Bring the projection in line with threshold/centering, using stored statistics."""
        if self._stale:
            self.compute_eigenspace()
        elif self._has_spectrum:
            self._update_projection()

    @torch.no_grad()
    def compute_eigenspace(self) -> None:
        """Eigendecompose the statistics and rebuild the projection.

        Raises:
            NotCalibratedError: the layer has seen no data.
            NonFiniteError: the statistics contain NaN or infinite values (a ``ValueError``).
        """
        matrix = self._matrix_to_decompose()
        self._install_spectrum(*_s.eigh_descending(matrix))

    def _check_statistics(self) -> None:
        """Check the statistics: there are some, and they are finite (a square held as
        its factors is checked through them, unformed)."""
        if self._empty:
            raise NotCalibratedError(
                f"PCA layer {self.name!r} has no statistics yet: run calibration "
                "(pcasurgery.calibrate) or forward data in training mode first"
            )
        state = self._held_moments()
        squares = self._square_factors or (self.statistics().total_sq,)
        if not _s.all_finite(state.total, *squares):
            raise NonFiniteError(
                f"PCA layer {self.name!r} received NaN or infinite activations; "
                "its statistics cannot be decomposed"
            )

    def _matrix_to_decompose(self, checked: bool = False) -> Tensor:
        """The covariance (or second moment) to decompose, checked unless ``checked`` already."""
        with torch.inference_mode(False):
            if not checked:
                self._check_statistics()
            state = self.statistics()
            return _m.covariance(state) if self.centering else _m.second_moment(state)

    @torch.no_grad()
    def _install_spectrum(self, values: Tensor, vectors: Tensor) -> None:
        self._spans = None
        with torch.inference_mode(False):
            self._put("eigenvalues", values)
            self._put("eigenvectors", vectors)
            self._put("mean", _m.mean(self._held_moments()))
            self._put("computed_count", self.sample_count)
            self._computed = self._n
            self._update_projection()
        if self.verbose:
            log.info(
                "%s: k=%d of %d (saturation %.4f%%)",
                self.name,
                self._rank_host,
                self.width,
                self.sat,
            )

    def _center(self) -> Tensor:
        return self.mean if self.centering else torch.zeros_like(self.mean)

    @torch.no_grad()
    def _update_projection(self) -> None:
        with torch.inference_mode(False):
            k = _s.intrinsic_dimensionality(self.eigenvalues, self.threshold)
            self._put("rank", k)
            self._rank_host = k
            basis = self._leading_vectors(k)
            vectors = self.eigenvectors
            rest = vectors[:, k:] if vectors.shape[1] == self.width else None
            self._set_projection(basis, rest)
            self._put("random_directions", False)

    def _leading_vectors(self, k: int) -> Tensor:
        """The top ``k`` eigenvectors, completing the computed ones where ``k`` asks for more.

        Directions beyond those computed carry no variance (eigenvalue 0), so any
        orthonormal completion is an eigenbasis; only ``threshold=1`` reaches them.
        """
        vectors = self.eigenvectors
        if k > vectors.shape[1]:
            q, _ = torch.linalg.qr(vectors, mode="complete")
            vectors = torch.cat([vectors, q[:, vectors.shape[1] :]], 1)
            self._put("eigenvectors", vectors)
            self._spans = None  # every eigenvector is there now
        return vectors[:, :k]

    def center(self) -> Tensor:
        """The point the projection is taken around: the mean, or zero when not centring."""
        return self._center()

    def _discarded(self, module: nn.Module | None = None) -> Tensor | None:
        """The computed eigenvectors the projection drops, where with the kept ones they
        make an orthonormal basis of the whole space, or of the range of ``module``'s map.

        ``(width, m - k)`` for ``m`` computed eigenvectors of which ``k`` are kept:
        then ``V V^T = I - R R^T`` on the whole space (every eigenvector computed),
        and ``V V^T W = W - R R^T W`` for the weights ``W`` of the module this layer
        follows where the ``m`` span their range (a widening layer decomposed
        through its input, ``layers.through``, whose weights have not changed
        since). None where neither holds, or the projection is onto random directions.
        """
        vectors, k = self.eigenvectors, self.basis.shape[1]
        if vectors.shape[1] < k or bool(self.random_directions):
            return None
        if vectors.shape[1] == self.width:
            return vectors[:, k:]
        if module is None or self._spans is None:
            return None
        tensors = (vectors, getattr(module, "weight", None), getattr(module, "bias", None))
        held, tokens = self._spans
        same = all(a is b for a, b in zip(held, tensors, strict=True))
        return vectors[:, k:] if same and tokens == _tokens(tensors) else None

    def _set_projection(self, basis: Tensor, rest: Tensor | None = None) -> None:
        dtype = self.projection_weight.dtype
        fused = self.keepdim and 2 * basis.shape[1] >= self.width
        weight, bias = _s.projection_affine(basis, self._center(), fused, dtype, rest)
        for name, value in (
            ("projection_weight", weight),
            ("projection_bias", bias),
            ("basis", basis),
        ):
            self._put(name, value)

    @torch.no_grad()
    def inject_random_directions(
        self, random_state: int | np.random.Generator | None = None
    ) -> None:
        """Replace the projection by one onto a random ``k``-dimensional subspace (same ``k``).

        A control experiment: does the network need *these* directions, or any ``k``?
        Changing ``threshold`` or ``centering`` afterwards restores the PCA projection.
        """
        self._ensure_current()
        k = self._rank_host
        q = torch.from_numpy(_s.random_orthogonal(self.width, random_state)[:, :k])
        with torch.inference_mode(False):
            self._set_projection(q.to(self.mean.device))
            self._put("random_directions", True)

    # ---------------------------------------------------------------- forward
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

    def project(self, x: Tensor) -> Tensor:
        """Apply the projection (computing the eigenspace first if the statistics changed)."""
        self._ensure_current()
        return self._affine(x)

    @property
    def _factored(self) -> bool:
        """Whether the projection is held as ``V^T`` (``(k, width)``) rather than ``V V^T``.

        With ``keepdim=True`` and ``2k < width`` the layer stores ``V^T`` and
        ``-V^T mu`` and applies ``x -> ((x - mu) V) V^T + mu`` as two maps: fewer
        operations and ``2 k width`` numbers instead of ``width^2``.
        """
        return self._keepdim_host and self.projection_weight.shape[0] < self.width

    def _affine(self, x: Tensor) -> Tensor:
        w, b = self.projection_weight, self.projection_bias
        if w.dtype != x.dtype:
            w, b = w.to(x.dtype), b.to(x.dtype)
        if self._factored:
            return self._map(self._map(x, w, b), w.T, self._center().to(x.dtype))
        return self._map(x, w, b)

    def _map(self, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        """The affine map ``(w, b)`` on the feature dimension."""
        return F.linear(x, w, b)

    def forward(self, x: Tensor) -> Tensor:
        if self._collecting():
            self.collect(x)
            return x
        self._check_input(x)
        if self._stale:
            # The seed's behaviour: the first eval call after new statistics
            # computes the eigenspace; the next training batch starts afresh.
            self.compute_eigenspace()
            self.epoch += 1
        if not self._has_spectrum:
            if self._mode == "project":
                self._ensure_current()
            return x
        return self._affine(x)

    def extra_repr(self) -> str:
        k = self._rank_host if self._has_spectrum else None
        return (
            f"{self.width}, threshold={self.threshold:g}, centering={self.centering}, "
            f"keepdim={self.keepdim}, k={k}"
        )


class LinearPCALayer(PCALayer):
    """PCA layer for ``(..., in_features)`` activations (Linear outputs, tokens).

    Args:
        in_features: width of the activations.
        threshold: fraction of variance to keep, in (0, 1].
        keepdim: ``True``: ``y = (x - mu) V_k V_k^T + mu`` (same width);
            ``False``: ``y = (x - mu) V_k`` (``k`` features).
        verbose: log the saturation whenever the eigenspace is computed.
        gradient_epoch_start: kept from the seed library's signature (unused there too).
        centering: decompose the covariance (True) or the uncentred second moment.

    Example:
        >>> layer = LinearPCALayer(3, threshold=0.9)
        >>> _ = layer(torch.randn(100, 3) * torch.tensor([10.0, 1.0, 0.01]))  # training: collects
        >>> _ = layer.eval()(torch.zeros(1, 3))  # eval: projects
        >>> layer.in_dim, layer.fs_dim
        (1, 3)
    """

    def __init__(
        self,
        in_features: int,
        threshold: float = 0.99,
        keepdim: bool = True,
        verbose: bool = False,
        gradient_epoch_start: int = 20,
        centering: bool = True,
    ):
        super().__init__(in_features, threshold, keepdim, verbose, gradient_epoch_start, centering)

    def _samples_of(self, x: Tensor) -> Tensor:
        """The rows that are samples: every position, or only real tokens under a token mask."""
        mask = _TOKEN_MASK.get()
        if mask is None or x.dim() < 3:
            return x
        if tuple(x.shape[:2]) == tuple(mask.shape):
            return x[mask]
        if tuple(x.shape[:2]) == tuple(mask.shape[::-1]):  # (tokens, batch, ...) layouts
            return x.transpose(0, 1)[mask]
        return x


class _ChannelPCALayer(PCALayer):
    """PCA layer for ``(batch, channels, *spatial)`` maps, channelwise: every position is a
    sample of a ``channels``-wide feature, and the projection is one 1x1 convolution."""

    channel_dim = 1

    def _check_input(self, x: Tensor) -> None:
        if isinstance(x, Tensor) and x.dim() != 2 + self.spatial_dims:
            spatial = {1: "length", 2: "h, w", 3: "depth, h, w"}[self.spatial_dims]
            raise ValueError(
                f"PCA layer {self.name!r} expects (batch, {self.width}, {spatial}) inputs, "
                f"got shape {tuple(x.shape)}"
            )
        super()._check_input(x)

    def _map(self, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        if _exporting() or not x.is_contiguous():
            # one 1x1 convolution: what exporters and channels-last tensors want
            conv = (F.conv1d, F.conv2d, F.conv3d)[self.spatial_dims - 1]
            return conv(x, w.reshape(*w.shape, *(1,) * self.spatial_dims), b)
        # The same map as a batched (out x C) @ (C x positions) product with the bias fused
        # in; on contiguous NCHW maps it runs 2-5x faster than a 1x1 conv on CPU.
        n, c, *spatial = x.shape
        positions = math.prod(spatial)
        out = torch.baddbmm(
            b[None, :, None].expand(n, -1, positions), w.expand(n, -1, -1), x.view(n, c, positions)
        )
        return out.view(n, -1, *spatial)


class Conv1DPCALayer(_ChannelPCALayer):
    """PCA layer for ``(batch, channels, length)`` maps (``nn.Conv1d`` outputs), channelwise.

    Args:
        in_filters: number of channels.
        threshold: fraction of variance to keep, in (0, 1].
        verbose: log the saturation whenever the eigenspace is computed.
        centering: decompose the covariance (True) or the second moment.
        keepdim: ``False`` outputs the ``k`` principal channels instead.
    """

    spatial_dims = 1
    kind = "conv1d"

    def __init__(
        self,
        in_filters: int,
        threshold: float = 0.99,
        verbose: bool = False,
        centering: bool = True,
        *,
        keepdim: bool = True,
    ):
        super().__init__(
            in_filters, threshold, keepdim, verbose, centering=centering, width_name="in_filters"
        )


class Conv3DPCALayer(Conv1DPCALayer):
    """PCA layer for ``(batch, channels, depth, h, w)`` maps (``nn.Conv3d`` outputs), channelwise."""

    spatial_dims = 3
    kind = "conv3d"


class Conv2DPCALayer(_ChannelPCALayer):
    """PCA layer for ``(batch, channels, h, w)`` activations, channelwise.

    Every spatial position of every image is one sample of a ``channels``-wide
    feature; the projection is a single 1x1 convolution.

    Args:
        in_filters: number of channels.
        threshold: fraction of variance to keep, in (0, 1].
        verbose: log the saturation whenever the eigenspace is computed.
        gradient_epoch_start: kept from the seed library's signature.
        centering: decompose the covariance (True) or the second moment. The seed
            library's default, False, is kept for its users; ``pca_wrap`` passes True.
        downsampling: collect statistics on feature maps resized (nearest) to
            ``downsampling x downsampling`` when they are larger; the projection
            always applies at full resolution.
        keepdim: ``False`` outputs the ``k`` principal channels instead.
    """

    spatial_dims = 2
    kind = "conv2d"

    def __init__(
        self,
        in_filters: int,
        threshold: float = 0.99,
        verbose: bool = True,
        gradient_epoch_start: int = 20,
        centering: bool = False,
        downsampling: int | None = None,
        *,
        keepdim: bool = True,
    ):
        super().__init__(
            in_filters,
            threshold,
            keepdim,
            verbose,
            gradient_epoch_start,
            centering,
            width_name="in_filters",
        )
        self.downsampling = check_positive_int(downsampling, "downsampling", allow_none=True)
        if verbose:
            log.info("added Conv2D PCA layer %s (%d channels)", self.name, in_filters)

    def _samples_of(self, x: Tensor) -> Tensor:
        size = self.downsampling
        if size is not None and (x.shape[-2] > size or x.shape[-1] > size):
            x = F.interpolate(
                x, size=(min(size, x.shape[-2]), min(size, x.shape[-1])), mode="nearest"
            )
        return x


def pca_layer_for(spatial_dims: int, width: int, threshold: float, centering: bool,
                  keepdim: bool) -> PCALayer:  # fmt: skip
    """A PCA layer for outputs with ``spatial_dims`` positions per channel (0: features last)."""
    if spatial_dims == 0:
        return LinearPCALayer(width, threshold, keepdim=keepdim, centering=centering)
    if spatial_dims == 2:
        return Conv2DPCALayer(width, threshold, verbose=False, centering=centering, keepdim=keepdim)
    cls = {1: Conv1DPCALayer, 3: Conv3DPCALayer}[spatial_dims]
    return cls(width, threshold, centering=centering, keepdim=keepdim)


def compute_eigenspaces(
    layers: Iterable[PCALayer],
    through: Mapping[PCALayer, Any] | None = None,
    progress: bool | None = False,
) -> None:
    """``compute_eigenspace`` for each layer, the CPU layers side by side.

    Each CPU layer's whole computation (its matrix, the float64 decomposition
    with one LAPACK thread, its projection) runs in a pool of as many workers
    as ``torch.get_num_threads()``, largest first. On a shared machine a
    multi-threaded ``eigh`` stalls whenever one of its threads is descheduled;
    independent one-thread decompositions do not, and on an idle one they keep
    every core busy too. Layers on a GPU run where their statistics live, one
    after another.

    Args:
        layers: the layers.
        through: for layers whose statistics are exactly a module's input
            moments mapped through its weights, that module's
            ``layers.through.InputStatistics``: their spectra come from the
            narrower input (``eigenspace``) instead of the layer's width.
        progress: a bar over the layers (``pcasurgery._progress``), advancing by
            each decomposition's cost (the cube of the width it decomposes).
    """
    through = through or {}
    jobs = [(layer, through.get(layer)) for layer in layers]
    for layer, _ in jobs:  # fail before any layer changes
        with torch.inference_mode(False):
            layer._check_statistics()

    def width(job: tuple[PCALayer, Any]) -> int:
        return job[0].width if job[1] is None else job[1].width

    on_cpu = sorted(
        (job for job in jobs if job[0].shift.device.type == "cpu"), key=lambda j: -width(j)
    )
    done = {id(layer) for layer, _ in on_cpu}
    elsewhere = [job for job in jobs if id(job[0]) not in done]
    costs = [float(width(job)) ** 3 for job in on_cpu + elsewhere]
    with progress_bar(progress, desc="decompositions", unit="layer", total=sum(costs),
                      steps=len(costs)) as bar:  # fmt: skip
        side_by_side([partial(_install, layer, source) for layer, source in on_cpu],
                     on_done=lambda i: step(bar, costs[i]))  # fmt: skip
        for i, (layer, source) in enumerate(elsewhere, start=len(on_cpu)):
            _install(layer, source)
            step(bar, costs[i])


def side_by_side(
    jobs: Sequence[Callable[[], Any]], on_done: Callable[[int], Any] | None = None
) -> None:
    """Run CPU ``jobs`` in a pool of ``torch.get_num_threads()`` workers of one thread each.

    Jobs start in the order given (largest first keeps the workers even). With
    one thread, or one job, they run here, one after another. ``on_done(i)`` is
    called here (not in a worker) as job ``i`` ends well. The first error is
    raised once every job has ended.
    """
    workers = min(torch.get_num_threads(), len(jobs))
    if workers <= 1:
        for i, job in enumerate(jobs):
            job()
            if on_done is not None:
                on_done(i)
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="pcasurgery") as pool:
            futures = {pool.submit(_one_thread, job): i for i, job in enumerate(jobs)}
            for future in as_completed(futures):
                if on_done is not None and future.exception() is None:
                    on_done(futures[future])
            for future in futures:
                future.result()
    finally:
        torch.set_num_threads(threads)


def _install(layer: PCALayer, source: Any) -> None:
    """Decompose the layer's checked statistics (through ``source`` where given), install the result."""
    if source is None:
        layer._install_spectrum(*_s.eigh_descending(layer._matrix_to_decompose(checked=True)))
    else:
        layer._install_spectrum(*source.eigenspace(layer.centering))
        tensors = (layer.eigenvectors, source.module.weight, source.module.bias)
        layer._spans = (tensors, _tokens(tensors))


def _leading_columns(view: Tensor | None, base: Tensor | None) -> int | None:
    """``k`` where ``view`` is ``base[:, :k]`` (the same storage, offset and strides), else None."""
    if view is None or base is None or view.dim() != 2 or base.dim() != 2 or not view.numel():
        return None
    same = (
        view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
        and view.storage_offset() == base.storage_offset()
        and view.stride() == base.stride()
        and view.shape[0] == base.shape[0]
        and view.shape[1] <= base.shape[1]
    )
    return view.shape[1] if same else None


def _tokens(tensors: Iterable[Tensor | None]) -> tuple:
    """What changes when a tensor is modified in place, moved or given new data."""
    return tuple(
        None if t is None else (t._version, t.data_ptr(), t.dtype, t.device) for t in tensors
    )


def _one_thread(job: Callable[[], Any]) -> None:
    torch.set_num_threads(1)  # the worker's own OpenMP/MKL setting
    job()
