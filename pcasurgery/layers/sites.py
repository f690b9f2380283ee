"""What surgery did, recorded once: the sites where PCA layers sit in a model.

``pca_wrap`` writes one :class:`Site` per PCA layer it creates onto the wrapped
model (the ``pca_sites`` attribute, a tuple in forward order). Everything that
needs to know where a layer sits and what it follows (``pca_layers_of``,
``report``, ``compress``, ``allocate``) reads :func:`sites_of` instead of
working it out again from the graph or from hooks.

Attachments:

* ``"module"``: the module's class was swapped for a subclass whose forward
  runs the module's own forward and then its PCA layer (its child ``pca``), as
  ``torch.nn.utils.parametrize`` does for parameters. Every call of the module
  is covered, whatever the model's forward does, and the model keeps its class,
  methods and attributes. ``follows`` is the module itself.
* ``"wrapper"``: a module whose class cannot be swapped (an instance-level
  ``forward``, say) was replaced, at every place it is registered, by a
  :class:`Projected` wrapper that runs it and then its PCA layer. ``follows``
  is the wrapped module (``<name>.module``).
* ``"function"``: as ``"module"``, for a Linear that the model never calls as a
  module but whose weight it passes to ``F.linear`` (Swin's attention does
  ``F.linear(x, self.qkv.weight, self.qkv.bias)``): the weight is a
  :class:`FollowedWeight`, which turns every such call into a call of the
  module, wherever in the model it happens.
* ``"manual"``: a PCA layer placed by hand; it follows nothing known.

Inside ``pcasurgery.folded(model)``, an eval-mode module followed by its PCA
layer runs folded: one call of the module with the projection multiplied into
its weights (``pcasurgery.layers.folding``).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .folding import folded_forward
from .pca import PCALayer

__all__ = [
    "ATTACHMENTS",
    "FollowedWeight",
    "Projected",
    "Site",
    "SiteTracer",
    "copy_sharing",
    "follow",
    "follow_calls",
    "replace_module",
    "sites_of",
    "trace_sites",
    "unfollow",
]

ATTACHMENTS = ("module", "function", "wrapper", "manual")
SITES_ATTRIBUTE = "pca_sites"


@dataclass(frozen=True)
class Site:
    """One PCA layer's place in a model.

    Attributes:
        name: the layer's name: the qualified name of the module it follows in
            the original model (``"layer1.0.conv1"``), or for a layer placed by
            hand its own qualified name.
        layer_path: where the PCA layer is registered in the model.
        follows: qualified name of the module whose output it projects directly,
            or None when it follows nothing known (placed by hand).
        attachment: ``"module"``, ``"function"``, ``"wrapper"`` or ``"manual"``
            (module docstring).
    """

    name: str
    layer_path: str
    follows: str | None
    attachment: str


class Projected(nn.Module):
    """A module followed by its PCA layer: ``pca(module(*args, **kwargs))``.

    What ``pca_wrap`` puts in place of a module when the model cannot be traced.
    Attributes it does not have itself (``weight``, ``in_features``, ...) are
    read from the wrapped module, so code that inspects the layer keeps working.
    Checkpoints saved before the wrapper existed (``name.weight`` rather than
    ``name.module.weight``) load into it.
    """

    def __init__(self, module: nn.Module, pca: PCALayer):
        super().__init__()
        self.module = module
        self.pca = pca
        self._register_load_state_dict_pre_hook(_wrapped_keys, with_module=True)
        # PyTorch's fused fast paths (nn.TransformerEncoderLayer in inference, say) read
        # their children's weights instead of calling them unless some submodule has a
        # forward hook: this no-op hook says that calls of this module are observed.
        self.register_forward_pre_hook(_observed)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = folded_forward(self.module, self.pca, args, kwargs)
        return self.pca(self.module(*args, **kwargs)) if out is None else out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)


class _Followed:
    """Mixin of the classes :func:`follow` swaps in: the module's forward, then its PCA layer."""

    _pcasurgery_base: type[nn.Module]
    _modules: dict[str, nn.Module]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        pca = self._modules[self.__dict__[_CHILD]]
        assert isinstance(pca, PCALayer)
        source = pca.collecting_through()  # calibration: see through.py
        if source is not None:
            source.add(args, kwargs)
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        out = folded_forward(self, pca, args, kwargs)  # type: ignore[arg-type]
        return pca(super().forward(*args, **kwargs)) if out is None else out  # type: ignore[misc]

    def __reduce_ex__(self, protocol: Any) -> Any:
        # the swapped class is made at run time: pickle the base class and rebuild it
        return (_rebuild_followed, (self._pcasurgery_base,), dict(self.__dict__))


_CHILD = "_pcasurgery_child"  # instance attribute: the name of the PCA layer's child
_FOLLOWED_CLASSES: dict[type, type] = {}


def _followed_class(base: type[nn.Module]) -> type[nn.Module]:
    cls = _FOLLOWED_CLASSES.get(base)
    if cls is None:
        cls = type(f"Projected{base.__name__}", (_Followed, base), {"_pcasurgery_base": base})
        cls.__module__ = __name__
        _FOLLOWED_CLASSES[base] = cls
    return cls


def fold_pairs(model: nn.Module) -> list[tuple[nn.Module, PCALayer]]:
    """The ``(module, PCA layer)`` pairs whose calls can run folded (``layers.folding``).

    A swapped module and its PCA child, or a :class:`Projected` wrapper's module
    and layer: the pairs whose forwards call ``folded_forward``.
    """
    pairs: list[tuple[nn.Module, PCALayer]] = []
    for module in model.modules():
        if isinstance(module, Projected):
            pairs.append((module.module, module.pca))
        elif isinstance(module, _Followed):
            pca = module._modules[module.__dict__[_CHILD]]
            assert isinstance(pca, PCALayer)
            pairs.append((module, pca))
    return pairs


def _rebuild_followed(base: type[nn.Module]) -> nn.Module:
    cls = _followed_class(base)
    return cls.__new__(cls)


def follow(module: nn.Module, pca: PCALayer) -> tuple[nn.Module, str, str]:
    """Make ``module`` run ``pca`` after its own forward, at every place it is registered.

    The module's class is swapped for a subclass (``ProjectedLinear``, say) and
    ``pca`` becomes its child ``pca`` (``pca_1``, ... if that name is taken).
    Where the class cannot be swapped, a :class:`Projected` wrapper is returned
    instead, to be registered in the module's place.

    Returns:
        ``(module to register, PCA layer's path relative to it, attachment)``.
    """
    base = type(module)
    if isinstance(module, _Followed) or "forward" in module.__dict__:
        return _wrapper(module, pca)
    child, i = "pca", 0
    while hasattr(module, child):
        i += 1
        child = f"pca_{i}"
    try:
        module.__class__ = _followed_class(base)
    except TypeError:  # an incompatible layout (__slots__, a C++ class)
        return _wrapper(module, pca)
    module.__dict__[_CHILD] = child
    module.add_module(child, pca)
    # see Projected.__init__: calls of the module must not be bypassed by fast paths
    module.register_forward_pre_hook(_observed)
    return module, child, "module"


_MODULE = "_pcasurgery_module"  # a FollowedWeight's attribute: the module it is the weight of
_OWN_CALL: ContextVar[object] = ContextVar("pcasurgery_own_call", default=None)


class FollowedWeight(nn.Parameter):
    """The weight of a followed Linear that the model uses through ``F.linear``.

    ``F.linear(x, module.weight, module.bias)`` anywhere becomes ``module(x)``,
    which runs the module's PCA layer (collecting, projecting or folded) after
    the same map; with another bias, the PCA layer runs after that call. Every other use is that of a plain ``nn.Parameter``, and so
    are the results of every operation on it (``state_dict`` holds plain
    tensors). Deep copies follow the copy of their module; pickles rebuild it.
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and isinstance(args[1], FollowedWeight):
            module = args[1].__dict__.get(_MODULE)
            if (
                isinstance(module, _Followed)
                and _OWN_CALL.get() is not module
                and module.weight is args[1]
            ):
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                token = _OWN_CALL.set(module)  # the F.linear calls below run plainly
                try:
                    if bias is module.bias:
                        return module(args[0])  # folded in eval
                    # another bias (Swin V2 zeroes the key's): the map, then the layer;
                    # compress cannot fold the layer into a bias the model changes
                    pca = module._modules[module.__dict__[_CHILD]]
                    assert isinstance(pca, PCALayer)
                    pca.note_other_bias()
                    return pca(F.linear(*args, **kwargs))
                finally:
                    _OWN_CALL.reset(token)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> FollowedWeight:
        if id(self) in memo:
            return memo[id(self)]
        result = FollowedWeight(
            self.data.clone(memory_format=torch.preserve_format), self.requires_grad
        )
        memo[id(self)] = result
        module = self.__dict__.get(_MODULE)
        if module is not None:
            result.__dict__[_MODULE] = copy.deepcopy(module, memo)
        return result

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (_rebuild_weight, (self.data, self.requires_grad, self.__dict__.get(_MODULE)))


def _rebuild_weight(data: Tensor, requires_grad: bool, module: nn.Module | None) -> FollowedWeight:
    weight = FollowedWeight(data, requires_grad)
    if module is not None:
        weight.__dict__[_MODULE] = module
    return weight


def follow_calls(module: nn.Module) -> None:
    """Make ``F.linear`` on ``module``'s weight (and bias) a call of ``module`` (already followed)."""
    weight = module.weight
    assert isinstance(weight, nn.Parameter)
    followed = FollowedWeight(weight.data, weight.requires_grad)
    followed.__dict__[_MODULE] = module
    module._parameters["weight"] = followed


def _plain_weight(module: nn.Module) -> None:
    weight = module._parameters.get("weight")
    if isinstance(weight, FollowedWeight):
        module._parameters["weight"] = nn.Parameter(weight.data, weight.requires_grad)


def _wrapper(module: nn.Module, pca: PCALayer) -> tuple[nn.Module, str, str]:
    wrapper = Projected(module, pca)
    wrapper.train(module.training)
    return wrapper, "pca", "wrapper"


def copy_sharing(
    model: nn.Module, modules: Iterable[nn.Module], memo: dict | None = None
) -> nn.Module:
    """A deep copy of ``model`` in which the copies of ``modules`` hold their parameters
    themselves, not copies: for modules that the copy only reads and then drops (replaced
    by smaller ones, say), so that their weights are not held twice meanwhile.

    A parameter that another module holds too (tied), one on ``meta`` (nothing to copy)
    and a ``FollowedWeight`` (bound to its module) are copied as usual. ``memo``: more of
    ``copy.deepcopy``'s (objects the copy shares)."""
    memo = {} if memo is None else dict(memo)
    held = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for module in modules:
        for p in module.parameters(recurse=False):
            if held[id(p)] == 1 and p.device.type != "meta" and type(p) is nn.Parameter:
                memo[id(p)] = p
    return copy.deepcopy(model, memo)


def replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is registered in ``root`` (every parent and attribute)."""
    for _, parent in list(root.named_modules(remove_duplicate=False)):
        for child, m in list(parent._modules.items()):
            if m is old:
                setattr(parent, child, new)


def unfollow(module: nn.Module) -> nn.Module:
    """The module without its PCA layer: a swapped module gets its class back (in place)."""
    if isinstance(module, Projected):
        return module.module
    if isinstance(module, _Followed):
        _plain_weight(module)
        del module._modules[module.__dict__.pop(_CHILD)]
        for key, hook in list(module._forward_pre_hooks.items()):
            if hook is _observed:
                del module._forward_pre_hooks[key]
        module.__class__ = module._pcasurgery_base
    return module


def _observed(module: nn.Module, args: Any) -> None:
    """A forward pre-hook that does nothing (see ``Projected.__init__``)."""
    return None


def _wrapped_keys(module: Projected, state_dict, prefix, *args) -> None:
    """Map ``prefix + key`` of the bare module onto ``prefix + "module." + key``."""
    own = {prefix + "module.", prefix + "pca."}
    for key in list(state_dict):
        if key.startswith(prefix) and not any(key.startswith(p) for p in own):
            rest = key[len(prefix) :]
            if "." not in rest or rest.split(".", 1)[0] in module.module._modules:
                state_dict[prefix + "module." + rest] = state_dict.pop(key)


class SiteTracer(fx.Tracer):
    """An ``fx.Tracer`` whose leaves are PCA layers, the modules they follow and ``leaves``.

    ``torch.nn`` modules are leaves as usual, except those that hold one of
    ``leaves`` or a followed module (an ``nn.TransformerEncoderLayer`` whose
    ``linear1`` is chosen, say): the trace goes through them.
    """

    def __init__(self, leaves: Iterable[nn.Module] = ()):
        super().__init__()
        self._leaves = {id(m) for m in leaves}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (PCALayer, Projected, _Followed)) or id(m) in self._leaves:
            return True
        if any(isinstance(c, (Projected, _Followed)) or id(c) in self._leaves for c in m.modules()):
            return False
        return super().is_leaf_module(m, module_qualified_name)


def trace_sites(model: nn.Module, leaves: Iterable[nn.Module] = ()) -> fx.Graph:
    """The ``torch.fx`` graph of ``model`` traced by a :class:`SiteTracer` with ``leaves``.

    The tracer is emptied after: its patched functions and graph form reference
    cycles that, holding ``model``, would keep a wrapped model's statistics alive
    until Python's cycle collector runs (a block's worth of memory per call in a
    block-by-block compression).
    """
    tracer = SiteTracer(leaves)
    try:
        return tracer.trace(model)
    finally:
        tracer.__dict__.clear()


# GraphModule.__deepcopy__ rebuilds the module and keeps only the attributes
# listed under this key of its ``meta`` (pickling keeps ``__dict__`` as is).
_PRESERVED = getattr(
    fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes"
)


def record_sites(model: nn.Module, sites: list[Site]) -> None:
    """Write the record of what surgery did onto ``model`` (``pca_wrap`` only)."""
    record = tuple(sites)
    setattr(model, SITES_ATTRIBUTE, record)
    if isinstance(model, fx.GraphModule):
        model.meta.setdefault(_PRESERVED, {})[SITES_ATTRIBUTE] = record


def _records(model: nn.Module) -> list[tuple[str, nn.Module, tuple[Site, ...]]]:
    """``(prefix, module, record)`` for ``model``'s own record, or else for each wrapped model
    it holds (``nn.Sequential(wrapped, head)``, ``nn.DataParallel(wrapped)``)."""
    own = getattr(model, SITES_ATTRIBUTE, None)
    if isinstance(own, tuple):
        return [("", model, own)]
    found: list[tuple[str, nn.Module, tuple[Site, ...]]] = []
    for name, module in model.named_modules():
        record = getattr(module, SITES_ATTRIBUTE, None) if name else None
        if isinstance(record, tuple) and not any(name.startswith(f"{p}.") for p, *_ in found):
            found.append((name, module, record))
    return found


def clear_sites(model: nn.Module) -> None:
    """Remove the record (from a copy whose PCA layers are gone), and those of the models it holds."""
    for _, module, _ in _records(model):
        module.__dict__.pop(SITES_ATTRIBUTE, None)
        if isinstance(module, fx.GraphModule):
            module.meta.get(_PRESERVED, {}).pop(SITES_ATTRIBUTE, None)


def _manual_sites(model: nn.Module, covered: Collection[str] = ()) -> Iterator[Site]:
    found = [
        (path, m)
        for path, m in model.named_modules()
        if isinstance(m, PCALayer) and path not in covered
    ]
    if isinstance(model, fx.GraphModule):
        position: dict[str, int] = {}
        for i, node in enumerate(model.graph.nodes):
            if node.op == "call_module":
                position.setdefault(str(node.target), i)
        found.sort(key=lambda item: position.get(item[0], len(position) + 1))
    for path, _ in found:
        yield Site(path, path, None, "manual")


def _prefixed(site: Site, prefix: str) -> Site:
    def name(path: str | None) -> str | None:
        return None if path is None else f"{prefix}.{path}"

    return Site(
        f"{prefix}.{site.name}", f"{prefix}.{site.layer_path}", name(site.follows), site.attachment
    )


def sites_of(model: nn.Module) -> tuple[Site, ...]:
    """The PCA layers' sites in ``model``, in forward order.

    The record ``pca_wrap`` left. For a model that holds wrapped models (a
    container, ``nn.DataParallel``), their records, with names and paths
    prefixed by where each sits (``"0.fc"``, ``"module.fc"``), in registration
    order. A PCA layer no record covers (placed by hand) has a ``"manual"`` site
    (forward order is the graph's order for a ``torch.fx.GraphModule``,
    registration order otherwise).
    """
    records = _records(model)
    if records and records[0][0] == "":
        return records[0][2]
    sites = [_prefixed(site, prefix) for prefix, _, record in records for site in record]
    covered = {site.layer_path for site in sites}
    return tuple(sites) + tuple(_manual_sites(model, covered))
