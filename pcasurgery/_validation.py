"""Argument checks, and the one way of keeping a model's train/eval flags.

Each check raises ``TypeError`` or ``ValueError`` with a message that names the
argument, the value received and what is allowed. Internal invariants use
``assert``; user input never does.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal, overload

import numpy as np
import torch
from torch import nn

__all__ = [
    "check_bool",
    "check_choice",
    "check_writable",
    "check_device",
    "check_module",
    "check_patterns",
    "check_positive_int",
    "check_seed",
    "check_threshold",
    "kept_modes",
]


def check_module(value: object, name: str = "model") -> nn.Module:
    """Return ``value`` if it is a ``torch.nn.Module``, or raise naming ``name``."""
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(value).__name__}")
    return value


@contextlib.contextmanager
def kept_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's train/eval flag on exit, whatever happened inside."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def check_patterns(value: object, name: str) -> list[str] | None:
    """Return ``value`` (a glob or a sequence of globs) as a non-empty list, or None."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) or isinstance(value, (set, frozenset)):
        patterns = list(value)
        if patterns and all(isinstance(p, str) for p in patterns):
            return patterns
    raise TypeError(
        f"{name} must be a glob string such as 'layer1.*' or a non-empty list of them, "
        f"got {value!r}"
    )


def check_seed(value: object, name: str = "seed") -> int | np.random.Generator | None:
    """Return ``value`` if it is None, an int in [0, 2**32) or a numpy Generator."""
    if value is None or isinstance(value, np.random.Generator):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, a numpy.random.Generator or None, got {value!r}")
    if not 0 <= int(value) < 2**32:
        raise ValueError(f"{name} must be an int in [0, 2**32), got {value!r}")
    return int(value)


def check_device(value: object, name: str = "device") -> torch.device | None:
    """Return ``value`` as a ``torch.device`` that exists on this machine and holds data.

    None stays None. ``"meta"`` is refused (it holds no data, so a model moved
    there loses its weights); a CUDA or MPS device must be available.
    """
    if value is None:
        return None
    try:
        device = torch.device(value)  # type: ignore[call-overload]
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"{name} must name a torch device such as 'cpu' or 'cuda:0', got {value!r}"
        ) from err
    if device.type == "meta":
        raise ValueError(f"{name}={value!r}: the meta device holds no data; use 'cpu' or 'cuda'")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{name}={value!r} but CUDA is not available on this machine")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{name}={value!r} but this machine has {count} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}={value!r} but MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        try:
            torch.empty(0, device=device)
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"{name}={value!r} is not usable on this machine: {err}") from err
    return device


def check_threshold(value: object, name: str = "threshold") -> float:
    """Return ``value`` as a float in (0, 1], or raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in (0, 1], got {value!r}")
    value = float(value)
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1] (fraction of variance kept), got {value!r}")
    return value


def check_bool(value: object, name: str) -> bool:
    """Return ``value`` if it is a bool, or raise naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


@overload
def check_positive_int(value: object, name: str) -> int: ...
@overload
def check_positive_int(value: object, name: str, *, allow_none: Literal[False]) -> int: ...
@overload
def check_positive_int(value: object, name: str, *, allow_none: bool) -> int | None: ...


def check_positive_int(value: object, name: str, *, allow_none: bool = False) -> int | None:
    """Return ``value`` as an int >= 1 (or None when allowed), or raise naming ``name``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        allowed = "a positive integer or None" if allow_none else "a positive integer"
        raise TypeError(f"{name} must be {allowed}, got {value!r}")
    if int(value) < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return int(value)


def check_choice(value: object, name: str, allowed: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``allowed``, or raise listing them."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return next(a for a in allowed if a == value)


def check_writable(value: object, name: str, *, folder: bool) -> Path:
    """Return ``value`` as a path that can be written, checked before any work is done.

    ``folder=True``: a folder to create (if needed) and write files into;
    ``folder=False``: a file whose folder must exist and be writable. Raises
    ``ValueError`` naming the argument and the reason.
    """
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path, got {value!r}")
    path = Path(value)
    target = path if folder else path.parent
    try:
        if folder:
            if path.exists() and not path.is_dir():
                raise ValueError(f"{name}={str(path)!r} is a file, not a folder")
            path.mkdir(parents=True, exist_ok=True)
        elif not target.is_dir():
            raise ValueError(f"{name}={str(path)!r}: folder {str(target)!r} does not exist")
        elif path.is_dir():
            raise ValueError(f"{name}={str(path)!r} is a folder; give a file name")
        with tempfile.TemporaryFile(dir=target or "."):
            pass
    except OSError as err:
        raise ValueError(f"{name}={str(path)!r} cannot be written: {err.strerror or err}") from err
    return path
