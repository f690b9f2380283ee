"""Compression under a budget: per-layer ranks that remove a fraction of the parameters.

``budget_plan(model, remove=0.2)`` chooses a rank ``k`` for every PCA layer
that directly follows a Linear/Conv2d, from the calibrated spectra alone, so
that compressing removes at least ``remove`` of those layers' parameters (or
multiply-accumulates) while keeping as much of each layer's variance as
possible; ``apply_plan`` then sets each layer's threshold so that it keeps
exactly that rank, and ``compress`` does the rest.

The allocation is global. A layer at rank ``k`` loses the fraction ``l`` of
its output's energy ``E|y|^2`` (the eigenvalues it drops over ``E|y|^2``; with
centring the mean is kept, so the eigenvalues are the variance's and
``E|y|^2 = trace(cov) + |mean|^2``) and costs what ``compress`` will build for it (``compression_plan``'s cost model: a factorised pair, or the
dense layer where factorising does not pay). The ranks of least total squared
loss ``sum(l ** 2)`` within the budget are found by dynamic programming over
the budget (a multiple-choice knapsack, costs rounded up to 1/4096 of the budget or finer),
then the rounding slack is spent greedily with the exact costs. No metric is
evaluated; for hundreds of layers it takes seconds.

Why squared: errors compound through the layers after, so a model suffers more
from one layer that loses much than from several that lose a little each; the
square spreads the loss. Why energy rather than variance: what the layers
after see is the output itself, mean included, and a layer whose output is
mostly its mean loses little of it with the variance it drops. (The
measurements behind both choices are in docs/compression.md.)

The spectra cannot say which directions the model's loss reads. Given a loss
and a few batches, ``budget_plan`` measures that instead (one backward pass
per batch): a direction ``v_j`` of variance ``lambda_j`` along which the loss's
gradient ``g`` has ``s_j = sum (v_j . g)^2`` over the samples costs about
``lambda_j s_j`` (the second-order term of the loss with the Fisher for its
Hessian), and a layer at rank ``k`` is charged what it drops, summed (not
squared: these are already loss units).
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import numbers
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._progress import check_progress, progress_bar
from .._validation import check_choice, check_patterns, kept_modes
from ..compression.counting import count_params
from ..compression.plan import followed_module, fusable_batchnorms, plan_layer, plan_layers
from ..core.spectrum import explained_fraction, explained_fractions
from ..layers.decompose import compute_eigenvectors
from ..layers.network import calibrated_layers, folded, set_threshold
from ..layers.pca import PCALayer
from ..layers.sites import Site, sites_of
from ..surgery.calibrate import distributed_run
from .sweep import kept_thresholds, metric_values

__all__ = ["apply_plan", "budget_plan"]

_BELOW_ONE = float(np.nextafter(1.0, 0.0))

PLAN_COLUMNS = (
    "layer",
    "width",
    "k",
    "action",
    "explained",
    "params_before",
    "params_after",
    "macs_before",
    "macs_after",
)


@dataclass
class _Layer:
    site: Site
    layer: PCALayer
    params_before: int
    macs_before: int
    ks: np.ndarray  # candidate ranks, ascending, the last one the width
    loss: np.ndarray  # 1 - explained(k), of the variance (centred) or the second moment
    penalty: np.ndarray  # what the allocation minimises the sum of: (energy lost) ** 2
    params: np.ndarray  # params after compression at each k
    macs: np.ndarray  # MACs per example after compression at each k
    actions: np.ndarray  # of str


def _candidates(
    model: nn.Module, site: Site, layer: PCALayer, batchnorm: nn.Module | None = None
) -> _Layer | None:
    """The ranks a layer can take and what each costs, as ``compress`` will build it.

    A layer that follows a Linear/Conv2d takes ``k = 1..width`` (``k = 0`` and
    ``width`` when its output never varies: its mean is all it carries). A
    standalone projection (after a grouped convolution, an activation, ...)
    cannot remove anything, so it is planned at full rank, the identity, which
    ``compress`` drops. ``batchnorm``, a BatchNorm that ``compress`` will fold
    into the layer, counts among the parameters it removes.
    """
    if not layer.keepdim:
        return None
    module = followed_module(model, site)
    values = layer.eigenvalues.detach()
    varies = bool(values.any())
    if module is None:
        ks = np.array([layer.width])
    elif not varies:
        ks = np.array([0, layer.width])
    else:
        ks = np.arange(1, layer.width + 1)
    plans = plan_layers(layer, module, ks)
    fractions = np.concatenate([[0.0], explained_fractions(values).cpu().numpy()])
    loss = np.clip(1.0 - fractions[ks], 0.0, 1.0) if varies else np.zeros(len(ks))
    positions = layer.positions
    dense = plan_layer(layer, module, layer.width)
    before = 0 if module is None else count_params(module)
    return _Layer(
        site=site,
        layer=layer,
        params_before=before + (count_params(batchnorm) if batchnorm is not None else 0),
        macs_before=positions * dense.macs_per_position,
        ks=ks,
        loss=loss,
        penalty=(loss * _variance_share(layer)) ** 2,
        params=plans.params.astype(np.float64),
        macs=(positions * plans.macs_per_position).astype(np.float64),
        actions=plans.actions,
    )


def _variance_share(layer: PCALayer) -> float:
    """The share of the output's energy ``E|y|^2`` that the layer's eigenvalues sum to.

    1 without centring (they are the second moment's); with centring
    ``trace(cov) / (trace(cov) + |mean|^2)``, the mean being kept by the projection.
    """
    if not layer.centering:
        return 1.0
    variance = float(layer.eigenvalues.detach().double().sum())
    energy = variance + float(layer.mean.detach().double().square().sum())
    return variance / energy if energy > 0 else 1.0


def _total(costs: list[np.ndarray], choice: list[int]) -> float:
    return float(sum(cost[i] for cost, i in zip(costs, choice, strict=True)))


def budget_plan(
    model: nn.Module,
    remove: float,
    *,
    by: str = "params",
    include: str | list[str] | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    loss: Callable[[nn.Module, Any], Tensor] | None = None,
    data: Iterable[Any] | None = None,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Per-layer ranks that remove at least ``remove`` of the layers' parameters (or MACs).

    Nothing changes in ``model``: the plan is a table to read, then to hand to
    :func:`apply_plan`, and it is a promise: after ``apply_plan``,
    ``compress`` builds exactly the planned layers, so the model loses exactly
    ``params_before - params_after`` parameters per row (``compression_plan``
    says the same). The budget is a fraction of the parameters
    (``by="params"``) or multiply-accumulates per example (``by="macs"``, from
    the shapes seen in calibration) of the Linear/Conv2d layers the PCA layers
    follow directly, with the BatchNorm2d layers ``compress`` folds into them.
    A layer where factorising does not pay at any rank worth its loss stays
    dense (``action`` ``"folded"`` at full rank). A PCA layer that follows
    nothing it can fold into (a depthwise or grouped convolution, an
    activation) is planned at full rank, where ``compress`` drops it
    (``"identity"``, no parameter added); a layer whose output never varies is
    planned at ``k = 0``, its mean (built as a rank-1 pair of zero weights).

    Args:
        model: a calibrated model with PCA layers.
        remove: the fraction to remove, in (0, 1).
        by: ``"params"`` or ``"macs"``.
        include: globs on layer names restricting the layers planned (all by default).
        evaluate: ``evaluate(model) -> float`` (higher is better) to refine the
            plan with: each planned layer's sensitivity is measured alone at its
            planned rank (one call per layer, plus one at full rank), the
            spectral losses are reweighted by it and the knapsack solved again;
            of the two plans, the one ``evaluate`` scores higher is returned
            (two more calls). The model's thresholds are restored afterwards.
        loss: ``loss(model, batch) -> scalar tensor`` (lower is better), with
            ``data``: weigh each direction a layer drops by how much the loss
            depends on it. One forward and backward pass per batch of ``data``
            (in eval mode, every PCA layer passing its input through, no
            parameter gradient) measures ``s_j``, the sum over samples of the
            squared gradient of the loss along each eigenvector ``v_j``; a layer
            at rank ``k`` is then charged ``sum_{j > k} lambda_j s_j``, the
            second-order estimate of the loss it adds (a Fisher-weighted
            objective), instead of its squared energy lost. For a model with no
            loss of its own (an embedding), ``(output * torch.randn_like(output)).sum()``
            gives its Gauss-Newton curvature. Spectra from
            ``calibrate_sequential(loss=..., loss_data=...)`` carry the ``s_j``
            measured block by block, and are weighed by them without ``loss``.
        data: the batches ``loss`` is called on (an iterable, read once).
            Under ``torch.distributed`` every process calls ``budget_plan``
            with its own shard; the measures are summed over all of them, so
            every process gets the same plan.
        progress: bars over the gradient passes (batches) and the calls of
            ``evaluate`` (``None``: in a terminal, after two seconds; see
            ``calibrate``).

    Returns:
        A DataFrame with one row per planned layer: ``layer, width, k, action,
        explained, params_before, params_after, macs_before, macs_after``. Its
        ``attrs`` hold the totals: ``removed`` (the fraction the plan removes),
        ``remove``, ``by`` and ``objective`` (``"spectral"``, or ``"gradient"``
        with ``loss`` or a measure carried by the spectra); with ``evaluate``, also ``metric`` (the plan's
        score), ``metric_spectral`` and ``metric_refined`` (both candidates')
        and ``refined`` (whether the reweighted plan won).

    Raises:
        ValueError: ``remove`` outside (0, 1), ``by`` unknown, ``include``
            matching no plannable layer, a budget no choice of ranks reaches
            (the message says how much can be removed), ``loss`` without
            ``data`` or the reverse, empty ``data``, a loss that is not finite,
            does not depend on the planned layers or has no gradient there.
        TypeError: ``loss`` not callable, or returning something other than a
            scalar tensor.
        NotCalibratedError: some PCA layers have no statistics.

    Errors raised by ``loss`` itself propagate unchanged; the model is left as it was.

    Example:
        >>> import torch
        >>> from pcasurgery import calibrate, pca_wrap
        >>> net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
        >>> wrapped = calibrate(pca_wrap(net), [torch.randn(256, 32) @ torch.randn(32, 32).tril()],
        ...                     progress=False)
        >>> plan = budget_plan(wrapped, remove=0.3)
        >>> plan.attrs["removed"] >= 0.3
        True
    """
    layers_by_name = calibrated_layers(model, "plan a budget")
    if isinstance(remove, bool) or not isinstance(remove, numbers.Real) or not 0 < remove < 1:
        raise ValueError(f"remove must be a fraction in (0, 1) of the layers' size, got {remove!r}")
    by = check_choice(by, "by", ("params", "macs"))
    patterns = check_patterns(include, "include")
    progress = check_progress(progress)
    items = []
    batchnorms = fusable_batchnorms(model)
    for site in sites_of(model):
        if patterns is not None and not any(fnmatch.fnmatchcase(site.name, p) for p in patterns):
            continue
        item = _candidates(model, site, layers_by_name[site.name], batchnorms.get(site.name))
        if item is not None:
            items.append(item)
    if not any(item.params_before for item in items):
        raise ValueError(
            f"include={include!r} matches no PCA layer that directly follows a Linear or Conv2d "
            f"(and keeps its width); the layers are: {', '.join(layers_by_name)}"
        )
    if (loss is None) != (data is None):
        raise ValueError(
            "loss and data go together: pass both to weigh directions by the loss's gradient, "
            f"or neither; got loss={loss!r} and data={data!r}"
        )
    measured = getattr(model, GRADIENT_MEASURE, None)
    if measured is not None and loss is not None:
        raise ValueError(
            "these spectra carry the loss's measure (calibrate_sequential(loss=...)), which "
            "weighs the plan: budget_plan takes no loss for them"
        )
    if loss is not None and data is not None:
        weighted = _gradient_penalties(model, layers_by_name, items, loss, data, progress)
        for item, penalty in zip(items, weighted, strict=True):
            item.penalty = penalty
    elif measured is not None:
        for item in items:
            item.penalty = _tail_penalties(item, measured.get(item.site.name))
    costs = [item.params if by == "params" else item.macs for item in items]
    before = sum(item.params_before if by == "params" else item.macs_before for item in items)
    target = (1.0 - float(remove)) * before
    choice = _allocate([item.penalty for item in items], costs, target)
    if choice is None:
        best = 1.0 - _total(costs, [int(np.argmin(cost)) for cost in costs]) / before
        raise ValueError(
            f"remove={remove!r} is out of reach: compressing these {len(items)} layers removes "
            f"at most {best:.1%} of their {by}"
        )
    attrs: dict[str, Any] = {}
    if evaluate is not None:
        choice, attrs = _refine(model, items, costs, target, choice, evaluate, progress)
    plan = _table(items, choice)
    plan.attrs.update(
        remove=float(remove),
        by=by,
        removed=1.0 - _total(costs, choice) / before,
        objective="spectral" if loss is None and measured is None else "gradient",
    )
    plan.attrs.update(attrs)
    return plan


def _gradient_penalties(
    model: nn.Module,
    layers: dict[str, PCALayer],
    items: list[_Layer],
    loss: Callable[[nn.Module, Any], Tensor],
    data: Iterable[Any],
    progress: bool | None = False,
) -> list[np.ndarray]:
    """Each planned layer's ``sum_{j > k} lambda_j s_j`` for ``k = 1..width`` (see ``budget_plan``)."""
    if not callable(loss):
        raise TypeError(f"loss must be callable as loss(model, batch), got {loss!r}")
    measure = _GradientMeasure({item.site.name for item in items if len(item.ks) > 1})
    before = {layer: layer.snapshot() for layer in layers.values()}
    try:
        compute_eigenvectors(layers.values(), progress)  # the directions weighed, side by side
        with measure.hooked(model, layers):
            batches = _backward_passes(model, loss, data, progress)
        if distributed_run():  # every process weighs its shard: sum over all
            batches = measure.all_reduce(items, batches)
        measure.check(batches)
    except BaseException:
        for layer, snapshot in before.items():  # as they were, eigenvectors pending included
            layer.restore(snapshot)
        raise
    return [_tail_penalties(item, measure.sums.get(item.site.name)) for item in items]


# the attribute of calibrate_sequential's spectra holding each layer's s_j (loss= given)
GRADIENT_MEASURE = "gradient_measure"
ZERO_GRADIENT = (
    "the loss's gradient is zero at every planned layer, so it cannot weigh their "
    "directions: a loss at its minimum (the distance to the model's own outputs, "
    "say) has none; use the task's loss, or (output * torch.randn_like(output)).sum()"
)


class _GradientMeasure:
    """``s_j``: the loss's gradient at each planned PCA layer, squared along its eigenvectors
    and summed over samples, measured while the layers pass their inputs through."""

    def __init__(self, planned: set[str]):
        self.planned = planned  # the layers with a choice of rank to weigh
        self.sums: dict[str, Tensor] = {}
        self.bases: dict[str, Tensor] = {}
        self.seen: set[str] = set()

    def pass_through(self, name: str, layer: PCALayer, args: tuple, output: Tensor) -> Tensor:
        """A forward hook's output: the layer's input, in the graph, cloned so that in-place
        operations after it stay legal; its gradient is measured."""
        if not layer.keepdim:
            return output  # the layers after expect its k features (it is never planned)
        x = args[0]
        y = (x if x.requires_grad else x.detach().requires_grad_()).clone()
        if name in self.planned:
            self.seen.add(name)
            y.register_hook(lambda g: self.add(name, layer, g))
        return y

    def add(self, name: str, layer: PCALayer, g: Tensor) -> None:
        rows = g.detach().movedim(layer.channel_dim, -1).reshape(-1, layer.width)
        if rows.dtype in (torch.float16, torch.bfloat16):
            rows = rows.float()
        basis = self.bases.get(name)
        if basis is None or basis.dtype != rows.dtype or basis.device != rows.device:
            basis = self.bases[name] = layer.eigenvectors.detach().to(rows.device, rows.dtype)
        along = (rows @ basis).to(torch.float64).square().sum(0)
        self.sums[name] = along if name not in self.sums else self.sums[name] + along

    @contextlib.contextmanager
    def hooked(self, model: nn.Module, layers: dict[str, PCALayer]) -> Iterator[None]:
        """The layers project (so the model runs as it will) but pass their inputs through,
        and no parameter takes a gradient; all put back on exit."""
        params = [(p, p.requires_grad) for p in model.parameters()]
        modes = [(layer, layer.mode) for layer in layers.values()]
        hooks = [
            layer.register_forward_hook(
                lambda module, args, output, name=name: self.pass_through(
                    name, module, args, output
                )
            )
            for name, layer in layers.items()
        ]
        try:
            for layer, _ in modes:
                layer.mode = "project"
            for p, _ in params:
                p.requires_grad_(False)
            yield
        finally:
            for hook in hooks:
                hook.remove()
            for layer, mode in modes:
                layer.mode = mode
            for p, flag in params:
                p.requires_grad_(flag)

    def all_reduce(self, items: list[_Layer], batches: int) -> int:
        """Sum the measures, the layers each process saw and its batches over all processes."""
        device = items[0].layer.eigenvectors.device
        width = [item.layer.eigenvectors.shape[1] for item in items]
        parts = [
            self.sums.get(item.site.name, torch.zeros(w)).to(device, torch.float64)
            for item, w in zip(items, width, strict=True)
        ]
        flags = [float(item.site.name in self.seen) for item in items] + [float(batches)]
        packed = torch.cat(parts + [torch.tensor(flags, dtype=torch.float64, device=device)])
        dist.all_reduce(packed)
        offsets = np.cumsum([0] + width)
        for item, start, end in zip(items, offsets[:-1], offsets[1:], strict=True):
            self.sums[item.site.name] = packed[start:end]
        *ran, total = packed[offsets[-1] :].tolist()
        self.seen = {item.site.name for item, flag in zip(items, ran, strict=True) if flag > 0}
        return int(round(total))

    def check(self, batches: int) -> None:
        """Refuse a measure that cannot weigh the plan, saying why."""
        if batches == 0:
            raise ValueError("data must hold at least one batch for loss, got none")
        missing = [name for name in self.planned if name not in self.seen]
        if missing:
            raise ValueError(
                f"loss(model, batch) never ran these planned layers: {', '.join(missing)}; "
                "restrict the plan with include="
            )
        if not any(bool(s.any()) for s in self.sums.values()):
            raise ValueError(ZERO_GRADIENT)


def _backward_passes(
    model: nn.Module,
    loss: Callable[[nn.Module, Any], Tensor],
    data: Iterable[Any],
    progress: bool | None,
) -> int:
    """One backward pass of ``loss(model, batch)`` per batch, checked; returns the batches run."""
    batches = 0
    sized = getattr(data, "__len__", None)
    total = len(data) if sized is not None else None  # type: ignore[arg-type]
    bar = progress_bar(progress, desc="weighing directions", unit="batch", total=total)
    with kept_modes(model), torch.inference_mode(False), torch.enable_grad(), bar:
        model.eval()
        for index, batch in enumerate(data):
            checked_loss(loss, model, batch, index, "any PCA layer's output").backward()
            batches += 1
            bar.update()
    return batches


def checked_loss(
    loss: Callable[[nn.Module, Any], Tensor], model: nn.Module, batch: Any, index: int, on: str
) -> Tensor:
    """``loss(model, batch)`` as a 0-d tensor, refused (naming batch ``index``) unless it is a
    finite scalar with a gradient; ``on``: what it must depend on, for the message."""
    value = loss(model, batch)
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise TypeError(
            f"loss(model, batch) must return a scalar tensor, got {value!r} for batch {index}"
        )
    if not torch.isfinite(value.detach()).all():
        raise ValueError(f"loss(model, batch) returned {float(value.detach())} for batch {index}")
    if not value.requires_grad:
        raise ValueError(
            f"loss(model, batch) does not depend on {on} (batch {index}); compute it from "
            "model(batch)"
        )
    return value.reshape(())


def _tail_penalties(item: _Layer, weights: Tensor | None) -> np.ndarray:
    """``sum_{j > k} lambda_j s_j`` at each of the item's candidate ranks ``k``."""
    values = item.layer.eigenvalues.detach().double().cpu().numpy()
    r = item.layer.eigenvectors.shape[1] if weights is None else len(weights)
    s = np.zeros(r) if weights is None else weights.cpu().numpy()
    contributions = values[:r] * s
    tail = np.concatenate([np.cumsum(contributions[::-1])[::-1], [0.0]])
    return tail[np.minimum(item.ks, r)]


def _table(items: list[_Layer], choice: list[int]) -> pd.DataFrame:
    rows = []
    for item, i in zip(items, choice, strict=True):
        rows.append(
            {
                "layer": item.site.name,
                "width": item.layer.width,
                "k": int(item.ks[i]),
                "action": str(item.actions[i]),
                "explained": 1.0 - float(item.loss[i]),
                "params_before": item.params_before,
                "params_after": int(item.params[i]),
                "macs_before": item.macs_before,
                "macs_after": int(item.macs[i]),
            }
        )
    return pd.DataFrame(rows, columns=list(PLAN_COLUMNS))


def _refine(
    model: nn.Module,
    items: list[_Layer],
    costs: list[np.ndarray],
    target: float,
    choice: list[int],
    evaluate: Callable[[nn.Module], float],
    progress: bool | None = False,
) -> tuple[list[int], dict[str, Any]]:
    """Reweight each layer's spectral loss by the metric's sensitivity to it, solve again."""
    if not callable(evaluate):
        raise TypeError(f"evaluate must be callable as evaluate(model), got {evaluate!r}")
    layers = {item.site.name: item.layer for item in items}
    full = [len(item.ks) - 1 for item in items]

    calls = 3 + sum(len(item.ks) > 1 for item in items)  # full rank, each layer alone, two plans
    bar = progress_bar(progress, desc="evaluating plans", unit="evaluation", total=calls)

    def score(ranks: list[int], what: str) -> float:
        apply_plan(model, _table(items, ranks))
        model.eval()
        values = metric_values(evaluate(model), what)
        bar.update()
        if len(values) != 1:
            raise TypeError(f"evaluate(model) must return one number here, got {values!r}")
        return next(iter(values.values()))

    with kept_modes(model), kept_thresholds(layers), folded(model, progress=progress), bar:
        reference = score(full, "full rank")
        drops = []
        for j, item in enumerate(items):
            if len(item.ks) == 1:  # full rank is its only rank
                drops.append(0.0)
                continue
            alone = list(full)
            alone[j] = choice[j]
            drops.append(max(reference - score(alone, f"{item.site.name} alone at its rank"), 0.0))
        planned = [float(item.penalty[i]) for item, i in zip(items, choice, strict=True)]
        rates = [d / p for d, p in zip(drops, planned, strict=True) if p > 0 and d > 0]
        typical = float(np.median(rates)) if rates else 1.0
        weights = [
            d / p if p > 0 and d > 0 else typical for d, p in zip(drops, planned, strict=True)
        ]
        weighted = [item.penalty * w for item, w in zip(items, weights, strict=True)]
        refined = _allocate(weighted, costs, target) or choice
        spectral_metric = score(choice, "the spectral plan")
        refined_metric = score(refined, "the refined plan")
    better = refined_metric > spectral_metric
    return (refined if better else choice), {
        "metric": max(spectral_metric, refined_metric),
        "metric_spectral": spectral_metric,
        "metric_refined": refined_metric,
        "refined": better,
    }


def _allocate(losses: list[np.ndarray], costs: list[np.ndarray], target: float) -> list[int] | None:
    """The ranks of least total loss within ``target``: a multiple-choice knapsack.

    Dynamic programming over the budget cut into ``buckets`` units, each
    layer's cost rounded up to whole units (so the answer always fits), then a
    greedy pass with the exact costs spends what the rounding left. Ranks whose
    cost is not below the layer's full-rank cost are never worth taking and are
    skipped, and so is every rank but the one of least loss (the first of equal
    losses) among those that cost the same whole units: it takes the others'
    place at every budget. A layer's thousands of ranks fall on a few dozen units
    (a 7B-shaped model's budget is cut into 7168 for its 224 layers), so the pass
    takes a few dozen steps a layer, not one per rank. None when no choice fits.
    """
    buckets = max(4096, 32 * len(losses))
    unit = target / buckets
    dp = np.zeros(buckets + 1)
    picks = []
    for loss, cost in zip(losses, costs, strict=True):
        full = len(cost) - 1
        options = np.append(np.flatnonzero(cost[:full] < cost[full]), full)
        units = np.ceil(cost[options] / unit - 1e-9).astype(np.int64)
        options, units = _cheapest_per_unit(options, units, loss, buckets)
        best = np.full(buckets + 1, np.inf)
        pick = np.zeros(buckets + 1, dtype=np.int64)
        for option, u in zip(options.tolist(), units.tolist(), strict=True):
            candidate = np.full(buckets + 1, np.inf)
            candidate[u:] = dp[: buckets + 1 - u] + loss[option]
            better = candidate < best
            best[better] = candidate[better]
            pick[better] = option
        dp = best
        picks.append(pick)
    if not np.isfinite(dp[buckets]):
        return None
    choice = [0] * len(losses)
    b = buckets
    for j in range(len(losses) - 1, -1, -1):
        option = int(picks[j][b])
        choice[j] = option
        b -= int(np.ceil(costs[j][option] / unit - 1e-9))
    # spend the rounding slack: single-layer moves to less loss, best loss saved per cost
    # first. A layer's best move stays its best while the spare does not grow and the move
    # still fits (the moves that fit only lose members): it is found again only then, or
    # once the layer has moved, not for every layer at every move.
    moves: list[tuple[float, int] | None] = [None] * len(losses)
    found_at = [-np.inf] * len(losses)  # the spare each layer's best move was found at
    while True:
        spare = target - _total(costs, choice)
        best_move, best_gain = None, 0.0
        for j, (loss, cost) in enumerate(zip(losses, costs, strict=True)):
            move = moves[j]
            if spare > found_at[j] or (
                move is not None and cost[move[1]] - cost[choice[j]] > spare
            ):
                moves[j] = move = _best_move(loss, cost, choice[j], spare)
                found_at[j] = spare
            if move is not None and move[0] > best_gain:
                best_move, best_gain = (j, move[1]), move[0]
        if best_move is None:
            return choice
        j, i = best_move
        choice[j], found_at[j] = i, -np.inf


def _best_move(
    loss: np.ndarray, cost: np.ndarray, current: int, spare: float
) -> tuple[float, int] | None:
    """``(loss saved per cost, rank)`` of the layer's best move from ``current`` that costs at
    most ``spare`` more and loses less (the first of the best); None where none does."""
    extra = cost - cost[current]
    gain = loss[current] - loss
    ok = (extra <= spare) & (gain > 0)
    if not ok.any():
        return None
    rate = np.where(ok, gain / np.maximum(extra, 1e-12), -np.inf)
    i = int(np.argmax(rate))
    return float(rate[i]), i


def _cheapest_per_unit(
    options: np.ndarray, units: np.ndarray, loss: np.ndarray, buckets: int
) -> tuple[np.ndarray, np.ndarray]:
    """Of ``options`` (ascending) and their costs in ``units``, those within ``buckets``
    that lose least among the options of their cost (the first of equal losses), in
    their order: the only ones the dynamic programme can pick."""
    within = units <= buckets
    options, units = options[within], units[within]
    order = np.lexsort((options, loss[options], units))  # by units, then loss, then rank
    first = np.ones(len(order), dtype=bool)
    first[1:] = units[order[1:]] != units[order[:-1]]
    kept = np.sort(order[first])
    return options[kept], units[kept]


def apply_plan(model: nn.Module, plan: pd.DataFrame) -> nn.Module:
    """Set every planned layer's threshold so that it keeps exactly the planned rank.

    The threshold of a layer at rank ``k`` is the fraction of variance its top
    ``k`` directions explain; other layers are left as they are. Returns ``model``.

    Raises:
        ValueError: the plan is not a ``budget_plan`` table, or names a layer the
            model does not have.
    """
    if not isinstance(plan, pd.DataFrame) or not {"layer", "k"} <= set(plan.columns):
        raise ValueError("plan must be a DataFrame from budget_plan (columns layer and k)")
    layers = calibrated_layers(model, "apply a plan")
    missing = [name for name in plan["layer"] if name not in layers]
    if missing:
        raise ValueError(f"the plan names layers this model does not have: {', '.join(missing)}")
    thresholds = {}
    for name, k in zip(plan["layer"], plan["k"], strict=True):
        layer = layers[name]
        k = int(k)
        # the fraction the top k carry; below 1, since 1 keeps every direction even
        # where the fractions round to 1 before the last one
        fraction = explained_fraction(layer.eigenvalues, k)
        thresholds[glob.escape(name)] = (
            1.0 if k >= layer.width else min(max(fraction, 1e-12), _BELOW_ONE)
        )
    set_threshold(model, thresholds)
    for name, k in zip(plan["layer"], plan["k"], strict=True):
        assert layers[name].in_dim <= int(k), (name, layers[name].in_dim, k)
    return model
