"""The scenarios of delve's own tests and examples, runnable on delve or on pcasurgery.

``python tests/delve_scenarios.py <delve|pcasurgery> <out folder>`` writes one
folder per scenario under ``out`` and ``numbers.json`` with the values worth
comparing. It runs in a subprocess so that the real delve 0.1.50 (installed
apart from the project, in ``.bench-deps``) and pcasurgery never share a process.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def load(lib: str):
    """The library's tracker, writers and PCA layer API, under the seed's names."""
    if lib == "delve":
        sys.path.insert(0, str(ROOT / ".bench-deps"))
        from delve import pca_layers
        from delve.torchcallback import CheckLayerSat
        from delve.writers import CSVandPlottingWriter, CSVWriter, NPYWriter, PrintWriter
    else:
        from pcasurgery import CheckLayerSat, pca_layers
        from pcasurgery.writers import CSVandPlottingWriter, CSVWriter, NPYWriter, PrintWriter
    return CheckLayerSat, pca_layers, CSVandPlottingWriter, CSVWriter, NPYWriter, PrintWriter


def batches(n: int, *shape: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def dense_many_writers(lib: str, out: Path, numbers: dict) -> None:
    """delve's dense test with every writer, three epochs of add_saturations() then save()."""
    CheckLayerSat, _, Plotting, _, NPY, Print = load(lib)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Sequential(nn.Linear(12, 5)))
    path = str(out / "run")
    writers = [Plotting(path, fontsize=8), NPY(path), Print()]
    tracker = CheckLayerSat(path, writers, model, stats=["lsat", "idim", "det", "trc", "dtrc"],
                            device="cpu")  # fmt: skip
    data = batches(6, 48, 10)
    for epoch in range(3):
        model.train()
        model(data[2 * epoch])
        model.eval()
        with torch.no_grad():
            model(data[2 * epoch + 1])
        tracker.add_scalar("test_accuracy", 0.5 + epoch / 10)
        tracker.add_saturations()
        tracker.save()  # delve's deep example does this; it must not add an epoch
    tracker.close()


def deep_stop_resume(lib: str, out: Path, numbers: dict) -> None:
    """delve's deep example: a conv net, recording only in odd epochs (stop/resume)."""
    CheckLayerSat, *_ = load(lib)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 10))  # fmt: skip
    tracker = CheckLayerSat("experiment", save_to="plotcsv", stats=["lsat"], modules=model,
                            device="cpu")  # fmt: skip
    data = batches(8, 16, 3, 8, 8)
    for epoch in range(4):
        if epoch % 2 == 1:
            tracker.resume()
        else:
            tracker.stop()
        model.train()
        model(data[2 * epoch])
        model.eval()
        with torch.no_grad():
            model(data[2 * epoch + 1])
        tracker.add_scalar("accuracy", epoch / 10)
        tracker.add_scalar("loss", 1 - epoch / 10)
        tracker.add_saturations()
        tracker.save()
    tracker.close()


def conv_with_pca_layers(lib: str, out: Path, numbers: dict) -> None:
    """delve's conv tests: tracking next to a PCA layer, threshold changes, random directions."""
    CheckLayerSat, pca_layers, _, CSV, _, _ = load(lib)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 3), pca_layers.Conv2DPCALayer(16, verbose=False))
    tracker = CheckLayerSat(str(out / "conv"), [CSV(str(out / "conv"))], model,
                            stats=["lsat", "idim"], device="cpu")  # fmt: skip
    x = batches(1, 32, 4, 10, 10)[0]
    model(x)
    model.eval()
    with torch.no_grad():
        before = model(x)
        sat, in_dims, fs_dims, names = pca_layers.change_all_pca_layer_thresholds(0.5, model)
        after = model(x)
        pca_layers.change_all_pca_layer_thresholds_and_inject_random_directions(0.99, model)
        random = model(x)
    numbers["conv"] = {
        "fs_dims": fs_dims,
        "names": names,
        "threshold_changed_outputs": bool((before != after).any()),
        "random_changed_outputs": bool((after != random).any()),
    }
    tracker.add_saturations()
    tracker.close()


def lstm(lib: str, out: Path, numbers: dict) -> None:
    """delve's LSTM tests: timestepwise, and last_timestep with the embed stat."""
    CheckLayerSat, _, Plotting, _, _, _ = load(lib)
    for method, stats in (("timestepwise", ["lsat", "idim"]), ("last_timestep", ["lsat", "embed"])):
        torch.manual_seed(0)
        model = nn.Sequential()
        model.add_module("lstm", nn.LSTM(10, 12, 2))
        path = str(out / method)
        tracker = CheckLayerSat(path, [Plotting(path, fontsize=8)], model, stats=stats,
                                timeseries_method=method, device="cpu")  # fmt: skip
        for x in batches(2, 5, 8, 10):
            model(x)
        tracker.add_saturations()
        tracker.close()


def resume(lib: str, out: Path, numbers: dict) -> None:
    """Two epochs, stop, resume at epoch 2 for one more: CSV and NPY; a user value named epoch."""
    CheckLayerSat, _, _, CSV, NPY, _ = load(lib)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8))
    data = batches(3, 32, 6)
    for start, epochs in ((0, (0, 1)), (2, (2,))):
        path = str(out / "run")
        tracker = CheckLayerSat(path, [CSV(path), NPY(path)], model, stats=["lsat"],
                                device="cpu", initial_epoch=start)  # fmt: skip
        for epoch in epochs:
            model(data[epoch])
            tracker.add_scalar("epoch", float(epoch))
            tracker.add_saturations()
        tracker.close()


def pca_state_dicts(lib: str, out: Path, numbers: dict) -> None:
    """PCA layers after training and an eval pass (eigenspace computed), and after more training."""
    _, pca_layers, *_ = load(lib)
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(6, 6))[0]
    x = (torch.randn(400, 6) * torch.tensor([3.0, 2.9, 0.01, 0.01, 0.01, 0.01])) @ basis.T
    linear = pca_layers.LinearPCALayer(6, 0.99)
    linear(x)
    linear.eval()
    projected = linear(x[:5])
    conv = pca_layers.Conv2DPCALayer(6, 0.99, verbose=False)
    images = torch.randn(8, 6, 5, 5)
    conv(images)
    conv.eval()
    conv_projected = conv(images).detach()
    torch.save({"linear": linear.state_dict(), "conv": conv.state_dict(), "x": x[:5],
                "projected": projected, "images": images, "conv_projected": conv_projected},
               out / "layers.pt")  # fmt: skip
    linear.train()
    linear(2 * x)  # statistics present, eigenspace stale
    torch.save({"linear": linear.state_dict(), "x": 2 * x}, out / "stale.pt")


SCENARIOS = [dense_many_writers, deep_stop_resume, conv_with_pca_layers, lstm, resume,
             pca_state_dicts]  # fmt: skip


def main(lib: str, out: str) -> None:
    warnings.simplefilter("ignore")
    logging.disable(logging.INFO)
    import matplotlib

    matplotlib.use("Agg")
    torch.set_num_threads(1)
    numbers: dict = {}
    for scenario in SCENARIOS:
        folder = Path(out) / scenario.__name__
        folder.mkdir(parents=True)
        cwd = os.getcwd()
        os.chdir(folder)  # delve writes some files relative to the working directory
        try:
            scenario(lib, folder, numbers)
        finally:
            os.chdir(cwd)
    (Path(out) / "numbers.json").write_text(json.dumps(numbers))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
