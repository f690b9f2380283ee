"""``compress``: turn every PCA layer into plain torch layers with the same outputs.

With ``V`` the ``(width, k)`` basis a PCA layer keeps and ``c`` its centre (the
mean, or zero without centring), the layer maps ``z -> V V^T (z - c) + c``
(``keepdim=False``: ``z -> V^T (z - c)``). Rules, per layer:

* **after a Linear or Conv2d** (``groups=1``) whose output nothing else reads,
  the pair ``z = W x + b`` then projection is rewritten as

  - *factorised*: a ``k``-output copy of the layer (same kernel, stride,
    padding, dilation) with ``W_d = V^T W``, ``b_d = V^T (b - c)``, followed by a
    ``k -> width`` Linear / 1x1 Conv ``(V, c)``, when that has fewer parameters;
  - *folded*: the same layer with ``W' = V V^T W``, ``b' = V V^T (b - c) + c``;
  - *down-projection* (``keepdim=False``): the ``k``-output layer alone;

  and a BatchNorm2d in eval mode that alone reads a compressed Conv2d's output
  (found on the model's ``torch.fx`` graph) is folded into it (the
  up-projection, or the folded convolution), leaving an ``nn.Identity`` in its
  place; models ``torch.fx`` cannot trace keep their BatchNorms;
* **anywhere else** (after an activation, an add, a grouped conv, a layer placed
  by hand) the projection becomes a standalone affine map in the PCA layer's
  place: factorised ``width -> k -> width`` when smaller, else one
  ``width -> width`` map (a Linear, or a 1x1 Conv for conv layers).

Where each PCA layer sits and what it follows is read from the record
``pca_wrap`` left (``pcasurgery.layers.sites``); nothing is inferred again.
All algebra runs in float64 on the stored statistics; the new layers take the
dtype and device of the layers they replace.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._progress import check_progress, progress_bar
from ..core.spectrum import transposed_times_by_rows
from ..layers.decompose import compute_eigenvectors
from ..layers.folding import folded_affine
from ..layers.kinds import pointwise, weight_matrix
from ..layers.network import calibrated_layers
from ..layers.offload import hook_like, resident
from ..layers.pca import PCALayer
from ..layers.sites import (
    Projected,
    Site,
    clear_sites,
    copy_sharing,
    replace_module,
    sites_of,
    unfollow,
)
from ..modeling_pcasurgery import LowRank, compressed_class, mark_replaced, record
from .counting import count_params
from .plan import (
    PLAN_COLUMNS,
    Dense,
    LayerPlan,
    followed_module,
    fusable_batchnorms,
    known_kind,
    plan_layer,
)

__all__ = ["LowRank", "compress"]


def _kept_basis(layer: PCALayer) -> Tensor:
    """The basis ``compress`` builds with: the kept one, or one zero column where ``k = 0``."""
    v = layer.basis
    return v if v.shape[1] else v.new_zeros(v.shape[0], 1)


# ----------------------------------------------------------------- builders
def _set(layer: Dense, weight: Tensor, bias: Tensor) -> Dense:
    """Give ``layer`` the map ``(weight, bias)``, ``weight`` as its kind's ``(outputs, fan-in)`` matrix."""
    assert isinstance(layer.bias, Tensor) and isinstance(layer.weight, Tensor)
    with torch.no_grad():
        layer.weight.copy_(known_kind(layer).weight_from_matrix(weight, layer.weight))
        layer.bias.copy_(bias)
    return layer


def _pointwise(
    spatial_dims: int, n_in: int, n_out: int, weight: Tensor, bias: Tensor, like: Tensor
) -> Dense:
    """A Linear (or 1x1 convolution) ``x -> weight x + bias`` in ``like``'s dtype and device."""
    return _set(pointwise(spatial_dims, n_in, n_out, like), weight, bias)


def _compress_pair(layer: PCALayer, module: Dense, plan: LayerPlan) -> nn.Module:
    """The plain layers computing ``layer(module(x))``."""
    kind = known_kind(module)
    v = (_kept_basis(layer) if layer.keepdim else layer.basis).to(module.weight.device)
    c = layer.center().to(module.weight.device)
    # in its own dtype: the float64 products read it a block of rows at a time
    w, b = weight_matrix(module, module.weight.dtype)
    k = v.shape[1]
    if plan.action == "folded":
        rest = layer.discarded_directions(module)
        return _set(
            kind.like(module, layer.width), *folded_affine(w, b, layer, rest, torch.float64)
        )
    down_w = transposed_times_by_rows(v, w)
    down = _set(kind.like(module, k), down_w, v.T @ (b.to(torch.float64) - c))
    if plan.action == "down-projection":
        return down
    up = _pointwise(kind.spatial_dims, k, layer.width, v, c, module.weight)
    return LowRank(down, up)


def _standalone(layer: PCALayer, plan: LayerPlan) -> nn.Module:
    if plan.action == "identity":
        return nn.Identity()
    v = _kept_basis(layer) if layer.keepdim else layer.basis
    c, like = layer.center(), layer.projection_weight
    dims = layer.spatial_dims
    k, width = v.shape[1], layer.width
    if not layer.keepdim:
        return _pointwise(dims, width, k, v.T, -(v.T @ c), like)
    if plan.action == "standalone-factorised":
        down = _pointwise(dims, width, k, v.T, -(v.T @ c), like)
        return LowRank(down, _pointwise(dims, k, width, v, c, like))
    p = v @ v.T
    return _pointwise(dims, width, width, p, c - p @ c, like)


def _fuse_batchnorm(layer: nn.Module, bn: _BatchNorm) -> nn.Module:
    """``bn(layer(x))`` as one layer (the last one of a Sequential)."""
    last = layer[-1] if isinstance(layer, nn.Sequential) else layer
    assert bn.running_var is not None and bn.running_mean is not None
    var, mean = bn.running_var.to(torch.float64), bn.running_mean.to(torch.float64)
    scale = torch.rsqrt(var + bn.eps)
    shift = -mean * scale
    if bn.affine:
        scale = scale * bn.weight.detach().to(torch.float64)
        shift = shift * bn.weight.detach().to(torch.float64) + bn.bias.detach().to(torch.float64)
    w, b = weight_matrix(last, torch.float64)
    _set(last, scale[:, None] * w, scale * b + shift)
    return layer


# ------------------------------------------------------------------- driver
def compress(model: nn.Module, *, progress: bool | None = None) -> nn.Module:
    """Return a copy of ``model`` with every PCA layer turned into plain torch layers.

    The copy computes what the projecting model computes (to float32 rounding)
    and contains no PCA layer. See the module docstring for the rules;
    :func:`compression_plan` says what will be done before anything changes,
    and the copy's ``compression_report`` attribute says what was done (the
    same columns).

    Args:
        model: a calibrated model with PCA layers (``pca_wrap`` + ``calibrate``).
        progress: a bar over the layers rewritten (``None``: in a terminal, after
            two seconds; see ``calibrate``).

    Returns:
        The compressed model.

    Raises:
        ValueError: the model has no PCA layer.
        NotCalibratedError: some PCA layers have no statistics (named).
    """
    layers = calibrated_layers(model, "compress")
    progress = check_progress(progress)
    compute_eigenvectors(layers.values(), progress)  # side by side, where still pending
    for layer in layers.values():
        layer.ensure_eigenspace()
    # the copy shares the PCA layers (read here, never changed, and all replaced): their
    # statistics and eigenvectors are not copied; nor are the weights of the modules replaced
    out = copy_sharing(model, _replaced(model), {id(layer): layer for layer in layers.values()})
    bns = fusable_batchnorms(out)
    sites = sites_of(out)
    rows = []
    before = dict(out.named_modules(remove_duplicate=False))
    with (
        resident(out),
        progress_bar(progress, desc="compressing", unit="layer", total=len(sites)) as bar,
    ):
        for site in sites:  # weights offloaded by accelerate are read here, resident
            rows.append(_compress_site(out, site, bns.get(site.name)))
            bar.update()
    clear_sites(out)
    assert not any(isinstance(m, PCALayer) for m in out.modules())
    after = out.named_modules(remove_duplicate=False)
    mark_replaced(out, [path for path, m in after if path and before.get(path) is not m])
    make_shippable(out)
    out.compression_report = pd.DataFrame(rows, columns=list(PLAN_COLUMNS))
    return out


def _replaced(model: nn.Module) -> list[nn.Module]:
    """The modules that ``compress`` replaces by new ones: every followed module but those kept."""
    modules = []
    for site in sites_of(model):
        module = followed_module(model, site)
        layer = model.get_submodule(site.layer_path)
        if module is not None and plan_layer(layer, module).action != "kept":  # type: ignore[arg-type]
            modules.append(module)
    return modules


def make_shippable(model: nn.Module) -> None:
    """Give a compressed transformers model the class whose ``save_pretrained`` writes a
    checkpoint that loads without pcasurgery (``pcasurgery.modeling_pcasurgery``); other
    models are left as they are."""
    if not (hasattr(model, "config") and hasattr(model, "save_pretrained")):
        return
    cls = type(model)
    base: type = cls.__dict__.get("_compressed_from") or cls
    transformers = sys.modules.get("transformers")
    if transformers is None or getattr(transformers, base.__name__, None) is not base:
        return  # not one of transformers' own model classes
    model.__class__ = compressed_class(base)
    config: Any = model.config
    config.pcasurgery = record(model, base.__name__)


def _row(site: Site, layer: PCALayer, action: str, before: int, after: nn.Module, fused: bool):
    return {
        "layer": site.name,
        "action": action,
        "k": layer.in_dim,
        "width": layer.width,
        "params_before": before,
        "params_after": count_params(after),
        "batchnorm_fused": fused,
    }


def _compress_site(root: nn.Module, site: Site, bn: _BatchNorm | None) -> dict:
    """Rewrite one site of ``root`` (a copy) into plain layers; returns its report row.

    ``bn``: an eval BatchNorm2d that alone reads the site's projection, to fold in.
    """
    layer = root.get_submodule(site.layer_path)
    assert isinstance(layer, PCALayer)
    module = followed_module(root, site)
    if site.attachment in ("module", "function"):
        followed = root.get_submodule(site.name)
        if module is not None and plan_layer(layer, module).action == "kept":
            warnings.warn(
                f"{site.name}: the model calls F.linear on its weight with a bias of its own "
                "making (as Swin V2 does), into which the projection cannot be folded; it stays "
                "as it was",
                UserWarning,
                stacklevel=4,
            )
            replace_module(root, followed, unfollow(followed))
            return _row(site, layer, "kept", count_params(module), module, False)
        if module is not None:
            plan = plan_layer(layer, module)
            new = _compress_pair(layer, module, plan)
            before = count_params(module)
            if bn is not None:
                _fuse_batchnorm(new, bn)
                replace_module(root, bn, nn.Identity())
                before += count_params(bn)
            hook_like(new, followed)
            replace_module(root, followed, new)
            return _row(site, layer, plan.action, before, new, bn is not None)
        plan = plan_layer(layer, None)
        standalone = _standalone(layer, plan)
        replace_module(root, followed, _then(unfollow(followed), standalone))
        return _row(site, layer, plan.action, 0, standalone, False)
    if site.attachment == "wrapper":
        wrapper = root.get_submodule(site.name)
        assert isinstance(wrapper, Projected)
        if module is not None:
            plan = plan_layer(layer, module)
            new = _compress_pair(layer, module, plan)
            hook_like(new, wrapper.module)
            replace_module(root, wrapper, new)
            return _row(site, layer, plan.action, count_params(module), new, False)
        plan = plan_layer(layer, None)
        standalone = _standalone(layer, plan)
        replace_module(root, wrapper, _then(wrapper.module, standalone))
        return _row(site, layer, plan.action, 0, standalone, False)
    plan = plan_layer(layer, None)
    new = _standalone(layer, plan)
    replace_module(root, layer, new)
    return _row(site, layer, plan.action, 0, new, False)


def _then(module: nn.Module, standalone: nn.Module) -> nn.Module:
    """``module`` followed by a standalone projection (nothing for the identity)."""
    return module if isinstance(standalone, nn.Identity) else nn.Sequential(module, standalone)
