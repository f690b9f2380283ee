"""``report`` and ``plot_saturation``: what each PCA layer of a model uses."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from torch import nn

from ..layers.network import calibrated_layers
from ..layers.sites import sites_of

__all__ = ["REPORT_COLUMNS", "plot_saturation", "report"]

REPORT_COLUMNS = (
    "layer",
    "kind",
    "width",
    "idim",
    "saturation",
    "threshold",
    "centering",
    "samples",
    "rows",
    "explained",
    "keepdim",
    "random_directions",
    "follows",
    "attachment",
)


def report(model: nn.Module) -> pd.DataFrame:
    """One row per PCA layer of ``model``, in forward order.

    Columns: ``layer`` (name), ``kind`` (``linear``/``conv2d``), ``width``,
    ``idim`` (``k``), ``saturation`` (``k / width``), ``threshold``,
    ``centering``, ``samples`` (input examples seen), ``rows`` (samples of the
    covariance: tokens, pixels; fewer than ``width`` means an under-sampled
    spectrum, which ``calibrate`` warns about), ``explained`` (fraction
    of variance kept), ``keepdim``, ``random_directions``, and from the record
    ``pca_wrap`` left: ``follows`` (the module whose output the layer projects,
    None when placed by hand) and ``attachment`` (``module``, ``function``,
    ``wrapper`` or ``manual``: see ``pcasurgery.layers.sites``).

    Raises:
        ValueError: the model has no PCA layer.
        NotCalibratedError: some layers have no statistics (they are named).
    """
    layers = calibrated_layers(model, "report")
    sites = {site.name: site for site in sites_of(model)}
    rows = []
    for name, layer in layers.items():
        rows.append(
            {
                "layer": name,
                "kind": layer.kind,
                "width": layer.fs_dim,
                "idim": layer.in_dim,
                "saturation": layer.saturation,
                "threshold": layer.threshold,
                "centering": layer.centering,
                "samples": layer.samples,
                "rows": int(layer.sample_count),
                "explained": layer.explained,
                "keepdim": layer.keepdim,
                "random_directions": bool(layer.random_directions),
                "follows": sites[name].follows,
                "attachment": sites[name].attachment,
            }
        )
    return pd.DataFrame(rows, columns=list(REPORT_COLUMNS))


def plot_saturation(table: pd.DataFrame | nn.Module, path: str | Path | None = None):
    """Bar chart of saturation per layer, in forward order, like the seed library's plots.

    Args:
        table: a ``report`` DataFrame (or a calibrated model, reported first).
        path: where to save the figure (PNG, PDF, SVG... by extension); the
            folder must exist.

    Returns:
        The ``matplotlib.figure.Figure``.
    """
    from matplotlib.figure import Figure

    if isinstance(table, nn.Module):
        table = report(table)
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"table must be a report DataFrame or a model, got {type(table).__name__}")
    missing = {"layer", "saturation"} - set(table.columns)
    if missing:
        raise ValueError(
            f"table lacks the column(s) {sorted(missing)}; pass pcasurgery.report(model)"
        )
    if path is not None:
        path = Path(path)
        if not path.parent.exists():
            raise ValueError(f"path {str(path)!r}: folder {str(path.parent)!r} does not exist")

    n = len(table)
    fig = Figure(figsize=(max(6.0, 0.45 * n + 2), 4.2), layout="constrained")
    ax = fig.add_subplot()
    pct = 100 * table["saturation"].to_numpy(dtype=float)
    bars = ax.bar(range(n), pct, color="#4C72B0")
    if "idim" in table and "width" in table:
        labels = [f"{k}/{w}" for k, w in zip(table["idim"], table["width"], strict=True)]
        ax.bar_label(bars, labels=labels, fontsize=7, padding=2)
    ax.set_xticks(range(n), table["layer"], rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 110)
    ax.set_ylabel("saturation (% of width)")
    ax.set_xlabel("layer (forward order)")
    if "threshold" in table and table["threshold"].nunique() == 1:
        ax.set_title(f"Saturation at threshold {table['threshold'].iloc[0]:g}")
    else:
        ax.set_title("Saturation per layer")
    ax.grid(axis="y", alpha=0.3)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
