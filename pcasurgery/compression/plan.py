"""What ``compress`` will do to each PCA layer, and what it costs: one home for per-layer plans.

:func:`plan_layer` chooses how one PCA layer is compressed (factorised, folded,
a down-projection, a standalone projection, dropped as the identity, or kept)
and prices it: parameters, and multiply-accumulates per output position from
the layer kinds' formula (``layers.kinds``, the one ``count_macs`` uses);
:func:`plan_layers` does so at many ranks at once, as arrays (what a budget weighs).
``compression_plan``, ``compress``, ``budget_plan`` and ``sweep`` all read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..layers.folding import largest_factorised_rank, own_forward
from ..layers.kinds import LayerKind, foldable_kind, kind_of
from ..layers.network import calibrated_layers
from ..layers.pca import PCALayer
from ..layers.sites import Site, sites_of, trace_sites
from .counting import count_params

__all__ = [
    "PLAN_COLUMNS",
    "LayerPlan",
    "LayerPlans",
    "compression_plan",
    "followed_module",
    "fusable_batchnorms",
    "known_kind",
    "plan_layer",
    "plan_layers",
    "plan_site",
]

PLAN_COLUMNS = ("layer", "action", "k", "width", "params_before", "params_after", "batchnorm_fused")


@dataclass(frozen=True)
class LayerPlan:
    """How one PCA layer is compressed, and what it costs."""

    action: str  # factorised | folded | down-projection | standalone | standalone-factorised | kept
    params: int
    macs_per_position: int


# a layer of a kind in ``layers.kinds.KINDS``: what a projection folds into
Dense = Any


def known_kind(module: nn.Module) -> LayerKind:
    """The kind of a module the site record says is of a known kind."""
    kind = kind_of(module)
    assert kind is not None, type(module)
    return kind


def _fan_in(module: Dense) -> int:
    return known_kind(module).fan_in(module)


def plan_layer(layer: PCALayer, follows: Dense | None, k: int | None = None) -> LayerPlan:
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
    return plan_layers(layer, follows, np.array([k]))[0]


@dataclass(frozen=True)
class LayerPlans:
    """:class:`LayerPlan` at many ranks of one layer, as arrays: entry ``i`` is rank ``ks[i]``."""

    actions: np.ndarray  # of str
    params: np.ndarray  # int64
    macs_per_position: np.ndarray  # int64

    def __getitem__(self, i: int) -> LayerPlan:
        return LayerPlan(str(self.actions[i]), int(self.params[i]), int(self.macs_per_position[i]))


def plan_layers(layer: PCALayer, follows: Dense | None, ks: np.ndarray) -> LayerPlans:
    """:func:`plan_layer` at every rank of ``ks`` (integers) at once: what a budget prices,
    a layer's every rank (an LLM's 5632-wide projection: 5632 plans), in a few array
    operations instead of one call each."""
    k = np.asarray(ks, dtype=np.int64)
    width, built = layer.width, np.maximum(k, 1)

    def plans(actions: Any, params: Any, macs: Any) -> LayerPlans:
        return LayerPlans(
            *(np.broadcast_to(np.asarray(a), k.shape) for a in (actions, params, macs))
        )

    if follows is not None:
        kind, fan_in = known_kind(follows), _fan_in(follows)
        dense = (width * (fan_in + 1), kind.macs_per_position(follows, width))
        if layer.other_bias:  # the model calls F.linear with a bias of its own making
            return plans("kept", *dense)
        if not layer.keepdim:
            return plans("down-projection", k * (fan_in + 1), kind.macs_per_position(follows, k))
        pays = built <= largest_factorised_rank(fan_in, width)
        return plans(
            np.where(pays, "factorised", "folded"),
            np.where(pays, built * (fan_in + 1) + width * (built + 1), dense[0]),
            np.where(pays, kind.macs_per_position(follows, built) + built * width, dense[1]),
        )
    if not layer.keepdim:
        return plans("standalone", k * (width + 1), k * width)
    identity = k >= width
    # x -> k -> width against the width x width map
    pays = ~identity & (built <= largest_factorised_rank(width, width))
    return plans(
        np.select([identity, pays], ["identity", "standalone-factorised"], "standalone"),
        np.select(
            [identity, pays], [0, built * (width + 1) + width * (built + 1)], width * (width + 1)
        ),
        np.select([identity, pays], [0, 2 * built * width], width * width),
    )


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


def followed_module(model: nn.Module, site: Site) -> Dense | None:
    """The Linear/Conv2d whose output the site's layer projects directly, if it can be paired."""
    module = model.get_submodule(site.follows) if site.follows is not None else None
    if module is None or not own_forward(module):  # its output is not its weights' map
        return None
    return module if foldable_kind(module) is not None else None


def plan_site(model: nn.Module, site: Site, k: int | None = None) -> LayerPlan:
    """How the PCA layer at ``site`` is compressed at rank ``k`` (its current one by default)."""
    layer = model.get_submodule(site.layer_path)
    assert isinstance(layer, PCALayer)
    return plan_layer(layer, followed_module(model, site), k)


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
    layers = calibrated_layers(model, "plan compression")
    rows = []
    bns = fusable_batchnorms(model)
    for site in sites_of(model):
        layer = layers[site.name]
        module = followed_module(model, site)
        plan = plan_layer(layer, module)
        before = count_params(module) if module is not None else 0
        bn = bns.get(site.name)
        before += count_params(bn) if bn is not None else 0
        rows.append(
            {
                "layer": site.name,
                "action": plan.action,
                "k": layer.in_dim,
                "width": layer.width,
                "params_before": before,
                "params_after": plan.params,
                "batchnorm_fused": bn is not None,
            }
        )
    return pd.DataFrame(rows, columns=list(PLAN_COLUMNS))


def fusable_batchnorms(model: nn.Module) -> dict[str, _BatchNorm]:
    """``{site name: BatchNorm2d}`` for sites after a Conv2d read only by an eval BatchNorm2d.

    Read off the model's graph (traced when it is not a ``GraphModule``); a
    model that cannot be traced keeps its BatchNorms.
    """
    if isinstance(model, fx.GraphModule):
        graph = model.graph
    else:
        try:
            graph = trace_sites(model)
        except Exception:  # noqa: BLE001 - untraceable: nothing is fused
            return {}
    modules = dict(model.named_modules())
    found = {}
    for site in sites_of(model):
        if site.attachment != "module":
            continue
        followed = followed_module(model, site)
        dims = known_kind(followed).spatial_dims if followed is not None else 0
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
