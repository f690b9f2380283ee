"""A module and the PCA layer after it, run as one call with the projection folded in.

A PCA layer's projection is affine, ``y -> P y + q``. After a layer
``y = W x + b`` the pair is the layer ``x -> (P W) x + (P b + q)``: the same
shape as the module (``keepdim=True``) or smaller (``keepdim=False``), so a
projecting forward costs what the plain forward costs. In eval mode, with no
gradient needed, a followed ``nn.Linear``, ``nn.Conv2d`` (``groups=1``) or
transformers ``Conv1D`` runs folded: ``calibrate`` builds the folds at its end
(:func:`prefold`), and after a change a pair folds again once it has projected
as many rows (tokens, pixels) apart as the module has inputs, which is about
what folding costs. The folded weights are cached on the module (never saved,
copied or pickled) and rebuilt when the module's weights or the layer's
projection change: the cache is keyed on the identity, version counter and
storage of each of the four tensors, which every change of threshold,
centring, random directions, a ``.to()`` or an optimiser step alters. The
cache holds one extra copy of the module's weights.

Training (the layer collects), stale statistics, gradients, hooks on the PCA
layer (``count_macs``, tracking, a user's own), subclasses with their own
forward, and tracing or export run the module and the layer apart.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

from .kinds import affine_kind, weight_matrix
from .pca import PCALayer, _exporting, _tokens, side_by_side

__all__ = ["factorising_pays", "folded_affine", "folded_forward", "prefold"]

_CACHE = "_pcasurgery_fold"


def _hooked(pca: PCALayer) -> bool:
    """Whether a hook watches the PCA layer's calls (they must see it run)."""
    return bool(
        pca._forward_hooks
        or pca._forward_pre_hooks
        or _module._global_forward_hooks
        or _module._global_forward_pre_hooks
    )


def folded_affine(
    w: Tensor, b: Tensor, pca: PCALayer, rest: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(P W, P b + q)``: the projection of ``pca`` after ``x -> W x + b``, as one affine map.

    ``W`` is (outputs, inputs) and the result is computed in its dtype. With
    ``V`` the kept basis and ``c`` the centre, ``P = V V^T`` and ``q = c - P c``
    (``keepdim=False``: ``P = V^T``, ``q = -V^T c``). The product is taken
    the cheapest way: through ``V`` (``V (V^T W)``), through ``P``, or, given
    ``rest`` (the dropped directions ``R`` that complete ``V`` to a basis of
    the range of ``W`` and ``b - c``: ``PCALayer._discarded``), as
    ``W - R (R^T W)``, which for a layer that keeps most of its directions
    costs a fraction of the others.
    """
    v, c = pca.basis.to(w.device, w.dtype), pca.center().to(w.device, w.dtype)
    if not pca.keepdim:
        return v.T @ w, v.T @ (b - c)
    (d, k), n = v.shape, w.shape[1]
    through_basis, through_projection = 2 * d * k * n, d * d * (k + n)  # multiply-accumulates
    if rest is not None and 2 * d * rest.shape[1] * n < min(through_basis, through_projection):
        r = rest.to(w.device, w.dtype)
        return w - r @ (r.T @ w), b - r @ (r.T @ (b - c))
    if through_basis <= through_projection:
        return v @ (v.T @ w), v @ (v.T @ (b - c)) + c
    p = v @ v.T
    return p @ w, p @ (b - c) + c


def factorising_pays(k: int, fan_in: int, width: int) -> bool:
    """Whether ``fan_in -> k -> width`` (both with biases) is smaller than ``fan_in -> width``.

    The rule ``compress`` factorises by, and the eval-mode fold runs by.
    """
    return 0 < k and k * (fan_in + 1) + width * (k + 1) < width * (fan_in + 1)


def _runs_factorised(k: int, fan_in: int, width: int) -> bool:
    """Whether the eval fold runs as the pair: where it at least halves the multiply-accumulates.

    Two thin maps do fewer operations than one but each at a lower rate; where
    they save less than half (measured on ResNet-50's convolutions), one map is faster.
    """
    return 0 < k and 2 * k * (fan_in + width) <= fan_in * width


def _fold(kind: str, module: nn.Module, pca: PCALayer) -> tuple[Tensor, ...]:
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
        folded_w, folded_b = folded_affine(w, b, pca, pca._discarded(module))
    if kind == "conv1d":
        folded_w = folded_w.T
    else:
        folded_w = folded_w.reshape(folded_w.shape[0], *weight.shape[1:])
    folded = (folded_w.to(dtype).contiguous(), folded_b.to(dtype))
    if low_rank:
        return folded + (v.to(dtype).contiguous(), c.to(dtype))
    return folded


def _foldable(module: nn.Module, pca: PCALayer) -> str | None:
    """The module's affine kind where the pair runs folded whenever its input allows, else None."""
    if pca._collecting() or not pca._has_spectrum or pca._stale or _exporting() or _hooked(pca):
        return None
    kind = affine_kind(module)
    weight, bias = module.weight, module.bias
    if (
        kind is None
        or not isinstance(weight, Tensor)
        or pca.projection_weight.dtype != weight.dtype
    ):
        return None
    if bias is not None and not isinstance(bias, Tensor):
        return None
    return kind


def _cache_key(module: nn.Module, pca: PCALayer) -> tuple[tuple, tuple]:
    tensors = (module.weight, module.bias, pca.projection_weight, pca.projection_bias)
    return tensors, _tokens(tensors)  # type: ignore[arg-type]  # _foldable checked them


def _build(kind: str, module: nn.Module, pca: PCALayer, rows: int) -> tuple:
    """The cache entry: the key's tensors, the key, the folded map, the rows seen."""
    tensors, key = _cache_key(module, pca)
    with torch.inference_mode(False), torch.no_grad():
        return (tensors, key, _fold(kind, module, pca), rows)


def prefold(pairs: Iterable[tuple[nn.Module, PCALayer]]) -> None:
    """Fold every ``(module, pca)`` pair that would run folded now, instead of at its first call.

    ``calibrate`` does this last, so that the first projecting forward after it
    costs what a plain one does: building a fold costs about what projecting
    as many rows as the module has inputs does, which on a batch of 1024
    tokens is most of a transformer projection's own cost. CPU folds are built
    side by side on one-thread workers (``layers.pca.side_by_side``), the
    largest weights first. Either every fold is stored or, on an error, none.
    """
    jobs = [(module, pca, kind) for module, pca in pairs if (kind := _foldable(module, pca))]
    jobs.sort(key=lambda job: -cast(Tensor, job[0].weight).numel())  # _foldable checked it
    built: dict[int, tuple] = {}

    def job(i: int) -> None:
        module, pca, kind = jobs[i]
        built[i] = _build(kind, module, pca, 0)

    on_cpu = [module.weight.device.type == "cpu" for module, *_ in jobs]
    side_by_side([partial(job, i) for i, cpu in enumerate(on_cpu) if cpu])
    for i, cpu in enumerate(on_cpu):
        if not cpu:
            job(i)
    for i, (module, _, _) in enumerate(jobs):
        module.__dict__[_CACHE] = built[i]


def folded_forward(
    module: nn.Module, pca: PCALayer, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Tensor | None:
    """``pca(module(x))`` as one call of ``module`` with folded weights, or None where that does not apply."""
    if kwargs or len(args) != 1 or not isinstance(args[0], Tensor):
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
    cached = module.__dict__.get(_CACHE)
    if (
        cached is None
        or cached[1] != key
        or any(a is not b for a, b in zip(cached[0], tensors, strict=True))
    ):
        cached = (tensors, key, None, 0)
    if cached[2] is None:
        # Folding costs about what projecting as many rows as the module has inputs
        # does: project apart until that many rows have come (a first forward on a
        # small batch never pays for a fold it may not need again).
        rows = cached[3] + x.numel() // max(1, x.shape[1 if kind == "conv2d" else -1])
        if rows < weight.numel() // weight.shape[1 if kind == "conv1d" else 0]:
            module.__dict__[_CACHE] = (tensors, key, None, rows)
            return None
        cached = _build(kind, module, pca, rows)
        module.__dict__[_CACHE] = cached
    folded = cached[2]
    assert folded is not None
    w, b, *up = folded
    if kind == "linear":
        out = F.linear(x, w, b)
    elif kind == "conv2d":
        assert isinstance(module, nn.Conv2d)
        out = module._conv_forward(x, w, b)
    else:
        out = torch.addmm(b, x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[1])
    return pca._map(out, *up) if up else out
