"""A model's tensors read from and written to safetensors files one module at a time.

For models larger than memory (``compress_sequential`` and
``calibrate_sequential`` with ``weights=``): the model is built on the
``meta`` device (``accelerate.init_empty_weights()``, or ``torch.device("meta")``),
and :class:`ShardReader` loads the tensors of one block from the checkpoint's
files when its turn comes; :func:`to_meta` releases them after. A compressed
block is written at once by :class:`ShardWriter`, one file per block, and the
files are tied together at the end by a ``model.safetensors.index.json`` as
transformers writes one, so that the folder loads with ``from_pretrained``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["ShardReader", "ShardWriter", "to_meta"]

INDEX = "model.safetensors.index.json"


def _slots(
    root: nn.Module, skip: tuple[str, ...] = ()
) -> Iterator[tuple[nn.Module, str, str, bool]]:
    """``(module, attribute, qualified name, is a parameter)`` of every tensor of ``root``,
    tied ones under each of their names, except in the submodules named in ``skip``;
    non-persistent buffers left out."""
    for prefix, module in root.named_modules(remove_duplicate=False):
        if any(prefix == path or prefix.startswith(path + ".") for path in skip):
            continue
        dot = prefix + "." if prefix else ""
        for name, param in module._parameters.items():
            if param is not None:
                yield module, name, dot + name, True
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                yield module, name, dot + name, False


class ShardReader:
    """The tensors of a checkpoint: one safetensors file, or a folder of them (with
    transformers' ``model.safetensors.index.json``, or every ``*.safetensors`` in it).

    Raises:
        ValueError: the path holds no safetensors file, or two files hold one name.
    """

    def __init__(self, path: str | os.PathLike[str]):
        from safetensors import safe_open

        self._open = safe_open
        root = Path(path)
        if root.is_file():
            files = [root]
        elif (root / INDEX).is_file():
            weight_map = json.loads((root / INDEX).read_text())["weight_map"]
            files = sorted({root / name for name in weight_map.values()})
        else:
            files = sorted(root.glob("*.safetensors")) if root.is_dir() else []
        if not files:
            raise ValueError(
                f"weights={str(path)!r} is not a safetensors file nor a folder holding some"
            )
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    if key in self.where:
                        raise ValueError(
                            f"weights: {key!r} is in both {self.where[key]} and {file}"
                        )
                    self.where[key] = file
                    self.shapes[key] = tuple(handle.get_slice(key).get_shape())

    def _read(self, keys: list[str]) -> dict[str, Tensor]:
        """The tensors named, each file opened once and closed after (its mapped pages
        released, not held for the rest of the run)."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.where[key], []).append(key)
        values = {}
        for file, names in by_file.items():
            with self._open(str(file), framework="pt") as handle:
                for key in names:
                    values[key] = handle.get_tensor(key)
        return values

    def _matched(
        self, root: nn.Module, prefix: str, skip: tuple[str, ...]
    ) -> dict[str, list[tuple[nn.Module, str, str, bool]]]:
        """``{checkpoint name: the slots of one tensor on meta}`` for every tensor of ``root``
        on the ``meta`` device, checked against the checkpoint's names and shapes."""
        groups: dict[int, list[tuple[nn.Module, str, str, bool]]] = {}
        for module, name, qualified, is_param in _slots(root, skip):
            tensor = (module._parameters if is_param else module._buffers)[name]
            assert tensor is not None
            if tensor.is_meta:
                groups.setdefault(id(tensor), []).append(
                    (module, name, prefix + qualified, is_param)
                )
        matched, missing = {}, []
        for slots in groups.values():
            key = next((slot[2] for slot in slots if slot[2] in self.where), None)
            if key is None:
                missing.append(slots[0][2])
                continue
            module, name, _, is_param = slots[0]
            old = (module._parameters if is_param else module._buffers)[name]
            assert old is not None
            if self.shapes[key] != tuple(old.shape):
                raise ValueError(
                    f"weights: {key!r} has shape {self.shapes[key]}, the model's {tuple(old.shape)}"
                )
            matched[key] = slots
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise ValueError(
                f"weights: {len(missing)} tensor(s) on the meta device are not in the "
                f"checkpoint: {shown}"
            )
        return matched

    def check(self, root: nn.Module) -> None:
        """Check, reading no tensor, that the checkpoint holds every tensor of ``root`` on
        the ``meta`` device, in its shape.

        Raises:
            ValueError: one is missing, or has another shape.
        """
        self._matched(root, "", ())

    def load(self, root: nn.Module, prefix: str = "", *, skip: tuple[str, ...] = ()) -> list[str]:
        """Give every tensor of ``root`` on the ``meta`` device its value from the checkpoint,
        named ``prefix`` + its name in ``root`` and cast to its dtype (a tensor tied under
        several names is read once, under the first name the checkpoint has); the
        submodules named in ``skip`` are left as they are.

        Returns:
            The names loaded.

        Raises:
            ValueError: a tensor on ``meta`` that the checkpoint lacks, or whose shape
                differs; nothing in ``root`` changes then.
        """
        with torch.inference_mode(False):  # tensors that autograd may use later
            return self._load(root, prefix, skip)

    def _load(self, root: nn.Module, prefix: str, skip: tuple[str, ...]) -> list[str]:
        matched = self._matched(root, prefix, skip)
        values = self._read(list(matched))
        loaded = []
        for key, slots in matched.items():
            module, name, _, is_param = slots[0]
            old = (module._parameters if is_param else module._buffers)[name]
            assert old is not None
            loaded.append((slots, values.pop(key).to(old.dtype)))
        names = []
        for slots, value in loaded:
            for module, name, qualified, is_param in slots:
                if is_param:
                    old = module._parameters[name]
                    assert old is not None
                    module._parameters[name] = nn.Parameter(value, old.requires_grad)
                else:
                    module._buffers[name] = value
                names.append(qualified)
        return names


def to_meta(root: nn.Module) -> None:
    """Release the tensors of ``root`` (parameters and persistent buffers), keeping their
    shapes and dtypes on the ``meta`` device."""
    with torch.inference_mode(False):
        _to_meta(root)


def _to_meta(root: nn.Module) -> None:
    for module, name, _, is_param in _slots(root):
        if is_param:
            param = module._parameters[name]
            assert param is not None
            if not param.is_meta:
                module._parameters[name] = nn.Parameter(param.to("meta"), param.requires_grad)
        else:
            buffer = module._buffers[name]
            assert buffer is not None
            module._buffers[name] = buffer.to("meta")


class ShardWriter:
    """Write a model's tensors to a folder one module at a time, one file each, then an
    index (transformers' ``model.safetensors.index.json``).

    ``dtype``: floating tensors are written in it (None: as they are).
    """

    def __init__(self, folder: str | os.PathLike[str], dtype: torch.dtype | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def write(self, root: nn.Module, prefix: str, name: str) -> None:
        """Write the tensors of ``root`` (named ``prefix`` + their name) not written yet to
        ``name``, a file of the folder."""
        from safetensors.torch import save_file

        tensors = {}
        seen: set[int] = set()  # a tensor tied under several names is written once
        for module, attr, qualified, is_param in _slots(root):
            tensor = (module._parameters if is_param else module._buffers)[attr]
            assert tensor is not None
            key = prefix + qualified
            if id(tensor) in seen or tensor.is_meta or key in self.weight_map:
                continue
            seen.add(id(tensor))
            value = tensor.detach()
            if self.dtype is not None and value.is_floating_point():
                value = value.to(self.dtype)
            tensors[key] = value.contiguous().cpu()
        if not tensors:
            return
        partial = self.folder / (name + ".partial")
        save_file(tensors, str(partial), metadata={"format": "pt"})
        os.replace(partial, self.folder / name)
        for key, value in tensors.items():
            self.weight_map[key] = name
            self.total += value.numel() * value.element_size()

    def finish(self, model: nn.Module) -> None:
        """Write the index of every file written and, for a transformers model, the files
        ``save_pretrained`` writes besides its weights: its config (with the record of a
        compressed model and its ``auto_map``), the modeling file, its generation config."""
        index = {
            "metadata": {"total_size": self.total},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "save_pretrained"):
            return
        from transformers.dynamic_module_utils import custom_object_save

        from ..modeling_pcasurgery import auto_map

        if getattr(config, "pcasurgery", None) is not None:
            custom_object_save(model, self.folder, config=config)
            config.auto_map = auto_map(model)
        config.save_pretrained(self.folder)
        generation = getattr(model, "generation_config", None)
        if generation is not None and hasattr(generation, "save_pretrained"):
            generation.save_pretrained(self.folder)
