"""``CheckLayerSat``: record layer saturation and other statistics during training.

Forward hooks on every Linear, convolution (1-, 2- and 3-d, transposed too) and LSTM of the given modules feed
streaming covariances (the statistics core's ``TorchCovarianceMatrix``), kept
apart for training-mode and eval-mode passes. ``add_saturations()`` turns them
into the requested stats, hands them to the writers (one record per epoch) and,
by default, starts fresh covariances.

Differences from the seed library: arguments are validated with ``ValueError``
(not ``assert``); ``timestepwise`` makes every timestep of an LSTM one sample of
its hidden width (the seed concatenated the timesteps into one long vector);
LSTMs honour ``batch_first`` and packed sequences; ``embed`` projects the
samples on the top two eigenvectors of their covariance; ``average_sat`` writes
the mean saturation over layers (the seed always wrote NaN); ``nosave=True``
computes and returns the stats without writing anything.

A tracked layer whose outputs hold NaN or infinite values stops the forward
pass with a ``NonFiniteError`` (a ``ValueError``) naming the layer and the mode:
tracking never records them silently. Batches with no example are skipped.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._errors import NonFiniteError
from .._validation import check_bool, check_choice, check_positive_int, check_threshold
from ..core import spectrum as _s
from ..core.covariance_matrix import TorchCovarianceMatrix, resolve_device
from ..layers.kinds import KINDS, is_conv1d
from .writers import STATMAP, WRITERS, AbstractWriter, CompositWriter, NPYWriter

__all__ = ["CONV_METHODS", "CheckLayerSat", "SaturationTracker", "STATS", "TIMESERIES_METHODS"]

log = logging.getLogger("pcasurgery")

STATS = ("lsat", "idim", "cov", "det", "trc", "dtrc", "embed")
CONV_METHODS = ("channelwise", "mean", "max", "median", "flatten")
TIMESERIES_METHODS = ("last_timestep", "timestepwise")
MODES = ("train", "eval")
CONVOLUTIONS: tuple[type[nn.Module], ...] = tuple(
    cls for kind in KINDS if kind.spatial_dims for cls in kind.classes
)
TRACKED: tuple[type[nn.Module], ...] = (nn.Linear, *CONVOLUTIONS, nn.LSTM)
WIDE_BYTES = 2**30  # warn before tracking a layer whose covariance needs more


def _check_stats(stats: object) -> list[str]:
    if isinstance(stats, str) or not isinstance(stats, (list, tuple)):
        raise TypeError(f"stats must be a list of stat names, got {stats!r}")
    for stat in stats:
        base, _, mode = str(stat).partition("_")
        if base not in STATS or (mode and mode not in MODES):
            raise ValueError(
                f"stats: {stat!r} is not a supported stat; allowed: {', '.join(STATS)} "
                "(optionally suffixed with _train or _eval)"
            )
    return list(stats)


def _log_key(mode: str) -> str:
    return f"{mode}-{STATMAP['cov']}"


def _layer_name(module: nn.Module, qualified: str) -> str:
    """delve's name for a tracked layer: its own ``name`` attribute, or its path joined by ``-``."""
    own = getattr(module, "name", None)
    return own if isinstance(own, str) and own else qualified.replace(".", "-")


def _tracked_layers(modules, include_conv: bool) -> OrderedDict[str, nn.Module]:
    """The layers to track, under delve's names.

    A model: every Linear, convolution and LSTM in it, named by its qualified name
    with ``-`` for ``.`` (``layer1-0-conv1``). A list: a layer given directly is
    ``Module-<i>-<Type>``; the layers inside a module given are named within it
    (as delve does), prefixed with ``<i>-`` only where two would collide. A
    layer with a ``name`` attribute keeps it.
    """
    types = TRACKED if include_conv else (nn.Linear, nn.LSTM)

    def kinds(m: object) -> bool:  # transformers' Conv1D is tracked as a Linear
        return isinstance(m, types) or is_conv1d(m)

    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if isinstance(modules, nn.Module) and not kinds(modules):
        for name, m in modules.named_modules():
            if name and kinds(m):
                layers[_layer_name(m, name)] = m
        return layers
    if isinstance(modules, nn.Module):
        modules = [modules]
    if not isinstance(modules, (list, tuple)) or not all(isinstance(m, nn.Module) for m in modules):
        raise TypeError(
            f"modules must be a torch module or a list of modules, got {type(modules).__name__}"
        )
    for i, module in enumerate(modules):
        if kinds(module):
            layers[_layer_name(module, f"Module-{i}-{type(module).__name__}")] = module
            continue
        for name, m in module.named_modules():
            if name and kinds(m):
                key = _layer_name(m, name)
                layers[f"{i}-{key}" if key in layers else key] = m
    return layers


class SaturationTracker:
    """Takes PyTorch modules and records layer saturation, intrinsic dimensionality and other stats.

    Args:
        savefile: path prefix for the writers' files (its folder is created).
        save_to: a writer key (``csv``, ``plot``/``csvplot``/``plotcsv``,
            ``npy``/``npz``/``numpy``, ``tensorboard``, ``print``), an
            ``AbstractWriter``, or a list of these.
        modules: a model (every Linear, convolution and LSTM in it is tracked,
            named by qualified name) or a list of modules/layers.
        writer_args: keyword arguments for writers built from keys.
        log_interval: record one forward call in ``log_interval`` per layer.
        max_samples: stop adding to a layer's covariance after this many input
            examples per epoch.
        stats: any of ``lsat``, ``idim``, ``cov``, ``det``, ``trc``, ``dtrc``,
            ``embed``; each is recorded for training and eval passes (the
            seed's ``lsat_eval`` style names are accepted).
        layerwise_sat: write per-layer values.
        reset_covariance: start fresh covariances after each ``add_saturations``.
        average_sat: also write the mean saturation over layers per mode.
        ignore_layer_names: layers to leave out of the written stats.
        include_conv: track convolutions (Conv1d/2d/3d and transposed).
        conv_method: how a conv's ``(b, c, h, w)`` output becomes samples:
            ``channelwise`` (every position a sample of ``c`` features),
            ``mean``/``max``/``median`` (global pooling per map) or ``flatten``
            (one ``c*h*w`` sample per image; memory-hungry).
        timeseries_method: LSTMs: ``last_timestep`` (the final hidden state) or
            ``timestepwise`` (every timestep a sample).
        sat_threshold: variance fraction defining the intrinsic dimensionality.
        nosave: compute the stats without writing anything.
        verbose: log every layer's saturation when computed.
        device: where covariances are accumulated (CUDA falls back to the CPU
            with a warning when absent).
        initial_epoch: resume writers' saved records from this epoch.
        interpolation_strategy: an ``F.interpolate`` mode to shrink conv maps
            larger than ``interpolation_downsampling`` before recording.
        interpolation_downsampling: the target size of that resizing.
        layer_filter: ``f(dict name -> module) -> dict`` choosing the layers.
    """

    def __init__(
        self,
        savefile: str,
        save_to: str | AbstractWriter | list,
        modules: nn.Module | list,
        writer_args: dict[str, Any] | None = None,
        log_interval: int = 1,
        max_samples: int | None = None,
        stats: list = ["lsat"],  # noqa: B006 - the seed's signature
        layerwise_sat: bool = True,
        reset_covariance: bool = True,
        average_sat: bool = False,
        ignore_layer_names: list[str] = [],  # noqa: B006 - the seed's signature
        include_conv: bool = True,
        conv_method: str = "channelwise",
        timeseries_method: str = "last_timestep",
        sat_threshold: float = 0.99,
        nosave: bool = False,
        verbose: bool = False,
        device="cuda:0",
        initial_epoch: int = 0,
        interpolation_strategy: str | None = None,
        interpolation_downsampling: int = 32,
        layer_filter: Callable[[dict[str, nn.Module]], dict[str, nn.Module]] | None = None,
    ):
        self.stats = _check_stats(stats)
        self.conv_method = check_choice(conv_method, "conv_method", CONV_METHODS)
        self.timeseries_method = check_choice(
            timeseries_method, "timeseries_method", TIMESERIES_METHODS
        )
        self.threshold = check_threshold(sat_threshold, "sat_threshold")
        self.log_interval = check_positive_int(log_interval, "log_interval")
        self.max_samples = check_positive_int(max_samples, "max_samples", allow_none=True)
        self.interpolation_downsampling = check_positive_int(
            interpolation_downsampling, "interpolation_downsampling"
        )
        if interpolation_strategy is not None:
            check_choice(
                interpolation_strategy,
                "interpolation_strategy",
                ("nearest", "bilinear", "bicubic", "area", "nearest-exact"),
            )
        self.interpolation_strategy = interpolation_strategy
        for flag in ("layerwise_sat", "reset_covariance", "average_sat", "include_conv", "nosave"):
            check_bool(locals()[flag], flag)
        self.layerwise_sat, self.reset_covariance = layerwise_sat, reset_covariance
        self.average_sat, self.nosave, self.verbose = average_sat, nosave, bool(verbose)
        self.ignore_layer_names = list(ignore_layer_names)
        self.device = resolve_device(device)
        self.initial_epoch = int(initial_epoch)
        self.savefile = str(savefile)

        layers = _tracked_layers(modules, include_conv)
        if layer_filter is not None:
            if not callable(layer_filter):
                raise TypeError(f"layer_filter must be callable, got {layer_filter!r}")
            chosen = layer_filter(dict(layers))
            if not isinstance(chosen, dict) or not all(
                isinstance(k, str) and isinstance(v, nn.Module) for k, v in chosen.items()
            ):
                raise TypeError(
                    "layer_filter must return a dict {layer name: module} (a subset of the "
                    f"dict it receives), got {type(chosen).__name__}"
                )
            layers = OrderedDict(chosen)
        if not layers:
            kinds = "Linear, Conv2d or LSTM" if include_conv else "Linear or LSTM"
            raise ValueError(f"modules holds no supported layer to track ({kinds})")
        self.layers = layers

        writer_args = dict(writer_args or {})
        writer_args["savepath"] = self.savefile
        folder = os.path.dirname(self.savefile)
        if folder:
            os.makedirs(folder, exist_ok=True)
        os.makedirs(self.savefile, exist_ok=True)
        self.writer = self._make_writer(save_to, writer_args)
        if any(s.partition("_")[0] == "cov" for s in self.stats) and not self._has_npy(self.writer):
            warnings.warn(
                "'cov' was selected as a stat, but no 'npy' writer is used; the npy writer is "
                "the only one that saves covariance matrices (pass a list of writers to add it)",
                UserWarning,
                stacklevel=2,
            )

        # delve's layout: logs["train-covariance-matrix"][layer] is the layer's covariance
        self.logs: dict[str, OrderedDict[str, TorchCovarianceMatrix]] = {
            _log_key(m): OrderedDict() for m in MODES
        }
        self.seen_samples: dict[str, dict[str, int]] = {m: {} for m in MODES}
        self._calls: dict[str, int] = dict.fromkeys(layers, 0)
        self.record = True
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in layers.items()]
        for name in layers:
            log.info("added layer %s", name)
        if self.initial_epoch != 0:
            self.writer.resume_from_saved_state(self.initial_epoch)

    # ----------------------------------------------------------------- writers
    def _make_writer(self, save_to, writer_args) -> AbstractWriter:
        if isinstance(save_to, AbstractWriter):
            return save_to
        if isinstance(save_to, (list, tuple)):
            if not save_to:
                raise ValueError("save_to is an empty list; give at least one writer")
            return CompositWriter([self._make_writer(s, writer_args) for s in save_to])
        if isinstance(save_to, type) and issubclass(save_to, AbstractWriter):
            return save_to(**writer_args)
        if save_to not in WRITERS:
            raise ValueError(
                f"save_to: {save_to!r} is not a writer; allowed: {', '.join(WRITERS)}, "
                "an AbstractWriter, or a list of these"
            )
        return WRITERS[save_to](**writer_args)

    @staticmethod
    def _has_npy(writer: AbstractWriter) -> bool:
        if isinstance(writer, CompositWriter):
            return any(isinstance(w, NPYWriter) for w in writer.writers)
        return isinstance(writer, NPYWriter)

    # ------------------------------------------------------------------- hooks
    def _samples(self, module: nn.Module, output: Any) -> tuple[Tensor, int, int]:
        """The recorded tensor, its feature dimension, and the number of input examples."""
        if isinstance(module, nn.LSTM):
            out, (h, _) = output
            if self.timeseries_method == "last_timestep":
                last = h[-(2 if module.bidirectional else 1) :]  # the last layer, both directions
                x = last.permute(1, 0, 2).reshape(h.shape[1], -1)
                return x, -1, x.shape[0]
            if isinstance(out, nn.utils.rnn.PackedSequence):
                # every valid timestep of every sequence, sequence by sequence (in the
                # caller's order), so that keeping the first rows keeps whole sequences
                padded, lengths = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
                rows = [padded[i, : int(n)] for i, n in enumerate(lengths)]
                return torch.cat(rows), -1, len(rows)
            examples = out.shape[0] if module.batch_first else out.shape[1]
            return out, -1, examples
        x = output
        if isinstance(module, CONVOLUTIONS) and x.dim() >= 3:
            size = self.interpolation_downsampling
            if (
                self.interpolation_strategy is not None
                and x.dim() == 4
                and (x.shape[2] > size or x.shape[3] > size)
            ):
                x = F.interpolate(
                    x,
                    size=(min(size, x.shape[2]), min(size, x.shape[3])),
                    mode=self.interpolation_strategy,
                )
            method = self.conv_method
            if method == "channelwise":
                return x, 1, x.shape[0]
            spatial = tuple(range(2, x.dim()))
            if method == "mean":
                x = x.mean(spatial)
            elif method == "max":
                x = x.amax(spatial)
            elif method == "median":
                x = x.flatten(2).median(dim=2).values
            else:
                x = x.flatten(1)
            return x, -1, x.shape[0]
        return x, -1, x.shape[0] if x.dim() > 1 else 1

    def _first_examples(self, module: nn.Module, output: Any, x: Tensor, keep: int) -> Tensor:
        """The part of ``x`` (from :meth:`_samples`) that comes from the first ``keep`` examples."""
        if isinstance(module, nn.LSTM) and self.timeseries_method == "timestepwise":
            out = output[0]
            if isinstance(out, nn.utils.rnn.PackedSequence):
                _, lengths = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
                return x[: int(lengths[:keep].sum())]
            return x[:, :keep] if not module.batch_first and x.dim() == 3 else x[:keep]
        return x[:keep]

    def _covariance(self, mode: str, name: str, width: int) -> TorchCovarianceMatrix:
        cov = self.logs[_log_key(mode)].get(name)
        if cov is None:
            save = any(s.partition("_")[0] == "embed" for s in self.stats)
            needed = width * width * 8 * 2
            if needed > WIDE_BYTES:
                warnings.warn(
                    f"layer {name!r} is {width} wide: its covariance needs about {needed / 2**30:.1f} GiB "
                    f"({needed:,} bytes); consider conv_method='channelwise' or interpolation",
                    UserWarning,
                    stacklevel=4,
                )
            cov = self.logs[_log_key(mode)][name] = TorchCovarianceMatrix(
                device=self.device, save_data=save
            )
        return cov

    def _hook(self, name: str):
        def record(module: nn.Module, inputs, output) -> None:
            if not self.record:
                return
            self._calls[name] += 1
            if self._calls[name] % self.log_interval:
                return
            mode = "train" if module.training else "eval"
            seen = self.seen_samples[mode].get(name, 0)
            if self.max_samples is not None and seen >= self.max_samples:
                return
            with torch.no_grad():
                x, channel_dim, examples = self._samples(module, output)
                if self.max_samples is not None and seen + examples > self.max_samples:
                    keep = self.max_samples - seen
                    x = self._first_examples(module, output, x, keep)
                    examples = keep
                x = x.detach()
                width = x.shape[channel_dim]
                if channel_dim == -1 and x.dim() > 2:
                    x = x.reshape(-1, width)
                try:
                    self._covariance(mode, name, width).update(x, channel_dim=channel_dim)
                except NonFiniteError as err:
                    raise NonFiniteError(
                        f"layer {name!r} ({mode} mode) produced NaN or infinite outputs; "
                        "CheckLayerSat stops rather than record them"
                    ) from err
            self.seen_samples[mode][name] = seen + examples

        return record

    # ------------------------------------------------------------ user surface
    def is_recording(self) -> bool:
        """Whether the hooks currently record."""
        return self.record

    def stop(self) -> None:
        """Pause recording (forward passes are not added)."""
        self.record = False

    def resume(self) -> None:
        """Resume recording."""
        self.record = True

    def add_scalar(self, name: str, value: Any, **kwargs) -> None:
        """Log a value of your own (a loss, an accuracy) for the current epoch."""
        if self.nosave:
            log.info("nosave: not logging %s = %s", name, value)
            return
        self.writer.add_scalar(name, value, **kwargs)

    def add_scalars(self, prefix: str, value_dict: dict[str, Any], **kwargs) -> None:
        """Log several values of your own for the current epoch."""
        if self.nosave:
            return
        self.writer.add_scalars(prefix, value_dict, **kwargs)

    def compute(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The requested stats of every recorded layer, without writing or resetting.

        Returns:
            ``(values, samples)``: ``{"<mode>-<stat name>_<layer>": value}`` and
            the per-sample values (embeddings) keyed the same way.
        """
        values: dict[str, Any] = {}
        samples: dict[str, Any] = {}
        wanted = {s.partition("_")[0] for s in self.stats}
        for mode in MODES:
            for name, cov in self.logs[_log_key(mode)].items():
                if name in self.ignore_layer_names or cov.moments is None or cov._tlen == 0:
                    continue
                matrix = cov.fix(center=True)
                eigenvalues, eigenvectors = _s.eigh_descending(matrix)
                k = _s.intrinsic_dimensionality(eigenvalues, self.threshold)
                key = f"{mode}-{{}}_{name}"
                if "lsat" in wanted:
                    values[key.format(STATMAP["lsat"])] = _s.saturation(k, matrix.shape[0])
                if "idim" in wanted:
                    values[key.format(STATMAP["idim"])] = k
                if "det" in wanted:
                    values[key.format(STATMAP["det"])] = _s.cov_determinant(matrix)
                if "trc" in wanted:
                    values[key.format(STATMAP["trc"])] = _s.cov_trace(matrix)
                if "dtrc" in wanted:
                    values[key.format(STATMAP["dtrc"])] = float(eigenvalues.sum())
                if "cov" in wanted:
                    values[key.format(STATMAP["cov"])] = matrix.cpu().numpy()
                if "embed" in wanted and cov.saved_samples is not None:
                    points = _s.embed(cov.saved_samples, eigenvectors, cov.mean)
                    samples[key.format(STATMAP["embed"])] = points.cpu().numpy()
                if self.verbose:
                    log.info(
                        "%s %s: saturation %.4f (k = %d of %d)",
                        mode,
                        name,
                        _s.saturation(k, matrix.shape[0]),
                        k,
                        matrix.shape[0],
                    )
        return values, samples

    def add_saturations(self, save: bool = True) -> dict[str, Any]:
        """Compute the stats of every layer, write them, and (by default) reset the covariances.

        Returns:
            The values written, keyed ``"<train|eval>-<stat name>_<layer>"``.
        """
        values, samples = self.compute()
        if self.average_sat:
            for mode in MODES:
                sats = [v for k, v in values.items() if k.startswith(f"{mode}-{STATMAP['lsat']}_")]
                if not sats and "lsat" not in {s.partition("_")[0] for s in self.stats}:
                    sats = [self._saturation_of(mode, n) for n in self.logs[_log_key(mode)]]
                if sats:
                    values[f"average-{mode}-sat"] = float(np.mean(sats))
        if not self.nosave:
            written = (
                values
                if self.layerwise_sat
                else {k: v for k, v in values.items() if k.startswith("average-")}
            )
            self.writer.add_scalars(prefix="", value_dict=written, sample_value_dict=samples)
            if save:
                self.writer.save()
        for mode in MODES:
            self.seen_samples[mode] = {}
            if self.reset_covariance:
                self.logs[_log_key(mode)] = OrderedDict()
        return {**values, **samples}

    add_saturation = add_saturations

    def _saturation_of(self, mode: str, name: str) -> float:
        matrix = self.logs[_log_key(mode)][name].fix()
        values, _ = _s.eigh_descending(matrix)
        return _s.saturation(_s.intrinsic_dimensionality(values, self.threshold), matrix.shape[0])

    def save(self) -> None:
        """Ask the writers to write what they hold."""
        if not self.nosave:
            self.writer.save()

    def close(self) -> None:
        """Remove the hooks and close the writers."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.writer.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layers={list(self.layers)}, stats={self.stats})"


class CheckLayerSat(SaturationTracker):
    """The seed library's name for :class:`SaturationTracker` (the same class)."""
