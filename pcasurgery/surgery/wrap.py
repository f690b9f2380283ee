"""``pca_wrap``: put a PCA layer after the output of chosen modules.

The rewrite uses ``torch.fx``: the model is traced (chosen modules are leaves),
a ``call_module`` node of a PCA layer is inserted after each call of a chosen
module, and every user of that output is rewired to read the projection.
Models that ``torch.fx`` cannot trace (data-dependent control flow, say) get the
same layers through forward hooks on the chosen modules, with a warning.

Each PCA layer is registered as a child named ``pca`` of the module it follows
(``features.0.pca``), in both cases, so that state-dict keys stay readable and
the original modules keep their names.

A module called at several places (weight sharing) gets one PCA layer, applied
after every call; its statistics pool all calls. This keeps the projection a
property of the module, which is what compression folds into its weights.
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import fx, nn

from .._validation import check_bool, check_threshold
from ..layers.pca import Conv2DPCALayer, LinearPCALayer, PCALayer

__all__ = ["pca_wrap", "PCATracer"]

SUPPORTED_TARGETS = (nn.Linear, nn.Conv2d)


class PCATracer(fx.Tracer):
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


def _patterns(value: str | Sequence[str] | None, name: str) -> list[str] | None:
    if value is None:
        return None
    patterns = [value] if isinstance(value, str) else list(value)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{name} must be a glob string or a non-empty list of them, got {value!r}")
    return patterns


def _check_targets(targets: object) -> tuple[type, ...]:
    types = (targets,) if isinstance(targets, type) else tuple(targets)  # type: ignore[arg-type]
    for t in types:
        if not (isinstance(t, type) and issubclass(t, SUPPORTED_TARGETS)):
            raise TypeError(
                f"targets must be nn.Linear and/or nn.Conv2d (or subclasses), got {t!r}"
            )
    if not types:
        raise ValueError("targets must name at least one module type, got an empty tuple")
    return types


def select_targets(
    model: nn.Module,
    targets: tuple[type, ...],
    include: list[str] | None,
    exclude: list[str] | None,
) -> list[tuple[str, nn.Module]]:
    """Modules to wrap, in registration order.

    Priority, lowest to highest: the module type must be one of ``targets``; then,
    when ``include`` is given, the qualified name must match one of its globs;
    finally a name matching any ``exclude`` glob is dropped.
    """
    chosen = []
    for name, module in model.named_modules():  # shared modules are listed once
        if not name or not isinstance(module, targets):
            continue
        if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if exclude is not None and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        chosen.append((name, module))
    return chosen


def _make_layer(name: str, module: nn.Module, threshold: float, centering: bool, keepdim: bool):
    if isinstance(module, nn.Conv2d):
        layer: PCALayer = Conv2DPCALayer(
            module.out_channels, threshold, verbose=False, centering=centering, keepdim=keepdim
        )
    else:
        layer = LinearPCALayer(module.out_features, threshold, keepdim=keepdim, centering=centering)
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        layer.to(device=weight.device, dtype=weight.dtype)
    layer.train(module.training)  # a new layer follows its module's train/eval flag
    layer.name = name
    layer.target = name
    return layer


def _attach(module: nn.Module, layer: PCALayer) -> str:
    """Register ``layer`` as a child of ``module``; returns the child's attribute name."""
    child, i = "pca", 0
    while hasattr(module, child):
        i += 1
        child = f"pca_{i}"
    module.add_module(child, layer)
    return child


def _warn_unreached(names: list[str]) -> None:
    if names:
        warnings.warn(
            f"modules {', '.join(names)} are not called as modules (their weights are used by a "
            "parent, as nn.MultiheadAttention does with out_proj); they get no PCA layer",
            UserWarning,
            stacklevel=3,
        )


class ProjectOutput:
    """Forward hook that sends a module's output through its PCA child (picklable)."""

    def __init__(self, child: str):
        self.child = child

    def __call__(self, module: nn.Module, args, output):
        return getattr(module, self.child)(output)


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
        A ``torch.fx.GraphModule`` (or, when tracing fails, a deep copy with
        forward hooks) whose PCA layers are listed by ``pca_layers_of``.

    Raises:
        TypeError, ValueError: bad arguments, or no module matches.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> wrapped = pca_wrap(net, 0.95)
        >>> from pcasurgery import pca_layers_of
        >>> list(pca_layers_of(wrapped))
        ['0', '2']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    threshold = check_threshold(threshold)
    check_bool(centering, "centering")
    check_bool(keepdim, "keepdim")
    types = _check_targets(targets)
    include_p, exclude_p = _patterns(include, "include"), _patterns(exclude, "exclude")
    if any(isinstance(m, PCALayer) for m in model.modules()):
        raise ValueError("model already contains PCA layers; wrap the original model instead")

    wrapped = copy.deepcopy(model)
    chosen = select_targets(wrapped, types, include_p, exclude_p)
    if not chosen:
        raise ValueError(
            f"no module of model matches targets={tuple(t.__name__ for t in types)}, "
            f"include={include!r}, exclude={exclude!r}"
        )
    # nn.MultiheadAttention uses out_proj's weight without calling the module
    attention = {n for n, m in wrapped.named_modules() if isinstance(m, nn.MultiheadAttention)}
    unreached = [name for name, _ in chosen if name.rpartition(".")[0] in attention]
    chosen = [(name, m) for name, m in chosen if name not in unreached]
    layers = {name: _make_layer(name, m, threshold, centering, keepdim) for name, m in chosen}

    try:
        graph = PCATracer(m for _, m in chosen).trace(wrapped)
    except Exception as err:  # noqa: BLE001 - any tracing failure means: use hooks
        _warn_unreached(unreached)
        if not layers:
            raise ValueError("none of the chosen modules is called as a module") from err
        warnings.warn(
            f"torch.fx cannot trace {type(model).__name__} ({type(err).__name__}: {err}); "
            "PCA layers are attached with forward hooks on the chosen modules instead",
            UserWarning,
            stacklevel=2,
        )
        for name, module in chosen:
            module.register_forward_hook(ProjectOutput(_attach(module, layers[name])))
        return wrapped

    called = {node.target for node in graph.nodes if node.op == "call_module"}
    unreached += [name for name in layers if name not in called]
    _warn_unreached(unreached)
    layers = {name: layer for name, layer in layers.items() if name in called}
    if not layers:
        raise ValueError("none of the chosen modules is called as a module in the traced graph")
    gm = fx.GraphModule(wrapped, graph, class_name=type(model).__name__)
    paths = {name: f"{name}.{_attach(gm.get_submodule(name), layers[name])}" for name in layers}
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.target not in paths:
            continue
        with gm.graph.inserting_after(node):
            projected = gm.graph.call_module(paths[node.target], (node,))
        for user in list(node.users):
            if user is not projected:
                user.replace_input_with(node, projected)
    gm.graph.lint()
    gm.recompile()
    gm.training = wrapped.training  # submodules are the copies, with their own flags
    return gm
