"""``pca_wrap``: put a PCA layer after the output of chosen modules.

The model is deep-copied and each chosen module becomes, in place, a module of
a subclass of its own class (``ProjectedLinear`` for ``nn.Linear``) whose
forward runs the module's own forward and then the PCA layer, registered as
the module's child ``pca`` (``features.0.pca``). Every call of the module is
covered, whatever the model's forward does (Python control flow, direct calls
of ``module.forward``), and the copy keeps the model's class, methods and
attributes (``forward_features``, ``generate``, ``num_classes``). ``torch.fx``
is used only to read the forward order (and to leave out chosen modules that
the forward never calls); a model it cannot trace keeps registration order.
A module whose class cannot be swapped is replaced by a ``Projected`` wrapper.

A Linear that the forward never calls as a module but whose weight it passes
to ``F.linear`` (Swin's attention) is followed at those calls: its weight
becomes a ``FollowedWeight`` (``pcasurgery.layers.sites``) that turns
``F.linear(x, module.weight, module.bias)`` into ``module(x)``.

``nn.MultiheadAttention`` never calls its projections as modules (the query,
key and value projections are one packed parameter, and ``out_proj``'s weight
is used directly): where its projections are wanted, it is replaced by a
``SplitAttention`` (``surgery/attention.py``) that computes the same function
with ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` as Linear modules.

``pca_wrap`` records each site it creates on the wrapped model
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
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from .._validation import check_bool, check_module, check_patterns, check_threshold
from ..layers.kinds import KINDS, affine_kind, is_conv1d, kind_of, output_width
from ..layers.offload import execution_device
from ..layers.pca import PCALayer, pca_layer_for
from ..layers.sites import (
    Site,
    copy_sharing,
    follow,
    follow_calls,
    record_sites,
    replace_module,
    trace_sites,
)
from .attention import split_attention

__all__ = ["pca_wrap"]

log = logging.getLogger("pcasurgery")


def _check_targets(targets: object) -> tuple[type, ...]:
    """The target types: classes of the layer kinds (``layers.kinds.KINDS``) or their subclasses;
    a class named ``Conv1D`` (transformers') is accepted as Linear-like."""
    supported = tuple(cls for kind in KINDS for cls in kind.classes)
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
        if not (isinstance(t, type) and (issubclass(t, supported) or t.__name__ == "Conv1D")):
            names = ", ".join(f"nn.{cls.__name__}" for cls in supported)
            raise TypeError(
                f"targets must be layer classes pcasurgery can follow ({names}, or subclasses; "
                f"nn.Linear also selects transformers' Conv1D), got {t!r}"
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
        if _matches(name, include, exclude):
            chosen.append((name, module))
    return chosen


def _matches(name: str, include: list[str] | None, exclude: list[str] | None) -> bool:
    """Whether a module name passes the ``include`` and ``exclude`` globs."""
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return exclude is None or not any(fnmatch.fnmatchcase(name, p) for p in exclude)


_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")  # of a SplitAttention


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
        if size and kind_of(module) is None:
            held[type(module).__name__] = held.get(type(module).__name__, 0) + size
    missed = sum(held.values())
    if total and missed > 0.5 * total:
        ranked = sorted(held.items(), key=lambda item: -item[1])[:5]
        listing = ", ".join(f"{name} ({size / total:.0%})" for name, size in ranked)
        warnings.warn(
            f"{missed / total:.0%} of the model's layer weights sit in modules that no PCA layer "
            f"can follow: {listing}; pcasurgery follows nn.Linear, transformers' Conv1D, "
            "convolutions and transposed convolutions (swap or exclude the others)",
            UserWarning,
            stacklevel=4,
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
            stacklevel=4,
        )
    return [(name, m) for name, m in chosen if name not in tied]


LARGE_BYTES = 1 << 30  # PCA layers holding more than this in all are announced


def layer_bytes(width: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes a PCA layer of ``width`` may hold at most, once calibrated: three float64
    ``width**2`` matrices (the second moments, allocated with the first batch; the
    eigenvectors; the covariance while it is decomposed) and a ``width**2``
    projection in the module's dtype. Layers after widening modules keep only
    ``in`` eigenvectors, and projections onto ``k < width / 2`` directions
    ``k * width`` numbers, so they hold less."""
    return width * width * (3 * 8 + torch.empty((), dtype=dtype).element_size())


def _announce_memory(chosen: list[tuple[str, nn.Module]]) -> None:
    """Warn, before anything is allocated, when the PCA layers will hold more than 1 GiB."""
    sizes = []
    for name, module in chosen:
        weight = getattr(module, "weight", None)
        dtype = (
            weight.dtype
            if isinstance(weight, torch.Tensor) and weight.is_floating_point()
            else torch.float32
        )
        sizes.append((layer_bytes(output_width(module), dtype), name, output_width(module)))
    total = sum(size for size, _, _ in sizes)
    if total > LARGE_BYTES:
        widest = "".join(
            f"\n  - {n}: width {w}, {b / 2**30:.2f} GiB"
            for b, n, w in sorted(sizes, reverse=True)[:5]
        )
        warnings.warn(
            f"the {len(sizes)} PCA layers may hold up to {total / 2**30:.1f} GiB once calibrated "
            f"(width**2 float64 statistics and eigenvectors per layer, allocated by calibration), "
            f"on the device of the modules they follow; "
            f"the widest:{widest}\nexclude wide layers (exclude=...) if that is too much",
            UserWarning,
            stacklevel=4,
        )


def _make_layer(name: str, module: nn.Module, threshold: float, centering: bool, keepdim: bool):
    kind = kind_of(module)
    assert kind is not None  # _select_targets chose it
    layer = pca_layer_for(
        kind.spatial_dims, kind.output_width(module), threshold, centering, keepdim
    )
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        # an offloaded module's weight is on the meta device: its layer goes where it runs
        device = (execution_device(module) or torch.device("cpu")) if weight.is_meta else None
        layer.to(device=device or weight.device, dtype=weight.dtype)
    layer.train(module.training)  # a new layer follows its module's train/eval flag
    layer.name = name
    return layer


def _warn_unreached(names: list[str]) -> None:
    if names:
        listing = "".join(f"\n  - {n}" for n in names)
        warnings.warn(
            f"{len(names)} chosen module(s) are never called as modules, nor their weights "
            "passed to F.linear or another function, in the traced forward (unused, or used "
            "as nn.MultiheadAttention uses out_proj's weight), so they get no PCA layer:"
            f"{listing}",
            UserWarning,
            stacklevel=4,
        )


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
        targets: module types to follow: ``nn.Linear`` (which selects transformers'
            ``Conv1D`` too), ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``,
            ``nn.ConvTranspose1d``/``2d``/``3d``, or subclasses.
            With ``nn.Linear``, an ``nn.MultiheadAttention`` whose projections
            match ``include``/``exclude`` (``"attn.q_proj"``...) is split into
            Linear projections that get PCA layers; the copy computes the same function.
        include: globs on qualified module names (``"layer1.*"``); when given,
            only matching modules are wrapped.
        exclude: globs of modules not to wrap; they win over ``include``.
        centering: centred PCA (True) or uncentred (False).
        keepdim: keep each layer's width (True); False is for analysis only, as
            it changes the shapes the next layers see.

    Returns:
        A deep copy of ``model``, of its class, with its methods and attributes;
        each chosen module is of a subclass of its own class (``ProjectedLinear``)
        whose forward runs the PCA layer (its child ``pca``) after the module's.
        The copy carries the record of its sites (``pcasurgery.layers.sites_of``);
        ``pca_layers_of`` lists its PCA layers in forward order.

    Raises:
        TypeError, ValueError: bad arguments, or no module matches.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> wrapped = pca_wrap(net, 0.95)
        >>> from pcasurgery import pca_layers_of
        >>> list(pca_layers_of(wrapped))
        ['0', '2']
    """
    return _wrap(model, threshold, targets, include, exclude, centering, keepdim, copy.deepcopy)


def pca_wrap_sharing(
    model: nn.Module,
    threshold: float,
    *,
    include: str | Sequence[str] | None = None,
    centering: bool = True,
) -> nn.Module:
    """``pca_wrap`` (Linear and Conv2d targets, keeping the width) whose copy holds
    ``model``'s parameters themselves, not copies (``layers.sites.copy_sharing``): for a
    copy that is calibrated and compressed, never trained nor changed, so that the weights
    are held once (``compress_sequential``'s blocks)."""
    return _wrap(
        model,
        threshold,
        (nn.Linear, nn.Conv2d),
        include,
        None,
        centering,
        True,
        lambda m: copy_sharing(m, m.modules()),
    )


def _wrap(
    model: nn.Module,
    threshold: float,
    targets: type | Iterable[type],
    include: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
    centering: bool,
    keepdim: bool,
    copy_of: Callable[[nn.Module], nn.Module],
) -> nn.Module:
    """``pca_wrap`` on the copy ``copy_of(model)`` makes."""
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

    wrapped = copy_of(model)
    if any(issubclass(nn.Linear, t) for t in types):  # attention whose projections are wanted

        def wanted(name: str) -> bool:
            return any(_matches(f"{name}.{p}", include_p, exclude_p) for p in _PROJECTIONS)

        split_attention(wrapped, wanted)
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
    _announce_memory(chosen)
    layers = {name: _make_layer(name, m, threshold, centering, keepdim) for name, m in chosen}

    order, functional, untraced = _forward_order(wrapped, chosen)
    if untraced is not None:
        log.debug(
            "torch.fx could not trace %s: PCA layers are listed in registration order "
            "rather than forward order (%s)",
            type(model).__name__,
            untraced,
        )
    unreached += [name for name in layers if name not in order]
    _warn_unreached(unreached)
    if not order:
        raise ValueError("none of the chosen modules is called as a module")
    modules = dict(chosen)
    sites = []
    for name in order:
        module = modules[name]
        attached, child, attachment = follow(module, layers[name])
        if attached is not module:  # a Projected wrapper takes the module's place
            replace_module(wrapped, module, attached)
        elif name in functional:
            follow_calls(module)
            attachment = "function"
        follows = f"{name}.module" if attachment == "wrapper" else name
        sites.append(Site(name, f"{name}.{child}", follows, attachment))
    record_sites(wrapped, sites)
    return wrapped


def _forward_order(
    model: nn.Module, chosen: list[tuple[str, nn.Module]]
) -> tuple[list[str], set[str], str | None]:
    """The chosen modules' names in the order the forward uses them, and why not if unknown.

    ``torch.fx`` traces the model symbolically (the chosen modules are leaves).
    A chosen module is used where the trace calls it, or, for a Linear never
    called, where the trace passes its weight to a function (``F.linear``, or a
    function the trace does not enter, as Swin's attention is): those are
    returned apart, as the second item. A chosen module the trace never uses is
    left out. When the model cannot be traced, the order is the registration
    order and the reason is returned.
    """
    try:
        graph = trace_sites(model, (m for _, m in chosen))
    except Exception as err:  # noqa: BLE001 - any tracing failure: keep registration order
        return [name for name, _ in chosen], set(), f"{type(err).__name__}: {err}"
    names = {name for name, _ in chosen}
    position: dict[str, int] = {}
    for i, node in enumerate(graph.nodes):
        if node.op == "call_module" and node.target in names:
            position.setdefault(str(node.target), i)
    weights = {
        f"{name}.weight": name
        for name, m in chosen
        if affine_kind(m) == "linear" and name not in position
    }
    functional = set()
    for i, node in enumerate(graph.nodes):
        if node.op != "call_function":
            continue
        for arg in node.all_input_nodes:
            name = weights.get(str(arg.target)) if arg.op == "get_attr" else None
            if name is not None and name not in position:
                position[name] = i
                functional.add(name)
    return sorted(position, key=position.__getitem__), functional, None
