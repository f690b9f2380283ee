"""Parameter and multiply-accumulate counts: one formula, used everywhere.

``count_macs`` runs one forward pass and counts, per input example, the
multiply-accumulates of every ``nn.Linear``, ``nn.Conv2d`` and PCA layer (the
layers whose cost grows with width; elementwise operations, pooling and
BatchNorm are not counted). The same per-position formula,
:func:`macs_per_position`, prices the layers ``compress`` chooses between.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._batches import examples_in, model_inputs
from .._validation import check_module, kept_modes
from ..layers.kinds import is_conv1d
from ..layers.pca import PCALayer

__all__ = ["count_macs", "count_params", "macs_per_position"]


def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model`` (each shared tensor once; buffers excluded)."""
    check_module(model)
    return sum(p.numel() for p in model.parameters())


def macs_per_position(module: nn.Module) -> int:
    """Multiply-accumulates one output position of ``module`` costs.

    A position is one row of a Linear's output, one pixel of a Conv2d's output,
    one sample of a PCA layer's projection.
    """
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    if is_conv1d(module):
        weight = module.weight
        assert isinstance(weight, Tensor)
        return int(weight.numel())
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return (module.in_channels // module.groups) * kh * kw * module.out_channels
    if isinstance(module, PCALayer):  # V^T then V when the projection is held factored
        return module.projection_weight.numel() * (2 if module._factored else 1)
    return 0


def _positions(output: Tensor, channel_dim: int, examples: int) -> int:
    return output.numel() // max(1, output.shape[channel_dim]) // max(1, examples)


@torch.no_grad()
def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates per input example of one forward pass of ``model``.

    Args:
        model: the network (run in eval mode for the count; its flags are restored).
        example_inputs: a tensor, a tuple of positional inputs, or a dict of
            keyword inputs (a tokenizer's output), whose leading dimension is the batch.

    Returns:
        MACs per example of every Linear, Conv2d and PCA layer.
    """
    check_module(model)
    args, kwargs = model_inputs(example_inputs)
    examples = examples_in((*args, *kwargs.values())) or 1
    total = 0

    def hook(module: nn.Module, inputs, output) -> None:
        nonlocal total
        if not isinstance(output, Tensor):
            return
        if isinstance(module, nn.Conv2d) or (
            isinstance(module, PCALayer) and module.channel_dim == 1
        ):
            positions = _positions(output, 1, examples)
        else:
            positions = _positions(output, -1, examples)
        total += macs_per_position(module) * positions

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d, PCALayer)) or is_conv1d(m)
    ]
    try:
        with kept_modes(model):
            model.eval()
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return int(total)
