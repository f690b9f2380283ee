"""Which modules a PCA layer can follow and fold into: Linear-like and Conv2d.

``nn.Linear`` and ``nn.Conv2d`` (with subclasses), and transformers'
``Conv1D`` (GPT-2's projections: a Linear whose weight is stored transposed,
``(in, out)``), recognised by its shape so that transformers is never imported.
Wherever ``nn.Linear`` is a target, a ``Conv1D`` is one too.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["affine_kind", "is_conv1d", "linear_like", "output_width", "weight_matrix"]


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


def linear_like(module: object) -> bool:
    """``nn.Linear`` (or a subclass) or a ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def output_width(module: nn.Module) -> int:
    """Features of the module's output: ``out_features``, ``out_channels`` or ``nf``."""
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    if is_conv1d(module):
        return int(module.nf)  # type: ignore[arg-type]
    raise TypeError(f"{type(module).__name__} is not a Linear, Conv1D or Conv2d")


def weight_matrix(module: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(W, b)`` of a Linear, Conv1D or Conv2d in ``dtype``, detached.

    ``W`` is (outputs, inputs): a Conv1D's weight transposed, a convolution's
    kernel flattened; ``b`` is zeros when the module has no bias.
    """
    weight, bias = module.weight, module.bias
    if not isinstance(weight, Tensor) or not (bias is None or isinstance(bias, Tensor)):
        raise TypeError(f"{type(module).__name__} has no weight/bias tensors to fold")
    weight = weight.detach().to(dtype)
    if is_conv1d(module):
        weight = weight.T
    w = weight.reshape(weight.shape[0], -1)
    b = torch.zeros_like(w[:, 0]) if bias is None else bias.detach().to(dtype)
    return w, b


def affine_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv2d"`` or ``"conv1d"`` when the module computes its own affine map.

    That is an ``nn.Linear``, an ``nn.Conv2d`` with ``groups=1`` or a ``Conv1D``
    whose class (or the class ``pca_wrap`` swapped in for it) runs the stock
    forward; None for anything else (a subclass with its own forward, say).
    """
    base = getattr(type(module), "_pcasurgery_base", type(module))
    if isinstance(module, nn.Linear) and base.forward is nn.Linear.forward:
        return "linear"
    if isinstance(module, nn.Conv2d) and base.forward is nn.Conv2d.forward and module.groups == 1:
        return "conv2d"
    if is_conv1d(module) and base.__name__ == "Conv1D":
        return "conv1d"
    return None
