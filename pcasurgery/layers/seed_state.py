"""The seed library's checkpoints: a delve PCA layer's state read into this library's buffers."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from ..core import spectrum as _s

__all__ = ["convert_delve_state"]

log = logging.getLogger("pcasurgery")


def convert_delve_state(layer: Any, state_dict: dict, prefix: str) -> None:
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
    center = mean if layer.centering else torch.zeros_like(mean)
    weight, bias = _s.projection_affine(vectors[:, :k], center, layer.keepdim)
    if not computed and not layer.keepdim:
        weight, bias = weight[:0], bias[:0]
    dtype = layer.projection_weight.dtype
    converted = {
        "sample_count": torch.tensor(n),
        "shift": torch.zeros_like(total),
        "shifted_sum": total,
        "shifted_sum_sq": total_sq,
        "example_count": torch.tensor(n if layer.channel_dim == -1 else 0),
        "sample_positions": torch.tensor(1),
        "statistics_shared": torch.tensor(False),
        "computed_count": torch.tensor(-1 if computed else 0),
        "_threshold": torch.tensor(threshold, dtype=torch.float64),
        "_centering": torch.tensor(layer.centering),
        "_keepdim": torch.tensor(layer.keepdim),
        "mean": mean,
        "rank": torch.tensor(k),
        "random_directions": torch.tensor(False),
        "projection_weight": weight.to(dtype),
        "projection_bias": bias.to(dtype),
        "basis": vectors[:, :k].contiguous(),
    }
    state_dict.update({prefix + name: value for name, value in converted.items()})
    log.info(
        "%s: loaded a delve PCA layer (k = %d of %d at threshold %g)",
        prefix or layer.name,
        k,
        layer.width,
        threshold,
    )
