"""``pca_wrap``: put a PCA layer after the output of chosen modules.

The rewrite uses ``torch.fx``: the model is traced (chosen modules are leaves),
a ``call_module`` node of a PCA layer is inserted after each call of a chosen
module, and every user of that output is rewired to read the projection; the
PCA layer is registered as a child named ``pca`` of the module it follows
(``features.0.pca``). Models that ``torch.fx`` cannot trace (data-dependent
control flow, say) are wrapped at module level instead: each chosen module is
replaced, wherever it is registered, by a ``Projected`` wrapper (the module,
then its PCA layer, again at ``features.0.pca``).

Either way ``pca_wrap`` records each site it creates on the wrapped model
(``pcasurgery.layers.sites``), and every later step reads that record.

A module called at several places (weight sharing) gets one PCA layer, applied
after every call; its statistics pool all calls. This keeps the projection a
property of the module, which is what compression folds into its weights.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import fx, nn

from .._validation import check_bool, check_module, check_patterns, check_threshold
from ..layers.kinds import is_conv1d, linear_like, output_width
from ..layers.pca import Conv2DPCALayer, LinearPCALayer, PCALayer
from ..layers.sites import Projected, Site, record_sites

__all__ = ["pca_wrap"]

log = logging.getLogger("pcasurgery")

SUPPORTED_TARGETS = (nn.Linear, nn.Conv2d)


class _PCATracer(fx.Tracer):
    """An ``fx.Tracer`` that keeps PCA layers (and any extra modules given) as leaves."""

    def __init__(self, leaves: Iterable[nn.Module] = ()):
        super().__init__()
        self._leaves = {id(m) for m in leaves}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            isinstance(m, PCALayer)
            or id(m) in self._leaves
            or super().is_leaf_module(m, module_qualified_name)
        )


def _check_targets(targets: object) -> tuple[type, ...]:
    """The target types; a class named ``Conv1D`` (transformers') is accepted as Linear-like."""
    if isinstance(targets, type):
        types: tuple = (targets,)
    elif isinstance(targets, (tuple, list, set, frozenset)):
        types = tuple(targets)
    else:
        raise TypeError(
            "targets must be a module class or a tuple of them, such as "
            f"(nn.Linear, nn.Conv2d); got {targets!r}"
        )
    for t in types:
        if not (
            isinstance(t, type) and (issubclass(t, SUPPORTED_TARGETS) or t.__name__ == "Conv1D")
        ):
            raise TypeError(
                "targets must be nn.Linear and/or nn.Conv2d (or subclasses; nn.Linear also "
                f"selects transformers' Conv1D), got {t!r}"
            )
    if not types:
        raise ValueError("targets must name at least one module type, got an empty tuple")
    return types


def _select_targets(
    model: nn.Module,
    targets: tuple[type, ...],
    include: list[str] | None,
    exclude: list[str] | None,
) -> list[tuple[str, nn.Module]]:
    """Modules to wrap, in registration order.

    Priority, lowest to highest: the module type must be one of ``targets``
    (``nn.Linear`` also selects transformers' ``Conv1D``); then, when ``include``
    is given, the qualified name must match one of its globs; finally a name
    matching any ``exclude`` glob is dropped.
    """
    conv1d = any(issubclass(t, nn.Linear) or t.__name__ == "Conv1D" for t in targets)
    chosen: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():  # shared modules are listed once
        chosen_type = any(isinstance(module, t) for t in targets) or (conv1d and is_conv1d(module))
        if not name or not chosen_type:
            continue
        if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if exclude is not None and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        chosen.append((name, module))
    return chosen


def _warn_coverage(model: nn.Module) -> None:
    """Warn when most of the model's layer weights sit in modules no PCA layer can follow.

    Layer weights are the matrices and kernels (parameters of two or more
    dimensions) of every module but embeddings. Those of Linear, Conv1D and
    Conv2d modules can be followed (whether ``targets``/``include`` choose them
    is the user's call); those of other modules (``nn.MultiheadAttention``'s
    packed input projection, custom projections) cannot, and a model made of
    them would otherwise be wrapped almost nowhere, silently.
    """
    held: dict[str, int] = {}
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            continue
        size = sum(p.numel() for p in module._parameters.values() if p is not None and p.dim() >= 2)
        total += size
        if size and not (linear_like(module) or isinstance(module, nn.Conv2d)):
            held[type(module).__name__] = held.get(type(module).__name__, 0) + size
    missed = sum(held.values())
    if total and missed > 0.5 * total:
        ranked = sorted(held.items(), key=lambda item: -item[1])[:5]
        listing = ", ".join(f"{name} ({size / total:.0%})" for name, size in ranked)
        warnings.warn(
            f"{missed / total:.0%} of the model's layer weights sit in modules that no PCA layer "
            f"can follow: {listing}; pcasurgery follows nn.Linear, transformers' Conv1D and "
            "nn.Conv2d modules (swap or exclude the others)",
            UserWarning,
            stacklevel=3,
        )


def _without_tied(
    model: nn.Module, chosen: list[tuple[str, nn.Module]]
) -> list[tuple[str, nn.Module]]:
    """Drop (with a warning) chosen modules whose parameters another module also holds.

    An output layer that shares the embedding matrix (GPT-2's ``lm_head``, say)
    cannot be compressed without untying, and so duplicating, that matrix: it
    gets no PCA layer, and the model keeps its tie and its size.
    """
    holders: dict[int, list[nn.Module]] = {}  # parameter -> the modules holding it
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                holders.setdefault(id(param), []).append(module)
    names = {id(m): n for n, m in model.named_modules()}
    tied: dict[str, list[str]] = {}
    for name, module in chosen:
        others = {
            names[id(other)]
            for param in module._parameters.values()
            if param is not None
            for other in holders[id(param)]
            if other is not module
        }
        if others:
            tied[name] = sorted(others)
    if tied:
        listing = "".join(
            f"\n  - {n} (shares a parameter with {', '.join(o)})" for n, o in tied.items()
        )
        warnings.warn(
            f"{len(tied)} chosen module(s) share their weights with other modules (tied "
            "embeddings, say); they get no PCA layer, so that compression never unties and "
            f"duplicates them:{listing}",
            UserWarning,
            stacklevel=3,
        )
    return [(name, m) for name, m in chosen if name not in tied]


def _make_layer(name: str, module: nn.Module, threshold: float, centering: bool, keepdim: bool):
    width = output_width(module)
    if isinstance(module, nn.Conv2d):
        layer: PCALayer = Conv2DPCALayer(
            width, threshold, verbose=False, centering=centering, keepdim=keepdim
        )
    else:
        layer = LinearPCALayer(width, threshold, keepdim=keepdim, centering=centering)
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        layer.to(device=weight.device, dtype=weight.dtype)
    layer.train(module.training)  # a new layer follows its module's train/eval flag
    layer.name = name
    return layer


def _warn_unreached(names: list[str]) -> None:
    if names:
        listing = "".join(f"\n  - {n}" for n in names)
        warnings.warn(
            f"{len(names)} chosen module(s) are never called as modules (a parent uses their "
            "weights directly, as nn.MultiheadAttention does with out_proj), so they get no "
            f"PCA layer:{listing}",
            UserWarning,
            stacklevel=3,
        )


def _registrations(root: nn.Module, module: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every ``(parent, attribute)`` under which ``module`` is registered in ``root``."""
    return [
        (parent, child)
        for _, parent in root.named_modules(remove_duplicate=False)
        for child, m in parent._modules.items()
        if m is module
    ]


def pca_wrap(
    model: nn.Module,
    threshold: float = 0.99,
    *,
    targets: type | Iterable[type] = (nn.Linear, nn.Conv2d),
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    centering: bool = True,
    keepdim: bool = True,
) -> nn.Module:
    """Return a copy of ``model`` with a PCA layer after the output of every chosen module.

    The input model and its parameters are not modified. Until the PCA layers
    are calibrated the wrapped model computes exactly the original function.

    Args:
        model: the network.
        threshold: fraction of variance each PCA layer keeps, in (0, 1].
        targets: module types to follow (``nn.Linear``, ``nn.Conv2d`` or subclasses).
        include: globs on qualified module names (``"layer1.*"``); when given,
            only matching modules are wrapped.
        exclude: globs of modules not to wrap; they win over ``include``.
        centering: centred PCA (True) or uncentred (False).
        keepdim: keep each layer's width (True); False is for analysis only, as
            it changes the shapes the next layers see.

    Returns:
        A ``torch.fx.GraphModule`` (or, when tracing fails, a deep copy of the
        model whose chosen modules are ``Projected`` wrappers), with the record
        of its sites (``pcasurgery.layers.sites_of``); ``pca_layers_of`` lists
        its PCA layers.

    Raises:
        TypeError, ValueError: bad arguments, or no module matches.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> wrapped = pca_wrap(net, 0.95)
        >>> from pcasurgery import pca_layers_of
        >>> list(pca_layers_of(wrapped))
        ['0', '2']
    """
    check_module(model)
    threshold = check_threshold(threshold)
    check_bool(centering, "centering")
    check_bool(keepdim, "keepdim")
    types = _check_targets(targets)
    include_p, exclude_p = check_patterns(include, "include"), check_patterns(exclude, "exclude")
    if any(isinstance(m, PCALayer) for m in model.modules()):
        raise ValueError("model already contains PCA layers; wrap the original model instead")
    if isinstance(model, types):
        raise ValueError(
            f"model is itself a {type(model).__name__}: pca_wrap puts PCA layers after modules "
            "inside a model and returns that model; wrap a container instead, e.g. "
            "pca_wrap(nn.Sequential(model))"
        )

    wrapped = copy.deepcopy(model)
    chosen = _select_targets(wrapped, types, include_p, exclude_p)
    if not chosen:
        raise ValueError(
            f"no module of model matches targets={tuple(t.__name__ for t in types)}, "
            f"include={include!r}, exclude={exclude!r}"
        )
    _warn_coverage(wrapped)
    chosen = _without_tied(wrapped, chosen)
    if not chosen:
        raise ValueError(
            "every chosen module shares its weight with another module (see the warning)"
        )
    # nn.MultiheadAttention uses out_proj's weight without calling the module
    attention = {n for n, m in wrapped.named_modules() if isinstance(m, nn.MultiheadAttention)}
    unreached = [name for name, _ in chosen if name.rpartition(".")[0] in attention]
    chosen = [(name, m) for name, m in chosen if name not in unreached]
    layers = {name: _make_layer(name, m, threshold, centering, keepdim) for name, m in chosen}

    try:
        graph = _PCATracer(m for _, m in chosen).trace(wrapped)
    except Exception as err:  # noqa: BLE001 - any tracing failure means: wrap modules instead
        log.debug("torch.fx could not trace %s", type(model).__name__, exc_info=True)
        _warn_unreached(unreached)
        if not layers:
            raise ValueError("none of the chosen modules is called as a module") from err
        warnings.warn(
            f"torch.fx cannot trace {type(model).__name__} (its forward has Python control "
            "flow or operations on values), so pcasurgery wrapped the chosen modules "
            "themselves: each is replaced by the module followed by its PCA layer. Every call "
            "of those modules is covered, whatever the forward does; the model keeps its class "
            "and methods. (The tracer's error is logged at debug level on the 'pcasurgery' "
            "logger.)",
            UserWarning,
            stacklevel=2,
        )
        return _wrap_modules(wrapped, chosen, layers)
    return _rewrite_graph(model, wrapped, graph, layers, unreached)


def _wrap_modules(
    wrapped: nn.Module, chosen: list[tuple[str, nn.Module]], layers: dict[str, PCALayer]
) -> nn.Module:
    """Replace every chosen module, wherever it is registered, by ``Projected(module, layer)``."""
    sites = []
    for name, module in chosen:
        wrapper = Projected(module, layers[name])
        wrapper.train(module.training)
        for parent, child in _registrations(wrapped, module):
            setattr(parent, child, wrapper)
        sites.append(Site(name, f"{name}.pca", f"{name}.module", "wrapper"))
    record_sites(wrapped, sites)
    return wrapped


def _rewrite_graph(
    model: nn.Module,
    wrapped: nn.Module,
    graph: fx.Graph,
    layers: dict[str, PCALayer],
    unreached: list[str],
) -> fx.GraphModule:
    """Insert a call of each PCA layer after every call of its module and rewire the users."""
    order: list[str] = []
    for node in graph.nodes:
        if node.op == "call_module" and node.target in layers and node.target not in order:
            order.append(str(node.target))
    unreached += [name for name in layers if name not in order]
    _warn_unreached(unreached)
    if not order:
        raise ValueError("none of the chosen modules is called as a module in the traced graph")
    gm = fx.GraphModule(wrapped, graph, class_name=type(model).__name__)
    paths = {}
    for name in order:
        module = gm.get_submodule(name)
        child, i = "pca", 0
        while hasattr(module, child):
            i += 1
            child = f"pca_{i}"
        module.add_module(child, layers[name])
        paths[name] = f"{name}.{child}"
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.target not in paths:
            continue
        with gm.graph.inserting_after(node):
            projected = gm.graph.call_module(paths[str(node.target)], (node,))
        for user in list(node.users):
            if user is not projected:
                user.replace_input_with(node, projected)
    gm.graph.lint()
    gm.recompile()
    gm.training = wrapped.training  # submodules are the copies, with their own flags
    record_sites(gm, [Site(name, paths[name], name, "graph") for name in order])
    return gm
