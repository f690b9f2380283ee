"""Network-wide operations on the PCA layers of a model.

One implementation serves both the pcasurgery API (``set_threshold``,
``set_centering``, ``inject_random_directions``, ``pca_layers_of``) and the seed
library's ``change_all_pca_layer_*`` functions.

Layer names: a layer inserted by ``pca_wrap`` is named after the module whose
output it projects (``"layer1.0.conv1"``); a layer placed by hand is named by its
own qualified name in the model. ``include`` filters are ``fnmatch`` globs on
those names (``"layer1.*"``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
from torch import nn

from .._errors import NotCalibratedError
from .._progress import check_progress
from .._validation import check_bool, check_module, check_patterns, check_seed, check_threshold
from .folding import fold_scope
from .pca import Conv2DPCALayer, LinearPCALayer, PCALayer  # noqa: F401  (doctests)
from .sites import fold_pairs, sites_of

__all__ = [
    "change_all_pca_layer_centering",
    "folded",
    "change_all_pca_layer_thresholds",
    "change_all_pca_layer_thresholds_and_inject_random_directions",
    "inject_random_directions",
    "pca_layers_of",
    "set_centering",
    "set_threshold",
]

log = logging.getLogger("pcasurgery")


def pca_layers_of(model: nn.Module) -> OrderedDict[str, PCALayer]:
    """The PCA layers of ``model`` in forward order, keyed by name.

    The names and the order are those of the record ``pca_wrap`` left
    (``sites_of``): forward order for models it rewrote with ``torch.fx``,
    module-registration order otherwise.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), LinearPCALayer(3))
        >>> list(pca_layers_of(net))
        ['1']
    """
    check_module(model)
    layers: OrderedDict[str, PCALayer] = OrderedDict()
    for site in sites_of(model):
        layer = model.get_submodule(site.layer_path)
        assert isinstance(layer, PCALayer), site
        layers[site.name] = layer
    return layers


@contextlib.contextmanager
def folded(model: nn.Module, *, progress: bool | None = None) -> Iterator[nn.Module]:
    """Within the block, ``model``'s eval forwards run with each projection folded into its module.

    A projecting forward outside this block runs every followed module, then its
    projection, so it always reads the module's current weights (in-place
    ``.data`` updates included) and costs up to twice the plain forward on
    transformer projections (a few percent on 3x3 convolutions). Inside it, a
    followed ``nn.Linear``, convolution (``groups=1``) or transformers
    ``Conv1D`` runs as one call with its projection multiplied into its weights,
    which costs what the plain forward costs: the folds are built when the block
    opens (side by side on the CPU's cores), kept while it is open, and dropped
    when it closes, as ``torch.nn.utils.parametrize.cached()`` keeps its weights.
    Inside, a new threshold, centring or random directions, an optimiser step or
    a ``.to()`` folds again at the next call; a change that bypasses the version
    counter (``p.data.copy_(...)``) is not seen until the block is left. Blocks nest.

    ``sweep``, ``allocate`` and ``budget_plan(evaluate=...)`` call their metric
    inside this block.

    Args:
        model: a model with PCA layers.
        progress: a bar over the folds built as the block opens (``None``: in a
            terminal, after two seconds; see ``calibrate``).

    Yields:
        ``model``.

    Raises:
        ValueError: the model has no PCA layer.

    Example:
        >>> import torch
        >>> from pcasurgery import calibrate, pca_wrap
        >>> wrapped = calibrate(pca_wrap(nn.Sequential(nn.Linear(8, 8))), [torch.randn(64, 8)],
        ...                     progress=False).eval()
        >>> x = torch.randn(4, 8)
        >>> with torch.no_grad(), folded(wrapped):
        ...     fast = wrapped(x)
        >>> torch.allclose(fast, wrapped(x).detach(), atol=1e-5)
        True
    """
    check_module(model)
    if not pca_layers_of(model):
        raise ValueError(f"model has no PCA layer to fold: {type(model).__name__}")
    progress = check_progress(progress)
    with fold_scope(fold_pairs(model), progress):
        yield model


def _select_layers(
    model: nn.Module, include: str | Iterable[str] | None = None
) -> OrderedDict[str, PCALayer]:
    """The PCA layers of ``model`` whose names match any glob of ``include`` (all when None)."""
    layers = pca_layers_of(model)
    patterns = check_patterns(include, "include")
    if patterns is None:
        return layers
    chosen = OrderedDict(
        (name, layer)
        for name, layer in layers.items()
        if any(fnmatch.fnmatchcase(name, p) for p in patterns)
    )
    if not chosen:
        raise ValueError(
            f"include={include!r} matches no PCA layer; the layers are: {', '.join(layers) or 'none'}"
        )
    return chosen


def require_layers(layers: Mapping[str, PCALayer]) -> None:
    """Raise ``ValueError`` unless ``layers`` (from :func:`pca_layers_of`) holds a PCA layer."""
    if not layers:
        raise ValueError("model has no PCA layer; wrap it first with pcasurgery.pca_wrap")


def calibrated_layers(model: nn.Module, action: str = "continue") -> OrderedDict[str, PCALayer]:
    """The PCA layers of ``model``, in forward order, all of which have statistics.

    Raises:
        TypeError: ``model`` is not a module.
        ValueError: it has no PCA layer.
        NotCalibratedError: some layers have no statistics; ``action`` and their names are said.
    """
    layers = pca_layers_of(check_module(model))
    require_layers(layers)
    missing = [name for name, layer in layers.items() if not layer.is_calibrated]
    if missing:
        raise NotCalibratedError(
            f"cannot {action}: PCA layers without statistics: {', '.join(missing)}; "
            "run pcasurgery.calibrate first"
        )
    return layers


def set_threshold(
    model: nn.Module,
    threshold: float | Mapping[str, float],
    include: str | Iterable[str] | None = None,
) -> nn.Module:
    """Set the variance threshold of every PCA layer, using the stored statistics.

    Args:
        model: a model with PCA layers.
        threshold: one fraction in (0, 1] for all layers, or a mapping
            ``{glob: threshold}``; with a mapping, each layer takes the value of
            the last glob that matches its name, and unmatched layers keep theirs.
        include: restrict to layers whose names match these globs.

    Returns:
        ``model``.

    Example:
        >>> import torch
        >>> net = nn.Sequential(nn.Linear(4, 8), LinearPCALayer(8), nn.Linear(8, 3), LinearPCALayer(3))
        >>> _ = net(torch.randn(64, 4))  # training mode: the PCA layers collect
        >>> _ = set_threshold(net, {"*": 0.99, "3": 0.5})
        >>> [layer.threshold for layer in pca_layers_of(net).values()]
        [0.99, 0.5]
    """
    layers = _select_layers(check_module(model), include)
    require_layers(layers)
    if isinstance(threshold, Mapping):
        per_layer = {}
        for pattern, value in threshold.items():
            if not isinstance(pattern, str):
                raise TypeError(f"threshold mapping keys must be glob strings, got {pattern!r}")
            value = check_threshold(value, f"threshold[{pattern!r}]")
            matched = [n for n in layers if fnmatch.fnmatchcase(n, pattern)]
            if not matched:
                raise ValueError(
                    f"threshold pattern {pattern!r} matches no PCA layer; the layers are: {', '.join(layers)}"
                )
            per_layer.update(dict.fromkeys(matched, value))
        for name, value in per_layer.items():
            layers[name].threshold = value
        return model
    value = check_threshold(threshold)
    for layer in layers.values():
        layer.threshold = value
    return model


def set_centering(
    model: nn.Module, centering: bool, include: str | Iterable[str] | None = None
) -> nn.Module:
    """Switch every PCA layer between centred PCA (True) and uncentred (False); returns ``model``."""
    check_bool(centering, "centering")
    layers = _select_layers(check_module(model), include)
    require_layers(layers)
    for layer in layers.values():
        layer.centering = centering
    return model


def inject_random_directions(
    model: nn.Module,
    seed: int | np.random.Generator | None = None,
    include: str | Iterable[str] | None = None,
) -> nn.Module:
    """Replace every projection by one onto a random subspace of the same ``k`` (a control).

    Args:
        model: a calibrated model with PCA layers.
        seed: an int or ``numpy.random.Generator`` for reproducible subspaces.
        include: restrict to layers whose names match these globs.

    Returns:
        ``model``. Setting a threshold or the centering restores the PCA projections.
    """
    seed = check_seed(seed)
    layers = _select_layers(check_module(model), include)
    require_layers(layers)
    rng = np.random.default_rng(seed) if seed is not None else None
    for layer in layers.values():
        layer.inject_random_directions(rng)
    return model


# ---------------------------------------------------------------------------
# The seed library's functions, with its signatures and return values.


def _seed_names(layers: Iterable[PCALayer], linear_prefix: str) -> list[str]:
    counts = {"lin": 0, "conv": 0}
    names = []
    for layer in layers:
        if layer.spatial_dims:
            names.append(f"Conv-{counts['conv']}")
            counts["conv"] += 1
        else:
            names.append(f"{linear_prefix}-{counts['lin']}")
            counts["lin"] += 1
    return names


def _summary(layers: Iterable[PCALayer]) -> tuple[list, list, list]:
    layers = list(layers)
    return [m.sat for m in layers], [m.in_dim for m in layers], [m.fs_dim for m in layers]


def change_all_pca_layer_thresholds(threshold: float, network: nn.Module, verbose: bool = False):
    """Set ``threshold`` on every PCA layer of ``network``.

    Returns:
        ``(sat, in_dims, fs_dims, names)``: saturation in percent, ``k``, width and
        a name (``"Lin-0"``, ``"Conv-0"``, ...) per layer, in module order.
    """
    layers = [m for m in check_module(network, "network").modules() if isinstance(m, PCALayer)]
    value = check_threshold(threshold)
    for layer in layers:
        layer.threshold = value
        if verbose:
            log.info("changed threshold for layer %s to %s", layer.name, value)
    return (*_summary(layers), _seed_names(layers, "Lin"))


def change_all_pca_layer_thresholds_and_inject_random_directions(
    threshold: float,
    network: nn.Module,
    verbose: bool = False,
    device="cpu",
    include_names: bool = False,
):
    """Set ``threshold`` everywhere, then project onto random subspaces of the same ``k``.

    ``device`` is accepted for compatibility: the projections stay where the
    layers are.

    Returns:
        ``(sat, in_dims, fs_dims)``, plus ``names`` (``"Linear-0"``, ``"Conv-0"``)
        when ``include_names``.
    """
    layers = [m for m in check_module(network, "network").modules() if isinstance(m, PCALayer)]
    value = check_threshold(threshold)
    for layer in layers:
        layer.threshold = value
        layer.inject_random_directions()
        if verbose:
            log.info("changed threshold for layer %s to %s (random directions)", layer.name, value)
    result = _summary(layers)
    return (*result, _seed_names(layers, "Linear")) if include_names else result


def change_all_pca_layer_centering(
    centering: bool, network: nn.Module, verbose: bool = False, downsampling=None
):
    """Set ``centering`` on every PCA layer (and ``downsampling`` on the conv ones).

    Returns:
        ``(sat, in_dims, fs_dims)``.
    """
    check_bool(centering, "centering")
    layers = [m for m in check_module(network, "network").modules() if isinstance(m, PCALayer)]
    for layer in layers:
        layer.centering = centering
        if isinstance(layer, Conv2DPCALayer):
            layer.downsampling = downsampling
        if verbose:
            log.info("changed centering for layer %s to %s", layer.name, centering)
    return _summary(layers)
