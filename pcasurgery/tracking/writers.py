"""Writers for training-time saturation tracking (the seed library's save strategies).

A writer receives named values (``add_scalar``/``add_scalars``) and makes one
record per epoch on ``save()``. Names follow the seed library:
``"<train|eval>-<stat name>_<layer>"``, e.g. ``"train-saturation_fc1"``, plus
whatever the user logs with ``add_scalar``.

==============  ============================================================
key             writer
==============  ============================================================
``csv``         ``<savepath>.csv``, one row per epoch (``;``-separated)
``plot``        the CSV plus one PNG per stat per epoch (also ``csvplot``,
                ``plotcsv``, ``csvplotting``)
``npy``         a folder of ``.npy`` files, one per value per epoch; the only
                writer that keeps full covariance matrices (``npz``, ``numpy``)
``tensorboard`` TensorBoard event files (``tb``); needs ``tensorboard``
``print``       prints every value as it is logged, through ``tqdm.write``
==============  ============================================================
"""

from __future__ import annotations

import json
import math
import numbers
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
        """Close the current epoch's record and write it."""

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
    """``<savepath>.csv`` with one row per epoch (index ``epoch``), rewritten on every save.

    Non-scalar values (covariance matrices, embeddings) are not written. A
    value logged twice in one epoch keeps the last.
    """

    def __init__(self, savepath: str, **kwargs):
        self.savepath = str(savepath)
        self.rows: dict[int, dict[str, float]] = {}  # epoch -> values, as written
        self.current: dict[str, float] = {}
        self.epoch_counter = 0

    @property
    def csv_path(self) -> Path:
        return Path(self.savepath + ".csv")

    def resume_from_saved_state(self, initial_epoch: int) -> None:
        """Keep the saved rows of epochs before ``initial_epoch``, under their own epoch numbers."""
        self.epoch_counter = initial_epoch
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
            self.current[name] = float(value)

    def add_scalars(self, prefix, value_dict, **kwargs):
        for name, value in value_dict.items():
            self.add_scalar(f"{prefix}{name}", value)

    def frame(self) -> pd.DataFrame:
        """All epochs recorded so far, the current one excluded."""
        frame = pd.DataFrame.from_dict(self.rows, orient="index")
        frame.index = pd.Index(list(self.rows), name="epoch")
        return frame

    def save(self):
        self.rows[self.epoch_counter] = self.current
        self.current = {}
        self.epoch_counter += 1
        self.frame().to_csv(self.csv_path, sep=";")

    def close(self):
        pass


class CSVandPlottingWriter(CSVWriter):
    """The CSV writer, plus one PNG per stat per epoch: the stat per layer, in forward order.

    Plots are ``<savepath>_<stat>_epoch_<n>.png`` (train and eval side by side),
    and ``<savepath>_embed_<layer>_epoch_<n>.png`` for embeddings.

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
        self.samples.update(sample_value_dict or {})

    def save(self):
        row = dict(self.current)
        epoch = self.epoch_counter
        super().save()
        self._plot_stats(row, epoch)
        for name, points in self.samples.items():
            self._plot_embedding(name, np.asarray(points), epoch)
        self.samples = {}

    def _figure(self, width: int):
        from matplotlib.figure import Figure

        size = self.figsize or (max(6.0, 0.5 * width + 2), 4.0)
        return Figure(figsize=size, layout="constrained")

    def _plot_stats(self, row: dict[str, float], epoch: int) -> None:
        by_stat: dict[str, dict[str, dict[str, float]]] = {}
        for name, value in row.items():
            head, sep, layer = name.partition("_")
            mode, dash, stat = head.partition("-")
            if not sep or not dash or mode not in ("train", "eval") or stat not in _SHORT:
                continue
            by_stat.setdefault(_SHORT[stat], {}).setdefault(layer, {})[mode] = value
        for short, layers in by_stat.items():
            names = list(layers)
            fig = self._figure(len(names))
            ax = fig.add_subplot()
            x = np.arange(len(names))
            for offset, mode in ((-0.2, "train"), (0.2, "eval")):
                values = [layers[n].get(mode, np.nan) for n in names]
                if not all(math.isnan(v) for v in values):
                    ax.bar(x + offset, values, width=0.4, label=mode)
            ax.set_xticks(x, names, rotation=60, ha="right", fontsize=self.fontsize)
            ax.set_ylabel(STATMAP[short], fontsize=self.fontsize)
            ax.set_xlabel("layers (forward order)", fontsize=self.fontsize)
            title = f"{Path(self.savepath).name} epoch {epoch}"
            if self.primary_metric and self.primary_metric in row:
                title += f", {self.primary_metric} {row[self.primary_metric]:.4g}"
            ax.set_title(title, fontsize=self.fontsize)
            ax.legend(fontsize=self.fontsize)
            self.plot_manipulation_func(ax)
            fig.savefig(f"{self.savepath}_{short}_epoch_{epoch}.png", dpi=100)

    def _plot_embedding(self, name: str, points: np.ndarray, epoch: int) -> None:
        if points.ndim != 2 or points.shape[1] < 2:
            return
        fig = self._figure(4)
        ax = fig.add_subplot()
        ax.scatter(points[:, 0], points[:, 1], s=4, alpha=0.5)
        ax.set_xlabel("eigendirection 1")
        ax.set_ylabel("eigendirection 2")
        ax.set_title(f"{name} epoch {epoch}", fontsize=self.fontsize)
        self.plot_manipulation_func(ax)
        safe = name.replace("/", "_")
        fig.savefig(f"{self.savepath}_embed_{safe}_epoch_{epoch}.png", dpi=100)


class NPYWriter(AbstractWriter):
    """A folder with one sub-folder per value name and one ``<name>_epoch<n>.npy`` per epoch.

    The only writer that keeps non-scalar values: covariance matrices, embeddings.

    Args:
        savepath: the root folder.
        zip: also write ``<savepath>.zip`` of the folder on every save.
    """

    def __init__(self, savepath: str, zip: bool = False, **kwargs):
        self.savepath = Path(savepath)
        self.zip = zip
        self.epoch_counter: dict[str, int] = {}
        self.epoch = 0
        self.pending: dict[str, Any] = {}

    def resume_from_saved_state(self, initial_epoch: int) -> None:
        self.epoch = initial_epoch
        state = self.savepath / "epoch_counter.json"
        if self._check_savestate_ok(state):
            saved = json.loads(state.read_text())
            self.epoch_counter = {k: min(v, initial_epoch - 1) for k, v in saved.items()}

    def add_scalar(self, name, value, **kwargs):
        self.pending[name] = value

    def add_scalars(self, prefix, value_dict, sample_value_dict=None, **kwargs):
        for name, value in value_dict.items():
            self.add_scalar(f"{prefix}{name}", value)
        for name, value in (sample_value_dict or {}).items():
            self.add_scalar(f"{prefix}{name}", value)

    def save(self):
        for name, value in self.pending.items():
            folder = self.savepath / name
            folder.mkdir(parents=True, exist_ok=True)
            np.save(folder / f"{name}_epoch{self.epoch}.npy", np.asarray(value))
            self.epoch_counter[name] = self.epoch
        self.pending = {}
        self.epoch += 1
        self.savepath.mkdir(parents=True, exist_ok=True)
        (self.savepath / "epoch_counter.json").write_text(json.dumps(self.epoch_counter))
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
            tqdm.write(f"{name}: {float(value):.6g}")

    def add_scalars(self, prefix, value_dict, **kwargs):
        for name, value in value_dict.items():
            self.add_scalar(f"{prefix}{name}", value)

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
        self.step = 0

    def resume_from_saved_state(self, initial_epoch: int) -> None:
        self.writer.close()
        self.writer = self._factory(self.savepath, purge_step=initial_epoch)
        self.step = initial_epoch

    def add_scalar(self, name, value, **kwargs):
        if _is_scalar(value):
            self.writer.add_scalar(name, float(value), global_step=self.step)

    def add_scalars(self, prefix, value_dict, **kwargs):
        for name, value in value_dict.items():
            self.add_scalar(f"{prefix}{name}", value)

    def save(self):
        self.writer.flush()
        self.step += 1

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
