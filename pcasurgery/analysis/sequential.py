"""Compress a stack of blocks one block at a time: ``compress_sequential``.

The inputs of the first block are captured once (the model runs up to it on
each calibration batch). Then, for each block in order: the block is wrapped
with PCA layers (a copy), calibrated on its captured inputs, planned, and
compressed; the compressed block takes its place in the model, and the block's
outputs on the captured inputs become the next block's inputs. Only one
block's statistics and eigenvectors exist at a time, and the block's weights once:
its wrapped copy holds the block's parameters themselves (``pca_wrap_sharing``),
``compress`` shares those of the layers it replaces, and the block's
eigenvectors are computed one layer after another (``one_at_a_time``), not side
by side (eigenvalues alone, of little memory, still are).

``propagate="compressed"`` (the default) passes on the compressed block's
outputs, so each block is calibrated on the activations the compressed model
will really feed it, and compensates for what the blocks before it lost (what
SliceGPT does); ``"original"`` passes on the dense block's outputs, which gives
exactly what whole-model calibration gives. There, with a global budget, the
second pass would calibrate each block on the activations the first pass saw:
with ``scratch`` (a folder) the first pass writes each block's eigenspaces to
disk and the second reads them back instead.

Each block's ranks come from ``plan`` (a ``budget_plan`` table of the whole
wrapped model, whose layer names are the model's: the global allocation), or
else from a budget that removes ``remove`` of each block's planned parameters
(``budget_plan`` on the block: the same fraction of every block).

With a ``loss``, each layer keeps the directions that matter to the loss, not
only those of most variance: its output features are weighed by the loss's
gradient there (``w_f = sqrt(g_f / mean(g) + 0.1)``, ``g_f`` the sum over the
loss's samples of the squared gradient at feature ``f``, the model dense: a
diagonal Fisher metric, floored so that no feature is ignored), and the layer
projects ``y`` to ``mu + D^-1 V V^T D (y - mu)``, ``D = diag(w)``, ``V`` the top
eigenvectors of the weighed covariance ``D C D``. The rank is what the plan
says; the projection is oblique, and folds into the same two factors.
"""

from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import gc
import glob
import itertools
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from .._batches import attention_mask, map_tensors, run_batch, to_device
from .._progress import check_progress, progress_bar
from .._validation import check_device, check_module, check_writable, kept_modes
from ..compression.compress import compress, make_shippable
from ..compression.plan import PLAN_COLUMNS, followed_module, fusable_batchnorms, known_kind
from ..compression.shards import ShardReader, ShardWriter, to_meta
from ..layers.decompose import compute_eigenvectors, one_at_a_time, releasing_statistics
from ..layers.kinds import kind_of, output_width
from ..layers.network import pca_layers_of
from ..layers.offload import offloaded
from ..layers.sites import sites_of
from ..layers.statistics import token_mask
from ..layers.through import held_bytes
from ..surgery import calibrate
from ..surgery.wrap import pca_wrap_sharing
from .budget import (
    GRADIENT_MEASURE,
    ZERO_GRADIENT,
    _GradientMeasure,
    apply_plan,
    budget_plan,
    checked_loss,
)

__all__ = ["calibrate_sequential", "compress_sequential", "forward_sequential"]

log = logging.getLogger("pcasurgery")

PROPAGATE = ("compressed", "original")
BUDGETS = ("global", "per-block")


class _Captured(Exception):
    """Raised by the hook on the first block once its inputs are stored."""


def block_names(model: nn.Module, blocks: str) -> list[str]:
    """The outermost modules whose qualified names match the glob ``blocks``, in model order."""
    names = [
        name for name, _ in model.named_modules() if name and fnmatch.fnmatchcase(name, blocks)
    ]
    outermost = [n for n in names if not any(n.startswith(m + ".") for m in names)]
    if not outermost:
        raise ValueError(f"blocks={blocks!r} matches no module of {type(model).__name__}")
    return outermost


# one block call: its positional and keyword arguments, and the batch's token mask
Call = tuple[tuple, dict, Tensor | None]


def _capture(
    model: nn.Module, first: nn.Module, data: Iterable[Any], forward: Callable
) -> list[Call]:
    """``(args, kwargs, mask)`` of ``first``'s call on each batch (the model stops there);
    ``mask``: the batch's ``attention_mask``, which keeps padding out of the statistics."""
    captured: list[Call] = []
    mask: list[Tensor | None] = [None]

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        # a key/value cache (GPT-2 passes it positionally) would grow at every later call of
        # the block: each call would attend to the keys of the calls before it
        caches = [k for k, v in kwargs.items() if _is_cache(v)]
        if caches:
            kwargs = {**kwargs, **dict.fromkeys(caches), "use_cache": False}
        args = tuple(None if _is_cache(a) else a for a in args)
        captured.append((args, kwargs, mask[0]))
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode(), kept_modes(model):
            model.eval()
            for batch in data:
                mask[0] = attention_mask(batch)
                try:
                    forward(model, batch)
                except _Captured:
                    continue
                raise ValueError(f"the model never called its first block on batch {len(captured)}")
    finally:
        handle.remove()
    if not captured:
        raise ValueError("data must hold at least one batch, got none")
    return captured


def _first_inputs(
    model: nn.Module,
    names: list[str],
    data: Iterable[Any],
    run: Callable[[nn.Module, Any], Any],
    target: torch.device | None,
    job: str,
) -> list[Call]:
    """The first block's captured inputs, on ``target``, once one block's statistics are
    announced. No reference to the block is kept: it is freed when compressed."""
    first = model.get_submodule(names[0])
    log.info(
        "%s: %d blocks; the PCA statistics of one block take %.1f MiB",
        job,
        len(names),
        block_statistics_bytes(first) / 2**20,
    )
    return [to_device(call, target) for call in _capture(model, first, data, run)]


def _is_cache(value: object) -> bool:
    """Whether ``value`` is a transformers key/value cache (``DynamicCache``, ...)."""
    return type(value).__name__.endswith("Cache")


def _outputs(block: nn.Module, inputs: list[Call]) -> list[Call]:
    """The next block's inputs: ``block``'s output in place of the first argument."""
    with torch.inference_mode():
        return [_next(call, block(*call[0], **call[1])) for call in inputs]


def _homes(calls: list[Call]) -> list[torch.device]:
    """Where each call's first argument (a block's input) is, before it moves to compute."""
    return [call[0][0].device for call in calls]


def _next(call: Call, y: Any) -> Call:
    """The next block's call: ``call`` with the output ``y`` as its first argument."""
    args, kwargs, mask = call
    hidden = y[0] if isinstance(y, (tuple, list)) else y
    if not isinstance(hidden, Tensor):
        raise TypeError(
            f"a block returned {type(y).__name__}; compress_sequential needs a tensor "
            "(or a tuple whose first item is one): the next block's input"
        )
    return ((hidden, *args[1:]), kwargs, mask)


def _calibrated(
    wrapped: nn.Module, inputs: list[Call], eigenvectors: bool = False, keep: bool = True
) -> list[Call]:
    """Calibrate the wrapped block on ``inputs`` (``eigenvectors``: computed now, with the
    eigenvalues); its outputs there, the next block's inputs (a calibrating PCA layer passes
    its input on as it is: the dense block's outputs, without a forward of their own), or
    none without ``keep``."""
    outputs: list[Call] = []

    def forward(block: nn.Module, call: Call) -> Any:
        y = _call(block, call)
        if keep:
            outputs.append(_next(call, y))
        return y

    calibrate(wrapped, inputs, forward=forward, progress=False, eigenvectors=eigenvectors)
    return outputs


def block_statistics_bytes(block: nn.Module) -> int:
    """The bytes a block's PCA layers hold while it is calibrated: ``statistics_bytes`` of
    each module of a known kind (``layers.kinds``), collected on its input where it widens."""
    return sum(
        held_bytes(module, output_width(module))
        for module in block.modules()
        if kind_of(module) is not None
    )


def compress_sequential(
    model: nn.Module,
    data: Iterable[Any],
    *,
    blocks: str,
    remove: float | None = None,
    plan: pd.DataFrame | None = None,
    propagate: str = "compressed",
    budget: str = "global",
    by: str = "params",
    centering: bool = True,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    device: torch.device | str | None = None,
    weights: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    out_dtype: torch.dtype | None = None,
    loss: Callable[[nn.Module, Any], Tensor] | None = None,
    loss_data: Iterable[Any] | None = None,
    scratch: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
) -> nn.Module:
    """Calibrate and compress the blocks matched by ``blocks`` one at a time, in place.

    Args:
        model: the model (not wrapped); its blocks are replaced by compressed ones.
        data: calibration batches, as ``calibrate`` takes them (a list: it is
            iterated once, to capture the first block's inputs, which are kept).
        blocks: glob of the blocks (``"model.layers.*"``); the outermost matches.
        remove: the fraction of the blocks' planned parameters (or MACs) to
            remove (see ``budget``). Give this or ``plan``.
        plan: a ``budget_plan`` table of the whole wrapped model (its ranks,
            layer by layer: the global allocation); layers of the blocks it does
            not name stay dense.
        propagate: ``"compressed"``: the next block is calibrated on the
            compressed block's outputs; ``"original"``: on the dense block's.
        budget: with ``remove``, ``"global"``: the ranks are allocated over every
            block's layers at once (``budget_plan``'s spectral allocation) from a
            first pass that keeps each layer's eigenvalues only (the blocks
            calibrated one at a time on the dense activations), then the blocks
            are compressed one at a time; ``"per-block"``: each block removes
            ``remove`` of its own (one pass).
        by: what ``remove`` counts, ``"params"`` or ``"macs"``.
        centering: centred PCA (True) or uncentred.
        forward: ``forward(model, batch)`` runs a batch (default: as ``calibrate`` does).
        device: where each block is calibrated and compressed (``"cuda"``, say): the
            block and the activations move there, and the compressed block comes back
            to where the block was; the rest of the model never moves.
            Blocks offloaded by accelerate (a ``device_map`` with CPU or disk
            offload) are refused: pass their checkpoint as ``weights`` instead.
        weights: for a model larger than memory, built on the ``meta`` device
            (``accelerate.init_empty_weights()``): its checkpoint, a safetensors file
            or a folder of them (transformers' sharded layout). The tensors outside
            the blocks are loaded first, and each block's when its turn comes, cast
            to the dtype the model was built in; the dense block is released after.
        out: a folder where each compressed block is written as it is done (one
            safetensors file each) and then released (back to ``meta``), the other
            tensors at the end, with an index and, for a transformers model, its
            config and modeling file: a checkpoint that ``from_pretrained`` loads
            (``trust_remote_code=True``), without pcasurgery.
        out_dtype: the dtype floating tensors are written in (None: the model's);
            ``torch.bfloat16`` halves a float32 model's checkpoint.
        loss, loss_data: ``loss(model, batch) -> scalar tensor`` and its batches:
            every layer's output features are weighed by the loss's gradient there
            (the module docstring), measured on the dense model block by block,
            so that each layer keeps the directions that matter to the loss
            (``compression_report``'s ``explained`` is then of the weighed variance).
            With ``remove`` and the global budget, the allocation is weighed by the
            loss too (see :func:`calibrate_sequential`). Costs a forward and a
            backward sweep over the blocks on ``loss_data`` (each block's input and
            output gradient kept), and a backward of the first block.
        scratch: a folder on disk for the global budget's first pass, with
            ``propagate="original"`` (and no ``loss``): the first pass then computes
            each block's eigenvectors with its eigenvalues and writes the block's
            eigenspaces there (a folder of its own inside ``scratch``, removed at
            the end), and the second pass reads them back instead of calibrating
            the block again, which it would do on the same activations: each
            block runs forward and is decomposed once, as in whole-model
            compression, and no activations are kept for the second pass. Takes
            on disk about the float64 bytes of every layer's eigenvectors (logged
            after the first block; a TinyLlama-1.1B-shaped block: 0.3 GiB), each
            block's freed once it is compressed. None: the second pass calibrates
            each block again.
        progress: a bar over the blocks (``None``: in a terminal, after two seconds).

    Returns:
        ``model``, with its ``compression_report`` (``compress``'s columns, one
        row per PCA layer, named as in the whole model). With ``out``, its blocks'
        tensors are on ``meta`` (their values are in ``out``).

    Raises:
        ValueError: neither or both of ``remove`` and ``plan``; ``propagate`` not one
            of ``"compressed"``, ``"original"``; ``blocks`` matches nothing; no data;
            ``out`` not empty; ``weights`` not a checkpoint, or lacking a tensor the
            model has on ``meta`` (or in another shape); a block offloaded by
            accelerate; ``scratch`` without ``remove``, the global budget and
            ``propagate="original"``, or with ``loss``. These are raised before any
            block changes. The model is changed in
            place, block after block (keeping the dense blocks would double the
            memory): where a later block fails, the blocks before it stay compressed,
            and the failed block stays as it was.
    """
    check_module(model)
    if (remove is None) == (plan is None):
        raise ValueError("give either remove (a fraction per block) or plan (a budget_plan table)")
    if propagate not in PROPAGATE:
        raise ValueError(f"propagate must be one of {PROPAGATE}, got {propagate!r}")
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    if plan is not None and not {"layer", "k"} <= set(getattr(plan, "columns", ())):
        raise ValueError("plan must be a DataFrame from budget_plan (columns layer and k)")
    if scratch is not None:
        _check_scratch(scratch, remove, budget, propagate, loss)
    progress = check_progress(progress)
    target = check_device(device)
    run = forward or run_batch
    names = block_names(model, blocks)
    writer = None
    if out is not None:
        if out_dtype is not None and not (
            isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point
        ):
            raise TypeError(f"out_dtype must be a floating torch.dtype, got {out_dtype!r}")
        folder = Path(out)
        if folder.exists() and not (folder.is_dir() and not any(folder.iterdir())):
            raise ValueError(f"out={str(out)!r} exists and is not an empty folder")
    reader = _reader(model, names, weights)
    if out is not None:
        writer = ShardWriter(out, out_dtype)
    inputs = _first_inputs(model, names, data, run, target, "compress_sequential")
    weighing = _weighing(model, names, loss, loss_data, run, target, reader, progress)
    with _scratch_folder(scratch) as saved:
        if remove is not None and budget == "global":
            spectra = _spectra(
                model, names, inputs, centering, target, progress, reader, weighing, saved
            )
            plan = budget_plan(spectra, remove=float(remove), by=by, progress=False)
        if weighing is not None:
            weighing.release_measures()  # two activations per block and batch of loss_data
        if saved is not None:
            inputs = []  # the second pass reads the eigenspaces: no block runs again
        rows = _compress_blocks(
            model, names, inputs, remove, plan, by, centering, propagate, target, reader,
            writer, weighing, saved, progress,
        )  # fmt: skip
    make_shippable(model)
    if writer is not None:
        writer.write(model, "", "others.safetensors")
        writer.finish(model)
    report = (
        pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=list(PLAN_COLUMNS))
    )
    model.compression_report = report
    return model


def _compress_blocks(
    model: nn.Module,
    names: list[str],
    inputs: list[Call],
    remove: float | None,
    plan: pd.DataFrame | None,
    by: str,
    centering: bool,
    propagate: str,
    target: torch.device | None,
    reader: ShardReader | None,
    writer: ShardWriter | None,
    weighing: _Weighing | None,
    saved: Path | None,
    progress: bool | None,
) -> list[pd.DataFrame]:
    """The second pass: each block compressed in turn and put in its place in ``model``
    (written by ``writer`` and released, when there is one); the blocks' report rows."""
    rows = []
    with progress_bar(progress, desc="compressing blocks", unit="block", total=len(names)) as bar:
        for i, name in enumerate(names):
            block = _loaded(model, name, reader)
            with _computed_on(block, target) as back, one_at_a_time():
                metric = None if weighing is None else weighing.output_weights(block, i)
                dense = propagate == "original" and saved is None
                eigenspaces = None if saved is None else _block_folder(saved, i)
                small, report, outputs = _compress_block(
                    block, name, inputs, remove, plan, by, centering, metric, dense, eigenspaces
                )
                if dense:
                    inputs = outputs if outputs is not None else _outputs(block, inputs)
                elif saved is None:  # else the first pass wrote every block's eigenspaces
                    inputs = _outputs(small, inputs)
                del outputs
                back.append(small)
            if reader is not None:
                to_meta(block)
            if writer is not None:
                writer.write(small, name + ".", f"block-{i:05d}.safetensors")
                to_meta(small)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, small)
            rows.append(report)
            del block, small
            _trim()
            bar.update()
    return rows


@contextlib.contextmanager
def _computed_on(block: nn.Module, target: torch.device | None) -> Iterator[list[nn.Module]]:
    """Within the block, ``block`` is on ``target`` (when given); the modules appended to
    the list yielded go back to where ``block`` was, at the end."""
    home = next(itertools.chain(block.parameters(), block.buffers()), None)
    back: list[nn.Module] = []
    if target is not None:
        block.to(target)
    try:
        yield back
    finally:
        if target is not None and home is not None:
            for module in [block, *back]:
                module.to(home.device)


def _trim(collect: bool = True) -> None:
    """Hand the memory a finished block freed back to the system: what reference cycles
    (of the user's model, say) still hold (with ``collect``: a full collection, 0.2 s with
    a 135M-parameter transformers model loaded; once per wrapped block), then what glibc
    keeps. glibc keeps freed blocks of up to 32 MiB in its heaps (one per thread that
    allocated), where a long run's varying sizes fragment them."""
    if collect:
        gc.collect()
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # another C library
        pass


def _reader(model: nn.Module, names: list[str], weights: Any) -> ShardReader | None:
    """The checkpoint ``weights`` names, with the model's tensors outside the blocks loaded
    from it (None without ``weights``).

    Raises:
        ValueError: a block is offloaded by accelerate (its copies cannot carry the hooks).
    """
    for name in names:
        if any(offloaded(module) for module in model.get_submodule(name).modules()):
            raise ValueError(
                f"block {name!r} is offloaded by accelerate (a device_map with cpu or disk "
                "offload): build the model on meta (accelerate.init_empty_weights) and pass "
                "its checkpoint as weights= instead"
            )
    if weights is None:
        return None
    reader = ShardReader(weights)
    tie = getattr(model, "tie_weights", None)
    if callable(tie):  # transformers ties on loading: a tied output layer is not in the files
        tie()
    reader.check(model)  # every block's tensors are there, before any work
    reader.load(model, skip=tuple(names))
    return reader


def _loaded(model: nn.Module, name: str, reader: ShardReader | None) -> nn.Module:
    """The block ``name``, its tensors loaded from the checkpoint (when there is one)."""
    block = model.get_submodule(name)
    if reader is not None:
        reader.load(block, name + ".")
    return block


def calibrate_sequential(
    model: nn.Module,
    data: Iterable[Any],
    *,
    blocks: str,
    centering: bool = True,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    device: torch.device | str | None = None,
    weights: str | os.PathLike[str] | None = None,
    loss: Callable[[nn.Module, Any], Tensor] | None = None,
    loss_data: Iterable[Any] | None = None,
    progress: bool | None = None,
) -> nn.Module:
    """The spectra of the blocks' layers, calibrated one block at a time: a saturation report
    (``report``) and a global budget (``budget_plan``) for the price of their eigenvalues.

    The inputs of the first block are captured once; each block in turn is
    wrapped (a copy), calibrated on them for its eigenvalues only, and its
    outputs become the next block's inputs. Of each block, only its PCA
    layers' eigenvalues and ranks are kept (``PCALayer.keep_eigenvalues_only``),
    and the shapes of the modules they follow (their tensors on ``meta``): a
    7B-shaped model's spectra take a few MiB. ``model`` is not changed (with
    ``weights``, its blocks' tensors go back to ``meta`` after their turn).

    Args:
        model: the model (not wrapped).
        data, blocks, centering, forward, device, weights, progress: as
            :func:`compress_sequential` takes them.
        loss: ``loss(model, batch) -> scalar tensor``, with ``loss_data``: the
            spectra also carry, for each layer, the ``s_j`` that
            ``budget_plan(loss=..., data=...)`` measures on the whole model (the
            sum over samples of the squared gradient of the loss along each
            eigenvector, the model dense, no parameter gradient), measured block by
            block: ``budget_plan`` on them is then weighed by the loss. It takes a
            forward sweep over the blocks on ``loss_data`` (each block's inputs
            kept), the loss on the last block's outputs, a backward sweep (each
            block's output gradient kept), and in the calibration pass one
            forward and backward per batch and the eigenvectors of each block:
            two activations per block and batch of ``loss_data`` are held.
        loss_data: the batches ``loss`` is called on (read twice).

    Returns:
        A module whose PCA layers are named as ``pca_wrap(model)`` names them
        (``"model.layers.0.self_attn.q_proj"``): ``report``, ``saturation_table``
        and ``budget_plan`` read it; a plan from it is what ``compress_sequential``
        takes as ``plan``.
    """
    check_module(model)
    progress = check_progress(progress)
    target = check_device(device)
    names = block_names(model, blocks)
    reader = _reader(model, names, weights)
    inputs = _first_inputs(model, names, data, forward or run_batch, target, "calibrate_sequential")
    weighing = _weighing(
        model, names, loss, loss_data, forward or run_batch, target, reader, progress
    )
    return _spectra(model, names, inputs, centering, target, progress, reader, weighing)


def forward_sequential(
    model: nn.Module,
    data: Iterable[Any],
    *,
    blocks: str,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    device: torch.device | str | None = None,
    weights: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
) -> list[Any]:
    """What ``forward(model, batch)`` returns on each batch, the blocks run one at a time:
    a model larger than memory evaluated from its checkpoint (a perplexity, say).

    The model runs up to its first block on every batch (its inputs kept), each
    block in turn runs on all of them (with ``weights``: loaded, then released),
    then the model runs once more on each batch with its blocks replaced by the
    last block's outputs, for what follows them (a final norm and output layer).
    The blocks must feed one another (each block's first argument is the
    previous block's output), as ``compress_sequential`` requires.

    Args:
        model: the model (not wrapped), compressed or not; built on ``meta`` with
            ``weights``.
        data: the batches, as ``calibrate`` takes them; iterated twice (a list).
        blocks, device, weights, progress: as :func:`compress_sequential` takes
            them; ``device`` is where the blocks run.
        forward: ``forward(model, batch)`` runs a batch and returns what is kept
            (default: the model's output); a loss summed over the batch keeps
            little of each.

    Returns:
        One result per batch, in order.

    Raises:
        ValueError: as :func:`calibrate_sequential`; a block not called exactly
            once per batch in the last run.
    """
    check_module(model)
    progress = check_progress(progress)
    target = check_device(device)
    run = forward or run_batch
    names = block_names(model, blocks)
    reader = _reader(model, names, weights)
    hidden, shapes = _through_blocks(model, names, data, run, target, reader, progress, "blocks")
    replay = _Replay(hidden, shapes)
    results = []
    with _replayed(model, names, replay), torch.inference_mode(), kept_modes(model):
        model.eval()
        for batch in data:
            with token_mask(attention_mask(batch)):
                results.append(run(model, batch))
            replay.next_batch()
    return results


def _through_blocks(
    model: nn.Module,
    names: list[str],
    data: Iterable[Any],
    run: Callable[[nn.Module, Any], Any],
    target: torch.device | None,
    reader: ShardReader | None,
    progress: bool | None,
    desc: str,
    kept: list[list[Call]] | None = None,
) -> tuple[list[Tensor], list[bool]]:
    """The first block's inputs captured, then every block run on them in turn (loaded, then
    released); returns the last block's outputs, back where its inputs were captured, and
    whether it returned a tuple, per batch. ``kept`` gets each block's inputs."""
    captured = _capture(model, model.get_submodule(names[0]), data, run)
    homes = _homes(captured)
    inputs = [to_device(call, target) for call in captured]
    del captured
    tuples: list[bool] = []
    with progress_bar(progress, desc=desc, unit="block", total=len(names)) as bar:
        for name in names:
            if kept is not None:
                kept.append(inputs)
            block = _loaded(model, name, reader)
            with _computed_on(block, target), torch.inference_mode():
                outputs = [block(*call[0], **call[1]) for call in inputs]
            tuples = [isinstance(y, (tuple, list)) for y in outputs]
            inputs = [_next(call, y) for call, y in zip(inputs, outputs, strict=True)]
            del outputs
            if reader is not None:
                to_meta(block)
            del block
            _trim(collect=False)  # no wrapped copy was made
            bar.update()
    return [call[0][0].to(home) for call, home in zip(inputs, homes, strict=True)], tuples


class _Replay(nn.Module):
    """Stands for every block in ``forward_sequential``'s last run: its first call on a
    batch returns the last block's output on that batch, the later ones pass it on."""

    def __init__(self, hidden: list[Tensor], tuples: list[bool]):
        super().__init__()
        self.hidden, self.tuples = hidden, tuples
        self.batch, self.calls = 0, 0

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if self.batch >= len(self.hidden):
            raise ValueError(
                f"forward_sequential: the last run has more batches than the first "
                f"({len(self.hidden)}); data must give the same batches twice (a list)"
            )
        if self.calls == 0:
            x = self.hidden[self.batch]
        self.calls += 1
        return (x,) if self.tuples[self.batch] else x

    def next_batch(self) -> None:
        if self.calls == 0:
            raise ValueError(
                f"forward_sequential: the model never called its blocks on batch {self.batch}"
            )
        self.batch, self.calls = self.batch + 1, 0


def _spectra(
    model: nn.Module,
    names: list[str],
    inputs: list[Call],
    centering: bool,
    target: torch.device | None,
    progress: bool | None,
    reader: ShardReader | None = None,
    weighing: _Weighing | None = None,
    saved: Path | None = None,
) -> nn.Module:
    """Every block wrapped and calibrated in turn on the dense activations, keeping of each
    only its PCA layers' eigenvalues and the shapes of the modules they follow (weights on
    ``meta``), under a root that names them as the model does, for ``budget_plan``. With
    ``weighing``, each layer's ``s_j`` along its eigenvectors too (``GRADIENT_MEASURE``).
    With ``saved`` (a folder), each block's eigenvectors are computed too and its
    eigenspaces written there (:func:`_save_eigenspaces`), for the second pass."""
    root = nn.Module()
    measures: dict[str, Tensor] = {}
    with progress_bar(progress, desc="spectra", unit="block", total=len(names)) as bar:
        for i, name in enumerate(names):
            block = _loaded(model, name, reader)
            with _computed_on(block, target) as back, one_at_a_time():
                # saving: no projection is built at a threshold (the plan sets the ranks)
                threshold = 0.99 if saved is None else _UNPLANNED
                wrapped = pca_wrap_sharing(block, threshold, centering=centering)
                with releasing_statistics():  # where the eigenvectors are computed
                    inputs = _calibrated(wrapped, inputs, eigenvectors=saved is not None)
                if saved is not None:
                    _save_eigenspaces(wrapped, _block_folder(saved, i), i, len(names))
                if weighing is not None:
                    for key, value in weighing.measure(wrapped, i).items():
                        measures[f"{name}.{key}"] = value
                back.append(block)
            if reader is not None:
                to_meta(block)
            for layer in pca_layers_of(wrapped).values():
                layer.keep_eigenvalues_only()
            for module in wrapped.modules():
                for key, param in list(module._parameters.items()):
                    if param is not None:
                        module._parameters[key] = nn.Parameter(
                            param.to("meta"), param.requires_grad
                        )
            _attach(root, name, wrapped)
            del block, wrapped
            _trim()
            bar.update()
    if weighing is not None:
        weighing.check(measures, list(pca_layers_of(root)))
        setattr(root, GRADIENT_MEASURE, measures)
    return root


def _weighing(
    model: nn.Module,
    names: list[str],
    loss: Callable[[nn.Module, Any], Tensor] | None,
    data: Iterable[Any] | None,
    run: Callable[[nn.Module, Any], Any],
    target: torch.device | None,
    reader: ShardReader | None,
    progress: bool | None,
) -> _Weighing | None:
    """The loss's gradients at the blocks' outputs (None without ``loss``)."""
    if (loss is None) != (data is None):
        raise ValueError(
            "loss and loss_data go together: pass both to weigh directions by the loss's "
            f"gradient, or neither; got loss={loss!r} and loss_data={data!r}"
        )
    if loss is None or data is None:
        return None
    batches = list(data)
    if not batches:
        raise ValueError("loss_data must hold at least one batch, got none")
    return _Weighing(model, names, loss, batches, run, target, reader, progress)


class _Weighing:
    """The loss's gradient at every block's output, on the dense model, for weighing each
    layer's directions as ``budget_plan(loss=...)`` weighs them, block by block.

    A forward sweep over the blocks keeps each block's inputs on the loss's batches; the
    loss runs once per batch on the last block's outputs (the blocks replayed), and a
    backward sweep takes its gradient back through each block in turn (recomputing the
    block's forward), keeping the gradient at each block's output. ``measure`` then gives
    a calibrated wrapped block's ``s_j``: one forward and backward per batch, from those.
    Memory: two activations (an input and a gradient) per block and batch.
    """

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        loss: Callable[[nn.Module, Any], Tensor],
        data: list[Any],
        run: Callable[[nn.Module, Any], Any],
        target: torch.device | None,
        reader: ShardReader | None,
        progress: bool | None,
    ):
        if not callable(loss):
            raise TypeError(f"loss must be callable as loss(model, batch), got {loss!r}")
        self.inputs: list[list[Call]] = []
        last, tuples = _through_blocks(
            model, names, data, run, target, reader, progress, "loss: forward", self.inputs
        )
        self.grads: list[list[Tensor]] = [[] for _ in names]
        # of each block but the first, the squared gradient at each module's output features
        self.features: dict[int, dict[str, Tensor]] = {}
        self.grads[-1] = [
            to_device(g, target)
            for g in self._loss_gradients(model, names, last, tuples, loss, data)
        ]
        with progress_bar(progress, desc="loss: backward", unit="block", total=len(names)) as bar:
            for i in range(len(names) - 1, 0, -1):
                block = _loaded(model, names[i], reader)
                with (
                    _computed_on(block, target),
                    _no_parameter_grads(block),
                    _feature_gradients(block) as self.features[i],
                ):
                    self.grads[i - 1] = [
                        _backward(block, call, grad)
                        for call, grad in zip(self.inputs[i], self.grads[i], strict=True)
                    ]
                if reader is not None:
                    to_meta(block)
                del block
                _trim(collect=False)
                bar.update()
            bar.update()

    @staticmethod
    def _loss_gradients(
        model: nn.Module,
        names: list[str],
        outputs: list[Tensor],
        tuples: list[bool],
        loss: Callable[[nn.Module, Any], Tensor],
        data: list[Any],
    ) -> list[Tensor]:
        """The loss's gradient at the last block's outputs, per batch."""
        with torch.inference_mode(False):
            hidden = [t.clone().requires_grad_() for t in outputs]
        replay = _Replay(hidden, tuples)
        with _replayed(model, names, replay), kept_modes(model), _no_parameter_grads(model):
            model.eval()
            with torch.inference_mode(False), torch.enable_grad():
                for index, batch in enumerate(data):
                    checked_loss(loss, model, batch, index, "the blocks' outputs").backward()
                    replay.next_batch()
        return [h.grad if h.grad is not None else torch.zeros_like(h) for h in hidden]

    def measure(self, wrapped: nn.Module, i: int) -> dict[str, Tensor]:
        """``s_j`` of each PCA layer of the calibrated wrapped block ``i``, by name."""
        layers = pca_layers_of(wrapped)
        compute_eigenvectors(layers.values())
        gauge = _GradientMeasure(set(layers))
        with gauge.hooked(wrapped, layers):
            for call, grad in zip(self.inputs[i], self.grads[i], strict=True):
                _backward(wrapped, call, grad)
        return {name: gauge.sums[name] for name in gauge.seen}

    def release_measures(self) -> None:
        """Drop what only :meth:`measure` reads: each block's inputs and output gradients on
        the loss's batches, but the first block's (its feature weights are measured from
        them, the others' were kept from the backward sweep)."""
        for i in range(1, len(self.inputs)):
            self.inputs[i], self.grads[i] = [], []

    def output_weights(self, block: nn.Module, i: int) -> dict[str, Tensor]:
        """Of each module of a known kind in the dense block ``i``, by its name in the block:
        the weight of each of its output features (the module docstring), float64. Kept
        from the backward sweep; the first block's (which the sweep does not run) measured
        here."""
        weights = self.features.pop(i, None)
        if weights is None:
            with _feature_gradients(block) as weights, _no_parameter_grads(block):
                for call, grad in zip(self.inputs[i], self.grads[i], strict=True):
                    _backward(block, call, grad)
        return {name: _feature_weights(g) for name, g in weights.items()}

    def check(self, measures: dict[str, Tensor], names: list[str]) -> None:
        missing = [name for name in names if name not in measures]
        if missing:
            raise ValueError(
                f"the blocks' forward never ran these PCA layers on the loss's batches: "
                f"{', '.join(missing)}"
            )
        if not any(bool(s.any()) for s in measures.values()):
            raise ValueError(ZERO_GRADIENT)


@contextlib.contextmanager
def _feature_gradients(block: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Within, each backward through ``block`` adds, for each of its modules of a known kind
    (by name), the squared gradient at each output feature summed over samples (float64) to
    the dict yielded."""
    sums: dict[str, Tensor] = {}

    def add(name: str, dims: int, g: Tensor) -> None:
        rows = g.detach().movedim(1 if dims else -1, -1)
        total = rows.reshape(-1, rows.shape[-1]).to(torch.float64).square().sum(0)
        sums[name] = total if name not in sums else sums[name] + total

    def hook(name: str, dims: int, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(partial(add, name, dims))

    handles = [
        module.register_forward_hook(partial(hook, name, kind.spatial_dims))
        for name, module in block.named_modules()
        if (kind := kind_of(module)) is not None
    ]
    try:
        yield sums
    finally:
        for handle in handles:
            handle.remove()


# the floor of a feature's weight, as a fraction of the mean squared gradient
_WEIGHT_FLOOR = 0.1


def _feature_weights(g: Tensor) -> Tensor:
    """``sqrt(g / mean(g) + floor)``; all ones where the loss never reaches the layer."""
    mean = g.mean()
    return (g / mean + _WEIGHT_FLOOR).sqrt() if bool(mean > 0) else torch.ones_like(g)


def _scale_outputs(module: nn.Module, factors: Tensor) -> None:
    """Multiply each output feature of ``module`` (of a known kind, or a Sequential such as
    ``LowRank`` ending in one) by its factor, in its weight and bias."""
    while isinstance(module, nn.Sequential):
        module = module[-1]
    kind = known_kind(module)
    weight, bias = module.weight, module.bias
    assert isinstance(weight, Tensor)
    with torch.no_grad():
        matrix = kind.matrix(weight.detach()) * factors.to(weight.device, weight.dtype)[:, None]
        weight.copy_(kind.weight_from_matrix(matrix, weight))
        if isinstance(bias, Tensor):
            bias.mul_(factors.to(bias.device, bias.dtype))


def _own_parameters(module: nn.Module) -> None:
    """Give ``module`` (of a copy made by ``pca_wrap_sharing``) parameters of its own, which
    it can change without changing the model's."""
    for key, param in list(module._parameters.items()):
        if param is None:
            continue
        if type(param) is nn.Parameter:  # the model's own
            module._parameters[key] = nn.Parameter(param.detach().clone(), param.requires_grad)
        else:  # the copy's FollowedWeight, on the model's weight's storage
            param.data = param.data.clone()


def _divide(factors: Tensor, dims: int, module: nn.Module, args: Any, output: Tensor) -> Tensor:
    """A forward hook: ``output`` with each feature divided by its factor."""
    shape = (-1,) + (1,) * dims if dims else (-1,)
    return output / factors.to(output.device, output.dtype).reshape(shape)


@contextlib.contextmanager
def _weighed(
    wrapped: nn.Module, weights: dict[str, Tensor] | None
) -> Iterator[list[tuple[str, Tensor]]]:
    """Within, each PCA layer of ``wrapped`` that follows a module with ``weights`` sees that
    module's outputs weighed (its weight and bias scaled), and what the module with its PCA
    layer returns is divided by them again, so that the block computes what it did: the
    layers are calibrated, and their projections built, in the weighed metric. Yields the
    ``(name, weights)`` of the modules scaled: ``compress``'s layers at those names divide
    their outputs by them (:func:`_scale_outputs`). Layers whose BatchNorm ``compress``
    fuses are left unweighed."""
    done: list[tuple[str, Tensor]] = []
    if not weights:
        yield done
        return
    handles = []
    fused = fusable_batchnorms(wrapped)
    try:
        for site in sites_of(wrapped):
            factors = weights.get(site.name)
            module = followed_module(wrapped, site)
            if factors is None or module is None or site.name in fused:
                continue
            outer = wrapped.get_submodule(site.layer_path.rpartition(".")[0])
            _own_parameters(module)
            _scale_outputs(module, factors)
            dims = known_kind(module).spatial_dims
            handles.append(outer.register_forward_hook(partial(_divide, factors, dims)))
            done.append((site.name, factors))
        yield done
    finally:
        for handle in handles:
            handle.remove()


def _backward(block: nn.Module, call: Call, grad: Tensor) -> Tensor:
    """Run ``block`` on ``call`` with gradients, take ``grad`` back from its output, and
    return the gradient at its input."""
    with torch.inference_mode(False), torch.enable_grad():
        args, kwargs, mask = map_tensors(call, lambda t: t.clone())  # not inference tensors
        x = args[0].requires_grad_()
        with token_mask(mask):
            y = block(x, *args[1:], **kwargs)
        hidden = y[0] if isinstance(y, (tuple, list)) else y
        hidden.backward(grad)
    return x.grad if x.grad is not None else torch.zeros_like(x)


@contextlib.contextmanager
def _no_parameter_grads(module: nn.Module) -> Iterator[None]:
    """No parameter of ``module`` takes a gradient, within."""
    params = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in params:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _replayed(model: nn.Module, names: list[str], replay: _Replay) -> Iterator[None]:
    """Every block of ``names`` is ``replay``, within."""
    originals = {name: model.get_submodule(name) for name in names}
    try:
        for name in names:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, replay)
        yield
    finally:
        for name, block in originals.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, block)


def _attach(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register ``module`` at ``path`` under ``root``, creating empty parents."""
    *parents, last = path.split(".")
    for part in parents:
        if part not in root._modules:
            root.add_module(part, nn.Module())
        child = root._modules[part]
        assert child is not None
        root = child
    root.add_module(last, module)


def _check_scratch(
    scratch: Any, remove: float | None, budget: str, propagate: str, loss: Any
) -> None:
    """``scratch`` is usable: a folder that can be written, where the second pass would
    calibrate each block on the activations the first pass saw."""
    if remove is None or budget != "global" or propagate != "original" or loss is not None:
        raise ValueError(
            "scratch keeps the first pass's eigenspaces for the second, which it needs only "
            "where both would calibrate on the same activations: with remove, "
            "budget='global' and propagate='original', without loss; got "
            f"remove={remove!r}, budget={budget!r}, propagate={propagate!r}, "
            f"loss={'given' if loss is not None else None}"
        )
    check_writable(scratch, "scratch", folder=True)


@contextlib.contextmanager
def _scratch_folder(scratch: Any) -> Iterator[Path | None]:
    """A folder of this call's own inside ``scratch`` (None without), removed at the end."""
    if scratch is None:
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="pcasurgery-eigenspaces-", dir=scratch))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _block_folder(folder: Path, i: int) -> Path:
    """The folder of block ``i``'s eigenspaces, one safetensors file per PCA layer."""
    return folder / f"block-{i:05d}"


def _save_eigenspaces(wrapped: nn.Module, path: Path, i: int, blocks: int) -> None:
    """Write the eigenspace of each PCA layer of the calibrated ``wrapped`` block (its
    statistics freed first: what ``compress`` reads) into the folder ``path``, a file per
    layer (safetensors serialises a file's tensors in memory first: one layer's at a time)."""
    from safetensors.torch import save_file

    path.mkdir()
    for j, (name, layer) in enumerate(pca_layers_of(wrapped).items()):
        layer.release_statistics()  # where releasing_statistics has not already
        tensors = {key: value.detach().contiguous() for key, value in layer.state_dict().items()}
        save_file(tensors, str(path / f"{j:05d}.safetensors"), metadata={"layer": name})
        del tensors
    if i == 0:
        size = sum(f.stat().st_size for f in path.iterdir())
        log.info(
            "compress_sequential: the first block's eigenspaces take %.1f MiB in scratch; "
            "about %.2f GiB for the %d blocks, each freed once compressed",
            size / 2**20,
            size * blocks / 2**30,
            blocks,
        )


def _load_eigenspaces(wrapped: nn.Module, path: Path) -> None:
    """Load each PCA layer of ``wrapped`` from the folder ``path`` (:func:`_save_eigenspaces`),
    one layer at a time, and remove the folder."""
    from safetensors import safe_open

    files = {}
    for file in sorted(path.iterdir()):
        with safe_open(str(file), framework="pt") as f:
            files[f.metadata()["layer"]] = file
    for name, layer in pca_layers_of(wrapped).items():
        with safe_open(str(files[name]), framework="pt") as f:
            layer.load_state_dict({key: f.get_tensor(key) for key in layer.state_dict()})
    shutil.rmtree(path)


# A threshold that keeps one direction: a block's layers are wrapped at it until the plan
# sets theirs. Every one is planned: a given plan names each layer wrapped (include=),
# and budget_plan plans every layer pca_wrap makes here (keepdim=True), a standalone
# projection at full rank.
_UNPLANNED = 1e-12


def _compress_block(
    block: nn.Module,
    name: str,
    inputs: list[Call],
    remove: float | None,
    plan: pd.DataFrame | None,
    by: str,
    centering: bool,
    metric: dict[str, Tensor] | None = None,
    dense: bool = True,
    eigenspaces: Path | None = None,
) -> tuple[nn.Module, pd.DataFrame, list[Call] | None]:
    """The compressed copy of one block, calibrated on ``inputs``, its report rows and, with
    ``dense``, the dense block's outputs on ``inputs`` (read off the calibration; else None).
    ``metric``: the weights of the output features of the block's modules, by name
    (:func:`_weighed`). ``eigenspaces``: the folder :func:`_save_eigenspaces` wrote for the
    block, read instead of calibrating it (``inputs`` unused, no outputs).

    With a global ``plan``, only the block's layers it names are wrapped (the
    others stay as they are), each at its planned rank; a block it does not
    name is returned as it is (and no outputs: None).
    """
    local = None
    if plan is not None:
        prefix = name + "."
        named = plan[plan["layer"].astype(str).str.startswith(prefix)]
        local = named.assign(layer=named["layer"].astype(str).str[len(prefix) :])
        if not len(local):
            return block, pd.DataFrame(columns=list(PLAN_COLUMNS)), None
    include = None if local is None else [glob.escape(n) for n in local["layer"]]
    # every layer's threshold comes from the plan: until then each projects onto its first
    # direction, so that no projection is built at a default threshold (a 5632-wide layer's
    # would be a 121 MiB square while its eigenvectors are computed)
    wrapped = pca_wrap_sharing(block, _UNPLANNED, centering=centering, include=include)
    weighed: list[tuple[str, Tensor]] = []
    outputs = None
    if eigenspaces is not None:
        _load_eigenspaces(wrapped, eigenspaces)
    else:
        with _weighed(wrapped, metric) as weighed, releasing_statistics():
            # every layer is compressed next: the eigenvectors now, the statistics freed
            calls = _calibrated(wrapped, inputs, eigenvectors=True, keep=dense)
        outputs = calls if dense else None
    _trim(collect=False)  # what the decompositions freed, first
    if local is None:
        local = budget_plan(wrapped, remove=float(remove), by=by, progress=False)  # type: ignore[arg-type]
    apply_plan(wrapped, local)
    layers = pca_layers_of(wrapped).values()
    compute_eigenvectors(layers)  # where pending; then the statistics go before compressing
    for layer in layers:
        layer.release_statistics()
    small = compress(wrapped, progress=False)
    for module_name, factors in weighed:  # back from the weighed metric
        _scale_outputs(small.get_submodule(module_name), 1 / factors)
    report: pd.DataFrame = small.__dict__["compression_report"]
    return small, report.assign(layer=name + "." + report["layer"].astype(str)), outputs


def _call(block: nn.Module, call: Call) -> Any:
    args, kwargs, mask = call
    with token_mask(mask):
        return block(*args, **kwargs)
