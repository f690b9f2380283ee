"""What the scripts in ``recipes/`` share: loading the user's model, data and metric.

A recipe names objects in the user's own code as ``package.module:attribute``:

* ``--model``: a class or factory called with no argument, returning an
  ``nn.Module``; ``--checkpoint`` then loads a state dict into it
  (``torch.load(..., weights_only=True)``);
* ``--data``: a factory returning an iterable of calibration batches (a tensor,
  a tuple/list whose first item is the input, or a dict of keyword arguments);
* ``--metric``: ``evaluate(model) -> float`` (higher is better).

Defaults are the digits CNN (trained on the spot, in about 15 seconds, when no
checkpoint is given), its training batches and its test accuracy.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import _digits as digits
from ._validation import check_writable

__all__ = [
    "DEFAULT_DATA",
    "DEFAULT_METRIC",
    "DEFAULT_MODEL",
    "add_common_arguments",
    "calibrated",
    "digits_batches",
    "digits_test_accuracy",
    "example_input",
    "load_data",
    "load_metric",
    "load_model",
    "load_object",
    "recipe_parser",
    "writable",
]

DEFAULT_MODEL = "pcasurgery._digits:DigitsCNN"
DEFAULT_DATA = "pcasurgery._recipes:digits_batches"
DEFAULT_METRIC = "pcasurgery._recipes:digits_test_accuracy"


def load_object(spec: str, what: str) -> Any:
    """Import ``package.module:attribute``."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"--{what} must look like package.module:attribute, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"--{what} {spec!r}: cannot import {module_name!r} ({err})") from err
    try:
        obj = module
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except AttributeError as err:
        raise ValueError(
            f"--{what} {spec!r}: {module_name!r} has no attribute {attribute!r}"
        ) from err
    return obj


@lru_cache(maxsize=1)
def _split() -> digits.Split:
    return digits.load_digits_split()


def digits_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The digits training images, as (images, labels) batches of 128."""
    return _split().batches(128)


def digits_test_accuracy(model: nn.Module) -> float:
    """Accuracy on the digits test split."""
    split = _split()
    return digits.accuracy(model, split.x_test, split.y_test)


def recipe_parser(doc: str, *, metric: bool = False) -> argparse.ArgumentParser:
    """A recipe's parser: its docstring as help, and the common options."""
    parser = argparse.ArgumentParser(
        description=doc.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc,
    )
    add_common_arguments(parser, metric=metric)
    return parser


def writable(parser: argparse.ArgumentParser, path: str, *, folder: bool) -> Path:
    """``path`` checked for writing before any work; a usage error (exit 2) when it is not."""
    try:
        return check_writable(path, "--out" if folder else "output file", folder=folder)
    except ValueError as err:
        parser.error(str(err))


def calibrated(args: argparse.Namespace, threshold: float) -> tuple[nn.Module, Any, nn.Module]:
    """The user's model, its calibration batches, and the wrapped, calibrated model."""
    from .surgery import calibrate, pca_wrap

    model = load_model(args)
    batches = load_data(args)
    wrapped = calibrate(
        pca_wrap(model, threshold), batches, device=args.device, max_batches=args.max_batches
    )
    return model, batches, wrapped


def example_input(batches: Any, size: int = 1) -> torch.Tensor:
    """The first ``size`` inputs of the first batch (on the CPU), for counting and export."""
    first = next(iter(batches))
    x = first[0] if isinstance(first, (tuple, list)) else first
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"the first item of a batch must be the input tensor, got {type(x).__name__}"
        )
    return x[:size].cpu()


def add_common_arguments(parser: argparse.ArgumentParser, *, metric: bool = False) -> None:
    """The ``--model``, ``--checkpoint``, ``--data`` (and ``--metric``) options."""
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="package.module:factory returning the model"
    )
    parser.add_argument("--checkpoint", help="state dict to load into the model (weights_only)")
    parser.add_argument(
        "--data", default=DEFAULT_DATA, help="package.module:factory returning batches"
    )
    parser.add_argument(
        "--max-batches", type=int, default=None, help="calibrate on at most this many batches"
    )
    parser.add_argument("--device", default=None, help="calibrate on this device (cpu, cuda, ...)")
    if metric:
        parser.add_argument(
            "--metric", default=DEFAULT_METRIC, help="package.module:evaluate(model) -> float"
        )


def load_model(args: argparse.Namespace) -> nn.Module:
    """Build the model and load its checkpoint (the default digits CNN is trained when none is given)."""
    factory = load_object(args.model, "model")
    model = factory() if callable(factory) else factory
    if not isinstance(model, nn.Module):
        raise TypeError(f"--model {args.model!r} gave {type(model).__name__}, not an nn.Module")
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    elif args.model == DEFAULT_MODEL:
        print("no --checkpoint: training the digits CNN first (about 15 s)")
        torch.manual_seed(0)
        model = digits.train(digits.DigitsCNN(), _split())
    return model.eval()


def load_data(args: argparse.Namespace) -> Any:
    """The calibration batches."""
    factory = load_object(args.data, "data")
    return factory() if callable(factory) else factory


def load_metric(args: argparse.Namespace) -> Callable[[nn.Module], float]:
    """The ``evaluate(model)`` function."""
    metric = load_object(args.metric, "metric")
    if not callable(metric):
        raise TypeError(f"--metric {args.metric!r} is not callable")
    return metric
