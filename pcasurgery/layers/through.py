"""A widening layer's output statistics, collected on its input.

A Linear, ``Conv1D`` or 1x1 ``Conv2d`` with fewer inputs than outputs computes
``y = W x + b``. The moments of ``y`` are those of ``x`` mapped through ``W``
(``core.moments.map_moments``, exact algebra), and the covariance of ``y``,
``W C W^T``, has rank at most ``in``, so its eigenspace comes from an
``in``-wide problem (``core.spectrum.eigh_through``). Calibration therefore
collects the PCA layer after such a module on the module's input: each batch's
product costs ``(in / out)^2`` of the output's and the eigendecomposition about
``(in / out)^3`` (an LLM's MLP up-projection, 576 -> 1536: 7x and 19x fewer
operations; a ConvNeXt block's 768 -> 3072: 16x and 64x).

The statistics the layer ends with are the same as if its outputs had been
collected (to float64 rounding of the exact outputs ``W x + b``; the float32
outputs the model computes differ from those by their own rounding), their
``(out, out)`` square held as its factors until something reads it
(``layers.state.SquareFactors``): the layer's eigenvalues, and its eigenvectors
at their first use, come from the ``in``-wide problem
(``layers.statistics.spectrum_through``). Only
``calibrate`` collects this way, while the weights cannot change; a layer
collecting in training mode (tracking during training) sees its outputs as
always.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import NonFiniteError
from ..core import moments as _m
from . import statistics as _statistics
from .kinds import affine_kind, weight_matrix
from .pca import PCALayer
from .state import SquareFactors, version_tokens
from .statistics import TOKEN_MASK

__all__ = ["InputStatistics", "held_bytes", "input_statistics", "input_width"]


def _widths(module: nn.Module, kind: str) -> tuple[int, int]:
    """``(inputs, outputs)`` of the affine map of ``module``."""
    weight = module.weight
    assert isinstance(weight, Tensor)
    if kind == "transformers_conv1d":
        return weight.shape[0], weight.shape[1]
    return weight[0].numel(), weight.shape[0]


def input_width(module: nn.Module) -> int | None:
    """The input width on which calibration collects the statistics of a PCA layer after
    ``module`` (of its output's kind, as ``pca_wrap`` makes it), or None where the layer
    collects the module's outputs.

    It applies to a module that computes its own affine map (``layers.kinds.affine_kind``)
    with more outputs than inputs plus one (the uncentred second moment of a
    layer with a bias has rank ``in + 1``): a Linear, a ``Conv1D``, or a 1x1
    ``Conv2d`` without padding.
    """
    kind = affine_kind(module)
    if kind not in ("linear", "transformers_conv1d", "conv2d"):  # other convolutions: at outputs
        return None
    inputs, outputs = _widths(module, kind)
    if inputs + 1 >= outputs:
        return None
    if kind == "conv2d":
        assert isinstance(module, nn.Conv2d)
        if module.kernel_size != (1, 1) or module.padding not in ((0, 0), "valid"):
            return None
    return inputs


def held_bytes(module: nn.Module | None, width: int) -> int:
    """``statistics_bytes`` of a PCA layer of ``width`` after ``module``: collected on the
    module's input where :func:`input_width` says so (None: a layer collected on its own)."""
    inputs = None if module is None else input_width(module)
    if module is None or inputs is None:
        return _statistics.statistics_bytes(width)
    weight = module.weight
    assert isinstance(weight, Tensor)
    return _statistics.statistics_bytes(width, inputs, weight.element_size())


def input_statistics(
    module: nn.Module, pca: PCALayer, shared: dict[str, Any] | None = None
) -> InputStatistics | None:
    """An :class:`InputStatistics` for ``pca`` after ``module``, or None where it does not pay.

    It applies where :func:`input_width` does, to a PCA layer of the module's output's
    kind and width (a ``Conv2DPCALayer`` without ``downsampling``). Sources given one
    ``shared`` dict compute the moments of an input they all receive once.
    """
    inputs = input_width(module)
    kind = affine_kind(module)
    if inputs is None or kind is None or pca.width != _widths(module, kind)[1]:
        return None
    if pca.channel_dim != (1 if kind == "conv2d" else -1):
        return None
    if getattr(pca, "downsampling", None) is not None:
        return None
    return InputStatistics(module, pca, kind, inputs, shared)


class InputStatistics:
    """The input moments of a followed module, standing in for its PCA layer's during calibration.

    While ``pca._through`` is this object and the layer collects, the followed
    module hands its inputs here instead of its outputs to the layer
    (``layers.sites``); :meth:`install` then gives the layer the output moments,
    their square as its factors.
    """

    def __init__(
        self,
        module: nn.Module,
        pca: PCALayer,
        kind: str,
        width: int,
        shared: dict[str, Any] | None = None,
    ):
        self.module, self.pca, self.kind, self.width = module, pca, kind, width
        self.state: _m.Moments | None = None  # allocated on the first batch, on its device
        # the inputs themselves (float64 rows) while few (ROWS_FRACTION of the input
        # width): the layer then gets its outputs as rows (PCALayer.load_rows)
        self.rows: tuple[Tensor, ...] | None = None
        self._subtract = False
        self.examples = 0
        self.positions = 1
        # the last input seen by any source of this calibration, and its moments:
        # modules fed the same tensor (a Llama MLP's gate and up projections) share them
        self._shared = {} if shared is None else shared

    def add(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Add the module's input (its one argument) to the moments."""
        x = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(x, Tensor):
            raise TypeError(
                f"{type(self.module).__name__} expects a tensor, got {type(x).__name__}"
            )
        given = x
        if self.kind == "conv2d":
            stride = self.module.stride
            assert isinstance(stride, tuple)
            if x.dim() == 4 and stride != (1, 1):
                x = x[:, :, :: stride[0], :: stride[1]]  # the positions the kernel is applied at
        channel_dim = self.pca.channel_dim
        if x.dim() == 0 or x.shape[channel_dim] != self.width:
            return  # the module's own forward raises on this input
        positions = x[0].numel() // self.width if x.dim() > 1 and len(x) else 1
        examples = x.shape[0] if x.dim() > 1 else 1
        samples = self.pca._samples_of(x.detach())
        # What identifies these samples: the very tensor (held, so that its id is not
        # reused), taken at the same positions, under the same token mask, and
        # unchanged: calibration runs in inference mode, where tensors have no version
        # counter, so a random weighting of the samples (_fingerprint: one read of
        # them, 1/width of the moments' product) must be the same to the bit.
        seen = (
            given,
            self.kind,
            getattr(self.module, "stride", None),
            TOKEN_MASK.get(),
            _fingerprint(samples, channel_dim, self._shared.setdefault("weights", {})),
        )
        last = self._shared.get("seen")
        same = (
            last is not None
            and last[0] is given
            and last[1:3] == seen[1:3]
            and last[3] is seen[3]
            and torch.equal(last[4], seen[4])
        )
        if self._take_rows(samples, channel_dim, same):
            self._shared.update(seen=seen, moments=None)
            self.examples += examples
            self.positions = positions
            return
        self._shared["rows"] = None
        if self.state is None:
            self.state = _m.empty_moments(self.width, device=x.device)
        try:
            added, self._subtract, moments = _m._accumulate_known(
                self.state,
                samples,
                channel_dim,
                self._subtract,
                self._shared["moments"] if same else None,
                empty=self.examples == 0,
            )
        except NonFiniteError as err:
            raise NonFiniteError(
                f"PCA layer {self.pca.name!r} received NaN or infinite activations "
                "(the input of the module it follows)"
            ) from err
        self._shared.update(seen=seen, moments=moments)
        if added:
            self.examples += examples
            self.positions = positions

    def _take_rows(self, samples: Tensor, channel_dim: int, same: bool) -> bool:
        """Keep the samples as rows where they stay few (and no moments are held yet);
        else False, the rows held so far turned into moments to add the batch to."""
        held = 0 if self.rows is None else sum(len(rows) for rows in self.rows)
        added = samples.numel() // self.width
        if (
            channel_dim != -1
            or self.state is not None
            or held + added > self.width * _statistics.ROWS_FRACTION
        ):
            if self.rows is not None:
                self.state = _m.moments_of_rows(torch.cat(self.rows))
                self._subtract, self.rows = True, None
            return False
        rows = self._shared.get("rows") if same else None
        if rows is None:
            rows = samples.reshape(-1, self.width)
            rows = rows.clone() if rows.dtype == torch.float64 else rows.to(torch.float64)
            if not bool(torch.isfinite(rows.sum(0)).all()):
                raise NonFiniteError(
                    f"PCA layer {self.pca.name!r} received NaN or infinite activations "
                    "(the input of the module it follows)"
                )
        self._shared["rows"] = rows  # modules fed the same tensor share them
        self.rows = (*(self.rows or ()), rows)
        return True

    def release_shared(self) -> None:
        """Forget the last input seen (the stream has ended)."""
        self._shared.clear()

    def install(self) -> None:
        """Give the PCA layer the moments of the module's outputs (a layer that saw nothing keeps none).

        The ``(out, out)`` square ``W S W^T`` is left to the layer as its factors,
        ``W`` copied as the module holds it: it is formed only if something reads it
        (the spectrum comes from the factors), which saves its product and
        its memory (``(out / in)^2`` times the input's square).
        """
        if self.rows is not None:
            self.pca.load_rows(self._outputs(), self.examples, positions=self.positions)
            return
        if self.state is None or int(self.state.count) == 0:
            return
        own, own_bias = self.module.weight, self.module.bias
        assert isinstance(own, Tensor)
        held, bias = weight_matrix(self.module, own.dtype)
        held = held.clone() if held.data_ptr() == own.data_ptr() else held  # not a view of it
        module = (own, own_bias if isinstance(own_bias, Tensor) else None)
        factors = SquareFactors(
            held,
            None if module[1] is None else bias,
            self.state,
            (module, version_tokens(module)),
            {},
        )
        self.pca.load_statistics(
            _m.map_moments(self.state, held, bias, square=False),
            self.examples,
            square_factors=factors,
        )
        self.pca._put("sample_positions", self.positions)

    def _outputs(self) -> Tensor:
        """The module's float64 outputs on the inputs held as rows, ``W x + b``: a float64
        copy of a few thousand of the weights' rows at a time, not of the whole matrix."""
        assert self.rows is not None
        own = self.module.weight
        assert isinstance(own, Tensor)
        weight, bias = weight_matrix(self.module, own.dtype)
        inputs = torch.cat(self.rows).to(weight.device)
        outputs = inputs.new_empty(len(inputs), weight.shape[0])
        step = max(1, 2**25 // max(1, weight.shape[1]))  # 256 MiB of float64 weights
        for start in range(0, weight.shape[0], step):
            part = slice(start, start + step)
            outputs[:, part] = torch.addmm(bias[part].to(inputs), inputs, weight[part].to(inputs).T)
        return outputs

    @property
    def count(self) -> int:
        """Samples collected."""
        if self.rows is not None:
            return sum(len(rows) for rows in self.rows)
        return 0 if self.state is None else int(self.state.count)


def _fingerprint(samples: Tensor, channel_dim: int, cache: dict[str, Any]) -> Tensor:
    """Each feature's samples weighted by fixed random weights and summed (per image for NCHW maps).

    Any change to the values changes it with probability one, also one that keeps
    every feature's sum and sum of squares (two samples swapped in one feature:
    the cross-products change). It is one read of the samples, a matrix-vector
    product laid out like the moments' own (rows for ``(..., width)`` and
    channels-last maps, one per image for NCHW), and the same tensor gives the
    same numbers to the bit. The weights are drawn from a fixed seed, never
    from the global generator; ``cache`` keeps the last layout's.
    """
    width = samples.shape[channel_dim]
    cd = channel_dim % samples.dim()
    last = samples.movedim(cd, -1)
    rows = last.is_contiguous()
    view = (
        last.reshape(-1, width)  # (samples, width)
        if rows
        else samples.reshape(math.prod(samples.shape[:cd]), width, -1)  # (images, width, positions)
    )
    shape = (view.shape[0],) if rows else (view.shape[0], view.shape[2], 1)
    key = (shape, view.dtype, view.device)
    if cache.get("key") != key:
        weights = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        cache.update(key=key, weights=weights.to(device=view.device, dtype=view.dtype))
    weights = cache["weights"]
    return weights @ view if rows else torch.bmm(view, weights).reshape(-1)
