"""Compressed models as checkpoints: the record of what compression replaced, and its loader.

This file needs torch (and, for transformers models, transformers) and nothing
else: ``save_pretrained`` of a compressed transformers model copies it beside
the weights, so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

loads the compressed model where pcasurgery is not installed. It is part of
pcasurgery too, which builds its compressed models with the same classes.

The record (``config.pcasurgery`` in a checkpoint folder, the ``pcasurgery``
entry of a safetensors file's metadata) names each module path compression
replaced and what is there now, in plain terms::

    {"format": 1, "architecture": "LlamaForCausalLM",
     "modules": {"model.layers.0.mlp.up_proj":
                     {"type": "LowRank", "children": [
                         {"type": "Linear", "args": {"in_features": 576, "out_features": 201,
                                                     "bias": true}},
                         {"type": "Linear", "args": {"in_features": 201, "out_features": 1536,
                                                     "bias": true}}]},
                 "model.layers.0.input_layernorm": ...}}

A ``type`` is ``LowRank``, ``Sequential`` (with ``children``), ``Identity``,
one of torch's Linear, Conv and ConvTranspose classes (with the constructor's
``args``), ``original``: the module the architecture itself builds at that
path (a module followed by a standalone projection keeps its own class), or a
container registered with :func:`register` (built from the architecture's
module, then its named ``children`` put in place; pcasurgery registers its
``SplitAttention``). Only these names are read, so a record cannot make the
loader import or run anything else. The loader builds the architecture, puts the recorded modules
in place, then loads the weights; with transformers >= 5 (which builds models
on the ``meta`` device) no dense weight is ever allocated.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

FORMAT = 1
RECORD = "_pcasurgery_replaced"  # the root's attribute: the module paths compression replaced

_LAYERS = {
    cls.__name__: cls
    for cls in (
        nn.Linear,
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.ConvTranspose1d,
        nn.ConvTranspose2d,
        nn.ConvTranspose3d,
    )
}
_NOT_ARGS = ("self", "device", "dtype")


class LowRank(nn.Sequential):
    """A factorised layer: ``down`` (``k`` outputs) then ``up`` (``k -> width``).

    It runs as the two small layers, and reads like the layer it replaces:
    ``weight`` and ``bias`` give the dense equivalent (for code that inspects
    its children, as ``nn.TransformerEncoderLayer`` and T5's feed-forward do),
    and the geometry attributes (``in_features``/``out_features``,
    ``in_channels``, ``kernel_size``, ...) are those of the whole map.
    ``down`` is a Linear, convolution or transposed convolution; ``up`` is a
    Linear or a 1x1 convolution.
    """

    def __init__(self, down: nn.Module, up: nn.Module):
        super().__init__(down, up)

    def _parts(self) -> tuple[Any, Any]:
        return self[0], self[1]

    @property
    def rank(self) -> int:
        """``k``, the width between the two layers."""
        up: Any = self[1]
        return int(up.weight.shape[1])

    @property
    def weight(self) -> Tensor:
        """The dense weight of the composed map (computed, not a parameter)."""
        down, up = self._parts()
        u = up.weight.reshape(up.weight.shape[0], -1)  # (width, k)
        transposed = isinstance(down, nn.modules.conv._ConvTransposeNd)
        w = down.weight.transpose(0, 1) if transposed else down.weight  # (k, fan-in, *kernel)
        dense = (u @ w.reshape(w.shape[0], -1)).reshape(u.shape[0], *w.shape[1:])
        return dense.transpose(0, 1) if transposed else dense

    @property
    def bias(self) -> Tensor:
        """The bias of the composed map."""
        down, up = self._parts()
        u = up.weight.reshape(up.weight.shape[0], -1)
        down_bias = down.bias if down.bias is not None else u.new_zeros(u.shape[1])
        up_bias = up.bias if up.bias is not None else u.new_zeros(u.shape[0])
        return u @ down_bias + up_bias

    def __getattr__(self, name: str):
        if name in ("out_features", "out_channels"):
            return getattr(self[1], name)
        if name in (
            "in_features",
            "in_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "groups",
            "padding_mode",
            "output_padding",
        ):
            return getattr(self[0], name)
        return super().__getattr__(name)


# ------------------------------------------------------------------ record
_CONTAINERS: dict[str, tuple[type, Callable[[Any], nn.Module]]] = {}


def register(cls: type, from_original: Callable[[Any], nn.Module]) -> None:
    """Record modules of class ``cls`` by their named children; a loader builds one with
    ``from_original(the architecture's module)``, then puts the recorded children in it."""
    _CONTAINERS[cls.__name__] = (cls, from_original)


def describe(module: nn.Module) -> dict[str, Any]:
    """The record of one module compression put in place (see the module docstring)."""
    if isinstance(module, nn.Sequential) and type(module) in (LowRank, nn.Sequential):
        children = [describe(child) for child in module]
        return {"type": type(module).__name__, "children": children}
    if _CONTAINERS.get(type(module).__name__, (None,))[0] is type(module):
        named = {name: describe(child) for name, child in module.named_children()}
        return {"type": type(module).__name__, "children": named}
    if type(module) is nn.Identity:
        return {"type": "Identity"}
    if _LAYERS.get(type(module).__name__) is type(module):
        names = inspect.signature(type(module).__init__).parameters
        args = {name: getattr(module, name) for name in names if name not in _NOT_ARGS}
        args["bias"] = getattr(module, "bias", None) is not None
        return {"type": type(module).__name__, "args": args}
    return {"type": "original"}


def build(spec: dict[str, Any], original: nn.Module | None) -> nn.Module:
    """The module a record describes, ``original`` standing for the architecture's own.

    Built in torch's current default dtype and device (a loader sets them).
    """
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "original":
        if original is None:
            raise ValueError("the record names the architecture's own module where it has none")
        return original
    if kind in ("LowRank", "Sequential"):
        children = [build(child, original) for child in spec.get("children", ())]
        return LowRank(*children) if kind == "LowRank" else nn.Sequential(*children)
    if kind == "Identity":
        return nn.Identity()
    if kind in _CONTAINERS:
        if original is None:
            raise ValueError(
                f"the record builds a {kind} from the architecture's module where it has none"
            )
        container = _CONTAINERS[kind][1](original)
        for name, child in spec.get("children", {}).items():
            setattr(container, name, build(child, getattr(container, name, None)))
        return container
    if kind in _LAYERS:
        return _LAYERS[kind](**spec.get("args", {}))
    allowed = ["LowRank", "Sequential", "Identity", "original", *_LAYERS, *_CONTAINERS]
    raise ValueError(f"a compressed module's record has type {kind!r}; allowed: {allowed}")


def replaced(root: nn.Module) -> tuple[str, ...]:
    """The module paths compression replaced in ``root`` (none for a model never compressed)."""
    return tuple(root.__dict__.get(RECORD, ()))


def record(root: nn.Module, architecture: str | None = None) -> dict[str, Any]:
    """The record of ``root``: every replaced path (of compressed models it holds too) and
    what is there now."""
    modules = {}
    for prefix, module in root.named_modules():
        for path in replaced(module):
            path = f"{prefix}.{path}" if prefix else path
            modules[path] = describe(root.get_submodule(path))
    return {
        "format": FORMAT,
        "architecture": architecture or type(root).__name__,
        "modules": modules,
    }


def mark_replaced(root: nn.Module, paths: Any) -> None:
    """Add ``paths`` to the root's replaced paths, keeping the outermost of nested ones."""
    every = sorted({*replaced(root), *paths})
    if not every:
        return
    kept: list[str] = []
    for path in every:  # sorted: a path comes after its ancestors
        if not any(path.startswith(top + ".") for top in kept):
            kept.append(path)
    root.__dict__[RECORD] = tuple(kept)


def rebuild(
    root: nn.Module, saved: dict[str, Any], prefix: str = ""
) -> dict[str, nn.Module | None]:
    """Put the recorded modules in place in ``root`` (a freshly built architecture).

    ``prefix``: the recorded paths start with it where ``root`` is the base
    model of the architecture that was saved (a causal LM's ``model.``); paths
    outside it (the output layer) are skipped. Returns what was replaced,
    ``{path: module it replaced}``.
    """
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        found = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
        raise ValueError(
            f"a compressed model's record has format {found!r}; this loader reads {FORMAT}"
        )
    built = []  # everything is built before anything changes
    for path, spec in saved.get("modules", {}).items():
        if prefix:
            if not path.startswith(prefix):
                continue
            path = path[len(prefix) :]
        parent_path, _, name = path.rpartition(".")
        parent = root.get_submodule(parent_path)
        original = parent._modules.get(name)
        built.append((path, parent, name, original, build(spec, original)))
    for _, parent, name, _, new in built:
        setattr(parent, name, new)
    mark_replaced(root, [path for path, *_ in built])
    return {path: original for path, _, _, original, _ in built}


# ------------------------------------------------- transformers' model classes
_COMPRESSED: dict[type, type] = {}
_PREFIX = "Compressed"


def compressed_class(base: type) -> type:
    """The subclass of a transformers model class that builds the recorded modules.

    ``Compressed<Base>``: its ``__init__`` builds ``Base`` from the config and
    puts in place the modules ``config.pcasurgery`` records; its
    ``save_pretrained`` writes the record, the ``auto_map`` and this file.
    """
    if base.__dict__.get("_compressed_from") is not None:
        return base
    cls = _COMPRESSED.get(base)
    if cls is not None:
        return cls

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        saved = getattr(config, "pcasurgery", None)
        if saved is not None:
            prefix = ""
            if saved.get("architecture") not in (None, base.__name__) and self.base_model_prefix:
                prefix = self.base_model_prefix + "."  # loaded as the saved model's base model
            rebuild(self, saved, prefix)

    def save_pretrained(self, save_directory, *args, **kwargs):
        self.config.pcasurgery = record(self, base.__name__)
        self.config.auto_map = auto_map(self)
        return base.save_pretrained(self, save_directory, *args, **kwargs)

    name = _PREFIX + base.__name__
    cls = type(
        name,
        (base,),
        {
            "__init__": __init__,
            "save_pretrained": save_pretrained,
            "__module__": __name__,
            "__qualname__": name,
            "_compressed_from": base,
            "_auto_class": _auto_classes(base)[0],
        },
    )
    _COMPRESSED[base] = cls
    return cls


def _auto_classes(base: type) -> list[str]:
    """The transformers auto classes that load ``base`` (``AutoModel`` when none does)."""
    import transformers

    model_type = getattr(getattr(base, "config_class", None), "model_type", None)
    found = []
    for name in dir(transformers):
        if not name.startswith("AutoModel"):
            continue
        mapping = getattr(
            getattr(getattr(transformers, name), "_model_mapping", None), "_model_mapping", {}
        )
        names = mapping.get(model_type, ()) if isinstance(mapping, dict) else ()
        if base.__name__ == names or base.__name__ in names:
            found.append(name)
    found.sort(key=lambda name: (name == "AutoModel", name))  # a head's own class first
    return found or ["AutoModel"]


def auto_map(model: nn.Module) -> dict[str, str]:
    """``config.auto_map`` of a compressed model: its auto classes, and ``AutoModel`` for its
    base model (a causal LM's decoder without the output layer)."""
    module = __name__.rpartition(".")[2]
    base = type(model).__dict__.get("_compressed_from", type(model))
    entries = {auto: f"{module}.{_PREFIX}{base.__name__}" for auto in _auto_classes(base)}
    inner = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
    if isinstance(inner, nn.Module) and inner is not model and "AutoModel" not in entries:
        entries["AutoModel"] = f"{module}.{_PREFIX}{type(inner).__name__}"
    return entries


def __getattr__(name: str) -> type:
    """``Compressed<Base>`` for any transformers model class ``Base`` (how ``auto_map`` and
    pickles find the classes)."""
    if name.startswith(_PREFIX):
        import transformers

        base = getattr(transformers, name[len(_PREFIX) :], None)
        if isinstance(base, type) and issubclass(base, nn.Module):
            return compressed_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
