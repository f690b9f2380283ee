"""``calibrate``: stream data through a wrapped model and compute every eigenspace.

Calibration runs under ``torch.inference_mode`` with the model in eval mode
(BatchNorm statistics untouched, dropout off) while the PCA layers collect into
fresh statistics; afterwards every module's train/eval flag and every PCA
layer's mode are restored.

It is a transaction. The layers' previous state is kept aside (by reference:
PCA layers replace their buffers rather than change them, see
``PCALayer``) until every eigenspace is computed; if anything fails or is
interrupted, KeyboardInterrupt included, the model is put back exactly as it
was (statistics, eigenspaces, thresholds, modes, flags, and its device) and the
exception propagates with its own type, the batch index added as a note.

Under an initialised ``torch.distributed`` process group the new statistics are
all-reduced before the eigendecomposition, so every rank ends with the
eigenspaces of the union of all ranks' data. A rank with no batch takes part
like any other. With ``reset=False`` the previous statistics are added once:
statistics that already are a union over the group (from an earlier
distributed calibration) are merged after the all-reduce, local ones are
reduced with the new data.

Token batches: when a dict batch carries an ``attention_mask`` (the
transformers convention), Linear PCA layers collect only the positions where it
is 1, so a padded batch and the same sequences unpadded give the same
statistics (``pcasurgery.layers.pca.token_mask``).

An LLM's output layer (its LM head), which no PCA layer follows, runs on the
first batch only: later batches stop as it is about to run, where the first
batch showed that every PCA layer has run by then (``surgery.tail``).
"""

from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._batches import attention_mask, examples_in, map_tensors, run_batch, to_device, truncate
from .._errors import add_context
from .._progress import check_progress, progress_bar
from .._validation import (
    check_bool,
    check_device,
    check_module,
    check_positive_int,
    kept_modes,
)
from ..core import moments as _m
from ..layers.decompose import compute_eigenspaces, problem_width
from ..layers.network import pca_layers_of, require_layers
from ..layers.offload import offloaded, resident
from ..layers.pca import PCALayer
from ..layers.sites import sites_of
from ..layers.state import LayerSnapshot
from ..layers.statistics import token_mask
from ..layers.through import InputStatistics, held_bytes, input_statistics
from .tail import TailSkip

__all__ = ["all_reduce_statistics", "calibrate"]

log = logging.getLogger("pcasurgery")


def _model_device(model: nn.Module) -> torch.device | None:
    tensors = itertools.chain(model.parameters(), model.buffers())
    return next((t.device for t in tensors), None)


def distributed_run() -> bool:
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def all_reduce_statistics(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Replace every PCA layer's statistics by their sum over all ranks of ``group``, exactly.

    Every rank must call this with the same model structure; afterwards each
    layer holds the statistics of the union. ``calibrate`` does this for you.
    """
    layers = list(pca_layers_of(check_module(model)).values())
    states = [layer.statistics() for layer in layers]
    reduced, summed, _ = _reduce(states, [layer.summed_statistics() for layer in layers], group, 0)
    for layer, state, sums in zip(layers, reduced, summed, strict=True):
        layer.load_statistics(state, summed=sums, shared=True)


def _reduce(
    states: list[_m.Moments],
    sums: list[dict[str, int]],
    group: dist.ProcessGroup | None,
    batches: int,
) -> tuple[list[_m.Moments], list[dict[str, int]], int]:
    """All-reduce ``states``, and alongside them the layers' summed statistics and ``batches``.

    Returns the moments of the union, each layer's summed statistics (those the
    state table declares ``reduce="sum"``) and the total number of batches.
    """
    names = [list(layer_sums) for layer_sums in sums]
    values = [float(v) for layer_sums in sums for v in layer_sums.values()]
    device = states[0].shift.device if states else None
    extra = torch.tensor(values + [float(batches)], dtype=torch.float64, device=device)

    def reduce(t: Tensor) -> None:
        dist.all_reduce(t, group=group)

    merged, total = _m.all_reduce_moments(states, reduce, extra)
    assert total is not None
    totals = iter(int(round(v)) for v in total.tolist())
    summed = [{name: next(totals) for name in layer_names} for layer_names in names]
    return merged, summed, next(totals)


class _Snapshot:
    """Everything calibration may change in a model, by reference (nothing is copied).

    Module buffers and parameter data are kept as the tensors they are, and
    each PCA layer keeps its own snapshot (``LayerState.snapshot``); moving the
    model replaces tensors too, so putting the references back restores the
    model. Train/eval flags are kept by ``kept_modes`` around the whole call.
    """

    def __init__(self, model: nn.Module, layers: Iterable[PCALayer], *, complete: bool):
        self.layers = {layer: layer.snapshot(complete=complete) for layer in layers}
        self.modules = [
            (
                m,
                dict(m._buffers),
                dict(m._parameters),
                {k: p.data for k, p in m._parameters.items() if p is not None},
            )
            for m in model.modules()
            if m not in self.layers
        ]

    def of(self, layer: PCALayer) -> LayerSnapshot:
        """The layer as it was before calibration."""
        return self.layers[layer]

    def restore_modes(self) -> None:
        """Put every PCA layer's mode back."""
        for layer, snapshot in self.layers.items():
            layer.mode = snapshot.mode

    def restore(self) -> None:
        with torch.no_grad():
            for m, buffers, params, data in self.modules:
                m._buffers.clear()
                m._buffers.update(buffers)
                m._parameters.clear()
                m._parameters.update(params)
                for name, tensor in data.items():
                    param = params[name]
                    if param is not None and param.data is not tensor:
                        param.data = tensor
        for layer, snapshot in self.layers.items():
            layer.restore(snapshot)


def calibrate(
    model: nn.Module,
    data: Iterable[Any],
    *,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    max_samples: int | None = None,
    progress: bool | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    reset: bool = True,
    eigenvectors: bool = False,
    skip_tail: bool = True,
) -> nn.Module:
    """Stream ``data`` through ``model``, fill the PCA layers' statistics, compute their eigenspaces.

    Args:
        model: a model with PCA layers (``pca_wrap``'s result, or hand-placed layers).
        data: an iterable of batches: a tensor, a tuple/list whose first item is
            the input (labels are ignored), or a dict passed as keyword arguments.
            A dict's ``attention_mask`` (``(batch, tokens)``, 0 for padding)
            keeps padded positions out of every statistic.
        device: move the model and every batch there first (non-blocking copies
            from pinned memory on CUDA). By default batches go to the model's device.
        max_batches: stop after this many batches.
        max_samples: stop after this many input examples (batch rows, not conv
            positions); the last batch is cut to fit.
        progress: tqdm bars: the batches (with the throughput in samples/s), then
            the decompositions (over the layers, advancing by each one's cost).
            None (the default): on standard error when it is a terminal and the
            ``CI`` environment variable is unset, once a step has run for two
            seconds; True: always; False: never.
        forward: ``forward(model, batch)`` runs one batch, for other batch layouts
            (batches of any type are then accepted; ``max_samples`` still needs
            batches holding a tensor).
        reset: start from fresh statistics (True) or add to those collected before.
        eigenvectors: compute the eigenvectors now, in one decomposition with the
            eigenvalues, instead of at their first use (a projection, a fold,
            ``compress``): for a model about to project or be compressed, where the
            eigenvalues alone (what ``report`` and a spectral plan read) would be
            computed twice.
        skip_tail: from the second batch on, stop each forward as the model's output
            layer (an LLM's LM head, ``model.get_output_embeddings()``) is about to run,
            where no PCA layer is left to see its work: where the first batch called it
            once, after every PCA layer, and every layer has been called as often as
            in that batch (``surgery.tail``). The statistics are the same. False runs
            every batch whole. Only with the default ``forward``.

    Returns:
        ``model``, with every PCA layer's eigenspace computed and its train/eval
        flags restored.

    Raises:
        TypeError, ValueError: bad arguments; no PCA layer; data with no batch
            (on every rank, under ``torch.distributed``); layers that saw no data.
        NonFiniteError: a layer received NaN or infinite activations (a
            ``ValueError`` naming the layer).
        Exception: whatever the model or the data raised, with its own type and
            the batch index added as a note. In every case the model is left
            exactly as it was before the call.

    Warns:
        UserWarning: naming the layers that saw fewer sample rows than their
            spectrum can have directions (their width, or a widening layer's input
            width): their spectra are those of the data seen.

    Example:
        >>> from pcasurgery import pca_wrap
        >>> net = pca_wrap(nn.Sequential(nn.Linear(8, 4)), 0.9)
        >>> data = [torch.randn(32, 8) for _ in range(4)]
        >>> calibrate(net, data, progress=False).get_submodule("0.pca").samples
        128
    """
    check_module(model)
    if isinstance(data, (Tensor, str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(
            "data must be an iterable of batches (a DataLoader, a list of tensors, ...), "
            f"got {type(data).__name__}"
        )
    max_batches = check_positive_int(max_batches, "max_batches", allow_none=True)
    max_samples = check_positive_int(max_samples, "max_samples", allow_none=True)
    progress = check_progress(progress)
    check_bool(reset, "reset")
    check_bool(eigenvectors, "eigenvectors")
    check_bool(skip_tail, "skip_tail")
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be callable as forward(model, batch), got {forward!r}")
    target = check_device(device)
    layers = pca_layers_of(model)
    require_layers(layers)
    _refuse_meta(model, layers)

    # the statistics to add to (reset=False) are merged: a square held as factors is formed
    snapshot = _Snapshot(model, layers.values(), complete=not reset)
    with kept_modes(model):
        try:
            for layer in layers.values():  # the old statistics are the snapshot's now
                layer.begin_statistics()
            if target is not None:
                model.to(target)
            else:
                target = _model_device(model)
            for layer in layers.values():
                layer.mode = "collect"
            inputs = _input_side(model)
            log.info(
                "calibrate: %d PCA layers; their statistics and eigenvectors take up to %.1f MiB",
                len(layers),
                sum(
                    held_bytes(inputs[layer].module if layer in inputs else None, layer.width)
                    for layer in layers.values()
                )
                / 2**20,
            )
            model.eval()
            watched = [
                inputs[layer].module if layer in inputs else layer for layer in layers.values()
            ]
            with TailSkip(model, watched, enabled=skip_tail and forward is None) as tail:
                batches = _stream(
                    model,
                    data,
                    lambda _, batch: tail.run(forward or run_batch, batch),
                    target,
                    max_batches,
                    max_samples,
                    progress,
                )
            with resident(model):  # offloaded weights, read through their inputs' moments
                _install_inputs(inputs.values())
                _combine(layers, snapshot, reset, batches)
                # read before the decompositions, which may free the statistics
                # (decompose.releasing_statistics)
                undersampled = _undersampled(layers)
                # the spectra (what a report reads; from the input-wide problem where a
                # layer's statistics are still one input's, held as factors); the
                # eigenvectors come at their first use unless asked for now
                compute_eigenspaces(layers.values(), progress, vectors=eigenvectors)
        except BaseException:
            snapshot.restore()
            raise
        finally:
            for layer in layers.values():
                layer.collect_through(None)
        snapshot.restore_modes()
    _warn_undersampled(undersampled)
    return model


def _refuse_meta(model: nn.Module, layers: dict[str, PCALayer]) -> None:
    """Refuse, before any work, PCA layers or followed modules whose tensors are on the ``meta``
    device without an accelerate hook that loads them (never loaded, say), and PCA layers
    whose own buffers accelerate offloads (``offload_buffers=True``)."""
    followed = {site.name: site.follows for site in sites_of(model)}
    for name, layer in layers.items():
        path = followed.get(name)
        module = model.get_submodule(path) if path is not None else None
        weights = [] if module is None or offloaded(module) else list(module.parameters(False))
        if layer.shift.is_meta or any(t.is_meta for t in weights):
            raise ValueError(
                f"PCA layer {name!r} or the module it follows holds tensors on the meta device "
                "with no accelerate hook that loads them (never loaded, or the PCA layer's own "
                "buffers offloaded): calibrate needs them; dispatch with offload_buffers=False"
            )


def _install_inputs(sources: Iterable[InputStatistics]) -> None:
    """Map the collected input moments to the layers' outputs (their squares stay factored)."""
    for source in sources:
        source.release_shared()  # the last input seen is no longer needed
        source.install()


def _input_side(model: nn.Module) -> dict[PCALayer, InputStatistics]:
    """Have the PCA layers after widening modules collect those modules' inputs (``layers.through``)."""
    chosen: dict[PCALayer, InputStatistics] = {}
    shared: dict[str, Any] = {}  # modules fed the same tensor compute its moments once
    for site in sites_of(model):
        # ("function" sites may be called with other biases: their outputs are collected)
        if site.attachment != "module" or site.follows is None:
            continue
        layer, module = model.get_submodule(site.layer_path), model.get_submodule(site.follows)
        if not isinstance(layer, PCALayer):
            continue
        source = input_statistics(module, layer, shared)
        if source is not None:
            layer.collect_through(source)
            chosen[layer] = source
    return chosen


def _undersampled(layers: Mapping[str, PCALayer]) -> list[tuple[str, int, str]]:
    """``(name, rows, width)`` of the layers whose covariance has fewer sample rows than
    the problem its spectrum comes from is wide (``decompose.problem_width``): the layer's
    width, or its input's where it widens (collected on its input, ``layers.through``:
    its covariance has rank at most the input's width however many rows it sees)."""
    short = []
    for name, layer in layers.items():
        width = problem_width(layer)
        if layer.sample_rows < width:
            what = str(width) if width == layer.width else f"{layer.width} (input width {width})"
            short.append((name, layer.sample_rows, what))
    return short


def _warn_undersampled(short: list[tuple[str, int, str]]) -> None:
    """Warn about layers whose covariance has fewer sample rows than the layer is wide
    (:func:`_undersampled`).

    Such a covariance has rank below the width: the layer looks saturated far
    below its real use, and its projection drops directions that fresh inputs
    use (a 1000-wide classifier calibrated on 16 examples keeps at most 15).
    """
    if short:
        listing = "".join(f"\n  - {name}: {n} rows for width {w}" for name, n, w in short)
        warnings.warn(
            f"{len(short)} PCA layer(s) saw fewer samples (rows of the covariance) than they "
            "are wide, so their spectra are those of the data seen rather than of the layer; "
            f"calibrate on more data:{listing}",
            UserWarning,
            stacklevel=3,
        )


def _stream(
    model: nn.Module,
    data: Iterable[Any],
    run: Callable[[nn.Module, Any], Any],
    device: torch.device | None,
    max_batches: int | None,
    max_samples: int | None,
    progress: bool | None,
) -> int:
    """Run the batches through the collecting model; returns how many ran."""
    seen = batches = 0
    bar = progress_bar(progress, desc="calibrating", unit="samples", total=max_samples)
    iterator = iter(data)
    with bar, torch.inference_mode():
        while max_batches is None or batches < max_batches:
            try:
                batch = next(iterator)
            except StopIteration:
                break
            except BaseException as err:
                add_context(err, f"(raised by the calibration data while fetching batch {batches})")
                raise
            size = examples_in(batch)
            if max_samples is not None:
                if size is None:
                    raise TypeError(
                        "max_samples counts input examples, but calibration batch "
                        f"{batches} ({type(batch).__name__}) holds no tensor to count them in"
                    )
                if seen + size > max_samples:
                    batch, size = truncate(batch, size, max_samples - seen), max_samples - seen
            batch = to_device(batch, device)
            try:
                with token_mask(attention_mask(batch)):
                    run(model, batch)
            except BaseException as err:
                shapes = map_tensors(batch, lambda t: tuple(t.shape))
                add_context(err, f"(raised on calibration batch {batches}, tensor shapes {shapes})")
                raise
            batches += 1
            seen += size if size is not None else 0
            bar.update(size if size is not None else 1)
            if max_samples is not None and seen >= max_samples:
                break
    return batches


def _combine(
    layers: Mapping[str, PCALayer], snapshot: _Snapshot, reset: bool, batches: int
) -> None:
    """Put together the new statistics, the previous ones (``reset=False``) and other ranks'."""
    distributed = distributed_run()
    if reset and not distributed:  # the new statistics are the layers' own already
        _require_batches(batches)
        for layer in layers.values():
            layer.finish_statistics(shared=False)
        _require_reached(layers)
        return
    states, sums, positions, after = [], [], [], []
    for layer in layers.values():
        state, layer_sums, old, place = layer.statistics(), layer.summed_statistics(), None, None
        if not reset:
            previous = snapshot.of(layer)
            old = previous.moments(state.shift.device)
            if int(old.count) > 0 and not (distributed and previous.shared):
                state = _m.merge_moments(old, state)  # local statistics: reduced with the new
                layer_sums = _added(layer_sums, previous.summed())
                old = None
            if layer.sample_rows == 0 and previous.rows > 0:
                place = previous.positions
        states.append(state)
        sums.append(layer_sums)
        positions.append(place)
        after.append(old)
    if distributed:
        states, sums, batches = _reduce(states, sums, None, batches)
    _require_batches(batches)
    for layer, state, layer_sums, place, old in zip(
        layers.values(), states, sums, positions, after, strict=True
    ):
        if old is not None and int(old.count) > 0:  # already a union over the group
            state = _m.merge_moments(old, state)
            layer_sums = _added(layer_sums, snapshot.of(layer).summed())
        layer.load_statistics(state, summed=layer_sums, positions=place, shared=distributed)
    _require_reached(layers)


def _require_batches(batches: int) -> None:
    if batches == 0:
        raise ValueError("data yielded no batch: nothing to calibrate on")


def _require_reached(layers: Mapping[str, PCALayer]) -> None:
    unreached = [name for name, layer in layers.items() if not layer.has_statistics]
    if unreached:
        raise ValueError(
            f"PCA layers {', '.join(unreached)} saw no data: their modules were never called "
            "on these batches (wrap without them, e.g. pca_wrap(model, exclude=[...]))"
        )


def _added(current: Mapping[str, int], previous: Mapping[str, int]) -> dict[str, int]:
    """Summed statistics (``reduce="sum"``) with the previous values added."""
    return {name: value + previous[name] for name, value in current.items()}
