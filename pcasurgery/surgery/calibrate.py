"""``calibrate``: stream data through a wrapped model and compute every eigenspace.

Calibration runs under ``torch.inference_mode`` with the model in eval mode
(BatchNorm statistics untouched, dropout off) while the PCA layers collect;
afterwards every module's train/eval flag and every PCA layer's mode are
restored. Under an initialised ``torch.distributed`` process group the
statistics are all-reduced before the eigendecomposition, so every rank ends
with the eigenspaces of the union of all ranks' data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._validation import check_bool, check_positive_int
from ..core import moments as _m
from ..layers.network import pca_layers_of, require_layers

__all__ = ["all_reduce_statistics", "calibrate", "examples_in"]


def examples_in(batch: Any) -> int:
    """Number of input examples in a batch: the leading size of its first tensor."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        items: Iterable[Any] = batch.values()
    elif isinstance(batch, (tuple, list)):
        items = batch
    else:
        raise TypeError(
            "a calibration batch must be a tensor, a tuple/list whose first item is the "
            f"input, or a dict of keyword arguments; got {type(batch).__name__} "
            "(pass forward=... to handle other batches)"
        )
    for item in items:
        if isinstance(item, Tensor) or isinstance(item, (Mapping, tuple, list)):
            return examples_in(item)
    raise TypeError(f"a calibration batch holds no tensor: {type(batch).__name__}")


def _map_tensors(batch: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return type(batch)((k, _map_tensors(v, fn)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_map_tensors(v, fn) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_map_tensors(v, fn) for v in batch)
    return batch


def _to_device(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch

    def move(t: Tensor) -> Tensor:
        return t.to(device, non_blocking=device.type == "cuda" and t.is_pinned())

    return _map_tensors(batch, move)


def _truncate(batch: Any, size: int, keep: int) -> Any:
    """Keep the first ``keep`` examples of every tensor whose leading size is ``size``."""
    return _map_tensors(batch, lambda t: t[:keep] if t.dim() and t.shape[0] == size else t)


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(batch[0])


def _model_device(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


@torch.no_grad()
def all_reduce_statistics(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Sum the PCA layers' statistics over all ranks of ``group``, exactly.

    Each rank first re-expresses its moments around a shift common to all ranks
    (the mean of the shifts of the ranks that have data), then the moments are
    summed with one all-reduce. Every rank must call this with the same model
    structure; afterwards each layer holds the statistics of the union.
    """
    layers = list(pca_layers_of(model).values())
    if not layers:
        return
    f64 = torch.float64
    device = layers[0].shift.device
    widths = [layer.width for layer in layers]
    # 1. a shift common to all ranks
    has = torch.tensor([float(int(layer.sample_count) > 0) for layer in layers], dtype=f64)
    packed = torch.cat(
        [layer.shift.to(device) * float(h) for layer, h in zip(layers, has, strict=True)]
        + [has.to(device)]
    )
    dist.all_reduce(packed, group=group)
    holders = packed[-len(layers) :].clamp_min(1.0)
    commons = [c / n for c, n in zip(packed[: -len(layers)].split(widths), holders, strict=True)]
    # 2. re-shift every rank's moments to it, then sum them
    local = [
        _m.reshift(layer.statistics(), c.to(layer.shift.device))
        for layer, c in zip(layers, commons, strict=True)
    ]
    packed = torch.cat(
        [
            torch.cat(
                [
                    m.count.to(device, f64).reshape(1),
                    layer.example_count.to(device, f64).reshape(1),
                    m.total.to(device),
                    m.total_sq.to(device).reshape(-1),
                ]
            )
            for layer, m in zip(layers, local, strict=True)
        ]
    )
    dist.all_reduce(packed, group=group)
    chunks = packed.split([2 + w + w * w for w in widths])
    for layer, common, chunk in zip(layers, commons, chunks, strict=True):
        w, target = layer.width, layer.shift.device
        state = _m.Moments(
            chunk[0].round().to(torch.int64).to(target),
            common.to(target),
            chunk[2 : 2 + w].to(target),
            chunk[2 + w :].reshape(w, w).to(target),
        )
        layer.load_statistics(state, examples=int(chunk[1].round()))


def calibrate(
    model: nn.Module,
    data: Iterable[Any],
    *,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    max_samples: int | None = None,
    progress: bool = True,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    reset: bool = True,
) -> nn.Module:
    """Stream ``data`` through ``model``, fill the PCA layers' statistics, compute their eigenspaces.

    Args:
        model: a model with PCA layers (``pca_wrap``'s result, or hand-placed layers).
        data: an iterable of batches: a tensor, a tuple/list whose first item is
            the input (labels are ignored), or a dict passed as keyword arguments.
        device: move the model and every batch there first (non-blocking copies
            from pinned memory on CUDA). By default batches go to the model's device.
        max_batches: stop after this many batches.
        max_samples: stop after this many input examples (batch rows, not conv
            positions); the last batch is cut to fit.
        progress: show a tqdm progress bar with the throughput in samples/s.
        forward: ``forward(model, batch)`` runs one batch, for other batch layouts.
        reset: start from fresh statistics (True) or add to those collected before.

    Returns:
        ``model``, with every PCA layer's eigenspace computed and its train/eval
        flags restored.

    Raises:
        ValueError: no PCA layer, empty data, non-finite activations (naming the
            layer), or a batch the model cannot run.

    Example:
        >>> from pcasurgery import pca_wrap
        >>> net = pca_wrap(nn.Sequential(nn.Linear(8, 4)), 0.9)
        >>> data = [torch.randn(32, 8) for _ in range(4)]
        >>> calibrate(net, data, progress=False).get_submodule("0.pca").samples
        128
    """
    from tqdm.auto import tqdm

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(data, (Tensor, str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(
            "data must be an iterable of batches (a DataLoader, a list of tensors, ...), "
            f"got {type(data).__name__}"
        )
    max_batches = check_positive_int(max_batches, "max_batches", allow_none=True)
    max_samples = check_positive_int(max_samples, "max_samples", allow_none=True)
    check_bool(progress, "progress")
    check_bool(reset, "reset")
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be callable as forward(model, batch), got {forward!r}")
    layers = pca_layers_of(model)
    require_layers(layers)

    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device must name a torch device, got {device!r}") from err
        model.to(device)
    target_device = device if device is not None else _model_device(model)
    run = forward or _default_forward

    flags = {m: m.training for m in model.modules()}
    modes = {layer: layer.mode for layer in layers.values()}
    seen = batches = 0
    try:
        model.eval()
        for layer in layers.values():
            if reset:
                layer.reset_statistics()
            layer.mode = "collect"
        bar = tqdm(total=max_samples, unit="samples", disable=not progress, desc="calibrating")
        with bar, torch.inference_mode():
            for batch in data:
                if max_batches is not None and batches >= max_batches:
                    break
                size = examples_in(batch)
                if max_samples is not None and seen + size > max_samples:
                    batch, size = _truncate(batch, size, max_samples - seen), max_samples - seen
                batch = _to_device(batch, target_device)
                try:
                    run(model, batch)
                except (RuntimeError, TypeError, IndexError) as err:
                    shapes = _map_tensors(batch, lambda t: tuple(t.shape))
                    raise ValueError(
                        f"the model's forward failed on calibration batch {batches} "
                        f"(tensor shapes {shapes}): {err}"
                    ) from err
                seen += size
                batches += 1
                bar.update(size)
                if max_samples is not None and seen >= max_samples:
                    break
        if batches == 0:
            raise ValueError("data yielded no batch: nothing to calibrate on")
        if dist.is_available() and dist.is_initialized():
            all_reduce_statistics(model)
        unreached = [name for name, layer in layers.items() if int(layer.sample_count) == 0]
        if unreached:
            raise ValueError(
                f"PCA layers {', '.join(unreached)} saw no data: their modules were never called "
                "on these batches (wrap without them, e.g. pca_wrap(model, exclude=[...]))"
            )
        for layer in layers.values():
            layer.compute_eigenspace()
    finally:
        for layer, mode in modes.items():
            layer.mode = mode
        for module, flag in flags.items():
            module.training = flag
    return model
