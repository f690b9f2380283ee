"""Writers for training-time saturation tracking (the seed library's save strategies).

A writer receives named values (``add_scalar``/``add_scalars``) and writes them
on ``save()``. Names follow the seed library:
``"<train|eval>-<stat name>_<layer>"``, e.g. ``"train-saturation_fc1"``, plus
whatever the user logs with ``add_scalar``. Files are named as the seed library
(delve 0.1.50) names them, so scripts that read its outputs keep working.

Epochs: ``save()`` ends an epoch and values logged after it belong to the next
one; a ``save()`` with nothing new logged since the last one writes again but
starts no epoch (delve's own examples call ``add_saturations()``, which saves,
then ``save()``).

==============  ============================================================
key             writer
==============  ============================================================
``csv``         ``<savepath>.csv``, one row per epoch (``;``-separated, an
                unnamed index of epochs, as delve writes it)
``plot``        the CSV plus ``<savepath>_<stat>_<train|eval>_epoch_<n>.png``
                per stat and mode (also ``csvplot``, ``plotcsv``, ``csvplotting``)
``npy``         a folder with ``<name>/<name>_epoch<n>.npy`` per value and
                ``epoch_counter.pkl``; the only writer that keeps full
                covariance matrices (``npz``, ``numpy``)
``tensorboard`` TensorBoard event files (``tb``); needs ``tensorboard``
``print``       prints every value as it is logged, through ``tqdm.write``
==============  ============================================================
"""

from __future__ import annotations

import io
import json
import math
import numbers
import pickle
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "STATMAP",
    "WRITERS",
    "AbstractWriter",
    "CSVWriter",
    "CSVandPlottingWriter",
    "CompositWriter",
    "NPYWriter",
    "PrintWriter",
    "TensorBoardWriter",
]

STATMAP = {
    "idim": "intrinsic-dimensionality",
    "lsat": "saturation",
    "cov": "covariance-matrix",
    "det": "covariance-determinant",
    "trc": "covariance-trace",
    "dtrc": "diagonal-trace",
    "embed": "embedded-sample",
}
_SHORT = {v: k for k, v in STATMAP.items()}


def _is_scalar(value: Any) -> bool:
    return isinstance(value, numbers.Real) or (isinstance(value, np.ndarray) and value.ndim == 0)


class _Epochs:
    """Epoch bookkeeping shared by the writers (see the module docstring)."""

    def __init__(self, start: int = 0):
        self.current = start
        self.closed = False

    def on_value(self) -> int:
        """The epoch a value logged now belongs to."""
        if self.closed:
            self.current += 1
            self.closed = False
        return self.current

    def on_save(self) -> int:
        """The epoch a save now writes; the next value starts a new one."""
        self.closed = True
        return self.current


class AbstractWriter(ABC):
    """Base class of writers; subclass it to send the values anywhere.

    Subclasses implement ``resume_from_saved_state``, ``add_scalar``,
    ``add_scalars``, ``save`` and ``close``. ``add_scalars`` receives
    ``prefix``, ``value_dict`` and keyword arguments (``sample_value_dict``
    holds per-sample values such as embeddings).
    """

    def _check_savestate_ok(self, savepath: str | Path) -> bool:
        if not Path(savepath).exists():
            warnings.warn(
                f"{savepath} does not exist; {type(self).__name__} starts a new record",
                stacklevel=3,
            )
            return False
        return True

    @abstractmethod
    def resume_from_saved_state(self, initial_epoch: int) -> None:
        """Continue a record saved earlier, from epoch ``initial_epoch``."""

    @abstractmethod
    def add_scalar(self, name: str, value: Any, **kwargs) -> None:
        """Log one value for the current epoch."""

    @abstractmethod
    def add_scalars(self, prefix: str, value_dict: dict[str, Any], **kwargs) -> None:
        """Log several values for the current epoch."""

    @abstractmethod
    def save(self) -> None:
        """Write what was logged; the epoch ends (see the module docstring)."""

    @abstractmethod
    def close(self) -> None:
        """Release files and resources."""


class CompositWriter(AbstractWriter):
    """Sends everything to several writers (the seed library's name is kept)."""

    def __init__(self, writers: list[AbstractWriter]):
        self.writers = list(writers)

    def resume_from_saved_state(self, initial_epoch: int) -> None:
        for w in self.writers:
            w.resume_from_saved_state(initial_epoch)

    def add_scalar(self, name, value, **kwargs):
        for w in self.writers:
            w.add_scalar(name, value, **kwargs)

    def add_scalars(self, prefix, value_dict, **kwargs):
        for w in self.writers:
            w.add_scalars(prefix, value_dict, **kwargs)

    def save(self):
        for w in self.writers:
            w.save()

    def close(self):
        for w in self.writers:
            w.close()


CompositeWriter = CompositWriter


class CSVWriter(AbstractWriter):
    """``<savepath>.csv`` with one row per epoch, rewritten on every save.

    The file is delve's: ``;``-separated, the epoch as an unnamed first column
    (so a user value named ``epoch`` is a column like any other). Non-scalar
    values (covariance matrices, embeddings) are not written. A value logged
    twice in one epoch keeps the last; values missing in an epoch stay empty.
    """

    def __init__(self, savepath: str, **kwargs):
        self.savepath = str(savepath)
        self.rows: dict[int, dict[str, float]] = {}  # epoch -> values
        self.epochs = _Epochs()

    @property
    def epoch_counter(self) -> int:
        """The epoch values are logged into now."""
        return self.epochs.current

    @property
    def csv_path(self) -> Path:
        return Path(self.savepath + ".csv")

    def resume_from_saved_state(self, initial_epoch: int) -> None:
        """Keep the saved rows of epochs before ``initial_epoch``, under their own epoch numbers."""
        self.epochs = _Epochs(initial_epoch)
        if self._check_savestate_ok(self.csv_path):
            frame = pd.read_csv(self.csv_path, sep=";", index_col=0)
            self.rows = {
                int(epoch): {
                    k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))
                }
                for epoch, row in zip(frame.index, frame.to_dict("records"), strict=True)
                if int(epoch) < initial_epoch
            }

    def add_scalar(self, name, value, **kwargs):
        if _is_scalar(value):
            number = int(value) if isinstance(value, numbers.Integral) else float(value)
            self.rows.setdefault(self.epochs.on_value(), {})[name] = number

    def add_scalars(self, prefix, value_dict, **kwargs):
        for name, value in value_dict.items():
            self.add_scalar(f"{prefix}{name}", value)

    def frame(self) -> pd.DataFrame:
        """Every epoch recorded so far (the index is the epoch)."""
        return pd.DataFrame.from_dict(self.rows, orient="index")

    def save(self):
        self.epochs.on_save()
        self.frame().to_csv(self.csv_path, sep=";")

    def close(self):
        pass


class CSVandPlottingWriter(CSVWriter):
    """The CSV writer, plus plots of every stat per layer, in forward order, on each save.

    Files, as delve names them: ``<savepath>_<stat>_<mode>_epoch_<n>.png`` for
    each stat found in the record (``lsat``, ``idim``, ``det``, ``trc``,
    ``dtrc``) and each mode (``train``, ``eval``; a mode without values gets an
    empty plot, as in delve), and ``<savepath>_embed_<mode>_epoch_<n>.png``
    for embeddings (one panel per layer).

    Args:
        savepath: path prefix of the files.
        plot_manipulation_func: ``f(ax) -> ax`` applied to every plot's axes.
        fontsize, figsize, primary_metric: as in the seed library; a
            ``primary_metric`` logged with ``add_scalar`` appears in the title.
    """

    def __init__(self, savepath: str, plot_manipulation_func: Callable | None = None, **kwargs):
        super().__init__(savepath)
        self.plot_manipulation_func = plot_manipulation_func or (lambda ax: ax)
        self.primary_metric = kwargs.get("primary_metric")
        self.fontsize = kwargs.get("fontsize", 10)
        self.figsize = kwargs.get("figsize")
        self.samples: dict[str, Any] = {}

    def add_scalars(self, prefix, value_dict, sample_value_dict=None, **kwargs):
        super().add_scalars(prefix, value_dict)
        for name, value in (sample_value_dict or {}).items():
            self.epochs.on_value()
            self.samples[f"{prefix}{name}"] = value

    def save(self):
        epoch = self.epochs.current
        super().save()
        row = self.rows.get(epoch, {})
        self._plot_stats(row, epoch)
        self._plot_embeddings(epoch)
        self.samples = {}

    def _figure(self, width: int, height: float = 4.0):
        from matplotlib.figure import Figure

        size = self.figsize or (max(6.0, 0.5 * width + 2), height)
        return Figure(figsize=size, layout="constrained")

    def _plot_stats(self, row: dict[str, float], epoch: int) -> None:
        by_stat: dict[str, dict[str, dict[str, float]]] = {}
        for name, value in row.items():
            head, sep, layer = name.partition("_")
            mode, dash, stat = head.partition("-")
            if not sep or not dash or mode not in ("train", "eval") or stat not in _SHORT:
                continue
            by_stat.setdefault(_SHORT[stat], {}).setdefault(mode, {})[layer] = value
        for short, modes in by_stat.items():
            for mode in ("train", "eval"):
                self._plot_stat(short, mode, modes.get(mode, {}), row, epoch)

    def _plot_stat(
        self, short: str, mode: str, layers: dict[str, float], row: dict[str, float], epoch: int
    ) -> None:
        names = list(layers)
        fig = self._figure(len(names))
        ax = fig.add_subplot()
        x = np.arange(len(names))
        if names:
            ax.plot(x, list(layers.values()), alpha=0.6)
            ax.scatter(x, list(layers.values()))
        ax.set_xticks(x, names, rotation=90, fontsize=self.fontsize)
        if short == "lsat":
            ax.set_ylim(0, 1.0)
        ax.set_ylabel(STATMAP[short], fontsize=self.fontsize)
        ax.set_xlabel("layers", fontsize=self.fontsize)
        title = f"{Path(self.savepath).name} {mode} epoch: {epoch}"
        if self.primary_metric and self.primary_metric in row:
            title += f", {self.primary_metric}: {row[self.primary_metric]:.4g}"
        ax.set_title(title, fontsize=self.fontsize)
        ax.grid(alpha=0.3)
        self.plot_manipulation_func(ax)
        fig.savefig(f"{self.savepath}_{short}_{mode}_epoch_{epoch}.png", dpi=100)

    def _plot_embeddings(self, epoch: int) -> None:
        by_mode: dict[str, dict[str, np.ndarray]] = {}
        for name, value in self.samples.items():
            points = np.asarray(value)
            mode = name.partition("-")[0]
            if points.ndim == 2 and points.shape[1] >= 2 and mode in ("train", "eval"):
                layer = name.partition("_")[2] or name
                by_mode.setdefault(mode, {})[layer] = points
        for mode, layers in by_mode.items():
            fig = self._figure(4 * len(layers), 4.0)
            axes = fig.subplots(1, len(layers), squeeze=False)[0]
            for ax, (layer, points) in zip(axes, layers.items(), strict=True):
                ax.scatter(points[:, 0], points[:, 1], s=4, alpha=0.5)
                ax.set_xlabel("eigendirection 1")
                ax.set_ylabel("eigendirection 2")
                ax.set_title(f"{layer} {mode} epoch: {epoch}", fontsize=self.fontsize)
                self.plot_manipulation_func(ax)
            fig.savefig(f"{self.savepath}_embed_{mode}_epoch_{epoch}.png", dpi=100)


class _CounterUnpickler(pickle.Unpickler):
    """Reads an ``epoch_counter.pkl`` (a dict of str to int) and nothing else."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(
            f"epoch_counter.pkl may hold only a dict, found {module}.{name}"
        )


class NPYWriter(AbstractWriter):
    """A folder with one sub-folder per value name and one ``<name>_epoch<n>.npy`` per value logged.

    The layout is delve's: the stats of ``add_saturations`` are named
    ``_<mode>-<stat>_<layer>`` (delve joins an empty prefix with ``_``), values
    from ``add_scalar`` keep their name, ``<n>`` counts the values logged under
    that name, and ``epoch_counter.pkl`` holds the last ``<n>`` per name, so a
    delve record resumes here and the other way round. The only writer that
    keeps non-scalar values: covariance matrices, embeddings.

    Args:
        savepath: the root folder.
        zip: also write ``<savepath>.zip`` of the folder on every save.
    """

    COUNTER = "epoch_counter.pkl"

    def __init__(self, savepath: str, zip: bool = False, **kwargs):
        self.savepath = Path(savepath)
        self.zip = zip
        self.epoch_counter: dict[str, int] = {}

    def resume_from_saved_state(self, initial_epoch: int) -> None:
        """Continue the numbering saved in ``epoch_counter.pkl`` (or an ``epoch_counter.json``)."""
        path = self.savepath / self.COUNTER
        legacy = self.savepath / "epoch_counter.json"
        if legacy.exists() and not path.exists():
            saved = json.loads(legacy.read_text())
        elif self._check_savestate_ok(path):
            saved = _CounterUnpickler(io.BytesIO(path.read_bytes())).load()
        else:
            return
        if not isinstance(saved, dict):
            raise ValueError(f"{path} does not hold a dict of epoch counters")
        self.epoch_counter = {str(k): min(int(v), initial_epoch - 1) for k, v in saved.items()}

    def add_scalar(self, name, value, **kwargs):
        epoch = self.epoch_counter[name] + 1 if name in self.epoch_counter else 0
        self.epoch_counter[name] = epoch
        folder = self.savepath / name
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"{name}_epoch{epoch}.npy", np.asarray(value))

    def add_scalars(self, prefix, value_dict, sample_value_dict=None, **kwargs):
        for name, value in {**value_dict, **(sample_value_dict or {})}.items():
            self.add_scalar(f"{prefix}_{name}", value)

    def save(self):
        self.savepath.mkdir(parents=True, exist_ok=True)
        (self.savepath / self.COUNTER).write_bytes(pickle.dumps(self.epoch_counter))
        if self.zip:
            import shutil

            shutil.make_archive(str(self.savepath), "zip", root_dir=self.savepath)

    def close(self):
        pass


class PrintWriter(AbstractWriter):
    """Prints every scalar as it is logged, without breaking tqdm progress bars."""

    def __init__(self, **kwargs):
        pass

    def resume_from_saved_state(self, initial_epoch: int) -> None:
        pass

    def add_scalar(self, name, value, **kwargs):
        from tqdm import tqdm

        if _is_scalar(value):
            tqdm.write(f"{name} : {value}")  # delve's format

    def add_scalars(self, prefix, value_dict, **kwargs):
        for name, value in value_dict.items():
            self.add_scalar(f"{prefix}_{name}", value)  # delve joins the prefix with "_"

    def save(self):
        pass

    def close(self):
        pass


class TensorBoardWriter(AbstractWriter):
    """TensorBoard event files in ``savepath`` (PyTorch's ``torch.utils.tensorboard``).

    Needs the ``tensorboard`` package (``pip install pcasurgery[tensorboard]``).
    Each epoch is one global step.
    """

    def __init__(self, savepath: str, **kwargs):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(
                "the 'tensorboard' writer needs the tensorboard package: "
                "pip install tensorboard (or pcasurgery[tensorboard])"
            ) from err
        self.savepath = str(savepath)
        self._factory = SummaryWriter
        self.writer = SummaryWriter(self.savepath)
        self.epochs = _Epochs()

    def resume_from_saved_state(self, initial_epoch: int) -> None:
        self.writer.close()
        self.writer = self._factory(self.savepath, purge_step=initial_epoch)
        self.epochs = _Epochs(initial_epoch)

    def add_scalar(self, name, value, **kwargs):
        if _is_scalar(value):
            self.writer.add_scalar(name, float(value), global_step=self.epochs.on_value())

    def add_scalars(self, prefix, value_dict, **kwargs):
        for name, value in value_dict.items():
            self.add_scalar(f"{prefix}{name}", value)

    def save(self):
        self.epochs.on_save()
        self.writer.flush()

    def close(self):
        self.writer.close()


WRITERS: dict[str, type[AbstractWriter]] = {
    "csv": CSVWriter,
    "npy": NPYWriter,
    "npz": NPYWriter,
    "numpy": NPYWriter,
    "print": PrintWriter,
    "tb": TensorBoardWriter,
    "tensorboard": TensorBoardWriter,
    "plot": CSVandPlottingWriter,
    "csvplot": CSVandPlottingWriter,
    "plotcsv": CSVandPlottingWriter,
    "csvplotting": CSVandPlottingWriter,
}
