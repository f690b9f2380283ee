"""Coming from delve: its tests' and examples' scenarios give the files delve gives.

The scenarios (``delve_scenarios.py``) run in subprocesses, once on pcasurgery
and, where the real delve 0.1.50 is installed apart from the project
(``make .bench-deps``, which ``make test`` does), once on delve; then files,
CSV tables, NPY counters and numbers are compared. Without delve, the tests
that need it skip and the others still check pcasurgery's own behaviour.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import pcasurgery as ps

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("delve_scenarios.py")


def run(lib: str, out: Path) -> Path | None:
    result = subprocess.run([sys.executable, str(SCRIPT), lib, str(out)], capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    if result.returncode != 0:
        if lib == "delve":
            return None
        raise AssertionError(result.stderr[-3000:])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path | None]:
    root = tmp_path_factory.mktemp("scenarios")
    has_delve = (ROOT / ".bench-deps" / "delve").is_dir()
    return {
        "ours": run("pcasurgery", root / "ours"),
        "delve": run("delve", root / "delve") if has_delve else None,
    }


@pytest.fixture
def delve_run(runs) -> Path:
    if runs["delve"] is None:
        pytest.skip("delve 0.1.50 is not installed apart from the project (make .bench-deps)")
    return runs["delve"]


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep=";", index_col=0)


# ------------------------------------------------------------ against delve
def test_every_scenario_writes_the_files_delve_writes(runs, delve_run):
    ours = [f for f in files(runs["ours"]) if f != "numbers.json"]
    theirs = [f for f in files(delve_run) if f != "numbers.json"]
    assert ours == theirs
    assert any(f.endswith("run_lsat_eval_epoch_2.png") for f in ours)
    assert any("/_train-saturation_0/_train-saturation_0_epoch2.npy" in f for f in ours)


@pytest.mark.parametrize("table", ["dense_many_writers/run.csv", "deep_stop_resume/experiment.csv",
                                   "resume/run.csv", "conv_with_pca_layers/conv.csv",
                                   "lstm/timestepwise.csv", "lstm/last_timestep.csv"])  # fmt: skip
def test_csv_tables_have_delves_layout_and_numbers(runs, delve_run, table):
    ours, theirs = csv(runs["ours"] / table), csv(delve_run / table)
    # delve's Conv2DPCALayer holds two Conv2d modules of its own, which delve then
    # tracks as layers; our PCA layers hold no module to track (docs/migration.md)
    internal = [c for c in theirs.columns if c.endswith("convolution")]
    assert all(c.split("_", 1)[1] in ("1-convolution", "1-mean_subtracting_convolution")
               for c in internal)  # fmt: skip
    theirs = theirs.drop(columns=internal)
    assert ours.columns.tolist() == theirs.columns.tolist()
    assert ours.index.tolist() == theirs.index.tolist()
    if not internal:
        header = (runs["ours"] / table).read_text().splitlines()[0]
        assert header == (delve_run / table).read_text().splitlines()[0]
    if table.startswith("lstm/"):
        return  # delve flattens all timesteps into one sample, and reads batch-first (migration.md)
    for column in ours.columns:
        a, b = ours[column].to_numpy(float), theirs[column].to_numpy(float)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=column)  # same gaps
        a, b = a[~np.isnan(a)], b[~np.isnan(b)]
        if "intrinsic-dimensionality" in column:
            # delve.metrics counts the directions strictly below the threshold; we count
            # the smallest k reaching it (scikit-learn's rule): one more, or the same
            assert set(a - b) <= {0.0, 1.0}, column
        elif "saturation" in column:
            assert np.all((a - b >= -1e-12) & (a - b <= 1 / 4 + 1e-12)), column
        elif "determinant" in column:
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-20, err_msg=column)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=column)


def test_npy_counters_and_values_match_delves(runs, delve_run):
    for scenario in ("dense_many_writers", "resume"):
        ours = pickle.loads((runs["ours"] / scenario / "run" / "epoch_counter.pkl").read_bytes())
        theirs = pickle.loads((delve_run / scenario / "run" / "epoch_counter.pkl").read_bytes())
        assert ours == theirs, scenario
    name = "_train-covariance-trace_0"
    for epoch in range(3):
        path = Path("dense_many_writers/run") / name / f"{name}_epoch{epoch}.npy"
        np.testing.assert_allclose(np.load(runs["ours"] / path), np.load(delve_run / path),
                                   rtol=1e-6)  # fmt: skip


def test_pca_layer_functions_behave_like_delves(runs, delve_run):
    ours = json.loads((runs["ours"] / "numbers.json").read_text())
    theirs = json.loads((delve_run / "numbers.json").read_text())
    assert ours == theirs


def test_delve_checkpoints_load_and_project_as_delve_did(delve_run):
    saved = torch.load(delve_run / "pca_state_dicts" / "layers.pt", weights_only=True)
    linear = ps.LinearPCALayer(6, 0.5)
    linear.load_state_dict(saved["linear"])
    assert linear.threshold == pytest.approx(0.99) and linear.pca_computed
    torch.testing.assert_close(linear.eval()(saved["x"]), saved["projected"], rtol=1e-5, atol=1e-6)
    conv = ps.Conv2DPCALayer(6, 0.99, verbose=False)
    conv.load_state_dict(saved["conv"])
    torch.testing.assert_close(conv.eval()(saved["images"]), saved["conv_projected"],
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    # statistics collected after the last eigendecomposition are delve's unshifted sums
    stale = torch.load(delve_run / "pca_state_dicts" / "stale.pt", weights_only=True)
    layer = ps.LinearPCALayer(6)
    layer.load_state_dict(stale["linear"])
    assert not layer.pca_computed and layer.samples == 400
    layer.eval()(stale["x"][:1])
    reference = np.cov(stale["x"].double().numpy(), rowvar=False, bias=True)
    np.testing.assert_allclose(layer.eigenvalues.numpy(), np.linalg.eigvalsh(reference)[::-1],
                               rtol=1e-6, atol=1e-9)  # fmt: skip


def test_pcasurgery_resumes_delves_files(tmp_path, delve_run):
    folder = tmp_path / "resume"
    shutil.copytree(delve_run / "resume", folder)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8))
    path = str(folder / "run")
    tracker = ps.CheckLayerSat(path, ["csv", "npy"], model, device="cpu", initial_epoch=3)
    model(torch.randn(16, 6))
    tracker.add_scalar("epoch", 3.0)
    tracker.add_saturations()
    tracker.close()
    table = csv(folder / "run.csv")
    assert table.index.tolist() == [0, 1, 2, 3] and table["epoch"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert (folder / "run" / "epoch" / "epoch_epoch3.npy").exists()
    counter = pickle.loads((folder / "run" / "epoch_counter.pkl").read_bytes())
    assert counter == {"epoch": 3, "_train-saturation_0": 3}


# ------------------------------------------------------- our own behaviour
def test_save_after_add_saturations_adds_no_epoch(runs):
    table = csv(runs["ours"] / "dense_many_writers" / "run.csv")
    assert table.index.tolist() == [0, 1, 2]
    assert table["test_accuracy"].tolist() == pytest.approx([0.5, 0.6, 0.7])
    assert not table.isna().any().any()
    plots = sorted(p.name for p in (runs["ours"] / "dense_many_writers").glob("run_lsat_*.png"))
    assert plots == [f"run_lsat_{m}_epoch_{e}.png" for m in ("eval", "train") for e in range(3)]


def test_a_user_value_named_epoch_is_a_column_like_any_other(runs):
    table = csv(runs["ours"] / "resume" / "run.csv")
    assert table.index.tolist() == [0, 1, 2] and table["epoch"].tolist() == [0.0, 1.0, 2.0]
    assert table.columns.tolist() == ["epoch", "train-saturation_0"]
    names = files(runs["ours"] / "resume" / "run")
    assert names == sorted(
        [f"_train-saturation_0/_train-saturation_0_epoch{e}.npy" for e in range(3)]
        + [f"epoch/epoch_epoch{e}.npy" for e in range(3)]
        + ["epoch_counter.pkl"]
    )


def test_logs_use_delves_keys_and_layer_names(tmp_path):
    model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(3, 4)), torch.nn.LSTM(4, 2))
    model[1].name = "lstm2"
    tracker = ps.CheckLayerSat(str(tmp_path / "t"), "csv", model, device="cpu")
    assert list(tracker.layers) == ["0-0", "lstm2"]
    model[0](torch.randn(5, 3))
    assert tracker.logs["train-covariance-matrix"]["0-0"]._tlen == 5
    listed = ps.CheckLayerSat(str(tmp_path / "l"), "csv", [model[0][0], model], device="cpu")
    assert list(listed.layers) == ["Module-0-Linear", "0-0", "lstm2"]
    tracker.close()
    listed.close()


def test_seed_layer_attributes():
    layer = ps.LinearPCALayer(4, 0.9)
    assert layer.is_floating_point() is False
    layer(torch.randn(100, 4) * torch.tensor([5.0, 1.0, 0.1, 0.01]))
    layer.eval()(torch.randn(1, 4))
    assert layer.pca_computed
    layer.train()(torch.randn(50, 4) * 10)  # a new phase: fresh statistics
    layer.pca_computed = True  # keep the current projection for them
    assert layer.pca_computed
    before = layer.eigenvalues.clone()
    layer.eval()(torch.randn(1, 4))
    assert torch.equal(layer.eigenvalues, before)
    layer.pca_computed = False  # recompute at the next eval call
    layer.eval()(torch.randn(1, 4))
    assert not torch.equal(layer.eigenvalues, before) and layer.pca_computed
    with pytest.raises(TypeError, match="pca_computed must be True or False"):
        layer.pca_computed = 1
