"""The kinds of layer a PCA layer can follow, fold into and factorise: one entry per kind.

Each :class:`LayerKind` declares, once, everything the library needs to know
about a layer of that kind: which modules it covers, the width of their output
and where its features lie (how outputs become samples), the ``(outputs,
fan-in)`` matrix view of their weight and its inverse (folding, factorising,
BatchNorm fusion), how to build a fresh layer of the same geometry with fewer
outputs and the pointwise layer that maps ``k`` features back to the width (the
factorised form, which exports to ONNX as the stock layers do), how to run the
map with other weights (the folded eval forward), and the multiply-accumulates
of one output position (plans and ``count_macs``).

The entries, in :data:`KINDS`: ``nn.Linear``; transformers' ``Conv1D``
(GPT-2's projections: a Linear whose weight is stored transposed, ``(in,
out)``, recognised by its shape so that transformers is never imported; where
``nn.Linear`` is a target, a ``Conv1D`` is one too); ``nn.Conv1d``,
``nn.Conv2d``, ``nn.Conv3d``; ``nn.ConvTranspose1d``, ``nn.ConvTranspose2d``,
``nn.ConvTranspose3d``. Adding a kind is adding an entry. A convolution with
``groups > 1`` (a depthwise one) is of its kind, and can be followed, but its
projection cannot be folded into it (:func:`foldable_kind` says None).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, overload

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "KINDS",
    "LayerKind",
    "affine_kind",
    "foldable_kind",
    "is_conv1d",
    "kind_of",
    "output_width",
    "weight_matrix",
]


def is_conv1d(module: object) -> bool:
    """Whether ``module`` is a transformers-style ``Conv1D``: ``y = x @ W + b``, ``W`` (in, out)."""
    weight = getattr(module, "weight", None)
    return (
        isinstance(module, nn.Module)
        and getattr(type(module), "_pcasurgery_base", type(module)).__name__ == "Conv1D"
        and isinstance(getattr(module, "nf", None), int)
        and isinstance(weight, Tensor)
        and weight.dim() == 2
        and weight.shape[1] == module.nf
    )


def _base(module: nn.Module) -> type:
    """The module's own class (the one ``pca_wrap`` swapped a subclass in for)."""
    return getattr(type(module), "_pcasurgery_base", type(module))


def _linear(module: Any, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return F.linear(x, weight, bias)


def _input_major_linear(module: Any, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    flat = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight)  # y = x W + b, W (in, out)
    return flat.reshape(*x.shape[:-1], weight.shape[1])


def _convolution(module: Any, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return module._conv_forward(x, weight, bias)


def _transposed(function: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def run(module: Any, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return function(
            x,
            weight,
            bias,
            module.stride,
            module.padding,
            module.output_padding,
            module.groups,
            module.dilation,
        )

    return run


@dataclass(frozen=True)
class LayerKind:
    """One kind of layer, declared once.

    Attributes:
        name: the kind's name (``"linear"``, ``"conv2d"``, ``"conv_transpose2d"``,
            ``"transformers_conv1d"``, ...).
        classes: the torch classes it covers (subclasses too); the first is what
            :meth:`like` builds; empty for a kind recognised by ``matches``.
        spatial_dims: 0 for layers whose features are the last dimension; ``n``
            for ``(batch, channels, *n spatial)`` maps, channels on dimension 1,
            every position a sample.
        run: ``run(module, x, weight, bias)``, the module's map with other
            weights (in its own layout): the folded eval forward.
        input_major: the weight is ``(in, out, ...)`` (a transposed convolution's
            ``(in, out / groups, *kernel)``, transformers' ``Conv1D``'s ``(in, out)``)
            rather than ``(out, ...)``.
        matches: the test for a kind without classes.
        stock_forward: the forward of the stock class; a module whose class runs
            another computes something else and is never folded.
    """

    name: str
    classes: tuple[type[nn.Module], ...]
    spatial_dims: int
    run: Callable[[Any, Tensor, Tensor, Tensor], Tensor]
    input_major: bool = False
    matches: Callable[[object], bool] | None = None
    stock_forward: Any = None

    def covers(self, module: object) -> bool:
        """Whether ``module`` is of this kind."""
        if self.matches is not None:
            return self.matches(module)
        return isinstance(module, self.classes)

    # ------------------------------------------------------------ shapes
    def output_width(self, module: Any) -> int:
        """Features of the module's output."""
        weight = module.weight
        assert isinstance(weight, Tensor)
        if self.input_major:
            return int(weight.shape[1]) * int(getattr(module, "groups", 1))
        return int(weight.shape[0])

    def matrix(self, weight: Tensor) -> Tensor:
        """The ``(outputs, fan-in)`` view of a weight of this kind (``groups=1``)."""
        if self.input_major:
            return weight.transpose(0, 1).reshape(weight.shape[1], -1)
        return weight.reshape(weight.shape[0], -1)

    def weight_from_matrix(self, matrix: Tensor, like: Tensor) -> Tensor:
        """The weight, in the layout of ``like`` (a weight of this kind), whose matrix is ``matrix``."""
        if self.input_major:
            inner = (like.shape[0], *like.shape[2:])
            return matrix.reshape(matrix.shape[0], *inner).transpose(0, 1).contiguous()
        return matrix.reshape(matrix.shape[0], *like.shape[1:]).contiguous()

    def fan_in(self, module: Any) -> int:
        """Columns of the weight's matrix: the inputs each output is a sum over."""
        weight = module.weight
        assert isinstance(weight, Tensor)
        if self.input_major:
            return int(weight.numel() // weight.shape[1])
        return int(weight[0].numel())

    @overload
    def macs_per_position(self, module: Any, outputs: int | None = None) -> int: ...

    @overload
    def macs_per_position(self, module: Any, outputs: np.ndarray) -> np.ndarray: ...

    def macs_per_position(self, module: Any, outputs: Any = None) -> Any:
        """Multiply-accumulates of one output position (a row, a pixel), of the module or of
        a ``groups=1`` layer of its geometry with ``outputs`` outputs (an int, or an integer
        array of counts: one number each).

        A transposed convolution's ``in x out x kernel`` products per input
        position are spread over ``prod(stride)`` output positions (exact when
        the output is the input times the stride, as in a UNet's up-sampling).
        """
        weight = module.weight
        assert isinstance(weight, Tensor)
        products = int(weight.numel()) if outputs is None else self.fan_in(module) * outputs
        if self.input_major and self.spatial_dims:
            groups = int(module.groups) if outputs is None else 1
            return products * groups // max(1, math.prod(module.stride))
        return products

    # ---------------------------------------------------------- builders
    def like(self, module: Any, outputs: int) -> nn.Module:
        """A fresh ``groups=1`` layer of the module's kind and geometry with ``outputs`` outputs.

        A layer whose features are last (transformers' ``Conv1D`` too) becomes
        the equivalent ``nn.Linear``.
        """
        weight = module.weight
        assert isinstance(weight, Tensor)
        device, dtype = weight.device, weight.dtype
        if self.spatial_dims == 0:
            return nn.Linear(self.fan_in(module), outputs, bias=True, device=device, dtype=dtype)
        inputs = weight.shape[0] if self.input_major else module.in_channels
        names = ("kernel_size", "stride", "padding", "dilation", "padding_mode")
        geometry: dict[str, Any] = {name: getattr(module, name) for name in names}
        if self.input_major:
            geometry["output_padding"] = module.output_padding
        return self.classes[0](
            int(inputs), outputs, **geometry, groups=1, bias=True, device=device, dtype=dtype
        )

    def pointwise(self, inputs: int, outputs: int, like: Tensor) -> nn.Module:
        """A layer mapping ``inputs`` features to ``outputs`` at every position of this kind's
        outputs: a Linear, or a 1x1 convolution, in ``like``'s dtype and device."""
        return pointwise(self.spatial_dims, inputs, outputs, like)


def pointwise(spatial_dims: int, inputs: int, outputs: int, like: Tensor) -> nn.Module:
    """``inputs -> outputs`` at every position: a Linear (``spatial_dims`` 0) or a 1x1 ConvNd."""
    if spatial_dims == 0:
        return nn.Linear(inputs, outputs, device=like.device, dtype=like.dtype)
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial_dims - 1]
    return conv(inputs, outputs, 1, device=like.device, dtype=like.dtype)


def _conv(name: str, cls: type[nn.Module], dims: int) -> LayerKind:
    return LayerKind(name, (cls,), dims, _convolution, stock_forward=cls.forward)


def _conv_transpose(name: str, cls: type[nn.Module], dims: int) -> LayerKind:
    function = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
    return LayerKind(
        name, (cls,), dims, _transposed(function), input_major=True, stock_forward=cls.forward
    )


KINDS: tuple[LayerKind, ...] = (
    LayerKind("linear", (nn.Linear,), 0, _linear, stock_forward=nn.Linear.forward),
    LayerKind(
        "transformers_conv1d", (), 0, _input_major_linear, input_major=True, matches=is_conv1d
    ),
    _conv("conv1d", nn.Conv1d, 1),
    _conv("conv2d", nn.Conv2d, 2),
    _conv("conv3d", nn.Conv3d, 3),
    _conv_transpose("conv_transpose1d", nn.ConvTranspose1d, 1),
    _conv_transpose("conv_transpose2d", nn.ConvTranspose2d, 2),
    _conv_transpose("conv_transpose3d", nn.ConvTranspose3d, 3),
)
KIND = {kind.name: kind for kind in KINDS}


def kind_of(module: object) -> LayerKind | None:
    """The entry of :data:`KINDS` that covers ``module``, or None."""
    for kind in KINDS:
        if kind.covers(module):
            return kind
    return None


def output_width(module: nn.Module) -> int:
    """Features of the module's output: ``out_features``, ``out_channels`` or ``nf``."""
    kind = kind_of(module)
    if kind is None:
        raise TypeError(
            f"{type(module).__name__} is not a Linear, Conv1D, convolution or transposed convolution"
        )
    return kind.output_width(module)


def weight_matrix(module: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(W, b)`` of a layer of a known kind in ``dtype``, detached.

    ``W`` is (outputs, fan-in): a Conv1D's weight transposed, a convolution's
    kernel flattened, a transposed convolution's output channels first; ``b``
    is zeros when the module has no bias.
    """
    weight, bias = module.weight, module.bias
    kind = kind_of(module)
    if (
        kind is None
        or not isinstance(weight, Tensor)
        or not (bias is None or isinstance(bias, Tensor))
    ):
        raise TypeError(f"{type(module).__name__} has no weight/bias tensors to fold")
    w = kind.matrix(weight.detach().to(dtype))
    b = torch.zeros_like(w[:, 0]) if bias is None else bias.detach().to(dtype)
    return w, b


def foldable_kind(module: object) -> LayerKind | None:
    """The module's kind where its output is the affine map of its weights that a projection
    folds into: a stock forward (its class's, or the one ``pca_wrap`` swapped a subclass in
    for) and, for a convolution, ``groups=1``. None for anything else (a depthwise convolution,
    a subclass with its own forward)."""
    kind = kind_of(module)
    if kind is None or not isinstance(module, nn.Module):
        return None
    if kind.stock_forward is not None and _base(module).forward is not kind.stock_forward:  # type: ignore[attr-defined]
        return None
    if getattr(module, "groups", 1) != 1:
        return None
    return kind


def affine_kind(module: nn.Module) -> str | None:
    """The name of the module's kind where a projection folds into it (:func:`foldable_kind`)."""
    kind = foldable_kind(module)
    return None if kind is None else kind.name
