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

import copy
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._progress import check_progress, progress_bar
from ..layers.folding import factorising_pays, folded_affine, own_forward
from ..layers.kinds import LayerKind, foldable_kind, kind_of, pointwise, weight_matrix
from ..layers.network import _calibrated_layers
from ..layers.offload import hook_like, resident
from ..layers.pca import PCALayer
from ..layers.sites import (
    OTHER_BIAS,
    Projected,
    Site,
    SiteTracer,
    clear_sites,
    replace_module,
    sites_of,
    unfollow,
)
from ..modeling_pcasurgery import LowRank, compressed_class, mark_replaced, record
from .counting import count_params

__all__ = ["LowRank", "compress", "compression_plan"]

PLAN_COLUMNS = ("layer", "action", "k", "width", "params_before", "params_after", "batchnorm_fused")


@dataclass(frozen=True)
class LayerPlan:
    """How one PCA layer is compressed, and what it costs."""

    action: str  # factorised | folded | down-projection | standalone | standalone-factorised | kept
    params: int
    macs_per_position: int


# a layer of a kind in ``layers.kinds.KINDS``: what a projection folds into
Dense = Any


def _kind(module: nn.Module) -> LayerKind:
    kind = kind_of(module)
    assert kind is not None, type(module)
    return kind


def _fan_in(module: Dense) -> int:
    return _kind(module).fan_in(module)


def _plan_layer(layer: PCALayer, follows: Dense | None, k: int | None = None) -> LayerPlan:
    """Choose how ``layer`` (at rank ``k``, its current one by default) is compressed.

    ``follows`` is the Linear/Conv2d whose output the layer projects directly,
    or None for a standalone projection. The choice minimises parameters. A
    layer at ``k = 0`` (its output is its mean) is built as a rank-1 pair whose
    weights are zero, and counted so. A standalone projection at full rank is
    the identity and is dropped (``"identity"``: no parameter, no
    multiply-accumulate), so a plan that keeps such a layer at full rank never
    adds a layer.
    """
    k = layer.in_dim if k is None else k
    width, built = layer.width, max(k, 1)
    if follows is not None:
        kind, fan_in = _kind(follows), _fan_in(follows)
        dense = LayerPlan("folded", width * (fan_in + 1), kind.macs_per_position(follows, width))
        if follows.__dict__.get(OTHER_BIAS):  # see layers.sites
            return LayerPlan("kept", dense.params, dense.macs_per_position)
        if not layer.keepdim:
            return LayerPlan(
                "down-projection", k * (fan_in + 1), kind.macs_per_position(follows, k)
            )
        if factorising_pays(built, fan_in, width):
            down = LayerPlan("", built * (fan_in + 1), kind.macs_per_position(follows, built))
            return LayerPlan("factorised", down.params + width * (built + 1),
                             down.macs_per_position + built * width)  # fmt: skip
        return dense
    if not layer.keepdim:
        return LayerPlan("standalone", k * (width + 1), k * width)
    if k >= width:
        return LayerPlan("identity", 0, 0)
    if factorising_pays(built, width, width):  # x -> k -> width against the width x width map
        return LayerPlan(
            "standalone-factorised", built * (width + 1) + width * (built + 1), 2 * built * width
        )
    return LayerPlan("standalone", width * (width + 1), width * width)


def _kept_basis(layer: PCALayer) -> Tensor:
    """The basis ``compress`` builds with: the kept one, or one zero column where ``k = 0``."""
    v = layer.basis
    return v if v.shape[1] else v.new_zeros(v.shape[0], 1)


# ----------------------------------------------------------------- builders
def _set(layer: Dense, weight: Tensor, bias: Tensor) -> Dense:
    """Give ``layer`` the map ``(weight, bias)``, ``weight`` as its kind's ``(outputs, fan-in)`` matrix."""
    assert isinstance(layer.bias, Tensor) and isinstance(layer.weight, Tensor)
    with torch.no_grad():
        layer.weight.copy_(_kind(layer).weight_from_matrix(weight, layer.weight))
        layer.bias.copy_(bias)
    return layer


def _pointwise(
    spatial_dims: int, n_in: int, n_out: int, weight: Tensor, bias: Tensor, like: Tensor
) -> Dense:
    """A Linear (or 1x1 convolution) ``x -> weight x + bias`` in ``like``'s dtype and device."""
    return _set(pointwise(spatial_dims, n_in, n_out, like), weight, bias)


def _compress_pair(layer: PCALayer, module: Dense, plan: LayerPlan) -> nn.Module:
    """The plain layers computing ``layer(module(x))``."""
    kind = _kind(module)
    v = (_kept_basis(layer) if layer.keepdim else layer.basis).to(module.weight.device)
    c = layer.center().to(module.weight.device)
    w, b = weight_matrix(module, torch.float64)
    k = v.shape[1]
    if plan.action == "folded":
        return _set(
            kind.like(module, layer.width),
            *folded_affine(w, b, layer, layer.discarded_directions(module)),
        )
    down = _set(kind.like(module, k), v.T @ w, v.T @ (b - c))
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


_BATCHNORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}  # by spatial dims


def _fusable_batchnorm(module: nn.Module, spatial_dims: int) -> bool:
    """An eval-mode BatchNorm of a convolution's outputs with running statistics: an affine
    map that can be folded."""
    return bool(
        isinstance(module, _BATCHNORMS.get(spatial_dims, ()))
        and not module.training
        and module.track_running_stats
        and module.running_mean is not None
        and module.running_var is not None
    )


def _followed(model: nn.Module, site: Site) -> Dense | None:
    """The Linear/Conv2d whose output the site's layer projects directly, if it can be paired."""
    module = model.get_submodule(site.follows) if site.follows is not None else None
    if module is None or not own_forward(module):  # its output is not its weights' map
        return None
    return module if foldable_kind(module) is not None else None


def _plan_site(model: nn.Module, site: Site, k: int | None = None) -> LayerPlan:
    """How the PCA layer at ``site`` is compressed at rank ``k`` (its current one by default)."""
    layer = model.get_submodule(site.layer_path)
    assert isinstance(layer, PCALayer)
    return _plan_layer(layer, _followed(model, site), k)


# ------------------------------------------------------------------- driver
def compression_plan(model: nn.Module) -> pd.DataFrame:
    """What ``compress(model)`` will do, one row per PCA layer, without changing anything.

    Columns: ``layer``, ``action`` (``factorised``, ``folded``,
    ``down-projection``, ``standalone``, ``standalone-factorised``, or ``kept``
    for a Linear the model calls through ``F.linear`` with a bias of its own
    making, left as it was), ``k``,
    ``width``, ``params_before`` (of the layer it rewrites; 0 for a standalone
    projection), ``params_after``, ``batchnorm_fused`` (a BatchNorm2d that
    ``compress`` will fold in).

    Raises:
        ValueError: the model has no PCA layer.
        NotCalibratedError: some PCA layers have no statistics (named).
    """
    layers = _calibrated_layers(model, "plan compression")
    rows = []
    bns = _fusable_batchnorms(model)
    for site in sites_of(model):
        layer = layers[site.name]
        module = _followed(model, site)
        plan = _plan_layer(layer, module)
        before = count_params(module) if module is not None else 0
        bn = bns.get(site.name)
        before += count_params(bn) if bn is not None else 0
        rows.append({"layer": site.name, "action": plan.action, "k": layer.in_dim,
                     "width": layer.width, "params_before": before, "params_after": plan.params,
                     "batchnorm_fused": bn is not None})  # fmt: skip
    return pd.DataFrame(rows, columns=list(PLAN_COLUMNS))


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
    layers = _calibrated_layers(model, "compress")
    progress = check_progress(progress)
    for layer in layers.values():
        layer.ensure_eigenspace()
    out = copy.deepcopy(model)
    bns = _fusable_batchnorms(out)
    sites = sites_of(out)
    rows = []
    before = dict(out.named_modules(remove_duplicate=False))
    with resident(out), progress_bar(progress, desc="compressing", unit="layer",
                                     total=len(sites)) as bar:  # fmt: skip
        for site in sites:  # weights offloaded by accelerate are read here, resident
            rows.append(_compress_site(out, site, bns.get(site.name)))
            bar.update()
    clear_sites(out)
    assert not any(isinstance(m, PCALayer) for m in out.modules())
    after = out.named_modules(remove_duplicate=False)
    mark_replaced(out, [path for path, m in after if path and before.get(path) is not m])
    _shippable(out)
    out.compression_report = pd.DataFrame(rows, columns=list(PLAN_COLUMNS))
    return out


def _shippable(model: nn.Module) -> None:
    """Give a compressed transformers model the class whose ``save_pretrained`` writes a
    checkpoint that loads without pcasurgery (``pcasurgery.modeling_pcasurgery``)."""
    cls = type(model)
    base: type = cls.__dict__.get("_compressed_from") or cls
    transformers = sys.modules.get("transformers")
    if transformers is None or getattr(transformers, base.__name__, None) is not base:
        return  # not one of transformers' own model classes
    model.__class__ = compressed_class(base)
    config: Any = model.config
    config.pcasurgery = record(model, base.__name__)


def _row(site: Site, layer: PCALayer, action: str, before: int, after: nn.Module, fused: bool):
    return {"layer": site.name, "action": action, "k": layer.in_dim, "width": layer.width,
            "params_before": before, "params_after": count_params(after),
            "batchnorm_fused": fused}  # fmt: skip


def _compress_site(root: nn.Module, site: Site, bn: _BatchNorm | None) -> dict:
    """Rewrite one site of ``root`` (a copy) into plain layers; returns its report row.

    ``bn``: an eval BatchNorm2d that alone reads the site's projection, to fold in.
    """
    layer = root.get_submodule(site.layer_path)
    assert isinstance(layer, PCALayer)
    module = _followed(root, site)
    if site.attachment in ("module", "function"):
        followed = root.get_submodule(site.name)
        if module is not None and _plan_layer(layer, module).action == "kept":
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
            plan = _plan_layer(layer, module)
            new = _compress_pair(layer, module, plan)
            before = count_params(module)
            if bn is not None:
                _fuse_batchnorm(new, bn)
                replace_module(root, bn, nn.Identity())
                before += count_params(bn)
            hook_like(new, followed)
            replace_module(root, followed, new)
            return _row(site, layer, plan.action, before, new, bn is not None)
        plan = _plan_layer(layer, None)
        standalone = _standalone(layer, plan)
        replace_module(root, followed, _then(unfollow(followed), standalone))
        return _row(site, layer, plan.action, 0, standalone, False)
    if site.attachment == "wrapper":
        wrapper = root.get_submodule(site.name)
        assert isinstance(wrapper, Projected)
        if module is not None:
            plan = _plan_layer(layer, module)
            new = _compress_pair(layer, module, plan)
            hook_like(new, wrapper.module)
            replace_module(root, wrapper, new)
            return _row(site, layer, plan.action, count_params(module), new, False)
        plan = _plan_layer(layer, None)
        standalone = _standalone(layer, plan)
        replace_module(root, wrapper, _then(wrapper.module, standalone))
        return _row(site, layer, plan.action, 0, standalone, False)
    plan = _plan_layer(layer, None)
    new = _standalone(layer, plan)
    replace_module(root, layer, new)
    return _row(site, layer, plan.action, 0, new, False)


def _then(module: nn.Module, standalone: nn.Module) -> nn.Module:
    """``module`` followed by a standalone projection (nothing for the identity)."""
    return module if isinstance(standalone, nn.Identity) else nn.Sequential(module, standalone)


def _fusable_batchnorms(model: nn.Module) -> dict[str, _BatchNorm]:
    """``{site name: BatchNorm2d}`` for sites after a Conv2d read only by an eval BatchNorm2d.

    Read off the model's graph (traced when it is not a ``GraphModule``); a
    model that cannot be traced keeps its BatchNorms.
    """
    if isinstance(model, fx.GraphModule):
        graph = model.graph
    else:
        try:
            graph = SiteTracer().trace(model)
        except Exception:  # noqa: BLE001 - untraceable: nothing is fused
            return {}
    modules = dict(model.named_modules())
    found = {}
    for site in sites_of(model):
        if site.attachment != "module":
            continue
        followed = _followed(model, site)
        dims = _kind(followed).spatial_dims if followed is not None else 0
        if not dims:
            continue
        target = site.name
        nodes = [n for n in graph.nodes if n.op == "call_module" and n.target == target]
        if len(nodes) != 1 or len(nodes[0].users) != 1:
            continue
        user = next(iter(nodes[0].users))
        bn = modules.get(str(user.target)) if user.op == "call_module" else None
        calls = [n for n in graph.nodes if n.op == "call_module" and n.target == user.target]
        if bn is not None and len(calls) == 1 and _fusable_batchnorm(bn, dims):
            found[site.name] = bn
    return found
