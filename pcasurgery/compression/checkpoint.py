"""Compressed models saved without pickles: safetensors plus the record of the replaced modules.

``save_compressed(small, "small.safetensors")`` writes the weights and, in the
file's metadata, the record of every module ``compress`` replaced (see
``pcasurgery.modeling_pcasurgery``). ``load_compressed(fresh, path)`` puts
those modules into a freshly built instance of the architecture (the user's
class, a torchvision or timm model, a transformers model built from its
config) and loads the weights. Nothing is unpickled: safetensors holds
tensors only, and the record names torch layer classes from a fixed list.

A compressed transformers model also saves with its own ``save_pretrained``
(a checkpoint folder that loads without pcasurgery; see ``compress``).
"""

from __future__ import annotations

import json
import os
from typing import Any

from torch import fx, nn

from ..layers.pca import PCALayer
from ..modeling_pcasurgery import RECORD, rebuild, record

__all__ = ["load_compressed", "save_compressed"]

_KEY = "pcasurgery"  # the safetensors metadata entry that holds the record


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as err:  # pragma: no cover - installed with transformers
        raise ImportError(
            "saving compressed models needs safetensors: pip install safetensors"
        ) from err
    return safetensors


def save_compressed(model: nn.Module, path: str | os.PathLike) -> None:
    """Write a compressed model's weights and the record of its replaced modules to one file.

    Args:
        model: a model returned by :func:`compress` (or containing one).
        path: the ``.safetensors`` file to write.

    Raises:
        ValueError: the model still has PCA layers (compress it first).
        TypeError: ``model`` is not an ``nn.Module``, or is a ``torch.fx.GraphModule``
            (no class to build it again from; save its ``state_dict`` instead).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, fx.GraphModule):
        raise TypeError(
            "model is a torch.fx.GraphModule, which has no class to build it again "
            "from; save its state_dict, or export it with export_onnx"
        )
    left = [name for name, m in model.named_modules() if isinstance(m, PCALayer)]
    if left:
        raise ValueError(
            f"model still has PCA layers ({', '.join(left[:3])}{', ...' if len(left) > 3 else ''}); "
            "save the model compress() returns"
        )
    metadata = {_KEY: json.dumps(record(model))}
    _safetensors().torch.save_model(model, os.fspath(path), metadata=metadata)


def load_compressed(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a file written by :func:`save_compressed` into a fresh instance of the architecture.

    The recorded modules are built (in the dtype and on the device of the
    modules they replace) and put in place, then every weight is loaded,
    strictly. On any error ``model`` is left as it was.

    Args:
        model: the architecture, freshly built (``torchvision.models.resnet50()``,
            ``MyNet()``, ...); changed in place.
        path: a ``.safetensors`` file written by :func:`save_compressed`.

    Returns:
        ``model``, now the compressed model.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file holds no record (not written by ``save_compressed``), or its
            weights do not fit the architecture (the missing and unexpected names are listed).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path {path!r}: no such file")
    st = _safetensors()
    with st.safe_open(path, "pt") as f:
        metadata = f.metadata() or {}
    if _KEY not in metadata:
        raise ValueError(
            f"path {path!r} holds no record of compressed modules: it was not written "
            "by save_compressed (load a plain state dict with load_state_dict)"
        )
    saved = json.loads(metadata[_KEY])
    previous = model.__dict__.get(RECORD)
    try:
        replaced = rebuild(model, saved)
    except (AttributeError, KeyError) as err:
        raise ValueError(
            f"path {path!r}: the recorded modules are not in this architecture "
            f"({type(model).__name__}): {err}"
        ) from err
    try:
        for name, old in replaced.items():  # the dtype and device of the module replaced
            reference = next(old.parameters(), None) if old is not None else None
            if reference is not None and reference.is_floating_point():
                model.get_submodule(name).to(device=reference.device, dtype=reference.dtype)
        missing, unexpected = st.torch.load_model(model, path, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"path {path!r} does not fit {type(model).__name__}: missing "
                f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
    except Exception:
        for name, old in replaced.items():
            parent_path, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_path)
            if old is None:
                del parent._modules[child]
            else:
                setattr(parent, child, old)
        model.__dict__.pop(RECORD, None)
        if previous is not None:
            model.__dict__[RECORD] = previous
        raise
    return model
