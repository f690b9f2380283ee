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

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._errors import NotCalibratedError
from .._validation import check_bool, check_choice, check_positive_int, check_threshold
from ..core import moments as _m
from ..core import spectrum as _s
from . import statistics as _statistics
from .state import version_tokens
from .statistics import TOKEN_MASK, LayerStatistics

__all__ = [
    "Conv1DPCALayer",
    "Conv2DPCALayer",
    "Conv3DPCALayer",
    "LinearPCALayer",
    "PCALayer",
    "exporting",
    "pca_layer_for",
]

log = logging.getLogger("pcasurgery")

MODES = ("auto", "collect", "project")


def exporting() -> bool:
    """Whether the forward is being traced or exported rather than run."""
    compiler = getattr(torch, "compiler", None)
    is_exporting = getattr(compiler, "is_exporting", None)
    is_compiling = getattr(compiler, "is_compiling", None)
    return bool(
        torch.jit.is_tracing()
        or (is_exporting is not None and is_exporting())
        or (is_compiling is not None and is_compiling())
    )


class PCALayer(LayerStatistics):
    """Common machinery of the PCA layers; use :class:`LinearPCALayer` or :class:`Conv2DPCALayer`.

    The feature dimension is ``channel_dim``; every other position of the input
    is one sample of the statistics. A layer is built in three rooms: its
    declared state and persistence (``layers.state``), the statistics protocol
    calibration drives (``layers.statistics``), and here the spectrum, the
    projection and the forward.
    """

    spatial_dims: int = 0  # positions of a (batch, channels, *spatial) map; 0: features last
    kind: str = "linear"
    num = 0  # the seed's counter, used for default layer names

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
        super().__init__(width, threshold, keepdim, centering, width_name)
        self.verbose = bool(verbose)
        self.gradient_epoch = gradient_epoch_start
        self.name = f"pca{PCALayer.num}"
        PCALayer.num += 1

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
        """Fraction of variance the projection keeps.

        Setting it rebuilds the projection from the current spectrum (no
        eigendecomposition); on a layer whose statistics are newer than its
        eigenspace it is only stored, for the decomposition to come.
        """
        return self._threshold_host

    @threshold.setter
    def threshold(self, value: float) -> None:
        value = check_threshold(value)
        current = self._has_spectrum and not self._stale and not bool(self.random_directions)
        self._put("_threshold", value)
        self._threshold_host = value
        if self._stale:
            return  # the next decomposition (compute_eigenspace, an eval call) uses it
        if current and _s.intrinsic_dimensionality(self.eigenvalues, value) == self._rank_host:
            return  # the same k: the projection stands
        if self._pending:  # the projection is built with the eigenvectors, at their first use
            self._put_rank(_s.intrinsic_dimensionality(self.eigenvalues, value))
        elif self._has_spectrum:
            self._update_projection()

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
    def is_calibrated(self) -> bool:
        """Whether the layer has an eigenspace (or statistics to compute one from)."""
        return self._has_spectrum or not self._empty

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
        """``k``: the number of kept eigendirections.

        Reading it never decomposes: on a layer whose statistics are newer than
        its eigenspace (training-mode batches since) it raises
        ``NotCalibratedError``; call :meth:`compute_eigenspace` or run the layer
        in eval mode first. So do ``explained`` and the transformation matrices.
        """
        self._require_current()
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
        self._require_current()
        return _s.explained_fraction(self.eigenvalues, self._rank_host)

    @property
    def transformation_matrix(self) -> Tensor:
        """The ``(width, width)`` projector ``V_k V_k^T`` (random if directions were injected)."""
        self._require_current()
        self.compute_eigenvectors()
        if self.keepdim and not self._factored:
            return self.projection_weight.detach().clone()
        return self.projection_weight.T @ self.projection_weight

    @property
    def reduced_transformation_matrix(self) -> Tensor:
        """The ``(width, k)`` basis ``V_k`` the projection keeps (random after injection), a copy."""
        self._require_current()
        self.compute_eigenvectors()
        return self.basis.to(self.projection_weight.dtype, copy=True)

    # ------------------------------------------------------------ computation
    def ensure_eigenspace(self) -> None:
        """Compute the eigenspace if the statistics changed since it was computed.

        Raises:
            NotCalibratedError: the layer has no statistics and no eigenspace.
        """
        if self._stale:
            self.compute_eigenspace()
        if not self._has_spectrum:
            raise NotCalibratedError(
                f"PCA layer {self.name!r} has no statistics yet: run calibration "
                "(pcasurgery.calibrate) or forward data in training mode first"
            )
        self.compute_eigenvectors()

    @property
    def eigenvectors_pending(self) -> bool:
        """Whether the spectrum's eigenvalues are known but its eigenvectors (and so the
        projection) are not computed yet: after a calibration, until their first use."""
        return self._pending

    @torch.no_grad()
    def compute_eigenvectors(self) -> None:
        """Compute the eigenvectors of a spectrum installed as eigenvalues only (and the
        projection): what a projection, a fold, ``compress`` or a plan weighed by a loss
        does at their first use. Nothing to do where they are computed."""
        if self._pending:  # the eigenvalues installed stay (and the ranks read off them)
            _, vectors = self._decomposition(vectors=True)
            assert vectors is not None
            self._install_spectrum(self.eigenvalues, vectors)

    @torch.no_grad()
    def _install_eigenvalues(self, values: Tensor) -> None:
        """The spectrum as its eigenvalues only; the eigenvectors and the projection wait for
        their first use (:meth:`compute_eigenvectors`)."""
        self._spans = None
        with torch.inference_mode(False):
            self._put("eigenvalues", values)
            self._put("eigenvectors", values.new_zeros(self.width, 0))
            self._put("mean", _m.mean(self._held_moments()))
            self._put("computed_count", self.sample_count)
            self._computed = self._n
            self._put_rank(_s.intrinsic_dimensionality(values, self.threshold))
            self._put("random_directions", False)
            self._put("vectors_pending", True)
            self._pending = True

    def _vectors_wanted(self) -> None:
        self.compute_eigenvectors()

    @torch.no_grad()
    def release_statistics(self) -> None:
        """Free the statistics once the eigenspace is computed from them, keeping the
        eigenspace, the projection and the positions per example: a layer calibrated for
        the last time (``compress_sequential`` frees them before compressing a block).
        Calibrating again starts from no statistics.

        Raises:
            NotCalibratedError: the layer has no statistics and no eigenspace.
        """
        positions = int(self.sample_positions)
        self.ensure_eigenspace()
        self._fresh_statistics()
        self._put("sample_positions", positions)
        self._statistics_replaced()

    def keep_eigenvalues_only(self) -> None:
        """Free the statistics, the eigenvectors and the projection, keeping the eigenvalues
        and the rank: what a spectral plan reads (``compress_sequential``'s first pass).
        The layer can no longer project, nor compute its eigenvectors, until calibrated again.
        The positions per example stay: the multiply-accumulates a plan counts."""
        positions = int(self.sample_positions)
        self._fresh_statistics()
        self._put("sample_positions", positions)
        self._spans = None
        with torch.inference_mode(False):
            empty = self.eigenvalues.new_zeros(self.width, 0)
            for name in ("eigenvectors", "basis"):
                self._put(name, empty)
            weight = self._buffers["projection_weight"]
            assert weight is not None
            self._put("projection_weight", weight.new_zeros(0, self.width))
            self._put("projection_bias", weight.new_zeros(0))
            self._put("vectors_pending", True)
        self._sync_flags()

    def _before_statistics_change(self) -> None:
        """Eigenvectors still pending are computed from the statistics that are about to go."""
        if self._pending and not self._stale and not self._empty:
            self.compute_eigenvectors()

    def _put_rank(self, k: int) -> None:
        self._put("rank", k)
        self._rank_host = k

    def _require_current(self) -> None:
        """Raise unless the eigenspace matches the statistics (reading never decomposes)."""
        if self._stale:
            raise NotCalibratedError(
                f"PCA layer {self.name!r} has statistics newer than its eigenspace: call "
                "compute_eigenspace() (or run it in eval mode) before reading its spectrum"
            )
        if not self._has_spectrum:
            raise NotCalibratedError(
                f"PCA layer {self.name!r} has no statistics yet: run calibration "
                "(pcasurgery.calibrate) or forward data in training mode first"
            )

    @torch.no_grad()
    def compute_eigenspace(self) -> None:
        """Eigendecompose the statistics and rebuild the projection.

        Raises:
            NotCalibratedError: the layer has seen no data.
            NonFiniteError: the statistics contain NaN or infinite values (a ``ValueError``).
        """
        values, vectors = self._decomposition(vectors=True)
        assert vectors is not None
        self._install_spectrum(values, vectors)

    def _decomposition(self, vectors: bool, checked: bool = False) -> tuple[Tensor, Tensor | None]:
        """The statistics' eigenvalues (descending) and, if ``vectors``, eigenvectors:
        from the samples where the layer holds them as rows, from the input-wide problem
        where it holds its square as factors, else from the covariance (or second
        moment); checked unless ``checked`` already."""
        factors = self._square_factors
        if self._rows is not None or factors is not None:
            if not checked:
                self._check_statistics()
            if factors is not None:
                return _statistics.spectrum_through(factors, self.centering, vectors)
            return _s.pca_of_rows(self._held_rows(), self.centering, vectors)
        matrix = self._matrix_to_decompose(checked)
        if vectors:
            return _s.eigh_descending(matrix)
        return _s.eigvalsh_descending(matrix), None

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
            self._put("vectors_pending", False)
            self._pending = False
            self._update_projection()
            self._note_spans()
        if self.verbose:
            log.info(
                "%s: k=%d of %d (saturation %.4f%%)",
                self.name,
                self._rank_host,
                self.width,
                self.sat,
            )

    def _note_spans(self) -> None:
        """Where the eigenvectors came from square factors (fewer than the width), record
        that they span the range of the followed module's map while its tensors are the
        ones the factors were taken from, unchanged (``discarded_directions``)."""
        factors, vectors = self._square_factors, self.eigenvectors
        if factors is None:
            return
        factors.cache.clear()  # what the eigenvalues left to the eigenvectors is used
        if vectors.shape[1] >= self.width:
            return
        module, tokens = factors.module
        if version_tokens(module) == tokens:
            tensors = (vectors, *module)
            self._spans = (tensors, version_tokens(tensors))

    def _center(self) -> Tensor:
        return self.mean if self.centering else torch.zeros_like(self.mean)

    @torch.no_grad()
    def _update_projection(self) -> None:
        with torch.inference_mode(False):
            k = _s.intrinsic_dimensionality(self.eigenvalues, self.threshold)
            self._put_rank(k)
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

    def discarded_directions(self, module: nn.Module | None = None) -> Tensor | None:
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
        return vectors[:, k:] if same and tokens == version_tokens(tensors) else None

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
        self.ensure_eigenspace()
        k = self._rank_host
        q = torch.from_numpy(_s.random_orthogonal(self.width, random_state)[:, :k])
        with torch.inference_mode(False):
            self._set_projection(q.to(self.mean.device))
            self._put("random_directions", True)

    # ---------------------------------------------------------------- forward

    def project(self, x: Tensor) -> Tensor:
        """Apply the projection (computing the eigenspace first if the statistics changed)."""
        self.ensure_eigenspace()
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
                self.ensure_eigenspace()
            return x
        if self._pending:  # the eigenvectors' first use
            self.compute_eigenvectors()
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
        mask = TOKEN_MASK.get()
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
        if exporting() or not x.is_contiguous():
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


def pca_layer_for(
    spatial_dims: int, width: int, threshold: float, centering: bool, keepdim: bool
) -> PCALayer:
    """A PCA layer for outputs with ``spatial_dims`` positions per channel (0: features last)."""
    if spatial_dims == 0:
        return LinearPCALayer(width, threshold, keepdim=keepdim, centering=centering)
    if spatial_dims == 2:
        return Conv2DPCALayer(width, threshold, verbose=False, centering=centering, keepdim=keepdim)
    cls = {1: Conv1DPCALayer, 3: Conv3DPCALayer}[spatial_dims]
    return cls(width, threshold, centering=centering, keepdim=keepdim)
