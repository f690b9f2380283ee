"""The end-to-end demo (a first version: saturation of the digits' pixels).

The full demo (train, wrap, calibrate, sweep, compress, export) replaces this
as those capabilities land.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .layers.pca import LinearPCALayer


def run_demo(out: str | Path = "demo-out") -> dict[float, int]:
    """Measure how many directions of scikit-learn's 8x8 digits carry each share of variance."""
    from sklearn.datasets import load_digits

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    x = torch.from_numpy(load_digits().data).float()
    layer = LinearPCALayer(x.shape[1])
    for batch in x.split(256):
        layer(batch)
    layer.compute_eigenspace()
    result = {}
    lines = ["threshold,k,saturation"]
    for t in (0.8, 0.9, 0.95, 0.99, 1.0):
        layer.threshold = t
        result[t] = layer.in_dim
        lines.append(f"{t},{layer.in_dim},{layer.saturation:.4f}")
        print(
            f"threshold {t:>5}: k = {layer.in_dim:2d} of {layer.fs_dim} pixels "
            f"(saturation {layer.saturation:.1%})"
        )
    (out / "digits_saturation.csv").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'digits_saturation.csv'}")
    return result
