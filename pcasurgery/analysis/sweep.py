"""Threshold sweeps and per-layer threshold allocation, on the cached spectra.

Neither function recomputes an eigendecomposition: changing a threshold only
re-reads the stored spectrum of each PCA layer.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import pandas as pd
from torch import nn

from .._progress import check_progress, progress_bar
from .._validation import check_threshold, kept_modes
from ..compression.compress import compress
from ..compression.counting import count_macs, count_params
from ..compression.plan import plan_site
from ..core.spectrum import intrinsic_dimensionality
from ..layers.network import calibrated_layers, folded
from ..layers.pca import PCALayer
from ..layers.sites import Site, sites_of

__all__ = ["DEFAULT_LADDER", "allocate", "sweep"]

DEFAULT_LADDER = (
    1.0,
    0.9999,
    0.999,
    0.998,
    0.995,
    0.99,
    0.98,
    0.97,
    0.95,
    0.93,
    0.9,
    0.85,
    0.8,
    0.75,
    0.7,
    0.6,
    0.5,
)


@contextlib.contextmanager
def kept_thresholds(layers: dict[str, PCALayer], restore: bool = True) -> Iterator[None]:
    """Put every layer's threshold back on exit (only on failure when ``restore`` is False)."""
    saved = {name: layer.threshold for name, layer in layers.items()}
    done = False
    try:
        yield
        done = True
    finally:
        if restore or not done:
            for name, layer in layers.items():
                if layer.threshold != saved[name]:
                    layer.threshold = saved[name]


def metric_values(value: Any, where: str) -> dict[str, float]:
    """``evaluate``'s result as ``{name: finite float}``; ``where`` names the thresholds used."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, dict)):
        raise TypeError(f"evaluate(model) must return a number or a dict of numbers, got {value!r}")
    values = {str(k): v for k, v in value.items()} if isinstance(value, dict) else {"metric": value}
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"evaluate(model)[{name!r}] must be a number, got {v!r}")
        if not math.isfinite(float(v)):
            raise ValueError(
                f"evaluate(model) returned {name} = {v!r} at {where}; it must be finite"
            )
    return {k: float(v) for k, v in values.items()}


def sweep(
    model: nn.Module,
    thresholds: Iterable[float],
    evaluate: Callable[[nn.Module], Any] | None = None,
    *,
    example_inputs: Any = None,
    progress: bool | None = None,
) -> pd.DataFrame:
    """One row per threshold: saturation, size of the compressed model, and your metric.

    For each threshold, every PCA layer is set to it (from the cached spectra),
    the model is compressed to count parameters (and, given ``example_inputs``,
    multiply-accumulates per example), and ``evaluate(model)`` is called with
    the projecting model in eval mode, its projections folded into the weights
    (``pcasurgery.folded``). The model's thresholds and train/eval
    flags are restored afterwards.

    Args:
        model: a calibrated model with PCA layers.
        thresholds: fractions of variance in (0, 1].
        evaluate: ``evaluate(model) -> float | dict[str, float]``; a dict gives
            one column per key, a number the column ``metric``.
        example_inputs: a batch to count MACs on.
        progress: a bar over the thresholds (``None``: in a terminal, after two
            seconds; see ``calibrate``).

    Returns:
        A DataFrame with columns ``threshold, mean_saturation, total_k, params,
        macs`` (``macs`` is None without ``example_inputs``) and the metrics.

    Example:
        >>> import torch
        >>> from pcasurgery import calibrate, pca_wrap
        >>> net = calibrate(pca_wrap(nn.Sequential(nn.Linear(4, 8))), [torch.randn(64, 4)], progress=False)
        >>> table = sweep(net, [0.5, 1.0], evaluate=lambda model: 1.0)
        >>> table[["threshold", "metric"]].values.tolist()
        [[0.5, 1.0], [1.0, 1.0]]
    """
    layers = calibrated_layers(model, "sweep")
    values = [check_threshold(t, "thresholds[i]") for t in thresholds]
    if not values:
        raise ValueError("thresholds must hold at least one value in (0, 1]")
    if evaluate is not None and not callable(evaluate):
        raise TypeError(f"evaluate must be callable as evaluate(model), got {evaluate!r}")
    progress = check_progress(progress)
    rows = []
    scope = folded(model, progress=progress) if evaluate is not None else contextlib.nullcontext()
    bar = progress_bar(progress, desc="sweep", unit="threshold", total=len(values))
    with kept_modes(model), kept_thresholds(layers), scope, bar:
        for t in values:
            for layer in layers.values():
                layer.threshold = t
            small = compress(model, progress=False)
            row: dict[str, Any] = {
                "threshold": t,
                "mean_saturation": sum(layer.saturation for layer in layers.values()) / len(layers),
                "total_k": sum(layer.in_dim for layer in layers.values()),
                "params": count_params(small),
                "macs": None if example_inputs is None else count_macs(small, example_inputs),
            }
            if evaluate is not None:
                model.eval()
                row.update(metric_values(evaluate(model), f"threshold {t}"))
            rows.append(row)
            bar.update()
    return pd.DataFrame(rows)


def _layer_macs(model: nn.Module, site: Site, layer: PCALayer, k: int | None = None) -> int:
    """Planned MACs per example of ``layer``'s compressed form at rank ``k``."""
    return layer.positions * plan_site(model, site, k).macs_per_position


def allocate(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    max_drop: float,
    *,
    example_inputs: Any = None,
    ladder: Sequence[float] = DEFAULT_LADDER,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Search per-layer thresholds that save the most MACs within ``max_drop`` of the metric.

    Greedy: start with every layer at threshold 1 (the unprojected function) and
    its metric ``m0``; at each step, for every layer, try its next threshold on
    ``ladder`` that lowers its ``k``, and take the step that saves the most MACs
    per unit of metric lost, among those keeping the metric at or above
    ``m0 - max_drop``. Stop when no step qualifies. The model is left at the
    final (smallest) allocation; if anything raises (``evaluate`` included),
    every threshold and train/eval flag is put back as it was.

    Args:
        model: a calibrated model with PCA layers.
        evaluate: ``evaluate(model) -> float``, higher is better (accuracy, say),
            called with the projecting model in eval mode, folded
            (``pcasurgery.folded``). A NaN or infinite
            value is a ``ValueError`` naming the thresholds that produced it.
        max_drop: how far below ``m0`` the metric may fall (>= 0).
        example_inputs: a batch to count the compressed model's MACs per example
            with; without it, MACs are estimated from the shapes seen during
            calibration, for the layers that compression rewrites.
        ladder: the thresholds each layer steps through, descending.
        progress: a bar counting the calls of ``evaluate`` and the steps taken
            (``None``: in a terminal, after two seconds; see ``calibrate``).

    Returns:
        A DataFrame of the steps taken: ``step, layer, threshold, k, metric,
        macs, params`` (step 0 is the unprojected start).
    """
    layers = calibrated_layers(model, "allocate")
    if not callable(evaluate):
        raise TypeError(f"evaluate must be callable as evaluate(model), got {evaluate!r}")
    if isinstance(max_drop, bool) or not isinstance(max_drop, numbers.Real) or not max_drop >= 0:
        raise ValueError(f"max_drop must be a number >= 0, got {max_drop!r}")
    steps = sorted({check_threshold(t, "ladder[i]") for t in ladder} | {1.0}, reverse=True)
    sites = {site.name: site for site in sites_of(model)}
    progress = check_progress(progress)
    bar = progress_bar(progress, desc="allocate", unit="evaluation")

    def measure() -> tuple[float, int]:
        bar.update()
        model.eval()
        where = "thresholds " + ", ".join(f"{n}={layer.threshold:g}" for n, layer in layers.items())
        value = metric_values(evaluate(model), where)
        if len(value) != 1:
            raise TypeError(f"evaluate(model) must return one number for allocate, got {value!r}")
        (metric,) = value.values()
        if example_inputs is None:
            estimate = sum(_layer_macs(model, sites[n], layer) for n, layer in layers.items())
            return metric, estimate
        return metric, count_macs(compress(model, progress=False), example_inputs)

    with (
        kept_modes(model),
        kept_thresholds(layers, restore=False),
        folded(model, progress=progress),
        bar,
    ):
        for layer in layers.values():
            layer.threshold = 1.0
        metric, macs = measure()
        table = [
            {
                "step": 0,
                "layer": None,
                "threshold": 1.0,
                "k": None,
                "metric": metric,
                "macs": macs,
                "params": count_params(compress(model, progress=False)),
            }
        ]
        position = dict.fromkeys(layers, 0)
        floor = metric - float(max_drop)
        while (
            best := _best_step(model, layers, sites, steps, position, measure, metric, macs, floor)
        ) is not None:
            name, j, metric, macs = best
            layers[name].threshold = steps[j]
            position[name] = j
            table.append(
                {
                    "step": len(table),
                    "layer": name,
                    "threshold": steps[j],
                    "k": layers[name].in_dim,
                    "metric": metric,
                    "macs": macs,
                    "params": count_params(compress(model, progress=False)),
                }
            )
            bar.set_postfix_str(f"{len(table) - 1} steps taken", refresh=False)
    return pd.DataFrame(table)


def _best_step(
    model: nn.Module,
    layers: dict[str, PCALayer],
    sites: dict[str, Site],
    steps: list[float],
    position: dict[str, int],
    measure: Callable[[], tuple[float, int]],
    metric: float,
    macs: int,
    floor: float,
) -> tuple[str, int, float, int] | None:
    """The one-layer step that saves the most MACs per unit of metric lost, above ``floor``."""
    best = None
    for name, layer in layers.items():
        # the next threshold that makes this layer's compressed form cheaper
        i, cost_now = position[name], _layer_macs(model, sites[name], layer)
        j = i + 1
        while j < len(steps):
            k = intrinsic_dimensionality(layer.eigenvalues, steps[j])
            if _layer_macs(model, sites[name], layer, k) < cost_now:
                break
            j += 1
        if j == len(steps):
            continue
        layer.threshold = steps[j]
        try:
            candidate_metric, candidate_macs = measure()
        finally:
            layer.threshold = steps[i]
        saved = macs - candidate_macs
        if candidate_metric < floor or saved <= 0:
            continue
        score = saved / max(metric - candidate_metric, 1e-12)
        if best is None or score > best[0]:
            best = (score, name, j, candidate_metric, candidate_macs)
    return None if best is None else best[1:]
