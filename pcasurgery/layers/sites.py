"""What surgery did, recorded once: the sites where PCA layers sit in a model.

``pca_wrap`` writes one :class:`Site` per PCA layer it creates onto the wrapped
model (the ``pca_sites`` attribute, a tuple in forward order). Everything that
needs to know where a layer sits and what it follows (``pca_layers_of``,
``report``, ``compress``, ``allocate``) reads :func:`sites_of` instead of
working it out again from the graph or from hooks.

Attachments:

* ``"graph"``: the model was rewritten with ``torch.fx``; a call of the PCA
  layer follows every call of the module ``follows`` and is the only reader of
  its output.
* ``"wrapper"``: the model could not be traced; the module was replaced, at
  every place it is registered, by a :class:`Projected` wrapper that runs it and
  then its PCA layer. ``follows`` is the wrapped module (``<name>.module``).
* ``"manual"``: a PCA layer placed by hand; it follows nothing known.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from .pca import PCALayer

__all__ = ["ATTACHMENTS", "Projected", "Site", "sites_of"]

ATTACHMENTS = ("graph", "wrapper", "manual")
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
        attachment: ``"graph"``, ``"wrapper"`` or ``"manual"`` (module docstring).
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
        return self.pca(self.module(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)


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


def clear_sites(model: nn.Module) -> None:
    """Remove the record (from a copy whose PCA layers are gone)."""
    model.__dict__.pop(SITES_ATTRIBUTE, None)
    if isinstance(model, fx.GraphModule):
        model.meta.get(_PRESERVED, {}).pop(SITES_ATTRIBUTE, None)


def _manual_sites(model: nn.Module) -> Iterator[Site]:
    found = [(path, m) for path, m in model.named_modules() if isinstance(m, PCALayer)]
    if isinstance(model, fx.GraphModule):
        position: dict[str, int] = {}
        for i, node in enumerate(model.graph.nodes):
            if node.op == "call_module":
                position.setdefault(str(node.target), i)
        found.sort(key=lambda item: position.get(item[0], len(position) + 1))
    for path, _ in found:
        yield Site(path, path, None, "manual")


def sites_of(model: nn.Module) -> tuple[Site, ...]:
    """The PCA layers' sites in ``model``, in forward order.

    The record ``pca_wrap`` left, or for a model with PCA layers placed by hand,
    one ``"manual"`` site per layer (forward order is the graph's order for a
    ``torch.fx.GraphModule``, registration order otherwise).
    """
    recorded = getattr(model, SITES_ATTRIBUTE, None)
    if isinstance(recorded, tuple):
        return recorded
    return tuple(_manual_sites(model))
