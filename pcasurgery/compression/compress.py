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

  and a BatchNorm2d in eval mode that directly follows a compressed Conv2d is
  folded into it (the up-projection, or the folded convolution);
* **anywhere else** (after an activation, an add, a grouped conv, a layer placed
  by hand) the projection becomes a standalone affine map in the PCA layer's
  place: factorised ``width -> k -> width`` when smaller, else one
  ``width -> width`` map (a Linear, or a 1x1 Conv for conv layers).

All algebra runs in float64 on the stored statistics; the new layers take the
dtype and device of the layers they replace.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor, fx, nn

from .._validation import check_bool
from ..layers.network import calibrated_layers
from ..layers.pca import Conv2DPCALayer, PCALayer
from ..surgery.wrap import ProjectOutput
from .counting import count_params

__all__ = ["LowRank", "compress", "plan_layer"]


@dataclass(frozen=True)
class LayerPlan:
    """How one PCA layer is compressed, and what it costs."""

    action: str  # factorised | folded | down-projection | standalone | standalone-factorised
    params: int
    macs_per_position: int


def _fan_in(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    kh, kw = module.kernel_size
    return module.in_channels * kh * kw


def plan_layer(layer: PCALayer, follows: nn.Module | None, k: int | None = None) -> LayerPlan:
    """Choose how ``layer`` (at rank ``k``, its current one by default) is compressed.

    ``follows`` is the Linear/Conv2d whose output the layer projects directly,
    or None for a standalone projection. The choice minimises parameters.
    """
    k = layer.in_dim if k is None else k
    width = layer.width
    if follows is not None:
        fan_in, bias = _fan_in(follows), 1
        down = k * (fan_in + bias)
        if not layer.keepdim:
            return LayerPlan("down-projection", down, k * fan_in)
        factorised = down + width * (k + 1)
        folded = width * (fan_in + 1)
        if 0 < k and factorised < folded:
            return LayerPlan("factorised", factorised, k * fan_in + width * k)
        return LayerPlan("folded", folded, width * fan_in)
    if not layer.keepdim:
        return LayerPlan("standalone", k * (width + 1), k * width)
    factorised = k * (width + 1) + width * (k + 1)
    single = width * (width + 1)
    if 0 < k and factorised < single:
        return LayerPlan("standalone-factorised", factorised, 2 * k * width)
    return LayerPlan("standalone", single, width * width)


class LowRank(nn.Sequential):
    """A factorised layer: ``down`` (``k`` outputs) then ``up`` (``k -> width``).

    It runs as the two small layers, and reads like the layer it replaces:
    ``weight`` and ``bias`` give the dense equivalent (for code that inspects
    its children, as ``nn.TransformerEncoderLayer`` does), and the geometry
    attributes (``in_features``/``out_features``, ``in_channels``,
    ``kernel_size``, ...) are those of the whole map.
    """

    def __init__(self, down: nn.Module, up: nn.Module):
        super().__init__(down, up)

    @property
    def rank(self) -> int:
        """``k``, the width between the two layers."""
        return self[0].weight.shape[0]

    @property
    def weight(self) -> Tensor:
        """The dense weight of the composed map (computed, not a parameter)."""
        down, up = self[0].weight, self[1].weight
        dense = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        return dense.reshape(up.shape[0], *down.shape[1:])

    @property
    def bias(self) -> Tensor:
        """The bias of the composed map."""
        up = self[1].weight.reshape(self[1].weight.shape[0], -1)
        down_bias = self[0].bias if self[0].bias is not None else torch.zeros_like(up[0])
        return up @ down_bias + self[1].bias

    def __getattr__(self, name: str):
        if name in ("out_features", "out_channels"):
            return getattr(self[1], name)
        if name in ("in_features", "in_channels", "kernel_size", "stride", "padding", "dilation",
                    "groups", "padding_mode"):  # fmt: skip
            return getattr(self[0], name)
        return super().__getattr__(name)


# ----------------------------------------------------------------- builders
def _like(module: nn.Module, out_features: int, *, in_features: int | None = None) -> nn.Module:
    """A fresh layer of ``module``'s kind and geometry with ``out_features`` outputs."""
    factory = {"device": module.weight.device, "dtype": module.weight.dtype}
    if isinstance(module, nn.Linear):
        return nn.Linear(in_features or module.in_features, out_features, bias=True, **factory)
    return nn.Conv2d(
        in_features or module.in_channels,
        out_features,
        module.kernel_size,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        groups=1,
        bias=True,
        padding_mode=module.padding_mode,
        **factory,
    )


def _pointwise(
    conv: bool, n_in: int, n_out: int, weight: Tensor, bias: Tensor, like: Tensor
) -> nn.Module:
    """A Linear (or 1x1 Conv2d) ``x -> weight x + bias`` in ``like``'s dtype and device."""
    factory = {"device": like.device, "dtype": like.dtype}
    layer = nn.Conv2d(n_in, n_out, 1, **factory) if conv else nn.Linear(n_in, n_out, **factory)
    with torch.no_grad():
        layer.weight.copy_(weight.reshape(layer.weight.shape))
        layer.bias.copy_(bias)
    return layer


def _set(layer: nn.Module, weight: Tensor, bias: Tensor) -> nn.Module:
    with torch.no_grad():
        layer.weight.copy_(weight.reshape(layer.weight.shape))
        layer.bias.copy_(bias)
    return layer


def _weights64(module: nn.Module) -> tuple[Tensor, Tensor]:
    w = module.weight.detach().to(torch.float64).reshape(module.weight.shape[0], -1)
    b = module.bias
    b = (
        torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
        if b is None
        else b.detach().to(torch.float64)
    )
    return w, b


def _compress_pair(layer: PCALayer, module: nn.Module, plan: LayerPlan) -> nn.Module:
    """The plain layers computing ``layer(module(x))``."""
    v = layer.basis.to(module.weight.device)
    c = layer.center().to(module.weight.device)
    w, b = _weights64(module)
    k = v.shape[1]
    if plan.action == "folded":
        p = v @ v.T
        return _set(_like(module, layer.width), p @ w, p @ (b - c) + c)
    down = _set(_like(module, k), v.T @ w, v.T @ (b - c))
    if plan.action == "down-projection":
        return down
    up = _pointwise(isinstance(module, nn.Conv2d), k, layer.width, v, c, module.weight)
    return LowRank(down, up)


def _standalone(layer: PCALayer, plan: LayerPlan) -> nn.Module:
    v, c, like = layer.basis, layer.center(), layer.projection_weight
    conv = isinstance(layer, Conv2DPCALayer)
    k, width = v.shape[1], layer.width
    if not layer.keepdim:
        return _pointwise(conv, width, k, v.T, -(v.T @ c), like)
    if plan.action == "standalone-factorised":
        down = _pointwise(conv, width, k, v.T, -(v.T @ c), like)
        return LowRank(down, _pointwise(conv, k, width, v, c, like))
    p = v @ v.T
    return _pointwise(conv, width, width, p, c - p @ c, like)


def _fuse_batchnorm(layer: nn.Module, bn: nn.BatchNorm2d) -> nn.Module:
    """``bn(layer(x))`` as one layer (the last one of a Sequential)."""
    last = layer[-1] if isinstance(layer, nn.Sequential) else layer
    var, mean = bn.running_var.to(torch.float64), bn.running_mean.to(torch.float64)
    scale = torch.rsqrt(var + bn.eps)
    shift = -mean * scale
    if bn.affine:
        scale = scale * bn.weight.detach().to(torch.float64)
        shift = shift * bn.weight.detach().to(torch.float64) + bn.bias.detach().to(torch.float64)
    w, b = _weights64(last)
    _set(last, scale[:, None] * w, scale * b + shift)
    return layer


def _fusable_batchnorm(module: nn.Module, new: nn.Module) -> bool:
    return (
        isinstance(module, nn.BatchNorm2d)
        and not module.training
        and module.track_running_stats
        and module.running_mean is not None
        and isinstance(new[-1] if isinstance(new, nn.Sequential) else new, nn.Conv2d)
    )


def _swap(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _can_pair(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


# ------------------------------------------------------------------- driver
def compress(model: nn.Module, *, report: bool = False):
    """Return a copy of ``model`` with every PCA layer turned into plain torch layers.

    The copy computes what the projecting model computes (to float32 rounding)
    and contains no PCA layer. See the module docstring for the rules.

    Args:
        model: a calibrated model with PCA layers (``pca_wrap`` + ``calibrate``).
        report: also return a DataFrame saying what was done per layer.

    Returns:
        The compressed model, or ``(model, table)`` with ``report=True``; the
        table has columns ``layer, action, k, width, params_before,
        params_after, batchnorm_fused``. The same table is the model's
        ``compression_report`` attribute.

    Raises:
        ValueError: the model has no PCA layer.
        NotCalibratedError: some PCA layers have no statistics (named).
    """
    check_bool(report, "report")
    layers = calibrated_layers(model, "compress")
    for layer in layers.values():
        layer._ensure_current()

    out = copy.deepcopy(model)
    rows: list[dict] = []
    if isinstance(out, fx.GraphModule):
        _compress_graph(out, rows)
    _compress_hooked(out, rows)
    _compress_remaining(out, rows)
    assert not any(isinstance(m, PCALayer) for m in out.modules())
    order = list(layers)
    rows.sort(key=lambda r: order.index(r["layer"]) if r["layer"] in order else len(order))
    table = pd.DataFrame(
        rows,
        columns=[
            "layer",
            "action",
            "k",
            "width",
            "params_before",
            "params_after",
            "batchnorm_fused",
        ],
    )
    out.compression_report = table
    return (out, table) if report else out


def _row(
    name: str, layer: PCALayer, action: str, before: int, after: nn.Module, fused: bool
) -> dict:
    return {
        "layer": name,
        "action": action,
        "k": layer.in_dim,
        "width": layer.width,
        "params_before": before,
        "params_after": count_params(after),
        "batchnorm_fused": fused,
    }


def _compress_graph(gm: fx.GraphModule, rows: list[dict]) -> None:
    modules = dict(gm.named_modules())
    groups: dict[int, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), PCALayer):
            groups.setdefault(id(modules[node.target]), []).append(node)
    for nodes in groups.values():
        layer: PCALayer = modules[nodes[0].target]
        target = getattr(layer, "target", None)
        sources = [n.args[0] for n in nodes]
        module = modules.get(target) if target else None
        calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target]
        direct = (
            module is not None
            and _can_pair(module)
            and all(
                isinstance(s, fx.Node) and s.op == "call_module" and s.target == target
                for s in sources
            )
            and all(len(s.users) == 1 for s in sources)
            and len(calls) == len(sources)
        )
        if not direct:
            continue  # a standalone projection, handled in place later
        plan = plan_layer(layer, module)
        new = _compress_pair(layer, module, plan)
        before = count_params(module)
        for node, source in zip(nodes, sources, strict=True):
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
        fused = False
        if len(sources) == 1 and len(sources[0].users) == 1:
            user = next(iter(sources[0].users))
            bn = modules.get(user.target) if user.op == "call_module" else None
            bn_calls = [
                n for n in gm.graph.nodes if n.op == "call_module" and n.target == user.target
            ]
            if bn is not None and len(bn_calls) == 1 and _fusable_batchnorm(bn, new):
                _fuse_batchnorm(new, bn)
                before += count_params(bn)
                user.replace_all_uses_with(sources[0])
                gm.graph.erase_node(user)
                fused = True
        _swap(gm, target, new)
        rows.append(_row(target, layer, plan.action, before, new, fused))
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()


def _compress_hooked(root: nn.Module, rows: list[dict]) -> None:
    """Models wrapped through forward hooks: each hooked module is followed directly."""
    for name, module in list(root.named_modules()):
        hooks = [h for h in module._forward_hooks.values() if isinstance(h, ProjectOutput)]
        if not hooks or not name:
            continue
        layer = getattr(module, hooks[0].child)
        if not _can_pair(module):
            continue
        plan = plan_layer(layer, module)
        new = _compress_pair(layer, module, plan)
        rows.append(
            _row(layer.target or name, layer, plan.action, count_params(module), new, False)
        )
        _swap(root, name, new)


def _compress_remaining(root: nn.Module, rows: list[dict]) -> None:
    """Every PCA layer still present becomes a standalone affine map in its place."""
    hooked = {
        id(getattr(m, h.child))
        for m in root.modules()
        for h in m._forward_hooks.values()
        if isinstance(h, ProjectOutput)
    }
    for name, layer in list(root.named_modules()):
        if not isinstance(layer, PCALayer):
            continue
        if id(layer) in hooked:
            # a hooked grouped conv: replace the hook's target by module + projection
            parent_name = name.rpartition(".")[0]
            parent = root.get_submodule(parent_name)
            for key, h in list(parent._forward_hooks.items()):
                if isinstance(h, ProjectOutput) and getattr(parent, h.child) is layer:
                    del parent._forward_hooks[key]
            plan = plan_layer(layer, None)
            new = _standalone(layer, plan)
            delattr(parent, name.rpartition(".")[2])
            _swap(root, parent_name, nn.Sequential(parent, new))
        else:
            plan = plan_layer(layer, None)
            new = _standalone(layer, plan)
            _swap(root, name, new)
        rows.append(_row(getattr(layer, "target", None) or name, layer, plan.action, 0, new, False))
