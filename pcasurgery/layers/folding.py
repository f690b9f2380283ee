"""A module and the PCA layer after it, run as one call with the projection folded in.

A PCA layer's projection is affine, ``y -> P y + q``. After a layer
``y = W x + b`` the pair is the layer ``x -> (P W) x + (P b + q)``: the same
shape as the module (``keepdim=True``) or smaller (``keepdim=False``), so a
projecting forward costs what the plain forward costs.

Folded weights are a cache, and a cache of weights can go stale in ways no
check sees cheaply (``p.data.add_(...)`` changes a weight without touching its
version counter). So, as ``torch.nn.utils.parametrize.cached()`` does, folds
exist only inside an explicit scope: within ``with pcasurgery.folded(model):``
an eval-mode call of a followed ``nn.Linear``, convolution (``groups=1``) or
transformers ``Conv1D`` runs as one call with folded weights, built when the
scope opens (:func:`prefold`) and dropped when it closes. Outside a scope every
eval forward runs the module, then the projection, and so always reads the
current weights. Inside one, a change of the projection (threshold, centring,
random directions) or of a weight's tensor, version counter, storage, dtype or
device (an optimiser step, ``.to()``) folds again at the next call; ``.data``
updates inside the scope are the caller's to avoid, as with ``parametrize``.
The folds are held apart from the modules (never saved, copied or pickled) and
cost one extra copy of the folded modules' weights while the scope is open.

Training (the layer collects), stale statistics, gradients, hooks on the PCA
layer (``count_macs``, tracking, a user's own), modules with their own forward
(a subclass's, or one set on the instance), and tracing or export run the
module and the layer apart, inside a scope too.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from functools import partial
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from .._progress import progress_bar, step
from ..core import spectrum as _s
from .decompose import compute_eigenvectors, side_by_side
from .kinds import LayerKind, foldable_kind, weight_matrix
from .pca import PCALayer, exporting
from .state import version_tokens

__all__ = [
    "cached_fold",
    "fold_scope",
    "folded_affine",
    "folded_forward",
    "largest_factorised_rank",
    "own_forward",
    "prefold",
]


def _hooked(pca: PCALayer) -> bool:
    """Whether a hook watches the PCA layer's calls (they must see it run)."""
    return bool(
        pca._forward_hooks
        or pca._forward_pre_hooks
        or _module._global_forward_hooks
        or _module._global_forward_pre_hooks
    )


def folded_affine(
    w: Tensor,
    b: Tensor,
    pca: PCALayer,
    rest: Tensor | None = None,
    compute: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """``(P W, P b + q)``: the projection of ``pca`` after ``x -> W x + b``, as one affine map.

    ``W`` is (outputs, inputs); the result is in its dtype, computed in ``compute``
    (default: the same). With ``V`` the kept basis and ``c`` the centre, ``P = V V^T``
    and ``q = c - P c`` (``keepdim=False``: ``P = V^T``, ``q = -V^T c``). The product
    is taken the cheapest way: through ``V`` (``V (V^T W)``), through ``P``, or, given
    ``rest`` (the dropped directions ``R`` that complete ``V`` to a basis of
    the range of ``W`` and ``b - c``: ``PCALayer.discarded_directions``), as
    ``W - R (R^T W)``, which for a layer that keeps most of its directions
    costs a fraction of the others. With ``compute`` float64 and a narrower ``W``,
    ``W`` is converted, and the result formed, a block of rows at a time: neither is
    ever held whole in float64 (``compress``: 88 MiB each for a 5632 x 2048 layer).
    """
    dtype = w.dtype
    if compute == torch.float64 and dtype != torch.float64:
        return _folded_by_rows(w, b, pca, rest)
    if compute is not None and compute != dtype:
        folded_w, folded_b = folded_affine(w.to(compute), b.to(compute), pca, rest)
        return folded_w.to(dtype), folded_b.to(dtype)
    v, c = pca.basis.to(w.device, w.dtype), pca.center().to(w.device, w.dtype)
    if not pca.keepdim:
        return v.T @ w, v.T @ (b - c)
    route = _route(v.shape, w.shape[1], rest)
    if route == "rest":
        r = rest.to(w.device, w.dtype)  # type: ignore[union-attr]
        return w - r @ (r.T @ w), b - r @ (r.T @ (b - c))
    if route == "basis":
        return v @ (v.T @ w), v @ (v.T @ (b - c)) + c
    p = v @ v.T
    return p @ w, p @ (b - c) + c


def _route(shape: tuple[int, ...], n: int, rest: Tensor | None) -> str:
    """The cheapest of :func:`folded_affine`'s products for a ``(d, k)`` basis and ``n``
    inputs: ``"rest"``, ``"basis"`` or ``"projection"``."""
    d, k = shape
    through_basis, through_projection = 2 * d * k * n, d * d * (k + n)  # multiply-accumulates
    if rest is not None and 2 * d * rest.shape[1] * n < min(through_basis, through_projection):
        return "rest"
    return "basis" if through_basis <= through_projection else "projection"


def _folded_by_rows(
    w: Tensor, b: Tensor, pca: PCALayer, rest: Tensor | None
) -> tuple[Tensor, Tensor]:
    """:func:`folded_affine` in float64 for a narrower ``w``, a block of its rows at a time."""
    f64 = torch.float64
    v, c, b = pca.basis.to(w.device, f64), pca.center().to(w.device, f64), b.to(f64)
    if not pca.keepdim:
        return _s.transposed_times_by_rows(v, w).to(w.dtype), (v.T @ (b - c)).to(w.dtype)
    route = _route(v.shape, w.shape[1], rest)
    if route == "rest":
        r = rest.to(w.device, f64)  # type: ignore[union-attr]
        m, folded = _s.transposed_times_by_rows(r, w), torch.empty_like(w)
        for rows, block in _s.row_blocks(w):
            folded[rows] = block - r[rows] @ m  # W - R R^T W
        return folded, (b - r @ (r.T @ (b - c))).to(w.dtype)
    if route == "basis":
        folded_w = _s.times_by_rows(v, _s.transposed_times_by_rows(v, w), w.dtype)
        return folded_w, (v @ (v.T @ (b - c)) + c).to(w.dtype)
    p = v @ v.T
    return _s.transposed_times_by_rows(p, w).to(w.dtype), (p @ (b - c) + c).to(w.dtype)


def largest_factorised_rank(fan_in: int, width: int) -> int:
    """The largest ``k`` at which ``fan_in -> k -> width`` (both with biases) is smaller than
    ``fan_in -> width``: ``k (fan_in + 1) + width (k + 1) < width (fan_in + 1)``, that is
    ``k (fan_in + width + 1) < width fan_in``. Every rank from 1 to it pays (0: none does).

    The rule ``compress`` factorises by (``compression.plan``), as one number, so that a
    plan prices every rank of a layer at once.
    """
    return (width * fan_in - 1) // (fan_in + width + 1)


def _runs_factorised(k: int, fan_in: int, width: int) -> bool:
    """Whether the eval fold runs as the pair: where it at least halves the multiply-accumulates.

    Two thin maps do fewer operations than one but each at a lower rate; where
    they save less than half (measured on ResNet-50's convolutions), one map is faster.
    """
    return 0 < k and 2 * k * (fan_in + width) <= fan_in * width


def _fold(kind: LayerKind, module: nn.Module, pca: PCALayer) -> tuple[Tensor, ...]:
    """The folded map in the module's own layout and dtype (computed in float32 or wider).

    ``(weight, bias)``: the module with the projection multiplied in. Or, with
    few kept directions (keepdim, :func:`_runs_factorised`), ``(weight, bias, V, c)``:
    the module's ``k``-output part ``V^T W``, ``V^T (b - c)``, then the layer's
    own map ``h -> V h + c`` back to the width, what ``compress`` builds.
    """
    weight = module.weight
    assert isinstance(weight, Tensor)
    dtype = weight.dtype
    w, b = weight_matrix(module, torch.promote_types(dtype, torch.float32))
    low_rank = pca.keepdim and _runs_factorised(pca.basis.shape[1], w.shape[1], w.shape[0])
    if low_rank:
        v, c = pca.basis.to(w.device, w.dtype), pca.center().to(w.device, w.dtype)
        folded_w, folded_b = v.T @ w, v.T @ (b - c)
    else:
        folded_w, folded_b = folded_affine(w, b, pca, pca.discarded_directions(module))
    folded = (kind.weight_from_matrix(folded_w.to(dtype), weight), folded_b.to(dtype))
    if low_rank:
        return folded + (v.to(dtype).contiguous(), c.to(dtype))
    return folded


def own_forward(module: nn.Module) -> bool:
    """Whether calling ``module`` runs its class's forward, so that its output is its weights' map.

    False where a forward set on the instance replaces it (a user's patch), except
    accelerate's hooks, which move the module's inputs, weights and outputs
    between devices around the class's forward (``_old_forward``) and compute the
    same map.
    """
    forward = module.__dict__.get("forward")
    if forward is None:
        return True
    if getattr(module, "_hf_hook", None) is None:
        return False
    old = getattr(module.__dict__.get("_old_forward"), "__func__", None)
    return old is not None and old is getattr(type(module), "forward", None)


def _foldable(module: nn.Module, pca: PCALayer) -> LayerKind | None:
    """The module's kind where the pair runs folded whenever its input allows, else None."""
    if (
        pca._collecting()
        or not pca._has_spectrum
        or pca._stale
        or pca._pending  # the layer computes its eigenvectors at its first (unfolded) call
        or exporting()
        or _hooked(pca)
    ):
        return None
    kind = foldable_kind(module)
    weight, bias = module.weight, module.bias
    if (
        kind is None
        or "forward" in module.__dict__
        or not isinstance(weight, Tensor)
        or weight.is_meta  # offloaded between calls (accelerate): loaded only in its forward
        or pca.projection_weight.dtype != weight.dtype
    ):
        return None
    if bias is not None and not isinstance(bias, Tensor):
        return None
    return kind


# The folds of the modules inside an open scope: ``module -> (tensors, key, folded)``, and
# how many open scopes hold each module. Weak keys: a fold lives no longer than its module,
# and, held apart from the module, it is never copied, pickled or saved with it.
_FOLDS: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()
_SCOPES: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


def cached_fold(module: nn.Module) -> tuple[Tensor, ...] | None:
    """The folded map ``module`` runs with now, or None where it has none (outside a scope)."""
    entry = _FOLDS.get(module)
    return None if entry is None else entry[2]


def _cache_key(module: nn.Module, pca: PCALayer) -> tuple[tuple, tuple]:
    tensors = (module.weight, module.bias, pca.projection_weight, pca.projection_bias)
    return tensors, version_tokens(tensors)  # type: ignore[arg-type]  # _foldable checked them


def _build(kind: LayerKind, module: nn.Module, pca: PCALayer) -> tuple:
    """The cache entry: the key's tensors, the key, the folded map."""
    tensors, key = _cache_key(module, pca)
    with torch.inference_mode(False), torch.no_grad():
        return (tensors, key, _fold(kind, module, pca))


def prefold(pairs: Iterable[tuple[nn.Module, PCALayer]], progress: bool | None = False) -> None:
    """Fold every ``(module, pca)`` pair that would run folded now, instead of at its first call.

    What opening a scope does, so that the first projecting forward in it costs
    what a plain one does. CPU folds are built side by side on one-thread
    workers (``layers.decompose.side_by_side``), the largest weights first, under a
    bar that advances by each weight's size. Either every fold is stored or, on
    an error, none.
    """
    pairs = list(pairs)
    compute_eigenvectors([pca for _, pca in pairs if not pca._stale], progress)
    jobs = [(module, pca, kind) for module, pca in pairs if (kind := _foldable(module, pca))]
    jobs.sort(key=lambda job: -cast(Tensor, job[0].weight).numel())  # _foldable checked it
    built: dict[int, tuple] = {}
    sizes = [float(cast(Tensor, module.weight).numel()) for module, *_ in jobs]

    def job(i: int) -> None:
        module, pca, kind = jobs[i]
        built[i] = _build(kind, module, pca)

    on_cpu = [module.weight.device.type == "cpu" for module, *_ in jobs]
    cpu = [i for i, here in enumerate(on_cpu) if here]
    with progress_bar(
        progress, desc="folds", unit="layer", total=sum(sizes), steps=len(jobs)
    ) as bar:
        side_by_side([partial(job, i) for i in cpu], on_done=lambda j: step(bar, sizes[cpu[j]]))
        for i, here in enumerate(on_cpu):
            if not here:
                job(i)
                step(bar, sizes[i])
    for i, (module, _, _) in enumerate(jobs):
        _FOLDS[module] = built[i]


@contextlib.contextmanager
def fold_scope(
    pairs: list[tuple[nn.Module, PCALayer]], progress: bool | None = False
) -> Iterator[None]:
    """Within the block, the ``(module, pca)`` pairs run folded (built now); their folds go at its end.

    Scopes nest: a pair's fold is dropped when the last scope holding it closes.
    """
    modules = [module for module, _ in pairs]
    for module in modules:
        _SCOPES[module] = _SCOPES.get(module, 0) + 1
    try:
        prefold(pairs, progress)
        yield
    finally:
        for module in modules:
            depth = _SCOPES.get(module, 1) - 1
            if depth > 0:
                _SCOPES[module] = depth
            else:
                _SCOPES.pop(module, None)
                _FOLDS.pop(module, None)


def folded_forward(
    module: nn.Module, pca: PCALayer, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Tensor | None:
    """``pca(module(x))`` as one call of ``module`` with folded weights, or None where that does not apply."""
    if module not in _SCOPES or kwargs or len(args) != 1 or not isinstance(args[0], Tensor):
        return None
    kind = _foldable(module, pca)
    if kind is None:
        return None
    x = args[0]
    weight, bias = module.weight, module.bias
    assert isinstance(weight, Tensor)
    if x.dtype != weight.dtype:
        return None
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return None
    tensors, key = _cache_key(module, pca)
    cached = _FOLDS.get(module)
    if (
        cached is None
        or cached[1] != key
        or any(a is not b for a, b in zip(cached[0], tensors, strict=True))
    ):
        cached = _FOLDS[module] = _build(kind, module, pca)
    w, b, *up = cached[2]
    out = kind.run(module, x, w, b)
    return pca._map(out, *up) if up else out
