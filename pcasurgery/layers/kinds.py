"""Which modules a PCA layer can follow and fold into: Linear-like and Conv2d.

``nn.Linear`` and ``nn.Conv2d`` (with subclasses), and transformers'
``Conv1D`` (GPT-2's projections: a Linear whose weight is stored transposed,
``(in, out)``), recognised by its shape so that transformers is never imported.
Wherever ``nn.Linear`` is a target, a ``Conv1D`` is one too.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["is_conv1d", "linear_like", "output_width"]


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
