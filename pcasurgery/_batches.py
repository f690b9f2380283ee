"""Batch layouts, in one place: what a batch holds, how many examples, how to run it.

A batch is a tensor, a tuple/list whose first item is the input (labels
follow), or a mapping of keyword arguments (a tokenizer's ``BatchEncoding``,
say). Calibration, counting and export all read batches through these helpers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "attention_mask",
    "examples_in",
    "map_tensors",
    "model_inputs",
    "run_batch",
    "to_device",
    "truncate",
]


def examples_in(batch: Any) -> int | None:
    """Input examples in a batch: the leading size of its first tensor (None if it has none)."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        items: Iterable[Any] = batch.values()
    elif isinstance(batch, (tuple, list)):
        items = batch
    else:
        return None
    for item in items:
        if isinstance(item, (Tensor, Mapping, tuple, list)):
            found = examples_in(item)
            if found is not None:
                return found
    return None


def map_tensors(batch: Any, fn: Callable[[Tensor], Any]) -> Any:
    """The batch with ``fn`` applied to every tensor in it, its containers rebuilt."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        rebuild: Any = type(batch)  # dict, OrderedDict, BatchEncoding, ...
        return rebuild((k, map_tensors(v, fn)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(map_tensors(v, fn) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def to_device(batch: Any, device: torch.device | None) -> Any:
    """Every tensor of the batch on ``device`` (non-blocking from pinned memory to CUDA)."""
    if device is None:
        return batch

    def move(t: Tensor) -> Tensor:
        return t.to(device, non_blocking=device.type == "cuda" and t.is_pinned())

    return map_tensors(batch, move)


def truncate(batch: Any, size: int, keep: int) -> Any:
    """Keep the first ``keep`` examples of every tensor whose leading size is ``size``."""
    return map_tensors(batch, lambda t: t[:keep] if t.dim() and t.shape[0] == size else t)


def attention_mask(batch: Any) -> Tensor | None:
    """A dict batch's ``attention_mask`` (1 for real tokens, 0 for padding), if it has one."""
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2:
            return mask
    return None


def run_batch(model: nn.Module, batch: Any) -> Any:
    """Run one batch: a tensor, a tuple/list whose first item is the input, or a dict of kwargs."""
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    raise TypeError(
        "a calibration batch must be a tensor, a tuple/list whose first item is the input, "
        f"or a dict of keyword arguments; got {type(batch).__name__} "
        "(pass forward=lambda model, batch: ... to run other batches)"
    )


def model_inputs(example_inputs: Any, name: str = "example_inputs") -> tuple[tuple, dict]:
    """``(args, kwargs)`` for a model from a tensor, a tuple of inputs, or a mapping of kwargs.

    Every tensor must have a leading batch dimension. Raises ``TypeError`` or
    ``ValueError`` naming ``name`` otherwise.
    """
    args: tuple = ()
    kwargs: dict[str, Any] = {}
    if isinstance(example_inputs, Tensor):
        args = (example_inputs,)
    elif isinstance(example_inputs, tuple):
        args = example_inputs
    elif isinstance(example_inputs, Mapping):
        kwargs = dict(example_inputs)
    else:
        raise TypeError(
            f"{name} must be a tensor, a tuple of tensors or a dict of keyword tensors "
            f"(a tokenizer's output, say), got {type(example_inputs).__name__}"
        )
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)]
    if not tensors:
        raise TypeError(f"{name} holds no tensor")
    if any(t.dim() == 0 for t in tensors):
        raise ValueError(f"{name} must have a leading batch dimension on every tensor")
    return args, kwargs
