"""Models dispatched by accelerate (``device_map``, disk or CPU offload): weights read outside a forward.

accelerate's ``AlignDevicesHook`` keeps an offloaded module's weights on the
``meta`` device and loads them only around the module's own forward. The
library reads weights outside a forward in three places: a widening layer's
spectrum computed through its weights (``layers.through``), the folds, and
``compress``. :func:`resident` loads them for the length of a block;
:func:`hook_like` gives a module that replaces an offloaded one the same kind of
hook, so a compressed model offloads where the original did (into CPU memory:
the replacement's weights are new, and not in the original's offload folder).
Nothing here imports accelerate unless a module carries one of its hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["dispatched", "execution_device", "hook_like", "offloaded", "resident"]

_HOOK = "_hf_hook"


def dispatched(model: nn.Module) -> bool:
    """Whether accelerate has put a hook on ``model`` or any of its modules."""
    return any(_HOOK in module.__dict__ for module in model.modules())


def offloaded(module: nn.Module) -> bool:
    """Whether an accelerate hook keeps ``module``'s own weights off their device between calls."""
    hook = module.__dict__.get(_HOOK)
    return bool(getattr(hook, "offload", False))


def execution_device(module: nn.Module) -> torch.device | None:
    """Where an accelerate hook runs ``module`` (None without one)."""
    device = getattr(module.__dict__.get(_HOOK), "execution_device", None)
    return None if device is None else torch.device(device)


@contextlib.contextmanager
def resident(model: nn.Module) -> Iterator[None]:
    """Within the block, the weights of ``model``'s offloaded modules are on their execution device.

    They go back to their offload when the block ends (as after a forward).
    """
    modules = [m for m in model.modules() if offloaded(m)]
    if not modules:
        yield
        return
    from accelerate.utils import align_module_device

    with contextlib.ExitStack() as stack:
        for module in modules:
            stack.enter_context(align_module_device(module))
        yield


def hook_like(new: nn.Module, old: nn.Module) -> None:
    """Give ``new``, which replaces ``old``, a hook like ``old``'s accelerate hook (if it has one).

    The same execution device, offloading and input/output alignment, over all of
    ``new``'s tensors (its children's included); offloaded weights are kept in CPU
    memory.
    """
    hook = old.__dict__.get(_HOOK)
    if hook is None or new is old:
        return
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    if not isinstance(hook, AlignDevicesHook):
        raise TypeError(
            f"{type(old).__name__} carries an accelerate hook of type {type(hook).__name__}, "
            "which compress cannot carry over to its replacement; remove it first "
            "(accelerate.hooks.remove_hook_from_module)"
        )
    copy = AlignDevicesHook(
        execution_device=hook.execution_device,
        offload=hook.offload,
        io_same_device=hook.io_same_device,
        offload_buffers=hook.offload_buffers,
        place_submodules=True,
        skip_keys=hook.skip_keys,
    )
    add_hook_to_module(new, copy)
