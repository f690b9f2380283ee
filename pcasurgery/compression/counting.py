"""Parameter and multiply-accumulate counts: one formula, used everywhere.

``count_macs`` runs one forward pass and counts, per input example, the
multiply-accumulates of every layer of a known kind (``nn.Linear``, transformers'
``Conv1D``, convolutions and transposed convolutions) and PCA layer (the
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
from ..layers.kinds import kind_of
from ..layers.pca import PCALayer

__all__ = ["count_macs", "count_params", "macs_per_position"]


def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model`` (each shared tensor once; buffers excluded)."""
    check_module(model)
    return sum(p.numel() for p in model.parameters())


def macs_per_position(module: nn.Module) -> int:
    """Multiply-accumulates one output position of ``module`` costs.

    A position is one row of a Linear's output, one pixel of a convolution's
    output, one sample of a PCA layer's projection. Layers of the kinds in
    ``layers.kinds.KINDS`` (a transposed convolution's per output position:
    ``LayerKind.macs_per_position``) and PCA layers; 0 for anything else.
    """
    if isinstance(module, PCALayer):  # V^T then V when the projection is held factored
        return module.projection_weight.numel() * (2 if module._factored else 1)
    kind = kind_of(module)
    return 0 if kind is None else kind.macs_per_position(module)


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
        MACs per example of every Linear, convolution and PCA layer.
    """
    check_module(model)
    args, kwargs = model_inputs(example_inputs)
    examples = examples_in((*args, *kwargs.values())) or 1
    total = 0

    def hook(module: nn.Module, inputs, output) -> None:
        nonlocal total
        if not isinstance(output, Tensor):
            return
        kind = module if isinstance(module, PCALayer) else kind_of(module)
        positions = _positions(output, 1 if kind.spatial_dims else -1, examples)  # type: ignore[union-attr]
        total += macs_per_position(module) * positions

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, PCALayer) or kind_of(m) is not None
    ]
    try:
        with kept_modes(model):
            model.eval()
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return int(total)
