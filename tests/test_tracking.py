"""CheckLayerSat: the seed's gallery, every stat/method/writer, resume, and bad input."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import decaying_data
from sklearn.decomposition import PCA
from torch import nn

from pcasurgery import CheckLayerSat
from pcasurgery.tracking import saturation as saturation_module
from pcasurgery.writers import AbstractWriter

ROOT = Path(__file__).resolve().parents[1]


def sk_idim(rows: np.ndarray, t: float = 0.99) -> int:
    return PCA(n_components=t, svd_solver="full").fit(rows.astype(np.float64)).n_components_


def test_the_seed_gallery_example_runs_with_only_the_import_changed(tmp_path, monkeypatch):
    monkeypatch.setattr(
        sys, "argv", ["extract_saturation.py", "--steps", "3", "--out", str(tmp_path)]
    )
    runpy.run_path(str(ROOT / "examples" / "extract_saturation.py"), run_name="__main__")
    for h in (3, 32):
        table = pd.read_csv(tmp_path / f"h{h}.csv", sep=";", index_col=0)
        assert len(table) == 3
        columns = [c for c in table.columns if "saturation" in c]
        assert sorted(columns) == sorted(
            f"{mode}-saturation_Module-{i}-Linear" for mode in ("train", "eval") for i in (0, 1)
        )
        assert ((table[columns] >= 0) & (table[columns] <= 1)).all().all()
        assert {"train-loss", "test-loss"} <= set(table.columns)
        for mode in ("train", "eval"):  # delve's names
            assert (tmp_path / f"h{h}_lsat_{mode}_epoch_2.png").stat().st_size > 5000


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def capture(module: nn.Module, model: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    outs = []
    handle = module.register_forward_hook(lambda m, i, o: outs.append(o.detach()))
    with torch.no_grad():
        for x in inputs:
            model(x)
    handle.remove()
    return outs


def test_covariance_saved_by_npy_equals_numpy(tmp_path):
    torch.manual_seed(0)
    net = Net().eval()
    inputs = [torch.randn(20, 3, 4, 4) + 5 for _ in range(3)]
    tracker = CheckLayerSat(str(tmp_path / "run"), "npy", net, stats=["cov", "lsat"], device="cpu")
    outs = capture(net.fc, net, inputs)
    tracker.add_saturations()
    tracker.close()
    saved = np.load(
        tmp_path / "run" / "_eval-covariance-matrix_fc" / "_eval-covariance-matrix_fc_epoch0.npy"
    )
    reference = np.cov(torch.cat(outs).double().numpy(), rowvar=False, bias=True)
    np.testing.assert_allclose(saved, reference, rtol=1e-5, atol=1e-9)
    assert saved.shape == (10, 10)


@pytest.mark.parametrize("method", ["channelwise", "mean", "max", "median", "flatten"])
def test_conv_methods_match_numpy(tmp_path, method):
    torch.manual_seed(0)
    net = Net().eval()
    inputs = [torch.randn(40, 3, 4, 4) for _ in range(2)]
    tracker = CheckLayerSat(str(tmp_path / "r"), "csv", net, stats=["idim", "lsat"], conv_method=method,
                            device="cpu", sat_threshold=0.95)  # fmt: skip
    out = torch.cat(capture(net.conv, net, inputs)).numpy()
    rows = {
        "channelwise": out.transpose(0, 2, 3, 1).reshape(-1, 6),
        "mean": out.mean((2, 3)),
        "max": out.max((2, 3)),
        "median": np.median(out.reshape(80, 6, 16), axis=2),
        "flatten": out.reshape(80, -1),
    }[method]
    values = tracker.add_saturations()
    assert values["eval-intrinsic-dimensionality_conv"] == sk_idim(rows, 0.95)
    assert values["eval-saturation_conv"] == pytest.approx(sk_idim(rows, 0.95) / rows.shape[1])
    tracker.close()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("method", ["last_timestep", "timestepwise"])
def test_lstm_methods(tmp_path, method, batch_first):
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 8, batch_first=batch_first).eval()
    x = torch.randn(30, 7, 4) if batch_first else torch.randn(7, 30, 4)
    tracker = CheckLayerSat(str(tmp_path / "l"), "csv", lstm, stats=["idim"], timeseries_method=method,
                            device="cpu", sat_threshold=0.9)  # fmt: skip
    with torch.no_grad():
        out, (h, _) = lstm(x)
    rows = h[-1].numpy() if method == "last_timestep" else out.reshape(-1, 8).numpy()
    with torch.no_grad():
        lstm(x)  # the tracked pass
    values = tracker.add_saturations()
    assert values["eval-intrinsic-dimensionality_Module-0-LSTM"] == sk_idim(rows, 0.9)
    tracker.close()


def test_train_and_eval_passes_are_kept_apart(tmp_path):
    torch.manual_seed(0)
    fc = nn.Linear(8, 8)
    tracker = CheckLayerSat(
        str(tmp_path / "s"), "csv", nn.Sequential(fc), stats=["idim"], device="cpu"
    )
    low_rank = torch.from_numpy(decaying_data(200, 8, decay=0.1))
    fc.train()
    with torch.no_grad():
        fc.weight.copy_(torch.eye(8))
        fc.bias.zero_()
        fc(low_rank)
        fc.eval()
        fc(torch.randn(200, 8))
    values = tracker.add_saturations()
    assert (
        values["train-intrinsic-dimensionality_0"] < values["eval-intrinsic-dimensionality_0"] == 8
    )
    tracker.close()


def test_initial_epoch_resume_appends(tmp_path):
    torch.manual_seed(0)
    net = Net()
    for start, epochs in ((0, 2), (2, 2)):
        tracker = CheckLayerSat(
            str(tmp_path / "res"), "csv", net, device="cpu", initial_epoch=start
        )
        for _ in range(epochs):
            net(torch.randn(8, 3, 4, 4))
            tracker.add_scalar("epoch-seen", start)
            tracker.add_saturations()
        tracker.close()
    table = pd.read_csv(tmp_path / "res.csv", sep=";", index_col=0)
    assert table.index.tolist() == [0, 1, 2, 3]
    assert table["epoch-seen"].tolist() == [0, 0, 2, 2]


class Recorder(AbstractWriter):
    def __init__(self):
        self.values, self.saves = {}, 0

    def resume_from_saved_state(self, initial_epoch):
        pass

    def add_scalar(self, name, value, **kwargs):
        self.values[name] = value

    def add_scalars(self, prefix, value_dict, **kwargs):
        for k, v in value_dict.items():
            self.add_scalar(prefix + k, v)
        for k, v in (kwargs.get("sample_value_dict") or {}).items():
            self.add_scalar(prefix + k, v)

    def save(self):
        self.saves += 1

    def close(self):
        pass


def test_custom_writer_receives_every_value(tmp_path):
    torch.manual_seed(0)
    net = Net().eval()
    recorder = Recorder()
    stats = ["lsat", "idim", "cov", "det", "trc", "dtrc", "embed"]
    with pytest.warns(UserWarning, match="no 'npy' writer"):
        tracker = CheckLayerSat(
            str(tmp_path / "c"), recorder, net, stats=stats, device="cpu", average_sat=True
        )
    net(torch.randn(16, 3, 4, 4))
    tracker.add_scalar("loss", 1.5)
    tracker.add_saturations()
    names = {"saturation", "intrinsic-dimensionality", "covariance-matrix", "covariance-determinant",
             "covariance-trace", "diagonal-trace", "embedded-sample"}  # fmt: skip
    for layer in ("conv", "fc"):
        for name in names:
            assert f"eval-{name}_{layer}" in recorder.values, (name, layer)
    assert recorder.values["loss"] == 1.5 and recorder.saves == 1
    assert recorder.values["eval-embedded-sample_fc"].shape == (16, 2)
    sats = [recorder.values[f"eval-saturation_{layer}"] for layer in ("conv", "fc")]
    assert recorder.values["average-eval-sat"] == pytest.approx(np.mean(sats))
    assert 0 < recorder.values["average-eval-sat"] <= 1
    cov = recorder.values["eval-covariance-matrix_fc"]
    assert recorder.values["eval-covariance-trace_fc"] == pytest.approx(np.trace(cov))
    assert recorder.values["eval-diagonal-trace_fc"] == pytest.approx(np.linalg.eigvalsh(cov).sum())


def test_log_interval_max_samples_stop_and_resume(tmp_path):
    fc = nn.Linear(4, 4)
    tracker = CheckLayerSat(str(tmp_path / "m"), "csv", nn.Sequential(fc), device="cpu", log_interval=2,
                            max_samples=25)  # fmt: skip
    with torch.no_grad():
        for _ in range(6):
            fc(torch.randn(10, 4))  # calls 2, 4, 6 recorded: 10 + 10 + 5 (cut at 25)
        assert tracker.logs["train-covariance-matrix"]["0"]._tlen == 25
        tracker.stop()
        calls = tracker._calls["0"]
        fc(torch.randn(10, 4))
        fc(torch.randn(10, 4))
        assert not tracker.is_recording()
        assert tracker._calls["0"] == calls  # stopped: the calls are not even counted
        tracker.resume()
    assert tracker.is_recording()
    tracker.close()


def test_print_writer_is_tqdm_friendly(tmp_path, capsys):
    fc = nn.Linear(3, 3)
    tracker = CheckLayerSat(str(tmp_path / "p"), "print", nn.Sequential(fc), device="cpu")
    fc(torch.randn(5, 3))
    tracker.add_saturations()
    assert "_train-saturation_0 : " in capsys.readouterr().out  # delve's format
    tracker.close()


def test_bad_arguments_name_the_value_and_the_allowed(tmp_path):
    net = Net()
    path = str(tmp_path / "bad")
    with pytest.raises(ValueError, match="'lsatt' is not a supported stat; allowed: lsat, idim"):
        CheckLayerSat(path, "csv", net, stats=["lsatt"], device="cpu")
    with pytest.raises(ValueError, match="'excel' is not a writer; allowed: csv, npy"):
        CheckLayerSat(path, "excel", net, device="cpu")
    with pytest.raises(ValueError, match="conv_method must be one of 'channelwise'"):
        CheckLayerSat(path, "csv", net, conv_method="avg", device="cpu")
    with pytest.raises(ValueError, match="timeseries_method must be one of 'last_timestep'"):
        CheckLayerSat(path, "csv", net, timeseries_method="first", device="cpu")
    with pytest.raises(ValueError, match="no supported layer"):
        CheckLayerSat(path, "csv", [nn.ReLU(), nn.Dropout()], device="cpu")
    with pytest.raises(ValueError, match="no supported layer"):
        CheckLayerSat(
            path, "csv", nn.Sequential(nn.Conv2d(1, 1, 1)), include_conv=False, device="cpu"
        )


def test_a_layer_too_wide_warns_with_the_bytes_before_allocating(tmp_path, monkeypatch):
    monkeypatch.setattr(saturation_module, "WIDE_BYTES", 1000)
    net = Net()
    tracker = CheckLayerSat(str(tmp_path / "w"), "csv", net, conv_method="flatten", device="cpu",
                            layer_filter=lambda layers: {"conv": layers["conv"]})  # fmt: skip
    with pytest.warns(
        UserWarning, match=r"layer 'conv' is 96 wide: its covariance needs about .*147,456 bytes"
    ):
        net(torch.randn(4, 3, 4, 4))
    tracker.close()


def test_tensorboard_writer_or_a_clear_error(tmp_path):
    net = Net()
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install tensorboard"):
            CheckLayerSat(str(tmp_path / "tb"), "tensorboard", net, device="cpu")
        return
    tracker = CheckLayerSat(str(tmp_path / "tb"), "tensorboard", net, device="cpu")
    net(torch.randn(4, 3, 4, 4))
    tracker.add_saturations()
    tracker.close()
    assert any((tmp_path / "tb").iterdir())


def test_interpolation_shrinks_large_maps_before_recording(tmp_path):
    conv = nn.Conv2d(3, 4, 1)
    tracker = CheckLayerSat(str(tmp_path / "i"), "csv", nn.Sequential(conv), device="cpu",
                            interpolation_strategy="nearest", interpolation_downsampling=2)  # fmt: skip
    with torch.no_grad():
        out = conv(torch.randn(5, 3, 8, 8))
    assert tracker.logs["train-covariance-matrix"]["0"]._tlen == 5 * 2 * 2
    rows = (
        torch.nn.functional.interpolate(out, size=(2, 2), mode="nearest")
        .permute(0, 2, 3, 1)
        .reshape(-1, 4)
    )
    np.testing.assert_allclose(tracker.logs["train-covariance-matrix"]["0"].fix().numpy(),
                               np.cov(rows.double().numpy(), rowvar=False, bias=True), rtol=1e-5, atol=1e-8)  # fmt: skip
    with pytest.raises(ValueError, match="interpolation_strategy must be one of 'nearest'"):
        CheckLayerSat(
            str(tmp_path / "j"),
            "csv",
            nn.Sequential(conv),
            device="cpu",
            interpolation_strategy="cubic",
        )
    tracker.close()
