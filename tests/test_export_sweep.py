"""ONNX export checked in onnxruntime; threshold sweeps; per-layer allocation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from models import MLP, TwoBranches, warmed_resnet
from torch import nn

import pcasurgery as ps
from pcasurgery.compression import export as export_module
from pcasurgery.core import spectrum


@pytest.fixture(scope="module")
def _calibrated_resnet():
    net = warmed_resnet()
    return ps.calibrate(ps.pca_wrap(net, 0.9), torch.randn(96, 3, 8, 8).split(32), progress=False)


@pytest.fixture
def wrapped_resnet(_calibrated_resnet):
    """A fresh copy for each test (tests change thresholds): results never depend on order."""
    return copy.deepcopy(_calibrated_resnet)


def test_onnx_parity_for_compressed_and_projected_models(tmp_path, wrapped_resnet):
    x = torch.randn(4, 3, 8, 8)
    small = ps.compress(wrapped_resnet)
    for name, model in (("small", small), ("projected", wrapped_resnet)):
        path = ps.export_onnx(model, x, tmp_path / f"{name}.onnx")
        assert path.exists()
        for batch in (1, 9):
            inputs = torch.randn(batch, 3, 8, 8)
            (out,) = ps.compression.run_onnx(path, inputs)
            np.testing.assert_allclose(out, model(inputs).detach().numpy(), atol=1e-4, rtol=1e-4)


def test_export_is_quiet_and_restores_flags(tmp_path, capfd):
    torch.manual_seed(0)
    net = MLP().train()
    ps.export_onnx(net, torch.randn(3, 12), tmp_path / "mlp.onnx")
    captured = capfd.readouterr()
    assert "torch.onnx" not in captured.out and "torchvision" not in captured.err
    assert net.training


def test_export_errors(tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = MLP().eval()
    with pytest.raises(ValueError, match="folder .* does not exist"):
        ps.export_onnx(net, torch.randn(2, 12), tmp_path / "missing" / "m.onnx")
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as caught:
        ps.export_onnx(net, torch.randn(2, 7), tmp_path / "m.onnx")
    assert "example_inputs of shapes [(2, 7)]" in caught.value.__notes__[0]
    with pytest.raises(TypeError, match="example_inputs must be a tensor"):
        ps.export_onnx(net, [1, 2], tmp_path / "m.onnx")
    real = export_module.run_onnx
    monkeypatch.setattr(export_module, "run_onnx", lambda p, *i: [o + 0.5 for o in real(p, *i)])
    with pytest.raises(
        ps.OnnxCheckError,
        match=r"differs from PyTorch by up to 0.5 .*shape \(2, 12\); checked input shapes "
        r"\[\(2, 12\), \(5, 12\)\]",
    ):
        ps.export_onnx(net, torch.randn(2, 12), tmp_path / "m.onnx")
    # outputs of scale 1e-10: an error of 1e-12 is 1 % of them, and fails
    tiny = nn.Sequential(MLP(), nn.Flatten()).eval()
    with torch.no_grad():
        tiny[0].out.weight.mul_(1e-10)
        tiny[0].out.bias.mul_(1e-10)
    monkeypatch.setattr(export_module, "run_onnx", lambda p, *i: [o + 1e-12 for o in real(p, *i)])
    with pytest.raises(ps.OnnxCheckError, match="differs from PyTorch by up to 1e-12"):
        ps.export_onnx(tiny, torch.randn(2, 12), tmp_path / "m.onnx")
    monkeypatch.setattr(export_module, "run_onnx", real)
    ps.export_onnx(tiny, torch.randn(2, 12), tmp_path / "m.onnx")  # and passes as it is


def test_sweep_rows_restoration_and_monotonic_k(monkeypatch, wrapped_resnet):
    ps.set_threshold(wrapped_resnet, {"*": 0.9, "fc": 0.95})
    before = ps.report(wrapped_resnet)[["layer", "threshold", "idim"]]
    x = torch.randn(16, 3, 8, 8)
    reference = wrapped_resnet(x).detach()  # (the eigenvectors' first use)
    calls = []
    original = spectrum.eigh_descending
    monkeypatch.setattr(spectrum, "eigh_descending", lambda m: calls.append(1) or original(m))

    def evaluate(model):
        assert not model.training
        return {"mse": float((model(x) - reference).detach().pow(2).mean()), "one": 1.0}

    table = ps.sweep(wrapped_resnet, [0.5, 0.8, 0.95, 0.999], evaluate, example_inputs=x[:2])
    assert calls == []
    assert table["threshold"].tolist() == [0.5, 0.8, 0.95, 0.999]
    assert list(table.columns) == [
        "threshold",
        "mean_saturation",
        "total_k",
        "params",
        "macs",
        "mse",
        "one",
    ]
    assert table["total_k"].is_monotonic_increasing and table["params"].is_monotonic_increasing
    assert table["macs"].is_monotonic_increasing
    assert table["mse"].iloc[0] > table["mse"].iloc[-1]
    assert ps.report(wrapped_resnet)[["layer", "threshold", "idim"]].equals(before)
    scalar = ps.sweep(wrapped_resnet, [0.9], evaluate=lambda m: 0.5)
    assert scalar["metric"].tolist() == [0.5] and scalar["macs"].isna().all()
    with pytest.raises(ValueError, match=r"thresholds\[i\] must be in \(0, 1\]"):
        ps.sweep(wrapped_resnet, [0.9, 1.5])


def test_allocate_stays_within_max_drop_and_beats_the_best_global_threshold():
    torch.manual_seed(0)
    net = TwoBranches().eval()
    data = torch.randn(2000, 16)
    wrapped = ps.calibrate(ps.pca_wrap(net, 1.0), data.split(500), progress=False)
    x = torch.randn(500, 16)
    reference = net(x).detach()

    def fidelity(model):  # higher is better
        return -float((model(x) - reference).detach().pow(2).mean())

    max_drop = 1e-3
    steps = ps.allocate(wrapped, fidelity, max_drop, example_inputs=x[:4])
    assert list(steps.columns) == ["step", "layer", "threshold", "k", "metric", "macs", "params"]
    assert (steps["metric"] >= steps["metric"].iloc[0] - max_drop).all()
    assert fidelity(wrapped.eval()) >= steps["metric"].iloc[0] - max_drop
    assert steps["macs"].is_monotonic_decreasing
    final = ps.report(wrapped).set_index("layer")
    assert final.loc["cut", "idim"] == 2 and final.loc["keep", "idim"] == 16

    glob = ps.sweep(wrapped, ps.analysis.DEFAULT_LADDER, fidelity, example_inputs=x[:4])
    feasible = glob[glob["metric"] >= steps["metric"].iloc[0] - max_drop]
    assert steps["macs"].iloc[-1] < feasible["macs"].min()

    # without example inputs, the estimate from calibration shapes drives the same choice
    estimated = ps.allocate(wrapped, fidelity, max_drop)
    assert estimated["layer"].iloc[1:].tolist() == steps["layer"].iloc[1:].tolist()
    with pytest.raises(ValueError, match="max_drop must be a number >= 0"):
        ps.allocate(wrapped, fidelity, -1)


def test_set_threshold_mapping_drives_compression(wrapped_resnet):
    ps.set_threshold(wrapped_resnet, {"*": 0.99, "head": 0.5})
    table = ps.compress(wrapped_resnet).compression_report.set_index("layer")
    assert table.loc["head", "k"] == ps.pca_layers_of(wrapped_resnet)["head"].in_dim
    assert table.loc["head", "k"] < table.loc["head", "width"]


def test_missing_export_packages_are_named(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnxruntime" else real(name, *a),
    )
    with pytest.raises(
        ImportError, match=r"need the onnxruntime package: pip install 'pcasurgery\[export\]'"
    ):
        ps.export_onnx(MLP().eval(), torch.randn(2, 12), tmp_path / "m.onnx")


class Encoder(nn.Module):
    """Takes a tokenizer's dict and returns a ModelOutput-like dict with a cache in it."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.mlp = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, input_ids, attention_mask):
        h = torch.tanh(self.mlp(self.embed(input_ids))) * attention_mask.unsqueeze(-1)
        return {"last_hidden_state": h, "past_key_values": object(), "logits": self.head(h)}


@pytest.mark.slow
def test_dict_inputs_and_dict_outputs_everywhere(tmp_path):
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 50, (4, 9), generator=g),
             "attention_mask": torch.ones(4, 9, dtype=torch.long)}  # fmt: skip
    batch["attention_mask"][0, 6:] = 0
    model = Encoder().eval()
    wrapped = ps.pca_wrap(model, 0.9)
    ps.calibrate(wrapped, [batch] * 3, progress=False)
    assert ps.count_macs(model, batch) == 9 * (16 * 16 + 16 * 4)  # per example: 9 tokens
    table = ps.sweep(wrapped, [0.9, 1.0], example_inputs=batch)
    assert table["macs"].notna().all()
    small = ps.compress(wrapped)
    path = ps.export_onnx(small, batch, tmp_path / "encoder.onnx")  # dynamic batch and sequence
    graph = onnx.load(path).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert all(isinstance(d, str) for d in dims), dims  # both dimensions dynamic
    shorter = {k: v[:2, :5] for k, v in batch.items()}
    got = ps.compression.run_onnx(path, shorter["input_ids"], shorter["attention_mask"])
    with torch.no_grad():
        expected = small(**shorter)
    np.testing.assert_allclose(got[0], expected["last_hidden_state"].numpy(), atol=1e-5)
    np.testing.assert_allclose(got[1], expected["logits"].numpy(), atol=1e-5)
